"""Bad input through the whole pipeline (``wsi-pipeline classify``): one test per class.

Each test runs the real CLI on a good slide plus one bad input and checks the four things
a user relies on: the one-line message, the ``status.csv`` row (and predictions row), the
exit code (1: a slide failed, the batch finished; 2: usage error, nothing done), and that
the good slide's outputs are intact (byte-identical to a run on the good slide alone).
The tile-level details of the same classes are in ``test_bad_input_tile.py``.
"""

from __future__ import annotations

import csv
import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from slide_factory import FixtureSlide, make_corrupt_files, make_slide

from wsi_pipeline.cli import main
from wsi_pipeline.store.coords import read_coords
from wsi_pipeline.store.status import latest_status, read_status

PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "demo.yaml"
FAST = ["--model", "convlm_test", "--patch-size", "64", "--target-mpp", "1.0", "--workers", "0",
        "--min-tissue-area", "2000", "--no-visuals", "-q"]
GOOD = "good"


def _classify(inputs: list[Path | str], out: Path, *extra: str) -> Result:
    args = ["classify", *map(str, inputs), "--prompts", str(PROMPTS), "-o", str(out), *FAST, *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _predictions(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "predictions" / "demo.csv", newline="", encoding="utf-8") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _good_outputs(out: Path) -> dict[str, bytes]:
    files = [out / "coords" / f"{GOOD}.h5", out / "thumbnails" / f"{GOOD}.png", out / "tissue" / f"{GOOD}.geojson",
             *(out / "features").glob(f"*/{GOOD}.h5")]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> FixtureSlide:
    return make_slide(tmp_path_factory.mktemp("good") / f"{GOOD}.svs", 1536, 1024, mpp=0.5, seed=31)


@pytest.fixture(scope="module")
def baseline(good: FixtureSlide, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The good slide classified alone: the reference for 'intact'."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    r = _classify([good.path], out)
    assert r.exit_code == 0, r.output
    assert _predictions(out)[GOOD]["status"] == "ok" and len(_good_outputs(out)) == 4
    return out


@pytest.fixture(scope="module")
def corrupt(good: FixtureSlide, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_corrupt_files(tmp_path_factory.mktemp("corrupt"), good.path)


def _assert_good_intact(out: Path, baseline: Path) -> None:
    assert _good_outputs(out) == _good_outputs(baseline)
    assert _predictions(out)[GOOD] == _predictions(baseline)[GOOD]
    for stage in ("tile", "embed", "classify"):
        assert latest_status(out, stage)[GOOD]["status"] == "ok", stage


def _assert_one_error(r: Result, sid: str, fragment: str) -> str:
    assert "Traceback" not in r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR: ")]
    assert len(errors) == 1 and errors[0].startswith(f"ERROR: {sid}: ") and fragment in errors[0], r.stderr
    return errors[0]


def _assert_failed_slide(r: Result, out: Path, sid: str, stage: str, fragment: str) -> None:
    """Exit 1, one ERROR line, a failed status row of ``stage`` and a failed predictions row saying why."""
    assert r.exit_code == 1, r.output
    _assert_one_error(r, sid, fragment)
    row = latest_status(out, stage)[sid]
    assert row["status"] == "failed" and fragment in row["reason"] and "\n" not in row["reason"]
    pred = _predictions(out)[sid]
    assert pred["status"] == "failed" and pred["reason"].startswith(f"{stage}: ") and fragment in pred["reason"]
    assert latest_status(out, "classify")[sid]["status"] == "failed"


def _assert_usage_error(r: Result, fragment: str) -> None:
    """Exit 2 and exactly one line on stderr, starting with ``error:``."""
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr


def _copy(baseline: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(baseline, out)
    return out


# -- slides that fail alone; the batch goes on (exit 1) -----------------------------------
@pytest.mark.parametrize(
    ("kind", "sid", "fragment"),
    [
        ("zero_byte", "zero", "file is empty (0 bytes)"),
        ("truncated", "truncated", "file is truncated"),
        ("text", "notes", "not a TIFF file"),
        ("unsupported", "slide", "unsupported extension '.xyz'"),
    ],
)
def test_unreadable_file(kind: str, sid: str, fragment: str, good: FixtureSlide, corrupt: dict[str, Path],
                         baseline: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _classify([good.path, corrupt[kind]], out)
    _assert_failed_slide(r, out, sid, "tile", fragment)
    assert not (out / "coords" / f"{sid}.h5").exists()
    _assert_good_intact(out, baseline)


def test_missing_mpp(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    nompp = make_slide(tmp_path / "nompp.tif", 1024, 768, mpp=None, layout="generic", seed=2).path
    out = tmp_path / "out"
    r = _classify([good.path, nompp], out)
    _assert_failed_slide(r, out, "nompp", "tile", "no physical resolution")
    assert "--mpp-csv" in latest_status(out, "tile")["nompp"]["reason"]
    _assert_good_intact(out, baseline)


def test_blank_glass(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    blank = make_slide(tmp_path / "blank.svs", 1024, 768, mpp=0.5, n_blobs=0, seed=4).path
    out = tmp_path / "out"
    r = _classify([good.path, blank], out)
    assert r.exit_code == 0 and not [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR")], r.output
    tile = latest_status(out, "tile")["blank"]
    assert tile["status"] == "ok" and tile["n_patches"] == "0" and tile["reason"] == "no tissue found"
    assert latest_status(out, "embed")["blank"]["status"] == "ok"
    pred = _predictions(out)["blank"]
    assert pred["status"] == "no_tissue" and pred["predicted"] == "" and pred["n_patches"] == "0"
    assert pred["reason"] == "no patches: no tissue found"  # the tile stage's reason, carried over
    _assert_good_intact(out, baseline)


def test_corrupt_tile_inside_a_good_slide(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    from wsi_pipeline.slide.write import corrupt_tile

    damaged = tmp_path / "damaged.svs"
    mask = make_slide(damaged, 1536, 1024, mpp=0.5, seed=32).mask
    tiles = [(mask[y:y + 256, x:x + 256].mean(), (x // 256, y // 256)) for y in range(0, 1024, 256)
             for x in range(0, 1536, 256)]
    frac, tile_xy = max(tiles)
    assert frac > 0.5  # a level-0 tile mostly on tissue: the patches over it are read
    corrupt_tile(damaged, page=0, tile_xy=tile_xy)
    out = tmp_path / "out"
    r = _classify([good.path, damaged], out)
    _assert_failed_slide(r, out, "damaged", "embed", "patches unreadable (> 1%); the slide file is damaged")
    assert latest_status(out, "tile")["damaged"]["status"] == "ok"  # segmentation reads a lower level
    assert not list((out / "features").glob("*/damaged.h5"))
    _assert_good_intact(out, baseline)


def test_large_non_pyramidal_tiff(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    flat = make_slide(tmp_path / "flat.tif", 3072, 2048, mpp=0.5, layout="generic", levels=(1,), seed=7).path
    out = tmp_path / "out"
    r = _classify([good.path, flat], out)
    assert r.exit_code == 0 and "ERROR" not in r.stderr, r.output
    _, attrs = read_coords(out / "coords" / "flat.h5")
    assert attrs["seg_level"] == 0 and attrs["seg_factor"] == 16 and attrs["patch_level"] == 0
    assert attrs["n_patches"] > 50
    assert _predictions(out)["flat"]["status"] == "ok"
    assert all(latest_status(out, s)["flat"]["status"] == "ok" for s in ("tile", "embed", "classify"))
    _assert_good_intact(out, baseline)


def test_spaces_and_unicode_in_names(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    nfc = "Präparat Nr 1 – Ökö"
    folder = tmp_path / "mein Ordner ü"
    folder.mkdir()
    path = folder / f"{unicodedata.normalize('NFD', nfc)}.svs"  # as macOS would write it
    make_slide(path, 1536, 1024, mpp=0.5, seed=33)
    out = tmp_path / "out dir ß"
    r = _classify([good.path, path], out)
    assert r.exit_code == 0, r.output
    assert (out / "coords" / f"{nfc}.h5").is_file() and list((out / "features").glob(f"*/{nfc}.h5"))
    preds = _predictions(out)
    assert preds[nfc]["status"] == "ok" and int(preds[nfc]["n_patches"]) > 0
    assert all(latest_status(out, s)[nfc]["status"] == "ok" for s in ("tile", "embed", "classify"))
    _assert_good_intact(out, baseline)
    again = _classify([], out)  # classify what the folder holds: ids read back from file names
    assert again.exit_code == 0 and set(_predictions(out)) == {GOOD, nfc}


# -- usage errors: one line, exit 2, nothing touched ----------------------------------------
def test_duplicate_slide_ids_in_different_folders(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copyfile(good.path, tmp_path / sub / "x.svs")
    out = _copy(baseline, tmp_path)
    before = _snapshot(out)
    r = _classify([good.path, tmp_path / "a" / "x.svs", tmp_path / "b" / "x.svs"], out)
    _assert_usage_error(r, "two slides have the same id 'x'")
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("name: broken\nclasses: [unclosed\n", "p.yaml"), ("name: x\ntemplates: [a photo of CLASSNAME]\nclasses: {A: [a]}\n",
                                                      "needs at least 2 classes")],
    ids=["yaml-syntax", "one-class"],
)
def test_bad_prompt_yaml(text: str, fragment: str, good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text(text)
    out = _copy(baseline, tmp_path)
    before = _snapshot(out)
    args = ["classify", str(good.path), "--prompts", str(bad), "-o", str(out), *FAST]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    _assert_usage_error(r, fragment)
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [("slide_id,label\ngood,papillary\n", "unknown classes 'papillary'"),
     ("slide_id,label\ngood,solid\nzz,solid\n", "not in this run: 'zz'")],
    ids=["unknown-class", "unknown-slide"],
)
def test_labels_csv_with_unknown_slides_or_classes(labels: str, fragment: str, good: FixtureSlide, baseline: Path,
                                                   tmp_path: Path) -> None:
    p = tmp_path / "labels.csv"
    p.write_text(labels)
    out = _copy(baseline, tmp_path)
    before = _snapshot(out)
    _assert_usage_error(_classify([good.path], out, "--labels", str(p)), fragment)
    assert _snapshot(out) == before


def test_unwritable_output_folder(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _assert_usage_error(_classify([good.path], blocker / "out"), "is not writable")
    assert blocker.read_text() == "not a folder"
    if os.geteuid() != 0:  # root writes anywhere: permissions cannot make a folder unwritable for it
        out = _copy(baseline, tmp_path)
        before = _snapshot(out)
        out.chmod(0o555)
        try:
            _assert_usage_error(_classify([good.path], out), "is not writable")
        finally:
            out.chmod(0o755)
        assert _snapshot(out) == before


def _state_dict() -> dict[str, object]:
    import torch

    from wsi_pipeline.model import create_model

    torch.manual_seed(0)
    model = create_model("convlm_test")
    return {k: v.detach().clone().contiguous() for k, v in getattr(model, "state_module", model).state_dict().items()}


def test_checkpoint_of_the_wrong_architecture(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = _state_dict()
    key = next(k for k, v in state.items() if getattr(v, "ndim", 0) == 2)
    state[key] = state[key][:, :-1].contiguous()  # one layer narrower: another architecture
    state["head.extra.weight"] = state[key].clone()
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong))
    out = _copy(baseline, tmp_path)
    before = _snapshot(out)
    r = _classify([good.path], out, "--weights", str(wrong))
    _assert_usage_error(r, "weights file wrong.safetensors does not fit model convlm_test")
    assert "shape mismatch" in r.stderr and "unexpected key" in r.stderr
    assert _snapshot(out) == before  # checked before any slide is tiled


def test_truncated_checkpoint(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    full = tmp_path / "full.safetensors"
    save_file(_state_dict(), str(full))
    data = full.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "fresh"
    r = _classify([good.path], out, "--weights", str(cut))
    _assert_usage_error(r, "is truncated or corrupt")
    assert not (out / "coords").exists() and not read_status(out)  # nothing tiled with a model that cannot load
    # the intact file works, and features made with it differ from the random-init ones
    ok = _classify([good.path], out, "--weights", str(full))
    assert ok.exit_code == 0, ok.output
    [feat] = (out / "features").glob(f"*/{GOOD}.h5")
    assert "-w" in feat.parent.name and np.array_equal(read_coords(out / "coords" / f"{GOOD}.h5")[0],
                                                       read_coords(baseline / "coords" / f"{GOOD}.h5")[0])
