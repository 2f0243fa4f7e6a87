"""Tests for fusionnet.refine: guided filter against a slow reference, implicit trimap, foreground."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from fusionnet.refine import estimate_foreground, guided_filter, implicit_trimap
from tests.support.helpers import ALPHAMATTING, require_shared_data


# ---------------------------------------------------------------------------------------------
# slow, obviously-correct references
# ---------------------------------------------------------------------------------------------


def reference_guided_filter(image: np.ndarray, alpha: np.ndarray, r: int, eps: float) -> np.ndarray:
    """He et al.'s colour guided filter step by step in float64, NOT clipped to [0,1].

    For every window w_k (centre k, clipped to the image): mean mu_k, covariance Sigma_k (1/|w_k|),
    a_k = (Sigma_k + eps U)^-1 (mean(I p) - mu_k pbar_k), b_k = pbar_k - a_k . mu_k.
    Then q_i = average over all windows w_k that contain pixel i of (a_k . I_i + b_k).
    """
    guide = image.astype(np.float64)
    p = alpha.astype(np.float64)
    h, w = p.shape
    a = np.zeros((h, w, 3))
    b = np.zeros((h, w))
    for ky in range(h):
        for kx in range(w):
            win_i = guide[max(0, ky - r) : ky + r + 1, max(0, kx - r) : kx + r + 1].reshape(-1, 3)
            win_p = p[max(0, ky - r) : ky + r + 1, max(0, kx - r) : kx + r + 1].reshape(-1)
            mu = win_i.mean(axis=0)
            p_bar = win_p.mean()
            sigma = (win_i - mu).T @ (win_i - mu) / len(win_p)
            cov_ip = (win_i * win_p[:, None]).mean(axis=0) - mu * p_bar
            a[ky, kx] = np.linalg.solve(sigma + eps * np.eye(3), cov_ip)
            b[ky, kx] = p_bar - a[ky, kx] @ mu
    centre_y, centre_x = np.mgrid[0:h, 0:w]
    q = np.zeros((h, w))
    for iy in range(h):
        for ix in range(w):
            contains_i = (np.abs(centre_y - iy) <= r) & (np.abs(centre_x - ix) <= r)
            q[iy, ix] = np.mean(a[contains_i] @ guide[iy, ix] + b[contains_i])
    return q


def reference_double_box_mean(alpha: np.ndarray, r: int) -> np.ndarray:
    """Mean over clipped windows, applied twice (what the filter reduces to when a_k = 0)."""

    def box_mean(x: np.ndarray) -> np.ndarray:
        h, w = x.shape
        out = np.empty((h, w))
        for y in range(h):
            for xx in range(w):
                out[y, xx] = x[max(0, y - r) : y + r + 1, max(0, xx - r) : xx + r + 1].mean()
        return out

    return box_mean(box_mean(alpha.astype(np.float64)))


def random_pair(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((h, w, 3), dtype=np.float32), rng.random((h, w), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# guided_filter
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("h", "w", "radius", "eps"),
    [
        (17, 23, 1, 1e-2),
        (17, 23, 2, 1e-3),
        (17, 23, 3, 1e-4),
        (17, 23, 4, 1e-2),
        (17, 23, 9, 1e-3),  # window wider than half the image: clipped on both sides
        (17, 23, 40, 1e-2),  # window covers the whole image from every pixel
        (1, 9, 2, 1e-1),  # one row: clipped in y everywhere
        (6, 1, 1, 1e-1),  # one column
    ],
)
def test_guided_filter_matches_reference(h: int, w: int, radius: int, eps: float) -> None:
    image, alpha = random_pair(h, w, seed=radius * 100 + h)
    expected = np.clip(reference_guided_filter(image, alpha, radius, eps), 0.0, 1.0)
    got = guided_filter(image, alpha, radius, eps)
    assert got.shape == (h, w) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_guided_filter_matches_reference_on_a_matte_like_input() -> None:
    # a soft edge that follows a colour edge, plus noise: the regime the refinement is used in
    rng = np.random.default_rng(7)
    h, w = 19, 21
    xx = np.arange(w)[None, :].repeat(h, axis=0)
    image = np.where((xx >= 10)[..., None], [0.9, 0.8, 0.2], [0.1, 0.3, 0.6]).astype(np.float32)
    image = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1).astype(np.float32)
    alpha = np.clip((xx - 9.5) / 3 + 0.5 + rng.normal(0, 0.05, (h, w)), 0, 1).astype(np.float32)
    for radius, eps in [(2, 1e-4), (4, 1e-3)]:
        expected = np.clip(reference_guided_filter(image, alpha, radius, eps), 0.0, 1.0)
        np.testing.assert_allclose(guided_filter(image, alpha, radius, eps), expected, rtol=0, atol=1e-5)


def test_guided_filter_output_is_clipped_where_he_et_al_overshoots() -> None:
    image, alpha = random_pair(17, 23, seed=3)
    alpha = (alpha > 0.5).astype(np.float32)  # hard 0/1 matte: the local linear model overshoots it
    unclipped = reference_guided_filter(image, alpha, 1, 1e-4)
    assert unclipped.min() < -0.1 and unclipped.max() > 1.1  # precondition: clipping matters here
    got = guided_filter(image, alpha, 1, 1e-4)
    assert got.min() >= 0.0 and got.max() <= 1.0
    np.testing.assert_allclose(got, np.clip(unclipped, 0, 1), rtol=0, atol=1e-5)


def test_constant_guide_gives_plain_mean_filter() -> None:
    # Sigma_k = 0 and cov(I, p) = 0 for a constant guide, so a_k = 0 and b_k = mean of alpha
    _, alpha = random_pair(15, 18, seed=11)
    image = np.full((15, 18, 3), 0.37, np.float32)
    for radius in (1, 3, 10):
        got = guided_filter(image, alpha, radius, 1e-4)
        np.testing.assert_allclose(got, reference_double_box_mean(alpha, radius), rtol=0, atol=1e-6)


def test_huge_eps_tends_to_plain_mean_filter() -> None:
    image, alpha = random_pair(15, 18, seed=12)
    got = guided_filter(image, alpha, 2, 1e8)
    np.testing.assert_allclose(got, reference_double_box_mean(alpha, 2), rtol=0, atol=1e-6)
    # while a small eps follows the guide and differs from the mean filter
    assert np.abs(guided_filter(image, alpha, 2, 1e-4) - reference_double_box_mean(alpha, 2)).max() > 0.1


def test_radius_zero_returns_alpha() -> None:
    image, alpha = random_pair(9, 7, seed=13)
    np.testing.assert_array_equal(guided_filter(image, alpha, 0, 1e-4), alpha)


def test_guided_filter_preserves_a_colour_edge() -> None:
    # black | white guide with a noisy 0.2 -> 0.8 alpha step on the same edge: the mean filter blurs
    # the step, the guided filter keeps it sharp and still averages the noise away
    rng = np.random.default_rng(5)
    h, w, edge = 24, 24, 12
    image = np.zeros((h, w, 3), np.float32)
    image[:, edge:] = 1.0
    step = np.full((h, w), 0.2, np.float32)
    step[:, edge:] = 0.8
    alpha = (step + rng.normal(0, 0.05, (h, w))).astype(np.float32)
    got = guided_filter(image, alpha, 4, 1e-3)
    blurred = reference_double_box_mean(alpha, 4)
    next_to_edge = np.s_[:, edge - 1 : edge + 1]
    assert np.abs(got[next_to_edge] - step[next_to_edge]).max() < 0.05
    assert np.abs(blurred[next_to_edge] - step[next_to_edge]).min() > 0.15
    assert np.abs(got - step).mean() < 0.5 * np.abs(alpha - step).mean()


def test_guided_filter_accepts_float64_and_non_contiguous_input() -> None:
    image, alpha = random_pair(12, 10, seed=14)
    expected = guided_filter(image, alpha, 2, 1e-3)
    got = guided_filter(np.asfortranarray(image.astype(np.float64)), alpha.astype(np.float64).T.copy().T, 2, 1e-3)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("image", "alpha", "radius", "eps", "match"),
    [
        (np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32), 2, 1e-4, r"image must have shape \(H,W,3\)"),
        (np.zeros((8, 8, 4), np.float32), np.zeros((8, 8), np.float32), 2, 1e-4, "3 colour channels"),
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 9), np.float32), 2, 1e-4, "does not match image shape"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), 2, 1e-4, "float array in"),
        (np.full((8, 8, 3), 2.0, np.float32), np.zeros((8, 8), np.float32), 2, 1e-4, r"lie in \[0,1\]"),
        (np.zeros((8, 8, 3), np.float32), np.full((8, 8), np.nan, np.float32), 2, 1e-4, "no NaN"),
        (np.zeros((8, 8, 3), np.float32), -np.ones((8, 8), np.float32), 2, 1e-4, r"alpha must lie in \[0,1\]"),
        ([[0.0]], np.zeros((1, 1), np.float32), 2, 1e-4, "must be a numpy array"),
        (np.zeros((0, 8, 3), np.float32), np.zeros((0, 8), np.float32), 2, 1e-4, "empty"),
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.float32), -1, 1e-4, "radius must be an integer"),
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.float32), 2.5, 1e-4, "radius must be an integer"),
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.float32), 2, 0.0, "eps must be a finite number > 0"),
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.float32), 2, -1e-4, "eps must be"),
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.float32), 2, float("inf"), "eps must be"),
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.float32), 2, float("nan"), "eps must be"),
    ],
)
def test_guided_filter_rejects_bad_input(image, alpha, radius, eps, match: str) -> None:
    with pytest.raises(ValueError, match=f"guided_filter: .*{match}"):
        guided_filter(image, alpha, radius, eps)


# ---------------------------------------------------------------------------------------------
# implicit_trimap
# ---------------------------------------------------------------------------------------------


def test_implicit_trimap_on_hand_made_probabilities() -> None:
    fg_prob = np.array([[1.00, 0.96, 0.50, 0.02], [0.95, 0.97, 0.10, 0.94]], np.float32)
    bg_prob = np.array([[0.00, 0.01, 0.50, 0.99], [0.00, 0.98, 0.10, 0.02]], np.float32)
    expected = np.array(
        [
            [255, 255, 128, 0],  # certain fg, fg, neither certain, certain bg
            [255, 128, 128, 128],  # fg exactly at threshold, both certain (conflict), neither, fg just below
        ],
        np.uint8,
    )
    trimap = implicit_trimap(fg_prob, bg_prob)
    assert trimap.dtype == np.uint8 and trimap.shape == (2, 4)
    np.testing.assert_array_equal(trimap, expected)


def test_implicit_trimap_threshold_is_a_parameter() -> None:
    fg_prob = np.array([[0.96, 0.999, 0.3]], np.float32)
    bg_prob = np.array([[0.01, 0.001, 0.92]], np.float32)
    np.testing.assert_array_equal(implicit_trimap(fg_prob, bg_prob, threshold=0.99), [[128, 255, 128]])
    np.testing.assert_array_equal(implicit_trimap(fg_prob, bg_prob, threshold=0.9), [[255, 255, 0]])


def test_implicit_trimap_of_ideal_branches_recovers_the_known_regions() -> None:
    # branches that output the segmentation targets exactly: F = 1 where alpha > 0.05, B = 1 where 1-alpha > 0.05
    alpha = np.linspace(0, 1, 101, dtype=np.float32)[None, :].repeat(3, axis=0)
    fg_prob = (alpha > 0.05).astype(np.float32)
    bg_prob = (1 - alpha > 0.05).astype(np.float32)
    trimap = implicit_trimap(fg_prob, bg_prob)
    assert set(np.unique(trimap)) == {0, 128, 255}
    np.testing.assert_array_equal(trimap == 0, alpha <= 0.05)
    np.testing.assert_array_equal(trimap == 255, 1 - alpha <= 0.05)


@pytest.mark.parametrize(
    ("fg_prob", "bg_prob", "threshold", "match"),
    [
        (np.zeros((4, 4), np.float32), np.zeros((4, 5), np.float32), 0.95, "shape"),
        (np.zeros((4, 4, 1), np.float32), np.zeros((4, 4), np.float32), 0.95, r"fg_prob must have shape \(H,W\)"),
        (np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.float32), 0.95, "float array"),
        (np.full((4, 4), 1.2, np.float32), np.zeros((4, 4), np.float32), 0.95, r"fg_prob must lie in \[0,1\]"),
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32), 0.0, r"threshold must be in \(0,1\]"),
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32), 1.5, "threshold"),
    ],
)
def test_implicit_trimap_rejects_bad_input(fg_prob, bg_prob, threshold: float, match: str) -> None:
    with pytest.raises(ValueError, match=f"implicit_trimap: .*{match}"):
        implicit_trimap(fg_prob, bg_prob, threshold)


# ---------------------------------------------------------------------------------------------
# estimate_foreground
# ---------------------------------------------------------------------------------------------


def smooth_colour_field(h: int, w: int, seed: int, cycles: float) -> np.ndarray:
    """(h,w,3) float32 in [0.1,0.9]: a random plane wave per channel, `cycles` periods across the image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    channels = [
        0.5 + 0.4 * np.sin(2 * np.pi * cycles * (rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx) + rng.uniform(0, 6))
        for _ in range(3)
    ]
    return np.stack(channels, axis=-1).astype(np.float32)


