"""Which exceptions mean "damaged or unsupported slide", and which are bugs (issue 12 item 4).

A damaged file must come out of the slide API as :class:`SlideOpenError` or
:class:`SlideReadError` (one line, the batch goes on). A programming error, an
``ImportError`` or a changed library API must come out as itself, and the stages must
report it as "unexpected", never as a damaged slide.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import tifffile
from slide_factory import FixtureSlide, tissue_image

from wsi_pipeline.config import TilingConfig
from wsi_pipeline.errors import SlideError, SlideOpenError, SlideReadError
from wsi_pipeline.slide import SlideInfo, open_slide
from wsi_pipeline.slide import base as slide_base
from wsi_pipeline.slide._tiff import is_codec_error, is_tiff_file_error
from wsi_pipeline.slide.write import write_slide

DAMAGED_WORDS = ("damaged", "not a readable slide", "cannot read region", "cannot open it")


# -- damaged files: typed errors only ---------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A JPEG SVS and a deflate generic TIFF, as bytes to damage."""
    folder = tmp_path_factory.mktemp("src")
    rgb, _ = tissue_image(768, 512, n_blobs=2, seed=3)
    svs = write_slide(folder / "a.svs", rgb, mpp=0.5, levels=(1, 4))
    tif = write_slide(folder / "b.tif", rgb, layout="generic", compression="deflate", mpp=0.5, levels=(1, 2))
    return {".svs": svs.read_bytes(), ".tif": tif.read_bytes()}


def _tile_offsets(data: bytes, path: Path) -> list[tuple[int, int]]:
    path.write_bytes(data)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        return list(zip(page.dataoffsets, page.databytecounts, strict=True))


