"""Matting evaluation metrics: SAD, MSE, Gradient and Connectivity (paper Sec. 4, "Evaluation metrics").

The paper takes its metrics from Deep Image Matting (Xu et al. 2017, its ref. [39]) and Rhemann et al.
2009 (its ref. [27]). These functions reproduce DIM's reference MATLAB evaluation code
(compute_sad_loss.m, compute_mse_loss.m, compute_gradient_loss.m with gaussgradient.m,
compute_connectivity_error.m), not the popular Python ports, which differ in three known ways:
one takes the background label as the "largest component" in Connectivity, one divides by 255
instead of min-max rescaling in Gradient, several sum over the whole image instead of the mask.

Every metric takes `pred`, `gt`: (H,W) float in [0,1], and `mask`: (H,W) bool of the pixels that
count (None = whole image, the paper's "-full"; `unknown_mask(trimap)` = DIM's trimap == 128;
`transition_band(gt)` = the paper's "-25"). Results are per image in the paper's table units
(SAD, Gradient and Connectivity divided by 1000); average them over images afterwards.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = [
    "GRADIENT_SIGMA",
    "connectivity_error",
    "dgaussian_kernel",
    "gaussian_gradient",
    "gradient_error",
    "mse",
    "sad",
    "transition_band",
    "unknown_mask",
]

GRADIENT_SIGMA = 1.4  # DIM's compute_gradient_loss.m
_RANGE_TOL = 1e-6  # float noise allowed outside [0, 1] before an input counts as out of range
_PHI_THRESHOLD = np.float32(0.15)  # Rhemann et al.: distances below 0.15 count as fully connected
_SCALE = 1000.0  # the paper's tables report SAD, Gradient, Connectivity in thousands

# Evaluation scores images in worker processes next to a torch process: OpenCV's own thread pool would
# oversubscribe the cores (and does not survive fork), so it runs in the calling thread, as in data.crops.
cv2.setNumThreads(1)


# ----------------------------------------------------------------------------- input checks


def _as_alpha(fn: str, name: str, value: object) -> np.ndarray:
    """Check one matte and return it as (H,W) float64 in [0,1] (tiny overshoot clipped)."""
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{fn}: {name} has integer dtype {arr.dtype}; the metrics take float alpha in [0, 1]. "
            f"Convert an 8-bit matte with {name}.astype(np.float64) / 255."
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{fn}: {name} has dtype {arr.dtype}; pass a real float array in [0, 1].")
    if arr.ndim != 2:
        raise ValueError(
            f"{fn}: {name} must be a single-channel (H,W) matte, got shape {arr.shape}; "
            f"pass one channel, e.g. {name}[..., 0] or {name}[0, 0] for an (N,1,H,W) batch."
        )
    if arr.size == 0:
        raise ValueError(f"{fn}: {name} is empty (shape {arr.shape}); pass a non-empty matte.")
    finite = np.isfinite(arr)
    if not finite.all():
        raise ValueError(
            f"{fn}: {name} has {int(arr.size - finite.sum())} NaN/inf values; fix the prediction "
            f"(e.g. np.nan_to_num({name}, nan=0.0)) before evaluating."
        )
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
        raise ValueError(
            f"{fn}: {name} has values in [{lo:.6g}, {hi:.6g}], outside [0, 1]; divide an 8-bit "
            f"matte by 255, or clip a prediction with np.clip({name}, 0, 1)."
        )
    return np.clip(arr.astype(np.float64, copy=False), 0.0, 1.0)


def _check_inputs(
    fn: str, pred: object, gt: object, mask: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate a (pred, gt, mask) triple; returns float64 mattes and a bool mask or None."""
    pred_arr = _as_alpha(fn, "pred", pred)
    gt_arr = _as_alpha(fn, "gt", gt)
    if pred_arr.shape != gt_arr.shape:
        raise ValueError(
            f"{fn}: pred shape {pred_arr.shape} != gt shape {gt_arr.shape}; resize or crop the "
            f"prediction to the ground truth's size before evaluating."
        )
    if mask is None:
        return pred_arr, gt_arr, None
    mask_arr = np.asarray(mask)
    if mask_arr.dtype != np.bool_:
        raise ValueError(
            f"{fn}: mask has dtype {mask_arr.dtype}; pass a bool (H,W) mask, e.g. "
            f"unknown_mask(trimap) (trimap == 128) or transition_band(gt)."
        )
    if mask_arr.shape != gt_arr.shape:
        raise ValueError(
            f"{fn}: mask shape {mask_arr.shape} != matte shape {gt_arr.shape}; "
            f"build the mask from the same image's trimap or ground truth."
        )
    return pred_arr, gt_arr, mask_arr


