"""Tests for fusionnet.metrics: each fast metric against a slow reference written from its definition.

The references follow DIM's MATLAB evaluation code: explicit per-pixel convolution with replicate
padding for Gradient, breadth-first flood fill in MATLAB's column-major scan order and exact rational
arithmetic on the 8-bit grid for Connectivity.
"""

from __future__ import annotations

import math
from collections import deque
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage

from fusionnet.metrics import (
    connectivity_error,
    dgaussian_kernel,
    gaussian_gradient,
    gradient_error,
    mse,
    sad,
    transition_band,
    unknown_mask,
)
from tests.support.helpers import ALPHAMATTING, require_shared_data


# ----------------------------------------------------------------------------- slow references


def _ref_kernel(sigma: float) -> np.ndarray:
    """gaussgradient.m's hx, built with its double loop: hx(i,j) = gauss(u1) * dgauss(u2)."""
    half = math.ceil(sigma * math.sqrt(-2 * math.log(math.sqrt(2 * math.pi) * sigma * 0.01)))
    size = 2 * half + 1
    hx = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            u1, u2 = i - half, j - half
            gauss = math.exp(-(u1**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
            gauss2 = math.exp(-(u2**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
            hx[i, j] = gauss * (-u2 * gauss2 / sigma**2)
    norm = math.sqrt(sum(v * v for v in hx.ravel()))
    return hx / norm


def _ref_conv_replicate(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """imfilter(image, kernel, 'replicate', 'conv'), one output pixel at a time."""
    half = kernel.shape[0] // 2
    height, width = image.shape
    flipped = kernel[::-1, ::-1]  # convolution = correlation with the flipped kernel
    out = np.zeros_like(image, dtype=np.float64)
    for r in range(height):
        for c in range(width):
            total = 0.0
            for i in range(-half, half + 1):
                for j in range(-half, half + 1):
                    rr = min(max(r + i, 0), height - 1)  # replicate border
                    cc = min(max(c + j, 0), width - 1)
                    total += flipped[i + half, j + half] * image[rr, cc]
            out[r, c] = total
    return out


def _ref_gradient_error(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None) -> float:
    def mat2gray(a: np.ndarray) -> np.ndarray:
        lo, hi = a.min(), a.max()
        return a.astype(np.float64) if hi == lo else (a - lo) / (hi - lo)

    hx = _ref_kernel(1.4)
    total = 0.0
    amps = []
    for matte in (pred, gt):
        m = mat2gray(matte)
        gx = _ref_conv_replicate(m, hx)
        gy = _ref_conv_replicate(m, hx.T)
        amps.append(np.sqrt(gx**2 + gy**2))
    for r in range(gt.shape[0]):
        for c in range(gt.shape[1]):
            if mask is None or mask[r, c]:
                total += (amps[0][r, c] - amps[1][r, c]) ** 2
    return total / 1000


def _ref_components(binary: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components by BFS, discovered in MATLAB's column-major scan order."""
    height, width = binary.shape
    seen = np.zeros_like(binary, dtype=bool)
    comps = []
    for c in range(width):
        for r in range(height):
            if not binary[r, c] or seen[r, c]:
                continue
            comp, queue = [], deque([(r, c)])
            seen[r, c] = True
            while queue:
                y, x = queue.popleft()
                comp.append((y, x))
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < height and 0 <= nx < width and binary[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            comps.append(comp)
    return comps


def _ref_connectivity(
    pred_k: np.ndarray, gt_k: np.ndarray, mask: np.ndarray | None, step: Fraction, port_bug: bool = False
) -> float:
    """compute_connectivity_error.m in exact arithmetic; mattes are given as k/255 (or any Fraction).

    port_bug=True reproduces the known Python-port bug: the background label competes for "largest".
    """
    to_frac = (lambda v: v) if pred_k.dtype == object else (lambda v: Fraction(int(v), 255))
    pred = [[to_frac(v) for v in row] for row in pred_k]
    gt = [[to_frac(v) for v in row] for row in gt_k]
    height, width = pred_k.shape
    steps = [k * step for k in range(int(1 / step) + 1)]
    level = [[None] * width for _ in range(height)]
    for prev, t in zip(steps[:-1], steps[1:]):
        inter = np.array([[pred[r][c] >= t and gt[r][c] >= t for c in range(width)] for r in range(height)])
        comps = _ref_components(inter)
        if port_bug:
            background = [(r, c) for r in range(height) for c in range(width) if not inter[r, c]]
            comps = [background] + comps  # label 0 first, as np.bincount(labels) sees it
        omega = set(max(comps, key=len)) if comps else set()  # max keeps the first of equal sizes
        for r in range(height):
            for c in range(width):
                if level[r][c] is None and (r, c) not in omega:
                    level[r][c] = prev
    total = Fraction(0)
    for r in range(height):
        for c in range(width):
            if mask is not None and not mask[r, c]:
                continue
            lvl = Fraction(1) if level[r][c] is None else level[r][c]
            phis = []
            for alpha in (pred[r][c], gt[r][c]):
                d = alpha - lvl
                phis.append(1 - d if d >= Fraction(15, 100) else Fraction(1))
            total += abs(phis[0] - phis[1])
    return float(total) / 1000


def _soft_matte_pair(seed: int, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Random soft mattes on the 8-bit grid, as uint8 codes k (alpha = k/255)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((size, size)), 2.0)
    gt = np.clip((field - field.mean()) * 12 + 0.5, 0, 1)
    if seed % 3 == 2:
        gt = rng.random((size, size)) ** 0.5  # iid noise: many tiny components and size ties
    pred = np.clip(gt + rng.normal(0, 0.15, gt.shape), 0, 1)
    if seed % 2 == 1:
        pred *= 0.85  # never reaches 1: the intersection empties before the last threshold
    return np.round(gt * 255).astype(np.uint8), np.round(pred * 255).astype(np.uint8)


def _random_mask(seed: int, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed + 100).random(shape) < 0.6


# ----------------------------------------------------------------------------- SAD and MSE


def test_sad_and_mse_hand_computed():
    gt = np.zeros((4, 4))
    pred = gt.copy()
    pred[0, :] = 0.25  # four pixels off by 0.25
    assert sad(pred, gt) == pytest.approx(1.0 / 1000)
    assert mse(pred, gt) == pytest.approx(4 * 0.0625 / 16)
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :2] = True  # two wrong pixels
    mask[3, :2] = True  # two right pixels
    assert sad(pred, gt, mask) == pytest.approx(0.5 / 1000)
    assert mse(pred, gt, mask) == pytest.approx(2 * 0.0625 / 4)


def test_empty_mask_sad_zero_mse_nan():
    gt = np.zeros((3, 3))
    pred = np.ones((3, 3))
    empty = np.zeros((3, 3), dtype=bool)
    assert sad(pred, gt, empty) == 0.0
    assert math.isnan(mse(pred, gt, empty))
    assert gradient_error(pred, gt, empty) == 0.0
    assert connectivity_error(pred, gt, empty) == 0.0


@pytest.mark.parametrize("metric", [sad, mse, gradient_error, connectivity_error])
def test_mask_none_equals_all_true(metric):
    gt_k, pred_k = _soft_matte_pair(4)
    gt, pred = gt_k / 255.0, pred_k / 255.0
    full = metric(pred, gt, None)
    assert full > 0
    assert metric(pred, gt, np.ones(gt.shape, dtype=bool)) == pytest.approx(full, rel=1e-12)
    assert metric(gt, gt) == 0.0


# ----------------------------------------------------------------------------- Gradient


def test_kernel_matches_reference_loop_construction():
    hx = dgaussian_kernel(1.4)
    assert hx.shape == (9, 9)  # half-size ceil(1.4 * sqrt(-2 ln(sqrt(2 pi) 1.4 0.01))) = 4
    np.testing.assert_allclose(hx, _ref_kernel(1.4), rtol=1e-12, atol=1e-15)
    assert np.sum(hx**2) == pytest.approx(1.0)
    np.testing.assert_allclose(dgaussian_kernel(0.8), _ref_kernel(0.8), rtol=1e-12, atol=1e-15)


def test_gaussian_gradient_sign_and_direction_on_ramp():
    ramp = np.tile(np.linspace(0, 1, 20), (12, 1))  # increases along columns only
    gx, gy = gaussian_gradient(ramp)
    assert np.all(gx[:, 5:15] > 0)  # MATLAB 'conv': positive along increasing x
    np.testing.assert_allclose(gy, 0, atol=1e-12)
    gx_t, gy_t = gaussian_gradient(ramp.T)
    np.testing.assert_allclose(gy_t, gx.T, atol=1e-12)
    np.testing.assert_allclose(gx_t, 0, atol=1e-12)


def test_gaussian_gradient_matches_per_pixel_convolution():
    rng = np.random.default_rng(7)
    image = rng.random((11, 13))
    gx, gy = gaussian_gradient(image)
    hx = _ref_kernel(1.4)
    np.testing.assert_allclose(gx, _ref_conv_replicate(image, hx), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gy, _ref_conv_replicate(image, hx.T), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_gradient_error_matches_reference(seed, masked):
    gt_k, pred_k = _soft_matte_pair(seed, size=16)
    gt, pred = gt_k / 255.0, pred_k / 255.0
    mask = _random_mask(seed, gt.shape) if masked else None
    expected = _ref_gradient_error(pred, gt, mask)
    assert expected > 0
    assert gradient_error(pred, gt, mask) == pytest.approx(expected, rel=1e-9)


def test_gradient_error_min_max_rescales_each_matte():
    gt_k, pred_k = _soft_matte_pair(0)
    gt, pred = gt_k / 255.0, pred_k / 255.0
    rescaled = (pred - pred.min()) / (pred.max() - pred.min())
    reference = gradient_error(rescaled, gt)
    assert reference > 0
    assert gradient_error(0.5 * pred, gt) == pytest.approx(reference, rel=1e-9)
    assert gradient_error(0.3 * pred + 0.6, gt) == pytest.approx(reference, rel=1e-9)
    # a matte and its dimmed copy have identical gradients after rescaling (dividing by 255 would not)
    assert gradient_error(0.5 * gt, gt) == pytest.approx(0.0, abs=1e-15)


def test_gradient_error_constant_mattes():
    const_a = np.full((10, 10), 0.3)
    const_b = np.full((10, 10), 0.8)
    # mat2gray leaves constants; no gradient (OpenCV's filter sums +-u taps in SIMD order: ~1e-17 residue)
    assert gradient_error(const_a, const_b) == pytest.approx(0.0, abs=1e-30)
    edge = np.zeros((10, 10))
    edge[:, 5:] = 1.0
    assert gradient_error(const_a, edge) > 0


# ----------------------------------------------------------------------------- Connectivity


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("step", [Fraction(1, 10), Fraction(1, 5)])
def test_connectivity_matches_reference(seed, step):
    gt_k, pred_k = _soft_matte_pair(seed)
    mask = _random_mask(seed, gt_k.shape) if seed % 2 else None
    expected = _ref_connectivity(pred_k, gt_k, mask, step)
    assert expected > 0
    got = connectivity_error(pred_k / 255.0, gt_k / 255.0, mask, step=float(step))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_connectivity_picks_foreground_component_not_background():
    # 3x8 image: a 2x2 opaque block and one soft pixel p next to it; background is the largest region
    gt = np.zeros((3, 8))
    gt[0:2, 0:2] = 1.0
    pred = gt.copy()
    gt[0, 2], pred[0, 2] = 0.6, 0.25
    # p is in the block's component for t <= 0.2, so l = 0.2: phi_gt = 1 - 0.4, phi_pred = 1 (d = 0.05)
    expected = 0.4 / 1000
    got = connectivity_error(pred, gt)
    assert got == pytest.approx(expected, rel=1e-5)
    def exact(a: np.ndarray) -> np.ndarray:
        return np.array([[Fraction(v).limit_denominator(100) for v in row] for row in a], dtype=object)

    assert _ref_connectivity(exact(pred), exact(gt), None, Fraction(1, 10)) == pytest.approx(expected)
    buggy = _ref_connectivity(exact(pred), exact(gt), None, Fraction(1, 10), port_bug=True)
    assert buggy == pytest.approx(0.35 / 1000)  # the port bug gives a different answer here
    assert abs(got - buggy) > 1e-5


def test_connectivity_tie_goes_to_first_component_in_column_major_order():
    # two 2-pixel components of equal size at every threshold: A at top-right, B at bottom-left
    gt = np.zeros((5, 5))
    pred = np.zeros((5, 5))
    gt[0, 3:5], pred[0, 3:5] = 1.0, 0.9  # A: first in row-major order
    gt[4, 0:2], pred[4, 0:2] = 0.9, 0.9  # B: first in column-major order (MATLAB's choice)
    # omega = B, so A leaves at t = 0.1 (l = 0): phi_gt = 0, phi_pred = 0.1, for 2 pixels
    assert connectivity_error(pred, gt) == pytest.approx(0.2 / 1000, rel=1e-5)
    # picking A instead would give 0 (A's d = 0.1 < 0.15); transposing swaps which one comes first
    assert connectivity_error(pred.T, gt.T) == pytest.approx(0.0, abs=1e-12)


def test_connectivity_distance_of_exactly_015_counts():
    # step 0.25: pixel b is in omega at t = 0.25 only, so l = 0.25; gt's d = 0.4 - 0.25 = 0.15 exactly
    gt = np.array([[1.0, 0.4]])
    pred = np.array([[1.0, 0.3]])
    assert connectivity_error(pred, gt, step=0.25) == pytest.approx(0.15 / 1000, rel=1e-5)
    assert connectivity_error(gt, pred, step=0.25) == pytest.approx(0.15 / 1000, rel=1e-5)
    gt_exact = np.array([[Fraction(1), Fraction(2, 5)]], dtype=object)
    pred_exact = np.array([[Fraction(1), Fraction(3, 10)]], dtype=object)
    assert _ref_connectivity(pred_exact, gt_exact, None, Fraction(1, 4)) == pytest.approx(0.15 / 1000)


def test_connectivity_identical_binary_and_step_validation():
    gt = np.zeros((6, 6))
    gt[2:4, 2:4] = 1.0
    assert connectivity_error(gt, gt) == 0.0
    for bad in (0.0, -0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="step must be a number in"):
            connectivity_error(gt, gt, step=bad)


# ----------------------------------------------------------------------------- masks


def test_unknown_mask():
    trimap = np.array([[0, 128, 255], [128, 127, 129]], dtype=np.uint8)
    np.testing.assert_array_equal(unknown_mask(trimap), [[False, True, False], [True, False, False]])
    with pytest.raises(ValueError, match="8-bit trimap"):
        unknown_mask(trimap / 255.0)
    with pytest.raises(ValueError, match=r"trimap\[\.\.\., 0\]"):
        unknown_mask(np.zeros((2, 2, 3), dtype=np.uint8))


def _ref_transition_band(alpha: np.ndarray, radius: int) -> np.ndarray:
    height, width = alpha.shape
    core = [(r, c) for r in range(height) for c in range(width) if 0 < alpha[r, c] < 1]
    band = np.zeros((height, width), dtype=bool)
    for r in range(height):
        for c in range(width):
            band[r, c] = any((r - y) ** 2 + (c - x) ** 2 <= radius**2 for y, x in core)
    return band


@pytest.mark.parametrize("radius", [0, 1, 3, 5])
def test_transition_band_matches_disk_dilation(radius):
    rng = np.random.default_rng(radius)
    alpha = (rng.random((20, 22)) < 0.5).astype(np.float64)
    alpha[rng.random(alpha.shape) < 0.02] = 128 / 255
    alpha[0, 0] = 1 / 255  # smallest transition value on the 8-bit grid
    alpha[19, 21] = 254 / 255
    band = transition_band(alpha, radius)
    assert band.dtype == np.bool_
    np.testing.assert_array_equal(band, _ref_transition_band(alpha, radius))


def test_transition_band_edge_cases():
    binary = np.zeros((8, 8))
    binary[:, 4:] = 1.0
    assert not transition_band(binary).any()  # no 0 < alpha < 1 pixel
    single = np.zeros((41, 41))
    single[20, 20] = 0.5
    band = transition_band(single, radius=5)
    assert band.sum() == 81  # lattice points in a disk of radius 5 (a square would have 121)
    assert band[20, 25] and band[23, 24] and not band[24, 24]
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="radius must be an int"):
            transition_band(single, bad)


# ----------------------------------------------------------------------------- bad inputs

_GOOD = np.full((4, 4), 0.5)


@pytest.mark.parametrize("metric", [sad, mse, gradient_error, connectivity_error])
@pytest.mark.parametrize(
    ("pred", "gt", "mask", "match"),
    [
        (np.full((4, 4), 128, dtype=np.uint8), _GOOD, None, r"integer dtype uint8.*/ 255"),
        (_GOOD, _GOOD.astype(bool), None, "integer dtype bool"),
        (np.full((4, 5), 0.5), _GOOD, None, r"pred shape \(4, 5\) != gt shape \(4, 4\)"),
        (np.full((4, 4, 3), 0.5), _GOOD, None, r"single-channel \(H,W\).*pred\[\.\.\., 0\]"),
        (np.full((0, 4), 0.5), np.full((0, 4), 0.5), None, "empty"),
        (np.where(np.eye(4) > 0, np.nan, 0.5), _GOOD, None, "pred has 4 NaN/inf values"),
        (_GOOD, np.full((4, 4), 255.0), None, r"outside \[0, 1\]; divide an 8-bit"),
        (np.full((4, 4), -0.01), _GOOD, None, r"outside \[0, 1\]"),
        (_GOOD, _GOOD, np.ones((4, 4), dtype=np.uint8), "mask has dtype uint8.*unknown_mask"),
        (_GOOD, _GOOD, np.ones((3, 4), dtype=bool), r"mask shape \(3, 4\)"),
        (np.full((4, 4), "a"), _GOOD, None, "dtype <U1"),
    ],
)
def test_bad_inputs_raise_clear_errors(metric, pred, gt, mask, match):
    with pytest.raises(ValueError, match=match):
        metric(pred, gt, mask)


def test_tiny_float_overshoot_is_accepted():
    pred = np.full((4, 4), 1.0 + 1e-9)
    pred[0, 0] = -1e-9
    assert sad(pred, np.ones((4, 4))) == pytest.approx(1.0 / 1000)  # clipped to [0, 1] first
    assert transition_band(pred, radius=0).sum() == 0  # 1 + 1e-9 is opaque, not transition


# ----------------------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_real_alpha_sanity_and_fast_matches_slow_on_patch():
    require_shared_data(ALPHAMATTING)
    from PIL import Image

    gt_k = np.asarray(Image.open(ALPHAMATTING / "alpha" / "GT01.png").convert("L"))
    trimap = np.asarray(Image.open(ALPHAMATTING / "trimap1" / "GT01.png").convert("L"))
    gt = gt_k / 255.0
    unknown = unknown_mask(trimap)
    assert unknown.any()
    blurred_k = np.round(ndimage.gaussian_filter(gt, 3.0) * 255).astype(np.uint8)
    blurred = blurred_k / 255.0
    for mask in (None, unknown, transition_band(gt)):
        for metric in (sad, mse, gradient_error, connectivity_error):
            assert metric(gt, gt, mask) == 0.0
            assert metric(blurred, gt, mask) > 0
    # 64x64 patch centred on the unknown region, where the slow references are affordable
    rows, cols = np.nonzero(unknown)
    middle = len(rows) // 2  # an unknown pixel in the middle of the scan order
    r0 = int(np.clip(rows[middle] - 32, 0, gt.shape[0] - 64))
    c0 = int(np.clip(cols[middle] - 32, 0, gt.shape[1] - 64))
    window = np.s_[r0 : r0 + 64, c0 : c0 + 64]
    gt_p, pred_p, mask_p = gt_k[window], blurred_k[window], unknown[window]
    assert mask_p.any() and 0 < gt_p.mean() < 255
    expected = _ref_connectivity(pred_p, gt_p, mask_p, Fraction(1, 10))
    assert connectivity_error(pred_p / 255.0, gt_p / 255.0, mask_p) == pytest.approx(expected, rel=1e-5)
    expected = _ref_gradient_error(pred_p / 255.0, gt_p / 255.0, mask_p)
    assert gradient_error(pred_p / 255.0, gt_p / 255.0, mask_p) == pytest.approx(expected, rel=1e-9)
