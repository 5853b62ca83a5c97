"""A montage of patches: the top-K patches of a class, best first, with a caption each."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_logger = logging.getLogger(__name__)

TILE = 112
PAD = 4
CAPTION = 14
MAX_PATCHES = 64


def render_montage(
    patches: Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
    *,
    tile: int = TILE,
    columns: int | None = None,
    pad: int = PAD,
    title: str | None = None,
) -> Any:
    """Lay ``patches`` (RGB uint8 arrays, any size) out on a grid, row-major.

    Each patch is resized to ``tile``×``tile``; tile ``i`` sits at
    ``x = pad + (i % columns) * (tile + pad)``, ``y = top + pad + (i // columns) * (tile + caption + pad)``
    where ``top`` is the title strip (18 px when ``title`` is given). Captions go under
    their tile. ``columns`` defaults to ``ceil(sqrt(n))`` capped at 8.

    Returns
    -------
    PIL.Image.Image
        RGB on a white background (a small placeholder when ``patches`` is empty).
    """
    from PIL import Image, ImageDraw, ImageFont

    n = len(patches)
    cols = max(1, columns or min(8, math.ceil(math.sqrt(max(n, 1)))))
    rows = max(1, math.ceil(n / cols))
    cap = CAPTION if captions is not None else 0
    top = 18 if title else 0
    width = pad + cols * (tile + pad)
    height = top + pad + rows * (tile + cap + pad)
    canvas = Image.new("RGB", (max(width, 160), height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((pad, 3), _ascii(title), fill=(0, 0, 0), font=font)
    for i, patch in enumerate(patches):
        x = pad + (i % cols) * (tile + pad)
        y = top + pad + (i // cols) * (tile + cap + pad)
        im = Image.fromarray(np.ascontiguousarray(np.asarray(patch, dtype=np.uint8)[..., :3]))
        if im.size != (tile, tile):
            im = im.resize((tile, tile), Image.Resampling.BILINEAR)
        canvas.paste(im, (x, y))
        if captions is not None:
            draw.text((x + 1, y + tile + 1), _ascii(str(captions[i]))[: tile // 6], fill=(0, 0, 0), font=font)
    if n == 0:
        draw.text((pad, top + pad), "no patches", fill=(120, 120, 120), font=font)
    return canvas


def read_patches(slide_path: str, coords: np.ndarray, coords_attrs: Mapping[str, Any]) -> list[np.ndarray]:
    """Read the patches at ``coords`` (level-0 top-left) as the embed stage does.

    Each patch is ``patch_size_level0`` level-0 pixels read at the coords' ``patch_level``.
    Raises :class:`~wsi_pipeline.errors.SlideError` subclasses when the slide cannot be read.
    """
    from ..slide import open_slide

    out = []
    with open_slide(slide_path, backend=str(coords_attrs.get("backend", "auto"))) as slide:
        level = min(int(coords_attrs.get("patch_level", 0)), slide.info.level_count - 1)
        ds = float(slide.info.level_downsamples[level])
        p = max(1, round(float(coords_attrs["patch_size_level0"]) / ds))
        for x, y in np.asarray(coords, dtype=np.int64).reshape(-1, 2).tolist():
            out.append(slide.read_region((int(x), int(y)), level, (p, p)))
    return out


def top_patch_indices(similarity: np.ndarray, column: int, k: int) -> np.ndarray:
    """Indices of the ``min(k, N)`` patches with the highest ``similarity[:, column]``, best first
    (ties: lower index first)."""
    col = np.asarray(similarity)[:, column]
    k = min(int(k), len(col))
    return np.argsort(-col, kind="stable")[:k]


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


__all__ = ["MAX_PATCHES", "read_patches", "render_montage", "top_patch_indices"]
