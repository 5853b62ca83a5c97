"""Tissue segmentation on a low-resolution RGB image, and the tissue polygons.

The recipe (CLAM/wsinfer lineage, areas in physical units):

1. HSV saturation ``S = (max − min) / max`` (0..255); near-black pixels (``max <
   black_value``) and grey pixels (``max − min ≤ grey_spread``) are set to 0, because a
   dark pixel gets a high saturation from noise alone.
2. Threshold ``t``: Otsu on the histogram of ``log(1 + S)`` (never below ``otsu_floor``)
   or a fixed integer. The log keeps Otsu on the glass/tissue split: in linear units it
   often cuts between pale eosin and haematoxylin when tissue covers much of the slide.
3. Median blur of size k, then ``S > t``. Done exactly and fast as a rank test: the median
   of a k×k window exceeds ``t`` iff more than half of the window exceeds ``t``, i.e. a
   box filter of ``S > t`` is > 0.5 (same ``reflect`` border as ``scipy.ndimage``).
4. Morphological closing (square ``close_size``), edge-replicated so that tissue touching
   the image border is not eroded.
5. Connected objects (8-connectivity) smaller than ``min_tissue_area`` µm² are removed;
   holes (4-connected background not touching the border) smaller than ``min_hole_area``
   µm² are filled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..config import SegmentationParams

_logger = logging.getLogger(__name__)

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask, the µm/px of its pixels and the saturation threshold used."""

    mask: np.ndarray
    mpp: float
    threshold: int

    @property
    def area_um2(self) -> float:
        return float(self.mask.sum()) * self.mpp * self.mpp


def saturation(rgb: np.ndarray, black_value: int = 40, grey_spread: int = 12) -> np.ndarray:
    """HSV saturation as uint8 (0..255), with near-black and grey pixels set to 0."""
    rgb = np.asarray(rgb)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    spread = (mx - mn).astype(np.uint16)
    s = (spread * 255 + mx // 2) // np.maximum(mx, 1).astype(np.uint16)
    s = s.astype(np.uint8)
    s[(mx < black_value) | (spread <= grey_spread)] = 0
    return s


def otsu_threshold(values: np.ndarray, log: bool = True) -> int:
    """Otsu's threshold of a uint8 image (pixels ``> t`` form the upper class).

    With ``log`` (the default) the between-class variance is computed on ``log(1 + v)``:
    glass/tissue contrast in saturation is multiplicative, and in linear units Otsu tends to
    split pale eosin from haematoxylin when tissue covers much of the slide.
    """
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0 or np.count_nonzero(hist) < 2:
        return int(np.argmax(hist)) if total else 0
    levels = np.log1p(np.arange(256, dtype=np.float64)) if log else np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)  # pixels with value ≤ t
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / total - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return int(np.argmax(between))


def median_above(s: np.ndarray, threshold: int, size: int) -> np.ndarray:
    """``median_filter(s, size) > threshold`` computed as a box-filtered rank test."""
    above = np.asarray(s) > threshold
    if size <= 1:
        return above
    frac = ndi.uniform_filter(above.astype(np.float32), size=size, mode="reflect")
    return frac > 0.5


def close_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary closing with a ``size``×``size`` square; the border is edge-replicated."""
    if size <= 1:
        return mask
    pad = size
    padded = np.pad(mask, pad, mode="edge").view(np.uint8)
    # square structuring element: separable max/min filters (van Herk), much faster than binary_closing
    # an even size is off-centre: the erosion is shifted back so that this equals binary_closing
    closed = ndi.minimum_filter(ndi.maximum_filter(padded, size=size), size=size, origin=-(1 - size % 2))
    return closed[pad:-pad, pad:-pad].astype(bool)


def remove_small_objects(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop 8-connected objects with fewer than ``min_pixels`` pixels."""
    if min_pixels <= 1 or not mask.any():
        return mask
    labels, n = ndi.label(mask, structure=_EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_pixels: float) -> np.ndarray:
    """Fill 4-connected background regions not touching the border with < ``max_pixels`` pixels."""
    if max_pixels <= 0 or not mask.any():
        return mask
    labels, n = ndi.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes < max_pixels
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


