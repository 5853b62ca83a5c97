"""Slide thumbnail PNG with the tissue contours and the kept patches drawn on it."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

CONTOUR_COLOR = (0, 170, 0)
HOLE_COLOR = (230, 120, 0)
PATCH_COLOR = (30, 60, 220)


def render_thumbnail(
    image: np.ndarray,
    scale: tuple[float, float],
    polygons: Iterable[Any] = (),
    coords: np.ndarray | None = None,
    patch_size_level0: int = 0,
    max_side: int = 2048,
) -> Any:
    """Draw on an RGB image of the slide; returns a PIL image at most ``max_side`` px wide/high.

    Parameters
    ----------
    image : (h, w, 3) uint8 picture of the whole slide (e.g. the segmentation level).
    scale : level-0 pixels per ``image`` pixel, (x, y).
    polygons : shapely (multi)polygons in level-0 pixels (tissue outlines, holes).
    coords : (N, 2) level-0 top-left corners of the kept patches.
    patch_size_level0 : patch edge in level-0 pixels.
    """
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.ascontiguousarray(image[..., :3], dtype=np.uint8))
    shrink = max(1.0, max(img.size) / float(max_side))
    if shrink > 1.0:
        size = (max(1, round(img.width / shrink)), max(1, round(img.height / shrink)))
        img = img.resize(size, Image.Resampling.BOX)
    # level-0 px → thumbnail px
    fx = img.width / (image.shape[1] * float(scale[0]))
    fy = img.height / (image.shape[0] * float(scale[1]))
    draw = ImageDraw.Draw(img)
    if coords is not None and len(coords) and patch_size_level0 > 0:
        c = np.asarray(coords, dtype=np.float64)
        boxes = np.column_stack([c[:, 0] * fx, c[:, 1] * fy, (c[:, 0] + patch_size_level0) * fx - 1,
                                 (c[:, 1] + patch_size_level0) * fy - 1])
        for x0, y0, x1, y1 in boxes.tolist():
            draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=PATCH_COLOR, width=1)
    width = max(1, round(max(img.size) / 600))
    for poly in polygons:
        for part in getattr(poly, "geoms", [poly]):
            ext = [(x * fx, y * fy) for x, y in part.exterior.coords]
            draw.line(ext, fill=CONTOUR_COLOR, width=width + 1)
            for ring in part.interiors:
                draw.line([(x * fx, y * fy) for x, y in ring.coords], fill=HOLE_COLOR, width=width)
    return img


def validate_png(path: str | os.PathLike[str]) -> bool | str:
    """``True`` when ``path`` is a complete PNG, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return f"not a PNG ({im.format})"
            im.load()  # decodes every byte: a truncated file raises
    except (OSError, ValueError, SyntaxError) as e:
        return f"unreadable PNG: {e}"
    return True


__all__ = ["render_thumbnail", "validate_png"]
