"""More bad input (issue 15): replaced slides, clashing names, links and FIFOs, absurd headers,
tied prompts, upsampling, non-square pixels, fluorescence images, foreign coords files, output
folders inside input folders, huge prompt files.

Each test runs the real CLI and checks what ``test_bad_input_suite.py`` checks for its classes
(whose helpers it uses): one clear line, a status row, the exit code, and that the good slide's
outputs are byte-identical to a run on the good slide alone. Fixtures are made at test time.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import test_bad_input_suite
from click.testing import CliRunner, Result
from slide_factory import FixtureSlide, TissueScene, make_slide
from test_bad_input_suite import (
    FAST,
    GOOD,
    PROMPTS,
    _assert_failed_slide,
    _assert_good_intact,
    _assert_usage_error,
    _classify,
    _copy,
    _good_outputs,
    _predictions,
    _snapshot,
)

from wsi_pipeline.cli import main
from wsi_pipeline.store.coords import read_coords
from wsi_pipeline.store.status import latest_status

#: The suite's fixtures (module scope: made again for this module): the good slide and its
#: outputs when classified alone.
good = test_bad_input_suite.good
baseline = test_bad_input_suite.baseline

TILE = ["--patch-size", "64", "--target-mpp", "1.0", "--min-tissue-area", "2000", "-q"]
EMBED = ["--model", "convlm_test", "--workers", "0", "-q"]
VISUALS = [a for a in FAST if a != "--no-visuals"]
PRESETS = Path(__file__).resolve().parents[1] / "configs" / "tiling"


def _run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _errors(r: Result) -> list[str]:
    assert "Traceback" not in r.output
    return [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR: ")]


def _assert_good_unchanged(out: Path, baseline: Path) -> None:
    """The good slide's outputs and prediction equal the baseline's (after a rerun: done or skipped)."""
    assert _good_outputs(out) == _good_outputs(baseline)
    assert _predictions(out)[GOOD] == _predictions(baseline)[GOOD]
    for stage in ("tile", "embed", "classify"):
        assert latest_status(out, stage)[GOOD]["status"] in ("ok", "skipped"), stage


# -- 1. a replaced slide keeps no old results ----------------------------------------------
def test_replaced_slide_is_tiled_and_embedded_again(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    x = tmp_path / "slides" / "x.svs"
    x.parent.mkdir()
    make_slide(x, 1536, 1024, mpp=0.5, seed=51, compression=None)
    size = x.stat().st_size
    out = tmp_path / "out"
    assert _classify([good.path, x], out).exit_code == 0
    old = read_coords(out / "coords" / "x.h5")
    make_slide(x, 1536, 1024, mpp=0.5, seed=52, compression=None)  # another scan: same name, size and mpp
    assert x.stat().st_size == size
    r = _classify([good.path, x], out)
    assert r.exit_code == 0, r.output
    assert latest_status(out, "tile")["x"]["status"] == "ok" and latest_status(out, "embed")["x"]["status"] == "ok"
    new = read_coords(out / "coords" / "x.h5")
    assert new[1]["slide_fingerprint"] != old[1]["slide_fingerprint"] and not np.array_equal(new[0], old[0])
    fresh = tmp_path / "fresh"  # the new slide alone: what the rerun must have made of it
    assert _classify([x], fresh).exit_code == 0
    for rel in ("coords/x.h5", *(p.relative_to(fresh).as_posix() for p in (fresh / "features").glob("*/x.h5"))):
        assert (out / rel).read_bytes() == (fresh / rel).read_bytes(), rel
    assert _predictions(out)["x"] == _predictions(fresh)["x"]
    _assert_good_unchanged(out, baseline)


def test_embed_notices_a_replaced_slide(tmp_path: Path) -> None:
    x = tmp_path / "x.svs"
    make_slide(x, 1536, 1024, mpp=0.5, seed=53, compression=None)
    out = tmp_path / "out"
    assert _run("tile", x, "-o", out, *TILE).exit_code == 0
    assert _run("embed", out, *EMBED).exit_code == 0
    coords = read_coords(out / "coords" / "x.h5")[0]
    make_slide(x, 1536, 1024, mpp=0.5, seed=53, compression="deflate")  # the same pixels in another file
    r = _run("embed", out, *EMBED)  # tiled from the old file: its coords cannot be trusted
    assert r.exit_code == 1 and _errors(r) == [next(ln for ln in _errors(r) if ln.startswith("ERROR: x: "))]
    assert "changed since it was tiled" in _errors(r)[0] and "re-run tile" in _errors(r)[0]
    row = latest_status(out, "embed")["x"]
    assert row["status"] == "failed" and "changed since it was tiled" in row["reason"]
    assert _run("tile", x, "-o", out, *TILE).exit_code == 0
    assert latest_status(out, "tile")["x"]["status"] == "ok"  # redone, not "outputs exist and validate"
    np.testing.assert_array_equal(read_coords(out / "coords" / "x.h5")[0], coords)  # same tissue, same coords
    assert _run("embed", out, *EMBED).exit_code == 0
    assert latest_status(out, "embed")["x"]["status"] == "ok"  # features of the old file are not kept


def test_fingerprint_reads_whole_small_files_and_samples_large_ones(tmp_path: Path) -> None:
    from wsi_pipeline.slide import fingerprint as fp

    big = tmp_path / "big.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 20 * 2**20, dtype=np.uint8).tobytes())
    big.write_bytes(data)
    first = fp.slide_fingerprint(big)
    shutil.copyfile(big, tmp_path / "copy.bin")
    assert fp.slide_fingerprint(tmp_path / "copy.bin") == first  # content only: not the path or the time
    for offset, _ in fp.sample_ranges(len(data)):
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        big.write_bytes(changed)
        assert fp.slide_fingerprint(big) != first, offset
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(data[: 2**20]))
    a = fp.slide_fingerprint(small)
    small.write_bytes(bytes(data[: 2**20 - 1]) + b"\0")
    assert fp.slide_fingerprint(small) != a  # small files are hashed whole: the last byte counts
    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"one")
    (folder / "b.dcm").write_bytes(b"two")
    before = fp.slide_fingerprint(folder)
    (folder / "b.dcm").write_bytes(b"TWO")
    assert fp.slide_fingerprint(folder) != before and before.startswith("v1:sha256:")


# -- 2. two slide ids that map to one file-safe name ---------------------------------------
def test_slide_ids_with_the_same_safe_name_keep_their_own_visuals(tmp_path: Path) -> None:
    from wsi_pipeline.classify.outputs import safe_name

    assert safe_name("标本 1") != safe_name("切片 1") and safe_name("good") == "good"
    a, b = tmp_path / "标本 1.svs", tmp_path / "切片 1.svs"
    make_slide(a, 1536, 1024, mpp=0.5, seed=54)
    make_slide(b, 1536, 1024, mpp=0.5, seed=55)
    out = tmp_path / "out"
    r = _run("classify", a, b, "--prompts", PROMPTS, "-o", out, *VISUALS)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "predictions" / "demo.json").read_text(encoding="utf-8"))
    visuals = {s["slide_id"]: s["visuals"] for s in doc["slides"]}
    files = {sid: {*v["heatmaps"].values(), v["montage"]} for sid, v in visuals.items()}
    assert set(files) == {"标本 1", "切片 1"} and not files["标本 1"] & files["切片 1"]
    assert all((out / rel).is_file() for rel in files["标本 1"] | files["切片 1"])
    scores = sorted(p.name for p in (out / "scores" / "demo").glob("*.geojson"))
    assert len(scores) == 2 and scores[0] != scores[1]


def test_ids_differing_only_in_case_are_refused_where_the_output_file_system_ignores_case(
    good: FixtureSlide, tmp_path: Path
) -> None:
    """``A.svs`` and ``a.svs`` are two slides on Linux, one output file on macOS or Windows. A
    case-insensitive folder is imitated by a link under the case-swapped name."""
    from wsi_pipeline.store.atomic import folds_case
    from wsi_pipeline.tiling.stage import check_unique_ids

    (tmp_path / "Data").mkdir()
    assert not folds_case(tmp_path / "Data" / "out")  # this machine's file system
    (tmp_path / "dATA").symlink_to(tmp_path / "Data")
    assert folds_case(tmp_path / "Data" / "out" / "not yet made") and folds_case(tmp_path / "Data")
    for name in ("Slide.svs", "slide.svs"):
        shutil.copyfile(good.path, tmp_path / name)
    pair = [tmp_path / "Slide.svs", tmp_path / "slide.svs"]
    assert check_unique_ids(pair, tmp_path / "elsewhere") == ["Slide", "slide"]
    r = _run("tile", *pair, "-o", tmp_path / "Data" / "out", *TILE)
    _assert_usage_error(r, "slide ids 'Slide' and 'slide' differ only in case")
    assert not (tmp_path / "Data" / "out").exists()


# -- 3. and 5. links, loops and FIFOs: a status row each, never dropped ---------------------
def test_symlink_loop_in_a_list_file(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    loop = tmp_path / "loop.svs"
    os.symlink(loop.name, loop)  # points at itself
    listing = tmp_path / "slides.txt"
    listing.write_text(f"{good.path}\n{loop}\n")
    out = tmp_path / "out"
    r = _classify([f"@{listing}"], out)
    _assert_failed_slide(r, out, "loop", "tile", "symbolic link loop")
    _assert_good_intact(out, baseline)


def test_broken_link_fifo_and_loop_in_a_folder_get_status_rows(good: FixtureSlide, baseline: Path,
                                                               tmp_path: Path) -> None:
    folder = good.path.parent  # the good slide's own folder, so its outputs stay byte-identical
    bad = {"dangling": "broken symbolic link", "fifo": "not a regular file but a FIFO", "cycle": "symbolic link loop"}
    os.symlink("missing.svs", folder / "dangling.svs")
    os.mkfifo(folder / "fifo.svs")
    os.symlink("cycle.svs", folder / "cycle.svs")
    try:
        out = tmp_path / "out"
        r = _classify([folder], out)
    finally:
        for sid in bad:
            (folder / f"{sid}.svs").unlink()
    assert r.exit_code == 1, r.output
    errors = _errors(r)
    assert len(errors) == len(bad), r.stderr
    for sid, fragment in bad.items():
        [line] = [ln for ln in errors if ln.startswith(f"ERROR: {sid}: ")]
        assert fragment in line
        row = latest_status(out, "tile")[sid]
        assert row["status"] == "failed" and fragment in row["reason"]
        assert _predictions(out)[sid]["status"] == "failed"
    _assert_good_intact(out, baseline)


# -- 4. a header that claims 10⁶ × 10⁶ px --------------------------------------------------
def _header_only_tiff(path: Path, side: int, mpp: float = 0.5, tile: int = 2048) -> Path:
    """A tiled JPEG TIFF of ``side``² px whose tiles are all left out of the file (a few MB of header)."""
    import tifffile

    n = (-(-side // tile)) ** 2
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(itertools.repeat(b"", n), shape=(side, side, 3), dtype=np.uint8, photometric="rgb",
                 tile=(tile, tile), compression="jpeg", resolution=(1e4 / mpp, 1e4 / mpp),
                 resolutionunit="CENTIMETER", metadata=None)
    return path


def test_absurd_header_is_refused_before_any_read(good: FixtureSlide, baseline: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_pipeline.slide import Slide

    huge = _header_only_tiff(tmp_path / "huge.tif", 10**6)
    assert huge.stat().st_size < 8 * 2**20
    real = Slide.read_region

    def no_huge_reads(self: Slide, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if Path(self.path).name == huge.name:  # stop at once: before the fix this read goes on for an hour
            raise RuntimeError(f"read of {huge.name} at level {level}")
        return real(self, location, level, size)

    monkeypatch.setattr(Slide, "read_region", no_huge_reads)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = _classify([good.path, huge], out)
    _assert_failed_slide(r, out, "huge", "tile", "too large to tile: the header says 1000000x1000000 px")
    assert "500 x 500 mm" in latest_status(out, "tile")["huge"]["reason"]
    assert time.perf_counter() - t0 < 60
    _assert_good_intact(out, baseline)


# -- 6. two classes with identical prompts -------------------------------------------------
def test_classes_with_identical_prompts_are_refused(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    p = tmp_path / "tie.yaml"
    p.write_text("name: tie\ntemplates: [an H&E image of CLASSNAME.]\n"
                 "classes:\n  A: [solid tumour, sheets]\n  B: [glands]\n  C: [sheets, solid tumour]\n")
    out = _copy(baseline, tmp_path)
    before = _snapshot(out)
    r = _run("classify", good.path, "--prompts", p, "-o", out, *FAST)
    _assert_usage_error(r, "classes.C: same synonyms as class 'A'")
    assert "always tie" in r.stderr and "tie.yaml:6:" in r.stderr
    assert _snapshot(out) == before


# -- 7. a target finer than the scan -------------------------------------------------------
def test_upsampling_is_warned_recorded_and_can_be_refused(good: FixtureSlide, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _run("tile", good.path, "-o", out, "--config", PRESETS / "40x_512.yaml", "--min-tissue-area", "2000")
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if "upsampled" in ln]
    assert len(warnings) == 1 and warnings[0].startswith(f"WARNING: {GOOD}: ") and "upsampled 2x" in warnings[0]
    _, attrs = read_coords(out / "coords" / f"{GOOD}.h5")
    assert attrs["upsample_factor"] == pytest.approx(2.0)
    fine = make_slide(tmp_path / "fine.svs", 2048, 1536, mpp=0.25, seed=56).path
    preset = tmp_path / "no_upsampling.yaml"
    preset.write_text("target_mpp: 0.25\npatch_size: 128\nmin_tissue_area: 2000\nmax_upsample: 1\n")
    out2 = tmp_path / "out2"
    r = _run("tile", good.path, fine, "-o", out2, "--config", preset, "-q")
    assert r.exit_code == 1 and len(_errors(r)) == 1, r.output
    assert _errors(r)[0].startswith(f"ERROR: {GOOD}: ") and "upsampled 2x, above max_upsample 1" in _errors(r)[0]
    assert latest_status(out2, "tile")[GOOD]["status"] == "failed"
    assert latest_status(out2, "tile")["fine"]["status"] == "ok"
    assert read_coords(out2 / "coords" / "fine.h5")[1]["upsample_factor"] == 1.0
    out3 = tmp_path / "out3"  # the same refusal from the flag
    r = _run("tile", good.path, "-o", out3, "--target-mpp", "0.25", "--patch-size", "128", "--min-tissue-area", "2000",
             "--max-upsample", "1.5", "-q")
    assert r.exit_code == 1 and "upsampled 2x, above max_upsample 1.5" in _errors(r)[0], r.output


# -- 8. anisotropic pixels -----------------------------------------------------------------
def test_anisotropic_pixels_fail_with_one_line(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    import tifffile

    scene = TissueScene(1024, 768, n_blobs=2, seed=57)
    aniso = tmp_path / "aniso.tif"
    tifffile.imwrite(aniso, scene.render(0, 0, 1024, 768), photometric="rgb", tile=(256, 256),
                     resolution=(1e4 / 0.25, 1e4 / 0.5), resolutionunit="CENTIMETER", metadata=None)
    out = tmp_path / "out"
    r = _classify([good.path, aniso], out)
    _assert_failed_slide(r, out, "aniso", "tile", "pixels are not square: 0.25 µm/px wide but 0.5 µm/px tall")
    _assert_good_intact(out, baseline)


# -- 9. a multichannel fluorescence OME-TIFF -----------------------------------------------
def test_fluorescence_ome_tiff_is_refused(good: FixtureSlide, baseline: Path, tmp_path: Path) -> None:
    import tifffile

    mask = TissueScene(768, 512, n_blobs=2, seed=58).mask()
    channels = np.stack([(mask * v).astype(np.uint8) for v in (200, 120, 60, 30)])  # DAPI, FITC, ...: 4 x uint8
    fl = tmp_path / "fl.ome.tif"
    tifffile.imwrite(fl, channels, ome=True, metadata={"axes": "CYX"}, tile=(256, 256),
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    out = tmp_path / "out"
    r = _classify([good.path, fl], out)
    _assert_failed_slide(r, out, "fl", "tile", "not a brightfield RGB image: 4 channels of uint8")
    _assert_good_intact(out, baseline)


# -- 10. a CLAM patch file in coords/ ------------------------------------------------------
def test_clam_patch_file_in_coords_is_named_for_what_it_is(baseline: Path, tmp_path: Path) -> None:
    out = _copy(baseline, tmp_path)
    with h5py.File(out / "coords" / "clam_slide.h5", "w") as f:  # as CLAM's create_patches_fp.py writes it
        ds = f.create_dataset("coords", data=np.array([[0, 0], [256, 0]], np.int64))
        ds.attrs.update(patch_level=0, patch_size=256, downsample=np.array([1.0, 1.0]),
                        level_dim=np.array([1536, 1024]), downsampled_level_dim=np.array([1536, 1024]),
                        name="clam_slide", save_path="patches")
    before = _good_outputs(out)
    r = _run("embed", out, *EMBED)
    assert r.exit_code == 1
    [line] = _errors(r)
    assert line.startswith("ERROR: clam_slide: ") and "not a wsi-pipeline coords file" in line
    assert "export --to clam" in line and "--slides" not in line
    row = latest_status(out, "embed")["clam_slide"]
    assert row["status"] == "failed" and "not a wsi-pipeline coords file" in row["reason"]
    assert latest_status(out, "embed")[GOOD]["status"] == "skipped" and _good_outputs(out) == before


# -- 11. the output folder inside a recursive input folder ---------------------------------
def test_output_folder_inside_a_recursive_input_folder_is_not_read(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_slide(data / "case" / "s1.svs", 1536, 1024, mpp=0.5, seed=59)
    out = data / "out"
    args = ["classify", data, "--recursive", "--prompts", PROMPTS, "-o", out, *VISUALS]
    first = _run(*args)
    assert first.exit_code == 0, first.output
    assert list((out / "montages").rglob("*.png")) and list((out / "thumbnails").glob("*.png"))
    again = _run(*args)  # before: the montages and thumbnails were slides, and their ids clashed
    assert again.exit_code == 0, again.output
    assert set(_predictions(out)) == {"s1"} and latest_status(out, "tile")["s1"]["status"] == "skipped"


def test_a_folder_input_that_is_also_the_output_gives_its_own_slides_only(tmp_path: Path) -> None:
    from wsi_pipeline.inputs import collect_inputs, is_output_folder

    folder = tmp_path / "slides"
    for rel in ("a.svs", "thumbnails/a.png", "montages/demo/a.png"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"x")
    assert len(collect_inputs([folder], recursive=True)) == 3  # no outputs yet: a plain folder of images
    (folder / "status.csv").write_text("slide_id,stage,status\n")
    assert is_output_folder(folder)
    assert collect_inputs([folder], recursive=True) == [folder / "a.svs"]


# -- 12. a huge file passed as --prompts ---------------------------------------------------
def test_huge_or_foreign_prompt_file_is_refused_at_once(good: FixtureSlide, tmp_path: Path) -> None:
    ring = [[[x, 0], [x + 10, 0], [x + 10, 10], [x, 10], [x, 0]] for x in range(5)]
    feature = {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
               "geometry": {"type": "Polygon", "coordinates": ring}}
    big = tmp_path / "annotations.geojson"
    n = 10 * 2**20 // len(json.dumps(feature)) + 1
    big.write_text(json.dumps({"type": "FeatureCollection", "features": [feature] * n}))
    assert big.stat().st_size > 10 * 2**20
    small = tmp_path / "small.geojson"
    small.write_text(json.dumps({"type": "FeatureCollection", "features": [feature] * 200}))
    for path, fragment in ((big, "bytes is too large for a prompt file (at most 1,048,576 bytes"),
                           (small, "GeoJSON (FeatureCollection)")):
        t0 = time.perf_counter()
        r = _run("classify", good.path, "--prompts", path, "-o", tmp_path / "out", *FAST)
        assert time.perf_counter() - t0 < 5
        _assert_usage_error(r, fragment)
        assert not (tmp_path / "out" / "coords").exists()


# -- the typo reported with these cases ----------------------------------------------------
def test_shape_mismatches_are_spelled_right() -> None:
    import torch
    from torch import nn

    from wsi_pipeline.errors import CheckpointError
    from wsi_pipeline.model.weights import check_state_dict

    module = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    state = {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) for k, v in module.state_dict().items() if v.ndim == 2}
    state.update({k: v for k, v in module.state_dict().items() if v.ndim == 1})
    with pytest.raises(CheckpointError, match="2 shape mismatches") as e:
        check_state_dict(module, state, "w.safetensors", "tiny")
    assert "mismatchs" not in str(e.value)
