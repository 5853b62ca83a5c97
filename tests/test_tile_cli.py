"""The ``wsi-pipeline`` CLI: inputs (folder, file, @list, --list), options and presets,
exit codes, ``info``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from slide_factory import FixtureSlide

from wsi_pipeline.cli import main
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.inputs import collect_inputs
from wsi_pipeline.store.coords import read_coords
from wsi_pipeline.store.status import read_status

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "tiling"


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture()
def slide_dir(tiff_slide: FixtureSlide, tmp_path: Path) -> Path:
    d = tmp_path / "slides"
    (d / "sub").mkdir(parents=True)
    shutil.copyfile(tiff_slide.path, d / "a.tif")
    shutil.copyfile(tiff_slide.path, d / "sub" / "b.tif")
    (d / "notes.txt").write_text("not a slide, ignored in folder scans")
    (d / ".hidden.tif").write_bytes(b"")
    return d


def test_folder_input_is_non_recursive_unless_asked(slide_dir: Path, tmp_path: Path) -> None:
    r = _run("tile", str(slide_dir), "-o", str(tmp_path / "o1"))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "o1" / "coords").iterdir()) == ["a.h5"]
    assert "tile: 1 ok, 0 skipped, 0 failed" in r.stdout
    r = _run("tile", str(slide_dir), "--recursive", "-o", str(tmp_path / "o2"))
    assert r.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "o2" / "coords").iterdir()) == ["a.h5", "b.h5"]


def test_list_files_with_at_sign_and_option(slide_dir: Path, tmp_path: Path) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text(f"# my slides\n{slide_dir / 'a.tif'}\n\nslides/sub/b.tif\n")  # relative to the list
    r = _run("tile", f"@{lst}", "-o", str(tmp_path / "o1"))
    assert r.exit_code == 0, r.output
    assert {row["slide_id"] for row in read_status(tmp_path / "o1")} == {"a", "b"}
    r = _run("tile", "--list", str(lst), "-o", str(tmp_path / "o2"))
    assert r.exit_code == 0
    assert len(list((tmp_path / "o2" / "coords").iterdir())) == 2
    assert collect_inputs([str(slide_dir / "a.tif")]) == [slide_dir / "a.tif"]
    with pytest.raises(ConfigError, match="does not exist"):
        collect_inputs([str(tmp_path / "nope.svs")])


def test_usage_errors_exit_2_with_one_line(slide_dir: Path, tmp_path: Path) -> None:
    a = str(slide_dir / "a.tif")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("slide,mpp\nn\xe9e.svs,0.5\n".encode("latin-1"))
    cases = [
        (["tile", a, "-o", str(tmp_path / "o"), "--mpp-csv", str(latin1)], "mpp CSV"),
        (["tile", a, "-o", str(tmp_path / "o"), "--config", str(latin1)], "config"),
        (["tile", f"@{latin1}", "-o", str(tmp_path / "o")], "slide list"),
        (["tile", a, "-o", str(tmp_path / "o"), "--mag", "20", "--target-mpp", "0.5"], "either"),
        (["tile", a, "-o", str(tmp_path / "o"), "--overlap", "1.5"], "overlap"),
        (["tile", a, "-o", str(tmp_path / "o"), "--threshold", "bright"], "threshold"),
        (["tile", a, "-o", str(tmp_path / "o"), "--backend", "bioformats"], "unknown backend 'bioformats'"),
        (["tile", a, "-o", str(tmp_path / "o"), "--mpp-csv", str(tmp_path / "none.csv")], "cannot read mpp CSV"),
        (["tile", str(tmp_path / "missing.svs"), "-o", str(tmp_path / "o")], "does not exist"),
        (["tile", str(tmp_path), "-o", str(tmp_path / "o")], "no slide files"),
        (["tile", "-o", str(tmp_path / "o")], "no input slides"),
    ]
    for args, match in cases:
        r = _run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert match in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.output
        if "latin1" in " ".join(args):
            assert f"{latin1} is not UTF-8 text (line 2)" in r.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_key_in_config_names_it(slide_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("patch_size: 256\nmin_tisue: 0.5\n")
    r = _run("tile", str(slide_dir / "a.tif"), "-o", str(tmp_path / "o"), "--config", str(cfg))
    assert r.exit_code == 2 and "'min_tisue'" in r.stderr


def test_mag_is_an_alias_of_target_mpp(slide_dir: Path, tmp_path: Path) -> None:
    a = str(slide_dir / "a.tif")
    assert _run("tile", a, "-o", str(tmp_path / "m"), "--mag", "10", "--quiet").exit_code == 0
    assert _run("tile", a, "-o", str(tmp_path / "t"), "--target-mpp", "1.0", "--quiet").exit_code == 0
    cm, am = read_coords(tmp_path / "m" / "coords" / "a.h5")
    ct, at = read_coords(tmp_path / "t" / "coords" / "a.h5")
    assert am["target_mpp"] == at["target_mpp"] == 1.0 and am["target_magnification"] == 10.0
    assert am["patch_size_level0"] == 512 and (cm == ct).all()


def test_preset_with_flags_winning(slide_dir: Path, tmp_path: Path) -> None:
    a = str(slide_dir / "a.tif")
    r = _run("tile", a, "-o", str(tmp_path / "o"), "--config", str(PRESETS / "40x_512.yaml"),
             "--patch-size", "128", "--min-tissue", "0.5")
    assert r.exit_code == 0, r.output
    _, attrs = read_coords(tmp_path / "o" / "coords" / "a.h5")
    assert attrs["target_mpp"] == 0.25  # from the preset
    assert attrs["patch_size"] == 128 and attrs["min_tissue"] == 0.5  # flags win
    assert attrs["patch_size_level0"] == 64  # 128 px at 0.25 µm/px on a 0.5 µm/px slide
    # a flag left at its default does not override the preset
    r = _run("tile", a, "-o", str(tmp_path / "p"), "--config", str(PRESETS / "40x_512.yaml"))
    _, attrs = read_coords(tmp_path / "p" / "coords" / "a.h5")
    assert attrs["patch_size"] == 512 and attrs["target_mpp"] == 0.25


def test_rerun_skips_and_overwrite_redoes(slide_dir: Path, tmp_path: Path) -> None:
    a, o = str(slide_dir / "a.tif"), str(tmp_path / "o")
    assert _run("tile", a, "-o", o).exit_code == 0
    r = _run("tile", a, "-o", o)
    assert r.exit_code == 0 and "0 ok, 1 skipped, 0 failed" in r.stdout
    r = _run("tile", a, "-o", o, "--overwrite")
    assert r.exit_code == 0 and "1 ok, 0 skipped" in r.stdout
    assert [row["status"] for row in read_status(o)] == ["ok", "skipped", "ok"]


def test_quiet_has_no_progress_bar_and_default_has_one(slide_dir: Path, tmp_path: Path) -> None:
    a = str(slide_dir / "a.tif")
    loud = _run("tile", a, "-o", str(tmp_path / "l"))
    assert "slide/s" in loud.stderr  # tqdm's rate unit
    quiet = _run("--quiet", "tile", a, "-o", str(tmp_path / "q"))
    assert quiet.exit_code == 0 and "slide/s" not in quiet.stderr and "INFO" not in quiet.stderr


def test_info_prints_normalised_metadata(svs_slide: FixtureSlide, tmp_path: Path) -> None:
    r = _run("info", str(svs_slide.path), "--json")
    assert r.exit_code == 0, r.output
    meta = json.loads(r.stdout)
    assert meta["level_dimensions"][0] == list(svs_slide.size)
    assert meta["mpp_x"] == pytest.approx(0.25) and meta["level_mpp"][1] == pytest.approx(1.0)
    assert len(meta["level_downsamples"]) == 4 and meta["backend"] in ("openslide", "tiffslide")
    table = _run("info", str(svs_slide.path), "--backend", "tiffslide")
    assert table.exit_code == 0
    assert "mpp_source" in table.stdout and "tiffslide" in table.stdout and "8192" in table.stdout
    bad = tmp_path / "x.svs"
    bad.write_text("text")
    r = _run("info", str(bad))
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "not a readable slide" in r.stderr


def test_version_and_help() -> None:
    assert _run("--version").exit_code == 0
    r = _run("tile", "--help")
    assert "--target-mpp" in r.stdout and "--min-hole-area" in r.stdout and "--mpp-csv" in r.stdout


@pytest.mark.parametrize("args, match", [
    (["embed"], "error: Missing argument 'OUT'"),
    (["tile", "x.svs"], "error: Missing option '-o' / '--out'"),
    (["embed", ".", "--precision", "fp64"], "error: Invalid value for '--precision': 'fp64' is not one of"),
    (["tile", "x.svs", "-o", "o", "--patch-size", "big"], "error: Invalid value for '--patch-size': 'big'"),
    (["tile", "x.svs", "-o", "o", "--frobnicate"], "error: No such option '--frobnicate'"),
    (["tiles"], "error: No such command 'tiles'"),
])
def test_click_usage_errors_are_one_line_exit_2(args: list[str], match: str) -> None:
    r = _run(*args)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(match), r.stderr


def test_ctrl_c_exits_130_with_one_line(slide_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wsi_pipeline.tiling.stage

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(wsi_pipeline.tiling.stage, "tile_slides", interrupted)
    r = _run("tile", str(slide_dir / "a.tif"), "-o", str(tmp_path / "o"))
    assert r.exit_code == 130 and r.stderr.strip().splitlines() == ["error: interrupted"], r.output


def test_sigint_to_a_running_cli_exits_130_with_one_line(slide_dir: Path, tmp_path: Path) -> None:
    """A real Ctrl-C (SIGINT) while a slide is being tiled, in a separate process."""
    import signal
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "import wsi_pipeline.tiling.stage as stage\n"
        "def slow(*args, **kwargs):\n"
        "    print('working', flush=True)\n"
        "    time.sleep(60)\n"
        "stage.tile_slides = slow\n"
        "from wsi_pipeline.cli import main\n"
        "main(sys.argv[1:], prog_name='wsi-pipeline')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, "tile", str(slide_dir / "a.tif"), "-o", str(tmp_path / "o")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "working\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip().splitlines() == ["error: interrupted"], err
