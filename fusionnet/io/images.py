"""Robust image reading and atomic PNG writing for inference.

`load_image` turns whatever a user points the CLI at into `(H,W,3) float32 RGB in [0,1]`, or raises
`ImageLoadError` naming the file and the problem:

- EXIF orientation is applied (as `PIL.ImageOps.exif_transpose` does), so the matte lines up with
  what image viewers show;
- alpha channels are ignored, grayscale is replicated to RGB, palette and CMYK are converted
  (CMYK through its embedded ICC profile when it has one), 16-bit images are scaled by 65535;
- huge images are shrunk *while decoding* (JPEG DCT scaling via `draft`, then box `reduce`), so a
  20000x20000 PNG costs one 8-bit decode and never a full-size float32 copy. Peak memory is about
  `width * height * bands` bytes of the decoded file (plus 3 bytes per pixel for modes that must be
  converted first: RGBA, CMYK, palette) and the small working copy;
- images over `max_pixels` are refused from their header alone, before any pixel is decoded
  (the decompression-bomb guard; PIL's own `MAX_IMAGE_PIXELS` is raised only inside `load_image`).

Writers go through `write_pngs_atomic`: every file of one result is first written to a temporary
sibling and only then renamed into place, so a failure never leaves a partial output behind.
"""

from __future__ import annotations

import functools
import io
import os
import re
import secrets
import threading
import warnings
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fusionnet.defaults import DEFAULT_MAX_PIXELS  # noqa: F401  2**29 pixels: a 20000x20000 scan fits, a bomb does not
# EXIF Orientation tag (0x0112) value -> the transpose that undoes it (same table as PIL.ImageOps).
EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Orientations whose transpose swaps height and width.
_SWAPS_AXES = (5, 6, 7, 8)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# PIL can box-reduce these modes in place of a full-resolution resize.
_REDUCIBLE_MODES = ("L", "RGB", "I", "F")
_PIL_LIMIT_LOCK = threading.Lock()
# PIL reads only the header of these (no decoder), so a folder's .mpg files are not taken for images.
_HEADER_ONLY_SUFFIXES = frozenset({".mpeg", ".mpg"})


