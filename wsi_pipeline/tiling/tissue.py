"""Tissue segmentation on a low-resolution RGB image, and the tissue polygons.

The recipe (CLAM/wsinfer lineage, judged relative to the slide's own glass, areas in
physical units):

1. Glass colour ``g`` (``background="auto"``, :func:`estimate_glass`): the per-channel
   median of the brightest 2 % of the pixels by R + G + B (pure white, i.e. padding or
   clipping, left out): bare glass, lumens and fat, whatever the glass's tint. A slide
   85 % covered by tissue still has plenty; with under ~1 % of glass the brightest pixels
   are the palest tissue, so the tint corrected for is capped at an HSV saturation of 24
   (more than glass has, less than pale eosin), and an estimate darker than 150 in a
   channel is replaced by white. ``background`` can also be ``white`` (the plain
   saturation of earlier versions) or a fixed ``#rrggbb``.
2. White balance to the glass, ``b = I · 255 / g`` (a 256-entry table per channel, clipped),
   and HSV saturation ``S = (max − min) / max`` (0..255) of ``b``, i.e. the stain's
   chroma relative to the glass: ``S = 255 (1 − exp(−(OD_max − OD_min)))`` with the optical
   density ``OD_c = −ln(I_c / g_c)``. Tinted glass has ``S ≈ 0``, and so has glass dimmed
   by an illumination fall-off (a neutral factor cancels in the ratio), so neither needs a
   background field (a coloured fall-off does: measured, corners 4 % bluer than the centre
   pass, 8 % do not). Near-black pixels (``max(b) < black_value``) and grey ones
   (``max(b) − min(b) ≤ grey_spread``) get 0: a dark pixel is saturated by noise alone.
3. Marker ink gets 0 (``reject_ink``, :func:`ink_pixels`): H&E is pink to purple (green is
   its most absorbed channel); green, cyan and blue inks are not, and black ink is dark
   and nearly neutral.
4. Threshold ``t``: Otsu on the histogram of ``log(1 + S)`` (never below ``otsu_floor``)
   or a fixed integer. The log keeps Otsu on the glass/tissue split: in linear units it
   often cuts between pale eosin and haematoxylin when tissue covers much of the slide.
   With the glass at ``S = 0``, Otsu's cut usually lies below the floor of 8, which then
   decides (an OD spread of 0.03: 60 %-faded eosin is above it).
5. Median blur of size k, then ``S > t``. Done exactly and fast as a rank test: the median
   of a k×k window exceeds ``t`` iff more than half of the window exceeds ``t``, i.e. a
   box filter of ``S > t`` is > 0.5 (same ``reflect`` border as ``scipy.ndimage``).
6. Morphological closing (square ``close_size``), edge-replicated so that tissue touching
   the image border is not eroded.
7. Connected objects (8-connectivity) smaller than ``min_tissue_area`` µm² are removed;
   holes (4-connected background not touching the border) smaller than ``min_hole_area``
   µm² are filled.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..config import SegmentationParams

_logger = logging.getLogger(__name__)

_EIGHT = np.ones((3, 3), dtype=bool)

WHITE = (255, 255, 255)
#: Share of the pixels, the brightest by R + G + B, whose median colour is the glass estimate.
GLASS_QUANTILE = 0.02
#: A glass estimate darker than this in any channel is no glass (white is used instead).
GLASS_MIN_VALUE = 150
#: The most HSV saturation (0..255) a glass estimate is corrected for: tinted glass has up to
#: ≈ 15 (the demo slides' glass: 0–14); a more saturated estimate is pale tissue on a slide
#: with little glass, and is moved towards grey until it has this saturation.
GLASS_MAX_SATURATION = 24
#: Black ink: darker than this (max channel of the glass-balanced picture) and less saturated
#: than ``INK_DARK_SATURATION``, i.e. every channel's OD above 0.94 and their spread below 0.5.
INK_DARK_VALUE = 100
INK_DARK_SATURATION = 100
#: Pixels sampled for the glass estimate, at most (a regular grid).
_GLASS_SAMPLE = 1 << 20
#: Pixels within this many levels (every channel) of the brightest pixels' median are the glass
#: cluster whose median is the estimate (the brightest 2 % alone are biased by noise).
_GLASS_TOLERANCE = 8
#: Rows per band of :func:`relative_saturation`.
_BAND = 64


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask, the µm/px of its pixels, the saturation threshold and glass colour used."""

    mask: np.ndarray
    mpp: float
    threshold: int
    glass: tuple[int, int, int] = WHITE

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