def _masked_sum(error_map: np.ndarray, mask: np.ndarray | None) -> float:
    """Sum of an (H,W) error map over the mask (None = all pixels), accumulated in float64."""
    if mask is None:
        return float(error_map.sum(dtype=np.float64))
    return float(error_map[mask].sum(dtype=np.float64))


# ----------------------------------------------------------------------------- SAD and MSE


def sad(pred: object, gt: object, mask: object = None) -> float:
    """Sum of absolute differences over the mask, divided by 1000 (DIM compute_sad_loss.m).

    pred, gt: (H,W) float in [0,1]; mask: (H,W) bool or None (whole image). Returns >= 0.
    """
    pred_arr, gt_arr, mask_arr = _check_inputs("sad", pred, gt, mask)
    return _masked_sum(np.abs(pred_arr - gt_arr), mask_arr) / _SCALE


def mse(pred: object, gt: object, mask: object = None) -> float:
    """Mean squared error over the mask: sum of (pred - gt)^2 / number of mask pixels.

    pred, gt: (H,W) float in [0,1]; mask: (H,W) bool or None (whole image). Returns a value in
    [0, 1]; NaN when the mask selects no pixel (MATLAB's 0/0 in compute_mse_loss.m), so average
    over images with np.nanmean or drop such images explicitly.
    """
    pred_arr, gt_arr, mask_arr = _check_inputs("mse", pred, gt, mask)
    count = pred_arr.size if mask_arr is None else int(mask_arr.sum())
    if count == 0:
        return math.nan
    return _masked_sum((pred_arr - gt_arr) ** 2, mask_arr) / count


# ----------------------------------------------------------------------------- Gradient


