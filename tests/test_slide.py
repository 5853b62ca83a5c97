"""Slide I/O: metadata normalisation, backends, cross-backend pixels, errors, processes."""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import operator
import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import tifffile
from PIL import Image
from slide_factory import FixtureSlide, tissue_image

from wsi_pipeline.errors import MissingMppError, SlideOpenError, SlideReadError, UnsupportedFormatError
from wsi_pipeline.slide import Slide, SlideInfo, open_slide, registered_backends
from wsi_pipeline.slide import base as slide_base
from wsi_pipeline.slide._mpp import TiffResolution, normalise_metadata
from wsi_pipeline.slide.write import write_corrupt_tile_slide, write_slide

WHITE = np.uint8(255)


# -- _mpp: the parsing table ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("props", "expected", "source"),
    [
        ({"aperio.MPP": "0.2527"}, (0.2527, 0.2527), "aperio.MPP"),
        ({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.26", "aperio.MPP": "0.5"}, (0.25, 0.26),
         "openslide.mpp-x"),
        ({"tiffslide.mpp-x": "0.5", "tiffslide.mpp-y": "0.5"}, (0.5, 0.5), "tiffslide.mpp-x"),
        ({"openslide.mirax.MPP": "0.243"}, (0.243, 0.243), "openslide.mirax.MPP"),
        ({"hamamatsu.XResolution": "40000", "hamamatsu.YResolution": "50000"}, (0.25, 0.2),
         "hamamatsu.XResolution"),
        ({"tiff.XResolution": "20000", "tiff.YResolution": "20000", "tiff.ResolutionUnit": "centimeter"},
         (0.5, 0.5), "tiff.XResolution"),
        ({"tiff.XResolution": "101600", "tiff.YResolution": "101600", "tiff.ResolutionUnit": "inch"},
         (0.25, 0.25), "tiff.XResolution"),
        # garbage in a more trusted key falls through to the next entry
        ({"aperio.MPP": "n/a", "tiff.XResolution": "40000", "tiff.ResolutionUnit": "CENTIMETER"},
         (0.25, 0.25), "tiff.XResolution"),
    ],
)
def test_mpp_table_finds_value_and_source(props: dict[str, str], expected: tuple[float, float],
                                          source: str) -> None:
    meta = normalise_metadata(props)
    assert meta.mpp_x == pytest.approx(expected[0])
    assert meta.mpp_y == pytest.approx(expected[1])
    assert meta.mpp_source == source


@pytest.mark.parametrize(
    "props",
    [
        {},
        {"aperio.MPP": "abc"},
        {"aperio.MPP": "0"},
        {"aperio.MPP": "-0.5"},
        {"aperio.MPP": "nan"},
        {"openslide.mpp-x": "inf", "openslide.mpp-y": "inf"},
        {"aperio.MPP": "5000"},  # implausible: a unit error, not a microscope
        {"tiff.XResolution": "72", "tiff.YResolution": "72", "tiff.ResolutionUnit": "inch"},  # placeholder
        {"tiff.XResolution": "96", "tiff.YResolution": "96", "tiff.ResolutionUnit": "inch"},  # placeholder
        {"tiff.XResolution": "20000", "tiff.YResolution": "20000", "tiff.ResolutionUnit": "none"},
        {"tiff.XResolution": "20000", "tiff.YResolution": "20000"},  # no unit at all
        {"tiff.XResolution": "0", "tiff.YResolution": "0", "tiff.ResolutionUnit": "centimeter"},
    ],
)
def test_mpp_missing_invalid_and_placeholder_values(props: dict[str, str]) -> None:
    meta = normalise_metadata(props)
    assert (meta.mpp_x, meta.mpp_y, meta.mpp_source) == (None, None, "none")


@pytest.mark.parametrize(
    ("resolution", "expected"),
    [
        (TiffResolution(20000.0, 20000.0, 3), 0.5),
        (TiffResolution(50800.0, 50800.0, "inch"), 0.5),
        (TiffResolution(72.0, 72.0, 2), None),
        (TiffResolution(1.0, 1.0, 1), None),  # what tifffile writes when it knows nothing
        (TiffResolution(float("nan"), 2.0, 3), None),
    ],
)
def test_mpp_from_tiff_resolution_tags(resolution: TiffResolution, expected: float | None) -> None:
    meta = normalise_metadata({}, resolution)
    assert meta.mpp_x == (pytest.approx(expected) if expected else None)
    assert meta.mpp_source == ("tiff.XResolution" if expected else "none")