class ImageLoadError(Exception):
    """A file that cannot be used as an input image; `str()` is `"<path>: <problem>"`."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


@dataclass(frozen=True)
class LoadedImage:
    """An input image ready for inference.

    `rgb` is `(H,W,3) float32 in [0,1]` at the loaded size, which is `original_size` unless the
    image was shrunk to `max_side` while decoding. Sizes are `(height, width)` after EXIF orientation.
    """

    rgb: np.ndarray
    original_size: tuple[int, int]
    source_mode: str
    orientation: int

    @property
    def size(self) -> tuple[int, int]:
        return (int(self.rgb.shape[0]), int(self.rgb.shape[1]))

    @property
    def downscaled(self) -> bool:
        return self.size != self.original_size


@functools.cache
def image_suffixes() -> frozenset[str]:
    """Lower-case suffixes of the formats PIL can decode here ('.png', '.jpg', '.webp', '.tiff', ...)."""
    from PIL import EpsImagePlugin, Image, ImageFile

    Image.init()
    suffixes = set()
    for suffix, name in Image.registered_extensions().items():
        opener = Image.OPEN.get(name)
        if opener is None or (isinstance(opener[0], type) and issubclass(opener[0], ImageFile.StubImageFile)):
            continue  # save-only formats, and stubs that need a handler nobody installed
        if name == "EPS" and not EpsImagePlugin.has_ghostscript():
            continue
        suffixes.add(suffix.lower())
    return frozenset(suffixes - _HEADER_ONLY_SUFFIXES)


def fit_within(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """`(h, w)` scaled so the longer side is at most `max_side` (never enlarged, sides >= 1)."""
    h, w = size
    if max_side is None or max(h, w) <= max_side:
        return (h, w)
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    scale = max_side / max(h, w)
    return (max(1, min(max_side, round(h * scale))), max(1, min(max_side, round(w * scale))))


def load_image(
    path: str | os.PathLike, *, max_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> LoadedImage:
    """Read `path` as `(H,W,3) float32 RGB in [0,1]`, longer side at most `max_side`.

    Raises `ImageLoadError` for a missing, empty, unreadable, truncated or oversized file.
    """
    path = Path(path)
    _check_file(path)
    try:
        with _open_within_limit(path, max_pixels) as im:
            return _decode(path, im, max_side, max_pixels)
    except ImageLoadError:
        raise
    except _DECODE_ERRORS as exc:
        raise _load_error(path, exc, max_pixels) from exc


def load_image_bytes(
    data: bytes | bytearray | memoryview,
    name: str = "<bytes>",
    *,
    max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImage:
    """`load_image` for an encoded file held in memory (stdin, an HTTP body, a pyfunc cell).

    Same decoding, limits and errors; `name` stands for the path in `ImageLoadError` messages.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageLoadError(name, f"expected the bytes of an image file, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageLoadError(name, "empty file (0 bytes)")
    try:
        with _open_within_limit(io.BytesIO(data), max_pixels) as im:
            return _decode(Path(name), im, max_side, max_pixels)
    except ImageLoadError:
        raise
    except _DECODE_ERRORS as exc:
        raise _load_error(name, exc, max_pixels) from exc


_DECODE_ERRORS = (Image.DecompressionBombError, MemoryError, OSError, SyntaxError, ValueError, EOFError, zlib.error)


def _too_many_pixels(size: str, max_pixels: int) -> str:
    return (f"image is {size} megapixels, over the limit of {max_pixels / 1e6:.0f} megapixels "
            "(decompression-bomb guard); raise --max-pixels if you trust this file")


def _load_error(name: str | os.PathLike, exc: BaseException, max_pixels: int) -> ImageLoadError:
    """The ImageLoadError that stands for one of `_DECODE_ERRORS` raised while decoding."""
    if isinstance(exc, Image.DecompressionBombError):
        # PIL refuses at open beyond twice our limit and cites its own figure: name ours (--max-pixels)
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.0f}" if found else "more than twice that many"
        return ImageLoadError(name, _too_many_pixels(size, max_pixels))
    if isinstance(exc, UnidentifiedImageError):
        return ImageLoadError(name, "not an image file PIL can read (unknown or damaged header)")
    if isinstance(exc, MemoryError):
        return ImageLoadError(name, "not enough memory to decode this image; lower --max-pixels")
    return ImageLoadError(name, f"cannot decode image data, the file is truncated or corrupt ({exc})")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageLoadError(path, "no such file")
    if path.is_dir():
        raise ImageLoadError(path, "is a directory, not an image file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file ({exc.strerror})") from exc
    if size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ImageLoadError(path, "permission denied")


@contextmanager
def _open_within_limit(path: Path | io.BytesIO, max_pixels: int) -> Iterator[Image.Image]:
    # PIL refuses images over 2x MAX_IMAGE_PIXELS at open; set it to our limit only for this open
    # (we check the exact limit ourselves below), and silence its warning between 1x and 2x.
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    try:
        yield im
    finally:
        im.close()