def _gaussian_derivative_1d(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Sampled gauss(u) and dgauss(u) = -u gauss(u) / sigma^2 on u = -h..h (gaussgradient.m).

    Half-size h = ceil(sigma sqrt(-2 ln(sqrt(2 pi) sigma 0.01))), i.e. 4 for sigma 1.4.
    """
    half = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * 1e-2)))
    u = np.arange(-half, half + 1, dtype=np.float64)
    gauss = np.exp(-(u**2) / (2.0 * sigma**2)) / (sigma * math.sqrt(2.0 * math.pi))
    dgauss = -u * gauss / sigma**2
    return gauss, dgauss


def dgaussian_kernel(sigma: float = GRADIENT_SIGMA) -> np.ndarray:
    """The 2-D x-derivative-of-Gaussian kernel hx of gaussgradient.m, unit L2 norm.

    hx[i, j] = gauss(i - h) * dgauss(j - h): Gaussian along rows, derivative along columns.
    Returns (2h+1, 2h+1) float64 (9x9 for sigma 1.4); the y kernel is hx.T.
    """
    gauss, dgauss = _gaussian_derivative_1d(sigma)
    hx = np.outer(gauss, dgauss)
    return hx / np.sqrt(np.sum(hx * hx))


def gaussian_gradient(image: np.ndarray, sigma: float = GRADIENT_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """Derivative-of-Gaussian gradients (gx, gy) of an (H,W) float image, as gaussgradient.m.

    MATLAB runs imfilter(IM, hx, 'replicate', 'conv'): a true convolution with replicated
    borders, so gx > 0 where the image increases along columns. hx is an outer product, so it is
    applied as two 1-D filters in one cv2.sepFilter2D (identical result, replicate padding is
    separable too); ||outer(g, dg)|| = ||g|| ||dg||, so normalising each 1-D kernel normalises hx.
    Returns two (H,W) float64 arrays.
    """
    gauss, dgauss = _gaussian_derivative_1d(sigma)
    gauss = gauss / np.linalg.norm(gauss)
    dgauss_flipped = np.ascontiguousarray(dgauss[::-1] / np.linalg.norm(dgauss))  # OpenCV correlates
    img = np.ascontiguousarray(image, dtype=np.float64)
    gx = cv2.sepFilter2D(img, cv2.CV_64F, dgauss_flipped, gauss, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.sepFilter2D(img, cv2.CV_64F, gauss, dgauss_flipped, borderType=cv2.BORDER_REPLICATE)
    return gx, gy


def _rescale_min_max(alpha: np.ndarray) -> np.ndarray:
    """MATLAB mat2gray: (alpha - min) / (max - min); a constant matte is returned unchanged.

    mat2gray leaves a constant image as is; its gradient is zero either way.
    """
    lo, hi = float(alpha.min()), float(alpha.max())
    if hi <= lo:
        return alpha
    return (alpha - lo) / (hi - lo)


def gradient_error(pred: object, gt: object, mask: object = None) -> float:
    """Gradient error (DIM compute_gradient_loss.m), divided by 1000.

    Each matte is min-max rescaled on its own (mat2gray), differentiated with derivative-of-
    Gaussian filters (sigma 1.4, replicate borders), and the error is the sum over the mask of
    (|grad pred| - |grad gt|)^2. pred, gt: (H,W) float in [0,1]; mask: (H,W) bool or None.
    Invariant to affine rescaling of either matte (a * pred + b, a != 0). Returns >= 0.
    """
    pred_arr, gt_arr, mask_arr = _check_inputs("gradient_error", pred, gt, mask)
    pred_gx, pred_gy = gaussian_gradient(_rescale_min_max(pred_arr))
    gt_gx, gt_gy = gaussian_gradient(_rescale_min_max(gt_arr))
    pred_amp = np.sqrt(pred_gx**2 + pred_gy**2)
    gt_amp = np.sqrt(gt_gx**2 + gt_gy**2)
    return _masked_sum((pred_amp - gt_amp) ** 2, mask_arr) / _SCALE


# ----------------------------------------------------------------------------- Connectivity


def _thresholds(step: float) -> np.ndarray:
    """MATLAB 0:step:1 as float32 (the reference compares single-precision alpha to them)."""
    count = int(math.floor(1.0 / step + 1e-9))
    return np.round(np.arange(count + 1) * step, 12).astype(np.float32)


def _largest_component(binary: np.ndarray) -> np.ndarray:
    """(H,W) bool: the largest 4-connected True component (all False when there is none).

    The background label 0 is never a candidate (the port bug). Ties go to the component whose
    first pixel comes first in column-major order, as MATLAB's max over bwconncomp's list does.
    """
    binary = np.ascontiguousarray(binary, dtype=bool)
    count, labels = cv2.connectedComponents(binary.view(np.uint8), connectivity=4,
                                            ltype=cv2.CV_32S)  # bwconncomp(..., 4); count includes label 0
    if count == 1:
        return np.zeros(binary.shape, dtype=bool)
    # component sizes from the True pixels only: no int64 copy of the whole label image
    sizes = np.bincount(labels[binary], minlength=count)[1:]
    best = np.flatnonzero(sizes == sizes.max()) + 1
    if best.size == 1:
        return labels == best[0]
    rows, cols = np.nonzero(np.isin(labels, best))
    first = int(np.argmin(cols * binary.shape[0] + rows))
    return labels == labels[rows[first], cols[first]]


def connectivity_error(pred: object, gt: object, mask: object = None, step: float = 0.1) -> float:
    """Connectivity error (DIM compute_connectivity_error.m, Rhemann et al. 2009), / 1000.

    For thresholds t = step, 2 step, ..., 1: omega_t = largest 4-connected component of
    (pred >= t) & (gt >= t) over the whole image (the mask only selects the pixels summed).
    A pixel's level l is the threshold before the first t whose omega_t excludes it (1 if none);
    d = alpha - l; phi = 1 - d * (d >= 0.15); error = sum over the mask of |phi_pred - phi_gt|.

    Computed in float32 like the reference (MATLAB single): so alpha = k/255 on the 8-bit grid
    meets the thresholds 0.2, 0.4, ... exactly. When the intersection is empty at some t (e.g. a
    prediction that never reaches 1), every pixel still in omega leaves there; the MATLAB line
    would fail on that case, and DIM's evaluation never hits it because its predictions take
    the trimap's known values. pred, gt: (H,W) float in [0,1]; mask: (H,W) bool or None;
    step in (0, 1]. Returns >= 0.
    """
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step <= 1.0:
        raise ValueError(f"connectivity_error: step must be a number in (0, 1], got {step!r}; the paper uses 0.1.")
    pred_arr, gt_arr, mask_arr = _check_inputs("connectivity_error", pred, gt, mask)
    pred32 = pred_arr.astype(np.float32)
    gt32 = gt_arr.astype(np.float32)
    thresholds = _thresholds(float(step))
    both = np.minimum(pred32, gt32)  # (pred >= t) & (gt >= t) is min(pred, gt) >= t, one pass per t
    level = np.ones(gt32.shape, dtype=np.float32)
    unassigned = np.ones(gt32.shape, dtype=bool)
    for previous, threshold in zip(thresholds[:-1], thresholds[1:]):
        omega = _largest_component(both >= threshold)
        level[unassigned & ~omega] = previous  # round_down_map: last threshold still inside
        unassigned &= omega
        if not unassigned.any():
            break
    pred_d = pred32 - level
    gt_d = gt32 - level
    pred_phi = 1.0 - pred_d * (pred_d >= _PHI_THRESHOLD)
    gt_phi = 1.0 - gt_d * (gt_d >= _PHI_THRESHOLD)
    return _masked_sum(np.abs(pred_phi - gt_phi), mask_arr) / _SCALE


# ----------------------------------------------------------------------------- masks


def unknown_mask(trimap: object) -> np.ndarray:
    """DIM's evaluation region: trimap == 128. trimap: (H,W) integer (0/128/255). Returns (H,W) bool."""
    arr = np.asarray(trimap)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"unknown_mask: trimap has dtype {arr.dtype}; pass the 8-bit trimap (0 = background, "
            f"128 = unknown, 255 = foreground), e.g. np.asarray(Image.open(path).convert('L'))."
        )
    if arr.ndim != 2:
        raise ValueError(
            f"unknown_mask: trimap must be (H,W), got shape {arr.shape}; pass one channel, e.g. trimap[..., 0]."
        )
    return arr == 128


