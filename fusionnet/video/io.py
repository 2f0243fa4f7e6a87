"""Video files in and out for `fusionnet.video.matte`: a streaming reader and all-or-nothing staged outputs.

Reading and writing go through OpenCV's FFmpeg backend (cv2.VideoCapture, cv2.VideoWriter), which
handles pictures only: no audio is read or written.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from fusionnet.io.images import fit_within

from fusionnet.defaults import VIDEO_SUFFIXES  # noqa: F401
DEFAULT_FPS = 25.0  # for containers that declare no frame rate
# These containers store the frame count; mkv/webm frame counts are estimated from the duration
# (which may include a longer audio track), so only a clear shortfall counts as truncation there.
EXACT_COUNT_SUFFIXES = frozenset({".mp4", ".mov", ".m4v", ".avi"})


class VideoError(Exception):
    """A video that cannot be matted; `str()` is `"<path>: <problem>"`."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


class VideoReader:
    """A video file's frames, decoded one at a time as `(H,W,3)` uint8 RGB; use as a context manager.

    Opening decodes the first frame (so a video with none fails here). `fps`, `frame_count` (as the
    container declares it, None if unknown), `source_size` and `size` (`(H, W)`, after fitting the
    longer side within `max_side` when given) describe it. Iterating once yields every frame and
    raises VideoError when decoding stops clearly short of the declared count (a truncated file).
    """

    def __init__(self, path: str | Path, max_side: int | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise VideoError(self.path, "no such file")
        if not self.path.is_file():
            raise VideoError(self.path, "is a directory, not a video file")
        self._capture = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        if not self._capture.isOpened():
            raise VideoError(self.path, "cannot open as a video (not a video file, truncated, or an unknown codec)")
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        self.fps_declared = bool(np.isfinite(fps) and fps > 0)
        self.fps = float(fps) if self.fps_declared else DEFAULT_FPS
        count = self._capture.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(count) if 0 < count < 2**31 else None
        ok, first = self._capture.read()
        if not ok or first is None:
            self.close()
            raise VideoError(self.path, "has no frames (or its first frame cannot be decoded)")
        self._first: np.ndarray | None = first
        self.source_size = (int(first.shape[0]), int(first.shape[1]))
        self.size = fit_within(self.source_size, max_side)

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._capture.release()

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._first is None:
            raise RuntimeError(f"{self.path}: VideoReader can be iterated once")
        bgr, self._first = self._first, None
        decoded = 0
        while bgr is not None:
            decoded += 1
            if bgr.shape[:2] != self.source_size:
                raise VideoError(self.path, f"frame {decoded} is {bgr.shape[1]}x{bgr.shape[0]}, the first was "
                                 f"{self.source_size[1]}x{self.source_size[0]} (size changes are not supported)")
            yield self._to_rgb(bgr)
            ok, bgr = self._capture.read()
            if not ok:
                bgr = None
        if self.frame_count is not None and decoded < self.frame_count - self._tolerated_shortfall():
            raise VideoError(self.path, f"truncated or damaged: decoded {decoded} of the {self.frame_count} "
                             "frames its container declares")

    def _tolerated_shortfall(self) -> int:
        if self.path.suffix.lower() in EXACT_COUNT_SUFFIXES:
            return 0
        return max(2, self.frame_count // 20)

    def _to_rgb(self, bgr: np.ndarray) -> np.ndarray:
        if bgr.ndim == 2:
            bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
        rgb = cv2.cvtColor(bgr[:, :, :3], cv2.COLOR_BGR2RGB)
        if self.size != self.source_size:
            rgb = cv2.resize(rgb, (self.size[1], self.size[0]), interpolation=cv2.INTER_AREA)
        return rgb


class StagedOutputs:
    """A video's outputs, written to hidden temporary siblings; `commit()` renames them all into place.

    `abort()` (or an exception inside `with`) removes every temporary. A commit whose renames fail
    partway removes the outputs it already placed and puts back an RGBA folder it replaced.
    """

    def __init__(
        self, out_dir: Path, stem: str, kinds: Sequence[str], suffix: str, fourcc: str, fps: float,
        size: tuple[int, int], source: Path,
    ):
        self.source = source
        self._token = secrets.token_hex(6)
        self._writers: dict[str, cv2.VideoWriter] = {}
        self._staged: list[tuple[Path, Path]] = []  # (temporary, target)
        self._rgba_dir: Path | None = None
        try:
            for kind in kinds:
                self._open(out_dir, stem, kind, suffix, fourcc, fps, size)
        except BaseException:
            self.abort()
            raise

    def _open(
        self, out_dir: Path, stem: str, kind: str, suffix: str, fourcc: str, fps: float, size: tuple[int, int]
    ) -> None:
        height, width = size
        if kind == "rgba":
            target = out_dir / f"{stem}_rgba"
            if target.exists() and not target.is_dir():
                raise VideoError(self.source, f"output {target} exists and is not a folder")
            self._rgba_dir = self._stage(target, "")
            self._rgba_dir.mkdir()
            return
        target = out_dir / f"{stem}_{kind}{suffix}"
        if target.is_dir():
            raise VideoError(self.source, f"output path {target} is a folder")
        tmp = self._stage(target, suffix)  # the suffix stays last: FFmpeg picks the container by it
        writer = cv2.VideoWriter(str(tmp), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
        self._writers[kind] = writer
        if not writer.isOpened():
            raise VideoError(self.source, f"cannot write a {width}x{height} {suffix} video with codec "
                             f"{fourcc!r} (try --video-codec, e.g. MJPG with .avi)")

    def _stage(self, target: Path, suffix: str) -> Path:
        tmp = target.with_name(f".{target.name}.{self._token}.tmp{suffix}")
        self._staged.append((tmp, target))
        return tmp

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            self.abort()

    def write(self, index: int, outputs: dict[str, np.ndarray]) -> None:
        """Append frame `index` (1-based): uint8 alpha/trimap `(H,W)`, composite `(H,W,3)`, rgba `(H,W,4)`."""
        for kind, writer in self._writers.items():
            picture = outputs[kind]
            code = cv2.COLOR_GRAY2BGR if picture.ndim == 2 else cv2.COLOR_RGB2BGR
            writer.write(cv2.cvtColor(picture, code))
        if self._rgba_dir is not None:
            png = self._rgba_dir / f"{index:06d}.png"
            if not cv2.imwrite(str(png), cv2.cvtColor(outputs["rgba"], cv2.COLOR_RGBA2BGRA)):
                raise VideoError(self.source, f"cannot write {png}")

    def commit(self) -> list[Path]:
        """Finish the videos and rename every output into place; returns the targets."""
        self._release()
        for tmp, target in self._staged:
            if tmp != self._rgba_dir and (not tmp.is_file() or tmp.stat().st_size == 0):
                raise VideoError(self.source, f"the video writer produced no file for {target.name}")
        placed: list[Path] = []
        replaced: list[tuple[Path, Path]] = []  # (earlier RGBA folder moved aside, its place)
        try:
            for tmp, target in self._staged:
                if tmp.is_dir() and target.is_dir():
                    aside = target.with_name(f".{target.name}.{self._token}.old")
                    target.rename(aside)
                    replaced.append((aside, target))
                tmp.replace(target)
                placed.append(target)
        except BaseException:
            for target in placed:
                _remove(target)
            for aside, target in replaced:
                if not target.exists():
                    aside.rename(target)
            raise
        finally:
            self._remove_temporaries()
        for aside, _ in replaced:
            shutil.rmtree(aside, ignore_errors=True)
        return [target for _, target in self._staged]

    def abort(self) -> None:
        self._release()
        self._remove_temporaries()

    def _release(self) -> None:
        for writer in self._writers.values():
            writer.release()
        self._writers = {}

    def _remove_temporaries(self) -> None:
        for tmp, _ in self._staged:
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