def test_estimate_foreground_recovers_known_foreground() -> None:
    h = w = 96
    fg = smooth_colour_field(h, w, seed=0, cycles=1.5)
    bg = smooth_colour_field(h, w, seed=100, cycles=3.0)
    yy, xx = np.mgrid[0:h, 0:w]
    alpha = np.clip((h / 3 - np.hypot(yy - h / 2, xx - w / 2)) / 6 + 0.5, 0, 1).astype(np.float32)  # soft disk
    image = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    fg_est = estimate_foreground(image, alpha)
    assert fg_est.shape == (h, w, 3) and fg_est.dtype == np.float32
    assert fg_est.min() >= 0.0 and fg_est.max() <= 1.0
    known = alpha > 0.1
    error = np.abs(fg_est - fg)[known].mean()
    naive_error = np.abs(image - fg)[known].mean()  # taking the photo itself as F
    # measured 0.013-0.016 over seeds 0-5 (ratio to naive 0.33-0.38); the bounds leave ~1.6x margin
    assert error < 0.025
    assert error < 0.5 * naive_error


def test_estimate_foreground_returns_background_on_request() -> None:
    image, alpha = random_pair(20, 24, seed=21)
    fg, bg = estimate_foreground(image, alpha, return_background=True)
    for x in (fg, bg):
        assert x.shape == (20, 24, 3) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_array_equal(estimate_foreground(image, alpha), fg)  # deterministic


