"""Training crops centred on transition pixels (paper Sec. 4.1 "Implementation details").

The paper trains on random crops of 512x512 and 800x800 centred on random pixels of the transition
region (0 < alpha < 1), on a 512x512 resized "warm-up" version of every training image, with random
flips; the authors' code adds a random rotation in [-15, 15] degrees. Training images have a longer
side of at most 800 pixels.

Geometry conventions (all coordinates are rows/columns of the *working image*, i.e. the composite after
downscaling so its longer side is at most `max_side`):
- A crop of size s centred on pixel (cy, cx) covers rows cy - s//2 .. cy - s//2 + s - 1 (same for
  columns), so the centre pixel sits at index s//2 of the crop. The crop's provenance stores its
  top-left (crop_y, crop_x) = (cy - s//2, cx - s//2); these may be negative.
- The crop is never shifted: the centre is always the chosen transition pixel. Where the window leaves
  the image, image and alpha are both mirrored at the border (numpy "reflect": d c b | a b c d | c b a).
  A mirrored composite is still a valid composite (the same mirror applies to F, B and alpha), so no
  black borders or fake edges enter the training data; shifting the window inside the image
  (Deep Image Matting style) would move the centre off the chosen pixel.
- Rotation turns image and alpha together (bilinear) by `angle` degrees (counter-clockwise as displayed)
  about the centre pixel. The rotated crop samples the mirrored image, so it never has empty corners.
  The centre pixel keeps its exact value under rotation.
- The (possibly rotated) s x s crop is then resized (bilinear, antialiased) to out_size x out_size so
  crops of different sizes stack into one batch, and finally flipped left-right when `flipped`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

__all__ = [
    "CropParams",
    "CropSpec",
    "reflect_indices",
    "extract_window",
    "transition_pixels",
    "fit_longer_side",
    "sample_crop_specs",
    "crop_margin",
    "CropSource",
    "take_crop",
    "warmup_image",
    "draw_crop_spec",
]


@dataclass(frozen=True)
class CropParams:
    """The `crops` section of params.yaml.

    sizes: crop side lengths, one drawn uniformly per crop (paper: 512 and 800).
    out_size: every crop is resized to out_size x out_size (paper: 512).
    per_image: crops taken from each train/val composite.
    warmup_size: side of the square warm-up image (whole composite resized; paper: 512).
    rotation_deg: angle drawn uniformly in [-rotation_deg, rotation_deg] (authors' code: 15); 0 = off.
    flip: random left-right flip with probability 0.5.
    max_side: composites are downscaled so their longer side is at most this before cropping (paper: 800).
    shard_rows: rows per Parquet shard.
    augment_val: apply rotation/flip to validation crops too (off: validation crops are plain).
    val_whole: store each val composite whole, at working size (validation then scores what the test
      scores: whole images at the evaluation scale); off: `per_image` plain crops of each.
    compression: Parquet codec of the shards ("none", "zstd", "lz4", "snappy").
    """

    sizes: tuple[int, ...] = (512, 800)
    out_size: int = 512
    per_image: int = 4
    warmup_size: int = 512
    rotation_deg: float = 15.0
    flip: bool = True
    max_side: int = 800
    shard_rows: int = 256
    augment_val: bool = False
    val_whole: bool = False
    compression: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise ValueError(f"crops.sizes must be a non-empty list of positive ints, got {self.sizes}")
        for name in ("out_size", "warmup_size", "max_side", "shard_rows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"crops.{name} must be >= 1, got {getattr(self, name)}")
        if self.per_image < 0:
            raise ValueError(f"crops.per_image must be >= 0, got {self.per_image}")
        if not 0 <= self.rotation_deg < 180:
            raise ValueError(f"crops.rotation_deg must be in [0, 180), got {self.rotation_deg}")
        if self.compression not in ("none", "zstd", "lz4", "snappy", "gzip", "brotli"):
            raise ValueError(f"crops.compression {self.compression!r} is not a Parquet codec")

    @classmethod
    def from_dict(cls, section: dict) -> "CropParams":
        """Build from the `crops` mapping of params.yaml; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in params `crops`: {unknown}; known keys: {sorted(known)}")
        return cls(**section)


@dataclass(frozen=True)
class CropSpec:
    """One crop: centre pixel (center_y, center_x), side `size`, rotation `angle` in degrees, `flipped`."""

    center_y: int
    center_x: int
    size: int
    angle: float = 0.0
    flipped: bool = False

    @property
    def top_left(self) -> tuple[int, int]:
        """(crop_y, crop_x): top-left of the un-rotated crop; negative where it leaves the image."""
        return self.center_y - self.size // 2, self.center_x - self.size // 2


def reflect_indices(idx: np.ndarray, n: int) -> np.ndarray:
    """Map any integer indices into [0, n) by mirroring at the borders (numpy "reflect" padding)."""
    idx = np.asarray(idx, dtype=np.int64)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m >= n, period - m, m)