def test_mpp_properties_win_over_resolution_tags() -> None:
    meta = normalise_metadata({"aperio.MPP": "0.25"}, TiffResolution(20000.0, 20000.0, 3))
    assert (meta.mpp_x, meta.mpp_source) == (0.25, "aperio.MPP")


@pytest.mark.parametrize(
    ("props", "power", "vendor"),
    [
        ({"openslide.objective-power": "40", "aperio.AppMag": "20", "openslide.vendor": "aperio"}, 40.0,
         "aperio"),
        ({"aperio.AppMag": "20"}, 20.0, None),
        ({"tiffslide.objective-power": "10", "tiffslide.vendor": "leica"}, 10.0, "leica"),
        ({"aperio.AppMag": "garbage", "openslide.vendor": ""}, None, None),
    ],
)
def test_objective_power_and_vendor(props: dict[str, str], power: float | None, vendor: str | None) -> None:
    meta = normalise_metadata(props)
    assert (meta.objective_power, meta.vendor) == (power, vendor)


# -- metadata per backend and layout ------------------------------------------------------------
SVS_DIMS = ((8192, 6144), (2048, 1536), (512, 384), (128, 96))
TIFF_DIMS = ((4096, 3072), (1024, 768), (256, 192))


@pytest.mark.parametrize(
    ("fixture", "backend", "dims", "mpp", "source", "power", "vendor"),
    [
        ("svs_slide", "openslide", SVS_DIMS, 0.25, "openslide.mpp-x", 40.0, "aperio"),
        ("svs_slide", "tiffslide", SVS_DIMS, 0.25, "tiffslide.mpp-x", 40.0, "aperio"),
        ("tiff_slide", "openslide", TIFF_DIMS, 0.5, "openslide.mpp-x", None, "generic-tiff"),
        ("tiff_slide", "tiffslide", TIFF_DIMS, 0.5, "tiffslide.mpp-x", None, None),
        ("tiff_slide", "image", TIFF_DIMS[:1], 0.5, "tiff.XResolution", None, None),
        ("nompp_slide", "openslide", ((2048, 1536), (512, 384)), None, "none", None, "generic-tiff"),
        ("nompp_slide", "tiffslide", ((2048, 1536), (512, 384)), None, "none", None, None),
        ("nompp_slide", "image", ((2048, 1536),), None, "none", None, None),
    ],
)
def test_metadata_per_backend_and_layout(
    request: pytest.FixtureRequest, fixture: str, backend: str, dims: tuple[tuple[int, int], ...],
    mpp: float | None, source: str, power: float | None, vendor: str | None,
) -> None:
    fs: FixtureSlide = request.getfixturevalue(fixture)
    with open_slide(fs.path, backend) as slide:
        info = slide.info
    assert isinstance(info, SlideInfo)
    assert (info.backend, info.path) == (backend, str(fs.path))
    assert info.level_dimensions == dims
    assert info.level_downsamples == tuple(float(dims[0][0] // d[0]) for d in dims)
    assert (info.mpp_x, info.mpp_y, info.mpp_source) == (mpp, mpp, source)
    assert (info.objective_power, info.vendor) == (power, vendor)
    assert info.properties  # raw properties are kept
    if mpp is None:
        with pytest.raises(MissingMppError, match="no physical resolution"):
            _ = info.mpp
    else:
        assert info.level_mpp(info.level_count - 1) == pytest.approx(mpp * info.level_downsamples[-1])


def test_backend_versions_name_the_libraries(svs_slide: FixtureSlide) -> None:
    import openslide
    import tiffslide

    assert openslide.__library_version__ in open_slide(svs_slide.path, "openslide").info.backend_version
    assert tiffslide.__version__ in open_slide(svs_slide.path, "tiffslide").info.backend_version


@pytest.mark.parametrize(
    ("ext", "order"),
    [
        (None, ["openslide", "tiffslide", "image"]),  # default priorities
        (".svs", ["tiffslide", "openslide"]),  # TIFF family: the faster identical reader first
        (".TIF", ["tiffslide", "openslide", "image"]),
        (".tiff", ["tiffslide", "openslide", "image"]),
        (".ndpi", ["openslide", "tiffslide"]),  # other vendors: OpenSlide first
        (".scn", ["openslide", "tiffslide"]),
        (".png", ["image"]),
    ],
)
def test_auto_probing_order_per_extension(ext: str | None, order: list[str]) -> None:
    names = [s.name for s in registered_backends(ext) if ext is None or ext.lower() in s.extensions]
    assert names[: len(order)] == order and len(names) == len(order)


@pytest.mark.parametrize("fixture", ["svs_slide", "tiff_slide", "nompp_slide"])
def test_auto_reads_aperio_and_generic_tiff_with_tiffslide(request: pytest.FixtureRequest, fixture: str) -> None:
    fs: FixtureSlide = request.getfixturevalue(fixture)
    with open_slide(fs.path) as s:
        assert s.backend == "tiffslide" and s.info.backend == "tiffslide"
        assert all(level is not None for level in s._get_handle()._levels)  # the tile-decoding path


# -- pixels: openslide == tiffslide, truth, white outside -------------------------------------
def _regions(fs: FixtureSlide) -> list[tuple[tuple[int, int], int, tuple[int, int]]]:
    w, h = fs.size
    top = len(fs.downsamples) - 1
    d1, dt = fs.downsamples[1], fs.downsamples[top]
    return [
        ((1024, 1024), 0, (256, 256)),  # tile aligned
        ((1000, 1500), 0, (300, 200)),  # crosses tile borders
        ((w - 100, h - 60), 0, (256, 256)),  # crosses the right and bottom edges
        ((-100, -50), 0, (256, 256)),  # crosses the top-left edge
        ((w + 10, 0), 0, (64, 64)),  # fully out of bounds
        ((0, h + 5000), 0, (64, 64)),  # fully out of bounds
        ((d1 * 200, d1 * 120), 1, (300, 300)),  # level 1, crosses tile borders
        ((w - d1 * 50, h - d1 * 30), 1, (128, 128)),  # level 1 edge
        ((0, 0), top, (w // dt + 20, h // dt + 10)),  # whole top level plus a margin
    ]


@pytest.mark.parametrize("fixture", ["svs_slide", "tiff_slide"])
def test_openslide_and_tiffslide_return_identical_pixels(request: pytest.FixtureRequest, fixture: str) -> None:
    fs: FixtureSlide = request.getfixturevalue(fixture)
    with open_slide(fs.path, "openslide") as a, open_slide(fs.path, "tiffslide") as b:
        for loc, level, size in _regions(fs):
            pa, pb = a.read_region(loc, level, size), b.read_region(loc, level, size)
            assert pa.shape == (size[1], size[0], 3) and pa.dtype == np.uint8
            np.testing.assert_array_equal(pa, pb, err_msg=f"{loc} level {level} {size}")


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_pixels_match_truth_and_outside_is_white(svs_slide: FixtureSlide, backend: str) -> None:
    w, h = svs_slide.size
    mask = svs_slide.mask
    ys, xs = np.nonzero(mask[::64, ::64])
    x, y = int(xs[len(xs) // 2]) * 64, int(ys[len(ys) // 2]) * 64  # a point inside tissue
    with open_slide(svs_slide.path, backend) as s:
        got = s.read_region((x, y), 0, (256, 256)).astype(np.int16)
        truth = svs_slide.pixels(x, y, 256, 256).astype(np.int16)
        assert np.abs(got - truth).mean() < 4.0  # JPEG Q90
        edge = s.read_region((w - 100, h - 60), 0, (256, 256))
        assert (edge[60:] == WHITE).all() and (edge[:, 100:] == WHITE).all()
        assert np.abs(edge[:60, :100].astype(np.int16) - svs_slide.pixels(w - 100, h - 60, 100, 60)).mean() < 4
        assert (s.read_region((-300, -300), 0, (200, 200)) == WHITE).all()


def test_premultiplied_argb_is_composited_on_white() -> None:
    from wsi_pipeline.slide._openslide import argb32_to_rgb

    pixels = [(100, 50, 0, 255), (0, 0, 0, 0), (60, 30, 10, 128), (16, 0, 16, 16)]  # (r, g, b, a)
    argb = np.array([[(a << 24) | (r << 16) | (g << 8) | b for r, g, b, a in pixels]], np.uint32)
    expected = np.array([[[100, 50, 0], [255, 255, 255], [60 + 127, 30 + 127, 10 + 127], [255, 239, 255]]],
                        np.uint8)
    np.testing.assert_array_equal(argb32_to_rgb(argb), expected)
    opaque = argb[:, :1].repeat(3, axis=1)
    np.testing.assert_array_equal(argb32_to_rgb(opaque), np.full((1, 3, 3), [100, 50, 0], np.uint8))
    assert argb32_to_rgb(np.zeros((0, 5), np.uint32)).shape == (0, 5, 3)


def _edge_regions(fs: FixtureSlide) -> list[tuple[tuple[int, int], int, tuple[int, int]]]:
    """Reads at levels > 0 from locations that are not multiples of the downsample: OpenSlide
    resamples them and returns partly transparent pixels along the slide edges."""
    w, h = fs.size
    d1 = fs.downsamples[1]
    return [((w - d1 * 50 + 1, h - d1 * 30 + 3), 1, (128, 128)), ((w - d1 * 40 - 2, 5), 1, (96, 64))]


def test_openslide_fast_path_matches_openslide_python(svs_slide: FixtureSlide) -> None:
    """The raw premultiplied read equals openslide-python's straight RGBA composited on white."""
    import openslide

    from wsi_pipeline.slide._openslide import straight_rgba_to_rgb

    partial = 0
    with open_slide(svs_slide.path, "openslide") as ours, openslide.OpenSlide(str(svs_slide.path)) as ref:
        assert ours._get_handle()._read_raw is not None  # the fast path is in use
        for loc, level, size in _regions(svs_slide) + _edge_regions(svs_slide):
            rgba = np.asarray(ref.read_region(loc, level, size))
            expected = straight_rgba_to_rgb(rgba).astype(np.int16)
            got = ours.read_region(loc, level, size).astype(np.int16)
            alpha = rgba[..., 3]
            exact = (alpha == 0) | (alpha == 255)
            np.testing.assert_array_equal(got[exact], expected[exact], err_msg=f"{loc} level {level}")
            assert np.abs(got - expected).max() <= 1  # un-premultiplying rounds
            partial += int((~exact).sum())
    assert partial > 100  # the edge reads did exercise partial alpha


def test_openslide_public_api_fallback(svs_slide: FixtureSlide, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_pipeline.slide import _openslide

    with open_slide(svs_slide.path, "openslide") as fast:
        expected = [fast.read_region(*r) for r in _regions(svs_slide) + _edge_regions(svs_slide)]
    monkeypatch.setattr(_openslide, "_lowlevel_reader", lambda: None)
    with open_slide(svs_slide.path, "openslide") as slow:
        assert slow._get_handle()._read_raw is None
        for r, want in zip(_regions(svs_slide) + _edge_regions(svs_slide), expected, strict=True):
            got = slow.read_region(*r).astype(np.int16)
            assert np.abs(got - want).max() <= 1, r


def test_straight_alpha_composite_rounds_to_nearest() -> None:
    from wsi_pipeline.slide._openslide import straight_rgba_to_rgb

    rgba = np.array([[[200, 100, 0, 128], [7, 8, 9, 255], [1, 2, 3, 0]]], np.uint8)
    c, a = np.array([200, 100, 0]), 128
    expected = np.array([[np.round(c * a / 255 + 255 - a), [7, 8, 9], [255, 255, 255]]], np.uint8)
    np.testing.assert_array_equal(straight_rgba_to_rgb(rgba), expected)


def test_level_out_of_range_is_a_read_error(tiff_slide: FixtureSlide) -> None:
    with open_slide(tiff_slide.path) as s, pytest.raises(SlideReadError, match="level 7 out of range"):
        s.read_region((0, 0), 7, (10, 10))


# -- image backend ----------------------------------------------------------------------------
def test_image_backend_reads_png_exactly_with_dpi_mpp(roi_png: FixtureSlide) -> None:
    with open_slide(roi_png.path) as s:
        assert s.backend == "image"
        assert s.info.level_dimensions == (roi_png.size,)
        assert (s.info.mpp_x, s.info.mpp_source) == (pytest.approx(0.5), "tiff.XResolution")
        np.testing.assert_array_equal(s.read_region((0, 0), 0, roi_png.size), roi_png.pixels(0, 0, *roi_png.size))
        part = s.read_region((300, 200), 0, (100, 100))
        np.testing.assert_array_equal(part[:56, :84], roi_png.pixels(300, 200, 84, 56))
        assert (part[56:] == WHITE).all() and (part[:, 84:] == WHITE).all()


def test_image_backend_grey_and_rgba(tmp_path: Path) -> None:
    grey = np.arange(64 * 48, dtype=np.uint8).reshape(48, 64)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    rgba[:4, ..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    with open_slide(tmp_path / "g.png") as s:
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (64, 48)), np.repeat(grey[..., None], 3, axis=2))
        assert s.info.mpp_x is None
    with open_slide(tmp_path / "a.png") as s:
        px = s.read_region((0, 0), 0, (8, 8))
        assert (px[:4] == [200, 0, 0]).all() and (px[4:] == WHITE).all()


def test_image_backend_reads_large_stripped_tiff_lazily(tmp_path: Path) -> None:
    """A region read touches only its strips: a damaged strip elsewhere does not matter."""
    rgb, _ = tissue_image(1200, 1000, n_blobs=2, seed=5)
    path = tmp_path / "roi.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", rowsperstrip=50, compression="zlib", metadata=None,
                     resolution=(101600.0, 101600.0), resolutionunit="INCH")
    with tifffile.TiffFile(path) as tf:
        offset, nbytes = tf.pages[0].dataoffsets[-1], tf.pages[0].databytecounts[-1]
    with open(path, "r+b") as fh:  # zero the last strip
        fh.seek(offset)
        fh.write(b"\0" * nbytes)
    with open_slide(path) as s:
        assert s.backend == "tiffslide"  # a .tif is probed as a slide first
    with open_slide(path, "image") as s:
        assert s.info.level_dimensions == ((1200, 1000),)
        assert (s.info.mpp_x, s.info.mpp_source) == (pytest.approx(0.25), "tiff.XResolution")
        np.testing.assert_array_equal(s.read_region((100, 120), 0, (700, 300)), rgb[120:420, 100:800])
        with pytest.raises(SlideReadError, match="cannot read region"):
            s.read_region((0, 960), 0, (100, 40))


# -- auto probing and fallback --------------------------------------------------------------
class _RefusingBackend:
    name: ClassVar[str] = "refusing"
    opened = 0

    def __init__(self, path: str) -> None:
        type(self).opened += 1
        raise OSError("refusing backend says no\nsecond line")  # a file error (the default test)


def test_auto_falls_back_to_the_next_backend(monkeypatch: pytest.MonkeyPatch, tiff_slide: FixtureSlide) -> None:
    spec = slide_base.BackendSpec("refusing", _RefusingBackend, 0, frozenset({".tif"}), lambda: True, lambda: "0")
    monkeypatch.setitem(slide_base._BACKENDS, "refusing", spec)
    _RefusingBackend.opened = 0
    with open_slide(tiff_slide.path) as s:
        assert s.backend == "tiffslide"
    assert _RefusingBackend.opened == 1
    with pytest.raises(SlideOpenError, match="refusing cannot open it: refusing backend says no$"):
        open_slide(tiff_slide.path, "refusing")


def test_stripped_tiff_is_read_through_tiffslides_zarr_store(tmp_path: Path) -> None:
    rgb, _ = tissue_image(300, 200, n_blobs=1, seed=2)
    path = tmp_path / "stripped.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", metadata=None)  # not tiled: OpenSlide refuses it
    with pytest.raises(SlideOpenError, match="openslide cannot open it"):
        open_slide(path, "openslide")
    with open_slide(path) as s:
        assert s.backend == "tiffslide" and s._get_handle()._levels == [None]
        np.testing.assert_array_equal(s.read_region((10, 20), 0, (100, 50)), rgb[20:70, 10:110])


class _DeferringBackend:
    """Opens anything, asks ``auto`` to try the next backend first, counts closes."""

    name: ClassVar[str] = "deferring"
    closed = 0

    def __init__(self, path: str) -> None:
        self.info = SlideInfo(path, self.name, "0", ((64, 64),), (1.0,))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return np.zeros((size[1], size[0], 3), np.uint8)

    def close(self) -> None:
        type(self).closed += 1


def test_deferring_backend_yields_to_the_next_and_is_closed(monkeypatch: pytest.MonkeyPatch,
                                                             tiff_slide: FixtureSlide) -> None:
    spec = slide_base.BackendSpec("deferring", _DeferringBackend, 0, frozenset({".tif"}), lambda: True,
                                  lambda: "0", {}, lambda handle: "test says so")
    monkeypatch.setitem(slide_base._BACKENDS, "deferring", spec)
    _DeferringBackend.closed = 0
    with open_slide(tiff_slide.path) as s:
        assert s.backend == "tiffslide"  # the next candidate for .tif
    assert _DeferringBackend.closed == 1
    assert open_slide(tiff_slide.path, "deferring").backend == "deferring"  # explicit choice: no deferring


def _j2k_svs(path: Path, compression: int | str) -> tuple[Path, np.ndarray]:
    rgb, _ = tissue_image(768, 512, n_blobs=1, seed=9)
    desc = "Aperio Image Library v12.0.15 \r\n768x512 [0,0 768x512] (256x256) J2K|AppMag = 20|MPP = 0.5"
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(256, 256), compression=compression, description=desc,
                     metadata=None)
    return path, rgb


def test_jpeg2000_svs_is_left_to_openslide(tmp_path: Path) -> None:
    """Aperio JPEG 2000 tiles (33005): tiffslide defers, OpenSlide reads the file."""
    path, rgb = _j2k_svs(tmp_path / "j2k.svs", 33005)
    with open_slide(path) as s:
        assert s.backend == "openslide"
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (768, 512)), rgb)  # lossless J2K
    with open_slide(path, "tiffslide") as t:  # still readable on request
        np.testing.assert_array_equal(t.read_region((0, 0), 0, (768, 512)), rgb)


def test_deferred_tiffslide_is_used_when_openslide_cannot_open(tmp_path: Path) -> None:
    path, rgb = _j2k_svs(tmp_path / "j2k-generic.svs", "jpeg2000")  # 34712: not an OpenSlide codec
    with pytest.raises(SlideOpenError, match="openslide cannot open it"):
        open_slide(path, "openslide")
    with open_slide(path) as s:
        assert s.backend == "tiffslide"
        np.testing.assert_array_equal(s.read_region((100, 50), 0, (300, 200)), rgb[50:250, 100:400])


def test_defer_reasons_for_other_vendors_and_codecs(tiff_slide: FixtureSlide) -> None:
    from wsi_pipeline.slide._tiffslide import TiffSlideBackend, defer_reason

    handle = TiffSlideBackend(str(tiff_slide.path))
    try:
        assert handle.vendor == "" and handle.codecs == {7} and defer_reason(handle) is None
        handle.vendor = "philips_tiff"
        assert "vendor 'philips_tiff'" in str(defer_reason(handle))
        handle.vendor, handle.codecs = "aperio", frozenset({7, 33003})
        assert "compression [33003]" in str(defer_reason(handle))
    finally:
        handle.close()


def test_tiffslide_missing_tiles_are_white_like_openslide(tmp_path: Path) -> None:
    """Tiles with byte count 0 (left out by the scanner) are white in both readers."""
    rgb, _ = tissue_image(768, 512, n_blobs=2, seed=11)
    path = write_slide(tmp_path / "sparse.svs", rgb, mpp=0.5, levels=(1, 2), tile_size=256)
    with tifffile.TiffFile(path, mode="r+b") as tf:
        counts = list(tf.pages[0].databytecounts)
        counts[1] = 0  # tile (1, 0)
        tf.pages[0].tags["TileByteCounts"].overwrite(counts)
    with open_slide(path, "openslide") as a, open_slide(path, "tiffslide") as b:
        assert b._get_handle()._levels[0] is not None
        pa, pb = a.read_region((200, 0), 0, (400, 300)), b.read_region((200, 0), 0, (400, 300))
        assert (pb[:256, 56:312] == WHITE).all() and not (pb[:256, :56] == WHITE).all()
        np.testing.assert_array_equal(pa, pb)


def test_tiffslide_tile_path_reads_grey_tiles(tmp_path: Path) -> None:
    grey = np.arange(300 * 200, dtype=np.uint32).reshape(200, 300).astype(np.uint8)
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, grey, tile=(64, 64), compression="zlib", metadata=None)
    with open_slide(path, "tiffslide") as s:
        assert s._get_handle()._levels[0] is not None
        got = s.read_region((250, 150), 0, (100, 80))
    assert (got[50:] == WHITE).all() and (got[:, 50:] == WHITE).all()
    np.testing.assert_array_equal(got[:50, :50], np.repeat(grey[150:, 250:, None], 3, axis=2))