def _decode(path: Path, im: Image.Image, max_side: int | None, max_pixels: int) -> LoadedImage:
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageLoadError(path, f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageLoadError(path, _too_many_pixels(f"{w}x{h} = {w * h / 1e6:.0f}", max_pixels))
    source_mode = im.mode
    orientation = _exif_orientation(im)
    th, tw = fit_within((h, w), max_side)
    if (th, tw) != (h, w) and im.format == "JPEG":
        # DCT scaling decodes at 1/2, 1/4 or 1/8 size directly (never below the target).
        im.draft(None, (tw, th))
    im.load()
    im = _to_rgb_or_gray(path, im)
    if im.size != (tw, th):
        im = _shrink(im, (tw, th))
    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    if transpose is not None:
        im = im.transpose(transpose)
    original_size = (w, h) if orientation in _SWAPS_AXES else (h, w)
    return LoadedImage(
        rgb=_to_float_rgb(im), original_size=original_size, source_mode=source_mode, orientation=orientation
    )


def _exif_orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block must not stop the pixels being read
        return 1
    return value if isinstance(value, int) and value in range(1, 9) else 1


def _to_rgb_or_gray(path: Path, im: Image.Image) -> Image.Image:
    """Convert to "RGB", "L" or a 16-bit/float gray mode; alpha channels are dropped."""
    mode = im.mode
    if mode in ("RGB", "L", "F", *_SIXTEEN_BIT_MODES):
        return im
    if mode == "1":
        return im.convert("L")
    if mode in ("LA", "La"):
        return im.getchannel(0)
    if mode in ("RGBA", "RGBa", "RGBX"):
        return im.convert("RGB")
    if mode in ("P", "PA"):
        # Through RGBA so PIL does not warn about palette transparency; the alpha is then dropped.
        return im.convert("RGBA").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ImageLoadError(path, f"unsupported colour mode {mode!r} ({exc})") from exc


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    profile = im.info.get("icc_profile")
    if profile:
        try:
            from io import BytesIO

            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(BytesIO(profile))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # an unusable profile: fall back to PIL's plain conversion below
            pass
    return im.convert("RGB")


def _shrink(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Antialiased downscale to `size` (w, h); box-reduce first where PIL supports the mode."""
    if im.mode in _REDUCIBLE_MODES:
        return im.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return im.resize(size, Image.Resampling.BILINEAR)


def _to_float_rgb(im: Image.Image) -> np.ndarray:
    """`(H,W,3) float32 in [0,1]` from an "RGB", "L", 16-bit or float gray image."""
    arr = np.asarray(im)
    if im.mode in _SIXTEEN_BIT_MODES:
        gray = np.clip(arr.astype(np.float32) / 65535.0, 0.0, 1.0)
    elif im.mode == "F":
        gray = np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0)
    elif im.mode == "L":
        gray = arr.astype(np.float32) / 255.0
    else:
        return arr.astype(np.float32) / 255.0
    return np.repeat(gray[:, :, None], 3, axis=2)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float in [0,1] (any shape) -> uint8 0..255, rounded to nearest."""
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """uint8 `(H,W)` (L), `(H,W,3)` (RGB) or `(H,W,4)` (RGBA) -> PNG bytes (zlib level 6 is PIL's default)."""
    buffer = io.BytesIO()
    Image.fromarray(_check_uint8_image(array)).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def write_pngs_atomic(outputs: Mapping[str | os.PathLike, np.ndarray]) -> list[Path]:
    """Write each `{path: uint8 array}` as PNG, all or nothing.

    Arrays are `(H,W)` (L), `(H,W,3)` (RGB) or `(H,W,4)` (RGBA) uint8. All files are encoded to
    temporary siblings first and renamed into place only when every one succeeded; if a rename
    still fails, the files already renamed by this call are removed again, so a failed result
    leaves none of its outputs (an earlier run's file of the same name is then gone too).
    """
    targets = [Path(target) for target in outputs]
    for target in targets:
        if target.is_dir():
            raise IsADirectoryError(f"{target}: output path is a directory")
    staged: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for target, array in zip(targets, outputs.values()):
            tmp, fd = _create_temp_sibling(target)
            staged.append((tmp, target))
            with os.fdopen(fd, "wb") as fh:
                Image.fromarray(_check_uint8_image(array)).save(fh, format="PNG")
        for tmp, target in staged:
            os.replace(tmp, target)
            placed.append(target)
    except BaseException:
        for target in placed:
            target.unlink(missing_ok=True)
        raise
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return targets


def _create_temp_sibling(target: Path) -> tuple[Path, int]:
    """A new hidden `*.tmp` file next to `target`, with the umask's usual permissions (not 0600)."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {target}")


def _check_uint8_image(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"expected an (H,W), (H,W,3) or (H,W,4) image, got shape {array.shape}")
    return np.ascontiguousarray(array)
