"""Background photos for compositing: a folder of photos (MS-COCO / PASCAL VOC style) or builtin ones.

Builtin backgrounds need no data: crops of the few photographs that installed packages ship
(matplotlib's grace_hopper.jpg, scikit-learn's china.jpg and flower.jpg, whichever are installed)
and procedural textures (fractal colour fields, bokeh, warped stripes). Each is a pure function of
(seed, index), so a background is named, not stored, and regenerated identically by any process.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fusionnet.data.imagefiles import IMAGE_SUFFIXES, read_rgb
from fusionnet.data.synthetic import fractal_noise, textured_colour

BUILTIN_KINDS = ("photo", "noise", "bokeh", "stripes")
BUILTIN_SIDE_RANGE = (200, 520)  # many smaller than a 320 px foreground, so the DIM upscale path is exercised


@dataclass(frozen=True)
class Background:
    """A named background. `name` goes into the composite manifest (bg_name); `load()` gives (H,W,3) uint8."""

    name: str
    path: Path | None = None  # a photo file, or None for a builtin background
    seed: int = 0
    index: int = 0

    def load(self) -> np.ndarray:
        if self.path is not None:
            return read_rgb(self.path)
        return builtin_background(self.seed, self.index)


def packaged_photos() -> list[Path]:
    """Photographs shipped inside installed packages (found without importing them), sorted by name."""
    candidates = [("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
                  ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg")]
    found = []
    for package, relative in candidates:
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            path = Path(location) / relative
            if path.is_file():
                found.append(path)
                break
    return sorted(found, key=lambda p: p.name)


@functools.lru_cache(maxsize=4)
def _photo(path: Path) -> np.ndarray:
    return read_rgb(path)


def _photo_crop(rng: np.random.Generator, shape: tuple[int, int], photos: list[Path]) -> np.ndarray:
    """A random rescaled, flipped, colour-jittered crop of a packaged photo."""
    photo = _photo(photos[int(rng.integers(len(photos)))])
    height, width = shape
    # scale so the crop fits, with a random zoom so crops of one photo differ in content and scale
    scale = max(height / photo.shape[0], width / photo.shape[1]) * rng.uniform(1.0, 1.8)
    size = (math.ceil(photo.shape[1] * scale), math.ceil(photo.shape[0] * scale))
    image = Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC)
    top, left = int(rng.integers(0, size[1] - height + 1)), int(rng.integers(0, size[0] - width + 1))
    crop = np.asarray(image, dtype=np.float32)[top:top + height, left:left + width]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    gain = rng.uniform(0.8, 1.2, size=3).astype(np.float32)  # white-balance jitter
    return np.clip(crop * gain + rng.uniform(-20, 20), 0, 255).astype(np.uint8)


def _bokeh(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Defocused lights over a smooth gradient, like an out-of-focus street or party photo."""
    height, width = shape
    base = textured_colour(rng, (max(8, height // 8), max(8, width // 8)))
    image = Image.fromarray((base * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    layer = Image.new("RGB", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(15, 60))):
        r = rng.uniform(4, 30)
        y, x = rng.uniform(0, height), rng.uniform(0, width)
        colour = tuple(int(v) for v in rng.integers(60, 256, size=3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    layer = layer.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 4.0)))
    mixed = np.asarray(image, np.float32) + 0.6 * np.asarray(layer, np.float32)
    return np.clip(mixed, 0, 255).astype(np.uint8)


def _stripes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Warped stripes (wood grain, fabric, blinds): strong straight-ish edges that are not the object."""
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, math.pi), rng.uniform(8, 40)
    warp = rng.uniform(5, 30) * fractal_noise(rng, shape, octaves=3)
    phase = (xx * math.cos(angle) + yy * math.sin(angle) + warp) / period
    stripes = (np.sin(2 * math.pi * phase) > rng.uniform(-0.5, 0.5)).astype(np.float32)[..., None]
    colour_a, colour_b = textured_colour(rng, shape), textured_colour(rng, shape)
    return np.clip(255 * (stripes * colour_a + (1 - stripes) * colour_b), 0, 255).astype(np.uint8)


def builtin_background(seed: int, index: int) -> np.ndarray:
    """Builtin background number `index` for `seed`: (H,W,3) uint8, sides in BUILTIN_SIDE_RANGE.

    The kind cycles through BUILTIN_KINDS by index ("photo" becomes "noise" when no packaged photo exists).
    """
    rng = np.random.default_rng([int(seed), 7919, int(index)])  # 7919: a stream distinct from foregrounds
    shape = (int(rng.integers(*BUILTIN_SIDE_RANGE)), int(rng.integers(*BUILTIN_SIDE_RANGE)))
    kind = builtin_kind(index)
    if kind == "photo":
        return _photo_crop(rng, shape, packaged_photos())
    if kind == "bokeh":
        return _bokeh(rng, shape)
    if kind == "stripes":
        return _stripes(rng, shape)
    return np.clip(255 * textured_colour(rng, shape), 0, 255).astype(np.uint8)


def builtin_kind(index: int) -> str:
    kind = BUILTIN_KINDS[index % len(BUILTIN_KINDS)]
    return "noise" if kind == "photo" and not packaged_photos() else kind


def builtin_backgrounds(count: int, seed: int) -> list[Background]:
    """`count` builtin backgrounds named "builtin/NNNN-KIND"."""
    if count < 1:
        raise ValueError(f"builtin_backgrounds: count must be >= 1, got {count}")
    return [Background(name=f"builtin/{i:04d}-{builtin_kind(i)}", seed=seed, index=i) for i in range(count)]


@dataclass(frozen=True)
class BackgroundList:
    """The backgrounds a name-list file names, in file order with repeats kept (DIM pairs by position).

    path: the list file (for messages); items: one Background per non-empty line.
    """

    path: Path
    items: tuple[Background, ...]


def listed_backgrounds(folder: str | Path, names_file: str | Path) -> BackgroundList:
    """Read a name list (one name relative to `folder` per line, e.g. DIM's test_bg_names.txt).

    Raises FileNotFoundError naming the list and the folder when the list, or a listed photo, is missing,
    and ValueError when the list names nothing.
    """
    folder, names_file = Path(folder), Path(names_file)
    if not folder.is_dir():
        raise FileNotFoundError(f"background folder {folder} does not exist (named by composite.backgrounds)")
    if not names_file.is_file():
        raise FileNotFoundError(f"background name list {names_file} does not exist (composite.backgrounds)")
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{names_file}: background name list is empty")
    missing = [n for n in dict.fromkeys(names) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{names_file}: {len(missing)} listed background(s) not found in {folder}, "
                                f"e.g. {missing[:3]}")
    return BackgroundList(names_file, tuple(Background(name=n, path=folder / n) for n in names))


def folder_backgrounds(folder: str | Path, names_file: str | Path | None = None) -> list[Background]:
    """Photos under `folder` (recursively), named by their path relative to it.

    names_file: optional text file with one relative name per line (e.g. DIM's training_bg_names.txt);
    then only those are used (each once, in list order), and a listed name with no file is an error
    naming both files.
    """
    folder = Path(folder)
    if names_file is not None:
        return list(dict.fromkeys(listed_backgrounds(folder, names_file).items))
    if not folder.is_dir():
        raise FileNotFoundError(f"background folder {folder} does not exist (composite.backgrounds.folder)")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"background folder {folder} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    return [Background(name=p.relative_to(folder).as_posix(), path=p) for p in paths]


def _resolver(composite: dict, base_dir: Path):
    cfg = composite.get("backgrounds", {})

    def resolve(key: str) -> Path | None:
        value = cfg.get(key)
        return None if value in (None, "") else base_dir / value

    return cfg, resolve


def backgrounds_from_params(composite: dict, seed: int,
                            base_dir: Path) -> tuple[list[Background], list[Background] | None]:
    """(main pool, explicit test pool or None) from params.yaml's `composite.backgrounds` section.

    source "builtin": `count` builtin backgrounds. source "folder": photos under `folder`, optionally
    restricted by `train_list`; a separate test pool comes from `test_folder` and/or `test_list`
    (DIM: MS-COCO for training, PASCAL VOC for Composition-1k). Relative paths resolve from base_dir.
    """
    cfg, resolve = _resolver(composite, base_dir)
    source = cfg.get("source", "builtin")
    if source == "builtin":
        return builtin_backgrounds(int(cfg.get("count", 48)), seed), None
    if source != "folder":
        raise ValueError(f"composite.backgrounds.source must be 'builtin' or 'folder', got {source!r}")
    folder = resolve("folder")
    if folder is None:
        raise ValueError("composite.backgrounds.folder is required when source is 'folder'")
    main = folder_backgrounds(folder, resolve("train_list"))
    test_folder, test_list = resolve("test_folder"), resolve("test_list")
    if test_folder is None and test_list is None:
        return main, None
    return main, folder_backgrounds(test_folder or folder, test_list)


def background_lists_from_params(composite: dict, base_dir: Path) -> dict[str, BackgroundList]:
    """The ordered name lists of `composite.backgrounds` (source "folder"): {"train": train_list under
    folder, "test": test_list under test_folder (or folder)}, each key present only when its list is set.
    The composite stage pairs DIM foregrounds with them by position (fusionnet.data.composite).
    """
    cfg, resolve = _resolver(composite, base_dir)
    if cfg.get("source", "builtin") != "folder" or resolve("folder") is None:
        return {}
    folder, lists = resolve("folder"), {}
    if resolve("train_list") is not None:
        lists["train"] = listed_backgrounds(folder, resolve("train_list"))
    if resolve("test_list") is not None:
        lists["test"] = listed_backgrounds(resolve("test_folder") or folder, resolve("test_list"))
    return lists
