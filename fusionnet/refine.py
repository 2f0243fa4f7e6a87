"""Post-processing of a predicted matte: guided-filter refinement, implicit trimap, foreground colours.

- `guided_filter`: He et al.'s guided filter with the colour image as guide (TPAMI 2013, the form with
  a 3x3 colour covariance per window), used by the paper for its "Ours-refined" rows (paper Tab. 1, 2).
- `implicit_trimap`: the trimap the two decoder branches define without user input (paper Fig. 3).
- `estimate_foreground`: foreground colours F for cut-outs and compositing I = alpha*F + (1-alpha)*B
  (multilevel foreground estimation, Germer et al. 2020, via pymatting).

All functions take and return numpy arrays; images are (H,W,3) float in [0,1], maps (H,W).
"""

from __future__ import annotations

import numbers
import sys

import numba
import numpy as np

__all__ = ["guided_filter", "implicit_trimap", "estimate_foreground"]

TRIMAP_BACKGROUND = 0
TRIMAP_UNKNOWN = 128
TRIMAP_FOREGROUND = 255


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------


def _check_float_array(x: object, name: str, caller: str, ndim: int) -> np.ndarray:
    """Return `x` as a C-contiguous float32 array after checking its type, rank and range [0,1]."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{caller}: {name} must be a numpy array, got {type(x).__name__}")
    if x.ndim != ndim:
        want = "(H,W,3)" if ndim == 3 else "(H,W)"
        raise ValueError(f"{caller}: {name} must have shape {want}, got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        # an 8-bit image silently treated as [0,1] would be wrong by a factor of 255
        raise ValueError(
            f"{caller}: {name} must be a float array in [0,1], got dtype {x.dtype} "
            f"(convert 8-bit data with x.astype(np.float32) / 255)"
        )
    if x.size == 0:
        raise ValueError(f"{caller}: {name} is empty (shape {x.shape})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())  # NaN propagates into lo/hi and fails the check
    if not (lo >= 0.0 and hi <= 1.0):
        raise ValueError(f"{caller}: {name} must lie in [0,1] with no NaN, got range [{lo}, {hi}]")
    return x


def _check_image_and_map(
    image: object, alpha: object, caller: str, alpha_name: str = "alpha"
) -> tuple[np.ndarray, np.ndarray]:
    image = _check_float_array(image, "image", caller, ndim=3)
    if image.shape[2] != 3:
        raise ValueError(f"{caller}: image must have 3 colour channels (H,W,3), got {image.shape}")
    alpha = _check_float_array(alpha, alpha_name, caller, ndim=2)
    if alpha.shape != image.shape[:2]:
        raise ValueError(
            f"{caller}: {alpha_name} shape {alpha.shape} does not match image shape {image.shape[:2]}"
        )
    return image, alpha


# ---------------------------------------------------------------------------------------------
# guided filter kernel (numba)
#
# A numpy version needs ~17 full-image box-filter passes plus ~70 elementwise passes for the 3x3
# solve; memory-bound, it measured ~150 ms at 800x800 on this 2-core CPU. This kernel (~20 ms CPU,
# benchmarks/bench_refine.py) streams the image row by row instead: a vertical running sum per
# column (O(1) per row step), a horizontal running sum along the row (O(1) per pixel), the per-pixel
# solve, and the same two running sums over a_k, b_k a few rows behind, so no full-size
# intermediate is written. Box sums become means through the count of in-image window pixels, which
# is separable: 1/count = inv_ny[y] * inv_nx[x]. Images stay float32; sums and a_k, b_k are float64
# so that Sigma = E[I I^T] - mu mu^T does not lose digits to cancellation (max error vs a float64
# reference ~5e-7 at 800x800, r=8, eps=1e-4).
# error_model="numpy" (IEEE division, no ZeroDivisionError check) lets LLVM vectorise the solve.
# Serial on purpose: numba's default "workqueue" threading layer aborts the process when two
# Python threads (e.g. a Prefect thread-pool task runner) call a parallel kernel at once.
# ---------------------------------------------------------------------------------------------


@numba.njit(cache=True, error_model="numpy", inline="always")
def _add_guide_features(col: np.ndarray, guide: np.ndarray, p: np.ndarray, y: int, sign: float) -> None:
    """col[c, x] += sign * feature_c(row y); features: I (3), p, I*p (3), upper triangle of I I^T (6)."""
    for x in range(p.shape[1]):
        i0 = guide[0, y, x]
        i1 = guide[1, y, x]
        i2 = guide[2, y, x]
        pp = p[y, x]
        col[0, x] += sign * i0
        col[1, x] += sign * i1
        col[2, x] += sign * i2
        col[3, x] += sign * pp
        col[4, x] += sign * (i0 * pp)
        col[5, x] += sign * (i1 * pp)
        col[6, x] += sign * (i2 * pp)
        col[7, x] += sign * (i0 * i0)
        col[8, x] += sign * (i0 * i1)
        col[9, x] += sign * (i0 * i2)
        col[10, x] += sign * (i1 * i1)
        col[11, x] += sign * (i1 * i2)
        col[12, x] += sign * (i2 * i2)


@numba.njit(cache=True, error_model="numpy", inline="always")
def _row_box_sums(col: np.ndarray, r: int, acc: np.ndarray, out: np.ndarray) -> None:
    """out[c, x] = sum of col[c, max(0,x-r) : min(W,x+r+1)] (window clipped to the row).

    Running sums with the channel loop innermost: the channels' add chains overlap instead of queueing.
    """
    n_ch, width = col.shape
    acc[:] = 0.0
    for x in range(min(r, width)):
        for c in range(n_ch):
            acc[c] += col[c, x]
    for x in range(width):
        if x + r < width:
            for c in range(n_ch):
                acc[c] += col[c, x + r]
        if x - r - 1 >= 0:
            for c in range(n_ch):
                acc[c] -= col[c, x - r - 1]
        for c in range(n_ch):
            out[c, x] = acc[c]


@numba.njit(cache=True, error_model="numpy")
def _inverse_counts(n: int, r: int) -> np.ndarray:
    """1 / (number of positions of [i-r, i+r] inside [0, n)) for each i."""
    inv = np.empty(n, np.float64)
    for i in range(n):
        inv[i] = 1.0 / (min(n - 1, i + r) - max(0, i - r) + 1)
    return inv


@numba.njit(cache=True, error_model="numpy", inline="always")
def _solve_row(box: np.ndarray, inv_ny: float, inv_nx: np.ndarray, eps: float, coef: np.ndarray) -> None:
    """a_k (3) and b_k of the local linear model for one row of windows, from their 13 feature sums.

    a_k = (Sigma_k + eps U)^-1 (mean_k(I p) - mu_k pbar_k),  b_k = pbar_k - a_k . mu_k;  coef (4,W).
    """
    for x in range(box.shape[1]):
        inv = inv_ny * inv_nx[x]
        m0 = box[0, x] * inv
        m1 = box[1, x] * inv
        m2 = box[2, x] * inv
        mp = box[3, x] * inv
        v0 = box[4, x] * inv - m0 * mp
        v1 = box[5, x] * inv - m1 * mp
        v2 = box[6, x] * inv - m2 * mp
        s00 = box[7, x] * inv - m0 * m0 + eps
        s01 = box[8, x] * inv - m0 * m1
        s02 = box[9, x] * inv - m0 * m2
        s11 = box[10, x] * inv - m1 * m1 + eps
        s12 = box[11, x] * inv - m1 * m2
        s22 = box[12, x] * inv - m2 * m2 + eps
        # closed-form inverse of the symmetric 3x3 (cofactors / determinant)
        k00 = s11 * s22 - s12 * s12
        k01 = s02 * s12 - s01 * s22
        k02 = s01 * s12 - s02 * s11
        k11 = s00 * s22 - s02 * s02
        k12 = s01 * s02 - s00 * s12
        k22 = s00 * s11 - s01 * s01
        inv_det = 1.0 / (s00 * k00 + s01 * k01 + s02 * k02)
        a0 = (k00 * v0 + k01 * v1 + k02 * v2) * inv_det
        a1 = (k01 * v0 + k11 * v1 + k12 * v2) * inv_det
        a2 = (k02 * v0 + k12 * v1 + k22 * v2) * inv_det
        coef[0, x] = a0
        coef[1, x] = a1
        coef[2, x] = a2
        coef[3, x] = mp - a0 * m0 - a1 * m1 - a2 * m2


@numba.njit(cache=True, error_model="numpy", nogil=True)
def _guided_filter_kernel(guide: np.ndarray, p: np.ndarray, r: int, eps: float, q: np.ndarray) -> None:
    """q (H,W) from guide (3,H,W) and p (H,W), all float32; see guided_filter.

    Windows k are produced one row of centres at a time, r rows ahead of the output row y, and their
    a_k, b_k kept in a ring of 2r+2 rows: exactly the rows whose windows can contain row y or leave it.
    """
    height, width = p.shape
    inv_nx = _inverse_counts(width, r)
    inv_ny = _inverse_counts(height, r)
    feature_col = np.zeros((13, width), np.float64)  # feature sums over the rows of window row k
    feature_box = np.empty((13, width), np.float64)
    ring_size = min(2 * r + 2, height)
    coef_ring = np.empty((ring_size, 4, width), np.float64)
    coef_col = np.zeros((4, width), np.float64)  # a_k, b_k sums over the window rows around y
    coef_box = np.empty((4, width), np.float64)
    acc = np.empty(13, np.float64)
    next_k = 0
    for y in range(height):
        while next_k <= min(height - 1, y + r):
            k = next_k
            if k == 0:
                for row in range(min(r + 1, height)):
                    _add_guide_features(feature_col, guide, p, row, 1.0)
            else:
                if k + r < height:
                    _add_guide_features(feature_col, guide, p, k + r, 1.0)
                if k - r - 1 >= 0:
                    _add_guide_features(feature_col, guide, p, k - r - 1, -1.0)
            _row_box_sums(feature_col, r, acc, feature_box)
            _solve_row(feature_box, inv_ny[k], inv_nx, eps, coef_ring[k % ring_size])
            next_k += 1
        if y == 0:
            for k in range(min(r + 1, height)):
                coef_col += coef_ring[k % ring_size]
        else:
            if y + r < height:
                coef_col += coef_ring[(y + r) % ring_size]
            if y - r - 1 >= 0:
                coef_col -= coef_ring[(y - r - 1) % ring_size]
        _row_box_sums(coef_col, r, acc, coef_box)
        # q_i = mean_a_i . I_i + mean_b_i, means over the windows that contain pixel i
        for x in range(width):
            value = (
                coef_box[0, x] * guide[0, y, x]
                + coef_box[1, x] * guide[1, y, x]
                + coef_box[2, x] * guide[2, y, x]
                + coef_box[3, x]
            ) * (inv_ny[y] * inv_nx[x])
            q[y, x] = min(1.0, max(0.0, value))


def guided_filter(image: np.ndarray, alpha: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Refine a matte with He et al.'s guided filter, the colour image as guide.

    For each (2r+1)^2 window w_k clipped to the image (means divide by the number of pixels inside):
    a_k = (Sigma_k + eps U)^-1 (mean_k(I alpha) - mu_k alphabar_k), b_k = alphabar_k - a_k . mu_k,
    with Sigma_k the 3x3 colour covariance; output q_i = mean over windows containing i of (a_k . I_i + b_k).
    This is He et al. directly: unlike OpenCV-contrib's ximgproc.guidedFilter (see method notes), eps is on
    the [0,1] colour scale. O(1) per pixel in the radius.

    Args:
        image: (H,W,3) float in [0,1], RGB guide.
        alpha: (H,W) float in [0,1], matte to filter (the filtering input p).
        radius: window radius r >= 0 in pixels (r = 0 returns alpha unchanged).
        eps: regularisation > 0 on the [0,1] scale; larger means smoother (eps -> inf: plain double box mean).

    Returns:
        (H,W) float32 in [0,1].
    """
    image, alpha = _check_image_and_map(image, alpha, "guided_filter")
    if isinstance(radius, bool) or not isinstance(radius, numbers.Integral) or radius < 0:
        raise ValueError(f"guided_filter: radius must be an integer >= 0, got {radius!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 < float(eps) < np.inf):
        raise ValueError(f"guided_filter: eps must be a finite number > 0, got {eps!r}")
    height, width = alpha.shape
    # a window wider than the image covers all of it either way; capping keeps r a machine int
    radius = min(int(radius), max(height, width))
    guide = np.ascontiguousarray(image.transpose(2, 0, 1))  # planar rows keep the kernels' inner loops contiguous
    q = np.empty((height, width), np.float32)
    _guided_filter_kernel(guide, alpha, radius, float(eps), q)
    return q


# ---------------------------------------------------------------------------------------------
# implicit trimap (paper Fig. 3)
# ---------------------------------------------------------------------------------------------


def implicit_trimap(fg_prob: np.ndarray, bg_prob: np.ndarray, threshold: float = 0.95) -> np.ndarray:
    """The trimap implied by the two decoder branches (paper Sec. 3.2, Fig. 3).

    Fig. 3 marks as transition ("gray") the pixels whose foreground/background probabilities are
    "less than 1"; sigmoid outputs never reach exactly 1, so "~1" means >= threshold. The default 0.95
    is the known/transition split of the authors' code (known pixels have alpha <= 0.05 or >= 0.95,
    method notes), so a pixel is known foreground when fg_prob reaches the alpha a known pixel has.
    Both branches are trained towards 1 in the transition region (paper Eq. 6, alpha-hat), so alpha is
    bracketed by [1 - bg_prob, fg_prob] (paper Fig. 4); when both are ~1 that bracket is all of [0,1]:
    such a pixel is unknown, not foreground or background.

    Args:
        fg_prob: (H,W) float in [0,1], foreground branch probability F.
        bg_prob: (H,W) float in [0,1], background branch probability B.
        threshold: in (0,1]; probabilities >= threshold count as certain.

    Returns:
        (H,W) uint8 trimap: 255 where only fg_prob >= threshold, 0 where only bg_prob >= threshold,
        128 elsewhere (neither certain, or both certain).
    """
    fg_prob = _check_float_array(fg_prob, "fg_prob", "implicit_trimap", ndim=2)
    bg_prob = _check_float_array(bg_prob, "bg_prob", "implicit_trimap", ndim=2)
    if fg_prob.shape != bg_prob.shape:
        raise ValueError(f"implicit_trimap: fg_prob shape {fg_prob.shape} != bg_prob shape {bg_prob.shape}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not (0.0 < threshold <= 1.0):
        raise ValueError(f"implicit_trimap: threshold must be in (0,1], got {threshold!r}")
    is_fg = fg_prob >= np.float32(threshold)
    is_bg = bg_prob >= np.float32(threshold)
    trimap = np.full(fg_prob.shape, TRIMAP_UNKNOWN, np.uint8)
    trimap[is_fg & ~is_bg] = TRIMAP_FOREGROUND
    trimap[is_bg & ~is_fg] = TRIMAP_BACKGROUND
    return trimap


# ---------------------------------------------------------------------------------------------
# foreground colours
# ---------------------------------------------------------------------------------------------


def estimate_foreground(
    image: np.ndarray,
    alpha: np.ndarray,
    *,
    regularization: float = 1e-5,
    gradient_weight: float = 1.0,
    return_background: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Foreground colours F (and optionally background B) with I ~ alpha*F + (1-alpha)*B.

    Multilevel foreground estimation (Germer et al. 2020) via pymatting.estimate_foreground_ml, the
    recipe the method notes give for compositing objects that come with a photo and alpha only.
    The first call in a process compiles pymatting's numba kernels (seconds; cached on disk after).

    Args:
        image: (H,W,3) float in [0,1], the photograph.
        alpha: (H,W) float in [0,1], its matte.
        regularization: smoothness of F and B, pymatting's default 1e-5.
        gradient_weight: weight of alpha-gradient-driven smoothness, pymatting's default 1.
        return_background: also return the estimated background B.

    Returns:
        F: (H,W,3) float32 in [0,1]; with return_background, the pair (F, B), B likewise.
    """
    image, alpha = _check_image_and_map(image, alpha, "estimate_foreground")
    if not (np.isfinite(regularization) and regularization > 0):
        raise ValueError(f"estimate_foreground: regularization must be finite and > 0, got {regularization!r}")
    if not (np.isfinite(gradient_weight) and gradient_weight >= 0):
        raise ValueError(f"estimate_foreground: gradient_weight must be finite and >= 0, got {gradient_weight!r}")
    # Importing pymatting and running its parallel numba kernels reset this thread's OpenMP count.
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        from pymatting import estimate_foreground_ml  # lazy: importing pymatting compiles its kernels

        fg, bg = estimate_foreground_ml(
            image,
            alpha,
            regularization=float(regularization),
            gradient_weight=float(gradient_weight),
            return_background=True,
        )
    finally:
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    fg = np.clip(np.asarray(fg, np.float32), 0.0, 1.0)
    if not return_background:
        return fg
    return fg, np.clip(np.asarray(bg, np.float32), 0.0, 1.0)
