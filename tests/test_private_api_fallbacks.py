"""Every private API the package leans on has a public fallback, taken when the private one
is missing, has another signature or behaves otherwise (issue 12 item 4).

* ``openslide.lowlevel._read_region`` with the handle's ``_osr`` (OpenSlide fast path);
* tiffslide's internals behind the tile path (``TiffSlide.ts_tifffile``, the series it
  picked) and tifffile's page decoder;
* ``torch.Tensor._version`` (the similarity cache).

Each test breaks one of them and checks that the public path is used and gives the same
pixels (or, for ``_version``, that the cache is still invalidated by an in-place change).
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from slide_factory import FixtureSlide

from wsi_pipeline.slide import open_slide

Region = tuple[tuple[int, int], int, tuple[int, int]]


def _regions(fs: FixtureSlide) -> list[Region]:
    """Inside tissue and glass, across tile borders and the slide edges, at levels 0 and 1."""
    w, h = fs.size
    d1 = fs.downsamples[1]
    return [((1024, 1024), 0, (256, 256)), ((1000, 1500), 0, (300, 200)), ((w - 100, h - 60), 0, (256, 256)),
            ((-100, -50), 0, (256, 256)), ((d1 * 200, d1 * 120), 1, (300, 300)), ((0, 0), 1, (w // d1, h // d1))]


def _read_all(fs: FixtureSlide, backend: str) -> tuple[list[np.ndarray], Any]:
    """The pixels of :func:`_regions` through ``backend``, and the handle that read them."""
    with open_slide(fs.path, backend) as s:
        return [s.read_region(*r) for r in _regions(fs)], s._get_handle()


# -- OpenSlide: lowlevel._read_region and OpenSlide._osr ---------------------------------------
def _raises(error: Exception) -> Callable[..., None]:
    def fn(*args: object) -> None:
        raise error

    return fn


def _other_signature(slide: object, x: int, y: int, level: int, w: int, h: int) -> None:
    """A binding that no longer takes the output buffer."""


def _fills_nothing(slide: object, buf: object, x: int, y: int, level: int, w: int, h: int) -> None:
    """Same signature, other behaviour: returns without writing pixels."""


_REAL_OPENSLIDE = __import__("openslide").OpenSlide


class _NoPrivateHandle:
    """openslide.OpenSlide as a release that renamed ``_osr`` would look from outside."""

    def __init__(self, path: str) -> None:
        self._inner = _REAL_OPENSLIDE(path)
        for name in ("level_dimensions", "level_downsamples", "properties", "read_region", "close"):
            setattr(self, name, getattr(self._inner, name))


def _private_binding(replacement: Callable[..., None] | None) -> Callable[[pytest.MonkeyPatch], None]:
    """Change ``lowlevel._read_region`` as our code sees it (``None``: gone), while openslide's
    own public ``read_region`` keeps the real binding, as in a release that changed it."""

    def install(mp: pytest.MonkeyPatch) -> None:
        from openslide import lowlevel

        real, public = lowlevel._read_region, lowlevel.read_region

        def read_region(*args: Any) -> Any:
            changed = lowlevel.__dict__.get("_read_region")
            lowlevel._read_region = real
            try:
                return public(*args)
            finally:
                if changed is None:
                    del lowlevel._read_region
                else:
                    lowlevel._read_region = changed

        mp.setattr(lowlevel, "read_region", read_region)
        if replacement is None:
            mp.delattr(lowlevel, "_read_region")
        else:
            mp.setattr(lowlevel, "_read_region", replacement)

    return install


OPENSLIDE_BREAKS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "absent": _private_binding(None),
    "raises TypeError": _private_binding(_raises(TypeError("bad args"))),
    "ctypes ArgumentError": _private_binding(_raises(ctypes.ArgumentError("argument 2: wrong type"))),
    "other signature": _private_binding(_other_signature),
    "other behaviour": _private_binding(_fills_nothing),
    "no _osr handle": lambda mp: mp.setattr("openslide.OpenSlide", _NoPrivateHandle),
}


@pytest.mark.parametrize("brk", list(OPENSLIDE_BREAKS))
def test_openslide_falls_back_to_the_public_read_region(svs_slide: FixtureSlide, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture, brk: str) -> None:
    fast, handle = _read_all(svs_slide, "openslide")
    assert handle._checked and handle._read_raw is not None  # the fast path was used and checked
    OPENSLIDE_BREAKS[brk](monkeypatch)
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline.slide._openslide"):
        slow, handle = _read_all(svs_slide, "openslide")
    assert handle._read_raw is None  # public path
    if brk not in ("absent", "no _osr handle"):
        assert "reading through the public read_region" in caplog.text
    for r, a, b in zip(_regions(svs_slide), fast, slow, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"{brk}: {r}")  # opaque or fully transparent: exact


def test_openslide_check_waits_for_a_window_with_tissue(svs_slide: FixtureSlide) -> None:
    """A first read outside the scan (all transparent) proves nothing: the next one is checked."""
    with open_slide(svs_slide.path, "openslide") as s:
        s.read_region((-500, -500), 0, (64, 64))
        assert not s._get_handle()._checked
        s.read_region((1024, 1024), 0, (64, 64))
        assert s._get_handle()._checked and s._get_handle()._read_raw is not None


def test_openslide_damaged_tile_is_not_taken_for_an_api_change(tmp_path: Path) -> None:
    from slide_factory import tissue_image

    from wsi_pipeline.errors import SlideReadError
    from wsi_pipeline.slide.write import write_corrupt_tile_slide

    rgb, _ = tissue_image(512, 512, n_blobs=1, seed=4)
    path = write_corrupt_tile_slide(tmp_path / "bad.svs", rgb, tile_xy=(0, 0), mpp=0.5, levels=(1, 2))
    with open_slide(path, "openslide") as s:
        with pytest.raises(SlideReadError):
            s.read_region((0, 0), 0, (64, 64))
        assert s._get_handle()._read_raw is not None  # still the fast path after the reopen


# -- tiffslide: the tile path over tiffslide's internals and tifffile's decoder -----------------
def _decoder(make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[[pytest.MonkeyPatch], None]:
    """Replace tifffile's ``TiffPage.decode`` by ``make(real decoder)`` as our tile path sees it;
    tifffile's own zarr store (under tiffslide's public reader) keeps the real one."""
    import tifffile

    real = tifffile.TiffPage.decode

    def install(mp: pytest.MonkeyPatch) -> None:
        def prop(page: Any) -> Any:
            ours = sys._getframe(1).f_globals.get("__name__", "").startswith("wsi_pipeline")
            return make(real.__get__(page)) if ours else real.__get__(page)

        mp.setattr(tifffile.TiffPage, "decode", property(prop))

    return install


def _as_seen_by_us(mp: pytest.MonkeyPatch, seen: Callable[[Any], Any]) -> None:
    """Change ``TiffSlide.ts_tifffile`` for our backend only; tiffslide's own code (its
    ``close``) keeps the real one, as in a release that changed it."""
    import tiffslide

    real = tiffslide.TiffSlide.ts_tifffile

    def prop(self: Any) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        return real.__get__(self) if caller.startswith("tiffslide") else seen(real.__get__(self))

    mp.setattr(tiffslide.TiffSlide, "ts_tifffile", property(prop))


class _Shifted:
    """tiffslide's series index now points elsewhere in tifffile's list (at the thumbnail)."""

    def __init__(self, tf: Any) -> None:
        self.series = tf.series[1:] + tf.series[:1]


def _shifted_series(mp: pytest.MonkeyPatch) -> None:
    _as_seen_by_us(mp, _Shifted)


def _no_tifffile_handle(mp: pytest.MonkeyPatch) -> None:
    def gone(tf: Any) -> None:
        raise AttributeError("'TiffSlide' object has no attribute 'ts_tifffile'")

    _as_seen_by_us(mp, gone)


TIFFSLIDE_BREAKS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "ts_tifffile absent": _no_tifffile_handle,
    "series layout changed": _shifted_series,
    "decoder other signature": _decoder(lambda real: lambda data: real(data, 0)),
    "decoder raises TypeError": _decoder(lambda real: _raises(TypeError("decode() got an unexpected keyword"))),
    "decoder other behaviour": _decoder(lambda real: lambda *a, **k: (lambda t: (t[0][:, ::-1], *t[1:]))(real(*a, **k))),
}


@pytest.mark.parametrize("brk", list(TIFFSLIDE_BREAKS))
def test_tiffslide_tile_path_falls_back_to_the_public_read_region(svs_slide: FixtureSlide, monkeypatch: pytest.MonkeyPatch,
                                                                  brk: str) -> None:
    fast, handle = _read_all(svs_slide, "tiffslide")
    assert handle._checked and all(level is not None for level in handle._levels)
    TIFFSLIDE_BREAKS[brk](monkeypatch)
    slow, handle = _read_all(svs_slide, "tiffslide")
    assert all(level is None for level in handle._levels)  # public path everywhere
    for r, a, b in zip(_regions(svs_slide), fast, slow, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"{brk}: {r}")


def test_tiffslide_without_its_internals_still_defers_and_refuses_like_before(svs_slide: FixtureSlide,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path: Path) -> None:
    import tifffile

    from wsi_pipeline.errors import SlideOpenError

    _no_tifffile_handle(monkeypatch)
    with open_slide(svs_slide.path) as s:  # codecs unknown: auto lets OpenSlide read it
        assert s.backend == "openslide"
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, np.zeros((64, 64, 3), np.uint16), photometric="rgb", tile=(16, 16), metadata=None)
    with pytest.raises(SlideOpenError, match="unsupported sample type uint16"):
        open_slide(deep, "tiffslide")


# -- torch.Tensor._version: the similarity cache ------------------------------------------------
class _MatrixModel:
    """A linear projection with a declared matrix (what similarity_for factors)."""

    name = "matrix"

    def __init__(self, matrix: Any) -> None:
        import torch

        self.matrix = torch.nn.Parameter(torch.as_tensor(matrix, dtype=torch.float32))

    def projection_matrix(self) -> Any:
        return self.matrix

    def project(self, x: Any) -> Any:
        import torch.nn.functional as F

        return F.normalize(x @ self.matrix, dim=-1)

    def parameters(self) -> Any:
        return iter([self.matrix])


def _constant_version(mp: pytest.MonkeyPatch) -> None:
    import torch

    mp.setattr(torch.Tensor, "_version", property(lambda self: 0))  # never counts writes


def _no_version(mp: pytest.MonkeyPatch) -> None:
    import torch

    def gone(self: object) -> int:
        raise AttributeError("'Tensor' object has no attribute '_version'")

    mp.setattr(torch.Tensor, "_version", property(gone))


def _version_raises(mp: pytest.MonkeyPatch) -> None:
    import torch

    def inference(self: object) -> int:
        raise RuntimeError("Inference tensors do not track version counter.")

    mp.setattr(torch.Tensor, "_version", property(inference))


@pytest.mark.parametrize("brk", [_constant_version, _no_version, _version_raises],
                         ids=["constant", "absent", "raises"])
def test_similarity_cache_is_invalidated_without_a_usable_version_counter(
        monkeypatch: pytest.MonkeyPatch, brk: Callable[[pytest.MonkeyPatch], None]) -> None:
    import torch

    from wsi_pipeline.classify.similarity import _matrix_version, similarity_for

    rng = np.random.default_rng(6)
    model = _MatrixModel(rng.normal(size=(10, 10)))
    assert _matrix_version(model.matrix)[0] == "version"  # the private counter, normally
    brk(monkeypatch)
    assert _matrix_version(model.matrix)[0] == "digest"
    classes = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    feats = torch.from_numpy(rng.normal(size=(30, 10)).astype(np.float32))
    first = similarity_for(model, classes)
    assert similarity_for(model, classes.clone()) is first  # unchanged: still cached
    with torch.no_grad():
        model.matrix.mul_(-1.0)  # in place, as an optimiser step would
    flipped = similarity_for(model, classes)
    assert flipped is not first
    np.testing.assert_allclose(flipped(feats), -first(feats), atol=2e-6)