def estimate_glass(rgb: np.ndarray, quantile: float = GLASS_QUANTILE) -> tuple[int, int, int] | None:
    """The glass colour of a slide picture, or ``None`` when there is nothing bright enough to be glass.

    The per-channel median of the brightest ``quantile`` of the pixels (by R + G + B; pure
    white is padding or clipping and is left out): bare glass, and on a slide mostly covered
    by tissue its lumens, fat and the scarce glass left, all of which show the glass colour.
    It is refined to the median of every pixel within ``_GLASS_TOLERANCE`` levels of it (the
    brightest pixels alone are biased by noise). About 1 % of glass is enough. With less,
    the brightest pixels are the palest tissue, so the estimate's saturation is capped at
    ``GLASS_MAX_SATURATION`` (more than any glass has) and pale tissue keeps most of its
    colour. ``None`` when the estimate is darker than ``GLASS_MIN_VALUE`` in a channel or
    the picture is all pure white.
    """
    rgb = np.asarray(rgb)
    if rgb.size == 0:
        return None
    step = max(1, math.isqrt(rgb.shape[0] * rgb.shape[1] // _GLASS_SAMPLE))
    pixels = np.ascontiguousarray(rgb[::step, ::step]).reshape(-1, 3)  # ≤ ~1 M: plenty for a 2 % quantile
    y = pixels[:, 0].astype(np.uint16) + pixels[:, 1] + pixels[:, 2]
    usable = y < 765  # pure white is padding (unscanned or unreadable areas) or clipping: no tint to learn
    if not usable.any():
        return None
    level = np.quantile(y[usable], 1.0 - quantile, method="higher")
    glass = _channel_medians(pixels[usable & (y >= level)])
    near = usable
    for c in range(3):  # the whole glass cluster around the brightest pixels' median
        near = near & (np.abs(np.arange(256) - glass[c]) <= _GLASS_TOLERANCE)[pixels[:, c]]
    if near.any():
        glass = _channel_medians(pixels[near])
    if glass.min() < GLASS_MIN_VALUE:
        return None
    r, g, b = (int(round(v)) for v in _cap_saturation(glass))
    return r, g, b


def _channel_medians(pixels: np.ndarray) -> np.ndarray:
    """Per-channel median (the lower one of an even count) of (N, 3) uint8 pixels, as float."""
    out = np.empty(3, dtype=np.float64)
    for c in range(3):
        cum = np.cumsum(np.bincount(pixels[:, c], minlength=256))
        out[c] = np.searchsorted(cum, (cum[-1] + 1) // 2)
    return out


def _cap_saturation(glass: np.ndarray) -> np.ndarray:
    """``glass`` moved towards grey (its maximum kept) until its HSV saturation is at most
    ``GLASS_MAX_SATURATION``: the tint of glass is corrected, the colour of a stain is not."""
    mx, mn = float(glass.max()), float(glass.min())
    sat = (mx - mn) * 255.0 / mx
    return glass if sat <= GLASS_MAX_SATURATION else mx - (mx - glass) * (GLASS_MAX_SATURATION / sat)


def glass_colour(rgb: np.ndarray, background: str = "auto") -> tuple[int, int, int]:
    """The glass colour a picture is judged against: estimated (``auto``), white, or ``#rrggbb``."""
    if background == "white":
        return WHITE
    if background != "auto":
        return parse_hex_colour(background)
    glass = estimate_glass(rgb)
    if glass is None:
        _logger.info("no glass found (nothing bright enough for glass); judging tissue against white")
        return WHITE
    return glass


def parse_hex_colour(text: str) -> tuple[int, int, int]:
    """``"#ebf0fa"`` → ``(235, 240, 250)``; :class:`ValueError` when it is not ``#rrggbb``."""
    t = text.strip().lstrip("#")
    if len(t) != 6 or any(ch not in "0123456789abcdefABCDEF" for ch in t):
        raise ValueError(f"not a #rrggbb colour: {text!r}")
    return int(t[0:2], 16), int(t[2:4], 16), int(t[4:6], 16)


def white_balance(rgb: np.ndarray, glass: tuple[int, int, int]) -> np.ndarray:
    """``rgb · 255 / glass`` per channel, rounded and clipped to uint8 (glass becomes white)."""
    rgb = np.asarray(rgb)
    if tuple(glass) == WHITE:
        return rgb
    out = np.empty(rgb.shape, dtype=np.uint8)
    levels = np.arange(256, dtype=np.float32)
    for c, g in enumerate(glass):
        lut = np.clip(np.rint(levels * (255.0 / max(int(g), 1))), 0, 255).astype(np.uint8)
        np.take(lut, rgb[..., c], out=out[..., c])
    return out


def ink_pixels(balanced: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Marker ink in a glass-balanced picture (bool), given its saturation ``s`` (0 is never ink).

    - Green, cyan and blue ink: HSV hue between 75° and 225°, i.e. green is the largest
      channel (unless red exceeds blue by ¾ of the spread: yellow), or blue is the largest
      and green exceeds red by more than ¼ of the spread. H&E is pink to purple (hue 240°
      to 360°): green is its most absorbed channel, and haematoxylin's red and green are
      nearly equal, which the 15° margin below 240° leaves to tissue.
    - Black ink: darker than ``INK_DARK_VALUE`` and less saturated than
      ``INK_DARK_SATURATION`` (H&E that dark is strongly coloured).

    Limits: ink over tissue is caught only where the ink's colour dominates; red ink is
    indistinguishable from eosin. Pure haematoxylin that scans bluer than hue 225° (some
    scanners and protocols) is taken for ink, but at 8 µm/px every tissue pixel mixes in
    some eosin (measured: no patch lost on lymphoid tissue with such a haematoxylin and
    half the eosin); at ROI resolutions single nuclei can be. Black pigment is taken for
    black ink (small specks inside tissue are filled again as holes).
    """
    b = np.asarray(balanced)
    r, g, bl = (b[..., c].astype(np.int16) for c in range(3))
    mx = np.maximum(np.maximum(r, g), bl)
    spread = mx - np.minimum(np.minimum(r, g), bl)
    green_max = (g >= r) & (g >= bl) & (4 * (r - bl) < 3 * spread)
    blue_max = (bl > g) & (bl > r) & (4 * (g - r) > spread)
    dark = (mx < INK_DARK_VALUE) & (np.asarray(s) < INK_DARK_SATURATION)
    return ((green_max | blue_max) | dark) & (np.asarray(s) > 0)


def relative_saturation(
    rgb: np.ndarray, glass: tuple[int, int, int], black_value: int = 40, grey_spread: int = 8,
    reject_ink: bool = True,
) -> np.ndarray:
    """Saturation (uint8, (h, w)) of ``rgb`` white-balanced to ``glass``, with ink set to 0 when asked.

    A pixel is ink when :func:`ink_pixels` says so both against ``glass`` and against white,
    so that a glass estimate tinged with pink cannot turn haematoxylin blue. Computed in
    bands of rows, which keeps the temporaries in cache (≈ 1.6× as fast as whole-picture
    passes on a 3000 × 2500 picture).
    """
    rgb = np.asarray(rgb)
    out = np.empty(rgb.shape[:2], dtype=np.uint8)
    for y in range(0, rgb.shape[0], _BAND):
        out[y : y + _BAND] = _relative_saturation_band(rgb[y : y + _BAND], glass, black_value, grey_spread,
                                                       reject_ink)
    return out


def _relative_saturation_band(rgb: np.ndarray, glass: tuple[int, int, int], black_value: int, grey_spread: int,
                              reject_ink: bool) -> np.ndarray:
    """:func:`relative_saturation` of a band of rows."""
    balanced = white_balance(rgb, glass)
    s = saturation(balanced, black_value, grey_spread)
    if reject_ink:
        ink = ink_pixels(balanced, s)
        if balanced is not rgb and ink.any():  # and ink-coloured against white too
            at = np.nonzero(ink)
            raw = rgb[at]
            ink[at] = ink_pixels(raw, saturation(raw, 0, -1))
        s[ink] = 0
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
    TissueMask with a (h, w) bool mask, the threshold and the glass colour it was judged against.
    """
    p = params or SegmentationParams()
    glass = glass_colour(rgb, p.background)
    s = relative_saturation(rgb, glass, p.black_value, p.grey_spread, p.reject_ink)
    if p.threshold == "otsu":
        t = max(otsu_threshold(s), p.otsu_floor)
    else:
        t = int(p.threshold)
    mask = median_above(s, t, p.median_size)
    mask = close_mask(mask, p.close_size)
    px_area = mpp * mpp
    mask = remove_small_objects(mask, p.min_tissue_area / px_area)
    mask = fill_small_holes(mask, p.min_hole_area / px_area)
    _logger.debug("tissue: glass %s, threshold %d, %d of %d px (%.3f)", glass, t, int(mask.sum()), mask.size,
                  mask.mean() if mask.size else 0.0)
    return TissueMask(mask=mask, mpp=float(mpp), threshold=int(t), glass=glass)


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
    "estimate_glass",
    "fill_small_holes",
    "glass_colour",
    "ink_pixels",
    "mask_to_polygons",
    "median_above",
    "otsu_threshold",
    "parse_hex_colour",
    "relative_saturation",
    "remove_small_objects",
    "saturation",
    "segment_tissue",
    "white_balance",
]
