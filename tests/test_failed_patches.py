"""Patches on undecodable tiles are left out, never scored (issue 12, item 3).

One slide with three level-0 JPEG tiles zeroed (``corrupt_tile``, as in the bad-input suite),
tiled with half-overlapping 128 px patches so that patches straddle tile borders. Which patches
are unreadable is computed here from the tile grid alone: a patch fails exactly when its
footprint overlaps a damaged tile. Checked: the feature file leaves them out (``coords``,
``features``), lists them in ``failed_coords`` and counts them; the other features equal a
plain per-patch reference (h5 and zarr, 0 and 2 workers); resume validates and re-embeds when
the coords file changes or an old file holds white substitutes; above 1 % the slide fails in one
line; classify pools, maps and exports only the patches that were read.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from slide_factory import make_slide
from test_embed import _reference_features
from zeroshot_reference import FP16_COS

from wsi_pipeline.cli import main
from wsi_pipeline.config import TilingConfig
from wsi_pipeline.embed.stage import EmbedConfig, check_failed_patches, embed_slides, load_encoder
from wsi_pipeline.errors import CorruptOutputError, TooManyFailedPatchesError
from wsi_pipeline.slide.write import corrupt_tile
from wsi_pipeline.store.coords import read_coords, write_coords
from wsi_pipeline.store.features import get_store, split_mismatch
from wsi_pipeline.tiling.stage import tile_slides

PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "demo.yaml"
SID = "dmg"
TILE_PX = 256  # the TIFF tile size make_slide writes
N_DAMAGED = 3
CFG = EmbedConfig(model="convlm_test", workers=0, device="cpu", max_failed_fraction=0.5)


@dataclass(frozen=True)
class Damaged:
    out: Path  # a tiled output folder (coords, thumbnails, tissue)
    coords: np.ndarray  # every patch of the coords file
    attrs: dict
    tiles: tuple[tuple[int, int], ...]  # (column, row) of the zeroed level-0 tiles
    failed: np.ndarray  # (N,) bool: the patch overlaps a damaged tile

    @property
    def read(self) -> np.ndarray:
        return self.coords[~self.failed]


def overlaps_tiles(coords: np.ndarray, size: int, tiles: tuple[tuple[int, int], ...]) -> np.ndarray:
    """(N,) bool: the level-0 patch square at each corner overlaps one of ``tiles`` (TILE_PX grid)."""
    x, y = coords[:, 0], coords[:, 1]
    hit = np.zeros(len(coords), dtype=bool)
    for tx, ty in tiles:
        hit |= (x < (tx + 1) * TILE_PX) & (x + size > tx * TILE_PX) & (y < (ty + 1) * TILE_PX) & (y + size > ty * TILE_PX)
    return hit


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Damaged:
    root = tmp_path_factory.mktemp("failed_patches")
    path = root / f"{SID}.svs"
    mask = make_slide(path, 2560, 1792, mpp=0.5, seed=5).mask
    h, w = mask.shape
    on_tissue = sorted(((mask[y:y + TILE_PX, x:x + TILE_PX].mean(), (x // TILE_PX, y // TILE_PX))
                        for y in range(0, h, TILE_PX) for x in range(0, w, TILE_PX)), reverse=True)
    tiles = tuple(t for _, t in on_tissue[:N_DAMAGED])
    for t in tiles:
        corrupt_tile(path, page=0, tile_xy=t)
    tiling = TilingConfig(patch_size=128, target_mpp=0.5, overlap=0.5, seg_level_mpp=2.0, min_tissue_area=2000.0)
    [res] = tile_slides([path], root / "tiled", tiling)  # segmentation reads a lower level: tiling is unharmed
    assert res.status == "ok", res
    coords, attrs = read_coords(root / "tiled" / "coords" / f"{SID}.h5")
    assert attrs["patch_level"] == 0 and attrs["patch_size_level0"] == 128
    failed = overlaps_tiles(coords, 128, tiles)
    assert 0.01 * len(coords) < failed.sum() < 0.5 * len(coords) and len(coords) > 100
    assert np.any(coords % TILE_PX != 0)  # some patches straddle tile borders
    return Damaged(root / "tiled", coords, attrs, tiles, failed)


def _fresh(damaged: Damaged, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(damaged.out, out)
    return out


@pytest.fixture(scope="module")
def reference(damaged: Damaged, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Plain per-patch features (test_embed's reference) of the readable patches only."""
    readable = tmp_path_factory.mktemp("reference") / f"{SID}.h5"
    write_coords(readable, damaged.read, damaged.attrs)
    return _reference_features(readable, CFG)


