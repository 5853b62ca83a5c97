"""Bad input that a review found slipping through (after issue 15).

A zarr chunk lost in a copy, list entries that do not exist given to ``classify``, a slide id
that starts with a dot, run-config values of the wrong YAML type, per-slide CSVs that name one
slide twice or hold an unquoted decimal comma, a ``status.csv`` saved without its last newline,
and two models exported into one CLAM folder. Each runs the real CLI (or the stage function) on
the bad-input suite's good slide and checks one clear line, the status rows, the exit code, and
that the good slide's outputs stay as they were.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import test_bad_input_suite
from click.testing import CliRunner, Result
from test_bad_input_suite import (
    GOOD,
    _assert_good_intact,
    _assert_usage_error,
    _classify,
    _copy,
    _predictions,
)

from wsi_pipeline.cli import main
from wsi_pipeline.errors import ConfigError, CorruptOutputError
from wsi_pipeline.store.coords import read_coords
from wsi_pipeline.store.features import get_store
from wsi_pipeline.store.status import StatusRow, append_status, latest_status, read_status

good = test_bad_input_suite.good
baseline = test_bad_input_suite.baseline


def _run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _zarr_chunks(out: Path) -> list[Path]:
    [group] = (out / "features").glob(f"*.zarr/{GOOD}")
    return sorted(p for p in (group / "features" / "c").rglob("*") if p.is_file())


def test_a_lost_zarr_chunk_is_embedded_again_not_read_as_zeros(good, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _classify([good.path], out, "--store", "zarr")
    assert first.exit_code == 0, first.output
    before = _predictions(out)[GOOD]
    chunk = _zarr_chunks(out)[0]
    chunk.unlink()  # zarr would read the missing chunk as its fill value, 0
    [model_dir] = (out / "features").glob("*.zarr")
    model_id, store = model_dir.name.removesuffix(".zarr"), get_store("zarr")
    with pytest.raises(CorruptOutputError, match="'features' misses 1 of"):
        store.read(out / "features", model_id, GOOD)
    reason = store.validate(out / "features", model_id, GOOD, read_coords(out / "coords" / f"{GOOD}.h5")[0])
    assert reason is not None and reason.startswith("unreadable") and "misses 1 of" in reason
    again = _classify([good.path], out, "--store", "zarr")
    assert again.exit_code == 0, again.output
    assert latest_status(out, "embed")[GOOD]["status"] == "ok"  # redone, not "skipped"
    assert chunk.exists() and _predictions(out)[GOOD] == before


def test_missing_list_entries_are_failed_rows_in_classify(good, baseline: Path, tmp_path: Path) -> None:
    listing = tmp_path / "slides.txt"
    listing.write_text(f"{good.path}\n{tmp_path / 'missing.svs'}\n")
    out = tmp_path / "out"
    r = _classify([f"@{listing}"], out)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    pred = _predictions(out)["missing"]
    assert pred["status"] == "failed" and pred["reason"].startswith("tile: ")
    _assert_good_intact(out, baseline)


def test_a_dot_slide_id_fails_in_one_line(good, baseline: Path, tmp_path: Path) -> None:
    hidden = tmp_path / "in" / ".hidden.svs"
    hidden.parent.mkdir()
    shutil.copy(good.path, hidden)
    out = tmp_path / "out"
    r = _classify([good.path, hidden], out)
    assert r.exit_code == 1, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR: ")]
    assert len(errors) == 1 and "starts with '.'" in errors[0], r.stderr
    assert latest_status(out, "tile")[".hidden"]["status"] == "failed"
    assert _predictions(out)[".hidden"]["status"] == "failed"
    assert not (out / "coords" / ".hidden.h5").exists()
    _assert_good_intact(out, baseline)


@pytest.mark.parametrize(("line", "fragment"), [
    ("top_k: [5, 10]", "top_k: expected one value of type integer range, got list [5, 10]"),
    ("weights: 5", "weights: expected one value of type path, got int 5"),
    ("labels: {a: b}", "labels: expected one value of type file, got dict"),
    ("patch_size: 128.7", "patch_size: expected an integer, got 128.7"),  # the flag refuses it; so does the file
])
def test_run_config_values_of_the_wrong_type_are_usage_errors(good, tmp_path: Path, line: str,
                                                              fragment: str) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(line + "\n")
    r = _classify([good.path], tmp_path / "out", "--config", str(cfg))
    _assert_usage_error(r, fragment)


@pytest.mark.parametrize(("csv_text", "option", "fragment"), [
    (f"slide,mpp\n{GOOD},0.5\n{GOOD}.svs,0.25\n", "--mpp-csv",
     f"slide '{GOOD}' is listed twice with different values, as '{GOOD}' and '{GOOD}.svs'"),
    (f"slide,mpp\n{GOOD},0,5\n", "--mpp-csv", "line 2: 3 cells, but the header has 2"),
    (f"slide,min_tissue\n{GOOD},0.5\n{GOOD}.svs,0.9\n", "--slide-params", "listed twice with different values"),
])
def test_a_slide_named_twice_or_an_unquoted_comma_is_refused(good, tmp_path: Path, csv_text: str, option: str,
                                                             fragment: str) -> None:
    table = tmp_path / "table.csv"
    table.write_text(csv_text)
    r = _classify([good.path], tmp_path / "out", option, str(table))
    _assert_usage_error(r, fragment)
    assert not (tmp_path / "out" / "coords").exists()


def test_a_status_file_without_its_last_newline_keeps_whole_rows(tmp_path: Path) -> None:
    append_status(tmp_path, StatusRow("a", "tile", "ok", n_patches=3, seconds=1.0))
    path = tmp_path / "status.csv"
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # saved by an editor without the last newline
    append_status(tmp_path, StatusRow("a", "tile", "failed", "reason"))
    rows = read_status(tmp_path)
    assert [(r["slide_id"], r["status"]) for r in rows] == [("a", "ok"), ("a", "failed")]
    assert all(None not in r for r in rows)
    assert latest_status(tmp_path, "tile")["a"]["status"] == "failed"


def test_a_clam_folder_takes_the_features_of_one_model(baseline: Path, tmp_path: Path) -> None:
    out = _copy(baseline, tmp_path)
    [first] = [p.name for p in (out / "features").iterdir()]
    dest = tmp_path / "clam"
    assert _run("export", out, "--to", "clam", "-o", dest, "-q").exit_code == 0
    r = _run("embed", out, "--model", "convlm_test", "--keep-rate", "1.0", "--workers", "0", "-q")
    assert r.exit_code == 0, r.output
    [second] = [p.name for p in (out / "features").iterdir() if p.name != first]
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    r = _run("export", out, "--to", "clam", "-o", dest, "--model-id", second, "-q")
    _assert_usage_error(r, f"holds a clam export of the features of {first}; export {second} into another folder")
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert _run("export", out, "--to", "clam", "-o", dest, "--model-id", first, "-q").exit_code == 0
    # TRIDENT's folders name the model: both go into one destination
    for model_id in (first, second):
        assert _run("export", out, "--to", "trident", "-o", tmp_path / "trident", "--model-id", model_id,
                    "-q").exit_code == 0
    assert len(list((tmp_path / "trident").glob("*/features_*"))) == 2


def test_classify_without_inputs_records_the_tiling_it_scored(baseline: Path, tmp_path: Path) -> None:
    """No INPUTS: nothing is tiled, so tiling flags are not used, and the run records what the
    coords files were tiled with (64 px at 1 µm/px), not the flags (224 px at 0.25 µm/px)."""
    import json

    import yaml

    out = _copy(baseline, tmp_path)
    r = _run("classify", "--prompts", test_bad_input_suite.PROMPTS, "-o", out, "--model", "convlm_test",
             "--workers", "0", "--patch-size", "224", "--target-mpp", "0.25", "-q")
    assert r.exit_code == 0, r.output
    assert "WARNING: --target-mpp, --patch-size not used: without INPUTS nothing is tiled" in r.stderr
    run = json.loads((out / "predictions" / "demo.json").read_text())["provenance"]
    assert (run["tiling"]["patch_size"], run["tiling"]["target_mpp"]) == (64, 1.0)
    config = yaml.safe_load((out / "run_config.yaml").read_text())
    assert (config["patch_size"], config["target_mpp"]) == (64, 1.0)
    assert "<b>tiling</b>: 64 px at 1 µm/px" in (out / "report.html").read_text()
    assert latest_status(out, "embed")[GOOD]["status"] == "skipped"


@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("--target-mpp", "1e300", "target_mpp must be a resolution in 0.001..1000 µm/px, got 1e+300"),
    ("--mag", "1e-300", "magnification must be a number in 0.01..10000, got 1e-300"),
    ("--seg-level-mpp", "1e9", "seg_level_mpp must be a resolution in 0.001..1000 µm/px"),
    ("--default-mpp", "0", "default_mpp must be a resolution in 0.001..1000 µm/px"),
])
def test_resolutions_beyond_any_scanner_are_usage_errors(good, tmp_path: Path, option: str, value: str,
                                                         fragment: str) -> None:
    fast = test_bad_input_suite.FAST
    if option == "--mag":  # instead of the suite's --target-mpp
        i = fast.index("--target-mpp")
        fast = fast[:i] + fast[i + 2:]
    r = _run("classify", good.path, "--prompts", test_bad_input_suite.PROMPTS, "-o", tmp_path / "out", *fast,
             option, value)
    _assert_usage_error(r, fragment)


def test_a_header_resolution_beyond_any_scanner_fails_the_slide() -> None:
    """A reader that passes a header's 1e-5 µm/px on: the slide fails in one line (the TIFF
    readers already drop such a resolution as missing)."""
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.errors import SlideError
    from wsi_pipeline.slide.base import SlideInfo
    from wsi_pipeline.tiling.stage import resolve_mpp

    info = SlideInfo(path="nm.svs", backend="t", backend_version="0", level_dimensions=((512, 512),),
                     level_downsamples=(1.0,), mpp_x=1e-5, mpp_y=1e-5, mpp_source="aperio.MPP")
    with pytest.raises(SlideError, match=r"the file's mpp must be a resolution in 0.001..1000 µm/px, got 1e-05: "
                                         r"a damaged header; give the slide's mpp with --mpp-csv"):
        resolve_mpp(info, "nm", TilingConfig(), {})
    assert resolve_mpp(info, "nm", TilingConfig(), {"nm": 0.25}).mpp == 0.25  # the CSV still wins


def test_a_float_tiff_is_named_for_its_sample_type(good, baseline: Path, tmp_path: Path) -> None:
    """OpenSlide opens a float32 RGB TIFF and then fails on every tile: refused at open instead."""
    import numpy as np
    import tifffile

    f32 = tmp_path / "in" / "f32.tif"
    f32.parent.mkdir()
    tifffile.imwrite(f32, np.random.default_rng(0).random((512, 512, 3), np.float32), photometric="rgb",
                     tile=(256, 256), resolution=(20000, 20000), resolutionunit="CENTIMETER")
    out = tmp_path / "out"
    r = _classify([good.path, f32], out)
    assert r.exit_code == 1, r.output
    reason = latest_status(out, "tile")["f32"]["reason"]
    assert "openslide: unsupported sample type float32" in reason and "corrupt" not in reason
    _assert_good_intact(out, baseline)


def test_a_segmentation_factor_past_the_level_is_one_block() -> None:
    from wsi_pipeline.slide.base import SlideInfo
    from wsi_pipeline.tiling.lowres import choose_seg_level

    info = SlideInfo(path="x", backend="t", backend_version="0", level_dimensions=((3000, 2000), (750, 500)),
                     level_downsamples=(1.0, 4.0), mpp_x=0.25, mpp_y=0.25)
    assert choose_seg_level(info, 8.0) == (1, 8)
    assert choose_seg_level(info, 999.0) == (1, 750)  # not 999: a 750 px level is one block at most


def test_a_model_without_weights_runs_only_when_asked(good, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`--model conch_v1` without `--weights` used to classify with random weights, exit 0."""
    import logging

    import torch

    from wsi_pipeline.embed.stage import EmbedConfig, load_encoder

    r = _run("classify", good.path, "--prompts", test_bad_input_suite.PROMPTS, "-o", tmp_path / "out",
             "--model", "conch_v1", "--patch-size", "64", "--target-mpp", "1.0", "-q")
    _assert_usage_error(r, "model conch_v1 has no weights here: pass --weights")
    assert not (tmp_path / "out" / "features").exists()
    with pytest.raises(ConfigError, match="or --random-init"):
        load_encoder(EmbedConfig(model="convlm_vit_s16"), torch.device("meta"))
    with caplog.at_level(logging.WARNING):
        model = load_encoder(EmbedConfig(model="convlm_vit_s16", random_init=True), torch.device("meta"))
    assert model.weights_sha256 is None and "runs with random weights" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_encoder(EmbedConfig(model="convlm_test"), torch.device("meta"))  # a test model needs no flag
    assert "random weights" not in caplog.text


