"""fusionnet.video.matte: videos in, alpha/composite/trimap videos and RGBA PNG sequences out.

Clips are written with cv2 in the test (12 frames of 48x64 unless said). The network is a
densenet121 LateFusionNet with random weights, decoders and fusion narrowed to 16 channels, run at
`max_side=32`, so a frame costs little (the full-resolution 128-channel layers were 80% of the time).
Values are compared before encoding (`matte_frames` yields each frame's maps) and after it for the
lossless outputs (RGBA PNGs, FFV1 videos).
"""

from __future__ import annotations

import argparse
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fusionnet.cli.video_args import add_video_arguments, video_options as options_from_args
from fusionnet.inference.matter import Matter
from fusionnet.inference.render import render_outputs
from fusionnet.io.images import to_uint8
from fusionnet.refine import implicit_trimap
from fusionnet.video.io import VideoReader
from fusionnet.video.matte import VideoError, VideoOptions, matte_frames, matte_video
from fusionnet.video.temporal import AlphaSmoother, flicker
from tests.support.helpers import tiny_net

HEIGHT, WIDTH, FRAMES, FPS = 48, 64, 12, 24.0
KINDS = ["alpha", "rgba", "composite", "trimap"]
GREEN = (0, 255, 0)


# one thread: several test processes share 2 cores (oversubscribed OpenMP: a tiny forward ~10x slower)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def matter() -> Matter:
    return Matter(tiny_net(narrow=True), device="cpu", max_side=32)


def scene(index: int, height: int = HEIGHT, width: int = WIDTH, step: int = 3, seed: int | None = None) -> np.ndarray:
    """`(H,W,3)` uint8 RGB: a textured static background and a bright disc moving `step` px a frame."""
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([40 + 60 * xx / width, 60 + 40 * np.sin(yy / 5.0), 90 + 50 * yy / height], axis=2)
    inside = (yy - height / 2) ** 2 + (xx - width / 4 - step * index) ** 2 < (height / 4) ** 2
    frame = np.where(inside[..., None], [230.0, 190.0, 60.0], background)
    if seed is not None:  # sensor noise, 3 of 255 levels
        frame = frame + np.random.default_rng(seed).normal(0.0, 3.0, frame.shape)
    return np.clip(frame + 0.5, 0, 255).astype(np.uint8)


def write_clip(path: Path, frames, fourcc: str = "mp4v", fps: float = FPS) -> Path:
    frames = list(frames)
    height, width = frames[0].shape[:2] if frames else (HEIGHT, WIDTH)
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def read_video(path: Path) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(str(path))
    fps, frames = capture.get(cv2.CAP_PROP_FPS), []
    while (grabbed := capture.read())[0]:
        frames.append(cv2.cvtColor(grabbed[1], cv2.COLOR_BGR2RGB))
    capture.release()
    return frames, fps


