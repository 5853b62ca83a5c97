"""tiffslide backend (pure Python: tifffile + imagecodecs; tiffslide for structure and metadata).

Reading. A level stored as one plain tiled page (the usual Aperio SVS and generic
pyramidal TIFF) is read by decoding exactly the tiles a region touches, straight from
the file with tifffile's own decoder for that page; this skips the zarr machinery,
which costs more per tile than the JPEG decode itself. Tiles the file leaves out
(offset or byte count 0) are white, as in OpenSlide. Any other layout (strips,
multi-page or composited levels) goes through tiffslide's zarr store.

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

from ._mpp import build_slide_info
from ._tiff import check_data_extent, series_pages
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
                    raise ValueError(f"tile {index} decodes to {tile.shape[1:3]}, too small for the level")
                dst[...] = part
        return out


class TiffSlideBackend:
    """One ``tiffslide.TiffSlide`` handle; plain tiled levels are decoded tile by tile."""

    name: ClassVar[str] = "tiffslide"

    def __init__(self, path: str) -> None:
        import tiffslide

        self._slide = tiffslide.TiffSlide(path)
        self._fd = -1
        try:
            series = self._slide.ts_tifffile.series[int(self._slide.properties["tiffslide.series-index"])]
            if series.dtype != np.uint8:
                raise ValueError(f"unsupported sample type {series.dtype}; expected 8-bit RGB")
            self._axes = str(self._slide.properties["tiffslide.series-axes"])
            if self._axes not in ("YXS", "YX"):
                raise ValueError(f"unsupported axes {self._axes!r}; expected a 2-D RGB or grey image")
            pages = series_pages(series)
            check_data_extent(path, pages)
            self.codecs = frozenset(int(p.compression) for p in pages)
            self.composited = self._slide.zarr_group.attrs.get("tiffslide.series-composition") is not None
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._levels: list[TiledLevel | None] = [
                TiledLevel(self._fd, level.pages[0])
                if not self.composited and len(level.pages) == 1 and TiledLevel.accepts(level.pages[0])
                else None
                for level in series.levels
            ]
        except Exception:
            self.close()
            raise
        self._info = build_slide_info(path, self.name, _version(), self._slide.level_dimensions,
                                      self._slide.level_downsamples, self._slide.properties)
        self.vendor = str(self._slide.properties.get("tiffslide.vendor") or "")

    @property
    def info(self) -> SlideInfo:
        return self._info

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3); out-of-bounds pixels are white."""
        w, h = max(int(size[0]), 0), max(int(size[1]), 0)
        out = np.full((h, w, 3), _WHITE, np.uint8)
        lw, lh = self._info.level_dimensions[level]
        x0, y0, x1, y1 = level_rect(location, self._info.level_downsamples[level], (w, h))
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, lw), min(y1, lh)
        if cx0 >= cx1 or cy0 >= cy1:
            return out
        tiled = self._levels[level] if level < len(self._levels) else None
        arr = tiled.read(cx0, cy0, cx1, cy1) if tiled is not None else self._zarr_read(level, cx0, cy0, cx1, cy1)
        if arr.ndim == 2:
            arr = arr[..., None]
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = arr[..., :3] if arr.shape[2] >= 3 else arr[..., :1]
        return out

    def _zarr_read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        from tiffslide._zarr import get_zarr_selection

        rows, cols = slice(y0, y1), slice(x0, x1)
        selection = (rows, cols, slice(None)) if self._axes == "YXS" else (rows, cols, ...)
        return np.asarray(get_zarr_selection(self._slide.zarr_group, selection=selection, level=level))

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
)
