"""Patch-similarity heatmaps painted on the slide thumbnail, with a colour bar.

Every patch paints its value over its own footprint on the thumbnail grid (overlapping
patches average), mapped through a viridis-like colour table and alpha-blended over the
thumbnail; uncovered pixels keep the thumbnail. A colour bar on the right is labelled with
the value range. Patches that could not be read (``failed_coords`` of the features file: no
score) are drawn as *missing*, not as a low value: where only such patches lie, opaque grey
diagonal stripes (:data:`MISSING_RGB`, every other :data:`HATCH_PX`-px band) hatch the
thumbnail, a colour that viridis never takes, and the colour-bar panel gains a hatched
"unread" swatch. Drawn with numpy + PIL only.

Thumbnail geometry: the ``tile`` stage renders the thumbnail from its segmentation picture,
whose pixel covers ``seg_mpp / mpp_level0`` level-0 pixels and whose width is
``ceil(level0_width / that)``; the thumbnail is that picture shrunk to fit
``thumbnail_max_side``. :func:`thumbnail_scale` inverts this from the coords attributes
(falling back to ``thumbnail size / level-0 size`` when they are absent).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_logger = logging.getLogger(__name__)

#: Viridis sampled at 9 evenly spaced points (0 → dark purple, 1 → yellow).
VIRIDIS_ANCHORS = (
    (68, 1, 84), (72, 40, 120), (62, 73, 137), (49, 104, 142), (38, 130, 142),
    (31, 158, 137), (53, 183, 121), (110, 206, 88), (253, 231, 37),
)
DEFAULT_ALPHA = 0.55
MIN_SIDE = 384  # small thumbnails are enlarged to at least this long side
BAR_PANEL = 72  # width of the colour-bar panel, px
BAR_WIDTH = 16
#: Patches without a score (unreadable): grey stripes, hatched over the thumbnail.
MISSING_RGB = (128, 128, 128)
HATCH_PX = 3
SWATCH_H = 10  # height of the "unread" legend swatch, px


def colormap_lut(anchors: Sequence[Sequence[int]] = VIRIDIS_ANCHORS, n: int = 256) -> np.ndarray:
    """``(n, 3)`` uint8 table: the anchor colours evenly spaced on [0, 1], linearly interpolated."""
    a = np.asarray(anchors, dtype=np.float64)
    pos = np.linspace(0.0, 1.0, len(a))
    t = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(t, pos, a[:, ch]) for ch in range(3)], axis=1).round().astype(np.uint8)


def apply_colormap(values: np.ndarray, lut: np.ndarray | None = None) -> np.ndarray:
    """Map values in [0, 1] (clipped; NaN → 0) to RGB uint8 through ``lut``."""
    lut = colormap_lut() if lut is None else lut
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    idx = np.clip(np.round(v * (len(lut) - 1)), 0, len(lut) - 1).astype(np.intp)
    return lut[idx]


def thumbnail_scale(coords_attrs: Mapping[str, Any], thumb_size: tuple[int, int]) -> tuple[float, float]:
    """Thumbnail pixels per level-0 pixel, ``(fx, fy)``, for a thumbnail of ``thumb_size`` (w, h)."""
    w0, h0 = float(coords_attrs["level0_width"]), float(coords_attrs["level0_height"])
    tw, th = thumb_size
    seg_mpp, mpp0 = coords_attrs.get("seg_mpp"), coords_attrs.get("mpp_level0")
    if seg_mpp and mpp0 and float(seg_mpp) > 0 and float(mpp0) > 0:
        s = float(seg_mpp) / float(mpp0)  # level-0 px per segmentation px
        return tw / (math.ceil(w0 / s - 1e-6) * s), th / (math.ceil(h0 / s - 1e-6) * s)
    return tw / w0, th / h0


def patch_boxes(coords: np.ndarray, patch_size_level0: float, scale: tuple[float, float],
                size: tuple[int, int]) -> np.ndarray:
    """``(N, 4)`` int pixel boxes ``x0, y0, x1, y1`` (end-exclusive, ≥ 1 px, clipped to ``size``)."""
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    fx, fy = scale
    w, h = size
    x0 = np.clip(np.round(c[:, 0] * fx), 0, max(w - 1, 0))
    y0 = np.clip(np.round(c[:, 1] * fy), 0, max(h - 1, 0))
    x1 = np.clip(np.maximum(x0 + 1, np.round((c[:, 0] + patch_size_level0) * fx)), 1, w)
    y1 = np.clip(np.maximum(y0 + 1, np.round((c[:, 1] + patch_size_level0) * fy)), 1, h)
    return np.column_stack([x0, y0, x1, y1]).astype(np.int64)


def paint_values(values: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Average ``values`` (N, C) over each pixel's covering boxes.

    Returns ``(grid (h, w, C) float64, covered (h, w) bool)``; uncovered pixels are 0.
    """
    vals = np.asarray(values, dtype=np.float64)
    vals = vals[:, None] if vals.ndim == 1 else vals
    w, h = size
    acc = np.zeros((h, w, vals.shape[1]))
    cnt = np.zeros((h, w))
    for (x0, y0, x1, y1), v in zip(boxes.tolist(), vals, strict=True):
        acc[y0:y1, x0:x1] += v
        cnt[y0:y1, x0:x1] += 1
    covered = cnt > 0
    acc[covered] /= cnt[covered][:, None]
    return acc, covered