def test_tiffslide_tile_path_equals_zarr_path(svs_slide: FixtureSlide) -> None:
    with open_slide(svs_slide.path, "tiffslide") as s:
        handle = s._get_handle()
        fast = [s.read_region(*r) for r in _regions(svs_slide)]
        handle._levels = [None] * len(handle._levels)  # force tiffslide's zarr store
        for r, want in zip(_regions(svs_slide), fast, strict=True):
            np.testing.assert_array_equal(s.read_region(*r), want, err_msg=str(r))


def test_tiffslide_close_releases_the_file_descriptor(tiff_slide: FixtureSlide) -> None:
    import os

    from wsi_pipeline.slide._tiffslide import TiffSlideBackend

    handle = TiffSlideBackend(str(tiff_slide.path))
    fd = handle._fd
    os.fstat(fd)
    handle.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    handle.close()  # idempotent


# -- open errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "error", "pattern"),
    [
        ("zero_byte", SlideOpenError, "file is empty"),
        ("truncated", SlideOpenError, "not a readable slide.*truncated"),
        ("text", SlideOpenError, "not a readable slide"),
        ("unsupported", UnsupportedFormatError, "unsupported extension '.xyz'"),
    ],
)
def test_open_errors_are_typed_and_one_line(corrupt_files: dict[str, Path], name: str,
                                            error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern) as exc:
        open_slide(corrupt_files[name])
    message = str(exc.value)
    assert "\n" not in message and str(corrupt_files[name]) in message
    if error is SlideOpenError:
        assert not isinstance(exc.value, UnsupportedFormatError)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_truncated_file_is_refused_by_each_slide_backend(corrupt_files: dict[str, Path], backend: str) -> None:
    with pytest.raises(SlideOpenError, match=f"{backend} cannot open it"):
        open_slide(corrupt_files["truncated"], backend)