# -- embed ----------------------------------------------------------------------------------
@pytest.mark.parametrize("store", ["h5", "zarr"])
@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_patches_are_left_out(damaged: Damaged, reference: np.ndarray, tmp_path: Path, store: str,
                                         workers: int) -> None:
    out = _fresh(damaged, tmp_path)
    summary = embed_slides(out, EmbedConfig(model="convlm_test", workers=workers, device="cpu", store=store,
                                            max_failed_fraction=0.5))
    [r] = summary.results
    n_failed = int(damaged.failed.sum())
    assert r.status == "ok" and r.n_failed_patches == n_failed
    assert r.reason == f"{n_failed} of {len(damaged.coords)} patches unreadable, left out"
    sf = get_store(store).read(out / "features", summary.model_id, SID)
    np.testing.assert_array_equal(sf.coords, damaged.read)
    np.testing.assert_array_equal(sf.failed_coords, damaged.coords[damaged.failed])
    assert sf.failed_coords.dtype == np.int64 and sf.failed_coords.shape == (n_failed, 2)
    assert sf.attrs["n_failed_patches"] == n_failed and sf.attrs["features_schema_version"] == 2
    assert sf.features.shape == reference.shape
    np.testing.assert_allclose(sf.features, reference, atol=1e-5, rtol=0)
    assert sf.coords_attrs["patch_size_level0"] == 128
    assert get_store(store).validate(out / "features", summary.model_id, SID, damaged.coords) is None


def test_a_slide_without_failures_has_an_empty_failed_coords(damaged: Damaged, tmp_path: Path) -> None:
    out = _fresh(damaged, tmp_path)
    write_coords(out / "coords" / f"{SID}.h5", damaged.read, damaged.attrs)  # only the readable patches
    for store in ("h5", "zarr"):
        summary = embed_slides(out, EmbedConfig(model="convlm_test", store=store))  # default 1 %: nothing fails
        assert summary.results[0].status == "ok" and summary.results[0].reason == ""
        sf = get_store(store).read(out / "features", summary.model_id, SID)
        assert sf.failed_coords.shape == (0, 2) and sf.attrs["n_failed_patches"] == 0
        np.testing.assert_array_equal(sf.coords, damaged.read)


