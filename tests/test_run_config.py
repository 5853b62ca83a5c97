"""``--help`` grouped by stage, and run configs: ``--config run.yaml`` (flags > file > defaults),
the effective config written to ``OUT/run_config.yaml`` and replayed from it, shipped names."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner, Result
from slide_factory import make_slide

from wsi_pipeline.cli import main
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.resources import resolve, shipped_dir, shipped_names
from wsi_pipeline.store.coords import read_coords

FAST = ["--model", "convlm_test", "--workers", "0", "--patch-size", "64", "--target-mpp", "1.0"]


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _one_error_line(r: Result) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.exit_code, r.output)
    return lines[0]


def _help_sections(text: str) -> dict[str, list[str]]:
    """``{section title: [long flag of each option, in order]}`` of a ``--help`` page."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if re.fullmatch(r"\S.*:", line):
            current = sections.setdefault(line[:-1], [])
        elif current is not None and re.match(r"  -", line):
            flags = re.findall(r"(--?[a-z][a-z0-9-]*)", line.split("  ")[1])
            current.append([f for f in flags if f.startswith("--")][0])
    return sections


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run_config") / "s1.svs"
    make_slide(path, 1536, 1024, mpp=0.5, seed=7)
    return path


# -- grouped help -------------------------------------------------------------------------
def test_classify_help_lists_every_option_once_under_its_stage() -> None:
    r = _run("classify", "--help")
    assert r.exit_code == 0
    sections = _help_sections(r.stdout)
    assert list(sections) == ["Input and output", "Tiling", "Embedding", "Runtime", "Classification",
                              "Verbosity and help"]
    assert sections["Input and output"] == ["--out", "--list", "--recursive", "--config", "--no-visuals"]
    assert sections["Tiling"] == ["--backend", "--target-mpp", "--mag", "--patch-size", "--overlap", "--min-tissue",
                                  "--seg-level-mpp", "--threshold", "--min-tissue-area", "--min-hole-area",
                                  "--mpp-csv", "--default-mpp", "--max-upsample", "--slide-params"]
    assert sections["Embedding"] == ["--model", "--weights", "--random-init", "--adapter", "--batch-size",
                                     "--workers", "--device", "--precision", "--keep-rate", "--refine-layers", "--context", "--store",
                                     "--slides", "--region-size"]
    assert sections["Runtime"] == ["--executor", "--ray-address", "--gpus-per-worker", "--shard", "--lock-timeout"]
    assert sections["Classification"] == ["--prompts", "--top-k", "--labels", "--prompt-sets", "--seed"]
    assert sections["Verbosity and help"] == ["--verbose", "--quiet", "--help"]
    flags = [f for fs in sections.values() for f in fs]
    n_options = sum(1 for p in main.commands["classify"].params if p.param_type_name == "option") + 1  # + --help
    assert len(flags) == len(set(flags)) == n_options


def test_tile_and_embed_help_have_only_their_stages() -> None:
    tile = _help_sections(_run("tile", "--help").stdout)
    assert list(tile) == ["Input and output", "Tiling", "Runtime", "Verbosity and help"]
    assert "--overwrite" in tile["Input and output"] and "--config" in tile["Input and output"]
    embed = _help_sections(_run("embed", "--help").stdout)
    assert list(embed) == ["Input and output", "Embedding", "Runtime", "Verbosity and help"]


def test_train_help_is_grouped_and_lists_every_option_once() -> None:
    sections = _help_sections(_run("train", "--help").stdout)
    assert list(sections) == ["Data and output", "Model", "Optimisation", "Runtime", "Verbosity and help"]
    assert sections["Model"][:3] == ["--model", "--weights", "--adapter-only"]
    assert "--lr-head" in sections["Optimisation"] and "--color-jitter" in sections["Data and output"]
    flags = [f for fs in sections.values() for f in fs]
    n_options = sum(1 for p in main.commands["train"].params if p.param_type_name == "option") + 1  # + --help
    assert len(flags) == len(set(flags)) == n_options


