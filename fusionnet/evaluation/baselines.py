"""Reference mattes that give the evaluation table a scale (computed by the same metric code).

- `closed_form_alpha`: trimap-based closed-form matting (Levin et al. 2008, the paper's "Closed-form"
  row in Tab. 1 and 2) via pymatting's `estimate_alpha_cf`, given the evaluation trimap. It is a
  sparse linear solve over the unknown pixels, so it runs on a copy downscaled to `max_side`
  (default 320) and is upsampled back; the trimap's known pixels are then pasted back at full
  resolution, so only the unknown band carries the downscaling error.
- `segmentation_only_alpha`: the network without its fusion network, (F + 1 - B) / 2, i.e. paper
  Eq. 2 with the blending weight beta fixed at 0.5 (the mean of the two branch estimates).
- `constant_alpha`: 0.5 in the trimap's unknown region, the trimap's values elsewhere: what a method
  that knows the trimap but nothing else scores.

Images are (H,W,3) uint8 or float in [0,1]; trimaps (H,W) uint8 with 0 / 128 / 255; mattes are
returned as (H,W) float32 in [0,1].
"""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
from PIL import Image

__all__ = ["closed_form_alpha", "constant_alpha", "segmentation_only_alpha", "trimap_known_alpha"]

log = logging.getLogger(__name__)

TRIMAP_UNKNOWN = 128


def _check_trimap(trimap: np.ndarray, shape: tuple[int, int] | None, caller: str) -> np.ndarray:
    arr = np.asarray(trimap)
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise ValueError(f"{caller}: trimap must be (H,W) uint8 with 0/128/255, got {arr.dtype} {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{caller}: trimap shape {arr.shape} does not match image shape {shape}")
    return arr


def _as_float_image(image: np.ndarray, caller: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{caller}: image must be (H,W,3), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{caller}: image must be uint8 or float in [0,1], got {arr.dtype}")
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def trimap_known_alpha(trimap: np.ndarray) -> np.ndarray:
    """(H,W) float32: 1 where trimap is 255, 0 where 0, NaN in the unknown region (128)."""
    arr = _check_trimap(trimap, None, "trimap_known_alpha")
    out = np.where(arr >= 255, 1.0, 0.0).astype(np.float32)
    out[arr == TRIMAP_UNKNOWN] = np.nan
    return out


def constant_alpha(trimap: np.ndarray, value: float = 0.5) -> np.ndarray:
    """`value` in the unknown region (trimap 128), 1 on 255, 0 on 0. Returns (H,W) float32."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"constant_alpha: value must be in [0,1], got {value!r}")
    known = trimap_known_alpha(trimap)
    return np.where(np.isnan(known), np.float32(value), known).astype(np.float32)


def segmentation_only_alpha(fg_prob: np.ndarray, bg_prob: np.ndarray) -> np.ndarray:
    """(F + 1 - B) / 2: paper Eq. 2 with beta = 0.5. fg_prob, bg_prob: (H,W) float in [0,1]."""
    fg = np.asarray(fg_prob, dtype=np.float32)
    bg = np.asarray(bg_prob, dtype=np.float32)
    if fg.shape != bg.shape or fg.ndim != 2:
        raise ValueError(f"segmentation_only_alpha: need two (H,W) maps of one shape, got {fg.shape} and {bg.shape}")
    return np.clip(0.5 * (fg + 1.0 - bg), 0.0, 1.0)


def _resize(array: np.ndarray, size_wh: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize an (H,W) or (H,W,C) float array channel by channel (PIL mode "F")."""
    if array.ndim == 2:
        return np.asarray(Image.fromarray(np.ascontiguousarray(array, dtype=np.float32)).resize(size_wh, resample))
    return np.stack([_resize(array[..., c], size_wh, resample) for c in range(array.shape[2])], axis=-1)


def _keep_torch_fast() -> None:
    """Make numba run pymatting's parallel kernels on its own "workqueue" threads, not OpenMP.

    With numba's default "omp" layer, the first parallel kernel starts a second OpenMP runtime in
    the process: torch's thread count jumps to the core count and every later network pass on the
    CPU ran ~4-5x slower (measured: 0.64 -> 3.0 CPU s per 320 px densenet121 pass). Only effective
    before numba's first parallel launch; the workqueue layer must not be entered from two Python
    threads at once, which the evaluation never does.
    """
    import numba
    from numba.np.ufunc import parallel

    if not parallel._is_initialized:
        numba.config.THREADING_LAYER = "workqueue"


def closed_form_alpha(image: np.ndarray, trimap: np.ndarray, max_side: int | None = 320) -> np.ndarray:
    """Closed-form matting (Levin et al.) with the given trimap, solved at most at `max_side` pixels.

    image: (H,W,3) uint8 or float in [0,1]; trimap: (H,W) uint8 0/128/255; max_side: longer side of
    the solve (None = full resolution). Bilinear downscale of the image, nearest for the trimap
    (so 128 stays 128); the solved matte is upsampled bilinearly and the full-resolution trimap's
    known pixels are restored. Raises ValueError when the trimap has no foreground or no
    background pixel (closed-form matting needs both). Returns (H,W) float32 in [0,1].
    """
    _keep_torch_fast()
    from pymatting import estimate_alpha_cf  # lazy: importing pymatting compiles its numba kernels

    img = _as_float_image(image, "closed_form_alpha")
    tri = _check_trimap(trimap, img.shape[:2], "closed_form_alpha")
    if not (tri == 0).any() or not (tri == 255).any():
        raise ValueError("closed_form_alpha: the trimap needs both foreground (255) and background (0) pixels")
    height, width = tri.shape
    scale = 1.0 if max_side is None else min(1.0, max_side / max(height, width))
    if scale < 1.0:
        size_wh = (max(1, round(width * scale)), max(1, round(height * scale)))
        small_img = np.clip(_resize(img, size_wh, Image.Resampling.BILINEAR), 0.0, 1.0).astype(np.float64)
        small_tri = np.asarray(Image.fromarray(tri).resize(size_wh, Image.Resampling.NEAREST))
    else:
        small_img, small_tri = img, tri
    # the downscaled trimap can lose a thin known region: then solve at full resolution instead
    if not (small_tri == 0).any() or not (small_tri == 255).any():
        small_img, small_tri, scale = img, tri, 1.0
    # pymatting print()s a "PERFORMANCE WARNING" whenever its incomplete Cholesky needs a shift
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        alpha = estimate_alpha_cf(small_img, small_tri.astype(np.float64) / 255.0)
    if chatter.getvalue():
        log.debug("closed_form_alpha: pymatting said %s", chatter.getvalue().strip())
    alpha = np.clip(np.asarray(alpha, dtype=np.float32), 0.0, 1.0)
    if scale < 1.0:
        alpha = np.clip(_resize(alpha, (width, height), Image.Resampling.BILINEAR), 0.0, 1.0)
    known = trimap_known_alpha(tri)
    return np.where(np.isnan(known), alpha, known).astype(np.float32)