def test_above_one_percent_the_slide_fails_in_one_line(damaged: Damaged, tmp_path: Path) -> None:
    out = _fresh(damaged, tmp_path)
    r = CliRunner().invoke(main, ["embed", str(out), "--model", "convlm_test", "--workers", "0", "-q"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR")]
    assert errors == [f"ERROR: {SID}: {int(damaged.failed.sum())} of {len(damaged.coords)} patches unreadable "
                      "(> 1%); the slide file is damaged"], r.stderr
    assert not [ln for ln in r.stderr.splitlines() if ln.startswith("WARNING")], r.stderr  # no line per patch
    assert not list((out / "features").rglob(f"{SID}.h5"))


def test_all_patches_unreadable_always_fails() -> None:
    with pytest.raises(TooManyFailedPatchesError, match="^all 5 patches unreadable; the slide file is damaged$"):
        check_failed_patches(5, 5, 1.0)
    check_failed_patches(4, 5, 1.0)
    check_failed_patches(0, 0, 0.01)


# -- resume ---------------------------------------------------------------------------------
def test_resume_skips_validated_and_redoes_changed_coords(damaged: Damaged, tmp_path: Path) -> None:
    out = _fresh(damaged, tmp_path)
    first = embed_slides(out, CFG)
    assert first.results[0].status == "ok"
    again = embed_slides(out, CFG)
    assert (again.results[0].status, again.results[0].reason) == ("skipped", "features exist and validate")
    store, coords_file = get_store("h5"), out / "coords" / f"{SID}.h5"
    i_read, i_failed = np.flatnonzero(~damaged.failed)[0], np.flatnonzero(damaged.failed)[0]
    for drop in (i_read, i_failed):  # the coords file changes: one readable / one unreadable patch less
        coords = np.delete(damaged.coords, drop, axis=0)
        write_coords(coords_file, coords, damaged.attrs)
        assert store.validate(out / "features", first.model_id, SID, coords) is not None
        redo = embed_slides(out, CFG)
        assert redo.results[0].status == "ok"
        sf = store.read(out / "features", first.model_id, SID)
        keep = np.delete(damaged.failed, drop)
        np.testing.assert_array_equal(sf.coords, coords[~keep])
        np.testing.assert_array_equal(sf.failed_coords, coords[keep])
        assert embed_slides(out, CFG).results[0].status == "skipped"


def test_schema1_files_validate_only_without_blank_patches(damaged: Damaged, tmp_path: Path) -> None:
    """Files written before ``failed_coords``: valid when nothing failed, re-embedded when they hold white patches."""
    out = _fresh(damaged, tmp_path)
    first = embed_slides(out, CFG)
    store = get_store("h5")
    path = store.path_for(out / "features", first.model_id, SID)
    good = store.read(out / "features", first.model_id, SID)
    with h5py.File(path, "a") as f:  # a schema-1 file of the readable patches only, nothing failed
        del f["failed_coords"]
        f.attrs["features_schema_version"] = 1
        f.attrs["n_failed_patches"] = 0
    assert store.read(out / "features", first.model_id, SID).failed_coords is None
    assert store.validate(out / "features", first.model_id, SID, damaged.read) is None
    assert store.validate(out / "features", first.model_id, SID, damaged.coords) is not None

    blank = np.zeros((len(damaged.coords), good.features.shape[1]), np.float32)
    blank[~damaged.failed] = good.features  # old files embedded a white patch in place of each unreadable one
    with h5py.File(path, "a") as f:
        for name, data in (("features", blank), ("coords", damaged.coords)):
            attrs = dict(f[name].attrs)
            del f[name]
            f.create_dataset(name, data=data).attrs.update(attrs)
        f.attrs["n_failed_patches"] = int(damaged.failed.sum())
    legacy = store.read(out / "features", first.model_id, SID)
    assert legacy.n_blank_substituted == damaged.failed.sum()
    reason = store.validate(out / "features", first.model_id, SID, damaged.coords)
    assert reason is not None and "white substitutes" in reason
    from wsi_pipeline.classify.scoring import check_no_blank_patches

    with pytest.raises(CorruptOutputError, match="re-run embed"):
        check_no_blank_patches(legacy)
    redo = embed_slides(out, CFG)
    assert redo.results[0].status == "ok"
    sf = store.read(out / "features", first.model_id, SID)
    assert sf.attrs["features_schema_version"] == 2 and len(sf.failed_coords) == damaged.failed.sum()
    np.testing.assert_array_equal(sf.features, good.features)


def test_split_rule() -> None:
    """``coords`` + ``failed_coords`` must split the coords file, each in its order, each row once."""
    grid = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2).astype(np.int64) * 64
    rng = np.random.default_rng(0)
    failed = np.zeros(len(grid), bool)
    failed[rng.choice(len(grid), 7, replace=False)] = True
    read, bad = grid[~failed], grid[failed]
    assert split_mismatch(grid, read, bad) is None
    assert split_mismatch(grid, grid, np.zeros((0, 2), np.int64)) is None
    assert split_mismatch(grid, read, bad[::-1]) is not None  # failed_coords out of order
    assert split_mismatch(grid, read[::-1], bad) is not None  # coords out of order
    assert split_mismatch(grid, read, bad[1:]) is not None  # a row missing
    assert split_mismatch(grid, read[1:], np.concatenate([bad, read[:1]])) is not None  # failed, not in file order
    assert split_mismatch(grid, read[:-1], np.concatenate([bad, read[-1:]])) is None  # the last row failed: in order
    assert split_mismatch(grid, np.concatenate([read[:-1], bad[:1]]), bad) is not None  # one row twice, one missing
    moved = bad.copy()
    moved[0] += 1
    assert split_mismatch(grid, read, moved) is not None  # not a coords-file row


# -- classify -------------------------------------------------------------------------------
def _topk_mean(features: np.ndarray, k: int) -> np.ndarray:
    """Per class, the mean of the k largest patch-to-class cosine similarities, from scratch."""
    from wsi_pipeline.classify.prompts import load_prompts
    from wsi_pipeline.classify.textclassifier import build_text_classifier

    model = load_encoder(CFG, torch.device("cpu"))
    with torch.no_grad():
        text = build_text_classifier(model, load_prompts(PROMPTS))  # (C, E), rows L2-normalised
        img = model.project(torch.from_numpy(features))  # (N, E), L2-normalised
        cos = (img @ text.T).double().numpy()
    return -np.sort(-cos, axis=0)[:k].mean(axis=0)


def test_classify_scores_maps_and_exports_only_read_patches(damaged: Damaged, tmp_path: Path) -> None:
    from PIL import Image

    from wsi_pipeline.classify.stage import classify_slides
    from wsi_pipeline.report.heatmap import MISSING_RGB, heatmap_canvas
    from wsi_pipeline.store.provenance import read_png_provenance

    out = _fresh(damaged, tmp_path)
    k = 10
    summary = classify_slides(None, out, PROMPTS, embed=CFG, top_k=k)
    [row] = summary.rows
    n_read, n_failed = int((~damaged.failed).sum()), int(damaged.failed.sum())
    assert row.status == "ok" and row.n_patches == n_read and row.k == k
    sf = get_store("h5").read(out / "features", summary.model_id, SID)

    # top-K: the mean of the best K of the stored (readable) patches only
    expected = _topk_mean(sf.features, k)
    np.testing.assert_allclose([row.scores[c] for c in summary.class_names], expected, atol=FP16_COS)
    doc = json.loads(summary.predictions_json.read_text())
    [jrow] = doc["slides"]
    assert jrow["n_patches"] == n_read and jrow["provenance"]["n_failed_patches"] == n_failed
    with open(summary.predictions_csv, newline="") as f:
        [crow] = list(csv.DictReader(f))
    assert crow["n_patches"] == str(n_read)

    # QuPath: one tile per readable patch, in the features' order, none for the failed ones
    geo = json.loads((out / "scores" / "demo" / f"{SID}.geojson").read_text())
    corners = [f["geometry"]["coordinates"][0][0] for f in geo["features"]]
    assert corners == damaged.read.tolist()
    assert geo["wsi_pipeline"]["n_failed_patches"] == n_failed

    # heatmaps: inside a damaged tile (only unread patches cover it) the thumbnail is hatched grey, never coloured
    with Image.open(out / "thumbnails" / f"{SID}.png") as im:
        base, (fx, fy) = heatmap_canvas(im.convert("RGB"), damaged.attrs)
    bg = np.asarray(base)
    top = 18  # the title strip
    for c, rel in row.visuals["heatmaps"].items():
        with Image.open(out / rel) as im:
            img = np.asarray(im.convert("RGB"))
        assert "unreadable patches" in read_png_provenance(out / rel)["missing"], c
        for tx, ty in damaged.tiles:
            cx, cy = round((tx + 0.5) * TILE_PX * fx), round((ty + 0.5) * TILE_PX * fy)
            r = int(TILE_PX * min(fx, fy) / 4)
            win = img[top + cy - r: top + cy + r, cx - r: cx + r]
            grey = np.all(win == MISSING_RGB, axis=-1)
            assert 0.3 < grey.mean() < 0.7, (c, tx, ty)  # hatched: about every other band
            np.testing.assert_array_equal(win[~grey], bg[cy - r: cy + r, cx - r: cx + r][~grey])  # not a score colour
        x, y = damaged.read[len(damaged.read) // 2]  # a readable patch is coloured, not hatched
        cx, cy = round((x + 64) * fx), round((y + 64) * fy)
        assert not np.array_equal(img[top + cy, cx], bg[cy, cx]) and not np.all(img[top + cy, cx] == MISSING_RGB)
    assert row.visuals["montage"]  # the top patches were all readable


@pytest.mark.parametrize("to", ["clam", "trident"])
def test_export_keeps_the_read_rows_row_aligned(damaged: Damaged, tmp_path: Path, to: str) -> None:
    """A slide whose unreadable patches were left out exports: every file holds the read rows, and
    the features are exactly the stored ones (CLAM's h5_files and pt_files row-aligned with patches/)."""
    from wsi_pipeline.export.stage import export_outputs

    out = _fresh(damaged, tmp_path)
    model_id = embed_slides(out, CFG).model_id
    sf = get_store("h5").read(out / "features", model_id, SID)
    summary = export_outputs(out, to, tmp_path / "export")
    [r] = summary.results
    n_failed = int(damaged.failed.sum())
    assert (r.status, r.reason, r.n_patches) == ("ok", f"{n_failed} unreadable patches left out", len(damaged.read))
    h5s = sorted((tmp_path / "export").rglob("*.h5"))
    assert len(h5s) == 2  # patches + features
    for h5 in h5s:
        with h5py.File(h5, "r") as f:
            np.testing.assert_array_equal(f["coords"][:], damaged.read)
            assert f["coords"].attrs["n_failed_patches"] == n_failed
            if "features" in f:
                np.testing.assert_array_equal(f["features"][:], sf.features)
    if to == "clam":
        pt = torch.load(tmp_path / "export" / "pt_files" / f"{SID}.pt", weights_only=True)
        np.testing.assert_array_equal(pt.numpy(), sf.features)
