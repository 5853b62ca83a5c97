"""The tile stage end to end on synthetic slides with a known tissue mask."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from slide_factory import FixtureSlide

from wsi_pipeline.config import TilingConfig
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.report.geojson import read_geojson
from wsi_pipeline.report.thumbnail import CONTOUR_COLOR, PATCH_COLOR
from wsi_pipeline.slide import open_slide
from wsi_pipeline.store.coords import REQUIRED_ATTRS, read_coords, validate_coords
from wsi_pipeline.store.status import read_status
from wsi_pipeline.tiling import tile_slides
from wsi_pipeline.tiling.grid import GridSpec, grid_coords

#: Segmentation runs at ~8 µm/px; a 128 µm patch spans 16 such pixels. Border pixels that are
#: partly tissue count as tissue, so a patch's tissue fraction can be off by up to ~2.5
#: segmentation pixels across the patch: 2.5 · 8 / 128 ≈ 0.16 (observed max 0.15, mean 0.04).
FRACTION_TOL = 0.16
#: Every kept patch (min_tissue 0.25) must really be on tissue: truth fraction at least this.
KEPT_MIN_TRUTH = 0.15
#: Patch count against the count from the truth mask: within 10 % (or 2 patches).
COUNT_TOL = 0.10


def _truth_fractions(fs: FixtureSlide, coords: np.ndarray, ps0: int, block: int = 16) -> np.ndarray:
    """Truth tissue fraction of level-0 patches, from the truth mask in ``block``² blocks
    (exact up to the 1/255 quantisation of ``mask_at``; patches are block-aligned)."""
    assert ps0 % block == 0 and (coords % block == 0).all()
    m = fs.mask_at(block).astype(np.float64)
    ii = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    ii[1:, 1:] = m.cumsum(0).cumsum(1)
    x, y, n = coords[:, 0] // block, coords[:, 1] // block, ps0 // block
    return (ii[y + n, x + n] - ii[y, x + n] - ii[y + n, x] + ii[y, x]) / float(n * n)


def _tile(fs: FixtureSlide, out: Path, **cfg: object) -> tuple[np.ndarray, dict]:
    [r] = tile_slides([fs.path], out, TilingConfig(**cfg))  # type: ignore[arg-type]
    assert r.status == "ok", r.reason
    return read_coords(out / "coords" / f"{fs.path.stem}.h5")


@pytest.fixture(scope="module")
def svs_out(svs_slide: FixtureSlide, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("svs_out")
    _tile(svs_slide, out, backend="openslide")
    return out


@pytest.mark.parametrize("fixture", ["svs_slide", "tiff_slide"])
def test_openslide_and_tiffslide_give_the_same_coords(fixture: str, request: pytest.FixtureRequest,
                                                      tmp_path: Path) -> None:
    fs: FixtureSlide = request.getfixturevalue(fixture)
    c1, a1 = _tile(fs, tmp_path / "os", backend="openslide")
    c2, a2 = _tile(fs, tmp_path / "ts", backend="tiffslide")
    assert a1["backend"] == "openslide" and a2["backend"] == "tiffslide"
    assert len(c1) > 10
    np.testing.assert_array_equal(c1, c2)


@pytest.mark.parametrize("fixture", ["svs_slide", "tiff_slide"])
def test_kept_patches_lie_on_tissue_in_bounds_and_count_matches_truth(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    fs: FixtureSlide = request.getfixturevalue(fixture)
    coords, attrs = _tile(fs, tmp_path)
    ps0 = attrs["patch_size_level0"]
    assert ps0 == round(256 * 0.5 / fs.mpp)
    w, h = fs.size
    assert (coords >= 0).all() and (coords[:, 0] + ps0 <= w).all() and (coords[:, 1] + ps0 <= h).all()
    assert (coords % ps0 == 0).all()  # the global grid anchored at (0, 0)
    frac = _truth_fractions(fs, coords, ps0)
    assert frac.min() >= KEPT_MIN_TRUTH, frac.min()
    every = grid_coords(w, h, GridSpec(ps0, ps0))
    n_truth = int((_truth_fractions(fs, every, ps0) >= 0.25).sum())
    assert abs(len(coords) - n_truth) <= max(2, COUNT_TOL * n_truth), (len(coords), n_truth)
    # and the stored fractions agree with the truth within the segmentation resolution
    with h5py.File(tmp_path / "coords" / f"{fs.path.stem}.h5") as f:
        stored = f["tissue_fraction"][()]
    assert np.abs(stored - frac).max() <= FRACTION_TOL
    assert np.abs(stored - frac).mean() <= 0.06


@pytest.mark.parametrize("fixture", ["svs_slide", "tiff_slide"])
def test_patch_count_agrees_with_tissue_area(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """With min_tissue 0.5 a border patch is kept iff it is mostly tissue, so gains and losses
    along the outline cancel to first order: N ≈ tissue area / patch area, within 15 %."""
    fs: FixtureSlide = request.getfixturevalue(fixture)
    coords, attrs = _tile(fs, tmp_path, min_tissue=0.5)
    expected = float(fs.mask.sum()) / attrs["patch_size_level0"] ** 2
    assert expected > 20
    assert abs(len(coords) - expected) <= 0.15 * expected, (len(coords), expected)


def test_coords_file_has_all_attrs(svs_out: Path, svs_slide: FixtureSlide) -> None:
    coords, attrs = read_coords(svs_out / "coords" / "tissue.h5")
    assert coords.dtype == np.int64 and coords.ndim == 2 and coords.shape[1] == 2
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    assert not missing
    assert attrs["patch_size"] == 256 and attrs["patch_size_level0"] == 512
    assert attrs["level0_magnification"] == pytest.approx(40.0)
    assert attrs["target_magnification"] == pytest.approx(20.0)
    assert (attrs["level0_width"], attrs["level0_height"]) == svs_slide.size
    assert attrs["mpp_level0"] == pytest.approx(0.25) and attrs["target_mpp"] == 0.5
    assert attrs["mpp_source"] not in ("none", "default", "csv")
    assert attrs["name"] == "tissue" and attrs["min_tissue"] == 0.25 and attrs["overlap"] == 0
    assert attrs["patch_level"] == 0 and attrs["downsample"] == [1.0, 1.0]
    assert attrs["level_dim"] == list(svs_slide.size) == attrs["downsampled_level_dim"]
    assert attrs["slide_path"] == os.path.abspath(svs_slide.path)
    assert attrs["complete"] is True and attrs["schema_version"] == 1
    assert attrs["backend"] == "openslide" and "openslide" in attrs["backend_version"]
    assert attrs["wsi_pipeline_version"]
    assert validate_coords(svs_out / "coords" / "tissue.h5", {"target_mpp": 0.5}) is True
    assert "target_mpp" in str(validate_coords(svs_out / "coords" / "tissue.h5", {"target_mpp": 0.25}))


# -- downstream readers: small mimics of TRIDENT's and CLAM's documented logic --------------
def trident_read_patches(slide_path: Path, h5_path: Path, n: int = 3) -> list[np.ndarray]:
    """TRIDENT: patch_size + level0/target magnification → level-0 size, best level whose
    downsample ≤ the needed one, read, resize to patch_size."""
    from PIL import Image

    with h5py.File(h5_path) as f:
        coords, a = f["coords"][()], dict(f["coords"].attrs)
    ps = int(a["patch_size"])
    ps0 = round(ps * float(a["level0_magnification"]) / float(a["target_magnification"]))
    out = []
    with open_slide(slide_path) as s:
        ds_needed = ps0 / ps
        level = max((k for k, d in enumerate(s.info.level_downsamples) if d <= ds_needed * 1.1), default=0)
        size = round(ps0 / s.info.level_downsamples[level])
        for x, y in coords[:n]:
            img = s.read_region((int(x), int(y)), level, (size, size))
            out.append(np.asarray(Image.fromarray(img).resize((ps, ps), Image.Resampling.BILINEAR)))
    return out


def clam_read_patches(slide_path: Path, h5_path: Path, n: int = 3) -> list[np.ndarray]:
    """CLAM (extract_features_fp): read patch_size px at patch_level from the coords attrs."""
    with h5py.File(h5_path) as f:
        coords = f["coords"][()]
        level, ps = int(f["coords"].attrs["patch_level"]), int(f["coords"].attrs["patch_size"])
    with open_slide(slide_path) as s:
        return [s.read_region((int(x), int(y)), level, (ps, ps)) for x, y in coords[:n]]


@pytest.mark.parametrize("fixture, target_mpp", [("tiff_slide", 0.5), ("svs_slide", 1.0)])
def test_trident_and_clam_readers_see_the_same_field_of_view(
    fixture: str, target_mpp: float, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Where the slide has a level at the target mpp, both readers read the same pixels,
    and those pixels are the slide's truth at that place."""
    fs: FixtureSlide = request.getfixturevalue(fixture)
    coords, attrs = _tile(fs, tmp_path, target_mpp=target_mpp)
    h5 = tmp_path / "coords" / f"{fs.path.stem}.h5"
    t, c = trident_read_patches(fs.path, h5), clam_read_patches(fs.path, h5)
    assert len(t) == len(c) == 3
    ps0 = attrs["patch_size_level0"]
    for (x, y), pt, pc in zip(coords[:3], t, c, strict=True):
        assert pt.shape == pc.shape == (256, 256, 3)
        assert np.abs(pt.astype(int) - pc.astype(int)).mean() < 6.0
        truth = fs.pixels(int(x), int(y), ps0, ps0)[:: ps0 // 256, :: ps0 // 256]
        assert np.abs(pc.astype(float).mean((0, 1)) - truth.astype(float).mean((0, 1))).max() < 12.0


def test_geojson_loads_with_shapely_and_matches_the_tissue(svs_out: Path, svs_slide: FixtureSlide) -> None:
    from shapely.ops import unary_union

    doc = json.loads((svs_out / "tissue" / "tissue.geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    assert all(f["properties"]["objectType"] == "annotation" for f in doc["features"])
    polys = read_geojson(svs_out / "tissue" / "tissue.geojson")
    assert len(polys) == 3  # the fixture has three blobs
    union = unary_union(polys)
    assert union.is_valid
    assert union.area == pytest.approx(float(svs_slide.mask.sum()), rel=0.05)  # level-0 px²
    minx, miny, maxx, maxy = union.bounds
    assert minx >= 0 and miny >= 0 and maxx <= svs_slide.size[0] and maxy <= svs_slide.size[1]


def test_thumbnail_shows_contours_and_patches(svs_out: Path) -> None:
    from PIL import Image

    with Image.open(svs_out / "thumbnails" / "tissue.png") as im:
        assert im.format == "PNG" and max(im.size) <= TilingConfig().thumbnail_max_side
        px = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in np.unique(px, axis=0)}
    assert CONTOUR_COLOR in colours and PATCH_COLOR in colours


def test_status_rows_and_resume(tiff_slide: FixtureSlide, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    h5 = out / "coords" / "tissue.h5"
    [r1] = tile_slides([tiff_slide.path], out)
    mtime = h5.stat().st_mtime_ns
    [r2] = tile_slides([tiff_slide.path], out)
    assert (r1.status, r2.status) == ("ok", "skipped") and r1.n_patches == r2.n_patches > 0
    assert h5.stat().st_mtime_ns == mtime  # not rewritten
    [r3] = tile_slides([tiff_slide.path], out, overwrite=True)
    assert r3.status == "ok" and h5.stat().st_mtime_ns != mtime
    # changed settings are redone, with a reason in the log
    with caplog.at_level(logging.INFO, logger="wsi_pipeline"):
        [r4] = tile_slides([tiff_slide.path], out, TilingConfig(min_tissue=0.6))
    assert r4.status == "ok" and r4.n_patches < r1.n_patches
    assert "min_tissue is 0.25, now 0.6" in caplog.text
    rows = read_status(out)
    assert [r["status"] for r in rows] == ["ok", "skipped", "ok", "ok"]
    assert rows[0]["slide_id"] == "tissue" and rows[0]["stage"] == "tile"
    assert rows[0]["n_patches"] == str(r1.n_patches) and float(rows[0]["seconds"]) > 0


@pytest.mark.parametrize("damage", ["truncate", "incomplete", "delete_geojson", "bad_png"])
def test_damaged_outputs_are_redone(damage: str, tiff_slide: FixtureSlide, tmp_path: Path) -> None:
    out = tmp_path / "out"
    [first] = tile_slides([tiff_slide.path], out)
    h5 = out / "coords" / "tissue.h5"
    if damage == "truncate":
        h5.write_bytes(h5.read_bytes()[:2000])
    elif damage == "incomplete":
        with h5py.File(h5, "a") as f:
            f["coords"].attrs["complete"] = False
    elif damage == "delete_geojson":
        (out / "tissue" / "tissue.geojson").unlink()
    else:
        png = out / "thumbnails" / "tissue.png"
        png.write_bytes(png.read_bytes()[:100])
    [again] = tile_slides([tiff_slide.path], out)
    assert again.status == "ok" and again.n_patches == first.n_patches
    assert validate_coords(h5, {}) is True


def test_no_temporary_files_left_and_stale_ones_removed(tiff_slide: FixtureSlide, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "coords").mkdir(parents=True)
    stale = out / "coords" / ".tissue.h5.abc123.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (1e9, 1e9))  # from a crashed run long ago
    fresh = out / "coords" / ".other.h5.def456.tmp"  # a concurrent run may be writing this
    fresh.write_bytes(b"in flight")
    tile_slides([tiff_slide.path], out)
    assert not stale.exists() and fresh.exists()
    fresh.unlink()
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_missing_mpp_is_resolved_by_default_or_csv(nompp_slide: FixtureSlide, svs_slide: FixtureSlide,
                                                   tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline"):
        _, a = _tile(nompp_slide, tmp_path / "d", default_mpp=0.5)
    assert a["mpp_source"] == "default" and a["mpp_level0"] == 0.5 and a["patch_size_level0"] == 256
    assert "default-mpp" in caplog.text
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide,mpp\nnompp,1.0\ntissue.svs,0.5\n")  # by id and by file name
    _, b = _tile(nompp_slide, tmp_path / "c", mpp_csv=str(csv), default_mpp=0.5)
    assert b["mpp_source"] == "csv" and b["patch_size_level0"] == 128
    _, c = _tile(svs_slide, tmp_path / "c2", mpp_csv=str(csv))  # the CSV also overrides the file
    assert c["mpp_source"] == "csv" and c["patch_size_level0"] == 256


def test_overlap_and_min_tissue_zero(tiff_slide: FixtureSlide, tmp_path: Path) -> None:
    base, _ = _tile(tiff_slide, tmp_path / "a")
    over, a = _tile(tiff_slide, tmp_path / "b", overlap=0.5)
    assert a["overlap"] == 128 and a["overlap_fraction"] == 0.5 and a["step_level0"] == 128
    assert (over % 128 == 0).all() and 3 * len(base) < len(over) < 5 * len(base)
    assert {tuple(p) for p in base} <= {tuple(p) for p in over}  # the same global grid, refined
    anyt, _ = _tile(tiff_slide, tmp_path / "c", min_tissue=0.0)
    assert len(anyt) > len(base)


def test_unicode_and_spaces_in_slide_names(tiff_slide: FixtureSlide, tmp_path: Path) -> None:
    src = tmp_path / "in" / "Schnitt 1 – Größe µ.tif"
    src.parent.mkdir()
    shutil.copyfile(tiff_slide.path, src)
    [r] = tile_slides([src], tmp_path / "out")
    assert r.status == "ok" and r.slide_id == "Schnitt 1 – Größe µ"
    coords, attrs = read_coords(tmp_path / "out" / "coords" / "Schnitt 1 – Größe µ.h5")
    assert attrs["name"] == "Schnitt 1 – Größe µ" and len(coords) == r.n_patches
    assert (tmp_path / "out" / "tissue" / "Schnitt 1 – Größe µ.geojson").exists()
    assert read_status(tmp_path / "out")[0]["slide_id"] == "Schnitt 1 – Größe µ"


def test_duplicate_slide_ids_are_refused_before_any_work(tiff_slide: FixtureSlide, tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "tissue.tif", tmp_path / "b" / "tissue.svs"
    for p in (a, b):
        p.parent.mkdir()
        shutil.copyfile(tiff_slide.path, p)
    with pytest.raises(ConfigError, match="same id 'tissue'"):
        tile_slides([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_progress_is_reported_per_slide(tiff_slide: FixtureSlide, tmp_path: Path) -> None:
    events: list[tuple] = []

    class Recorder:
        def start(self, total_slides: int) -> None:
            events.append(("start", total_slides))

        def start_slide(self, slide_id: str, total_items: int) -> None:
            events.append(("slide", slide_id))

        def advance(self, n: int) -> None:
            pass

        def end_slide(self, slide_id: str, status: str) -> None:
            events.append(("end", slide_id, status))

        def close(self) -> None:
            events.append(("close",))

    tile_slides([tiff_slide.path, tmp_path / "missing.svs"], tmp_path / "out", progress=Recorder())
    assert events == [("start", 2), ("slide", "tissue"), ("end", "tissue", "ok"), ("slide", "missing"),
                      ("end", "missing", "failed"), ("close",)]
