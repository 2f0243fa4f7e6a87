"""Foreground sources: where (fg colours, alpha) pairs come from, and how each pair is validated.

Three sources (params.yaml `foregrounds.source`):
- synthetic: `fusionnet.data.synthetic.make_foreground(seed, i)`, i = 0..count-1 (no data needed).
- folder: photos with ground-truth alpha and no foreground colours (e.g. alphamatting.com's
  image/ + alpha/); F is estimated from the photo and alpha at their stored size with pymatting's
  multilevel foreground estimation (estimate_foreground_ml), as the Deep Image Matting recipe prescribes.
- dim: the Adobe Deep Image Matting layout: <root>/<subset>/**/fg/NAME + sibling alpha/NAME for the
  train and test subsets, optionally restricted to the dataset's name lists; the test subset is the
  test split, so DIM's own held-out foregrounds stay held out. Each listed foreground keeps its
  position in its name list (`list_index`), by which the composite stage pairs it with backgrounds
  as DIM's compositing scripts do.

Foregrounds are kept at their source size (the composite stage composites at that size and only then
downscales image and alpha together); `max_side` is only a cap for enormous files (see `cap_size`).

Discovery never raises for a bad pair: it returns a candidate carrying the problem, and loading
raises `InvalidForeground` naming the file, so the collect stage can report every bad pair by name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusionnet.data.imagefiles import (ImageFileError, list_images, max_side_size, read_alpha, read_rgb, resize_float,
                                       to_uint8)
from fusionnet.data.synthetic import make_foreground

SOURCES = ("synthetic", "folder", "dim")


class InvalidForeground(ValueError):
    """A foreground pair that cannot be used: `name` identifies it, `reason` says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@dataclass(frozen=True)
class ForegroundCandidate:
    """One foreground before validation.

    name: how messages refer to it (the file path, or "synthetic:N"); split: a split fixed by the
    dataset (DIM's test subset) or None to decide by fractions; problem: an error already known at
    discovery (missing partner file, duplicate id); list_index: 0-based position of the file in its
    DIM name list (first occurrence), None without a list.
    """

    id: str
    source: str
    name: str
    fg_path: Path | None = None
    alpha_path: Path | None = None
    index: int = 0
    split: str | None = None
    problem: str | None = None
    list_index: int | None = None


