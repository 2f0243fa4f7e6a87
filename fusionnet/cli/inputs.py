"""What `fusionnet matte` mattes and where each output goes: files, folders searched recursively, stems.

- A file INPUT is used as given (any suffix: a file that is no image then fails with the loader's
  error); its outputs go straight into `--out`. A suffix in `fusionnet.video.matte.VIDEO_SUFFIXES` (any
  case) makes it a video.
- A folder INPUT is searched recursively for files whose suffix (any case) is an image format PIL
  can decode or a video suffix. Hidden files and folders (name starting with '.') are skipped,
  symlinked folders are not followed, and `--out` is not searched when it lies inside the folder.
  `--glob` keeps the files whose path relative to the folder matches it, case-insensitively, `**`
  standing for any number of folders (`*.jpg`: the folder's top level; `**/*.jpg`: any depth).
  The layout is mirrored: `in/a/b.jpg` writes `OUT/a/b_<kind>.png`.
- Output stems are unique per output folder (`assign_output_stems`); a file reached twice (named
  twice, or named and also inside a given folder) is matted once, where it was reached first.
"""

from __future__ import annotations

import fnmatch
import functools
import glob as globlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fusionnet.io.images import image_suffixes
from fusionnet.video.matte import VIDEO_SUFFIXES

@dataclass(frozen=True)
class MatteJob:
    """One input file: `path` as the user reached it; outputs are `out_dir / f"{stem}_{kind}.<ext>"`."""

    path: Path
    out_dir: Path
    stem: str
    is_video: bool


@dataclass
class CollectedInputs:
    """The jobs in command-line order, `note:` lines for stderr, and `(path, problem)` for inputs that
    yielded nothing (a folder without images, a folder that cannot be listed)."""

    jobs: list[MatteJob] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def compile_glob(pattern: str) -> Callable[[Sequence[str]], bool]:
    """A test of a relative path's parts against `pattern`: case-insensitive, `**` = any number of folders.

    Raises ValueError for a pattern that cannot be relative to a folder (empty, absolute, with '..').
    """
    text = pattern.replace("\\", "/")
    if text.startswith("/"):
        raise ValueError(f"--glob {pattern!r}: must be relative to each folder (no leading '/')")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if not parts:
        raise ValueError(f"--glob {pattern!r}: matches nothing; e.g. '**/*.jpg'")
    if ".." in parts:
        raise ValueError(f"--glob {pattern!r}: '..' cannot be relative to each folder")
    # None stands for "**"; each other part matches exactly one path part, as in pathlib's glob.
    segments = [None if part == "**" else re.compile(fnmatch.translate(part), re.IGNORECASE) for part in parts]

    def matches(path_parts: Sequence[str]) -> bool:
        @functools.cache
        def match(i: int, j: int) -> bool:
            if i == len(segments):
                return j == len(path_parts)
            segment = segments[i]
            if segment is None:
                return match(i + 1, j) or (j < len(path_parts) and match(i, j + 1))
            return j < len(path_parts) and segment.match(path_parts[j]) is not None and match(i + 1, j + 1)

        return match(0, 0)

    return matches


