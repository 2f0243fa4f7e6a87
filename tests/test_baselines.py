"""Baselines of the evaluation table (fusionnet.evaluation.baselines), on tiny images with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from fusionnet.data.trimap import band_trimap
from fusionnet.evaluation import baselines
from fusionnet.evaluation.rows import EvalSample, RowSettings, composite_regions, evaluate_set
from fusionnet.metrics import sad


def two_colour_composite(height: int = 48, width: int = 64, band: int = 4):
    """I = alpha F + (1 - alpha) B with constant F (red) and B (blue): the colour-line model holds exactly.

    alpha: a horizontal ramp from 0 (left) to 1 (right) over the middle third. Returns image (H,W,3)
    uint8, alpha (H,W) float32 on the 8-bit grid, trimap (H,W) uint8.
    """
    x = np.arange(width, dtype=np.float64)
    ramp = np.clip((x - width / 3) / (width / 3), 0.0, 1.0)
    alpha8 = np.round(np.tile(ramp, (height, 1)) * 255).astype(np.uint8)
    a = alpha8.astype(np.float64)[..., None] / 255.0
    fg, bg = np.array([220.0, 40.0, 30.0]), np.array([20.0, 60.0, 200.0])
    image = np.round(a * fg + (1 - a) * bg).astype(np.uint8)
    return image, alpha8.astype(np.float32) / 255.0, band_trimap(alpha8, band)


def test_constant_alpha_is_half_in_unknown_and_trimap_elsewhere():
    trimap = np.array([[0, 128, 255], [255, 128, 0]], np.uint8)
    out = baselines.constant_alpha(trimap)
    np.testing.assert_array_equal(out, np.array([[0, 0.5, 1], [1, 0.5, 0]], np.float32))
    assert out.dtype == np.float32


def test_constant_alpha_rejects_float_trimap():
    with pytest.raises(ValueError, match="uint8"):
        baselines.constant_alpha(np.zeros((2, 2), np.float32))


def test_segmentation_only_is_eq2_with_beta_half():
    rng = np.random.default_rng(0)
    fg, bg = rng.random((5, 7), np.float32), rng.random((5, 7), np.float32)
    expected = 0.5 * fg + 0.5 * (1 - bg)  # paper Eq. 2 with beta = 0.5
    np.testing.assert_allclose(baselines.segmentation_only_alpha(fg, bg), expected, atol=1e-7)
    with pytest.raises(ValueError, match="shape"):
        baselines.segmentation_only_alpha(fg, bg[:, :3])


def test_closed_form_recovers_a_two_colour_matte():
    image, alpha, trimap = two_colour_composite()
    unknown = trimap == 128
    pred = baselines.closed_form_alpha(image, trimap, max_side=None)
    assert pred.shape == alpha.shape and pred.dtype == np.float32
    # known pixels are the trimap's exactly
    np.testing.assert_array_equal(pred[trimap == 255], 1.0)
    np.testing.assert_array_equal(pred[trimap == 0], 0.0)
    # inside the band the colour-line model holds, so the solve is near exact
    assert np.abs(pred - alpha)[unknown].max() < 0.03
    assert sad(pred, alpha, unknown) < 0.1 * sad(baselines.constant_alpha(trimap), alpha, unknown)


def test_closed_form_downscaled_solve_keeps_size_and_stays_close():
    image, alpha, trimap = two_colour_composite(96, 128, band=8)
    pred = baselines.closed_form_alpha(image, trimap, max_side=48)
    unknown = trimap == 128
    assert pred.shape == alpha.shape
    np.testing.assert_array_equal(pred[trimap == 255], 1.0)
    assert np.abs(pred - alpha)[unknown].mean() < 0.05


def test_closed_form_needs_foreground_and_background():
    image, _, trimap = two_colour_composite()
    trimap = trimap.copy()
    trimap[trimap == 0] = 128
    with pytest.raises(ValueError, match="background"):
        baselines.closed_form_alpha(image, trimap)


def test_baselines_on_a_tiny_set_through_the_evaluation():
    """The trimap rows need no network; their numbers come from the same metric code, per image."""
    samples = []
    for i, (h, w) in enumerate([(40, 56), (48, 64), (36, 60)]):
        image, alpha, trimap = two_colour_composite(h, w, band=3 + i)
        samples.append(EvalSample(f"img{i}", image, alpha, trimap, composite_regions(trimap)))
    settings = RowSettings(closed_form_max_side=None)
    result = evaluate_set(samples, {}, ["closed_form", "constant_half"], settings)
    # slow reference for the constant row: sum |0.5 - gt| over the band / 1000, averaged over images
    expected = np.mean([np.abs(0.5 - s.alpha.astype(np.float64))[s.trimap == 128].sum() / 1000 for s in samples])
    assert result.summary["constant_half"]["band"]["sad"] == pytest.approx(expected, rel=1e-9)
    # the constant row is exact outside the band, so -full equals -25 for SAD
    assert result.summary["constant_half"]["full"]["sad"] == pytest.approx(expected, rel=1e-9)
    assert result.summary["closed_form"]["band"]["sad"] < 0.2 * expected
    assert [line["image"] for line in result.per_image] == ["img0", "img1", "img2"]
    assert result.notes == []