def transition_band(alpha: object, radius: int = 25) -> np.ndarray:
    """The paper's "-25" region: pixels with 0 < alpha < 1, dilated by a disk of `radius` pixels.

    The transition pixels are taken exactly (0 < alpha < 1, no tolerance): on the 8-bit grid
    (alpha = k/255) that is 1 <= k <= 254. The dilation uses a Euclidean disk (every pixel within
    distance <= radius of a transition pixel), the isotropic reading of "25 pixels dilation";
    DIM-style trimap generators use OpenCV elliptic kernels (close to this disk) or squares
    (larger bands, reaching radius * sqrt(2) along diagonals). Computed with OpenCV's exact Euclidean
    distance transform (cv2.DIST_MASK_PRECISE, Felzenszwalb's algorithm, float32 distances).
    alpha: (H,W) float in [0,1]; radius: int >= 0 (0 = the transition pixels alone).
    Returns (H,W) bool; all False when alpha has no transition pixel.
    """
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"transition_band: radius must be an int >= 0 (pixels), got {radius!r}; the paper uses 25.")
    alpha_arr = _as_alpha("transition_band", "alpha", alpha)
    core = (alpha_arr > 0.0) & (alpha_arr < 1.0)
    if radius == 0 or not core.any():
        return core
    # distance of each pixel to the nearest transition pixel; <= radius is a disk dilation
    distance = cv2.distanceTransform(np.ascontiguousarray(~core, dtype=np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # squared distances are integers, so d^2 <= r^2 is d < sqrt(r^2 + 0.5): safe from float32 rounding
    return distance < math.sqrt(radius * radius + 0.5)
