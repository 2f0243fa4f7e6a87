"""The synthetic foreground generator: determinism, and mattes that are really soft and thin."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fusionnet.data.backgrounds import BUILTIN_SIDE_RANGE, builtin_background, builtin_backgrounds
from fusionnet.data.synthetic import fractal_noise, make_foreground

SIZE = (160, 176)


def test_same_seed_same_arrays() -> None:
    first, second = make_foreground(3, 5, SIZE), make_foreground(3, 5, SIZE)
    np.testing.assert_array_equal(first.fg, second.fg)
    np.testing.assert_array_equal(first.alpha, second.alpha)


@pytest.mark.parametrize("other", [(4, 5), (3, 6)], ids=["other-seed", "other-index"])
def test_other_seed_or_index_differs(other: tuple[int, int]) -> None:
    base, changed = make_foreground(3, 5, SIZE), make_foreground(*other, SIZE)
    assert np.mean(base.alpha != changed.alpha) > 0.05
    assert np.mean(base.fg != changed.fg) > 0.5


def test_shapes_and_types() -> None:
    made = make_foreground(0, 0, (96, 128))
    assert made.fg.shape == (96, 128, 3) and made.fg.dtype == np.uint8
    assert made.alpha.shape == (96, 128) and made.alpha.dtype == np.uint8


def test_too_small_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 32x32"):
        make_foreground(0, 0, (16, 64))


@pytest.mark.parametrize("index", range(6))
def test_alpha_is_soft_with_an_opaque_core(index: int) -> None:
    alpha = make_foreground(0, index, SIZE).alpha
    soft = (alpha > 0) & (alpha < 255)
    assert soft.mean() > 0.015, f"only {soft.mean():.3%} of pixels have 0 < alpha < 1"
    assert len(np.unique(alpha[soft])) > 100  # a continuum of partial values, not a few AA levels
    assert (alpha == 255).mean() > 0.05  # an object, not only haze
    assert (alpha == 0).mean() > 0.1  # and background around it


@pytest.mark.parametrize("index", range(6))
def test_alpha_has_thin_structures(index: int) -> None:
    """Hair strands are under a pixel wide: a 3x3 opening removes part of the foreground.

    Foreground = at least a quarter covered, so faint haze between dense strands does not merge them.
    """
    foreground = make_foreground(0, index, SIZE).alpha > 64
    opened = ndimage.binary_opening(foreground, structure=np.ones((3, 3), bool))
    vanished = foreground & ~opened
    assert vanished.sum() > 0.01 * foreground.sum(), f"opening removed only {vanished.sum()} pixels"


def test_foreground_colours_are_textured() -> None:
    made = make_foreground(1, 2, SIZE)
    opaque = made.fg[made.alpha == 255].astype(np.float64)
    assert opaque.std(axis=0).mean() > 5.0  # not a flat fill
    assert len(np.unique(opaque.reshape(-1, 3), axis=0)) > 200


def test_fractal_noise_range_and_determinism() -> None:
    a = fractal_noise(np.random.default_rng(7), (40, 50))
    b = fractal_noise(np.random.default_rng(7), (40, 50))
    assert a.shape == (40, 50) and a.dtype == np.float32
    assert a.min() == pytest.approx(0.0) and a.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(a, b)


def test_builtin_backgrounds_are_deterministic_and_distinct() -> None:
    backgrounds = builtin_backgrounds(8, seed=0)
    assert len({b.name for b in backgrounds}) == 8
    images = [b.load() for b in backgrounds]
    for image in images:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert all(BUILTIN_SIDE_RANGE[0] <= side < BUILTIN_SIDE_RANGE[1] for side in image.shape[:2])
        assert image.std() > 5.0  # textured, not flat
    np.testing.assert_array_equal(images[3], builtin_background(0, 3))
    assert not np.array_equal(builtin_background(0, 3), builtin_background(1, 3))
    shapes = {im.shape for im in images}
    assert len(shapes) > 1
