"""TilingConfig: defaults, YAML presets, merge precedence, validation, the mpp CSV."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from wsi_pipeline.config import SegmentationParams, TilingConfig, load_mpp_csv, mag_to_mpp
from wsi_pipeline.errors import ConfigError

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "tiling"


def test_defaults_and_frozen() -> None:
    c = TilingConfig()
    assert (c.target_mpp, c.patch_size, c.overlap, c.min_tissue, c.seg_level_mpp) == (0.5, 256, 0.0, 0.25, 8.0)
    assert c.threshold == "otsu" and c.target_magnification == 20.0
    assert c.segmentation == SegmentationParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.patch_size = 512  # type: ignore[misc]


def test_presets_load_with_the_advertised_geometry() -> None:
    p20 = TilingConfig.from_yaml(PRESETS / "20x_256.yaml")
    p40 = TilingConfig.from_yaml(PRESETS / "40x_512.yaml")
    assert (p20.target_mpp, p20.patch_size) == (0.5, 256)
    assert (p40.target_mpp, p40.patch_size) == (0.25, 512)
    # same physical field of view (128 µm) in both presets
    assert p20.target_mpp * p20.patch_size == p40.target_mpp * p40.patch_size == 128.0
    for preset in PRESETS.glob("*.yaml"):
        TilingConfig.from_yaml(preset)  # every shipped preset is valid


def test_yaml_keys_accept_dashes_and_mag_alias(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("mag: 40\npatch-size: 512\nmin_tissue: 0.5\nthreshold: 20\n")
    c = TilingConfig.from_yaml(f)
    assert c.target_mpp == 0.25 and c.patch_size == 512 and c.min_tissue == 0.5 and c.threshold == 20
    assert mag_to_mpp(20) == 0.5


def test_unknown_yaml_key_names_the_key(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("patch_size: 256\npatchsize: 512\n")
    with pytest.raises(ConfigError, match="'patchsize'"):
        TilingConfig.from_yaml(f)


@pytest.mark.parametrize(
    "text, match",
    [
        ("patch_size: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "mapping"),
        ("overlap: 1.0\n", "overlap"),
        ("min_tissue: 1.5\n", "min_tissue"),
        ("patch_size: 256.5\n", "patch_size"),
        ("target_mpp: -1\n", "target_mpp"),
        ("median_size: 4\n", "odd"),
        ("threshold: high\n", "threshold"),
        ("mag: 20\ntarget_mpp: 0.5\n", "either"),
        ("mag: 0\n", "magnification"),
    ],
)
def test_invalid_yaml_values_raise_config_error(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        TilingConfig.from_yaml(f)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        TilingConfig.from_yaml(tmp_path / "nope.yaml")


def test_merge_overrides_win_and_numbers_are_normalised(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("patch_size: 512\nmin_tissue: 0.5\nmin_tissue_area: 1000\n")
    base = TilingConfig.from_yaml(f)
    merged = base.merge({"min_tissue": 0.1})
    assert merged.patch_size == 512 and merged.min_tissue == 0.1
    # 1000 (int from YAML) and 1000.0 (float from a flag) are the same setting
    assert base.signature() == base.merge({"min_tissue_area": 1000.0}).signature()
    assert base.signature() != merged.signature()
    assert "backend" not in base.signature()  # reading library does not change the grid


def test_mpp_csv(tmp_path: Path) -> None:
    f = tmp_path / "mpp.csv"
    f.write_text("slide,mpp\nslide_a,0.25\nslide b.svs,0.5\n")
    assert load_mpp_csv(f) == {"slide_a": 0.25, "slide b.svs": 0.5}
    f.write_text("Slide , MPP\nx,0.3\n")  # header case and spaces do not matter
    assert load_mpp_csv(f) == {"x": 0.3}


@pytest.mark.parametrize(
    "text, match",
    [
        ("name,res\na,0.5\n", "columns"),
        ("slide,mpp\na,abc\n", "line 2: mpp 'abc' is not a number"),
        ("slide,mpp\na,-1\n", "a resolution in 0.001..1000 µm/px, got -1.0"),
        ("slide,mpp\na,1e-9\n", "a resolution in 0.001..1000 µm/px, got 1e-09"),
        ("slide,mpp\na,0.5\na,0.25\n", "twice"),
        ("slide,mpp\n,0.5\n", "empty slide"),
    ],
)
def test_bad_mpp_csv(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "mpp.csv"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_mpp_csv(f)