def safe_id(stem: str) -> str:
    """A file stem as a foreground id usable in file names: [A-Za-z0-9._-] only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "unnamed"


def synthetic_candidates(count: int) -> list[ForegroundCandidate]:
    if count < 1:
        raise ValueError(f"foregrounds.synthetic.count must be >= 1, got {count}")
    return [ForegroundCandidate(id=f"syn-{i:05d}", source="synthetic", name=f"synthetic:{i}", index=i)
            for i in range(count)]


def _pair_by_stem(image_dir: Path, alpha_dir: Path, source: str, split: str | None,
                  names: list[str] | None = None) -> list[ForegroundCandidate]:
    """Match image_dir/STEM.* with alpha_dir/STEM.*; unmatched or ambiguous files become problem candidates."""
    images, alphas = list_images(image_dir), list_images(alpha_dir) if alpha_dir.is_dir() else []
    if names is not None:
        wanted = set(names)
        images = [p for p in images if p.name in wanted]
    by_stem: dict[str, list[Path]] = {}
    for path in alphas:
        by_stem.setdefault(path.stem, []).append(path)
    image_stems: dict[str, int] = {}
    for path in images:
        image_stems[path.stem] = image_stems.get(path.stem, 0) + 1
    out = []
    for path in images:
        matches = by_stem.get(path.stem, [])
        problem = None
        if image_stems[path.stem] > 1:
            problem = f"ambiguous: several images named {path.stem}.* in {image_dir}"
        elif not matches:
            problem = f"no alpha matte {path.stem}.* in {alpha_dir}"
        elif len(matches) > 1:
            problem = f"ambiguous: several alpha mattes named {path.stem}.* in {alpha_dir}"
        out.append(ForegroundCandidate(id=safe_id(path.stem), source=source, name=str(path), fg_path=path,
                                       alpha_path=matches[0] if len(matches) == 1 else None, split=split,
                                       problem=problem))
    image_set = set(image_stems)
    for stem, paths in by_stem.items():
        if stem not in image_set and names is None:  # an orphan matte is reported, not silently ignored
            out.append(ForegroundCandidate(id=safe_id(stem), source=source, name=str(paths[0]), split=split,
                                           problem=f"alpha matte without a foreground image in {image_dir}"))
    if names is not None:
        found = {p.name for p in images}
        for missing in sorted(set(names) - found):
            out.append(ForegroundCandidate(id=safe_id(Path(missing).stem), source=source,
                                           name=str(image_dir / missing), split=split,
                                           problem="listed in the name list but no such file"))
    return out


def folder_candidates(root: Path, image_dir: str = "image", alpha_dir: str = "alpha") -> list[ForegroundCandidate]:
    """Photos in root/image_dir paired by file stem with alphas in root/alpha_dir."""
    images = root / image_dir
    if not images.is_dir():
        raise FileNotFoundError(f"foregrounds.folder: image folder {images} does not exist")
    return _pair_by_stem(images, root / alpha_dir, "folder", None)


def _read_names(path: Path | None) -> list[str] | None:
    if path is None or not path.is_file():
        return None
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def dim_candidates(root: Path, fg_dir: str = "fg", alpha_dir: str = "alpha",
                   subsets: dict[str, str] | None = None,
                   name_lists: dict[str, str | None] | None = None) -> list[ForegroundCandidate]:
    """DIM layout: for split in subsets ({"train": "Training_set", "test": "Test_set"}) every folder
    named fg_dir under root/subset, paired with its sibling alpha_dir. A name list (relative to root,
    e.g. DIM's Training_set/training_fg_names.txt) restricts a subset to the listed files when it exists.
    The "train" subset yields split None (train/val decided by val_fraction); "test" yields split "test".
    With a name list, each candidate's list_index is its file's position in the list (DIM's
    compositing scripts pair foreground number i of the list with backgrounds i*n .. i*n+n-1).
    """
    subsets = subsets or {"train": "Training_set", "test": "Test_set"}
    name_lists = name_lists or {}
    out: list[ForegroundCandidate] = []
    for split, subset in subsets.items():
        base = root / subset
        fixed_split = "test" if split == "test" else None
        fg_folders = sorted(p for p in base.rglob(fg_dir) if p.is_dir()) if base.is_dir() else []
        if not fg_folders:
            raise FileNotFoundError(f"foregrounds.dim: no '{fg_dir}' folder under {base}")
        list_file = name_lists.get(split)
        names = _read_names(root / list_file) if list_file else None
        position = {} if names is None else {n: i for i, n in reversed(list(enumerate(names)))}  # first wins
        found: set[str] = set()
        subset_out: list[ForegroundCandidate] = []
        for folder in fg_folders:
            # a listed name lives in one of the fg folders (DIM: "Adobe-licensed images/fg", "Other/fg")
            local = None if names is None else [n for n in names if (folder / n).is_file()]
            found.update(local or [])
            subset_out += _pair_by_stem(folder, folder.parent / alpha_dir, "dim", fixed_split, local)
        for missing in sorted(set(names or []) - found):
            subset_out.append(ForegroundCandidate(
                id=safe_id(Path(missing).stem), source="dim", name=str(base / missing), split=fixed_split,
                problem=f"listed in {list_file} but not found in any {fg_dir}/ folder"))
        if names is not None:
            subset_out = [dataclasses.replace(c, list_index=position.get(Path(c.name).name)) for c in subset_out]
            subset_out.sort(key=lambda c: (c.list_index is None, c.list_index or 0, c.name))  # list order
        out += subset_out
    return _mark_duplicates(out)


def _mark_duplicates(candidates: list[ForegroundCandidate]) -> list[ForegroundCandidate]:
    """A second candidate with an id already taken becomes a problem candidate (ids name output files)."""
    seen: dict[str, str] = {}
    out = []
    for c in candidates:
        if c.id in seen and c.problem is None:
            c = ForegroundCandidate(id=c.id, source=c.source, name=c.name, split=c.split, list_index=c.list_index,
                                    problem=f"duplicate foreground id '{c.id}' (also {seen[c.id]})")
        seen.setdefault(c.id, c.name)
        out.append(c)
    return out


def estimate_foreground(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Foreground colours from a photo and its alpha: (H,W,3) uint8 + (H,W) uint8 -> (H,W,3) uint8.

    pymatting's multilevel foreground estimation (Germer et al. 2020), the DIM recipe's step for
    photos without true F.
    """
    from pymatting import estimate_foreground_ml  # deferred: numba start-up only for the folder source

    estimate = estimate_foreground_ml(image.astype(np.float64) / 255.0, alpha.astype(np.float64) / 255.0)
    return np.clip(np.rint(np.asarray(estimate) * 255.0), 0, 255).astype(np.uint8)


def cap_size(fg: np.ndarray, alpha: np.ndarray, max_side: int | None,
             premultiplied: bool) -> tuple[np.ndarray, np.ndarray]:
    """Shrink an enormous pair so its longer side is <= max_side (None or small enough: unchanged).

    fg (H,W,3) uint8, alpha (H,W) uint8 -> the same at the capped size. Both go through the one
    filter of `imagefiles.RESIZE_FILTER`. premultiplied=True (fg is the true F): F is resized as
    alpha*F and divided by the resized alpha, so colours where alpha = 0 (undefined in a matte) do not
    bleed into the edge; where the resized alpha is 0, F is the plainly resized F. premultiplied=False
    (fg is a photo, itself a composite): photo and alpha are resized alike, F is estimated afterwards.
    """
    hw = max_side_size(alpha.shape, max_side)
    if hw == alpha.shape:
        return fg, alpha
    a = resize_float(alpha, hw)
    if not premultiplied:
        return to_uint8(resize_float(fg, hw)), to_uint8(a)
    weight = alpha.astype(np.float32)[..., None] / 255.0
    premul, plain = resize_float(weight * fg.astype(np.float32), hw), resize_float(fg, hw)
    a_unit = (a / 255.0)[..., None]
    colour = np.where(a_unit > 1e-6, premul / np.maximum(a_unit, 1e-6), plain)
    return to_uint8(colour), to_uint8(a)


def load_candidate(candidate: ForegroundCandidate, *, seed: int, synthetic_size: tuple[int, int],
                   max_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validated pair at its source size: fg (H,W,3) uint8 (F; for "folder" estimated), alpha (H,W) uint8.

    max_side: optional cap on the longer side for enormous files (`cap_size`), applied before F
    estimation; None keeps the source size. Raises InvalidForeground for: a known problem, an
    unreadable file, a size mismatch (after EXIF orientation), an empty alpha (no pixel above 0).
    """
    name = candidate.name
    if candidate.problem is not None:
        raise InvalidForeground(name, candidate.problem)
    if candidate.source == "synthetic":
        made = make_foreground(seed, candidate.index, synthetic_size)
        return cap_size(made.fg, made.alpha, max_side, premultiplied=True)
    try:
        image = read_rgb(candidate.fg_path)
        alpha = read_alpha(candidate.alpha_path)
    except ImageFileError as err:
        raise InvalidForeground(name, str(err)) from err
    if image.shape[:2] != alpha.shape:
        raise InvalidForeground(name, f"size mismatch: image is {image.shape[1]}x{image.shape[0]} (WxH) but alpha "
                                      f"{candidate.alpha_path} is {alpha.shape[1]}x{alpha.shape[0]}")
    if not alpha.any():
        raise InvalidForeground(name, f"empty alpha: {candidate.alpha_path} is 0 everywhere")
    is_photo = candidate.source == "folder"
    image, alpha = cap_size(image, alpha, max_side, premultiplied=not is_photo)
    if is_photo:  # a photo, not F: estimate F (cost ~ pixels; 800 px photos take about a second)
        image = estimate_foreground(image, alpha)
    return image, alpha


def candidates_from_params(foregrounds: dict, base_dir: Path) -> list[ForegroundCandidate]:
    """The candidates of params.yaml's `foregrounds` section; relative roots are resolved from base_dir."""
    source = foregrounds.get("source", "synthetic")
    if source == "synthetic":
        return synthetic_candidates(int(foregrounds["synthetic"]["count"]))
    if source == "folder":
        cfg = foregrounds["folder"]
        return folder_candidates(base_dir / cfg["root"], cfg.get("image_dir", "image"), cfg.get("alpha_dir", "alpha"))
    if source == "dim":
        cfg = foregrounds["dim"]
        subsets = {"train": cfg.get("train_subset", "Training_set"), "test": cfg.get("test_subset", "Test_set")}
        lists = {"train": cfg.get("train_names"), "test": cfg.get("test_names")}
        return dim_candidates(base_dir / cfg["root"], cfg.get("fg_dir", "fg"), cfg.get("alpha_dir", "alpha"),
                              subsets, lists)
    raise ValueError(f"foregrounds.source must be one of {SOURCES}, got {source!r}")

