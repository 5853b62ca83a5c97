"""DICOM WSI: a folder of ``.dcm`` files of one series is one slide (issue 12 item 6).

The DICOM files are written by an independent converter, wsidicomizer (dev extra; it needs
the Debian package ``libturbojpeg0``), from a generated Aperio SVS. Its JPEG tiles are
copied into the DICOM instances without re-encoding, so the DICOM slide must give exactly
the SVS's pixels (measured: max difference 0 at levels 0 and 1).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from slide_factory import FixtureSlide, make_slide

from wsi_pipeline.cli import main
from wsi_pipeline.errors import SlideOpenError
from wsi_pipeline.inputs import collect_inputs
from wsi_pipeline.slide import open_slide
from wsi_pipeline.store.coords import read_coords
from wsi_pipeline.store.status import latest_status

pytest.importorskip("wsidicomizer", reason="wsidicomizer (dev extra) converts the test SVS to DICOM")
if not (ctypes.util.find_library("turbojpeg") or os.environ.get("TURBOJPEG")):
    pytest.skip("libturbojpeg0 (Debian) not installed: wsidicomizer cannot run", allow_module_level=True)

#: A TCGA-like slide folder name: dots must survive as part of the slide id.
DICOM_ID = "TCGA-AA-0001-01Z-00-DX1.5A2B"
TILE = ["--patch-size", "32", "--target-mpp", "1.0", "--min-tissue-area", "2000", "-q"]


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _dicomize(src: Path, folder: Path) -> list[Path]:
    from wsidicomizer import WsiDicomizer

    folder.mkdir(parents=True, exist_ok=True)
    return [Path(p) for p in WsiDicomizer.convert(src, folder, workers=1)]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> FixtureSlide:
    return make_slide(tmp_path_factory.mktemp("svs") / "source.svs", 2048, 1536, mpp=0.25, levels=(1, 4), seed=41)


@pytest.fixture(scope="module")
def dicom(source: FixtureSlide, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``slides/<DICOM_ID>/``: level 0, level 1 and a thumbnail instance of one series."""
    folder = tmp_path_factory.mktemp("slides") / DICOM_ID
    files = _dicomize(source.path, folder)
    assert len(files) == 3 and all(f.parent == folder for f in files)
    return folder


def _series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_dicom_folder_is_one_slide_with_the_svs_pixels(dicom: Path, source: FixtureSlide) -> None:
    uid = _series_uid(next(dicom.glob("*.dcm")))
    with open_slide(dicom) as d, open_slide(source.path, "openslide") as s:
        assert d.backend == "openslide" and d.info.vendor == "dicom" and d.info.path == str(dicom)
        assert d.info.level_dimensions == s.info.level_dimensions == ((2048, 1536), (512, 384))
        assert (d.info.mpp_x, d.info.mpp_y, d.info.mpp_source) == (0.25, 0.25, "openslide.mpp-x")  # pixel spacing
        assert d.info.identifiers["dicom.SeriesInstanceUID"] == uid
        assert "dicom.ContainerIdentifier" in d.info.identifiers
        for level, size in ((0, (2048, 1536)), (1, (512, 384))):
            np.testing.assert_array_equal(d.read_region((0, 0), level, size), s.read_region((0, 0), level, size))


def test_one_dcm_file_opens_its_series(dicom: Path) -> None:
    with open_slide(dicom) as whole:
        for f in sorted(dicom.glob("*.dcm")):  # the thumbnail instance included
            with open_slide(f) as one:
                assert one.info.level_dimensions == whole.info.level_dimensions
                assert one.info.identifiers == whole.info.identifiers


