"""Matting videos: frames decoded one at a time, batched through the network, written as they come.

For an input `<stem>.<ext>` (`.mp4 .mov .avi .mkv .webm .m4v`), `matte_video` writes, under the
output folder, any of:

- `<stem>_alpha.<ext>`: alpha as a grey video (3 equal channels: most codecs have no grey format);
- `<stem>_composite.<ext>`: the frames composited over the background colour or image;
- `<stem>_trimap.<ext>`: the implicit trimap 0/128/255 (a lossy codec blurs its levels a little);
- `<stem>_rgba/000001.png, 000002.png, ...`: RGBA PNG cut-outs (estimated foreground colours), the
  only output with real transparency (the video codecs here carry no alpha channel); lossless.

Videos keep the input's container, frame rate and size (4:2:0 codecs need even sizes: OpenCV's FFmpeg
writer drops the last row/column of an odd size). Codec per container (`--video-codec` overrides):
mp4v (MPEG-4 Part 2) for .mp4/.mov/.m4v/.mkv, MJPG for .avi, VP90 for .webm; FFV1 in .avi/.mkv is lossless.

Temporal smoothing (`--smooth S`, off by default; the paper mattes single images and leaves video
matting to future work, Sec. 5): `fusionnet.video.temporal.AlphaSmoother`, a motion-gated moving average
of the final alpha, which the rgba and composite outputs then use; the trimap is not smoothed.

Audio: OpenCV decodes and encodes pictures only, so every output is silent; a `note:` says so once
per video (with an ffmpeg command to copy the sound back, when ffmpeg is on PATH).

Memory is bounded in the video's length: only one batch of frames (`--batch-size`), its results and
the smoothing state are held. Outputs go to hidden temporary siblings and are renamed into place only
when the whole video succeeded; a video that cannot be opened, has no frames, ends before the frame
count its container declares, or fails midway raises VideoError and leaves nothing behind.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fusionnet.defaults import DEFAULT_VIDEO_BATCH_SIZE
from fusionnet.inference.matter import MatteResult, Matter
from fusionnet.inference.render import Background, fit_background, render_outputs
from fusionnet.model.geometry import as_float_image
from fusionnet.video.io import DEFAULT_FPS, VIDEO_SUFFIXES, StagedOutputs, VideoError, VideoReader
from fusionnet.video.temporal import DEFAULT_MOTION_THRESHOLD, AlphaSmoother

__all__ = ["VIDEO_SUFFIXES", "VideoError", "VideoOptions", "matte_frames", "matte_video"]

FOURCC_BY_SUFFIX = {".mp4": "mp4v", ".mov": "mp4v", ".m4v": "mp4v", ".mkv": "mp4v", ".avi": "MJPG", ".webm": "VP90"}
VIDEO_KINDS = ("alpha", "composite", "trimap")  # written as videos; "rgba" is a PNG sequence
DEFAULT_BATCH_SIZE = DEFAULT_VIDEO_BATCH_SIZE
DEFAULT_BACKGROUND = (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# matting frames
# ---------------------------------------------------------------------------------------------


def matte_frames(
    matter: Matter,
    frames: Iterable[np.ndarray],
    batch_size: int = DEFAULT_BATCH_SIZE,
    smoother: AlphaSmoother | None = None,
) -> Iterator[tuple[np.ndarray, MatteResult]]:
    """Yield `(rgb, result)` per frame, in order, matting `batch_size` frames per network call.

    Frames are same-size `(H,W,3)` uint8 or float in [0,1]; `rgb` is the frame as float32 in [0,1].
    Streams: at most `batch_size` frames are taken from `frames` ahead of the results yielded.
    With a `smoother`, `result.alpha` is the smoothed matte (`raw_alpha` stays the network's).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(as_float_image(frame))
        if len(batch) == batch_size:
            yield from _matte_batch(matter, batch, smoother)
            batch = []
    if batch:
        yield from _matte_batch(matter, batch, smoother)


def _matte_batch(
    matter: Matter, batch: list[np.ndarray], smoother: AlphaSmoother | None
) -> Iterator[tuple[np.ndarray, MatteResult]]:
    for rgb, result in zip(batch, matter.matte_batch(batch)):
        if smoother is not None:
            result = replace(result, alpha=smoother(rgb, result.alpha))
        yield rgb, result


@dataclass(frozen=True)
class VideoOptions:
    """How `matte_video` reads, batches, smooths and writes one video.

    batch_size: frames per network call (memory grows with it, not with the video's length);
    smooth: temporal smoothing strength S in [0, 1) (0: off); motion_threshold: a pixel whose blurred
    colour changed by this much (0..1) since the last frame is not smoothed; video_codec: FourCC of the
    output videos (None: FOURCC_BY_SUFFIX); max_output_side: frames larger are decoded downscaled to it.
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    smooth: float = 0.0
    motion_threshold: float = DEFAULT_MOTION_THRESHOLD
    video_codec: str | None = None
    max_output_side: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.smooth < 1.0:
            raise ValueError(f"smooth must be in [0, 1), got {self.smooth}")
        if self.video_codec is not None and len(self.video_codec) != 4:
            raise ValueError(f"a FourCC code has 4 characters (e.g. mp4v, MJPG, FFV1), got {self.video_codec!r}")


def matte_video(
    matter: Matter,
    path: Path,
    out_dir: Path,
    stem: str,
    kinds: Sequence[str],
    background: Background | None,
    options: VideoOptions,
    progress: bool,
) -> list[Path]:
    """Matte the video `path`; write `<stem>_<kind>` outputs under `out_dir`; returns the paths written.

    `kinds`: any of alpha, rgba, composite, trimap (rgba gives the folder `<stem>_rgba/`). Notes (audio,
    downscaling) go to stderr.

    Raises VideoError (nothing left behind) when the video cannot be read or written.
    """
    from tqdm import tqdm

    path, out_dir = Path(path), Path(out_dir)
    suffix = path.suffix.lower()
    fourcc = options.video_codec or FOURCC_BY_SUFFIX.get(suffix, "mp4v")
    smoother = AlphaSmoother(options.smooth, options.motion_threshold) if options.smooth else None
    batch_size = options.batch_size
    with VideoReader(path, max_side=options.max_output_side) as reader:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VideoError(path, f"cannot create the output folder {out_dir} ({exc.strerror or exc})") from exc
        _print_notes(reader, [out_dir / f"{stem}_{kind}{suffix}" for kind in kinds if kind in VIDEO_KINDS])
        if "composite" in kinds:
            background = _fitted(background if background is not None else DEFAULT_BACKGROUND, reader.size)
        with StagedOutputs(out_dir, stem, kinds, suffix, fourcc, reader.fps, reader.size, path) as staged:
            done = 0
            bar = tqdm(
                total=reader.frame_count, disable=not progress, unit="frame", desc=path.name, file=sys.stderr
            )
            try:
                for rgb, result in matte_frames(matter, reader, batch_size, smoother):
                    staged.write(done + 1, render_outputs(rgb, result, kinds, background))
                    done += 1
                    bar.update(1)
            except (RuntimeError, ValueError, MemoryError, OSError) as exc:
                raise VideoError(path, f"failed at frame {done + 1} ({type(exc).__name__}: {exc})") from exc
            finally:
                bar.close()
            try:
                return staged.commit()
            except OSError as exc:
                raise VideoError(path, f"cannot move the outputs into place ({type(exc).__name__}: {exc})") from exc


def _fitted(background: Background, size: tuple[int, int]) -> Background:
    """A colour as is; an image scaled and cropped to the frame size once, not per frame."""
    if isinstance(background, tuple):
        return background
    return np.ascontiguousarray(fit_background(background, size))


def _print_notes(reader: VideoReader, videos: Sequence[Path]) -> None:
    from tqdm import tqdm

    note = f"note: {reader.path}: audio is not copied (OpenCV reads and writes pictures only); the outputs are silent"
    if videos and shutil.which("ffmpeg"):
        note += f"; to add it back: ffmpeg -i {videos[0]} -i {reader.path} -map 0:v -map 1:a? -c copy OUT"
    tqdm.write(note, file=sys.stderr)
    if reader.size != reader.source_size:
        (oh, ow), (h, w) = reader.source_size, reader.size
        tqdm.write(
            f"note: {reader.path}: {ow}x{oh} is larger than --max-output-side; outputs are {w}x{h}", file=sys.stderr
        )
    height, width = reader.size
    if videos and (height % 2 or width % 2):  # 4:2:0 chroma needs even sizes; OpenCV crops, the PNGs keep all
        tqdm.write(
            f"note: {reader.path}: {width}x{height} is odd; the videos are {width - width % 2}x{height - height % 2} "
            "(OpenCV drops the last column/row)", file=sys.stderr
        )
    if not reader.fps_declared:
        tqdm.write(f"note: {reader.path}: no frame rate declared; writing {DEFAULT_FPS:g} frames/s", file=sys.stderr)
