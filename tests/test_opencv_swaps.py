"""Each OpenCV swap of issue 11 against the implementation it replaced (tests/support/scipy_reference.py).

Tolerances: the connected components, the distance-transform band and the trimaps are exact (bool /
uint8 equality); the filters agree to float64 rounding (atol 1e-12 on values in [0, 1]); the Gaussian
blur of the synthetic veil to float32 rounding (1e-6). Whole metrics: Connectivity equal, Gradient
within 1e-9 relative. The synthetic foregrounds: alpha bit-identical, F within 1 level on a few pixels.
"""

from __future__ import annotations


import cv2
import numpy as np
import pytest

from fusionnet import metrics
from fusionnet.data import synthetic
from fusionnet.data.imagefiles import read_alpha
from fusionnet.data.trimap import band_trimap
from tests.support import scipy_reference as ref
from tests.support.helpers import ALPHAMATTING, require_shared_data

EDGE_SHAPES = [(1, 1), (1, 9), (7, 1), (2, 3), (5, 40), (33, 17)]


def _soft_alpha(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A matte on the 8-bit grid: opaque and clear regions plus a soft band (float64 in [0, 1])."""
    field = cv2.GaussianBlur(rng.random(shape), (0, 0), 2.0) if min(shape) > 1 else rng.random(shape)
    return np.round(np.clip((field - field.mean()) * 12 + 0.5, 0, 1) * 255) / 255


def _special_alphas() -> list[tuple[str, np.ndarray]]:
    """All-zero, all-one, all-transition, transition only on the border or in the corners, one pixel."""
    zeros, ones = np.zeros((12, 15)), np.ones((12, 15))
    border = np.ones((12, 15))
    border[0, :], border[-1, :], border[:, 0], border[:, -1] = 0.5, 1 / 255, 254 / 255, 0.2
    corners = np.zeros((12, 15))
    corners[0, 0], corners[-1, -1] = 1 / 255, 254 / 255
    return [("zeros", zeros), ("ones", ones), ("all-transition", np.full((6, 9), 0.5)), ("border", border),
            ("corners", corners), ("one-pixel-soft", np.full((1, 1), 0.5)), ("one-pixel-opaque", np.ones((1, 1)))]


# ----------------------------------------------------------------------------- transition band / trimap


@pytest.mark.parametrize("radius", [0, 1, 2, 25, 100])
def test_transition_band_equals_scipy_on_edge_cases(radius: int) -> None:
    rng = np.random.default_rng(radius)
    cases = _special_alphas() + [(f"random{shape}", _soft_alpha(rng, shape)) for shape in EDGE_SHAPES]
    for name, alpha in cases:
        np.testing.assert_array_equal(metrics.transition_band(alpha, radius), ref.transition_band(alpha, radius),
                                      err_msg=f"{name}, radius {radius}")


@pytest.mark.parametrize("radius", [1, 7, 25, 333])
def test_transition_band_equals_scipy_on_sparse_points_in_a_large_image(radius: int) -> None:
    # sparse isolated points: the widest range of exact distances, where a float32 sqrt could tip d <= r
    rng = np.random.default_rng(radius)
    alpha = np.ones((900, 1300))
    alpha[rng.random(alpha.shape) < 2e-5] = 0.5
    alpha[0, 0] = 0.5  # a corner, distances up to the far corner
    np.testing.assert_array_equal(metrics.transition_band(alpha, radius), ref.transition_band(alpha, radius))


@pytest.mark.parametrize("radius", [0, 3, 25])
def test_band_trimap_equals_scipy(radius: int) -> None:
    rng = np.random.default_rng(3)
    alphas = [np.round(a * 255).astype(np.uint8) for _, a in _special_alphas()]
    alphas += [np.round(_soft_alpha(rng, s) * 255).astype(np.uint8) for s in EDGE_SHAPES + [(200, 300)]]
    for alpha in alphas:
        new = band_trimap(alpha, radius)
        with ref.scipy_implementations():
            old = band_trimap(alpha, radius)
        np.testing.assert_array_equal(new, old, err_msg=f"alpha {alpha.shape}, radius {radius}")


# ----------------------------------------------------------------------------- connected components


def _binaries() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    checker = (np.indices((9, 9)).sum(axis=0) % 2).astype(bool)  # one component 8-connected, 41 singletons 4-connected
    ties = np.zeros((6, 6), bool)
    ties[0, 4:6] = ties[5, 0:2] = True  # equal sizes: MATLAB keeps the first in column-major order
    out = [("empty", np.zeros((5, 7), bool)), ("full", np.ones((5, 7), bool)), ("one-pixel", np.ones((1, 1), bool)),
           ("one-pixel-off", np.zeros((1, 1), bool)), ("checkerboard", checker), ("ties", ties), ("ties.T", ties.T)]
    for shape in EDGE_SHAPES + [(64, 80), (400, 500)]:
        for density in (0.3, 0.55, 0.7):
            out.append((f"random{shape}@{density}", rng.random(shape) < density))
    return out


def test_largest_component_equals_scipy_label() -> None:
    for name, binary in _binaries():
        np.testing.assert_array_equal(metrics._largest_component(binary), ref.largest_component(binary),
                                      err_msg=name)


def test_largest_component_is_four_connected() -> None:
    checker = (np.indices((9, 9)).sum(axis=0) % 2 == 0)
    assert metrics._largest_component(checker).sum() == 1  # 8-connectivity would join all 41


# ----------------------------------------------------------------------------- Gaussian gradient


@pytest.mark.parametrize("shape", EDGE_SHAPES + [(120, 90)])
def test_gaussian_gradient_equals_scipy_convolve1d(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for image in (rng.random(shape), _soft_alpha(rng, shape), np.full(shape, 0.7)):
        for sigma in (metrics.GRADIENT_SIGMA, 0.8, 3.0):
            for new, old in zip(metrics.gaussian_gradient(image, sigma), ref.gaussian_gradient(image, sigma)):
                np.testing.assert_allclose(new, old, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- whole metrics


def _matte_pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(11)
    pairs = []
    for shape in EDGE_SHAPES + [(80, 64)]:
        gt = _soft_alpha(rng, shape)
        pred = np.round(np.clip(gt + rng.normal(0, 0.15, shape), 0, 1) * 255) / 255
        pairs.append((f"soft{shape}", pred, gt))
    pairs.append(("pred never reaches 1", 0.85 * pairs[-1][2], pairs[-1][2]))
    for name, alpha in _special_alphas():
        pairs.append((name, np.clip(alpha + 0.3, 0, 1), alpha))
    return pairs


def test_connectivity_and_gradient_equal_before_and_after() -> None:
    for name, pred, gt in _matte_pairs():
        for mask in (None, metrics.transition_band(gt, 2), np.ones(gt.shape, bool)):
            new = metrics.connectivity_error(pred, gt, mask), metrics.gradient_error(pred, gt, mask)
            with ref.scipy_implementations():
                old = metrics.connectivity_error(pred, gt, mask), metrics.gradient_error(pred, gt, mask)
            assert new[0] == old[0], name
            assert new[1] == pytest.approx(old[1], rel=1e-9, abs=1e-30), name


@pytest.mark.shared_data
def test_metrics_on_real_mattes_unchanged() -> None:
    require_shared_data(ALPHAMATTING)
    rng = np.random.default_rng(0)
    for name in ("GT02.png", "GT07.png", "GT13.png"):
        gt = read_alpha(ALPHAMATTING / "alpha" / name).astype(np.float64) / 255
        blurred = cv2.GaussianBlur(gt, (0, 0), 2.5) + rng.normal(0, 0.02, gt.shape)
        pred = np.round(np.clip(blurred, 0, 1) * 255) / 255
        band = metrics.transition_band(gt, 25)
        with ref.scipy_implementations():
            old_band = metrics.transition_band(gt, 25)
            old = [f(pred, gt, band) for f in (metrics.sad, metrics.mse, metrics.gradient_error,
                                                metrics.connectivity_error)]
        np.testing.assert_array_equal(band, old_band, err_msg=name)
        new = [f(pred, gt, band) for f in (metrics.sad, metrics.mse, metrics.gradient_error,
                                            metrics.connectivity_error)]
        assert new[0] == old[0] and new[1] == old[1] and new[3] == old[3], name  # same pixels, same sums
        assert new[2] == pytest.approx(old[2], rel=1e-9), name


# ----------------------------------------------------------------------------- synthetic foregrounds


@pytest.mark.parametrize("shape", [(1, 1), (3, 4), (40, 7), (320, 320)])
def test_veil_blur_equals_scipy_gaussian_filter(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    image = (rng.random(shape) < 0.5).astype(np.float32)
    for sigma in (1.5, 2.7, 5.0):
        new = synthetic._gaussian_blur(image, sigma)
        assert new.dtype == np.float32 and new.shape == shape
        np.testing.assert_allclose(new, ref.gaussian_blur(image, sigma), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (60, 45), (60, 45, 3), (320, 320)])
def test_blur_convolution_equals_fft(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(2).random(shape)
    kernels = [synthetic._blur_kernel(np.random.default_rng(seed)) for seed in range(12)]
    assert {k.shape for k in kernels} >= {(7, 7), (9, 9)}  # motion and defocus, both sizes of centre
    kernels.append(np.arange(1.0, 13.0).reshape(3, 4) / 78.0)  # even width, asymmetric: checks the anchor
    for psf in kernels:
        np.testing.assert_allclose(synthetic._convolve_same(image, psf), ref.convolve_same(image, psf),
                                   rtol=0, atol=1e-12)
        # make_foreground passes float32: numpy 2's FFT stayed in float32 there, filter2D sums in float64
        image32 = image.astype(np.float32)
        np.testing.assert_allclose(synthetic._convolve_same(image32, psf), ref.convolve_same(image32, psf),
                                   rtol=0, atol=1e-6)


def test_synthetic_foregrounds_unchanged_within_one_level() -> None:
    changed_f = total = 0
    for index in range(6):
        new = synthetic.make_foreground(0, index, (160, 176))
        with ref.scipy_implementations():
            old = synthetic.make_foreground(0, index, (160, 176))
        np.testing.assert_array_equal(new.alpha, old.alpha)
        diff = np.abs(new.fg.astype(int) - old.fg)
        assert diff.max() <= 1  # float32 FFT round-off vs float64 sums, mostly where alpha ~ 0 (F undefined)
        changed_f += int((diff > 0).any(axis=2).sum())
        total += new.alpha.size
    assert changed_f <= 1e-4 * total
