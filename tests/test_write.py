"""The pyramidal-TIFF writer: layouts, pyramid values, tile sources, atomicity, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide
from slide_factory import tissue_image

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.slide import write as slide_write
from wsi_pipeline.slide.write import TileSource, area_downsample, corrupt_tile, write_slide


def reference_downsample(arr: np.ndarray, f: int) -> np.ndarray:
    """Plain loops: mean of each f×f block (valid pixels only), rounded half up."""
    h, w = arr.shape[:2]
    out = np.zeros((math.ceil(h / f), math.ceil(w / f), *arr.shape[2:]), np.uint8)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = arr[i * f : (i + 1) * f, j * f : (j + 1) * f].astype(np.int64)
            n = block.shape[0] * block.shape[1]
            out[i, j] = (block.sum(axis=(0, 1)) + n // 2) // n
    return out


@pytest.mark.parametrize(
    ("factor", "shape"),
    [(2, (8, 6, 3)), (4, (37, 41, 3)), (3, (10, 7, 3)), (5, (23, 12)), (16, (64, 40, 1)), (64, (130, 70, 3))],
)
def test_area_downsample_equals_plain_block_means(factor: int, shape: tuple[int, ...]) -> None:
    arr = np.random.default_rng(factor).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(area_downsample(arr, factor), reference_downsample(arr, factor))


def _levels(path: Path) -> list[np.ndarray]:
    with tiffslide.TiffSlide(path) as s:
        return [s.read_region((0, 0), k, s.level_dimensions[k], as_array=True) for k in range(s.level_count)]


def test_lossless_pyramid_holds_source_and_area_averaged_levels(tmp_path: Path) -> None:
    rgb, _ = tissue_image(310, 215, n_blobs=2, seed=11)  # not a multiple of the tile or the factors
    path = write_slide(tmp_path / "a.tif", rgb, layout="generic", compression="deflate", mpp=0.5,
                       levels=(1, 3, 9), tile_size=64)
    got = _levels(path)
    level1 = reference_downsample(rgb, 3)
    assert [g.shape for g in got] == [(215, 310, 3), (72, 104, 3), (24, 35, 3)]
    np.testing.assert_array_equal(got[0], rgb)
    np.testing.assert_array_equal(got[1], level1)
    np.testing.assert_array_equal(got[2], reference_downsample(level1, 3))  # each level from the previous


def test_tile_source_is_read_once_and_gives_the_same_pixels(tmp_path: Path) -> None:
    rgb, _ = tissue_image(1100, 600, n_blobs=2, seed=12)
    visits = np.zeros(rgb.shape[:2], np.int32)

    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        visits[y : y + h, x : x + w] += 1
        return rgb[y : y + h, x : x + w]

    kw = dict(layout="svs", compression="deflate", mpp=0.25, levels=(1, 4, 16), tile_size=128)
    a = write_slide(tmp_path / "array.svs", rgb, **kw)  # type: ignore[arg-type]
    b = write_slide(tmp_path / "source.svs", TileSource(read, 1100, 600), **kw)  # type: ignore[arg-type]
    c = write_slide(tmp_path / "bare.svs", lambda x, y, w, h: rgb[y : y + h, x : x + w], size=(1100, 600),
                    **kw)  # type: ignore[arg-type]
    assert (visits == 1).all()
    for la, lb, lc in zip(_levels(a), _levels(b), _levels(c), strict=True):
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(la, lc)


def test_large_levels_go_through_a_memmap_with_identical_result(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    rgb, _ = tissue_image(640, 480, n_blobs=2, seed=13)
    kw = dict(layout="generic", compression="deflate", mpp=0.5, levels=(1, 2, 4))
    in_memory = _levels(write_slide(tmp_path / "m.tif", rgb, **kw))  # type: ignore[arg-type]
    monkeypatch.setattr(slide_write, "MEMMAP_THRESHOLD_BYTES", 0)
    mapped = _levels(write_slide(tmp_path / "d.tif", rgb, **kw))  # type: ignore[arg-type]
    for a, b in zip(in_memory, mapped, strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.tif", "m.tif"]  # scratch folder removed


def test_svs_layout_structure(tmp_path: Path) -> None:
    rgb, _ = tissue_image(2304, 1536, n_blobs=2, seed=14)
    path = write_slide(tmp_path / "s.svs", rgb, mpp=0.25, levels=(1, 4), quality=80)
    with tifffile.TiffFile(path) as tf:
        pages = tf.pages
        d0 = pages[0].description
        assert d0.startswith("Aperio Image Library v12.0.0\r\n2304x1536 [0,0 2304x1536] (256x256) JPEG/RGB Q=80|")
        assert d0.endswith("|AppMag = 40|MPP = 0.25")
        assert pages[0].is_tiled and pages[2].is_tiled and not pages[1].is_tiled  # thumbnail second
        assert max(pages[1].shape[:2]) <= slide_write.THUMBNAIL_MAX_SIDE
        assert pages[2].shape == (384, 576, 3) and pages[2].subfiletype == 0
        assert len(pages) == 3
    with openslide.OpenSlide(path) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert (s.properties["openslide.mpp-x"], s.properties["openslide.objective-power"]) == ("0.25", "40")
        assert s.level_dimensions == ((2304, 1536), (576, 384))
        assert "thumbnail" in s.associated_images


def test_svs_without_mpp_and_without_thumbnail(tmp_path: Path) -> None:
    rgb, _ = tissue_image(600, 400, n_blobs=1, seed=15)
    path = write_slide(tmp_path / "n.svs", rgb, mpp=None, levels=(1, 2), thumbnail=False)
    with tifffile.TiffFile(path) as tf:
        assert "MPP" not in tf.pages[0].description and "AppMag" not in tf.pages[0].description
        assert all(p.is_tiled for p in tf.pages) and len(tf.pages) == 2
    with openslide.OpenSlide(path) as s:
        assert "openslide.mpp-x" not in s.properties and s.associated_images.keys() == set()
        assert s.level_count == 2


def test_generic_layout_resolution_in_centimetres(tmp_path: Path) -> None:
    rgb, _ = tissue_image(600, 400, n_blobs=1, seed=16)
    path = write_slide(tmp_path / "g.tif", rgb, layout="generic", mpp=0.5, levels=(1, 4))
    with tifffile.TiffFile(path) as tf:
        p0, p1 = tf.pages[0], tf.pages[1]
        assert p0.description == "" and len(tf.pages) == 2
        assert p0.tags["XResolution"].value == (20000, 1) and p0.tags["ResolutionUnit"].value == 3
        assert p1.subfiletype == 1 and p1.tags["XResolution"].value == (5000, 1)
    with openslide.OpenSlide(path) as s:
        assert s.properties["openslide.mpp-x"] == "0.5" and s.level_dimensions == ((600, 400), (150, 100))


def test_auto_levels_step_by_four_while_a_level_covers_a_tile(tmp_path: Path) -> None:
    rgb = np.full((1200, 5000, 3), 230, np.uint8)
    path = write_slide(tmp_path / "auto.svs", rgb, mpp=0.5, compression="deflate")
    with openslide.OpenSlide(path) as s:
        assert s.level_dimensions == ((5000, 1200), (1250, 300), (313, 75))


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        if y >= 512:
            raise RuntimeError("source broke")
        return np.zeros((h, w, 3), np.uint8)

    with pytest.raises(RuntimeError, match="source broke"):
        write_slide(tmp_path / "x.svs", TileSource(read, 800, 800), levels=(1, 2))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "ome"}, "unknown layout 'ome'"),
        ({"compression": "lzw"}, "unknown compression 'lzw'"),
        ({"tile_size": 100}, "multiple of 16"),
        ({"levels": (2, 4)}, "levels must start at 1"),
        ({"levels": (1, 3, 4)}, "multiple of the previous"),
        ({"levels": (1, 2, 8), "layout": "generic"}, "constant step of 2, 3 or 4"),
        ({"levels": (1, 8), "layout": "generic"}, "constant step of 2, 3 or 4"),
        ({"levels": "many"}, "'auto' or a sequence"),
        ({"mpp": 0.0}, "mpp must be a positive number"),
        ({"mpp": float("nan")}, "mpp must be a positive number"),
        ({"quality": 0}, "quality"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        write_slide(tmp_path / "x.tif", np.zeros((32, 32, 3), np.uint8), **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("source", "kwargs", "message"),
    [
        (np.zeros((32, 32), np.uint8), {}, "RGB uint8 array"),
        (np.zeros((32, 32, 3), np.float32), {}, "RGB uint8 array"),
        (lambda x, y, w, h: np.zeros((h, w, 3), np.uint8), {}, "needs size"),
        (lambda x, y, w, h: np.zeros((h, w), np.uint8), {"size": (64, 64)}, "must return uint8"),
    ],
)
def test_bad_sources_raise_config_error(tmp_path: Path, source: object, kwargs: dict[str, object],
                                        message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        write_slide(tmp_path / "x.tif", source, **kwargs)  # type: ignore[arg-type]


def test_corrupt_tile_zeroes_exactly_that_tile(tmp_path: Path) -> None:
    rgb, _ = tissue_image(600, 400, n_blobs=1, seed=17)
    path = write_slide(tmp_path / "c.svs", rgb, mpp=0.5, levels=(1,), thumbnail=False)
    before = path.read_bytes()
    corrupt_tile(path, tile_xy=(2, 1))  # 3 tiles per row: index 5
    after = path.read_bytes()
    with tifffile.TiffFile(path) as tf:
        off, n = tf.pages[0].dataoffsets[5], tf.pages[0].databytecounts[5]
    assert after[off : off + n] == b"\0" * n and n > 0
    assert after[:off] == before[:off] and after[off + n :] == before[off + n :]
