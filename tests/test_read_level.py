"""Patch pixels do not depend on the reader (issue 12 item 5).

On real Aperio pyramids a level's downsample is not an integer (99,999 px over 24,999 px:
4.00004). From a level-0 location that falls between level pixels OpenSlide interpolates
(bilinear, by the fraction) while tiffslide takes the pixel below, so ``--backend auto``
(tiffslide for plain Aperio) and ``--backend openslide`` would embed different pixels.

The rule (:meth:`SlideInfo.read_level_for_mpp`): patches are read only from levels that
subsample level 0 exactly (width and height times an integer ``n``), down to level 0; on
such a level the embed reader places every read on the level's pixel grid (a level-0
location that is a multiple of ``n``), so no backend resamples. Under it the two readers
give identical patches; without it they differ.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from slide_factory import FixtureSlide, TissueScene

from wsi_pipeline.config import TilingConfig
from wsi_pipeline.embed.regions import plan_regions, read_region_patches
from wsi_pipeline.errors import SlideReadError
from wsi_pipeline.slide import Slide, SlideInfo, open_slide
from wsi_pipeline.slide.write import area_downsample
from wsi_pipeline.store.coords import read_coords
from wsi_pipeline.tiling.stage import tile_slide

#: Small-slide tiling: 64-px patches at 1 µm/px on a 0.25 µm/px slide (level 1 would be 1 µm/px).
TILING = dict(target_mpp=1.0, patch_size=64, min_tissue_area=2000.0, min_hole_area=0.0, seg_level_mpp=4.0)


def write_floor_svs(path: Path, scene: TissueScene, mpp: float = 0.25, factor: int = 4, tile: int = 256) -> Path:
    """An Aperio-style SVS whose level 1 is ``floor(size / factor)``, as scanners write it:
    4003 x 3002 over 1000 x 750 is a downsample of 4.0028 (not an integer)."""
    w0, h0 = scene.width, scene.height
    rgb = scene.render(0, 0, w0, h0)
    w1, h1 = w0 // factor, h0 // factor
    level1 = area_downsample(rgb[: h1 * factor, : w1 * factor], factor)
    thumb = area_downsample(level1, 4)
    head = f"Aperio Image Library v12.0.15\r\n{w0}x{h0}"
    codec = dict(photometric="rgb", compression="jpeg", compressionargs={"level": 90}, metadata=None)
    fields = f"|AppMag = 40|MPP = {mpp}"
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(tile, tile), description=f"{head} [0,0 {w0}x{h0}] ({tile}x{tile}) JPEG/RGB Q=90{fields}",
                 **codec)
        tw.write(thumb, rowsperstrip=16, photometric="rgb", metadata=None,
                 description=f"{head} -> {thumb.shape[1]}x{thumb.shape[0]} - ")
        tw.write(level1, tile=(tile, tile), description=f"{head} -> {w1}x{h1} - ({tile}x{tile}) JPEG/RGB Q=90{fields}",
                 **codec)
    return path


@pytest.fixture(scope="module")
def floor_svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_floor_svs(tmp_path_factory.mktemp("floor") / "aperio.svs", TissueScene(4003, 3002, n_blobs=3, seed=5))


def _info(dims: tuple[tuple[int, int], ...]) -> SlideInfo:
    w0, h0 = dims[0]
    return SlideInfo("x", "t", "0", dims, tuple((w0 / w + h0 / h) / 2 for w, h in dims), mpp_x=0.25, mpp_y=0.25)


@pytest.mark.parametrize(("dims", "exact", "level"), [
    (((8192, 6144), (2048, 1536), (512, 384)), (1, 4, 16), 1),  # exact: the coarsest level <= 1 µm/px
    (((4003, 3002), (1000, 750)), (1, None), 0),  # Aperio floor: 4.0028
    (((4001, 3001), (1001, 751)), (1, None), 0),  # ceil (write_slide of an odd size): 3.997
    (((8192, 6001), (2048, 1500), (512, 375)), (1, None, None), 0),  # exact in x only
    (((8192, 6144), (2048, 1536), (511, 384)), (1, 4, None), 1),  # a bad top level does not matter here
])
def test_only_exact_levels_are_read(dims: tuple[tuple[int, int], ...], exact: tuple[int | None, ...],
                                    level: int) -> None:
    info = _info(dims)
    assert tuple(info.exact_downsample(k) for k in range(info.level_count)) == exact
    assert info.read_level_for_mpp(1.0) == level
    assert info.read_level_for_mpp(0.25) == 0


def test_both_readers_see_the_non_integer_level(floor_svs: Path) -> None:
    for backend in ("auto", "openslide"):
        with open_slide(floor_svs, backend) as s:
            assert s.info.level_dimensions == ((4003, 3002), (1000, 750))
            assert s.info.level_downsamples[1] == pytest.approx(4.0028333)
            assert s.info.best_level_for_mpp(1.0) == 1 and s.info.read_level_for_mpp(1.0) == 0
    assert open_slide(floor_svs).backend == "tiffslide"


def _patches(slide: Slide, coords: np.ndarray, level: int, patch_size_level0: int,
             region_size: int) -> np.ndarray:
    """Patches as the embed stage reads them (region-batched, cut at the level's pixels)."""
    ds = slide.info.level_downsamples[level]
    px = max(1, int(round(patch_size_level0 / ds)))
    plan = plan_regions(coords, level=level, downsample=ds, patch_px=px, region_size=region_size)
    out = np.zeros((len(coords), px, px, 3), np.uint8)
    for region in plan.regions:
        out[region.indices] = read_region_patches(slide, plan, region, coords)[0]
    return out


def _region_reads_fail(real: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """``read_region`` that fails on region-sized reads: every patch is then read on its own."""

    def small_only(location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if size[0] > 65:
            raise SlideReadError("simulated region failure")
        return real(location, level, size)

    return small_only


@pytest.mark.parametrize("region_size", [256, 2048])
def test_auto_and_openslide_tile_and_embed_the_same_pixels(floor_svs: Path, tmp_path: Path,
                                                           region_size: int) -> None:
    results = {}
    for backend in ("auto", "openslide"):
        r = tile_slide(floor_svs, tmp_path / backend, TilingConfig(backend=backend, **TILING))
        assert r.status == "ok" and r.n_patches, r.reason
        results[backend] = read_coords(r.coords_path)
    (coords, attrs), (coords_os, attrs_os) = results["auto"], results["openslide"]
    assert attrs["backend"] == "tiffslide" and attrs_os["backend"] == "openslide"
    assert attrs["patch_level"] == attrs_os["patch_level"] == 0  # level 1 skipped: 4.0028
    np.testing.assert_array_equal(coords, coords_os)
    ps0 = int(attrs["patch_size_level0"])
    with open_slide(floor_svs, "tiffslide") as a, open_slide(floor_svs, "openslide") as b:
        np.testing.assert_array_equal(_patches(a, coords, 0, ps0, region_size), _patches(b, coords, 0, ps0, region_size))
        # what the rule avoids: the same patches read at level 1 differ between the readers
        # (measured: up to 52 grey levels, 136 of 165 grid patches, with 256-px regions)
        if region_size == 256:
            at1 = np.abs(_patches(a, coords, 1, ps0, region_size).astype(np.int16) - _patches(b, coords, 1, ps0, region_size))
            assert at1.max() > 8


def test_exact_level_with_off_grid_coords_reads_alike_also_patch_by_patch(svs_slide: FixtureSlide,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An exact level (downsample 4) with a patch grid that is no multiple of 4 (259 px): the
    region read and the patch-by-patch fallback both stay on the level's pixel grid."""
    coords = np.array([[259 * i, 259 * j] for i in range(8, 14) for j in range(8, 12)], np.int64)
    got = {}
    for backend in ("tiffslide", "openslide"):
        with open_slide(svs_slide.path, backend) as s:
            assert s.info.read_level_for_mpp(1.01) == 1
            whole = _patches(s, coords, 1, 259, 512)
            monkeypatch.setattr(s, "read_region", _region_reads_fail(s.read_region))
            np.testing.assert_array_equal(_patches(s, coords, 1, 259, 512), whole, err_msg=backend)
            got[backend] = whole
    np.testing.assert_array_equal(got["tiffslide"], got["openslide"])
