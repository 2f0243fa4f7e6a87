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
  the image, image and alpha are both mirrored at the border (numpy "reflect": d c b | a b c d | c b a,
  repeated for windows wider than the image; OpenCV calls it BORDER_REFLECT_101).
  A mirrored composite is still a valid composite (the same mirror applies to F, B and alpha), so no
  black borders or fake edges enter the training data; shifting the window inside the image
  (Deep Image Matting style) would move the centre off the chosen pixel.
- Rotation turns image and alpha together (bilinear) by `angle` degrees (counter-clockwise as displayed)
  about the centre pixel. The rotated crop samples the mirrored image, so it never has empty corners.
  The centre pixel keeps its exact value under rotation.
- The (possibly rotated) s x s crop is resized to out_size x out_size so crops of different sizes stack
  into one batch, and finally flipped left-right when `flipped`.
- All of this is one affine map from the output square to the working image (`crop_affine`), so a crop
  is one cv2.warpAffine that computes only its out_size^2 pixels, image and alpha together as one
  4-channel array; no s x s intermediate exists. Output pixel centres (x + 0.5, y + 0.5) map to the
  crop's pixel centres as any resize does, so an unrotated crop with size == out_size is an exact copy.
- A bilinear warp that shrinks by more than 1.5x aliases (it reads 2x2 taps per output pixel), so there
  the source is first blurred (Gaussian, mirrored at the border, so the mirror semantics stay exact) by
  as much as the shrink needs; see `_warp`. Warm-up images are one such warp of the whole composite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np

# OpenCV's thread pool does not survive fork (a DataLoader worker forked from a parent that warped
# can hang in it), and the workers are the parallelism here: OpenCV runs in the calling thread.
cv2.setNumThreads(1)