def test_unknown_backend_and_missing_file(tiff_slide: FixtureSlide, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match="unknown backend 'bioformats' \\(known: openslide"):
        open_slide(tiff_slide.path, "bioformats")
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "absent.svs")
    with pytest.raises(SlideOpenError, match="is a folder, not a slide file"):
        open_slide(tmp_path)


# -- processes: pickle, spawn, fork ----------------------------------------------------------
REGION = ((1000, 1500), 0, (300, 200))


def test_slide_pickles_and_reopens_lazily(tiff_slide: FixtureSlide) -> None:
    s = open_slide(tiff_slide.path, "tiffslide")
    expected = s.read_region(*REGION)
    clone = pickle.loads(pickle.dumps(s))
    assert clone._handle is None and clone.backend == "tiffslide" and clone.info == s.info
    np.testing.assert_array_equal(clone.read_region(*REGION), expected)
    assert clone._handle is not None


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_slide_reads_identically_in_child_processes(svs_slide: FixtureSlide, method: str) -> None:
    if method not in mp.get_all_start_methods():
        pytest.skip(f"{method} not available on this platform")
    slide = open_slide(svs_slide.path)
    expected = slide.read_region(*REGION)  # the parent's handle is open before the fork
    reader = operator.methodcaller("read_region", *REGION)
    with mp.get_context(method).Pool(1) as pool:
        got = pool.apply(reader, (slide,))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(slide.read_region(*REGION), expected)  # parent unaffected


