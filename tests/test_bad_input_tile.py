"""Bad input to the tile stage: one clear line and a status row per bad slide, the batch
finishes, exit code 1 (any slide failed) or 2 (usage error, before any work)."""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from slide_factory import FixtureSlide, make_slide

from wsi_pipeline.cli import main
from wsi_pipeline.config import TilingConfig
from wsi_pipeline.slide import Slide
from wsi_pipeline.slide.write import write_corrupt_tile_slide
from wsi_pipeline.store.coords import read_coords
from wsi_pipeline.store.status import latest_status, read_status
from wsi_pipeline.tiling import tile_slides
from wsi_pipeline.tiling.lowres import CHUNK


def _run(args: list[str]) -> object:
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_batch_with_every_unreadable_kind_finishes(corrupt_files: dict[str, Path], tiff_slide: FixtureSlide,
                                                   nompp_slide: FixtureSlide, tmp_path: Path) -> None:
    bad = {name: corrupt_files[name] for name in ("zero_byte", "truncated", "text", "unsupported")}
    bad["nompp"] = nompp_slide.path  # missing mpp and no override
    inputs = [str(p) for p in bad.values()] + [str(tiff_slide.path)]
    out = tmp_path / "out"
    r = _run(["tile", *inputs, "-o", str(out)])
    assert r.exit_code == 1  # type: ignore[attr-defined]
    stderr = r.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    # nothing but our own lines and the progress bar: no reader-library noise
    assert all(ln.startswith(("ERROR: ", "INFO: ", "tile:")) or not ln.strip() for ln in stderr.splitlines()), stderr
    status = latest_status(out, "tile")
    assert status["tissue"]["status"] == "ok" and int(status["tissue"]["n_patches"]) > 0
    expected_reason = {
        "zero_byte": "empty", "truncated": "", "text": "", "unsupported": "unsupported extension",
        "nompp": "no physical resolution",
    }
    for name, path in bad.items():
        sid = path.stem
        row = status[sid]
        assert row["status"] == "failed", (name, row)
        assert row["reason"] and expected_reason[name] in row["reason"], (name, row["reason"])
        error_lines = [ln for ln in stderr.splitlines() if ln.startswith(f"ERROR: {sid}:")]
        assert len(error_lines) == 1, (name, stderr)
        assert not (out / "coords" / f"{sid}.h5").exists()
    assert "1 ok, 0 skipped, 5 failed" in r.stdout  # type: ignore[attr-defined]


def test_missing_mpp_message_says_what_to_do(nompp_slide: FixtureSlide, tmp_path: Path) -> None:
    [res] = tile_slides([nompp_slide.path], tmp_path)
    assert res.status == "failed"
    assert "--mpp-csv" in res.reason and "--default-mpp" in res.reason


def test_slide_without_tissue_is_a_valid_empty_result(blank_slide: FixtureSlide, tmp_path: Path) -> None:
    r = _run(["tile", str(blank_slide.path), "-o", str(tmp_path)])
    assert r.exit_code == 0  # type: ignore[attr-defined]
    coords, attrs = read_coords(tmp_path / "coords" / "blank.h5")
    assert coords.shape == (0, 2) and coords.dtype == np.int64
    assert attrs["complete"] is True and attrs["n_patches"] == 0
    row = latest_status(tmp_path, "tile")["blank"]
    assert row["status"] == "ok" and row["n_patches"] == "0" and "no tissue" in row["reason"]
    assert (tmp_path / "tissue" / "blank.geojson").read_text().count('"Feature"') == 0
    assert (tmp_path / "thumbnails" / "blank.png").stat().st_size > 0
    # an empty result is complete: a rerun skips it
    [again] = tile_slides([blank_slide.path], tmp_path)
    assert again.status == "skipped" and again.n_patches == 0