def segment_tissue(rgb: np.ndarray, mpp: float, params: SegmentationParams | None = None) -> TissueMask:
    """Segment tissue in an RGB uint8 image whose pixels are ``mpp`` µm wide.

    Parameters
    ----------
    rgb : (h, w, 3) uint8 image, typically a slide level near 8 µm/px.
    mpp : µm per pixel of ``rgb``; converts the µm² area limits into pixels.
    params : thresholds and sizes; the defaults are documented on :class:`SegmentationParams`.

    Returns
    -------
    TissueMask with a (h, w) bool mask.
    """
    p = params or SegmentationParams()
    s = saturation(rgb, p.black_value, p.grey_spread)
    if p.threshold == "otsu":
        t = max(otsu_threshold(s), p.otsu_floor)
    else:
        t = int(p.threshold)
    mask = median_above(s, t, p.median_size)
    mask = close_mask(mask, p.close_size)
    px_area = mpp * mpp
    mask = remove_small_objects(mask, p.min_tissue_area / px_area)
    mask = fill_small_holes(mask, p.min_hole_area / px_area)
    _logger.debug("tissue: threshold %d, %d of %d px (%.3f)", t, int(mask.sum()), mask.size,
                  mask.mean() if mask.size else 0.0)
    return TissueMask(mask=mask, mpp=float(mpp), threshold=int(t))


def mask_to_polygons(
    mask: np.ndarray, scale: tuple[float, float] = (1.0, 1.0), simplify: float = 0.25
) -> list:
    """Tissue polygons (shapely) of a bool mask, in the mask's pixel-edge coordinates × ``scale``.

    A pixel (row r, column c) covers ``[c, c+1) × [r, r+1)`` before scaling; ``scale`` is
    (level-0 px per mask px in x, in y), so the polygons come out in level-0 pixels. One
    polygon per 8-connected object, with its holes; ``simplify`` (mask px) drops the
    collinear steps of the traced outline.
    """
    import shapely
    from shapely.geometry import MultiPolygon, Polygon
    from skimage.measure import find_contours

    sx, sy = float(scale[0]), float(scale[1])
    labels, n = ndi.label(mask, structure=_EIGHT)
    out: list = []
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        crop = np.pad(labels[sl] == k, 1).astype(np.float32)
        contours = find_contours(crop, 0.5, fully_connected="high")
        if not contours:
            continue
        r0, c0 = sl[0].start - 1 + 0.5, sl[1].start - 1 + 0.5
        rings = [np.column_stack([c[:, 1] + c0, c[:, 0] + r0]) for c in contours if len(c) >= 4]
        if not rings:
            continue
        areas = [abs(_shoelace(r)) for r in rings]
        shell_i = int(np.argmax(areas))
        holes = [r for i, r in enumerate(rings) if i != shell_i]
        poly = Polygon(rings[shell_i], holes)
        if simplify > 0:
            poly = poly.simplify(simplify, preserve_topology=True)
        if not poly.is_valid:
            poly = shapely.make_valid(poly)
        geoms = list(poly.geoms) if hasattr(poly, "geoms") else [poly]
        for g in geoms:
            if isinstance(g, (Polygon, MultiPolygon)) and not g.is_empty:
                out.append(shapely.affinity.scale(g, xfact=sx, yfact=sy, origin=(0.0, 0.0)))
    return out


def _shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


__all__ = [
    "TissueMask",
    "close_mask",
    "fill_small_holes",
    "mask_to_polygons",
    "median_above",
    "otsu_threshold",
    "remove_small_objects",
    "saturation",
    "segment_tissue",
]
