"""``wsi-pipeline export --to clam|trident``: the exported files read right by the clients' own logic.

The clients are not imported: their documented read logic (``../shared/reference/real-models.md``,
"Client semantics of the coords / features files") is written out below as plain code.

* CLAM (``Whole_Slide_Bag_FP``): ``coords`` + attrs ``patch_level``, ``patch_size``, then
  ``openslide.OpenSlide(path).read_region(coord, patch_level, (patch_size, patch_size))``;
  MIL training loads ``pt_files/<id>.pt``, or ``h5_files/<id>.h5`` (``features``, ``coords``).
* TRIDENT: ``patch_size`` at the target magnification; the level-0 size is
  ``patch_size * level0_magnification // target_magnification`` and ``patch_size_level0``;
  it reads at the finest level whose downsample is at most the wanted one, ``round(ps0 / ds)``
  pixels, resized to ``patch_size``.

Three geometries: (a) a 40× SVS (0.25 µm/px, levels 1/4/16) tiled at 0.5 µm/px, 256 px: no
level at the target, so CLAM must read level 0 with 512 px; (b) a 20× slide (0.5 µm/px) at
0.5 µm/px; (c) ``--mag 10`` (1.0 µm/px, 128 px) on the 40× slide: level 1 sits at the target.
Every client region is compared with the level-0 rectangle our pipeline embedded, read with
our own reader and resized to our patch size.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image
from slide_factory import make_slide

from wsi_pipeline.cli import main
from wsi_pipeline.config import TilingConfig
from wsi_pipeline.embed.stage import EmbedConfig, embed_slides
from wsi_pipeline.export import export_outputs
from wsi_pipeline.export.clam import ClamGeometry, clam_geometry
from wsi_pipeline.export.trident import job_name, level0_magnification
from wsi_pipeline.slide import open_slide
from wsi_pipeline.store.coords import read_coords
from wsi_pipeline.store.features import get_store
from wsi_pipeline.tiling.stage import tile_slides

EMBED = EmbedConfig(model="convlm_test", workers=0, device="cpu")
#: Mean absolute difference (0..255) allowed between a client's patch and ours. Same pixels read
#: give 0; case (c) reads the JPEG-compressed level 1 where we resize level 0 (about 4.5); a
#: shift by an eighth of a patch gives more than 30 on this texture.
SAME_FOV = 8.0
#: A patch is compared when at least this much of it is tissue (glass looks alike everywhere).
MIN_TISSUE = 0.75
N_CHECKED = 6


@dataclass(frozen=True)
class Case:
    name: str
    slide: str  # key of the slides fixture
    target_mpp: float
    patch_size: int
    clam: tuple[int, int]  # expected CLAM (patch_level, patch_size)
    trident_job: str
    via_cli: bool = False


CASES = {
    "a": Case("a", "s40", 0.5, 256, (0, 512), "20x_256px_0px_overlap"),
    "b": Case("b", "s20", 0.5, 256, (0, 256), "20x_256px_0px_overlap"),
    "c": Case("c", "s40", 1.0, 128, (1, 128), "10x_128px_0px_overlap", via_cli=True),
}


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("export_slides")
    return {
        "s40": make_slide(d / "s40.svs", 4096, 3072, mpp=0.25, layout="svs", levels=(1, 4, 16), seed=5).path,
        "s20": make_slide(d / "s20.svs", 2048, 1536, mpp=0.5, layout="svs", levels=(1, 4), seed=6).path,
    }


@pytest.fixture(scope="module")
def outs(slides: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per case: tiled, embedded, exported to ``<out>/clam`` and ``<out>/trident``."""
    root = tmp_path_factory.mktemp("export_outs")
    done = {}
    for case in CASES.values():
        out = root / case.name
        if case.via_cli:  # --mag 10 through the CLI
            r = _run("tile", slides[case.slide], "-o", out, "--mag", "10", "--patch-size", case.patch_size, "-q")
            assert r.exit_code == 0, r.output
        else:
            (res,) = tile_slides([slides[case.slide]], out,
                                 TilingConfig(target_mpp=case.target_mpp, patch_size=case.patch_size))
            assert res.status == "ok" and res.n_patches, res
        summary = embed_slides(out, EMBED)
        assert summary.count("ok") == 1
        for to in ("clam", "trident"):
            s = export_outputs(out, to, out / to)
            assert s.count("ok") == 1 and s.model_id == summary.model_id
        done[case.name] = out
    return done


# ------------------------------------------------------------------------ client logic
def clam_patches(patches_h5: Path) -> tuple[np.ndarray, int, int]:
    """What CLAM's ``Whole_Slide_Bag_FP`` takes from a patches file."""
    with h5py.File(patches_h5, "r") as f:
        dset = f["coords"]
        return dset[:], int(dset.attrs["patch_level"]), int(dset.attrs["patch_size"])