# -- reopen once after a read error ---------------------------------------------------------
class _FlakyBackend:
    """Fails the first ``fail_reads`` reads (over all handles) and counts opens."""

    name: ClassVar[str] = "flaky"
    opened = 0
    fail_reads = 1

    def __init__(self, path: str) -> None:
        type(self).opened += 1
        self.info = SlideInfo(path, self.name, "0", ((64, 64),), (1.0,))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if type(self).fail_reads:
            type(self).fail_reads -= 1
            raise OSError("simulated decode error")
        return np.zeros((size[1], size[0], 3), np.uint8)

    def close(self) -> None:
        pass


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> type[_FlakyBackend]:
    spec = slide_base.BackendSpec("flaky", _FlakyBackend, 99, frozenset(), lambda: True, lambda: "0")
    monkeypatch.setitem(slide_base._BACKENDS, "flaky", spec)
    _FlakyBackend.opened = 0
    return _FlakyBackend


def test_read_error_reopens_once_then_succeeds(flaky: type[_FlakyBackend], tiff_slide: FixtureSlide,
                                               caplog: pytest.LogCaptureFixture) -> None:
    flaky.fail_reads = 1
    s = Slide(tiff_slide.path, backend="flaky")
    with caplog.at_level(logging.DEBUG, logger="wsi_pipeline.slide.slide"):
        out = s.read_region((0, 0), 0, (4, 3))
    assert out.shape == (3, 4, 3) and flaky.opened == 2
    assert "reopening once" in caplog.text


