"""Patch grid geometry and the exact per-patch tissue fraction, against plain loops."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.tiling.grid import GridSpec, grid_coords, grid_spec, select_patches, tissue_fractions


def _reference_fraction(mask: np.ndarray, scale: tuple[float, float], x: float, y: float, ps: float) -> float:
    """Area of tissue in a level-0 box, by summing each mask pixel's overlap (plain loops)."""
    sx, sy = scale
    total = 0.0
    for r in range(mask.shape[0]):
        oy = max(0.0, min(y + ps, (r + 1) * sy) - max(y, r * sy))
        if oy == 0.0:
            continue
        for c in range(mask.shape[1]):
            if mask[r, c]:
                ox = max(0.0, min(x + ps, (c + 1) * sx) - max(x, c * sx))
                total += ox * oy
    return total / (ps * ps)


def test_grid_spec_rounds_level0_size_from_true_mpp() -> None:
    assert grid_spec(256, 0.5, 0.25) == GridSpec(512, 512)
    assert grid_spec(256, 0.5, 0.2527) == GridSpec(507, 507)  # 506.53 → 507, never bucketed to 40×
    assert grid_spec(256, 0.5, 0.5, overlap=0.25) == GridSpec(256, 192)
    assert grid_spec(224, 0.5, 1.0) == GridSpec(112, 112)  # coarser slide: patches are upsampled later
    with pytest.raises(ConfigError):
        grid_spec(1, 0.1, 100.0)


def test_grid_is_global_and_inside_the_slide() -> None:
    spec = GridSpec(100, 75)
    c = grid_coords(1000, 430, spec)
    xs, ys = np.unique(c[:, 0]), np.unique(c[:, 1])
    np.testing.assert_array_equal(xs, np.arange(0, 901, 75))
    np.testing.assert_array_equal(ys, np.arange(0, 331, 75))
    assert c.dtype == np.int64 and len(c) == len(xs) * len(ys)
    assert (c[:, 0] + 100 <= 1000).all() and (c[:, 1] + 100 <= 430).all()
    # row-major: y outer, x inner
    assert tuple(c[1]) == (75, 0) and tuple(c[len(xs)]) == (0, 75)
    assert grid_coords(99, 500, spec).shape == (0, 2)


def test_short_sides_get_one_padded_position_only_when_asked() -> None:
    spec = GridSpec(256, 256)
    assert grid_coords(224, 224, spec).shape == (0, 2)
    np.testing.assert_array_equal(grid_coords(224, 224, spec, pad_short_sides=True), [[0, 0]])
    # only the short side is padded; the long one keeps the normal in-bounds grid
    np.testing.assert_array_equal(grid_coords(600, 100, spec, pad_short_sides=True), [[0, 0], [256, 0]])
    np.testing.assert_array_equal(grid_coords(600, 300, spec, pad_short_sides=True), grid_coords(600, 300, spec))
    assert grid_coords(0, 100, spec, pad_short_sides=True).shape == (0, 2)
    # the padding counts as glass: a fully tissue 128 x 128 image fills a quarter of the patch
    mask = np.ones((64, 64), bool)  # 2 level-0 px per mask px
    coords, frac = select_patches(mask, (2.0, 2.0), (128, 128), spec, 0.25, pad_short_sides=True)
    np.testing.assert_array_equal(coords, [[0, 0]])
    assert frac[0] == pytest.approx(0.25)
    assert len(select_patches(mask, (2.0, 2.0), (128, 128), spec, 0.26, pad_short_sides=True)[0]) == 0


def test_tissue_fraction_is_exact_for_fractional_scale() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((23, 31)) < 0.4
    scale = (3.7, 4.3)
    coords = np.array([[0, 0], [5, 7], [17, 3], [50, 40], [99, 80], [110, 90]], np.int64)
    ps = 13
    got = tissue_fractions(mask, scale, coords, ps)
    ref = [_reference_fraction(mask, scale, x, y, ps) for x, y in coords]
    np.testing.assert_allclose(got, ref, atol=1e-9)


def test_tissue_fraction_outside_the_mask_is_zero_and_full_inside_is_one() -> None:
    mask = np.ones((10, 10), bool)
    fr = tissue_fractions(mask, (2.0, 2.0), np.array([[0, 0], [4, 4], [30, 30]]), 8)
    np.testing.assert_allclose(fr, [1.0, 1.0, 0.0])


def test_select_patches_threshold_and_pruning_match_full_evaluation() -> None:
    mask = np.zeros((40, 50), bool)
    mask[10:25, 12:30] = True
    mask[30:33, 40:44] = True
    scale, size, spec = (8.0, 8.0), (400, 320), GridSpec(24, 16)
    every = grid_coords(*size, spec)
    frac_all = tissue_fractions(mask, scale, every, spec.patch_size_level0)
    for min_tissue in (0.0, 0.25, 0.5, 1.0):
        coords, frac = select_patches(mask, scale, size, spec, min_tissue)
        want = frac_all > 0 if min_tissue == 0 else frac_all >= min_tissue
        np.testing.assert_array_equal(coords, every[want])
        np.testing.assert_allclose(frac, frac_all[want], rtol=1e-6)
        assert frac.dtype == np.float32
    empty, f = select_patches(np.zeros((4, 4), bool), (1.0, 1.0), (4, 4), GridSpec(2, 2), 0.25)
    assert empty.shape == (0, 2) and f.shape == (0,)


def test_any_tissue_keeps_no_glass_at_a_non_integer_mask_scale() -> None:
    """`min_tissue 0` keeps exactly the patches that overlap tissue, even where the integral
    image's round-off is not zero (a mask scale like a real pyramid's, 16.0037 px per mask px)."""
    rng = np.random.default_rng(7)
    mask = rng.random((30, 40)) < 0.08
    scale, size, spec = (16.0037, 15.9981), (640, 480), GridSpec(32, 32)
    every = grid_coords(*size, spec)
    coords, frac = select_patches(mask, scale, size, spec, 0.0)
    want = np.array([_reference_fraction(mask, scale, x, y, 32) > 0 for x, y in every])
    np.testing.assert_array_equal(coords, every[want])
    assert frac.min() > 0
    glass = tissue_fractions(mask, scale, every[~want], 32)
    assert not glass.any()  # exact zeros, not 1e-16