# -- round trip ---------------------------------------------------------------------------
def test_written_config_replays_the_run_exactly(slide: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    r = _run("classify", str(slide), "-o", str(a), *FAST, "--min-tissue", "0.3", "--prompts", "demo",
             "--top-k", "5", "--no-visuals", "-q")
    assert r.exit_code == 0, r.output
    written = yaml.safe_load((a / "run_config.yaml").read_text())
    assert written["inputs"] == [str(slide)] and written["out"] == "."
    assert (written["patch_size"], written["target_mpp"], written["min_tissue"]) == (64, 1.0, 0.3)
    assert (written["model"], written["workers"], written["prompts"], written["top_k"]) == ("convlm_test", 0, "demo", 5)
    assert written["no_visuals"] is True and written["median_size"] == 7  # a tiling setting without a flag
    assert not {"config", "overwrite", "verbose", "quiet", "shard"} & set(written)

    r = _run("classify", "--config", str(a / "run_config.yaml"), "-o", str(b), "-q")  # the file alone, elsewhere
    assert r.exit_code == 0, r.output
    assert (b / "run_config.yaml").read_bytes() == (a / "run_config.yaml").read_bytes()
    assert (b / "predictions" / "demo.csv").read_bytes() == (a / "predictions" / "demo.csv").read_bytes()
    ca, attrs_a = read_coords(a / "coords" / "s1.h5")
    cb, attrs_b = read_coords(b / "coords" / "s1.h5")
    assert np.array_equal(ca, cb) and attrs_a == attrs_b
    (fa,), (fb,) = (sorted((d / "features").rglob("*.h5")) for d in (a, b))
    with h5py.File(fa) as x, h5py.File(fb) as y:
        assert np.array_equal(x["features"][()], y["features"][()])

    before = (a / "run_config.yaml").read_bytes()
    r = _run("classify", "--config", str(a / "run_config.yaml"), "-q")  # out: . is the file's folder
    assert r.exit_code == 0, r.output
    assert (a / "run_config.yaml").read_bytes() == before


def test_embed_keeps_what_tile_wrote_and_its_out_comes_from_the_file(slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert _run("tile", str(slide), "-o", str(out), "--patch-size", "64", "--target-mpp", "1.0", "-q").exit_code == 0
    r = _run("embed", "--config", str(out / "run_config.yaml"), "--model", "convlm_test", "--workers", "0", "-q")
    assert r.exit_code == 0, r.output
    written = yaml.safe_load((out / "run_config.yaml").read_text())
    assert written["patch_size"] == 64 and written["inputs"] == [str(slide)]  # from tile
    assert written["model"] == "convlm_test" and written["executor"] == "local"  # from embed
    assert "top_k" not in written  # classify never ran here


# -- precedence ---------------------------------------------------------------------------
def test_flag_wins_over_file_and_file_over_default(slide: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("patch-size: 128\nmin_tissue: 0.5\nmedian_size: 5\ntop_k: 5\nmodel: convlm_test\n")
    r = _run("tile", str(slide), "-o", str(tmp_path / "o"), "--config", str(cfg), "--patch-size", "96", "-q")
    assert r.exit_code == 0, r.output  # top_k and model belong to other verbs: accepted, unused by tile
    _, attrs = read_coords(tmp_path / "o" / "coords" / "s1.h5")
    assert attrs["patch_size"] == 96  # flag
    assert attrs["min_tissue"] == 0.5  # file
    assert attrs["target_mpp"] == 0.5 and attrs["overlap"] == 0.0  # defaults
    written = yaml.safe_load((tmp_path / "o" / "run_config.yaml").read_text())
    assert (written["patch_size"], written["min_tissue"], written["median_size"]) == (96, 0.5, 5)


@pytest.mark.parametrize("text, flags, mpp", [
    ("mag: 40\n", ["--target-mpp", "1.0"], 1.0),  # a flag beats the file's alias
    ("target_mpp: 1.0\n", ["--mag", "40"], 0.25),  # and the flag alias beats the file's value
    ("mag: 40\n", [], 0.25),  # the file's alias beats the default
])
def test_mag_and_target_mpp_follow_the_same_precedence(slide: Path, tmp_path: Path, text: str, flags: list[str],
                                                       mpp: float) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    r = _run("tile", str(slide), "-o", str(tmp_path / "o"), "--config", str(cfg), *flags, "-q")
    assert r.exit_code == 0, r.output
    assert read_coords(tmp_path / "o" / "coords" / "s1.h5")[1]["target_mpp"] == mpp


# -- refused files ------------------------------------------------------------------------
@pytest.mark.parametrize("text, match", [
    ("patch_size: 256\nmin_tisue: 0.5\n", "unknown option 'min_tisue'; did you mean 'min_tissue'?"),
    ("frobnicate: 1\n", "unknown option 'frobnicate'"),
    ("min_tissue: 0.5\nmin-tissue: 0.4\n", "option 'min_tissue' is given twice"),
    ("batch_size: 0\n", "batch_size: 0 is not in the range x>=1"),
    ("precision: fp64\n", "precision: 'fp64' is not one of"),
    ("median_size: 4\n", "median_size must be odd"),
    ("- 1\n", "must be a mapping"),
])
def test_bad_config_is_one_line_naming_the_file(slide: Path, tmp_path: Path, text: str, match: str) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    r = _run("classify", str(slide), "-o", str(tmp_path / "o"), "--prompts", "demo", "--config", str(cfg))
    line = _one_error_line(r)
    assert match in line and str(cfg) in line, line
    assert not (tmp_path / "o").exists()


# -- shipped names ------------------------------------------------------------------------
def test_shipped_names_resolve_and_paths_still_work(slide: Path, tmp_path: Path) -> None:
    assert {"20x_256", "40x_512", "biopsy_20x_256"} <= set(shipped_names("tiling"))
    assert {"demo", "demo_train", "nsclc"} <= set(shipped_names("prompts"))
    assert shipped_names("models") == ["convlm_demo"]
    assert resolve("prompts", "demo", "--prompts") == shipped_dir("prompts") / "demo.yaml"
    assert resolve("prompts", "demo.yaml", "--prompts") == shipped_dir("prompts") / "demo.yaml"
    own = tmp_path / "demo"  # a file of that name wins over the shipped one
    own.write_text("x")
    assert resolve("prompts", str(own), "--prompts") == own
    with pytest.raises(ConfigError, match=r"^--prompts 'nsclc2' is neither a file nor a shipped name \(shipped: brca"):
        resolve("prompts", "nsclc2", "--prompts")
    r = _run("tile", str(slide), "-o", str(tmp_path / "o"), "--config", "40x_512", "-q")
    assert r.exit_code == 0, r.output
    assert read_coords(tmp_path / "o" / "coords" / "s1.h5")[1]["patch_size"] == 512
    line = _one_error_line(_run("tile", str(slide), "-o", str(tmp_path / "p"), "--config", "40x"))
    assert "'40x'" in line and "20x_256, 40x_512, biopsy_20x_256" in line
    line = _one_error_line(_run("classify", str(slide), "-o", str(tmp_path / "p"), "--prompts", "nsclc2"))
    assert "--prompts 'nsclc2'" in line and "demo_train" in line
