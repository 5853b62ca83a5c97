"""A small RGB texture repeated over a whole slide, cheap enough to render 10⁹-pixel levels.

Helper of the benchmark scripts (imported as ``from _texture import Repeating``: a script's
own folder is on ``sys.path``). ``write_slide`` asks a tile source for strips of one tile's
height at rows that are multiples of the tile size; when the texture's height is a multiple
of the tile size too, only a few row phases occur, and each strip is a slice of a full-width
band built once per phase.
"""

from __future__ import annotations

import functools

import numpy as np


class Repeating:
    """``read(x, y, w, h)``: the region of ``texture`` repeated over a ``width``-px-wide plane."""

    def __init__(self, texture: np.ndarray, width: int, cached_bands: int = 2) -> None:
        self.texture, self.width = np.ascontiguousarray(texture, dtype=np.uint8), width
        self._band = functools.lru_cache(maxsize=cached_bands)(self._full_width_band)

    def _full_width_band(self, phase: int, h: int) -> np.ndarray:
        ph, pw = self.texture.shape[:2]
        band = self.texture.take((phase + np.arange(h)) % ph, axis=0)
        band = np.tile(band, (1, -(-self.width // pw), 1))[:, : self.width]
        band.flags.writeable = False  # cached: shared by every read of this phase
        return band

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """A read-only view of rows ``y..y+h`` and columns ``x..x+w``."""
        if x < 0 or w < 0 or x + w > self.width:
            raise ValueError(f"columns {x}..{x + w} outside the plane's width {self.width}")
        return self._band(y % self.texture.shape[0], h)[:, x : x + w]