__all__ = [
    "CropParams",
    "CropSpec",
    "transition_pixels",
    "fit_longer_side",
    "sample_crop_specs",
    "crop_affine",
    "resize",
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
    def from_params(cls, params: Mapping[str, Any]) -> "CropParams":
        """The `crops` section of a whole params.yaml mapping (ValueError naming what is wrong)."""
        if not isinstance(params, Mapping) or "crops" not in params:
            raise ValueError("params: needs a `crops` section")
        return cls.from_dict(params["crops"])

    @classmethod
    def from_dict(cls, section: dict) -> "CropParams":
        """Build from the `crops` mapping of params.yaml; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in params `crops`: {unknown}; known keys: {sorted(known)}")
        return cls(**section)


def working_scale(params: Mapping[str, Any]) -> int:
    """The working scale: `crops.max_side` of params.yaml, the longer side the network trains at, and
    (so that it sees what it learned from) is evaluated and served at. One key for all three."""
    crops = params.get("crops") or {}
    return int(crops.get("max_side", CropParams.__dataclass_fields__["max_side"].default))


def refuse_moved_scale(section: Mapping[str, Any], name: str) -> None:
    """ValueError when a params section still sets its own max_side (the working scale is crops.max_side)."""
    if "max_side" in section:
        raise ValueError(f"params {name}.max_side: the working scale is one key, crops.max_side "
                         f"(training, evaluation and the served model use it); remove {name}.max_side")


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


def resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """An (H,W) or (H,W,C) uint8 array resized to width x height: area-averaged (cv2.INTER_AREA) when
    shrinking, which antialiases, bilinear when enlarging; pixel centres map onto pixel centres."""
    h, w = array.shape[:2]
    if (w, h) == (width, height):
        return array
    shrink = width < w or height < h
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def fit_longer_side(
    image: np.ndarray, alpha: np.ndarray, max_side: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Downscale (area-averaged) so max(H, W) <= max_side; returns (image, alpha, scale <= 1)."""
    h, w = alpha.shape
    if max(h, w) <= max_side:
        return image, alpha, 1.0
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return resize(image, *size), resize(alpha, *size), scale


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


def crop_affine(spec: CropSpec, out_size: int) -> np.ndarray:
    """(2,3) float64 map from output pixel (x, y) of the out_size x out_size sample to the working image:
    the source point is M @ (x, y, 1), integer coordinates at pixel centres (OpenCV's convention).

    Read right to left: flip (x -> out_size - 1 - x), resize (output centre x + 0.5 -> crop centre
    (x + 0.5) k with k = size / out_size), offset (u, v) from the crop's centre pixel s//2, rotation
    (u, v) -> (u cos - v sin, u sin + v cos): the content turns counter-clockwise as displayed (y down).
    """
    s, n = spec.size, out_size
    k = s / n
    theta = math.radians(spec.angle)
    cos, sin = math.cos(theta), math.sin(theta)
    # u = kx * x + u0, v = k * y + v0: offsets from the centre pixel in crop pixels
    kx, u0 = (-k, (n - 0.5) * k - 0.5 - s // 2) if spec.flipped else (k, 0.5 * k - 0.5 - s // 2)
    v0 = 0.5 * k - 0.5 - s // 2
    return np.array([
        [kx * cos, -k * sin, spec.center_x + u0 * cos - v0 * sin],
        [kx * sin, k * cos, spec.center_y + u0 * sin + v0 * cos],
    ])


# A warp shrinking more than this (source pixels per output pixel) is preceded by a blur (`_warp`).
_MAX_WARP_SHRINK = 1.5


def _rgba(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """image (H,W,3) and alpha (H,W) uint8 as one (H,W,4) array, so one warp cuts both."""
    if image.shape[:2] != alpha.shape or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected image (H,W,3) and alpha (H,W) of one size, got {image.shape} and {alpha.shape}")
    rgba = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2RGBA)
    rgba[..., 3] = alpha
    return rgba


def _antialias_sigmas(matrix: np.ndarray) -> tuple[float, float]:
    """Gaussian sigmas (source x, y) to blur with before warping by `matrix`; (0, 0) when not shrinking
    by more than _MAX_WARP_SHRINK. The maps here (rotation, then resize) have M M^T diagonal, so an
    output pixel's footprint is axis-aligned in the source, k_x by k_y source pixels (row norms of M)."""
    kx, ky = math.hypot(*matrix[0, :2]), math.hypot(*matrix[1, :2])
    if max(kx, ky) <= _MAX_WARP_SHRINK:
        return 0.0, 0.0
    # variance (k^2 - 1) / 4: with the bilinear taps' own spread, closest to the antialiased PIL resize it
    # replaced (800 -> 512 hair crops: <= 23 levels, mean 0.2 off it; bare warp 70, 0.7) for ~1 ms a crop
    return tuple(math.sqrt(max(0.0, k * k - 1.0) / 4.0) for k in (kx, ky))  # type: ignore[return-value]


def _warp(source: np.ndarray, matrix: np.ndarray, out_size: int, blurred: dict | None = None) -> np.ndarray:
    """The out_size x out_size output pixels of `matrix` (see `crop_affine`) read from `source`: bilinear,
    mirrored outside it (numpy "reflect" = BORDER_REFLECT_101), antialiased where it shrinks > 1.5x.
    `blurred` caches blurred copies of `source` by sigmas (several crops of one image)."""
    sigmas = _antialias_sigmas(matrix)
    if sigmas != (0.0, 0.0):
        smooth = blurred.get(sigmas) if blurred is not None else None
        if smooth is None:
            ksize = tuple(2 * math.ceil(3 * sigma) + 1 if sigma > 0 else 1 for sigma in sigmas)  # 1: that axis as is
            smooth = cv2.GaussianBlur(source, ksize, sigmaX=sigmas[0], sigmaY=sigmas[1], borderType=cv2.BORDER_REFLECT_101)
            if blurred is not None:
                blurred[sigmas] = smooth
        source = smooth
    return cv2.warpAffine(source, matrix, (out_size, out_size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT_101)


def _split(rgba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H,W,4) -> contiguous ((H,W,3) image, (H,W) alpha)."""
    return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB), np.ascontiguousarray(rgba[..., 3])


class CropSource:
    """One working image and alpha from which many crops are cut.

    image (H,W,3) uint8, alpha (H,W) uint8, stored once as one 4-channel array; each crop is a single
    cv2.warpAffine of it (see module doc), which mirrors at the border by itself, so nothing is padded
    and `specs` (the crops to be cut) is not needed; it is accepted so callers may still pass it.
    """

    def __init__(self, image: np.ndarray, alpha: np.ndarray, specs: Sequence[CropSpec] = ()) -> None:
        self.rgba = _rgba(image, alpha)
        self._blurred: dict = {}

    def crop(self, spec: CropSpec, out_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Cut `spec` -> ((out_size,out_size,3) uint8, (out_size,out_size) uint8); see module doc."""
        return _split(_warp(self.rgba, crop_affine(spec, out_size), out_size, self._blurred))


def take_crop(
    image: np.ndarray, alpha: np.ndarray, spec: CropSpec, out_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut one crop. image (H,W,3) uint8, alpha (H,W) uint8 -> ((out,out,3) uint8, (out,out) uint8).

    With angle 0 and out_size == size the crop is an exact copy of the (mirrored) source window.
    For many crops of one image, build one `CropSource` instead.
    """
    return CropSource(image, alpha).crop(spec, out_size)


def warmup_image(
    image: np.ndarray, alpha: np.ndarray, size: int, flipped: bool = False, angle: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's warm-up sample: the whole image resized to size x size (aspect not kept), then
    rotated by `angle` degrees about its centre pixel (mirrored, as crops are) and flipped when asked
    (paper: flips and rotation are "applied to all the cropped and resized training data").

    One warp: a crop of the resized image composed with the resize (antialiased where it shrinks by more
    than 1.5x); the mirror outside is the image's own, at its border.

    image (H,W,3) uint8, alpha (H,W) uint8 -> ((size,size,3) uint8, (size,size) uint8).
    """
    h, w = alpha.shape
    on_resized = crop_affine(CropSpec(size // 2, size // 2, size, angle, flipped), size)
    sx, sy = w / size, h / size  # resized pixel centre x + 0.5 -> (x + 0.5) sx in the image
    matrix = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]]) @ np.vstack([on_resized, [0.0, 0.0, 1.0]])
    return _split(_warp(_rgba(image, alpha), matrix, size))
