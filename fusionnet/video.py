"""Matting videos frame by frame (placeholder: the interface the CLI calls; being written)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from fusionnet.infer import Matter
from fusionnet.render import Background

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"})


class VideoError(Exception):
    """A video that cannot be matted; `str()` is `"<path>: <problem>"`."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the video options (frames per batch, temporal smoothing, ...) to `fusionnet matte`."""


def matte_video(
    matter: Matter,
    path: Path,
    out_dir: Path,
    stem: str,
    kinds: Sequence[str],
    background: Background | None,
    options: argparse.Namespace,
    progress: bool,
) -> list[Path]:
    """Matte the video `path`; write `<stem>_<kind>` outputs under `out_dir`; returns the paths written.

    Raises VideoError (nothing left behind) when the video cannot be read or written.
    """
    raise VideoError(path, "video input is not supported yet")