@pytest.mark.slow
def test_non_pyramidal_tiff_is_read_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = make_slide(tmp_path / "flat.tif", 6144, 4096, mpp=0.5, layout="generic", levels=(1,), seed=7)
    reads: list[tuple[int, int, int]] = []
    original = Slide.read_region

    def spy(self: Slide, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        reads.append((level, int(size[0]), int(size[1])))
        return original(self, location, level, size)

    monkeypatch.setattr(Slide, "read_region", spy)
    tracemalloc.start()
    try:
        [res] = tile_slides([fs.path], tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.status == "ok" and res.n_patches and res.n_patches > 20
    assert reads and all(level == 0 and w <= CHUNK and h <= CHUNK for level, w, h in reads)
    level0_bytes = 6144 * 4096 * 3
    assert peak < 0.5 * level0_bytes, f"peak {peak / 2**20:.0f} MiB"
    coords, attrs = read_coords(tmp_path / "out" / "coords" / "flat.h5")
    assert attrs["seg_level"] == 0 and attrs["seg_factor"] == 16 and attrs["seg_mpp"] == 8.0


def test_unreadable_tile_is_salvaged_or_fails_cleanly(tmp_path: Path) -> None:
    # one corrupt level-0 tile in a single-level slide: the tile stage reads level 0, loses
    # one 256² block, records it and succeeds
    from slide_factory import TissueScene

    from wsi_pipeline.slide.write import TileSource, corrupt_tile

    scene = TissueScene(2048, 2048, n_blobs=2, seed=11)
    src = TileSource(scene.render, 2048, 2048)
    one = write_corrupt_tile_slide(tmp_path / "one.tif", src, tile_xy=(3, 3), mpp=0.5, layout="generic", levels=(1,))
    [res] = tile_slides([one], tmp_path / "out", TilingConfig(min_tissue_area=1000))
    assert res.status == "ok", res.reason
    _, attrs = read_coords(tmp_path / "out" / "coords" / "one.h5")
    assert attrs["unreadable_fraction"] == pytest.approx(1 / 64)  # one 256² tile of 2048²
    # many corrupt tiles: the slide fails with a one-line reason, the batch goes on
    many = write_corrupt_tile_slide(tmp_path / "many.tif", src, tile_xy=(0, 0), mpp=0.5, layout="generic",
                                    levels=(1,))
    for tx in range(8):
        for ty in range(1, 3):
            corrupt_tile(many, tile_xy=(tx, ty))
    results = tile_slides([many, one], tmp_path / "out2", TilingConfig(min_tissue_area=1000))
    assert [r.status for r in results] == ["failed", "ok"]

    assert "unreadable" in results[0].reason and "\n" not in results[0].reason


def test_unwritable_output_folder_fails_fast(tiff_slide: FixtureSlide, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = _run(["tile", str(tiff_slide.path), "-o", str(blocker / "out")])
    assert r.exit_code == 2  # type: ignore[attr-defined]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and "not writable" in lines[0]
    assert not list(tmp_path.rglob("status.csv"))


def test_duplicate_ids_are_a_usage_error(tiff_slide: FixtureSlide, tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copyfile(tiff_slide.path, tmp_path / sub / "x.tif")
    r = _run(["tile", str(tmp_path / "a" / "x.tif"), str(tmp_path / "b" / "x.tif"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "same id 'x'" in r.stderr  # type: ignore[attr-defined]
    assert not (tmp_path / "o").exists()


def test_unexpected_error_is_one_line_and_traceback_only_with_verbose(
    tiff_slide: FixtureSlide, blank_slide: FixtureSlide, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsi_pipeline.tiling.tissue as tissue

    real = tissue.segment_tissue

    def flaky(rgb: np.ndarray, mpp: float, params: object = None) -> object:
        if rgb.shape[0] == 3072 // 16:  # the tiff fixture's segmentation picture
            raise RuntimeError("boom\nsecond line")
        return real(rgb, mpp, params)  # type: ignore[arg-type]

    monkeypatch.setattr(tissue, "segment_tissue", flaky)
    args = ["tile", str(tiff_slide.path), str(blank_slide.path), "-o", str(tmp_path / "o")]
    quiet = _run(args)
    assert quiet.exit_code == 1  # type: ignore[attr-defined]
    assert "Traceback" not in quiet.stderr  # type: ignore[attr-defined]
    row = latest_status(tmp_path / "o", "tile")["tissue"]
    assert row["status"] == "failed" and row["reason"].startswith("unexpected RuntimeError: boom")
    assert latest_status(tmp_path / "o", "tile")["blank"]["status"] == "ok"
    verbose = _run(["-v", *args, "--overwrite"])
    assert "Traceback" in verbose.stderr  # type: ignore[attr-defined]
    assert len(read_status(tmp_path / "o")) == 4


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_threaded_segmentation_read_equals_one_thread_and_closes_its_handles(tmp_path: Path, backend: str) -> None:
    """Level 0 read by several threads (each through its own handle) gives the picture and the
    unreadable count one thread gives, a corrupt tile included, and leaves no file open."""
    import os

    from slide_factory import TissueScene

    from wsi_pipeline.slide import open_slide
    from wsi_pipeline.slide.write import TileSource
    from wsi_pipeline.tiling.lowres import read_lowres

    scene = TissueScene(2048, 1536, n_blobs=3, seed=12)
    path = write_corrupt_tile_slide(tmp_path / "c.tif", TileSource(scene.render, 2048, 1536), tile_xy=(5, 2),
                                    mpp=0.5, layout="generic", levels=(1,))
    with open_slide(path, backend) as slide:  # the first open starts fsspec's event loop (its own fds)
        one = read_lowres(slide, slide.info, 0, 4, chunk=256, threads=1)
    fds = len(os.listdir("/proc/self/fd"))
    with open_slide(path, backend) as slide:
        many = read_lowres(slide, slide.info, 0, 4, chunk=256, threads=3)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert one.unreadable_fraction == many.unreadable_fraction == pytest.approx(1 / 48)  # one 256² tile
    np.testing.assert_array_equal(one.rgb, many.rgb)
    assert (one.rgb[2 * 64 : 3 * 64, 5 * 64 : 6 * 64] == 255).all()  # the lost tile reads as glass
    assert one.rgb.std() > 10  # tissue was read


def test_whole_image_backends_are_read_through_one_handle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PNG is decoded whole when opened: threads must not open (and decode) it again each."""
    from PIL import Image
    from skimage.data import immunohistochemistry

    from wsi_pipeline.slide import _image, open_slide
    from wsi_pipeline.tiling.lowres import read_lowres

    Image.fromarray(np.tile(immunohistochemistry(), (2, 2, 1))).save(tmp_path / "roi.png")
    opened = []
    real_init = _image.ImageBackend.__init__
    with open_slide(tmp_path / "roi.png") as slide:
        monkeypatch.setattr(_image.ImageBackend, "__init__",
                            lambda self, path: (opened.append(path), real_init(self, path))[1])
        assert slide.backend == "image" and not slide.parallel_reads
        low = read_lowres(slide, slide.info.with_mpp(1.0, "csv"), 0, 4, chunk=256, threads=3)
    assert opened == [] and low.rgb.shape == (256, 256, 3)
