"""Image files for the data stages: strict 8-bit readers, atomic PNG writes, atomic output folders.

Readers raise `ImageFileError` whose message names the file and the problem, so a stage can report
a bad foreground by name instead of crashing with a bare PIL traceback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fusionnet.io.atomic import write_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageFileError(ValueError):
    """An image file that cannot be used; the message names the file."""


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError as err:
        raise ImageFileError(f"{path}: file not found") from err
    except Exception as err:  # PIL raises many types for corrupt files
        raise ImageFileError(f"{path}: unreadable image ({type(err).__name__}: {err})") from err
    # EXIF orientation: phone photos are stored sideways with a rotate tag
    return ImageOps.exif_transpose(image)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read a photo as (H,W,3) uint8 RGB with its EXIF orientation applied.

    Grey, palette, CMYK and 16-bit images are converted; transparency (RGBA) is dropped.
    """
    image = _open(Path(path))
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def read_alpha(path: str | os.PathLike) -> np.ndarray:
    """Read a ground-truth alpha matte as (H,W) uint8 (0 = background, 255 = foreground).

    Accepts L, 16-bit grey, and RGB/RGBA mattes stored with R=G=B (as alphamatting.com does);
    an RGB matte whose channels differ is rejected rather than silently converted.
    """
    path = Path(path)
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _to_uint8(np.asarray(image))
    if image.mode in ("L", "P", "1", "LA"):
        return np.asarray(image.convert("L"), dtype=np.uint8).copy()
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    spread = int(np.max(rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)))
    if spread > 1:  # 1 level of slack for lossy encoders
        raise ImageFileError(f"{path}: alpha matte is a colour image (R, G, B differ by up to {spread} levels)")
    return rgb[..., 0].copy()


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit or float grey values to uint8 (float assumed in [0,1], integers in [0,65535])."""
    if values.dtype.kind == "f":
        return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    return np.clip(np.rint(values.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def write_png(path: str | os.PathLike, array: np.ndarray, compress_level: int = 3) -> None:
    """Write (H,W) or (H,W,3) uint8 as PNG atomically (fusionnet.io.atomic: never a half file)."""
    path = Path(path)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"write_png({path}): expected (H,W) or (H,W,3) uint8, got {array.dtype} {array.shape}")
    write_atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", compress_level=compress_level))


RESIZE_FILTER = Image.Resampling.BILINEAR
"""The one downscaling filter of the data stages: PIL's bilinear, which widens its triangle kernel by the
scale factor when shrinking (antialiased, close to area averaging). Its weights are >= 0 and sum to 1,
so every output is a convex combination of inputs: it never overshoots [0, 255] (Lanczos does).
Kept over OpenCV's INTER_AREA (a box of width = scale, 4-8x faster on 3 MP composites): the kernels
differ, by up to 33 levels (mean 3.7) on a real matte's transition pixels at x0.4 (benchmarks/bench_opencv.py)."""


def max_side_size(hw: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(height, width) after shrinking so the longer side is at most max_side, aspect kept.

    Never upscales; None (or a size already within max_side) returns hw unchanged. Sides are rounded
    to the nearest integer and at least 1.
    """
    height, width = int(hw[0]), int(hw[1])
    if max_side is None or max(height, width) <= max_side:
        return height, width
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1 or None, got {max_side}")
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_float(array: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize (H,W) or (H,W,C) values with RESIZE_FILTER, channel by channel, in float32.

    Values keep their range (e.g. [0, 255]); returns float32 of shape (h,w) or (h,w,C). Same size:
    returned as float32 without resampling.
    """
    height, width = hw
    values = np.asarray(array, dtype=np.float32)
    if values.shape[:2] == (height, width):
        return values
    if values.ndim == 2:
        return np.asarray(Image.fromarray(values).resize((width, height), RESIZE_FILTER), np.float32)
    return np.stack([resize_float(values[..., c], hw) for c in range(values.shape[2])], axis=-1)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Float values in [0, 255] to uint8: rounded half to even, clipped."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build an output folder in a temp sibling and rename it into place only on success.

    An interrupted stage leaves a hidden `.NAME.tmp-PID` folder, never a half `NAME` that looks valid.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