def test_tile_finds_the_folder_in_slides_and_matches_the_svs(dicom: Path, source: FixtureSlide,
                                                             tmp_path: Path) -> None:
    slides = dicom.parent
    shutil.copyfile(source.path, slides / "source.svs")
    try:
        r = _run("tile", str(slides), "-o", str(tmp_path / "out"), *TILE)
    finally:
        (slides / "source.svs").unlink()
    assert r.exit_code == 0, r.output
    status = latest_status(tmp_path / "out", "tile")
    assert set(status) == {DICOM_ID, "source"} and {row["status"] for row in status.values()} == {"ok"}
    coords, attrs = read_coords(tmp_path / "out" / "coords" / f"{DICOM_ID}.h5")
    coords_svs, attrs_svs = read_coords(tmp_path / "out" / "coords" / "source.h5")
    assert len(coords) > 10
    np.testing.assert_array_equal(coords, coords_svs)  # same tissue, same grid
    assert attrs["slide_path"] == str(dicom) and attrs["backend"] == "openslide"
    assert attrs_svs["backend"] == "tiffslide"
    assert (attrs["mpp_level0"], attrs["mpp_source"]) == (0.25, "openslide.mpp-x")
    ids = json.loads(attrs["slide_identifiers"])
    assert ids["dicom.SeriesInstanceUID"] == _series_uid(next(dicom.glob("*.dcm")))
    assert json.loads(attrs_svs["slide_identifiers"]) == {}
    ps = int(attrs["patch_size_level0"])
    with open_slide(dicom) as d, open_slide(source.path) as s:
        for x, y in coords[:: max(1, len(coords) // 12)]:
            np.testing.assert_array_equal(d.read_region((int(x), int(y)), 0, (ps, ps)),
                                          s.read_region((int(x), int(y)), 0, (ps, ps)))


def test_recursive_search_counts_the_folder_once_and_never_its_files(dicom: Path, source: FixtureSlide,
                                                                     tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(dicom, root / "site" / "case" / DICOM_ID)
    shutil.copyfile(source.path, root / "other.svs")
    found = collect_inputs([root], recursive=True)
    assert found == [root / "other.svs", root / "site" / "case" / DICOM_ID]
    assert collect_inputs([root]) == [root / "other.svs"]  # two levels down: only with --recursive
    assert collect_inputs([root / "site" / "case"]) == [root / "site" / "case" / DICOM_ID]  # a direct sub-folder
    assert collect_inputs([root / "site" / "case" / DICOM_ID]) == [root / "site" / "case" / DICOM_ID]
    r = _run("tile", str(root), "--recursive", "-o", str(tmp_path / "out"), *TILE)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out" / "coords").iterdir()) == sorted([f"{DICOM_ID}.h5", "other.h5"])


def test_dcm_files_given_directly_are_their_folder_once(dicom: Path, tmp_path: Path) -> None:
    files = sorted(dicom.glob("*.dcm"))
    assert collect_inputs(files[:2]) == [dicom]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(f) for f in files) + "\n")
    assert collect_inputs([f"@{lst}", files[0]]) == [dicom]
    r = _run("tile", str(files[0]), str(files[2]), "-o", str(tmp_path / "out"), *TILE)
    assert r.exit_code == 0, r.output
    assert [p.name for p in (tmp_path / "out" / "coords").iterdir()] == [f"{DICOM_ID}.h5"]


def test_a_folder_of_two_series_is_refused_in_one_line(source: FixtureSlide, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    _dicomize(source.path, mixed)
    _dicomize(source.path, mixed)  # a second conversion: new series UIDs
    with pytest.raises(SlideOpenError, match=r"holds 2 DICOM WSI series .*give each series its own folder"):
        open_slide(mixed)
    r = _run("tile", str(mixed), "-o", str(tmp_path / "out"), *TILE)
    assert r.exit_code == 1
    row = latest_status(tmp_path / "out", "tile")["mixed"]
    assert row["status"] == "failed" and "2 DICOM WSI series" in row["reason"] and "\n" not in row["reason"]


def test_only_openslide_opens_a_dicom_folder(dicom: Path) -> None:
    with pytest.raises(SlideOpenError, match="tiffslide cannot open a folder of .dcm files"):
        open_slide(dicom, "tiffslide")


def test_classify_embeds_the_dicom_folder(dicom: Path, tmp_path: Path) -> None:
    prompts = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "demo.yaml"
    r = _run("classify", str(dicom.parent), "--prompts", str(prompts), "-o", str(tmp_path / "out"),
             "--model", "convlm_test", "--workers", "0", "--no-visuals", *TILE)
    assert r.exit_code == 0, r.output
    assert latest_status(tmp_path / "out", "embed")[DICOM_ID]["status"] == "ok"
    assert list((tmp_path / "out" / "features").glob(f"*/{DICOM_ID}.h5"))