def find_inputs(
    folder: Path, matches: Callable[[Sequence[str]], bool] | None = None, skip: Path | None = None
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image and video files under `folder` (sorted, top-down), and `(folder, problem)` for unlistable ones.

    Hidden entries and symlinked folders are not searched, nor the folder whose resolved path is `skip`.
    """
    suffixes = image_suffixes() | VIDEO_SUFFIXES
    found: list[Path] = []
    problems: list[tuple[Path, str]] = []

    def unlistable(exc: OSError) -> None:
        problems.append((Path(exc.filename), f"cannot list folder ({exc.strerror})"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlistable):
        here = Path(dirpath)
        searched = (name for name in dirnames if not name.startswith(".") and (here / name).resolve() != skip)
        dirnames[:] = sorted(searched, key=_name_order)  # os.walk descends into what is left here
        for name in sorted(filenames, key=_name_order):
            path = here / name
            if name.startswith(".") or path.suffix.lower() not in suffixes:
                continue
            if matches is None or matches(path.relative_to(folder).parts):
                found.append(path)
    return found, problems


def _name_order(name: str) -> tuple[str, str]:
    return (name.casefold(), name)  # "a.png, B.png, c.png" as file browsers list them, ties by code point


def collect_inputs(inputs: Sequence[Path], out: Path, glob: str | None = None) -> CollectedInputs:
    """Expand folders, drop repeats and give every input its output folder and unique stem.

    Raises ValueError for an unusable `glob`.
    """
    matches = compile_glob(glob) if glob else None
    collected = CollectedInputs()
    placed: list[tuple[Path, Path]] = []  # (input file, its output folder)
    first_seen: dict[Path, Path] = {}
    skip = out.resolve()

    def place(path: Path, out_dir: Path) -> None:
        key = path.resolve()
        if key in first_seen:
            collected.notes.append(f"note: {path}: same file as {first_seen[key]}; matted once")
            return
        first_seen[key] = path
        placed.append((path, out_dir))

    for given in inputs:
        if not given.exists():  # known before the model is loaded or --out created (issue 27)
            collected.errors.append((given, "no such file"))
            continue
        if not given.is_dir():
            place(given, out)
            continue
        files, problems = find_inputs(given, matches, skip)
        collected.errors.extend(problems)
        if not files and not problems:
            wanted = f" matching --glob {glob!r}" if glob else ""
            collected.errors.append((given, f"is a directory with no image or video files{wanted}"))
        for path in files:
            place(path, out / path.relative_to(given).parent)

    by_folder: dict[Path, list[Path]] = {}
    for path, out_dir in placed:
        by_folder.setdefault(out_dir, []).append(path)
    stems: dict[tuple[Path, Path], str] = {}
    for out_dir, paths in by_folder.items():
        pairs, notes = assign_output_stems(paths)
        collected.notes.extend(notes)
        stems.update({(path, out_dir): stem for path, stem in pairs})
    collected.jobs = [MatteJob(path, out_dir, stems[path, out_dir], is_video(path)) for path, out_dir in placed]
    return collected


def assign_output_stems(paths: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[str]]:
    """Pair each distinct input with a unique output stem; returns (pairs, notes for stderr).

    Stems compare case-insensitively (case-insensitive file systems would merge them).
    """
    notes: list[str] = []
    distinct: list[Path] = []
    seen: dict[Path, Path] = {}
    for path in paths:
        key = path.resolve()
        if key in seen:
            notes.append(f"note: {path}: same file as {seen[key]}; matted once")
            continue
        seen[key] = path
        distinct.append(path)
    taken = {path.stem.casefold() for path in distinct}
    owner: dict[str, Path] = {}
    pairs: list[tuple[Path, str]] = []
    for path in distinct:
        stem = path.stem
        if stem.casefold() in owner:
            first = owner[stem.casefold()]
            k = 2
            while f"{stem}-{k}".casefold() in taken:
                k += 1
            new_stem = f"{stem}-{k}"
            taken.add(new_stem.casefold())
            notes.append(f"note: {path}: output name '{stem}' is taken by {first}; writing {new_stem}_*.png")
            stem = new_stem
        owner[stem.casefold()] = path
        pairs.append((path, stem))
    return pairs, notes


def outputs_exist(job: MatteJob, kinds: Sequence[str]) -> bool:
    """True when every requested output of `job` is already there (what `--skip-existing` skips).

    Images: `<stem>_<kind>.png` files. Videos: for each kind, an entry named `<stem>_<kind>` or
    `<stem>_<kind>.<ext>` (whatever container or frame folder fusionnet.video.matte writes).
    """
    if not job.is_video:
        return all((job.out_dir / f"{job.stem}_{kind}.png").is_file() for kind in kinds)

    def video_output(name: str) -> bool:
        return (job.out_dir / name).exists() or any(job.out_dir.glob(globlib.escape(name) + ".*"))

    return all(video_output(f"{job.stem}_{kind}") for kind in kinds)
