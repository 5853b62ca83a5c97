"""Region-batched patch reading.

Reading one ``read_region`` call per patch is what makes CLAM-style extractors slow: every
call decodes the same JPEG tiles again. Here neighbouring patches are grouped into
tile-aligned regions at the read level (``region_size`` px, default 2048), each region is
read once and the patches are cut out of it. Memory is bounded by one region per worker,
whatever the slide size.

Coordinates are level-0 top-left corners; a patch covers ``size`` pixels at ``level``
starting at ``floor(x / downsample)`` (tiffslide's convention). Patch corners need not be
multiples of the downsample (the tile stage does not snap them); the regions are read at
level-0 origins that are (:func:`level0_location`), so every backend returns the same
pixels and the patches are cut from those.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..errors import SlideReadError
from ..slide import Slide

_logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Region:
    """One read: ``origin``/``size`` at the read level, and the patches cut from it."""

    origin: tuple[int, int]  # (x, y) at the read level
    size: tuple[int, int]  # (w, h) at the read level
    indices: np.ndarray  # (k,) indices into the coords array
    offsets: np.ndarray  # (k, 2) (x, y) of each patch inside the region


@dataclass(frozen=True)
class ReadPlan:
    """How to read every patch of one slide."""

    level: int
    downsample: float
    patch_px: int  # patch width/height at the read level
    regions: tuple[Region, ...]

    @property
    def n_patches(self) -> int:
        return int(sum(len(r.indices) for r in self.regions))


def level_coords(coords: np.ndarray, downsample: float) -> np.ndarray:
    """Level-0 (x, y) → read-level pixel (x, y), floor convention."""
    return np.floor(np.asarray(coords, dtype=np.float64) / downsample + 1e-9).astype(np.int64)


def plan_regions(
    coords: np.ndarray,
    *,
    level: int,
    downsample: float,
    patch_px: int,
    region_size: int = 2048,
) -> ReadPlan:
    """Group patches into regions of at most ``region_size + patch_px`` px per side.

    A patch belongs to the region cell (of a global grid with cell ``region_size``) that
    holds its top-left corner; the region read is the bounding box of its patches, so a
    patch crossing a cell border is still read whole. Regions are ordered row-major, and
    patches inside a region keep their original order.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if region_size < patch_px:
        region_size = patch_px
    if len(coords) == 0:
        return ReadPlan(level, downsample, patch_px, ())
    lc = level_coords(coords, downsample)
    cell = lc // region_size
    order = np.lexsort((np.arange(len(lc)), cell[:, 0], cell[:, 1]))  # row-major cells, stable
    cells_sorted = cell[order]
    breaks = np.flatnonzero(np.any(np.diff(cells_sorted, axis=0) != 0, axis=1)) + 1
    regions = []
    for group in np.split(order, breaks):
        pts = lc[group]
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0) + patch_px
        regions.append(
            Region(
                origin=(int(x0), int(y0)),
                size=(int(x1 - x0), int(y1 - y0)),
                indices=group.astype(np.int64),
                offsets=(pts - np.array([x0, y0])).astype(np.int64),
            )
        )
    return ReadPlan(level, downsample, patch_px, tuple(regions))


def region_level0_origin(region: Region, downsample: float) -> tuple[int, int]:
    """Level-0 location whose floor-mapping at the read level is ``region.origin``."""
    return level0_location(region.origin, downsample)


def level0_location(level_xy: tuple[int, int], downsample: float) -> tuple[int, int]:
    """Level-0 location whose floor-mapping at the read level is the pixel ``level_xy``: on an
    exact integer downsample a multiple of it, so that no backend resamples."""
    x, y = level_xy
    return int(math.ceil(x * downsample - 1e-9)), int(math.ceil(y * downsample - 1e-9))


def read_region_patches(
    slide: Slide, plan: ReadPlan, region: Region, coords: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Patches (k, p, p, 3) uint8 of one region, and a (k,) bool mask of failed patches.

    The region is read once; if that fails (after the slide's own reopen-once), each
    patch is read on its own and those that still fail are marked failed. A failed patch's
    rows are zeros, a placeholder only: callers leave failed patches out (never embed them).
    """
    p = plan.patch_px
    k = len(region.indices)
    out = np.zeros((k, p, p, 3), dtype=np.uint8)
    failed = np.zeros(k, dtype=bool)
    try:
        pixels = slide.read_region(region_level0_origin(region, plan.downsample), plan.level, region.size)
        for j, (ox, oy) in enumerate(region.offsets):
            out[j] = pixels[oy : oy + p, ox : ox + p]
        return out, failed
    except SlideReadError as e:
        _logger.debug("%s; reading the %d patches of this region one by one", e, k)  # embed warns once per slide
    for j, idx in enumerate(region.indices):
        x, y = coords[idx]
        ox, oy = region.offsets[j]  # the same level pixels as the region read, not the raw coords
        at = level0_location((region.origin[0] + int(ox), region.origin[1] + int(oy)), plan.downsample)
        try:
            out[j] = slide.read_region(at, plan.level, (p, p))
        except SlideReadError as e:
            failed[j] = True
            _logger.debug("patch at (%d, %d) unreadable, left out: %s", x, y, e)
    return out, failed