def test_read_error_twice_raises_slide_read_error(flaky: type[_FlakyBackend], tiff_slide: FixtureSlide) -> None:
    flaky.fail_reads = 5
    s = Slide(tiff_slide.path, backend="flaky")
    with pytest.raises(SlideReadError, match=r"cannot read region at \(8, 9\) level 0: simulated decode error"):
        s.read_region((8, 9), 0, (4, 4))
    assert flaky.opened == 2  # the first open and exactly one reopen


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_corrupt_tile_raises_and_slide_keeps_working(tmp_path: Path, backend: str) -> None:
    rgb, _ = tissue_image(768, 512, n_blobs=2, seed=6)
    path = write_corrupt_tile_slide(tmp_path / "bad.svs", rgb, tile_xy=(1, 0), mpp=0.5, levels=(1, 2))
    with open_slide(path, backend) as s:
        good = s.read_region((0, 300), 0, (256, 200))
        with pytest.raises(SlideReadError, match="cannot read region at \\(300, 10\\)"):
            s.read_region((300, 10), 0, (100, 100))
        # OpenSlide errors are sticky: the reopen makes the slide usable again
        np.testing.assert_array_equal(s.read_region((0, 300), 0, (256, 200)), good)


def test_write_slide_roundtrip_via_every_reader(tmp_path: Path) -> None:
    """Lossless slide: every backend returns the exact source pixels at level 0."""
    rgb, _ = tissue_image(700, 500, n_blobs=2, seed=7)
    path = write_slide(tmp_path / "lossless.tif", rgb, layout="generic", compression="deflate", mpp=0.5,
                       levels=(1, 2))
    for backend in ("openslide", "tiffslide", "image"):
        with open_slide(path, backend) as s:
            np.testing.assert_array_equal(s.read_region((0, 0), 0, (700, 500)), rgb, err_msg=backend)
            assert math.isclose(s.info.mpp, 0.5)


