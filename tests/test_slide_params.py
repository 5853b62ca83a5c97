"""``--slide-params``: per-slide segmentation settings from a CSV (CLAM's process list, done safely)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from slide_factory import FixtureSlide, make_slide

from wsi_pipeline.cli import main
from wsi_pipeline.config import TilingConfig, load_slide_params
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.store.coords import read_coords
from wsi_pipeline.tiling import tile_slides


def _csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.csv"
    p.write_text(text)
    return p


def test_loader_types_blank_cells_and_header_spelling(tmp_path: Path) -> None:
    p = _csv(tmp_path, "Slide,Min-Tissue,threshold,median_size\na,0.9,20,\nb.svs,,otsu,9\n")
    assert load_slide_params(p, TilingConfig()) == {
        "a": {"min_tissue": 0.9, "threshold": "20"},
        "b.svs": {"threshold": "otsu", "median_size": 9},
    }


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("slide,patch_size\na,512\n", "unknown columns 'patch_size' (allowed besides slide: min_tissue, "),
        ("slide,min_tisue\na,0.5\n", "unknown columns 'min_tisue'"),
        ("slide,min_tissue\na,lots\n", "line 2: min_tissue 'lots' is not a number"),
        ("slide,median_size\na,2.5\n", "line 2: median_size '2.5' is not an integer"),
        ("slide,min_tissue\na,0,5\n", "line 2: 3 cells, but the header has 2"),
        ("slide,min_tissue\na,0.5\nb,1.5\n", "line 3: min_tissue must be a fraction in [0, 1], got 1.5"),
        ("slide,median_size\na,4\n", "line 2: median_size must be odd, got 4"),
        ("slide,threshold\na,bright\n", "line 2: threshold must be 'otsu' or an integer 0..255"),
        ("slide,min_tissue\na,0.5\na,0.6\n", "line 3: slide 'a' is listed twice"),
        ("slide,min_tissue\n,0.5\n", "line 2: empty slide name"),
    ],
)
def test_loader_errors_name_the_line(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_slide_params(_csv(tmp_path, text), TilingConfig())
    assert fragment in str(e.value) and "params.csv" in str(e.value)


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory) -> list[FixtureSlide]:
    d = tmp_path_factory.mktemp("params")
    return [make_slide(d / "a.svs", 3000, 2200, mpp=0.5, seed=11),
            make_slide(d / "b.tif", 2400, 2000, mpp=0.5, layout="generic", seed=12)]


def test_per_slide_settings_apply_to_their_slide_only_and_drive_resume(two_slides: list[FixtureSlide],
                                                                        tmp_path: Path) -> None:
    slides = [fs.path for fs in two_slides]
    a, b = (p.stem for p in slides)
    plain = tile_slides(slides, tmp_path / "plain", TilingConfig())
    assert [r.status for r in plain] == ["ok", "ok"]
    params = _csv(tmp_path, f"slide,min_tissue,threshold\n{slides[0].name},0.9,20\nnot_in_batch,0.5,\n")
    cfg = TilingConfig(slide_params=str(params))
    tuned = tile_slides(slides, tmp_path / "tuned", cfg)
    assert [r.status for r in tuned] == ["ok", "ok"]

    ca, attrs_a = read_coords(tmp_path / "tuned" / "coords" / f"{a}.h5")
    pa, plain_a = read_coords(tmp_path / "plain" / "coords" / f"{a}.h5")
    assert attrs_a["min_tissue"] == 0.9 and attrs_a["seg_threshold"] == 20
    assert json.loads(attrs_a["tiling_config"])["threshold"] == 20
    assert 0 < len(ca) < len(pa)
    with h5py.File(tmp_path / "tuned" / "coords" / f"{a}.h5") as f:
        assert (f["tissue_fraction"][:] >= 0.9 - 1e-6).all()
    # the other slide is exactly what the run's own settings give
    cb, attrs_b = read_coords(tmp_path / "tuned" / "coords" / f"{b}.h5")
    pb, plain_b = read_coords(tmp_path / "plain" / "coords" / f"{b}.h5")
    np.testing.assert_array_equal(cb, pb)
    assert attrs_b["tiling_config"] == plain_b["tiling_config"]

    # resume: same params → both skipped; without them → only the tuned slide is redone
    assert [r.status for r in tile_slides(slides, tmp_path / "tuned", cfg)] == ["skipped", "skipped"]
    again = tile_slides(slides, tmp_path / "tuned", TilingConfig())
    assert [r.status for r in again] == ["ok", "skipped"]
    np.testing.assert_array_equal(read_coords(tmp_path / "tuned" / "coords" / f"{a}.h5")[0], pa)


def test_cli_takes_slide_params_and_refuses_bad_ones(svs_slide: FixtureSlide, tmp_path: Path) -> None:
    good = _csv(tmp_path, f"slide,min_tissue\n{svs_slide.path.stem},0.75\n")
    r = CliRunner().invoke(main, ["tile", str(svs_slide.path), "-o", str(tmp_path / "o"), "--slide-params", str(good),
                                  "-q"])
    assert r.exit_code == 0, r.output
    assert read_coords(tmp_path / "o" / "coords" / f"{svs_slide.path.stem}.h5")[1]["min_tissue"] == 0.75
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,patch_size\nx,512\n")
    r = CliRunner().invoke(main, ["tile", str(svs_slide.path), "-o", str(tmp_path / "o2"), "--slide-params", str(bad)])
    assert r.exit_code == 2 and "unknown columns 'patch_size'" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "o2").exists()
