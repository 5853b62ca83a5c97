"""Write pyramidal TIFF slides (Aperio-SVS or generic layout) that openslide and tiffslide open.

Used by tests, benchmarks and the synthetic-slide generator. The source is either an RGB
``uint8`` array or a :class:`TileSource` (a callable ``(x, y, w, h) -> RGB`` plus the
full size), so that huge slides are written strip by strip without holding level 0 in
memory. Level 0 is read from the source exactly once; the first reduced level is
accumulated by area-averaging while level 0 is written (in memory, or in a temporary
memory-mapped file beside the output when large), and every further level is
area-averaged from the one before.

>>> write_slide("x.svs", rgb, mpp=0.25, levels=(1, 4, 16))      # doctest: +SKIP
>>> src = TileSource(lambda x, y, w, h: render(x, y, w, h), 100_000, 80_000)
>>> write_slide("huge.tif", src, layout="generic", mpp=0.5)      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from ..errors import ConfigError
from ..store.atomic import atomic_path

_logger = logging.getLogger(__name__)

TileFn = Callable[[int, int, int, int], np.ndarray]

#: Reduced levels larger than this are accumulated in a memory-mapped temporary file.
MEMMAP_THRESHOLD_BYTES = 512 * 2**20
#: Longest side of the SVS thumbnail page.
THUMBNAIL_MAX_SIDE = 1024
#: Widest single call to a tile source when reading a level-0 strip.
_MAX_READ_WIDTH = 8192
_LAYOUTS = ("svs", "generic")
_COMPRESSIONS: dict[str | None, tuple[str | None, dict[str, int] | None]] = {
    "jpeg": ("jpeg", None),  # compressionargs filled with the quality
    "deflate": ("adobe_deflate", {"level": 6}),
    None: (None, None),
}


@dataclass(frozen=True)
class TileSource:
    """Pixels produced on demand: ``read(x, y, w, h)`` returns RGB ``uint8`` (h, w, 3)."""

    read: TileFn
    width: int
    height: int


def write_slide(
    path: str | os.PathLike[str],
    image_or_tile_source: np.ndarray | TileSource | TileFn,
    *,
    size: tuple[int, int] | None = None,
    mpp: float | None = 0.5,
    layout: str = "svs",
    tile_size: int = 256,
    compression: str | None = "jpeg",
    quality: int = 90,
    levels: Sequence[int] | str = "auto",
    thumbnail: bool = True,
    objective_power: float | None = None,
    maxworkers: int | None = None,
) -> Path:
    """Write a tiled pyramidal TIFF atomically and return its path.

    Parameters
    ----------
    path : output file (``.svs``, ``.tif``...); written via a temp file and a rename.
    image_or_tile_source : RGB ``uint8`` array (h, w, 3), a :class:`TileSource`, or a
        bare callable ``(x, y, w, h) -> RGB`` together with ``size=(width, height)``.
    mpp : µm per level-0 pixel, or ``None`` for a slide without physical resolution (no
        ``MPP`` field; only the unitless 1/1 XResolution that baseline TIFF requires).
    layout : ``"svs"`` (Aperio description with ``MPP``/``AppMag``, thumbnail as the second
        page) or ``"generic"`` (resolution tags in centimetres, reduced pages flagged).
    tile_size : tile edge in pixels, a multiple of 16.
    compression : ``"jpeg"`` (RGB, 4:2:0, ``quality``), ``"deflate"`` or ``None``.
    levels : downsample factors starting with 1, each an integer multiple of the previous
        (e.g. ``(1, 4, 16)``), or ``"auto"`` (×4 steps while the level is at least a tile).
        The generic layout needs a constant step of 2, 3 or 4 (what tiffslide recognises).
    thumbnail : SVS only: add the stripped thumbnail page that Aperio files carry.
    objective_power : written as ``AppMag`` (SVS); defaults to ``10 / mpp`` rounded.
    maxworkers : threads tifffile may use to compress tiles (``None``: its default).
    """
    source = _as_source(image_or_tile_source, size)
    downsamples = _check_args(source, mpp, layout, tile_size, compression, quality, levels)
    if objective_power is None and mpp is not None:
        objective_power = float(round(10.0 / mpp))
    codec, codec_args = _COMPRESSIONS[compression]
    if compression == "jpeg":
        codec_args = {"level": int(quality)}
    raw_bytes = source.width * source.height * 3 * 4 // 3
    dims = [(_ceil_div(source.width, d), _ceil_div(source.height, d)) for d in downsamples]
    common = dict(
        photometric="rgb", compression=codec, compressionargs=codec_args, metadata=None, software=False,
        maxworkers=maxworkers,
    )
    final = Path(path)
    with atomic_path(final) as tmp, tempfile.TemporaryDirectory(prefix=".wsi-write-", dir=final.parent) as scratch:
        with tifffile.TiffWriter(tmp, bigtiff=raw_bytes > 2**31 - 2**26) as tw:
            reduced: list[np.ndarray] = []
            if len(dims) > 1:
                reduced.append(_reduced_buffer(dims[1], scratch, "level1"))
            reducer = _RowReducer(downsamples[1], reduced[0]) if reduced else None
            tw.write(
                _level0_tiles(source, tile_size, reducer), shape=(source.height, source.width, 3),
                dtype=np.uint8, tile=(tile_size, tile_size),
                description=_level_description(layout, dims, 0, tile_size, compression, quality, mpp,
                                               objective_power),
                **_resolution(layout, mpp, 1), **common,
            )
            for k in range(2, len(dims)):  # each at most a quarter of level 1
                reduced.append(_reduced_buffer(dims[k], scratch, f"level{k}"))
                _reduce_array(reduced[-2], downsamples[k] // downsamples[k - 1], reduced[-1])
            if layout == "svs" and thumbnail:
                thumb = _thumbnail(reduced, source)
                tw.write(
                    thumb, rowsperstrip=16,
                    description=_svs_header(dims[0]) + f" -> {thumb.shape[1]}x{thumb.shape[0]} - ",
                    **common,
                )
            for k, level in enumerate(reduced, start=1):
                tw.write(
                    _array_tiles(level, tile_size), shape=level.shape, dtype=np.uint8,
                    tile=(tile_size, tile_size), subfiletype=1 if layout == "generic" else 0,
                    description=_level_description(layout, dims, k, tile_size, compression, quality, mpp,
                                                   objective_power),
                    **_resolution(layout, mpp, downsamples[k]), **common,
                )
    _logger.debug("wrote %s: %s levels %s", final, layout, dims)
    return final


def corrupt_tile(path: str | os.PathLike[str], *, page: int = 0, tile_xy: tuple[int, int] = (0, 0)) -> None:
    """Overwrite one tile's bytes in place with zeros, so that decoding it fails.

    ``tile_xy`` is the (column, row) of the tile in TIFF page ``page`` (page 0 = level 0).
    Meant for tests: the file is edited in place, not atomically.
    """
    with tifffile.TiffFile(path) as tf:
        p = tf.pages[page]
        if not p.is_tiled:
            raise ConfigError(f"{path}: page {page} is not tiled; cannot corrupt a tile")
        ntx = _ceil_div(p.imagewidth, p.tilewidth)
        index = tile_xy[1] * ntx + tile_xy[0]
        offset, nbytes = p.dataoffsets[index], p.databytecounts[index]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * nbytes)


def write_corrupt_tile_slide(
    path: str | os.PathLike[str],
    image_or_tile_source: np.ndarray | TileSource | TileFn,
    *,
    tile_xy: tuple[int, int] = (0, 0),
    **kwargs: object,
) -> Path:
    """:func:`write_slide`, then make level-0 tile ``tile_xy`` (column, row) unreadable."""
    out = write_slide(path, image_or_tile_source, **kwargs)  # type: ignore[arg-type]
    corrupt_tile(out, page=0, tile_xy=tile_xy)
    return out


# -- area averaging ---------------------------------------------------------------------
def area_downsample(arr: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``×``factor`` blocks, rounded half up; a partial edge block averages
    its valid pixels. ``arr`` is uint8 (h, w) or (h, w, c)."""
    if factor == 1:
        return np.ascontiguousarray(arr)
    pil_ok = factor & (factor - 1) == 0 and arr.dtype == np.uint8 and (arr.ndim == 2 or arr.shape[2] in (1, 3))
    h, w = arr.shape[:2]
    fh, fw = h // factor, w // factor
    if not pil_ok or fh == 0 or fw == 0:
        return _area_downsample_numpy(arr, factor)
    # Pillow's box reduction is fast and gives exact rounded means for full power-of-two
    # blocks; the partial edge blocks (other counts) go through the numpy path.
    from PIL import Image

    out = np.empty((_ceil_div(h, factor), _ceil_div(w, factor), *arr.shape[2:]), np.uint8)
    full = np.ascontiguousarray(arr[: fh * factor, : fw * factor])
    img = Image.fromarray(full[..., 0] if full.ndim == 3 and full.shape[2] == 1 else full)
    out[:fh, :fw] = np.asarray(img.reduce(factor)).reshape(fh, fw, *arr.shape[2:])
    if fh * factor < h:
        out[fh:] = _area_downsample_numpy(arr[fh * factor :], factor)
    if fw * factor < w:
        out[:fh, fw:] = _area_downsample_numpy(arr[: fh * factor, fw * factor :], factor)
    return out


