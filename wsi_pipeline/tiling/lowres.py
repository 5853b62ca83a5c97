"""The low-resolution picture of a slide that tissue segmentation runs on.

Level choice: among the pyramid levels at least ``seg_mpp / 4`` µm/px (≥ 2 µm/px for the
default 8), the one closest to ``seg_mpp``; when the pyramid has none (a single-level or
shallow slide), the coarsest level. That level is read in chunks of at most
``chunk``×``chunk`` pixels (so level 0 of a huge non-pyramidal TIFF is never held whole),
several at once in threads, and each chunk is area-averaged by an integer factor
``round(seg_mpp / level_mpp)``, so segmentation always sees ≈ ``seg_mpp`` µm/px whatever the
pyramid.

A chunk that cannot be read is retried in small blocks; unreadable blocks become white
(glass, hence background) and are counted. Above ``max_unreadable`` of the slide area the
slide fails with :class:`SlideReadError`.

Before any read, :func:`check_seg_cost` refuses a slide whose picture would cost more than
any real slide does (a header claiming 10⁶ × 10⁶ px in a file of a few MB): one line, no
hour of decoding, no memory exhausted.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import SlideError, SlideReadError
from ..slide.base import SlideInfo
from ..slide.write import area_downsample

_logger = logging.getLogger(__name__)

#: Largest read, in level pixels per side.
CHUNK = 1024
#: Chunks read at once: OpenSlide's C library and imagecodecs' decoders release the GIL.
READ_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
#: Block size used to salvage a chunk whose read failed.
SALVAGE_BLOCK = 256
#: Most pixels segmentation may decode at the level it reads: a 220,000² px level without a
#: pyramid, minutes of decoding (a real 40× scan of a whole 75 × 25 mm slide is 3·10¹⁰ px).
MAX_SEG_DECODED_PIXELS = 5 * 10**10
#: Most pixels of the segmentation picture: 20,000² px (1.2 GB RGB), 160 mm a side at 8 µm/px,
#: twice the longest glass slide.
MAX_SEG_PICTURE_PIXELS = 4 * 10**8


@dataclass(frozen=True)
class LowRes:
    """An RGB picture of the whole slide and how it maps to level 0."""

    rgb: np.ndarray
    mpp: float
    scale: tuple[float, float]  # level-0 px per picture px (x, y)
    level: int
    factor: int
    unreadable_fraction: float


def choose_seg_level(info: SlideInfo, seg_mpp: float) -> tuple[int, int]:
    """``(level, factor)``: the level to read and the integer area-averaging factor."""
    mpps = [info.level_mpp(k) for k in range(info.level_count)]
    candidates = [k for k, m in enumerate(mpps) if m >= seg_mpp / 4.0]
    if candidates:
        level = min(candidates, key=lambda k: (abs(mpps[k] - seg_mpp), -mpps[k]))
    else:
        level = int(np.argmax(mpps))
    factor = max(1, int(round(seg_mpp / mpps[level])))
    # past the level's longer side every factor gives the same 1-px picture: no larger blocks
    return level, min(factor, max(info.level_dimensions[level]))


def check_seg_cost(info: SlideInfo, level: int, factor: int) -> None:
    """Raise :class:`SlideError` when reading ``level`` area-averaged by ``factor`` would decode
    more than :data:`MAX_SEG_DECODED_PIXELS` or make a picture above :data:`MAX_SEG_PICTURE_PIXELS`
    (checked before any read: the cost of segmentation follows from the header alone)."""
    lw, lh = info.level_dimensions[level]
    pw, ph = -(-lw // factor), -(-lh // factor)
    if lw * lh <= MAX_SEG_DECODED_PIXELS and pw * ph <= MAX_SEG_PICTURE_PIXELS:
        return
    (w0, h0), mpp = info.dimensions, info.mpp
    raise SlideError(
        f"too large to tile: the header says {w0}x{h0} px ({w0 * mpp / 1000:.0f} x {h0 * mpp / 1000:.0f} mm at "
        f"{mpp:.3g} µm/px); segmentation would decode {lw * lh:.1e} px at level {level} into a {pw}x{ph} picture "
        f"(limits {MAX_SEG_DECODED_PIXELS:.0e} and {MAX_SEG_PICTURE_PIXELS:.0e} px): a damaged header or no slide"
    )


def read_lowres(
    slide: object,
    info: SlideInfo,
    level: int,
    factor: int,
    *,
    chunk: int = CHUNK,
    max_unreadable: float = 0.05,
    threads: int | None = None,
) -> LowRes:
    """Read ``level`` of ``slide`` chunk by chunk, area-averaged by ``factor``.

    ``threads`` chunks are read at once (default :data:`READ_THREADS`): the decoders release
    the GIL, and each chunk writes only its own part of the picture, so the result is the
    same as one thread's.

    ``slide`` is a :class:`wsi_pipeline.slide.Slide` (anything with ``read_region``);
    ``info`` its metadata with the resolved mpp (file, CSV or default).
    """
    lw, lh = info.level_dimensions[level]
    w0, h0 = info.dimensions
    ds_x, ds_y = w0 / lw, h0 / lh
    ds = info.level_downsamples[level]
    step = max(factor, (chunk // factor) * factor)
    out = np.empty((-(-lh // factor), -(-lw // factor), 3), dtype=np.uint8)
    chunks = [(cx, cy, min(step, lw - cx), min(step, lh - cy)) for cy in range(0, lh, step) for cx in range(0, lw, step)]

    def reduce(src: object, c: tuple[int, int, int, int]) -> int:
        """Read and average one chunk into ``out`` through ``src``; the unreadable pixels salvaged."""
        cx, cy, w, h = c
        bad = 0
        try:
            region = _read(src, cx, cy, ds, level, w, h)
        except SlideReadError as e:
            _logger.warning("%s: chunk (%d, %d) at level %d unreadable (%s); salvaging in blocks",
                            info.path, cx, cy, level, e)
            region, bad = _salvage(src, cx, cy, ds, level, w, h, factor)
        out[cy // factor : cy // factor + -(-h // factor), cx // factor : cx // factor + -(-w // factor)] = (
            _block_mean(region, factor)
        )
        return bad

    bad_px = _map_chunks(slide, reduce, chunks, READ_THREADS if threads is None else max(1, int(threads)))
    unreadable = bad_px / float(lw * lh)
    if unreadable > max_unreadable:
        raise SlideReadError(
            f"{info.path}: {unreadable:.0%} of level {level} is unreadable (corrupt tiles); "
            "re-export or re-scan the slide"
        )
    return LowRes(
        rgb=out,
        mpp=info.level_mpp(level) * factor,
        scale=(ds_x * factor, ds_y * factor),
        level=level,
        factor=factor,
        unreadable_fraction=unreadable,
    )


def _map_chunks(slide: object, reduce: Callable[[object, tuple[int, int, int, int]], int],
                chunks: list[tuple[int, int, int, int]], threads: int) -> int:
    """Sum of ``reduce(slide, chunk)`` over ``chunks``, in ``threads`` threads when ``slide`` is a
    :class:`~wsi_pipeline.slide.Slide` whose backend reads in parallel. The first chunk is read on ``slide`` (a backend checks
    its fast path on its first read); every thread then reads through its own handle of the
    slide, so that a read error's reopen in one thread never closes another's handle."""
    from ..slide import Slide

    total = reduce(slide, chunks[0])
    rest = chunks[1:]
    if threads == 1 or len(rest) < 2 or not isinstance(slide, Slide) or not slide.parallel_reads:
        return total + sum(reduce(slide, c) for c in rest)
    local = threading.local()
    handles: list[Slide] = []
    lock = threading.Lock()

    def run(c: tuple[int, int, int, int]) -> int:
        src = getattr(local, "slide", None)
        if src is None:
            src = local.slide = copy.copy(slide)  # a Slide copies without its handle: it opens its own
            with lock:
                handles.append(src)
        return reduce(src, c)

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="seg-read")
    try:
        return total + sum(f.result() for f in [pool.submit(run, c) for c in rest])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for h in handles:
            h.close()


def _block_mean(region: np.ndarray, factor: int) -> np.ndarray:
    """:func:`area_downsample` without a full-size wide copy: the whole blocks are averaged in
    place (reduction buffers only); only the partial edge strips take the general path."""
    if factor == 1:
        return region
    h, w = region.shape[:2]
    hf, wf = h - h % factor, w - w % factor
    if (hf, wf) == (h, w) or hf == 0 or wf == 0:
        return area_downsample(region, factor)
    out = np.empty((-(-h // factor), -(-w // factor), region.shape[2]), dtype=np.uint8)
    out[: hf // factor, : wf // factor] = area_downsample(region[:hf, :wf], factor)
    if wf < w:
        out[: hf // factor, wf // factor :] = area_downsample(region[:hf, wf:], factor)
    if hf < h:
        out[hf // factor :] = area_downsample(region[hf:], factor)
    return out


def _read(slide: object, cx: int, cy: int, ds: float, level: int, w: int, h: int) -> np.ndarray:
    loc = (int(math.ceil(cx * ds)), int(math.ceil(cy * ds)))
    region = np.asarray(slide.read_region(loc, level, (w, h)))  # type: ignore[attr-defined]
    if region.shape != (h, w, 3):
        raise SlideReadError(f"backend returned {region.shape} for a ({h}, {w}, 3) read")
    return region


def _salvage(
    slide: object, cx: int, cy: int, ds: float, level: int, w: int, h: int, factor: int
) -> tuple[np.ndarray, int]:
    """Read a failed chunk in blocks; unreadable blocks are white. Returns (pixels, bad px)."""
    region = np.full((h, w, 3), 255, dtype=np.uint8)
    block = max(factor, (SALVAGE_BLOCK // factor) * factor)
    bad = 0
    for by in range(0, h, block):
        for bx in range(0, w, block):
            bw, bh = min(block, w - bx), min(block, h - by)
            try:
                region[by : by + bh, bx : bx + bw] = _read(slide, cx + bx, cy + by, ds, level, bw, bh)
            except SlideReadError:
                bad += bw * bh
    return region, bad


__all__ = ["MAX_SEG_DECODED_PIXELS", "MAX_SEG_PICTURE_PIXELS", "LowRes", "check_seg_cost", "choose_seg_level",
           "read_lowres"]