def _damage(kind: str, data: bytes, path: Path) -> bytes:
    """One kind of damage seen in the wild: a cut copy, a bad header, broken tile bytes."""
    b = bytearray(data)
    if kind.startswith("cut"):
        return bytes(b[: int(len(b) * float(kind[3:]))])
    if kind == "magic":
        b[:4] = b"\0\0\0\0"
    elif kind == "ifd_offset_past_end":
        b[4:8] = (len(b) + 1000).to_bytes(4, "little")
    elif kind.startswith("tiles"):  # garbage in the middle of each of the first level-0 tiles
        rng = np.random.default_rng(int(kind[5:]))
        for offset, count in _tile_offsets(data, path)[:4]:
            start = offset + count // 3
            b[start : start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    return bytes(b)


@pytest.mark.parametrize("ext", [".svs", ".tif"])
@pytest.mark.parametrize("kind", ["cut0.01", "cut0.3", "cut0.95", "magic", "ifd_offset_past_end", "tiles1", "tiles2"])
@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide", "image"])
def test_damaged_files_raise_only_slide_errors(sources: dict[str, bytes], tmp_path: Path, ext: str, kind: str,
                                               backend: str) -> None:
    path = tmp_path / f"x{ext}"
    path.write_bytes(_damage(kind, sources[ext], tmp_path / f"scratch{ext}"))
    try:
        with open_slide(path, backend) as s:
            for level, (w, h) in enumerate(s.info.level_dimensions):
                s.read_region((0, 0), level, (min(w, 1024), min(h, 1024)))
    except (SlideOpenError, SlideReadError) as e:
        assert "\n" not in str(e)
    # no other exception type may escape; reading it all is fine too (damage in unused bytes)


def test_codec_errors_are_file_errors_but_a_missing_codec_is_not() -> None:
    import imagecodecs

    try:
        imagecodecs.jpeg8_decode(b"\xff\xd8\xff\x00garbage")
    except Exception as e:  # the real error object, with its traceback
        assert is_codec_error(e) and is_tiff_file_error(e)
    missing = imagecodecs.DelayedImportError("jpegxs")
    assert not is_codec_error(missing) and not is_tiff_file_error(missing)
    assert not is_tiff_file_error(ValueError("raised by our own code"))  # no library frame
    assert not is_tiff_file_error(TypeError("x"))


def test_tifffile_format_error_is_a_file_error(tmp_path: Path) -> None:
    path = tmp_path / "not.tif"
    path.write_bytes(b"this is not a tiff file at all")
    with pytest.raises(tifffile.TiffFileError) as exc:
        tifffile.TiffFile(path)
    assert is_tiff_file_error(exc.value)


# -- bugs propagate as themselves -------------------------------------------------------------
class _BuggyOpen:
    name: ClassVar[str] = "buggy"
    error: ClassVar[type[Exception]] = TypeError

    def __init__(self, path: str) -> None:
        raise self.error("__init__() got an unexpected keyword argument 'level'")


class _BuggyRead:
    name: ClassVar[str] = "buggyread"
    opened = 0

    def __init__(self, path: str) -> None:
        type(self).opened += 1
        self.info = SlideInfo(path, self.name, "0", ((64, 64),), (1.0,), mpp_x=0.5, mpp_y=0.5)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        raise TypeError("read_region() takes 3 positional arguments but 4 were given")

    def close(self) -> None:
        pass


def _register(monkeypatch: pytest.MonkeyPatch, cls: type, exts: frozenset[str] = frozenset(), prio: int = 99) -> None:
    spec = slide_base.BackendSpec(cls.name, cls, prio, exts, lambda: True, lambda: "0")
    monkeypatch.setitem(slide_base._BACKENDS, cls.name, spec)


@pytest.mark.parametrize("error", [TypeError, ImportError, AttributeError])
def test_a_bug_at_open_is_raised_as_itself(monkeypatch: pytest.MonkeyPatch, tiff_slide: FixtureSlide,
                                           error: type[Exception]) -> None:
    monkeypatch.setattr(_BuggyOpen, "error", error)
    _register(monkeypatch, _BuggyOpen)
    with pytest.raises(error, match="unexpected keyword"):
        open_slide(tiff_slide.path, "buggy")


def test_auto_reads_with_the_next_backend_after_a_bug_but_raises_it_when_none_opens(
        monkeypatch: pytest.MonkeyPatch, tiff_slide: FixtureSlide, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    _register(monkeypatch, _BuggyOpen, frozenset({".tif"}), prio=0)
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline.slide.slide"):
        with open_slide(tiff_slide.path) as s:
            assert s.backend == "tiffslide"
    assert "backend buggy raised TypeError" in caplog.text and "not a damaged file" in caplog.text
    text = tmp_path / "notes.tif"
    text.write_text("not a slide")
    with pytest.raises(TypeError, match="unexpected keyword"):  # not "not a readable slide"
        open_slide(text)


def test_a_bug_at_read_is_raised_as_itself_without_reopening(monkeypatch: pytest.MonkeyPatch,
                                                             tiff_slide: FixtureSlide) -> None:
    _register(monkeypatch, _BuggyRead)
    _BuggyRead.opened = 0
    s = open_slide(tiff_slide.path, "buggyread")
    with pytest.raises(TypeError, match="positional arguments"):
        s.read_region((0, 0), 0, (8, 8))
    assert _BuggyRead.opened == 1  # a bug is no reason to reopen


def test_embed_reader_does_not_blank_patches_on_a_bug(monkeypatch: pytest.MonkeyPatch,
                                                      tiff_slide: FixtureSlide) -> None:
    """Blank patches (and "the slide file is damaged" past the threshold) only for read errors."""
    from wsi_pipeline.embed.regions import plan_regions, read_region_patches

    _register(monkeypatch, _BuggyRead)
    coords = np.array([[0, 0], [16, 0]])
    plan = plan_regions(coords, level=0, downsample=1.0, patch_px=16)
    with pytest.raises(TypeError):
        read_region_patches(open_slide(tiff_slide.path, "buggyread"), plan, plan.regions[0], coords)


@pytest.mark.parametrize(("target", "error", "message"), [
    ("tiffslide.TiffSlide", ImportError, "cannot import name '_zarr' from 'tiffslide'"),
    ("wsi_pipeline.slide._tiffslide.TiffSlideBackend.read_region", TypeError, "got an unexpected keyword"),
])
def test_tile_stage_reports_a_reader_bug_as_unexpected_not_damaged(
        monkeypatch: pytest.MonkeyPatch, tiff_slide: FixtureSlide, tmp_path: Path, target: str,
        error: type[Exception], message: str) -> None:
    from wsi_pipeline.store.status import latest_status
    from wsi_pipeline.tiling.stage import tile_slide

    def broken(*args: object, **kwargs: object) -> None:
        raise error(message)

    monkeypatch.setattr(target, broken)
    result = tile_slide(tiff_slide.path, tmp_path, TilingConfig(backend="tiffslide"))
    assert result.status == "failed"
    assert result.reason.startswith(f"unexpected {error.__name__}: {message}")
    assert not any(word in result.reason for word in DAMAGED_WORDS)
    assert latest_status(tmp_path, "tile")[result.slide_id]["reason"] == result.reason


def test_read_errors_still_reopen_once_and_are_typed(tmp_path: Path) -> None:
    """The other side: a damaged tile is a file error in both slide backends."""
    from wsi_pipeline.slide.write import write_corrupt_tile_slide

    rgb, _ = tissue_image(512, 512, n_blobs=1, seed=4)
    path = write_corrupt_tile_slide(tmp_path / "bad.svs", rgb, tile_xy=(1, 1), mpp=0.5, levels=(1, 2))
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend) as s, pytest.raises(SlideReadError) as exc:
            s.read_region((256, 256), 0, (64, 64))
        assert isinstance(exc.value, SlideError) and exc.value.__cause__ is not None