def extract_window(array: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """Copy array[top:top+height, left:left+width] of an (H,W) or (H,W,C) array, mirrored outside it."""
    h, w = array.shape[:2]
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return array[top : top + height, left : left + width].copy()
    rows = reflect_indices(np.arange(top, top + height), h)
    cols = reflect_indices(np.arange(left, left + width), w)
    return array[rows[:, None], cols[None, :]]


def transition_pixels(alpha: np.ndarray) -> np.ndarray:
    """Flat indices of the transition region 0 < alpha < 1 of an (H,W) uint8 alpha (0..255).

    Fallbacks, so a hard (binary) matte still yields crops: pixels on the 0/255 boundary
    (4-neighbour differs), and for a constant matte every pixel.
    """
    alpha = np.asarray(alpha)
    flat = np.flatnonzero((alpha > 0) & (alpha < 255))
    if flat.size:
        return flat
    edge = np.zeros(alpha.shape, dtype=bool)
    dy = alpha[1:, :] != alpha[:-1, :]
    dx = alpha[:, 1:] != alpha[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    flat = np.flatnonzero(edge)
    return flat if flat.size else np.arange(alpha.size)


def fit_longer_side(
    image: np.ndarray, alpha: np.ndarray, max_side: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Downscale (bilinear, antialiased) so max(H, W) <= max_side; returns (image, alpha, scale <= 1)."""
    h, w = alpha.shape
    if max(h, w) <= max_side:
        return image, alpha, 1.0
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    alpha = np.asarray(Image.fromarray(alpha).resize(size, Image.BILINEAR))
    return image, alpha, scale


def sample_crop_specs(
    alpha: np.ndarray,
    count: int,
    sizes: tuple[int, ...],
    rotation_deg: float,
    flip: bool,
    rng: np.random.Generator,
) -> list[CropSpec]:
    """Draw `count` crops: centre uniform over transition pixels, size uniform over `sizes`,
    angle uniform in [-rotation_deg, rotation_deg] (0 when rotation_deg == 0), flip with p = 0.5."""
    candidates = transition_pixels(alpha)
    return [draw_crop_spec(candidates, alpha.shape[1], sizes, rotation_deg, flip, rng) for _ in range(count)]


def draw_crop_spec(
    candidates: np.ndarray,
    width: int,
    sizes: tuple[int, ...],
    rotation_deg: float,
    flip: bool,
    rng: np.random.Generator,
) -> CropSpec:
    """One crop as the paper draws it: centre uniform over `candidates` (flat transition-pixel indices
    of an image `width` wide), size uniform over `sizes`, angle uniform in [-rotation_deg,
    rotation_deg] (no draw when 0), left-right flip with p = 0.5 (no draw when `flip` is off)."""
    flat = int(candidates[rng.integers(candidates.size)])
    size = int(sizes[rng.integers(len(sizes))])
    angle = float(rng.uniform(-rotation_deg, rotation_deg)) if rotation_deg > 0 else 0.0
    flipped = bool(rng.random() < 0.5) if flip else False
    return CropSpec(flat // width, flat % width, size, angle, flipped)


def crop_margin(spec: CropSpec) -> int:
    """Pixels needed on every side of the centre pixel to cut `spec` (rotated corners + bilinear taps)."""
    theta = math.radians(spec.angle)
    # the rotated crop's farthest pixel lies (s//2)(|cos|+|sin|) from the centre per axis
    return math.ceil(spec.size // 2 * (abs(math.cos(theta)) + abs(math.sin(theta)))) + 2


class CropSource:
    """One working image and alpha, mirror-padded once, from which many crops are cut.

    image (H,W,3) uint8, alpha (H,W) uint8; `specs` bound the padding (each side padded only as far as
    some crop needs). A rotated crop is a single PIL affine transform that computes only its s x s
    output pixels, so no rotated window larger than the crop is ever built.
    """

    def __init__(self, image: np.ndarray, alpha: np.ndarray, specs: list[CropSpec]) -> None:
        if image.shape[:2] != alpha.shape or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected image (H,W,3) and alpha (H,W) of one size, got {image.shape} and {alpha.shape}")
        h, w = alpha.shape
        margins = [(crop_margin(s), s.center_y, s.center_x) for s in specs] or [(0, 0, 0)]
        top = max(0, max(m - y for m, y, _ in margins))
        bottom = max(0, max(y + m - (h - 1) for m, y, _ in margins))
        left = max(0, max(m - x for m, _, x in margins))
        right = max(0, max(x + m - (w - 1) for m, _, x in margins))
        rows = reflect_indices(np.arange(-top, h + bottom), h)
        cols = reflect_indices(np.arange(-left, w + right), w)
        if top or bottom or left or right:
            image, alpha = image[rows[:, None], cols[None, :]], alpha[rows[:, None], cols[None, :]]
        self.offset = (top, left)
        self.image = Image.fromarray(np.ascontiguousarray(image))
        self.alpha = Image.fromarray(np.ascontiguousarray(alpha))

    def _cut(self, im: Image.Image, spec: CropSpec) -> Image.Image:
        s = spec.size
        cy, cx = spec.center_y + self.offset[0], spec.center_x + self.offset[1]
        if spec.angle == 0.0:
            return im.crop((cx - s // 2, cy - s // 2, cx - s // 2 + s, cy - s // 2 + s))
        theta = math.radians(spec.angle)
        cos, sin = math.cos(theta), math.sin(theta)
        # output offset (u, v) from the crop centre reads input (u cos - v sin, u sin + v cos) from the
        # centre pixel: the content turns counter-clockwise as displayed (y down); PIL samples pixel
        # centres, so the centre pixels sit at (s//2 + 0.5) in the output and (c + 0.5) in the input
        x0 = y0 = s // 2 + 0.5
        a, b, d, e = cos, -sin, sin, cos
        c = cx + 0.5 - a * x0 - b * y0
        f = cy + 0.5 - d * x0 - e * y0
        return im.transform((s, s), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR)

    def crop(self, spec: CropSpec, out_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Cut `spec` -> ((out_size,out_size,3) uint8, (out_size,out_size) uint8); see module doc."""
        img, alp = self._cut(self.image, spec), self._cut(self.alpha, spec)
        if spec.size != out_size:
            img = img.resize((out_size, out_size), Image.BILINEAR)
            alp = alp.resize((out_size, out_size), Image.BILINEAR)
        if spec.flipped:
            img, alp = img.transpose(Image.FLIP_LEFT_RIGHT), alp.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(img), np.asarray(alp)


def take_crop(
    image: np.ndarray, alpha: np.ndarray, spec: CropSpec, out_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut one crop. image (H,W,3) uint8, alpha (H,W) uint8 -> ((out,out,3) uint8, (out,out) uint8).

    With angle 0 and out_size == size the crop is an exact copy of the (mirrored) source window.
    For many crops of one image, build one `CropSource` instead.
    """
    return CropSource(image, alpha, [spec]).crop(spec, out_size)


def warmup_image(
    image: np.ndarray, alpha: np.ndarray, size: int, flipped: bool = False, angle: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's warm-up sample: the whole image resized (bilinear) to size x size (aspect not kept),
    then rotated by `angle` degrees about its centre (mirrored, as crops are) and flipped when asked
    (paper: flips and rotation are "applied to all the cropped and resized training data").

    image (H,W,3) uint8, alpha (H,W) uint8 -> ((size,size,3) uint8, (size,size) uint8).
    """
    img = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    alp = np.asarray(Image.fromarray(alpha).resize((size, size), Image.BILINEAR))
    if angle != 0.0:
        spec = CropSpec(size // 2, size // 2, size, angle, False)
        img, alp = CropSource(img, alp, [spec]).crop(spec, size)
    if flipped:
        img, alp = img[:, ::-1], alp[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(alp)
