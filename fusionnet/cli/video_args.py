"""The video options of `fusionnet matte` (frames per batch, temporal smoothing, codec), as VideoOptions."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from fusionnet.defaults import DEFAULT_MOTION_THRESHOLD, VIDEO_SUFFIXES
from fusionnet.defaults import DEFAULT_VIDEO_BATCH_SIZE as DEFAULT_BATCH_SIZE

if TYPE_CHECKING:  # video.matte imports torch: loaded when a video is matted, not for --help
    from fusionnet.video.matte import VideoOptions


def _strength(text: str) -> float:
    value = float(text)
    if not (0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str):
        value = kind(text)
        if not (0 < value < float("inf")):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _fourcc(text: str) -> str:
    if len(text) != 4:
        raise argparse.ArgumentTypeError(f"a FourCC code has 4 characters (e.g. mp4v, MJPG, FFV1), got {text!r}")
    return text


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the video options (frames per batch, temporal smoothing, codec) to `fusionnet matte`."""
    group = parser.add_argument_group(f"video inputs ({' '.join(sorted(VIDEO_SUFFIXES))})")
    group.add_argument(
        "--batch-size", type=_positive(int), default=DEFAULT_BATCH_SIZE, metavar="N",
        help=f"video frames per network call (default {DEFAULT_BATCH_SIZE}); memory grows with it, not with "
        "the video's length",
    )
    group.add_argument(
        "--smooth", type=_strength, default=0.0, metavar="S",
        help="temporal smoothing of alpha where the picture is static: keep S of the running average, "
        "0 <= S < 1 (default 0: off; e.g. 0.7)",
    )
    group.add_argument(
        "--motion-threshold", type=_positive(float), default=DEFAULT_MOTION_THRESHOLD, metavar="T",
        help="a pixel whose blurred colour changed by T or more (0..1 scale) since the last frame is not "
        f"smoothed (default {DEFAULT_MOTION_THRESHOLD})",
    )
    group.add_argument(
        "--video-codec", type=_fourcc, default=None, metavar="FOURCC",
        help="codec of the output videos (default: mp4v for .mp4/.mov/.m4v/.mkv, MJPG for .avi, VP90 for "
        ".webm; FFV1 with .avi/.mkv is lossless)",
    )


def video_options(args: argparse.Namespace) -> VideoOptions:
    """The VideoOptions of parsed `fusionnet matte` arguments."""
    from fusionnet.video.matte import VideoOptions

    return VideoOptions(batch_size=args.batch_size, smooth=args.smooth, motion_threshold=args.motion_threshold,
                        video_codec=args.video_codec, max_output_side=getattr(args, "max_output_side", None))