def coverage(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` bool: the pixels inside any of ``boxes`` (from :func:`patch_boxes`)."""
    w, h = size
    out = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes.tolist():
        out[y0:y1, x0:x1] = True
    return out


def hatch(mask: np.ndarray, period: int = HATCH_PX) -> np.ndarray:
    """The pixels of ``mask`` on every other diagonal band ``period`` px wide (x + y direction)."""
    h, w = mask.shape
    yy, xx = np.indices((h, w))
    return mask & (((xx + yy) // period) % 2 == 0)


def render_heatmap(
    background: Any,
    grid: np.ndarray,
    covered: np.ndarray,
    vrange: tuple[float, float],
    *,
    alpha: float = DEFAULT_ALPHA,
    title: str | None = None,
    lut: np.ndarray | None = None,
    missing: np.ndarray | None = None,
) -> Any:
    """Blend one class's value ``grid`` (h, w) over ``background`` and add a labelled colour bar.

    Parameters
    ----------
    background : PIL image or (h, w, 3) uint8 array of the same size as ``grid``.
    grid, covered : from :func:`paint_values` (one class column).
    vrange : (low, high) value mapped to the ends of the colour table.
    missing : (h, w) bool, pixels of unread patches only (no score): hatched with
        :data:`MISSING_RGB` and explained by an "unread" swatch under the colour bar.

    Returns
    -------
    PIL.Image.Image
        RGB: the blended map (below an optional title strip) plus the colour-bar panel.
    """
    from PIL import Image, ImageDraw, ImageFont

    lut = colormap_lut() if lut is None else lut
    bg = np.asarray(background.convert("RGB") if hasattr(background, "convert") else background, dtype=np.float64)
    lo, hi = float(vrange[0]), float(vrange[1])
    span = hi - lo if hi - lo > 1e-12 else 1.0
    colors = apply_colormap((grid - lo) / span, lut).astype(np.float64)
    blended = np.where(covered[..., None], (1.0 - alpha) * bg + alpha * colors, bg)
    has_missing = missing is not None and bool(missing.any())
    if has_missing:
        blended[hatch(missing & ~covered)] = MISSING_RGB
    img = Image.fromarray(np.round(blended).astype(np.uint8))
    font = ImageFont.load_default()
    top = 18 if title else 0
    canvas = Image.new("RGB", (img.width + BAR_PANEL, max(img.height + top, 96)), (255, 255, 255))
    canvas.paste(img, (0, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), _ascii(title), fill=(0, 0, 0), font=font)
    bar_top, bar_bottom = top + 6, canvas.height - 6 - (SWATCH_H + 8 if has_missing else 0)
    ramp = np.linspace(1.0, 0.0, max(bar_bottom - bar_top, 2))[:, None].repeat(BAR_WIDTH, axis=1)
    bar = Image.fromarray(apply_colormap(ramp, lut))
    x_bar = img.width + 8
    canvas.paste(bar, (x_bar, bar_top))
    draw.rectangle((x_bar - 1, bar_top - 1, x_bar + BAR_WIDTH, bar_top + bar.height), outline=(0, 0, 0))
    for frac in (0.0, 0.5, 1.0):
        y = bar_top + round((1.0 - frac) * (bar.height - 1))
        draw.line((x_bar + BAR_WIDTH, y, x_bar + BAR_WIDTH + 3, y), fill=(0, 0, 0))
        draw.text((x_bar + BAR_WIDTH + 5, max(0, min(y - 5, canvas.height - 11))), f"{lo + frac * span:.3f}",
                  fill=(0, 0, 0), font=font)
    if has_missing:
        _missing_swatch(canvas, x_bar, bar_bottom + 8, font)
    return canvas


def _missing_swatch(canvas: Any, x: int, y: int, font: Any) -> None:
    """A hatched ``BAR_WIDTH`` × ``SWATCH_H`` box at (x, y) labelled "unread" (the legend of missing patches)."""
    from PIL import Image, ImageDraw

    white = np.full((SWATCH_H, BAR_WIDTH, 3), 255, dtype=np.uint8)
    white[hatch(np.ones((SWATCH_H, BAR_WIDTH), dtype=bool))] = MISSING_RGB
    canvas.paste(Image.fromarray(white), (x, y))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((x - 1, y - 1, x + BAR_WIDTH, y + SWATCH_H), outline=(0, 0, 0))
    draw.text((x + BAR_WIDTH + 5, y - 1), "unread", fill=(0, 0, 0), font=font)


def slide_heatmaps(
    thumbnail: Any | None,
    similarity: np.ndarray,
    coords: np.ndarray,
    coords_attrs: Mapping[str, Any],
    class_names: Sequence[str],
    *,
    slide_id: str = "",
    alpha: float = DEFAULT_ALPHA,
    missing_coords: np.ndarray | None = None,
) -> dict[str, Any]:
    """One heatmap image per class for a slide (shared value range, so classes compare).

    ``thumbnail`` is the tile stage's PIL thumbnail, or ``None`` for a white canvas. Small
    thumbnails are enlarged so the long side is at least :data:`MIN_SIDE` px.
    ``missing_coords`` (level-0 corners of the patches that could not be read) are hatched
    as missing where no scored patch covers them.
    """
    base, scale = heatmap_canvas(thumbnail, coords_attrs)
    size = float(coords_attrs["patch_size_level0"])
    sim = np.asarray(similarity, dtype=np.float64).reshape(len(coords), len(class_names))
    boxes = patch_boxes(coords, size, scale, base.size)
    grid, covered = paint_values(sim, boxes, base.size)
    missing = None
    if missing_coords is not None and len(missing_coords):
        missing = coverage(patch_boxes(missing_coords, size, scale, base.size), base.size)
    vrange = (float(sim.min()), float(sim.max())) if sim.size else (0.0, 1.0)
    return {
        c: render_heatmap(base, grid[..., i], covered, vrange, alpha=alpha, missing=missing,
                          title=f"{slide_id}  {c}: cosine similarity" if slide_id else c)
        for i, c in enumerate(class_names)
    }


def heatmap_canvas(thumbnail: Any | None, coords_attrs: Mapping[str, Any]) -> tuple[Any, tuple[float, float]]:
    """The heatmaps' background (the thumbnail, enlarged to :data:`MIN_SIDE`, or a white canvas)
    and its pixels per level-0 pixel ``(fx, fy)``."""
    from PIL import Image

    if thumbnail is None:
        w0, h0 = float(coords_attrs["level0_width"]), float(coords_attrs["level0_height"])
        f = min(1.0, 512.0 / max(w0, h0))
        base = Image.new("RGB", (max(1, round(w0 * f)), max(1, round(h0 * f))), (255, 255, 255))
        fx, fy = f, f
    else:
        base = thumbnail.convert("RGB")
        fx, fy = thumbnail_scale(coords_attrs, base.size)
    up = max(1.0, MIN_SIDE / max(base.size))
    if up > 1.0:
        base = base.resize((round(base.width * up), round(base.height * up)), Image.Resampling.BILINEAR)
        fx, fy = fx * up, fy * up
    return base, (fx, fy)


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


__all__ = [
    "MISSING_RGB",
    "VIRIDIS_ANCHORS",
    "apply_colormap",
    "colormap_lut",
    "coverage",
    "hatch",
    "heatmap_canvas",
    "paint_values",
    "patch_boxes",
    "render_heatmap",
    "slide_heatmaps",
    "thumbnail_scale",
]