def clam_read(slide_path: Path, coord: np.ndarray, patch_level: int, patch_size: int) -> Image.Image:
    """CLAM: ``wsi.read_region(coord, patch_level, (patch_size, patch_size)).convert('RGB')``."""
    wsi = openslide.OpenSlide(str(slide_path))
    try:
        return wsi.read_region(tuple(int(v) for v in coord), patch_level, (patch_size, patch_size)).convert("RGB")
    finally:
        wsi.close()


def trident_read(slide_path: Path, coord: np.ndarray, attrs: dict) -> tuple[Image.Image, int]:
    """TRIDENT: level-0 size from the magnifications, best level at or below the downsample, resize."""
    ps = int(attrs["patch_size"])
    ps0 = int(ps * float(attrs["level0_magnification"]) // float(attrs["target_magnification"]))
    downsample = float(attrs["level0_magnification"]) / float(attrs["target_magnification"])
    wsi = openslide.OpenSlide(str(slide_path))
    try:
        level = max((i for i, d in enumerate(wsi.level_downsamples) if d <= downsample + 0.1),
                    key=lambda i: wsi.level_downsamples[i])
        px = round(ps0 / wsi.level_downsamples[level])
        img = wsi.read_region(tuple(int(v) for v in coord), level, (px, px)).convert("RGB")
    finally:
        wsi.close()
    return img.resize((ps, ps), Image.Resampling.BOX), ps0


def ours(slide_path: Path, coord: np.ndarray, ps0: int, ps: int) -> np.ndarray:
    """Ground truth: the level-0 square our pipeline embedded, read by our reader, at our patch size."""
    with open_slide(str(slide_path)) as s:
        rgb = s.read_region((int(coord[0]), int(coord[1])), 0, (ps0, ps0))
    return _to(Image.fromarray(rgb), ps)


def _to(img: Image.Image, ps: int) -> np.ndarray:
    return np.asarray(img.resize((ps, ps), Image.Resampling.BOX) if img.size != (ps, ps) else img, dtype=np.float64)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def _tissue_rows(out: Path) -> np.ndarray:
    with h5py.File(out / "coords" / f"{_sid(out)}.h5", "r") as f:
        frac = f["tissue_fraction"][:]
    rows = np.flatnonzero(frac >= MIN_TISSUE)
    assert len(rows) >= 2, "the test slide should have solid tissue patches"
    return rows[np.linspace(0, len(rows) - 1, min(N_CHECKED, len(rows))).astype(int)]


def _sid(out: Path) -> str:
    (path,) = (out / "coords").glob("*.h5")
    return path.stem


# ------------------------------------------------------------------------------ CLAM
@pytest.mark.parametrize("name", list(CASES))
def test_clam_reads_exactly_our_patches(name: str, outs: dict[str, Path], slides: dict[str, Path]) -> None:
    case, out = CASES[name], outs[name]
    sid = _sid(out)
    our_coords, attrs = read_coords(out / "coords" / f"{sid}.h5")
    coords, level, size = clam_patches(out / "clam" / "patches" / f"{sid}.h5")
    assert (level, size) == case.clam
    np.testing.assert_array_equal(coords, our_coords)
    with openslide.OpenSlide(str(slides[case.slide])) as wsi:
        assert size * wsi.level_downsamples[level] == attrs["patch_size_level0"]  # the same level-0 square
    with h5py.File(out / "clam" / "patches" / f"{sid}.h5", "r") as f:
        a = dict(f["coords"].attrs)
    assert a["name"] == sid and a["target_patch_size"] == case.patch_size
    assert a["patch_size_level0"] == attrs["patch_size_level0"] and a["target_mpp"] == pytest.approx(case.target_mpp)
    assert a["source_coords"] == str((out / "coords" / f"{sid}.h5").resolve())
    assert list(a["level_dim"]) == list(a["downsampled_level_dim"]) and len(a["downsample"]) == 2
    for i in _tissue_rows(out):
        truth = ours(slides[case.slide], our_coords[i], attrs["patch_size_level0"], case.patch_size)
        client = _to(clam_read(slides[case.slide], coords[i], level, size), case.patch_size)
        assert _mad(client, truth) < SAME_FOV, (name, i)


def test_naive_clam_reading_of_our_coords_is_the_wrong_field_of_view(outs: dict[str, Path],
                                                                     slides: dict[str, Path]) -> None:
    """Why the export exists: CLAM's reader on our own coords file (case a) reads a quarter of the area."""
    out = outs["a"]
    coords, level, size = clam_patches(out / "coords" / f"{_sid(out)}.h5")
    _, attrs = read_coords(out / "coords" / f"{_sid(out)}.h5")
    assert (level, size) == (0, 256) and attrs["patch_size_level0"] == 512  # 128 µm instead of 256 µm
    for i in _tissue_rows(out):
        truth = ours(slides["s40"], coords[i], 512, 256)
        naive = _to(clam_read(slides["s40"], coords[i], level, size), 256)
        assert _mad(naive, truth) > 2 * SAME_FOV, i


@pytest.mark.parametrize("name", list(CASES))
def test_clam_features_are_ours_row_aligned(name: str, outs: dict[str, Path]) -> None:
    out = outs[name]
    sid = _sid(out)
    (model_id,) = [p.name for p in (out / "features").iterdir()]
    sf = get_store("h5").read(out / "features", model_id, sid)
    pt = torch.load(out / "clam" / "pt_files" / f"{sid}.pt", weights_only=True)
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32 and pt.shape == sf.features.shape
    with h5py.File(out / "clam" / "h5_files" / f"{sid}.h5", "r") as f:
        feats, coords = f["features"][:], f["coords"][:]
    patches, _, _ = clam_patches(out / "clam" / "patches" / f"{sid}.h5")
    assert feats.dtype == np.float32
    np.testing.assert_array_equal(pt.numpy(), sf.features)
    np.testing.assert_array_equal(feats, sf.features)
    np.testing.assert_array_equal(coords, sf.coords)
    np.testing.assert_array_equal(coords, patches)


# --------------------------------------------------------------------------- TRIDENT
@pytest.mark.parametrize("name", list(CASES))
def test_trident_reads_exactly_our_patches(name: str, outs: dict[str, Path], slides: dict[str, Path]) -> None:
    case, out = CASES[name], outs[name]
    sid = _sid(out)
    our_coords, ours_attrs = read_coords(out / "coords" / f"{sid}.h5")
    path = out / "trident" / case.trident_job / "patches" / f"{sid}_patches.h5"
    with h5py.File(path, "r") as f:
        coords, attrs = f["coords"][:], dict(f["coords"].attrs)
    np.testing.assert_array_equal(coords, our_coords)
    assert attrs["patch_size"] == case.patch_size and attrs["overlap"] == 0 and attrs["name"] == sid
    assert attrs["target_magnification"] == pytest.approx(10 / case.target_mpp)
    assert attrs["savetodir"] == str(path.parent.resolve())
    assert (attrs["level0_width"], attrs["level0_height"]) == (ours_attrs["level0_width"], ours_attrs["level0_height"])
    assert "patch_level" not in attrs  # no CLAM key that a reader could take in CLAM's meaning
    for i in _tissue_rows(out):
        img, ps0 = trident_read(slides[case.slide], coords[i], attrs)
        assert ps0 == attrs["patch_size_level0"] == ours_attrs["patch_size_level0"]
        truth = ours(slides[case.slide], our_coords[i], ps0, case.patch_size)
        assert _mad(_to(img, case.patch_size), truth) < SAME_FOV, (name, i)


@pytest.mark.parametrize("name", list(CASES))
def test_trident_features_are_ours(name: str, outs: dict[str, Path]) -> None:
    case, out = CASES[name], outs[name]
    sid = _sid(out)
    (model_id,) = [p.name for p in (out / "features").iterdir()]
    sf = get_store("h5").read(out / "features", model_id, sid)
    with h5py.File(out / "trident" / case.trident_job / f"features_{model_id}" / f"{sid}.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:], sf.features)
        np.testing.assert_array_equal(f["coords"][:], sf.coords)
        assert dict(f["features"].attrs)["encoder"] == model_id
        assert f["coords"].attrs["patch_size_level0"] == sf.coords_attrs["patch_size_level0"]


# ----------------------------------------------------------------- reruns and failures
def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rerun_overwrites_consistently(outs: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "out"
    shutil.copytree(outs["b"], src, ignore=shutil.ignore_patterns("clam", "trident"))
    first = export_outputs(src, "clam", tmp_path / "dest")
    before = _files(tmp_path / "dest")
    again = export_outputs(src, "clam", tmp_path / "dest")
    after = _files(tmp_path / "dest")
    assert first.count("ok") == again.count("ok") == 1
    assert before == after and not [p for p in after if p.endswith(".tmp")]  # the same bytes, no temporaries


@pytest.fixture
def two_slides(outs: dict[str, Path], tmp_path: Path) -> Path:
    """An output folder with slides s40 (case a) and s20 (case b) and one model's features."""
    out = tmp_path / "two"
    for name in ("a", "b"):
        shutil.copytree(outs[name], out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("clam", "trident"))
    return out


def test_unreadable_files_fail_one_line_others_export(two_slides: Path, tmp_path: Path) -> None:
    out = two_slides
    (model_id,) = [p.name for p in (out / "features").iterdir()]
    feats = out / "features" / model_id / "s20.h5"
    feats.write_bytes(feats.read_bytes()[:300])  # truncated
    r = _run("export", out, "--to", "clam", "-o", tmp_path / "dest")
    assert r.exit_code == 1, r.output
    assert (tmp_path / "dest" / "pt_files" / "s40.pt").is_file()
    assert not (tmp_path / "dest" / "patches" / "s20.h5").exists()
    assert "1 ok, 1 failed" in r.output
    errors = [line for line in r.output.splitlines() if "s20" in line and "ERROR" in line]
    assert len(errors) == 1 and "unreadable" in errors[0], r.output
    (out / "coords" / "s40.h5").write_bytes(b"not hdf5")
    r = _run("export", out, "--to", "trident", "-o", tmp_path / "dest2")
    assert r.exit_code == 1 and "0 ok, 2 failed" in r.output, r.output


def test_cli_usage_errors_and_patches_only(two_slides: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run("export", empty, "--to", "clam", "-o", tmp_path / "d")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "no coords files" in r.output, r.output
    r = _run("export", two_slides, "--to", "qupath", "-o", tmp_path / "d")
    assert r.exit_code == 2
    r = _run("export", two_slides, "--to", "clam", "-o", tmp_path / "d", "--model-id", "nope")
    assert r.exit_code == 2 and r.output.startswith("error: --model-id nope") and r.output.count("\n") == 1
    (model_id,) = [p.name for p in (two_slides / "features").iterdir()]
    shutil.copytree(two_slides / "features" / model_id, two_slides / "features" / "other_model")
    r = _run("export", two_slides, "--to", "clam", "-o", tmp_path / "d")
    assert r.exit_code == 2 and "--model-id" in r.output and r.output.count("\n") == 1, r.output
    r = _run("export", two_slides, "--to", "clam", "-o", tmp_path / "d", "--model-id", model_id, "-q")
    assert r.exit_code == 0 and "2 ok, 0 failed" in r.output, r.output
    shutil.rmtree(two_slides / "features")
    r = _run("export", two_slides, "--to", "trident", "-o", tmp_path / "p", "-q")
    assert r.exit_code == 0 and "patch coordinates only" in r.output, r.output
    written = sorted(os.path.relpath(p, tmp_path / "p") for p in (tmp_path / "p").rglob("*.h5"))
    assert written == ["20x_256px_0px_overlap/patches/s20_patches.h5", "20x_256px_0px_overlap/patches/s40_patches.h5"]


# ------------------------------------------------------------------ geometry edge cases
def _attrs(**kw: object) -> dict:
    base = dict(patch_size_level0=512, patch_level=1, downsample=[4.0, 4.0], level_dim=[1024, 768],
                level0_width=4096, level0_height=3072)
    return {**base, **kw}


def test_clam_geometry_keeps_an_exact_level_and_falls_back_to_level_0() -> None:
    grid = np.array([[0, 0], [512, 1024]])
    assert clam_geometry(grid, _attrs()) == ClamGeometry(1, 128, (4.0, 4.0), (1024, 768))
    # a level whose downsample is not a whole divisor (odd level-0 size), or coords off its pixels
    odd = _attrs(downsample=[4.0029, 4.0013], level_dim=[1023, 767], level0_width=4095, level0_height=3069)
    assert clam_geometry(grid, odd) == ClamGeometry(0, 512, (1.0, 1.0), (4095, 3069))
    assert clam_geometry(np.array([[2, 0]]), _attrs()).patch_level == 0
    assert clam_geometry(grid, _attrs(patch_size_level0=510)).patch_level == 0  # 127.5 px at level 1


def test_trident_level0_magnification_gives_our_level0_size() -> None:
    # 0.2527 µm/px at 0.5 µm/px: our 256 px patch is round(506.5) = 507 level-0 px, 10 / mpp = 39.57x
    for ps, ps0, target in [(256, 507, 20.0), (256, 512, 20.0), (224, 443, 20.0), (128, 512, 10.0), (256, 253, 10 / 0.3)]:
        mag = level0_magnification(ps, ps0, target)
        assert math.floor(ps * mag / target) == ps0 and abs(ps * mag / target - ps0) < 1e-9
    # TRIDENT writes `ps * m // t` (float floor division, which can fall one below floor(ps*m/t)):
    # both give our size, over many sizes at non-dyadic targets (0.3 and 0.7 µm/px)
    for target in (10 / 0.3, 10 / 0.7, 20.0):
        for ps in (224, 256, 448):
            for ps0 in range(ps // 2, 3 * ps):
                mag = level0_magnification(ps, ps0, target)
                assert int(ps * mag // target) == ps0 == math.floor(ps * mag / target), (target, ps, ps0)
    assert job_name({"target_magnification": 20.0, "patch_size": 256, "overlap": 0}) == "20x_256px_0px_overlap"
    assert job_name({"target_magnification": 10 / 0.3, "patch_size": 224, "overlap": 32}) == "33.3333x_224px_32px_overlap"
