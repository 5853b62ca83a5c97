"""tiffslide backend (pure Python: tifffile + imagecodecs; tiffslide for structure and metadata).

Reading. A level stored as one plain tiled page (the usual Aperio SVS and generic
pyramidal TIFF) is read by decoding exactly the tiles a region touches, straight from
the file with tifffile's own decoder for that page; this skips the zarr machinery,
which costs more per tile than the JPEG decode itself. Tiles the file leaves out
(offset or byte count 0) are white, as in OpenSlide. Any other layout (strips,
multi-page or composited levels) goes through tiffslide's public ``read_region``, and so
does every level when tiffslide's internals are not what this code expects (see
:class:`TiffSlideBackend`).

Choice under ``auto``. For ``.svs``, ``.tif`` and ``.tiff`` this backend is tried
before OpenSlide: on those files both return identical pixels and this one reads
regions several times faster. It still lets OpenSlide go first (see :func:`defer_reason`)
for files whose pixels OpenSlide builds differently: another vendor's layout (Philips,
Ventana, Leica, Hamamatsu: sparse, overlapping or composited tiles), a codec other than
JPEG, deflate, LZW or none (JPEG 2000 tiles decode differently, tiffslide issue #86), or
a composited series. If OpenSlide then cannot open the file, this backend is used after
all. Every other extension keeps OpenSlide first.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from typing import Any, ClassVar

import numpy as np

from ..errors import SlideReadError, UnsupportedFormatError
from ._mpp import build_slide_info
from ._tiff import check_data_extent, is_tiff_file_error, picture_problem, series_pages
from .base import SlideBackend, SlideInfo, register_backend

_logger = logging.getLogger(__name__)

TIFFSLIDE_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide"})

#: Extensions where ``auto`` tries this backend before OpenSlide (lower is earlier).
PREFERRED_EXTENSIONS = {".svs": 5, ".tif": 5, ".tiff": 5}

#: TIFF compression codes that OpenSlide and tifffile decode to identical pixels.
SAME_PIXELS_CODECS = frozenset({1, 5, 7, 8, 32946})  # none, LZW, JPEG, deflate (both tags)

#: ``tiffslide.vendor`` values whose files this backend reads like OpenSlide does.
SAME_PIXELS_VENDORS = frozenset({"aperio", ""})  # "": generic TIFF

_WHITE = 255


def _available() -> bool:
    return importlib.util.find_spec("tiffslide") is not None


def _version() -> str:
    import tifffile
    import tiffslide

    return f"tiffslide {tiffslide.__version__} (tifffile {tifffile.__version__})"


def level_rect(
    location: tuple[int, int], downsample: float, size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) at a level: the level pixel containing the level-0 ``location``."""
    x0 = math.floor(location[0] / downsample)
    y0 = math.floor(location[1] / downsample)
    return x0, y0, x0 + int(size[0]), y0 + int(size[1])


