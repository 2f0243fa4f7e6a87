"""The scipy / numpy-FFT implementations that OpenCV replaced (issue 11), kept as slow references.

Not part of the library: tests/test_opencv_swaps.py checks each OpenCV function against its twin
here, and benchmarks/bench_opencv.py times both in one run. Each function is the code the library ran
before the swap, unchanged apart from its name. `scipy_implementations()` puts them back into the
library modules for the duration of a `with` block, so whole metrics and stages can be run "before".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
from scipy import ndimage

from fusionnet import metrics
from fusionnet.data import synthetic, trimap

_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)  # bwconncomp(..., 4)


def gaussian_gradient(image: np.ndarray, sigma: float = metrics.GRADIENT_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """(gx, gy) by four scipy.ndimage.convolve1d passes, replicate ('nearest') borders."""
    gauss, dgauss = metrics._gaussian_derivative_1d(sigma)
    gauss = gauss / np.linalg.norm(gauss)
    dgauss = dgauss / np.linalg.norm(dgauss)
    img = np.asarray(image, dtype=np.float64)
    smooth_rows = ndimage.convolve1d(img, gauss, axis=0, mode="nearest")
    smooth_cols = ndimage.convolve1d(img, gauss, axis=1, mode="nearest")
    gx = ndimage.convolve1d(smooth_rows, dgauss, axis=1, mode="nearest")
    gy = ndimage.convolve1d(smooth_cols, dgauss, axis=0, mode="nearest")
    return gx, gy


def largest_component(binary: np.ndarray) -> np.ndarray:
    """Largest 4-connected True component by scipy.ndimage.label; ties to the first in column-major order."""
    labels, count = ndimage.label(binary, structure=_FOUR_CONNECTED)
    if count == 0:
        return np.zeros(binary.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    best = np.flatnonzero(sizes == sizes.max()) + 1
    if best.size == 1:
        return labels == best[0]
    rows, cols = np.nonzero(np.isin(labels, best))
    first = int(np.argmin(cols * binary.shape[0] + rows))
    return labels == labels[rows[first], cols[first]]


def transition_band(alpha: object, radius: int = 25) -> np.ndarray:
    """0 < alpha < 1 dilated by a Euclidean disk, by scipy.ndimage.distance_transform_edt (float64)."""
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"transition_band: radius must be an int >= 0 (pixels), got {radius!r}; the paper uses 25.")
    alpha_arr = metrics._as_alpha("transition_band", "alpha", alpha)
    core = (alpha_arr > 0.0) & (alpha_arr < 1.0)
    if radius == 0 or not core.any():
        return core
    return ndimage.distance_transform_edt(~core) <= radius


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter (truncate 4, 'reflect' border), float32 in, float32 out."""
    return ndimage.gaussian_filter(image, sigma=sigma)


def convolve_same(image: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """'Same' 2-D convolution by numpy FFT (zero padding), channel by channel for (H,W,C)."""
    image = np.asarray(image)
    if image.ndim == 3:
        return np.stack([convolve_same(image[..., c], psf) for c in range(image.shape[2])], axis=-1)
    (height, width), (kh, kw) = image.shape, psf.shape
    shape = (height + kh - 1, width + kw - 1)
    full = np.fft.irfft2(np.fft.rfft2(image, shape) * np.fft.rfft2(psf, shape), shape)
    top, left = (kh - 1) // 2, (kw - 1) // 2
    return full[top:top + height, left:left + width]


@contextlib.contextmanager
def scipy_implementations() -> Iterator[None]:
    """Run the library with the pre-OpenCV functions inside the block (module attributes patched)."""
    patches = [(metrics, "gaussian_gradient", gaussian_gradient), (metrics, "_largest_component", largest_component),
               (metrics, "transition_band", transition_band), (trimap, "transition_band", transition_band),
               (synthetic, "_gaussian_blur", gaussian_blur), (synthetic, "_convolve_same", convolve_same)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, replacement in patches:
            setattr(module, name, replacement)
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)