def everything_in(directory: Path) -> list[str]:
    """Every entry under `directory`, hidden temporaries included."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def video_options(*argv: str) -> VideoOptions:
    """VideoOptions as `fusionnet matte` makes them from these command-line options."""
    parser = argparse.ArgumentParser()
    add_video_arguments(parser)
    return options_from_args(parser.parse_args(list(argv)))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", (scene(i) for i in range(FRAMES)))


@pytest.fixture(scope="module")
def decoded(clip) -> list[np.ndarray]:
    with VideoReader(clip) as reader:
        return list(reader)


@pytest.fixture(scope="module")
def batched(matter, decoded):
    """(rgb, result) per frame through batches of 5 (5 + 5 + 2: the last batch is short)."""
    return list(matte_frames(matter, iter(decoded), batch_size=5))


# --------------------------------------------------------------------------------------------- outputs


def test_outputs_keep_frame_count_size_and_fps_and_rgba_pngs_hold_the_maps(matter, clip, batched, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "clip_rgba").mkdir(parents=True)
    (out / "clip_rgba" / "000099.png").write_bytes(b"from an earlier run")  # the folder is replaced as a whole
    (out / "clip_alpha.mp4").write_bytes(b"from an earlier run")
    written = matte_video(matter, clip, out, "clip", KINDS, GREEN, video_options("--batch-size", "5"), progress=False)

    assert [p.name for p in written] == ["clip_alpha.mp4", "clip_rgba", "clip_composite.mp4", "clip_trimap.mp4"]
    pngs = [f"clip_rgba/{i:06d}.png" for i in range(1, FRAMES + 1)]
    assert everything_in(out) == sorted(["clip_alpha.mp4", "clip_composite.mp4", "clip_trimap.mp4", "clip_rgba", *pngs])
    assert capsys.readouterr().err.count("audio is not copied") == 1

    videos = {kind: read_video(out / f"clip_{kind}.mp4") for kind in ("alpha", "composite", "trimap")}
    for kind, (frames, fps) in videos.items():
        assert (len(frames), fps) == (FRAMES, FPS), kind
        assert all(frame.shape == (HEIGHT, WIDTH, 3) for frame in frames), kind
    for index in (0, 6, 11):  # foreground estimation costs ~0.1 s a frame, so three frames
        rgb, result = batched[index]
        expected = render_outputs(rgb, result, KINDS, GREEN)
        with Image.open(out / pngs[index]) as im:
            assert im.mode == "RGBA"
            rgba = np.asarray(im).astype(np.int16)
        # PNG is lossless; the network's float rounding varies by one ulp between runs, so +-1 level
        assert np.abs(rgba - expected["rgba"]).max() <= 1
        assert np.abs(rgba - expected["rgba"]).mean() < 0.01
        # mp4v is lossy: the decoded composite is close to the rendered one, not equal
        assert np.abs(videos["composite"][0][index].astype(np.float32) - expected["composite"]).mean() < 6.0


def test_lossless_codec_videos_hold_the_maps_frame_by_frame(matter, clip, batched, tmp_path):
    out = tmp_path / "out"
    options = video_options("--batch-size", "5", "--video-codec", "FFV1")
    matte_video(matter, clip, out, "clip", ["alpha", "trimap"], None, options, progress=False)
    alpha_video, fps = read_video(out / "clip_alpha.mp4")
    trimap_video, _ = read_video(out / "clip_trimap.mp4")
    assert (len(alpha_video), len(trimap_video), fps) == (FRAMES, FRAMES, FPS)
    for index, (_, result) in enumerate(batched):
        alpha = to_uint8(result.alpha).astype(np.int16)
        assert alpha.std() > 1.0  # the maps vary within a frame (and between frames: the disc moves)
        for channel in range(3):  # grey as three equal channels
            # +-1 level: the network's float rounding varies by one ulp between runs
            assert np.abs(alpha_video[index][..., channel] - alpha).max() <= 1, index
            trimap = implicit_trimap(result.fg_prob, result.bg_prob)
            np.testing.assert_array_equal(trimap_video[index][..., channel], trimap)


def test_batched_frames_equal_frame_by_frame_matting(matter, decoded, batched):
    assert len(batched) == FRAMES
    for index in (0, 4, 5, 11):  # first and last of the batches 0-4, 5-9, 10-11
        (rgb, result), frame = batched[index], decoded[index]
        single = matter(frame)
        np.testing.assert_array_equal(rgb, frame.astype(np.float32) / 255)
        for name in ("alpha", "raw_alpha", "fg_prob", "bg_prob"):
            np.testing.assert_allclose(getattr(result, name), getattr(single, name), rtol=0, atol=1e-5, err_msg=name)


def test_matte_frames_takes_at_most_one_batch_ahead(matter):
    taken = 0

    def frames():
        nonlocal taken
        for index in range(7):
            taken += 1
            yield scene(index, 24, 32)

    ahead = []
    for given, (rgb, _) in enumerate(matte_frames(matter, frames(), batch_size=3), start=1):
        ahead.append(taken - given)
        np.testing.assert_array_equal(rgb, scene(given - 1, 24, 32) / np.float32(255))  # in order
    assert len(ahead) == 7
    assert ahead == [2, 1, 0, 2, 1, 0, 0]  # batches 3 + 3 + 1, each taken whole before its first result


def test_video_memory_does_not_grow_with_its_length(tmp_path):
    small = Matter(tiny_net(narrow=True), device="cpu", max_side=16, refine=False)
    size = (192, 256)
    peaks = {}
    for count in (8, 16):  # both past the first batch, so only the length differs
        clip = write_clip(tmp_path / f"long{count}.avi", (scene(i, *size) for i in range(count)), fourcc="MJPG")
        tracemalloc.start()
        matte_video(small, clip, tmp_path / f"out{count}", "long", ["alpha"], None, video_options(), progress=False)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    frame_bytes = size[0] * size[1] * 3  # one decoded uint8 frame; listing the frames would add 8 of them
    assert peaks[16] - peaks[8] < 2 * frame_bytes, peaks


def test_reader_streams_rgb_frames_and_downscales_to_max_side(clip, decoded):
    with VideoReader(clip, max_side=32) as reader:
        assert (reader.fps, reader.frame_count, reader.source_size, reader.size) == (FPS, FRAMES, (48, 64), (24, 32))
        small = list(reader)
    assert len(small) == FRAMES and all(frame.shape == (24, 32, 3) and frame.dtype == np.uint8 for frame in small)
    # RGB, not OpenCV's BGR: the disc is yellow (red > blue) where the scene put it
    centre = decoded[0][HEIGHT // 2, WIDTH // 4].astype(int)
    assert centre[0] - centre[2] > 100, centre
    expected = cv2.resize(decoded[3], (32, 24), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(small[3], expected)


# --------------------------------------------------------------------------------------------- smoothing


def test_smoothing_lowers_flicker_on_a_static_noisy_clip(matter):
    unrefined = Matter(matter.model, device="cpu", max_side=32, refine=False)  # alpha = raw_alpha before smoothing
    frames = (scene(0, seed=seed) for seed in range(FRAMES))  # static camera, sensor noise only
    results = [result for _, result in matte_frames(unrefined, frames, 4, AlphaSmoother(0.8))]
    raw, smoothed = flicker(r.raw_alpha for r in results), flicker(r.alpha for r in results)
    assert raw > 1e-4
    assert smoothed < 0.5 * raw, (raw, smoothed)


def test_smoothing_leaves_a_moving_edge_responsive():
    frames = [scene(i, seed=i).astype(np.float32) / 255 for i in range(8)]
    masks = [(np.abs(f - [230 / 255, 190 / 255, 60 / 255]).max(axis=2) < 0.1).astype(np.float32) for f in frames]

    def worst_lag(smoother: AlphaSmoother) -> float:
        return max(float(np.abs(smoother(f, m) - m).max()) for f, m in zip(frames, masks))

    assert worst_lag(AlphaSmoother(0.8)) < 0.02  # the disc's edges moved, so they were not averaged
    assert worst_lag(AlphaSmoother(0.8, motion_threshold=1e9)) > 0.5  # without the motion gate they lag


def test_flicker_is_the_mean_absolute_frame_difference():
    alphas = [np.zeros((2, 2)), np.full((2, 2), 0.5), np.array([[0.5, 0.5], [0.5, 1.0]])]
    assert flicker(alphas) == pytest.approx((0.5 + 0.125) / 2)
    assert flicker(alphas[:1]) == 0.0


# --------------------------------------------------------------------------------------------- bad videos


def make_bad(kind: str, directory: Path) -> Path:
    if kind == "not a video":
        path = directory / "notes.mp4"
        path.write_text("these are not the frames you are looking for\n")
    elif kind == "no frames":
        path = write_clip(directory / "empty.avi", [], fourcc="MJPG")
    elif kind == "truncated":
        full = write_clip(directory / "full.avi", (scene(i) for i in range(FRAMES)), fourcc="MJPG")
        path = directory / "cut.avi"
        path.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    elif kind == "truncated mp4":
        full = write_clip(directory / "full.mp4", (scene(i) for i in range(FRAMES)))
        path = directory / "cut.mp4"
        path.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    elif kind == "missing":
        path = directory / "missing.mp4"
    else:
        path = directory / "folder.mp4"
        path.mkdir()
    return path


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("not a video", "cannot open as a video"),
        ("no frames", "has no frames"),
        ("truncated", "truncated or damaged: decoded"),
        ("truncated mp4", "cannot open as a video"),
        ("missing", "no such file"),
        ("directory", "is a directory"),
    ],
)
def test_bad_video_raises_video_error_and_leaves_nothing(matter, tmp_path, kind, problem):
    source = tmp_path / "in"
    source.mkdir()
    path = make_bad(kind, source)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(VideoError) as caught:
        matte_video(matter, path, out, "bad", KINDS, GREEN, video_options("--smooth", "0.5"), progress=False)
    assert str(caught.value).startswith(f"{path}: {problem}"), str(caught.value)
    assert everything_in(out) == []


def test_unusable_codec_is_a_video_error_and_leaves_nothing(matter, clip, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(VideoError, match="cannot write a 64x48 .mp4 video with codec 'XXXX'"):
        # rgba first: its temporary folder exists by the time the video writer fails to open
        options = video_options("--video-codec", "XXXX")
        matte_video(matter, clip, out, "clip", ["rgba", "alpha"], GREEN, options, progress=False)
    assert everything_in(out) == []


def test_video_options_defaults_and_bad_values():
    options = video_options()
    assert (options.batch_size, options.smooth, options.video_codec) == (4, 0.0, None)
    assert video_options("--smooth", "0.7", "--batch-size", "8").smooth == 0.7
    for argv in (["--smooth", "1"], ["--smooth", "-0.1"], ["--batch-size", "0"], ["--video-codec", "h264x"],
                 ["--motion-threshold", "0"]):
        with pytest.raises(SystemExit):
            video_options(*argv)