class TiledLevel:
    """Decode the tiles of one plain tiled TIFF page that a region touches.

    ``fd`` is an OS file descriptor of the slide (read with ``os.pread``, so it has no
    shared position); ``page`` is the level's only page (a ``TiffPage`` or ``TiffFrame``).
    """

    def __init__(self, fd: int, page: Any) -> None:
        key = page.keyframe
        self._fd = fd
        self._decode = key.decode  # tifffile's decoder for this page's codec
        self._kwargs: dict[str, bytes] = {}
        tables = getattr(page, "jpegtables", None)
        if tables is None:
            tables = key.jpegtables
        if tables is not None:
            self._kwargs["jpegtables"] = tables
        if key.jpegheader is not None:
            self._kwargs["jpegheader"] = key.jpegheader
        self.tile_h, self.tile_w = int(key.tilelength), int(key.tilewidth)
        self.height, self.width = int(key.imagelength), int(key.imagewidth)
        self.samples = int(key.samplesperpixel)
        self._tiles_x = math.ceil(self.width / self.tile_w)
        self._offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self._counts = np.asarray(page.databytecounts, dtype=np.int64)

    @staticmethod
    def accepts(page: Any) -> bool:
        """True for a single tiled 2-D uint8 page with interleaved samples."""
        page = page.keyframe
        return bool(
            page.is_tiled
            and page.imagedepth == 1
            and page.tiledepth == 1
            and page.dtype == np.uint8
            and (page.planarconfig == 1 or page.samplesperpixel == 1)
            and page.samplesperpixel in (1, 3, 4)
        )

    def touches_missing_tile(self, x0: int, y0: int, x1: int, y1: int) -> bool:
        """Whether the rectangle touches a tile the file leaves out (white here, black in
        tiffslide's own reader)."""
        th, tw = self.tile_h, self.tile_w
        rows = np.arange(y0 // th, (y1 - 1) // th + 1)
        cols = np.arange(x0 // tw, (x1 - 1) // tw + 1)
        index = (rows[:, None] * self._tiles_x + cols[None, :]).ravel()
        return bool(((self._offsets[index] == 0) | (self._counts[index] == 0)).any())

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels (y1 - y0, x1 - x0, samples) of an in-bounds rectangle."""
        out = np.empty((y1 - y0, x1 - x0, self.samples), np.uint8)
        th, tw = self.tile_h, self.tile_w
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                sx0, sx1 = max(x0, tx * tw), min(x1, (tx + 1) * tw)
                sy0, sy1 = max(y0, ty * th), min(y1, (ty + 1) * th)
                dst = out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
                index = ty * self._tiles_x + tx
                offset, count = int(self._offsets[index]), int(self._counts[index])
                if offset == 0 or count == 0:  # tile left out of the file: unscanned glass
                    dst[...] = _WHITE
                    continue
                tile = self._decode(os.pread(self._fd, count, offset), index, **self._kwargs)[0]
                part = tile[0, sy0 - ty * th : sy1 - ty * th, sx0 - tx * tw : sx1 - tx * tw]
                if part.shape != dst.shape:
                    raise SlideReadError(f"tile {index} decodes to {tile.shape[1:3]}, too small for the level")
                dst[...] = part
        return out


#: What a changed tiffslide/tifffile internal raises when used the old way (not the file's fault).
_API_CHANGE_ERRORS = (AttributeError, TypeError, KeyError, IndexError)
#: Side of the window that the first tile-path read of a handle is checked on against
#: tiffslide's public ``read_region``.
_CHECK_SIDE = 64


class _LayoutMismatch(Exception):
    """The tile path disagrees with tiffslide's public reader: a changed internal layout."""


class TiffSlideBackend:
    """One ``tiffslide.TiffSlide`` handle; plain tiled levels are decoded tile by tile.

    The tile path rests on tiffslide internals (its tifffile handle ``ts_tifffile``, the
    series it picked, its composition attribute) and on tifffile's page decoder. If they
    are missing or behave otherwise (an exception of :data:`_API_CHANGE_ERRORS`, levels
    of other sizes, a first region that differs from the public reader's), the handle logs
    a warning once and reads through tiffslide's public ``read_region`` instead, which
    gives the same pixels, slower (except tiles the file leaves out: black there, white
    here and in OpenSlide).
    """

    name: ClassVar[str] = "tiffslide"

    def __init__(self, path: str) -> None:
        import tiffslide

        self._slide = tiffslide.TiffSlide(path)
        self._fd = -1
        self._levels: list[TiledLevel | None] = []
        self._checked = False
        try:
            self._axes = str(self._slide.properties["tiffslide.series-axes"])
            if self._axes not in ("YXS", "YX"):
                raise UnsupportedFormatError(self._picture_problem()
                                             or f"unsupported axes {self._axes!r}; expected a 2-D RGB or grey image")
            try:
                layout = self._tile_layout(path)
            except _API_CHANGE_ERRORS as e:
                _logger.warning("%s: tiffslide's internal layout is not the one this version knows (%s: %s); "
                                "reading through its public read_region", path, type(e).__name__, e)
                layout, self._levels = None, []
            if layout is None:
                self.codecs: frozenset[int] | None = None
                self.composited = False
                self._check_dtype(self._public_dtype())
        except BaseException:
            self.close()
            raise
        self._info = build_slide_info(path, self.name, _version(), self._slide.level_dimensions,
                                      self._slide.level_downsamples, self._slide.properties)
        self.vendor = str(self._slide.properties.get("tiffslide.vendor") or "")

    def _tile_layout(self, path: str) -> bool:
        """Check the file (sample type, truncation, codecs) and set up the tile path from
        tiffslide's internals; ``False`` when the levels are composited (no tile path then)."""
        series = self._series()
        self._check_dtype(series.dtype)
        problem = picture_problem(series)
        if problem is not None:
            raise UnsupportedFormatError(problem)
        pages = series_pages(series)
        check_data_extent(path, pages)
        self.codecs = frozenset(int(p.compression) for p in pages)
        self.composited = self._slide.zarr_group.attrs.get("tiffslide.series-composition") is not None
        if self.composited:
            return False
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        dims = self._slide.level_dimensions
        for k, level in enumerate(series.levels):
            tiled = (TiledLevel(self._fd, level.pages[0])
                     if len(level.pages) == 1 and TiledLevel.accepts(level.pages[0]) else None)
            if tiled is not None and (k >= len(dims) or (tiled.width, tiled.height) != tuple(dims[k])):
                _logger.warning("%s: tifffile level %d is %dx%d, tiffslide says %s; reading it through "
                                "tiffslide's public read_region", path, k, tiled.width, tiled.height,
                                dims[k] if k < len(dims) else "no such level")
                tiled = None
            self._levels.append(tiled)
        return True

    def _series(self) -> Any:
        """The tifffile series tiffslide reads (an internal: raises one of :data:`_API_CHANGE_ERRORS` if changed)."""
        return self._slide.ts_tifffile.series[int(self._slide.properties["tiffslide.series-index"])]

    def _picture_problem(self) -> str | None:
        """:func:`~._tiff.picture_problem` of the series, or ``None`` when tiffslide's internals changed."""
        try:
            return picture_problem(self._series())
        except _API_CHANGE_ERRORS:
            return None

    @staticmethod
    def _check_dtype(dtype: Any) -> None:
        if dtype != np.uint8:
            raise UnsupportedFormatError(f"unsupported sample type {dtype}; expected 8-bit RGB")

    def _public_dtype(self) -> Any:
        return self._slide.read_region((0, 0), 0, (1, 1), as_array=True, padding=False).dtype

    @property
    def info(self) -> SlideInfo:
        return self._info

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3); out-of-bounds pixels are white."""
        w, h = max(int(size[0]), 0), max(int(size[1]), 0)
        lw, lh = self._info.level_dimensions[level]
        x0, y0, x1, y1 = level_rect(location, self._info.level_downsamples[level], (w, h))
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, lw), min(y1, lh)
        if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1) and w and h:  # inside the level: no white margin to add
            arr = self._read_level(level, x0, y0, x1, y1)
            if arr.ndim == 3 and arr.shape[2] == 3 and arr.flags.c_contiguous and arr.flags.writeable:
                return arr
        else:
            arr = None
        out = np.full((h, w, 3), _WHITE, np.uint8)
        if cx0 >= cx1 or cy0 >= cy1:
            return out
        if arr is None:
            arr = self._read_level(level, cx0, cy0, cx1, cy1)
        if arr.ndim == 2:
            arr = arr[..., None]
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = arr[..., :3] if arr.shape[2] >= 3 else arr[..., :1]
        return out

    def _read_level(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels of an in-bounds rectangle at ``level``: the tile path, else the public reader."""
        tiled = self._levels[level] if level < len(self._levels) else None
        if tiled is None:
            return self._public_read(level, x0, y0, x1, y1)
        try:
            arr = tiled.read(x0, y0, x1, y1)
            if not self._checked:
                self._check_tile_path(tiled, arr, level, x0, y0, x1, y1)
            return arr
        except (*_API_CHANGE_ERRORS, _LayoutMismatch) as e:
            _logger.warning("%s: tile path failed (%s: %s); reading through tiffslide's public read_region",
                            self._info.path, type(e).__name__, e)
            self._levels = []
            return self._public_read(level, x0, y0, x1, y1)

    def _check_tile_path(self, tiled: TiledLevel, arr: np.ndarray, level: int, x0: int, y0: int, x1: int,
                         y1: int) -> None:
        """Compare the first tile-path read of this handle with the public reader on a small
        window (a window on a tile the file leaves out is not compared: the next read is)."""
        cx1, cy1 = min(x1, x0 + _CHECK_SIDE), min(y1, y0 + _CHECK_SIDE)
        if tiled.touches_missing_tile(x0, y0, cx1, cy1):
            return
        want = self._public_read(level, x0, y0, cx1, cy1)
        got = arr[: cy1 - y0, : cx1 - x0]
        if got.shape != want.shape or not np.array_equal(got, want):
            raise _LayoutMismatch(f"level {level} at ({x0}, {y0}) differs from tiffslide's read_region")
        self._checked = True

    def _public_read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """tiffslide's public ``read_region`` of an in-bounds level rectangle (it floors
        ``location / downsample``; ``ceil(x0 * downsample)`` maps back to ``x0``)."""
        ds = self._info.level_downsamples[level]
        loc = (math.ceil(x0 * ds), math.ceil(y0 * ds))
        arr = np.asarray(self._slide.read_region(loc, level, (x1 - x0, y1 - y0), as_array=True, padding=False))
        if arr.shape[:2] != (y1 - y0, x1 - x0):
            raise RuntimeError(f"tiffslide {_version()} read_region returned {arr.shape[:2]} for a "
                               f"{(y1 - y0, x1 - x0)} region; this tiffslide release is not supported")
        return arr

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._slide.close()


def defer_reason(handle: SlideBackend) -> str | None:
    """Why ``auto`` should let OpenSlide read this file first, or ``None``."""
    if not isinstance(handle, TiffSlideBackend):
        return None
    if handle.vendor not in SAME_PIXELS_VENDORS:
        return f"vendor {handle.vendor!r}: OpenSlide reads this layout natively"
    if handle.codecs is None:
        return "tiffslide's internal layout is unknown to this version: codecs not checked"
    odd = sorted(handle.codecs - SAME_PIXELS_CODECS)
    if odd:
        return f"TIFF compression {odd}: decoders may differ from OpenSlide's"
    if handle.composited:
        return "composited series"
    return None


register_backend(
    TiffSlideBackend.name,
    TiffSlideBackend,
    priority=20,
    extensions=TIFFSLIDE_EXTENSIONS,
    is_available=_available,
    version=_version,
    ext_priority=PREFERRED_EXTENSIONS,
    defer=defer_reason,
    is_file_error=is_tiff_file_error,
)