def test_a_run_config_may_give_one_input_without_a_list(good, baseline: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"inputs: {good.path}\n")
    out = tmp_path / "out"
    r = _run("classify", "--config", cfg, "--prompts", test_bad_input_suite.PROMPTS, "-o", out,
             *test_bad_input_suite.FAST)
    assert r.exit_code == 0, r.output
    _assert_good_intact(out, baseline)


def test_classify_of_an_empty_folder_writes_nothing(tmp_path: Path) -> None:
    r = _run("classify", "--prompts", test_bad_input_suite.PROMPTS, "-o", tmp_path / "new", "--model", "convlm_test")
    _assert_usage_error(r, "holds no coords files; give slide paths so they are tiled first")
    assert not (tmp_path / "new").exists()


def test_train_without_a_validation_set_says_so() -> None:
    from wsi_pipeline.cli import _val_line

    assert _val_line(float("nan")) == _val_line(None) == "no validation set"
    assert _val_line(0.25) == "val balanced accuracy 0.250"


def test_a_grey_scan_says_why_no_tissue_is_found(good, baseline: Path, tmp_path: Path) -> None:
    """A greyscale TIFF is read (grey slides are allowed) but segmentation, which looks for colour,
    finds nothing: the reason says so, in status.csv and in the predictions."""
    import numpy as np
    import tifffile

    grey = np.full((1024, 1536), 235, np.uint8)
    grey[300:700, 400:1100] = 120  # dark "tissue", but no colour
    path = tmp_path / "in" / "grey.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, grey, tile=(256, 256), resolution=(20000, 20000), resolutionunit="CENTIMETER")
    out = tmp_path / "out"
    r = _classify([good.path, path], out)
    assert r.exit_code == 0, r.output
    hint = "no tissue found (the image is grey: tissue is found by its colour, so grey has none)"
    assert latest_status(out, "tile")["grey"]["reason"] == hint
    assert _predictions(out)["grey"]["reason"] == f"no patches: {hint}"
    _assert_good_intact(out, baseline)