@pytest.mark.parametrize(
    ("image", "alpha", "match"),
    [
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), "float array"),
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 7), np.float32), "does not match image shape"),
        (np.zeros((8, 8, 3), np.float32), np.full((8, 8), 1.5, np.float32), r"alpha must lie in \[0,1\]"),
    ],
)
def test_estimate_foreground_rejects_bad_input(image, alpha, match: str) -> None:
    with pytest.raises(ValueError, match=f"estimate_foreground: .*{match}"):
        estimate_foreground(image, alpha)


@pytest.mark.shared_data
def test_estimate_foreground_recomposites_a_real_photo() -> None:
    require_shared_data(ALPHAMATTING / "image" / "GT01.png")
    photo = Image.open(ALPHAMATTING / "image" / "GT01.png").convert("RGB")
    matte = Image.open(ALPHAMATTING / "alpha" / "GT01.png").convert("L")  # stored R=G=B: one channel
    scale = 100 / max(photo.size)
    size = (round(photo.size[0] * scale), round(photo.size[1] * scale))
    image = np.asarray(photo.resize(size, Image.Resampling.BOX), np.float32) / 255
    alpha = np.asarray(matte.resize(size, Image.Resampling.BOX), np.float32) / 255
    fg, bg = estimate_foreground(image, alpha, return_background=True)
    transition = (alpha > 0.05) & (alpha < 0.95)
    assert transition.sum() > 100
    recomposite = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    # measured 0.021 on GT01 (0.012-0.026 on GT01/02/08/13): about 5 of 255 levels
    assert np.abs(recomposite - image)[transition].mean() < 0.04
    # and F, B really separate there (F = B = image would recomposite perfectly)
    assert np.abs(fg - bg)[transition].mean() > 0.1


def test_estimate_foreground_keeps_torch_thread_count() -> None:
    """numba's parallel kernels reset the calling thread's OpenMP count; torch must keep the caller's."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        estimate_foreground(rng.random((32, 32, 3)), rng.random((32, 32)))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