def _area_downsample_numpy(arr: np.ndarray, factor: int) -> np.ndarray:
    h, w = arr.shape[:2]
    oh, ow = _ceil_div(h, factor), _ceil_div(w, factor)
    ph, pw = oh * factor - h, ow * factor - w
    if ph or pw:
        arr = np.pad(arr, ((0, ph), (0, pw)) + ((0, 0),) * (arr.ndim - 2))
    acc = np.uint16 if factor * factor * 255 < 2**16 else np.uint32
    cols = arr[:, 0::factor].astype(acc)
    for i in range(1, factor):
        cols += arr[:, i::factor]
    sums = cols[0::factor].copy()
    for i in range(1, factor):
        sums += cols[i::factor]
    counts = np.multiply.outer(
        np.minimum(factor, h - np.arange(oh) * factor), np.minimum(factor, w - np.arange(ow) * factor)
    ).astype(acc).reshape(oh, ow, *([1] * (arr.ndim - 2)))
    return ((sums + counts // 2) // counts).astype(np.uint8)


class _RowReducer:
    """Area-averages strips of rows fed top to bottom into ``out`` (rows of ``factor``)."""

    def __init__(self, factor: int, out: np.ndarray) -> None:
        self.factor, self.out, self.row = factor, out, 0
        self.pending: np.ndarray | None = None

    def feed(self, strip: np.ndarray, last: bool = False) -> None:
        if self.pending is not None:
            strip = np.concatenate([self.pending, strip], axis=0)
        usable = strip.shape[0] if last else strip.shape[0] - strip.shape[0] % self.factor
        if usable:
            reduced = area_downsample(strip[:usable], self.factor)
            self.out[self.row : self.row + reduced.shape[0]] = reduced
            self.row += reduced.shape[0]
        self.pending = strip[usable:] if usable < strip.shape[0] else None


def _reduce_array(src: np.ndarray, factor: int, out: np.ndarray) -> None:
    rows = max(factor, (2048 // factor) * factor)
    reducer = _RowReducer(factor, out)
    for y in range(0, src.shape[0], rows):
        reducer.feed(np.asarray(src[y : y + rows]), last=y + rows >= src.shape[0])


# -- tile iterators -----------------------------------------------------------------------
def _level0_tiles(source: TileSource, ts: int, reducer: _RowReducer | None) -> Iterator[np.ndarray]:
    for y in range(0, source.height, ts):
        h = min(ts, source.height - y)
        strip = _read_strip(source, y, h)
        if reducer is not None:
            reducer.feed(strip, last=y + h >= source.height)
        yield from _strip_tiles(strip, ts)


def _array_tiles(arr: np.ndarray, ts: int) -> Iterator[np.ndarray]:
    for y in range(0, arr.shape[0], ts):
        yield from _strip_tiles(np.asarray(arr[y : y + ts]), ts)


def _strip_tiles(strip: np.ndarray, ts: int) -> Iterator[np.ndarray]:
    h, w = strip.shape[:2]
    for x in range(0, w, ts):
        tile = strip[:, x : x + ts]
        if tile.shape[0] != ts or tile.shape[1] != ts:  # edge tile: replicate the edge (no JPEG bleed)
            tile = np.pad(tile, ((0, ts - tile.shape[0]), (0, ts - tile.shape[1]), (0, 0)), mode="edge")
        yield np.ascontiguousarray(tile)


def _read_strip(source: TileSource, y: int, h: int) -> np.ndarray:
    parts = []
    for x in range(0, source.width, _MAX_READ_WIDTH):
        w = min(_MAX_READ_WIDTH, source.width - x)
        part = np.asarray(source.read(x, y, w, h))
        if part.shape != (h, w, 3) or part.dtype != np.uint8:
            raise ConfigError(
                f"tile source returned {part.dtype} {part.shape} for (x={x}, y={y}, w={w}, h={h}); "
                f"it must return uint8 ({h}, {w}, 3)"
            )
        parts.append(part)
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _read_all(source: TileSource) -> np.ndarray:
    return _read_strip(source, 0, source.height)


# -- helpers ------------------------------------------------------------------------------
def _as_source(obj: np.ndarray | TileSource | TileFn, size: tuple[int, int] | None) -> TileSource:
    if isinstance(obj, TileSource):
        return obj
    if callable(obj):
        if size is None:
            raise ConfigError("a tile-source callable needs size=(width, height)")
        return TileSource(obj, int(size[0]), int(size[1]))
    arr = np.asarray(obj)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8 or 0 in arr.shape:
        raise ConfigError(f"image must be a non-empty RGB uint8 array (h, w, 3), got {arr.dtype} {arr.shape}")
    return TileSource(lambda x, y, w, h: arr[y : y + h, x : x + w], arr.shape[1], arr.shape[0])


def _check_args(
    source: TileSource, mpp: float | None, layout: str, tile_size: int, compression: str | None,
    quality: int, levels: Sequence[int] | str,
) -> list[int]:
    if source.width <= 0 or source.height <= 0:
        raise ConfigError(f"slide size must be positive, got {source.width}x{source.height}")
    if layout not in _LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; use one of {', '.join(_LAYOUTS)}")
    if compression not in _COMPRESSIONS:
        raise ConfigError(f"unknown compression {compression!r}; use jpeg, deflate or None")
    if tile_size <= 0 or tile_size % 16:
        raise ConfigError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be in 1..100, got {quality}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"mpp must be a positive number or None, got {mpp}")
    if isinstance(levels, str):
        if levels != "auto":
            raise ConfigError(f"levels must be 'auto' or a sequence of downsamples, got {levels!r}")
        ds = [1]
        while max(source.width, source.height) / (ds[-1] * 4) >= tile_size:
            ds.append(ds[-1] * 4)
        return ds
    ds = [int(d) for d in levels]
    if not ds or ds[0] != 1 or any(b <= a or b % a for a, b in zip(ds, ds[1:], strict=False)):
        raise ConfigError(f"levels must start at 1 and each be a multiple of the previous, got {tuple(levels)}")
    steps = {b // a for a, b in zip(ds, ds[1:], strict=False)}
    if layout == "generic" and (len(steps) > 1 or not steps <= {2, 3, 4}):
        # tifffile (hence tiffslide) only chains generic pages into one pyramid at a constant 2, 3 or 4
        raise ConfigError(
            f"generic layout needs one constant step of 2, 3 or 4 between levels, got {tuple(levels)}"
        )
    return ds


def _reduced_buffer(dims: tuple[int, int], scratch: str, name: str) -> np.ndarray:
    shape = (dims[1], dims[0], 3)
    if math.prod(shape) <= MEMMAP_THRESHOLD_BYTES:
        return np.empty(shape, np.uint8)
    return np.lib.format.open_memmap(os.path.join(scratch, f"{name}.npy"), mode="w+", dtype=np.uint8, shape=shape)


def _thumbnail(reduced: list[np.ndarray], source: TileSource) -> np.ndarray:
    """Area-average the smallest level that is still at least the thumbnail size."""
    big = [a for a in reduced if max(a.shape[:2]) >= THUMBNAIL_MAX_SIDE]
    level = big[-1] if big else (reduced[-1] if reduced else _read_all(source))
    factor = _ceil_div(max(level.shape[:2]), THUMBNAIL_MAX_SIDE)
    if factor <= 1:
        return np.ascontiguousarray(level)
    out = np.empty((_ceil_div(level.shape[0], factor), _ceil_div(level.shape[1], factor), 3), np.uint8)
    _reduce_array(level, factor, out)
    return out


def _svs_header(dims0: tuple[int, int]) -> str:
    return f"Aperio Image Library v12.0.0\r\n{dims0[0]}x{dims0[1]}"


def _level_description(
    layout: str, dims: list[tuple[int, int]], k: int, ts: int, compression: str | None, quality: int,
    mpp: float | None, objective_power: float | None,
) -> str | None:
    if layout != "svs":
        return None
    w, h = dims[0]
    codec = {"jpeg": f"JPEG/RGB Q={quality}", "deflate": "Deflate/RGB", None: "Raw/RGB"}[compression]
    head = (f"{_svs_header(dims[0])} [0,0 {w}x{h}] ({ts}x{ts}) {codec}" if k == 0
            else f"{_svs_header(dims[0])} -> {dims[k][0]}x{dims[k][1]} - ({ts}x{ts}) {codec}")
    fields = []
    if objective_power is not None:
        fields.append(f"AppMag = {objective_power:g}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:.6g}")
    return "|".join([head, *fields])


def _resolution(layout: str, mpp: float | None, downsample: int) -> dict[str, object]:
    if layout != "generic" or mpp is None:
        return {}
    per_cm = 1e4 / (mpp * downsample)
    return {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["TileSource", "area_downsample", "corrupt_tile", "write_corrupt_tile_slide", "write_slide"]
