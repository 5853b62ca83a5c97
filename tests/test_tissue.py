"""Tissue segmentation on numpy arrays: each step against a plain reference computation,
and the whole recipe against the known truth mask of synthetic tissue images."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from scipy import ndimage as ndi
from slide_factory import glass_image, tissue_image

from wsi_pipeline.config import SegmentationParams
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.tiling.tissue import (
    close_mask,
    fill_small_holes,
    mask_to_polygons,
    median_above,
    otsu_threshold,
    remove_small_objects,
    saturation,
    segment_tissue,
)


def test_saturation_matches_colorsys_and_excludes_black_and_grey() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    s = saturation(rgb, black_value=0, grey_spread=-1)  # no exclusion: plain HSV saturation
    ref = np.array([[colorsys.rgb_to_hsv(*(px / 255.0))[1] * 255 for px in row] for row in rgb])
    assert np.abs(s.astype(float) - ref).max() <= 0.5 + 1e-9
    special = np.array([[[20, 5, 10], [200, 195, 190], [200, 100, 150], [120, 120, 120]]], np.uint8)
    s2 = saturation(special, black_value=40, grey_spread=12)
    assert s2[0, 0] == 0  # near-black (max 20 < 40) despite saturation 191
    assert s2[0, 1] == 0  # grey: spread 10 <= 12
    assert s2[0, 2] == round(100 * 255 / 200)  # stained pixel keeps its saturation
    assert s2[0, 3] == 0


def test_linear_otsu_equals_skimage() -> None:
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(1)
    img = np.concatenate([rng.normal(30, 8, 5000), rng.normal(150, 20, 3000)]).clip(0, 255).astype(np.uint8)
    t = otsu_threshold(img, log=False)
    assert t == int(threshold_otsu(img))
    assert 50 < t < 120


def test_log_otsu_keeps_pale_eosin_when_tissue_is_abundant() -> None:
    # 45 % glass (S=0 after grey exclusion), 25 % pale pink (S~55), 30 % purple (S~130)
    rng = np.random.default_rng(2)
    parts = [np.zeros(4500), rng.normal(55, 4, 2500), rng.normal(130, 35, 3000)]
    s = np.concatenate(parts).clip(0, 255).astype(np.uint8)
    linear, logt = otsu_threshold(s, log=False), otsu_threshold(s, log=True)
    assert linear > 45  # linear Otsu cuts into the pink mode: the failure the log avoids
    assert logt < 40
    assert (s[4500:] > logt).mean() > 0.99


def test_otsu_of_constant_image_is_its_value() -> None:
    assert otsu_threshold(np.full((5, 5), 7, np.uint8)) == 7
    assert otsu_threshold(np.zeros((0,), np.uint8)) == 0


@pytest.mark.parametrize("size", [1, 3, 7])
def test_median_rank_test_equals_median_filter_then_threshold(size: int) -> None:
    rng = np.random.default_rng(size)
    s = rng.integers(0, 60, size=(41, 57), dtype=np.uint8)
    for t in (10, 29, 45):
        ref = ndi.median_filter(s, size=size, mode="reflect") > t
        np.testing.assert_array_equal(median_above(s, t, size), ref)


@pytest.mark.parametrize("size", [2, 4, 5])
def test_close_mask_equals_binary_closing_with_edge_padding(size: int) -> None:
    rng = np.random.default_rng(size)
    m = rng.random((50, 64)) < 0.35
    padded = np.pad(m, size, mode="edge")
    ref = ndi.binary_closing(padded, structure=np.ones((size, size), bool))[size:-size, size:-size]
    np.testing.assert_array_equal(close_mask(m, size), ref)
    # tissue touching the border survives (binary_closing without padding would erode it)
    edge = np.zeros((20, 20), bool)
    edge[:, :6] = True
    np.testing.assert_array_equal(close_mask(edge, size), edge)


def test_remove_small_objects_and_fill_small_holes() -> None:
    m = np.zeros((40, 40), bool)
    m[2:4, 2:4] = True  # 4 px speck
    m[10:30, 10:30] = True  # 400 px object ...
    m[15:17, 15:17] = False  # ... with a 4 px hole
    m[20:26, 20:26] = False  # ... and a 36 px hole
    m[30, 30] = True  # diagonal neighbour: 8-connected to the big object
    out = remove_small_objects(m, 5)
    assert not out[2:4, 2:4].any() and out[30, 30] and out[10, 10]
    assert out.sum() == m.sum() - 4
    filled = fill_small_holes(out, 10)
    assert filled[15:17, 15:17].all()  # small hole filled
    assert not filled[20:26, 20:26].any()  # large hole kept
    assert not filled[0, 0]  # the background touching the border is never a hole
    assert filled.sum() == out.sum() + 4


def test_segment_tissue_matches_truth_mask() -> None:
    rgb, truth = tissue_image(1024, 768, n_blobs=3, seed=0)
    res = segment_tissue(rgb, mpp=2.0, params=SegmentationParams(min_tissue_area=2000, min_hole_area=400))
    iou = (res.mask & truth).sum() / (res.mask | truth).sum()
    assert iou > 0.95, iou
    assert res.mask.shape == truth.shape and res.mpp == 2.0
    assert res.area_um2 == pytest.approx(truth.sum() * 4.0, rel=0.05)


def test_segment_tissue_area_limits_are_physical() -> None:
    """The same picture at a 4× coarser mpp has 16× the µm² per pixel: a blob that survives
    the area limit at one resolution is removed at the other when the limit is in µm²."""
    rgb, truth = tissue_image(256, 192, n_blobs=1, seed=5)
    area_px = int(truth.sum())
    p = SegmentationParams(min_tissue_area=area_px * 1.0 * 0.5)  # half the blob area at 1 µm/px
    assert segment_tissue(rgb, 1.0, p).mask.sum() > 0.9 * area_px
    assert segment_tissue(rgb, 0.25, p).mask.sum() == 0  # same pixels, 1/16 of the µm²: below the limit


def test_blank_glass_and_black_border_are_not_tissue() -> None:
    glass = glass_image(400, 300, seed=3)
    glass[:, :20] = (12, 4, 8)  # black scanner border with a colour cast: high HSV saturation
    res = segment_tissue(glass, mpp=8.0, params=SegmentationParams(min_tissue_area=0, min_hole_area=0))
    assert res.mask.sum() == 0
    assert res.threshold >= SegmentationParams().otsu_floor


def test_fixed_threshold_option() -> None:
    rgb, truth = tissue_image(512, 384, n_blobs=2, seed=1)
    lo = segment_tissue(rgb, 2.0, SegmentationParams(threshold=10, min_tissue_area=0, min_hole_area=0))
    hi = segment_tissue(rgb, 2.0, SegmentationParams(threshold=250, min_tissue_area=0, min_hole_area=0))
    assert lo.threshold == 10 and hi.threshold == 250
    assert (lo.mask & truth).sum() / truth.sum() > 0.95
    assert hi.mask.sum() < 0.01 * truth.sum()
    with pytest.raises(ConfigError, match="threshold"):
        SegmentationParams(threshold="otsu2")


def test_polygons_cover_the_mask_and_keep_holes() -> None:
    m = np.zeros((60, 80), bool)
    m[5:45, 10:50] = True
    m[15:25, 20:30] = False  # a hole
    m[50:55, 60:75] = True  # a second object
    polys = mask_to_polygons(m, scale=(4.0, 2.0), simplify=0)
    assert len(polys) == 2
    big = max(polys, key=lambda p: p.area)
    assert len(big.interiors) == 1
    # iso-0.5 contours cut the corners of pixel squares: area within one pixel per corner
    assert big.area == pytest.approx((40 * 40 - 100) * 8.0, abs=12 * 8.0)
    minx, miny, maxx, maxy = big.bounds
    assert (minx, miny) == pytest.approx((10 * 4.0, 5 * 2.0), abs=0.51 * 4)
    assert (maxx, maxy) == pytest.approx((50 * 4.0, 45 * 2.0), abs=0.51 * 4)
    assert all(p.is_valid for p in polys)


def test_polygon_area_tracks_blob_area() -> None:
    _, truth = tissue_image(512, 384, n_blobs=3, seed=2)
    polys = mask_to_polygons(truth, scale=(1.0, 1.0))
    total = sum(p.area for p in polys)
    assert total == pytest.approx(truth.sum(), rel=0.01)
    assert mask_to_polygons(np.zeros((10, 10), bool)) == []


# -- the segmentation picture (lowres.py) ---------------------------------------------------
def _info(dims0: tuple[int, int], downsamples: tuple[int, ...], mpp: float | None = 0.25) -> object:
    from wsi_pipeline.slide.base import SlideInfo

    dims = tuple((-(-dims0[0] // d), -(-dims0[1] // d)) for d in downsamples)
    return SlideInfo("x.tif", "fake", "0", dims, tuple(float(d) for d in downsamples), mpp, mpp, "test")


@pytest.mark.parametrize(
    "downsamples, mpp, want",
    [
        ((1, 4, 16, 64), 0.25, (2, 2)),  # 4 µm level (closer to 8 than 16 µm), averaged ×2
        ((1, 4, 16), 0.5, (2, 1)),  # an 8 µm level: used as is
        ((1,), 0.25, (0, 32)),  # no pyramid: level 0 in chunks, averaged ×32
        ((1, 2), 0.25, (1, 16)),  # shallow pyramid: nothing ≥ 2 µm/px, coarsest level
        ((1, 4), 0.5, (1, 4)),  # 2 µm/px counts as near enough
    ],
)
def test_choose_seg_level(downsamples: tuple[int, ...], mpp: float, want: tuple[int, int]) -> None:
    from wsi_pipeline.tiling.lowres import choose_seg_level

    assert choose_seg_level(_info((4096, 4096), downsamples, mpp), 8.0) == want  # type: ignore[arg-type]


def test_read_lowres_in_chunks_equals_whole_image_average() -> None:
    from wsi_pipeline.slide.write import area_downsample
    from wsi_pipeline.tiling.lowres import read_lowres

    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, size=(301, 437, 3), dtype=np.uint8)
    info = _info((437, 301), (1,), 1.0)
    reads: list[tuple[int, int]] = []

    class FakeSlide:
        def read_region(self, loc: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
            reads.append(size)
            return img[loc[1] : loc[1] + size[1], loc[0] : loc[0] + size[0]]

    low = read_lowres(FakeSlide(), info, 0, 3, chunk=64)  # type: ignore[arg-type]
    np.testing.assert_array_equal(low.rgb, area_downsample(img, 3))
    assert max(max(s) for s in reads) <= 63  # 64 rounded down to a multiple of the factor
    assert low.mpp == 3.0 and low.scale == (3.0, 3.0) and low.unreadable_fraction == 0.0