@pytest.mark.parametrize("backend", ["tiffslide", "image"])
def test_sixteen_bit_tiff_is_refused_at_open(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint16), photometric="rgb", tile=(16, 16), metadata=None)
    with pytest.raises(SlideOpenError, match=f"{backend} cannot open it: unsupported sample type uint16"):
        open_slide(path, backend)


# -- the test-slide factory itself ----------------------------------------------------------
def test_tissue_image_truth_mask_is_exact_and_deterministic() -> None:
    from slide_factory import GLASS_NOISE, GLASS_RGB, TissueScene

    rgb, mask = tissue_image(900, 700, n_blobs=3, seed=21)
    assert rgb.shape == (700, 900, 3) and rgb.dtype == np.uint8 and mask.shape == (700, 900)
    assert 0.05 < mask.mean() < 0.6
    assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
    glass_dev = np.abs(rgb.astype(np.int16) - np.array(GLASS_RGB, np.int16))
    assert (glass_dev[~mask] <= GLASS_NOISE).all()  # background is glass, nothing else
    assert (glass_dev[mask] > GLASS_NOISE).any(axis=1).all()  # every tissue pixel is stained
    again, mask2 = tissue_image(900, 700, n_blobs=3, seed=21)
    np.testing.assert_array_equal(again, rgb)
    np.testing.assert_array_equal(mask2, mask)
    assert not np.array_equal(tissue_image(900, 700, n_blobs=3, seed=22)[1], mask)
    scene = TissueScene(900, 700, n_blobs=3, seed=21)  # regions agree with the whole image
    np.testing.assert_array_equal(scene.render(123, 77, 301, 250), rgb[77:327, 123:424])
    np.testing.assert_array_equal(scene.mask(123, 77, 301, 250), mask[77:327, 123:424])
    coarse = TissueScene(2100, 1100, n_blobs=2, seed=3)  # mask grid of 3-px cells
    assert coarse.step == 3
    full, whole_mask = coarse.render(0, 0, 2100, 1100), coarse.mask()
    np.testing.assert_array_equal(coarse.render(1001, 502, 200, 100), full[502:602, 1001:1201])
    np.testing.assert_array_equal(coarse.mask(1001, 502, 200, 100), whole_mask[502:602, 1001:1201])


def test_blank_fixture_has_no_tissue(blank_slide: FixtureSlide) -> None:
    assert not blank_slide.mask.any()
    with open_slide(blank_slide.path) as s:
        low = s.read_region((0, 0), 1, s.info.level_dimensions[1]).astype(np.int16)
    assert np.abs(low - 240).max() <= 6  # glass everywhere, JPEG noise aside
