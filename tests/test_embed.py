"""The embed stage: features equal a plain per-patch computation; resume, stores, context, workers."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from slide_factory import make_slide

from wsi_pipeline.config import TilingConfig
from wsi_pipeline.embed.dataset import normalize, resize_patches
from wsi_pipeline.embed.regions import plan_regions, read_region_patches
from wsi_pipeline.embed.stage import EmbedConfig, embed_slides, load_encoder
from wsi_pipeline.slide import open_slide
from wsi_pipeline.store.coords import read_coords
from wsi_pipeline.store.features import get_store
from wsi_pipeline.store.status import read_status
from wsi_pipeline.tiling.stage import tile_slides

PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "demo.yaml"
TILING = TilingConfig(patch_size=128, target_mpp=0.5, seg_level_mpp=2.0, min_tissue_area=2000.0)


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """Two small slides (SVS mpp 0.25, generic TIFF mpp 0.5) and a blank one, tiled at 0.5 µm/px, 128 px."""
    root = tmp_path_factory.mktemp("embed")
    slides = root / "slides"
    slides.mkdir()
    make_slide(slides / "a.svs", 2400, 1800, mpp=0.25, layout="svs", levels=(1, 4), seed=1)
    make_slide(slides / "b.tif", 1400, 1000, mpp=0.5, layout="generic", levels=(1, 4), seed=2)
    make_slide(slides / "blank.svs", 1024, 768, mpp=0.5, n_blobs=0, seed=3)
    out = root / "out"
    results = tile_slides(sorted(slides.iterdir()), out, TILING)
    assert [r.status for r in results] == ["ok", "ok", "ok"]
    return out


def _copy_out(tiled: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(tiled / "coords", out / "coords")
    return out


def _reference_features(coords_path: Path, cfg: EmbedConfig) -> np.ndarray:
    """Per-patch read_region + the documented resize/normalise + model.encode_image, no batching."""
    coords, attrs = read_coords(coords_path)
    model = load_encoder(cfg, torch.device("cpu"))
    with open_slide(attrs["slide_path"], backend=attrs.get("backend", "auto")) as slide:
        level = int(attrs["patch_level"])
        ds = slide.info.level_downsamples[level]
        p = int(round(attrs["patch_size_level0"] / ds))
        feats = []
        for x, y in coords:
            pix = slide.read_region((int(x), int(y)), level, (p, p))[None]
            x_in = normalize(resize_patches(pix, model.input_size), model.mean, model.std, torch.float32)
            with torch.inference_mode():
                feats.append(model.encode_image(x_in).numpy())
    return np.concatenate(feats) if feats else np.zeros((0, model.embed_dim), np.float32)


def test_features_equal_per_patch_reference(tiled, tmp_path):
    out = _copy_out(tiled, tmp_path)
    cfg = EmbedConfig(model="convlm_test", batch_size=7, region_size=300)
    summary = embed_slides(out, cfg)
    assert summary.count("ok") == 3, summary.results
    for sid in ("a", "b"):
        sf = get_store("h5").read(out / "features", summary.model_id, sid)
        ref = _reference_features(out / "coords" / f"{sid}.h5", cfg)
        assert sf.features.shape == ref.shape and len(ref) > 10
        np.testing.assert_allclose(sf.features, ref, atol=1e-5, rtol=0)
        assert sf.attrs["complete"] is True and sf.attrs["projected"] is False
        assert sf.attrs["n_failed_patches"] == 0
        assert sf.attrs["refine_layers"] and 0 < sf.attrs["keep_rate"] <= 1
        coords, cattrs = read_coords(out / "coords" / f"{sid}.h5")
        np.testing.assert_array_equal(sf.coords, coords)
        assert sf.coords_attrs["patch_size_level0"] == cattrs["patch_size_level0"]


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_region_reads_are_pixel_identical(tiled, backend):
    coords, attrs = read_coords(tiled / "coords" / "a.h5")
    w, h = attrs["level0_width"], attrs["level0_height"]
    p = int(attrs["patch_size_level0"])
    edge = np.array([[0, 0], [w - p, 0], [0, h - p], [w - p, h - p], [w - p // 2, h - p // 2], [37, 1001]])
    coords = np.concatenate([coords, edge])  # slide corners, half outside, odd offsets
    with open_slide(attrs["slide_path"], backend=backend) as slide:
        plan = plan_regions(coords, level=0, downsample=1.0, patch_px=p, region_size=300)
        assert len(plan.regions) > 4 and plan.n_patches == len(coords)
        for region in plan.regions:
            patches, failed = read_region_patches(slide, plan, region, coords)
            assert not failed.any()
            for j, idx in enumerate(region.indices):
                x, y = coords[idx]
                np.testing.assert_array_equal(patches[j], slide.read_region((int(x), int(y)), 0, (p, p)))


def test_blank_slide_gets_empty_valid_file(tiled, tmp_path):
    out = _copy_out(tiled, tmp_path)
    summary = embed_slides(out, EmbedConfig(model="convlm_test"), slide_ids=["blank"])
    sf = get_store("h5").read(out / "features", summary.model_id, "blank")
    assert sf.features.shape == (0, sf.attrs["embed_dim"]) and sf.coords.shape == (0, 2)
    assert sf.attrs["complete"] is True
    again = embed_slides(out, EmbedConfig(model="convlm_test"), slide_ids=["blank"])
    assert again.results[0].status == "skipped"


def test_resume_redoes_partial_and_corrupt_files(tiled, tmp_path):
    out = _copy_out(tiled, tmp_path)
    cfg = EmbedConfig(model="convlm_test")
    first = embed_slides(out, cfg, slide_ids=["a", "b"])
    store = get_store("h5")
    good_a = store.read(out / "features", first.model_id, "a").features
    good_b = store.read(out / "features", first.model_id, "b").features
    fdir = out / "features" / first.model_id
    # a crash left: a temp file, a truncated h5 for "a", and an h5 without complete=True for "b"
    (fdir / ".a.h5.1234.tmp").write_bytes(b"partial")
    data = (fdir / "a.h5").read_bytes()
    (fdir / "a.h5").write_bytes(data[: len(data) // 3])
    with h5py.File(fdir / "b.h5", "a") as f:
        del f.attrs["complete"]
    second = embed_slides(out, cfg, slide_ids=["a", "b"])
    assert [r.status for r in second.results] == ["ok", "ok"]
    np.testing.assert_array_equal(store.read(out / "features", first.model_id, "a").features, good_a)
    np.testing.assert_array_equal(store.read(out / "features", first.model_id, "b").features, good_b)
    third = embed_slides(out, cfg, slide_ids=["a", "b"])
    assert [r.status for r in third.results] == ["skipped", "skipped"]
    rows = [r for r in read_status(out) if r["stage"] == "embed"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "ok", "skipped", "skipped"]


def test_zarr_and_h5_hold_identical_arrays(tiled, tmp_path):
    out = _copy_out(tiled, tmp_path)
    h5 = embed_slides(out, EmbedConfig(model="convlm_test", store="h5"), slide_ids=["b", "blank"])
    zr = embed_slides(out, EmbedConfig(model="convlm_test", store="zarr"), slide_ids=["b", "blank"])
    assert (out / "features" / f"{zr.model_id}.zarr" / "b" / "zarr.json").exists()
    for sid in ("b", "blank"):
        a = get_store("h5").read(out / "features", h5.model_id, sid)
        z = get_store("zarr").read(out / "features", zr.model_id, sid)
        np.testing.assert_array_equal(a.features, z.features)
        np.testing.assert_array_equal(a.coords, z.coords)
        assert {k: a.attrs[k] for k in ("model_id", "embed_dim", "keep_rate", "complete")} == {
            k: z.attrs[k] for k in ("model_id", "embed_dim", "keep_rate", "complete")
        }
        assert z.coords_attrs["patch_size_level0"] == a.coords_attrs["patch_size_level0"]
    # both hold the fp16 projected embeddings, read only for the projection that made them
    model = load_encoder(EmbedConfig(model="convlm_test"), torch.device("cpu"))
    digest = model.projection_sha256()
    for store, model_id in (("h5", h5.model_id), ("zarr", zr.model_id)):
        full = get_store(store).read(out / "features", model_id, "b")
        fast = get_store(store).read(out / "features", model_id, "b", embeddings_for=digest)
        other = get_store(store).read(out / "features", model_id, "b", embeddings_for="0" * 64)
        assert full.embeddings is None and other.embeddings is None and len(other.features) == len(full.features)
        assert fast.embeddings.dtype == np.float16 and fast.embeddings.shape == (len(full.coords), model.proj_dim)
        assert fast.embeddings_attrs["projection_sha256"] == digest and fast.embeddings_attrs["model_id"] == model_id
        np.testing.assert_array_equal(fast.features, full.features[:4])  # the probe rows
        with torch.inference_mode():
            ref = model.project(torch.from_numpy(full.features)).numpy()
        np.testing.assert_array_equal(fast.embeddings, ref.astype(np.float16))


def test_context_changes_features_and_is_recorded(tiled, tmp_path):
    out = _copy_out(tiled, tmp_path)
    plain = embed_slides(out, EmbedConfig(model="convlm_test"), slide_ids=["b"])
    ctx = embed_slides(out, EmbedConfig(model="convlm_test", context=str(PROMPTS)), slide_ids=["b"])
    assert plain.model_id != ctx.model_id and "ctx-none" in plain.model_id
    f0 = get_store("h5").read(out / "features", plain.model_id, "b")
    f1 = get_store("h5").read(out / "features", ctx.model_id, "b")
    assert f1.attrs["context_source"] == str(PROMPTS) and len(f1.attrs["context_hash"]) == 64
    assert f0.attrs["context_hash"] == "none"
    assert np.abs(f0.features - f1.features).max() > 1e-4


def test_workers_give_identical_features(tiled, tmp_path):
    out = _copy_out(tiled, tmp_path)
    w0 = embed_slides(out, EmbedConfig(model="convlm_test", workers=0), slide_ids=["a"])
    f0 = get_store("h5").read(out / "features", w0.model_id, "a").features
    w2 = embed_slides(out, EmbedConfig(model="convlm_test", workers=2, overwrite=True), slide_ids=["a"])
    f2 = get_store("h5").read(out / "features", w2.model_id, "a").features
    np.testing.assert_array_equal(f0, f2)


def test_unreadable_tiles_are_left_out_or_fail_the_slide(tiled, tmp_path):
    from wsi_pipeline.slide.write import corrupt_tile

    out = _copy_out(tiled, tmp_path)
    coords, attrs = read_coords(out / "coords" / "a.h5")
    broken = tmp_path / "a.svs"
    shutil.copy(attrs["slide_path"], broken)
    corrupt_tile(broken, page=0, tile_xy=(4, 3))  # one level-0 tile inside the tissue
    changed = embed_slides(out, EmbedConfig(model="convlm_test", slides_dir=str(tmp_path)), slide_ids=["a"])
    assert "changed since it was tiled" in changed.results[0].reason  # not the file that was tiled
    [res] = tile_slides([broken], out, TILING)  # segmentation reads level 1: the same coords
    assert res.status == "ok" and np.array_equal(read_coords(out / "coords" / "a.h5")[0], coords)
    cfg = EmbedConfig(model="convlm_test", slides_dir=str(tmp_path), max_failed_fraction=0.0)
    failed = embed_slides(out, cfg, slide_ids=["a"])
    r = failed.results[0]
    assert r.status == "failed" and r.n_failed_patches >= 1 and "unreadable" in r.reason
    ok = embed_slides(out, EmbedConfig(model="convlm_test", slides_dir=str(tmp_path), max_failed_fraction=0.5), slide_ids=["a"])
    sf = get_store("h5").read(out / "features", ok.model_id, "a")
    assert ok.results[0].status == "ok" and sf.attrs["n_failed_patches"] == r.n_failed_patches
    assert len(sf.features) == len(coords) - r.n_failed_patches  # left out, never blank-substituted


def test_cli_embed_matches_reference_and_reports(tiled, tmp_path):
    from click.testing import CliRunner

    from wsi_pipeline.cli import main

    out = _copy_out(tiled, tmp_path)
    args = ["embed", str(out), "--model", "convlm_test", "--workers", "1", "--batch-size", "5", "--region-size", "512"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "3 ok, 0 failed, 0 skipped" in res.output
    [fdir] = (out / "features").iterdir()
    sf = get_store("h5").read(out / "features", fdir.name, "b")
    ref = _reference_features(out / "coords" / "b.h5", EmbedConfig(model="convlm_test"))
    np.testing.assert_allclose(sf.features, ref, atol=1e-5, rtol=0)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "0 ok, 0 failed, 3 skipped" in again.output


def test_cli_embed_usage_errors(tiled, tmp_path):
    from click.testing import CliRunner

    from wsi_pipeline.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["embed", str(empty), "--model", "convlm_test"])
    assert res.exit_code == 2 and "no coords files" in res.output and "Traceback" not in res.output
    out = _copy_out(tiled, tmp_path)
    res = CliRunner().invoke(main, ["embed", str(out), "--model", "no_such_model"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    res = CliRunner().invoke(main, ["embed", str(out), "--model", "convlm_test", "--refine-layers", "a,b"])
    assert res.exit_code == 2 and "--refine-layers" in res.output
    # checked against the model once, before any slide: not one failure per slide
    res = CliRunner().invoke(main, ["embed", str(out), "--model", "convlm_test", "--refine-layers", "1,9", "-q"])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        "error: refine layers [9] are outside the model's blocks 0..3; pick 0-based block indices"], res.output
    old = CliRunner().invoke(main, ["embed", str(out), "--model", "convlm_test", "--prune-layers", "1,9", "-q"])
    assert old.output == res.output  # the former flag name still works, and is not shown in --help
    assert "--prune-layers" not in CliRunner().invoke(main, ["embed", "--help"]).output
    res = CliRunner().invoke(main, ["embed", str(out), "--model", "convlm_test", "--device", "tpu", "-q"])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        "error: --device 'tpu' is not a device; use auto, cpu, cuda or cuda:N"], res.output
    assert not (out / "features").exists() or not any((out / "features").rglob("*.h5"))


def test_default_model_is_the_shipped_demo_with_one_warning(tiled, tmp_path, caplog):
    import hashlib

    from wsi_pipeline.model import shipped_weights

    shipped = shipped_weights("convlm_demo")
    assert shipped is not None, "models/convlm_demo.safetensors must ship with the repository"
    out = _copy_out(tiled, tmp_path)
    with caplog.at_level("WARNING", logger="wsi_pipeline"):
        summary = embed_slides(out, EmbedConfig(), slide_ids=["b"])
    notices = [r.getMessage() for r in caplog.records if "synthetic" in r.getMessage()]
    assert len(notices) == 1 and "not for real slides" in notices[0]
    sf = get_store("h5").read(out / "features", summary.model_id, "b")
    assert sf.attrs["model_name"] == "convlm_demo"
    assert sf.attrs["weights_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert summary.model_id.startswith("convlm_demo-w" + sf.attrs["weights_sha256"][:8])


def test_resume_honours_an_asked_precision(tiled, tmp_path):
    """Features embedded in bf16 are kept by an `auto` run but redone by a run that asks for fp32."""
    out = _copy_out(tiled, tmp_path)
    store = get_store("h5")
    first = embed_slides(out, EmbedConfig(model="convlm_test", precision="bf16"), slide_ids=["b"])
    assert first.results[0].status == "ok"
    assert store.read(out / "features", first.model_id, "b").attrs["precision"] == "bf16"
    auto = embed_slides(out, EmbedConfig(model="convlm_test", precision="auto"), slide_ids=["b"])
    assert auto.model_id == first.model_id and auto.results[0].status == "skipped"
    fp32 = embed_slides(out, EmbedConfig(model="convlm_test", precision="fp32"), slide_ids=["b"])
    assert fp32.model_id == first.model_id and fp32.results[0].status == "ok"
    redone = store.read(out / "features", first.model_id, "b")
    assert redone.attrs["precision"] == "fp32"
    ref = _reference_features(out / "coords" / "b.h5", EmbedConfig(model="convlm_test"))
    np.testing.assert_allclose(redone.features, ref, atol=1e-5, rtol=0)
    again = embed_slides(out, EmbedConfig(model="convlm_test", precision="fp32"), slide_ids=["b"])
    assert again.results[0].status == "skipped"
