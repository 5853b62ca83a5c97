"""The global patch grid and the exact tissue fraction of every patch.

Level-0 geometry is in integers::

    patch_size_level0 = round(patch_size * target_mpp / mpp_level0)
    step_level0       = max(1, round(patch_size_level0 * (1 - overlap)))

The grid is anchored at level-0 (0, 0), so the same slide always gets the same patches
whatever its tissue, and patches from overlapping runs line up. Patches that would leave
the slide are dropped (no padding), except with ``pad_short_sides`` (used for ROI images):
a side shorter than one patch then gets one patch position at 0, and the part of that patch
beyond the image reads as white glass (and counts as glass in its tissue fraction).

Tissue fraction: the mask is a piecewise-constant function on the level-0 plane (each
mask pixel covers ``scale`` level-0 pixels). Its integral over ``[0, x] × [0, y]`` is
bilinear inside every mask pixel, so bilinear interpolation of the integral image gives
the exact tissue area of any axis-aligned box, fractional edges included, in four
vectorised look-ups per patch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridSpec:
    """Patch geometry in level-0 pixels."""

    patch_size_level0: int
    step_level0: int


def grid_spec(patch_size: int, target_mpp: float, mpp_level0: float, overlap: float = 0.0) -> GridSpec:
    """Level-0 patch size and step for ``patch_size`` px at ``target_mpp`` on a slide of ``mpp_level0``."""
    if mpp_level0 <= 0 or target_mpp <= 0:
        raise ConfigError(f"mpp must be positive (slide {mpp_level0}, target {target_mpp})")
    ps0 = int(round(patch_size * target_mpp / mpp_level0))
    if ps0 < 1:
        raise ConfigError(
            f"a {patch_size} px patch at {target_mpp} µm/px is below one pixel on a {mpp_level0} µm/px slide"
        )
    step = max(1, int(round(ps0 * (1.0 - overlap))))
    return GridSpec(ps0, step)


def grid_coords(width: int, height: int, spec: GridSpec, pad_short_sides: bool = False) -> np.ndarray:
    """Top-left (x, y) of every patch that lies fully inside a ``width``×``height`` level 0.

    With ``pad_short_sides``, a side shorter than one patch (but not empty) gets one position at 0.
    """
    ps, step = spec.patch_size_level0, spec.step_level0

    def positions(size: int) -> np.ndarray:
        if pad_short_sides and 0 < size < ps:
            return np.zeros(1, dtype=np.int64)
        return np.arange(0, max(size - ps + 1, 0), step, dtype=np.int64)

    xs, ys = positions(width), positions(height)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    return np.column_stack([gx.ravel(), gy.ravel()]).astype(np.int64, copy=False)


def integral_image(mask: np.ndarray) -> np.ndarray:
    """(h+1, w+1) cumulative sum with a zero first row and column."""
    m = np.asarray(mask)
    dtype = np.int32 if m.size < 2**31 else np.int64
    out = np.zeros((m.shape[0] + 1, m.shape[1] + 1), dtype=dtype)
    np.cumsum(m, axis=0, dtype=dtype, out=out[1:, 1:])
    np.cumsum(out[1:, 1:], axis=1, dtype=dtype, out=out[1:, 1:])
    return out


def _integral_at(ii: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact ∫∫ mask over [0, x] × [0, y] at fractional mask coordinates (clipped to the mask)."""
    h, w = ii.shape[0] - 1, ii.shape[1] - 1
    x = np.clip(x, 0.0, w)
    y = np.clip(y, 0.0, h)
    x0 = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
    y0 = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
    tx, ty = x - x0, y - y0
    a = ii[y0, x0].astype(np.float64)
    b = ii[y0, x0 + 1]
    c = ii[y0 + 1, x0]
    d = ii[y0 + 1, x0 + 1]
    return a * (1 - tx) * (1 - ty) + b * tx * (1 - ty) + c * (1 - tx) * ty + d * tx * ty


_ROUNDOFF = 1e-9  # far below one level-0 pixel of any patch; far above float64 round-off


def tissue_fractions(
    mask: np.ndarray, scale: tuple[float, float], coords: np.ndarray, patch_size_level0: int
) -> np.ndarray:
    """Exact tissue fraction (0..1) of each level-0 square patch.

    Parameters
    ----------
    mask : (h, w) bool tissue mask.
    scale : level-0 pixels per mask pixel, (x, y).
    coords : (N, 2) level-0 top-left (x, y).
    patch_size_level0 : patch edge in level-0 pixels.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if len(coords) == 0 or mask.size == 0:
        return np.zeros(len(coords), dtype=np.float64)
    sx, sy = float(scale[0]), float(scale[1])
    ii = integral_image(mask)
    x0, y0 = coords[:, 0] / sx, coords[:, 1] / sy
    x1, y1 = (coords[:, 0] + patch_size_level0) / sx, (coords[:, 1] + patch_size_level0) / sy
    area = (
        _integral_at(ii, x1, y1) - _integral_at(ii, x0, y1) - _integral_at(ii, x1, y0) + _integral_at(ii, x0, y0)
    )
    box = (x1 - x0) * (y1 - y0)
    frac = np.clip(area / box, 0.0, 1.0)
    # The differenced integral leaves round-off (~1e-16) where the mask scale is not an integer,
    # as on most real pyramids: glass must read 0, or `min_tissue 0` ("any tissue") keeps it.
    frac[frac < _ROUNDOFF] = 0.0
    frac[frac > 1.0 - _ROUNDOFF] = 1.0
    return frac


def select_patches(
    mask: np.ndarray,
    scale: tuple[float, float],
    level0_size: tuple[int, int],
    spec: GridSpec,
    min_tissue: float,
    pad_short_sides: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Grid patches whose tissue fraction is ≥ ``min_tissue`` (> 0 when ``min_tissue`` is 0).

    Returns ``(coords (N, 2) int64, fractions (N,) float32)`` in row-major grid order.
    Only candidates inside the mask's tissue bounding box are evaluated.
    """
    width, height = level0_size
    coords = grid_coords(width, height, spec, pad_short_sides)
    if len(coords) and mask.any():
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        sx, sy = scale
        bx0, bx1 = cols[0] * sx, (cols[-1] + 1) * sx
        by0, by1 = rows[0] * sy, (rows[-1] + 1) * sy
        ps = spec.patch_size_level0
        near = (
            (coords[:, 0] + ps > bx0) & (coords[:, 0] < bx1) & (coords[:, 1] + ps > by0) & (coords[:, 1] < by1)
        )
        coords = coords[near]
    else:
        coords = coords[:0]
    frac = tissue_fractions(mask, scale, coords, spec.patch_size_level0)
    keep = frac > 0 if min_tissue <= 0 else frac >= min_tissue - 1e-9
    _logger.debug("grid: %d candidates near tissue, %d kept (min_tissue %.3f)", len(coords), int(keep.sum()),
                  min_tissue)
    return coords[keep], frac[keep].astype(np.float32)


__all__ = ["GridSpec", "grid_coords", "grid_spec", "integral_image", "select_patches", "tissue_fractions"]
