"""Synthetic test slides with a known tissue mask (plain module, imported by tests).

``tissue_image`` paints irregular elliptical blobs textured with the real stained image
``skimage.data.immunohistochemistry()`` (tinted with an eosin-like layer so every tissue
pixel carries some stain) on light glass, and returns the exact truth mask.
``make_slide`` writes it as a pyramidal TIFF via :func:`wsi_pipeline.slide.write.write_slide`
and returns a :class:`FixtureSlide` (path + truth mask + mpp). The pytest fixtures in
``conftest.py`` build the standard set once per session.

>>> rgb, mask = tissue_image(512, 384, n_blobs=2, seed=1)
>>> fs = make_slide(tmp / "a.svs", 2048, 1536, mpp=0.5, layout="svs", levels=(1, 4))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from wsi_pipeline.slide.write import TileSource, area_downsample, write_slide

#: Mean glass colour and the ± range of its noise.
GLASS_RGB = (240, 240, 240)
GLASS_NOISE = 3
#: Multiplicative stain layer applied to the IHC texture (eosin-like pink).
STAIN_TINT = np.array([0.93, 0.74, 0.86], np.float32)
#: The truth mask is evaluated on a grid of at most this many cells on the long side and
#: upsampled (nearest) to full size, which keeps 8k-pixel slides fast. It is exact for the
#: rendered image because the pixels are painted from the same mask.
MASK_GRID_MAX = 1024


@lru_cache(maxsize=1)
def _texture_tile() -> np.ndarray:
    """Seamless 1024² stained texture: the IHC image mirrored 2×2, tinted."""
    from skimage.data import immunohistochemistry

    ihc = immunohistochemistry()
    tile = np.concatenate([ihc, ihc[:, ::-1]], axis=1)
    tile = np.concatenate([tile, tile[::-1]], axis=0)
    return np.ascontiguousarray((tile.astype(np.float32) * STAIN_TINT).astype(np.uint8))


def _tiled(block: np.ndarray, height: int, width: int, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    bh, bw = block.shape[:2]
    oy, ox = offset[0] % bh, offset[1] % bw
    reps = (math.ceil((height + oy) / bh), math.ceil((width + ox) / bw)) + (1,) * (block.ndim - 2)
    return np.tile(block, reps)[oy : oy + height, ox : ox + width]


class TissueScene:
    """A procedural slide: irregular elliptical tissue blobs on glass, rendered by region.

    Rendering by region lets :func:`make_slide` stream a large slide into the writer strip
    by strip (fast, cache-friendly) while ``mask`` gives the exact truth for any region.
    """

    def __init__(self, width: int, height: int, *, n_blobs: int = 3, seed: int = 0) -> None:
        self.width, self.height, self.n_blobs, self.seed = int(width), int(height), int(n_blobs), int(seed)
        rng = np.random.default_rng(seed)
        noise = rng.integers(-GLASS_NOISE, GLASS_NOISE + 1, size=(257, 263, 3), dtype=np.int16)
        self._glass = (np.array(GLASS_RGB, np.int16) + noise).astype(np.uint8)
        self._offset = tuple(int(v) for v in rng.integers(0, 1024, size=2))
        self.step = max(1, math.ceil(max(width, height) / MASK_GRID_MAX))
        self._grid = _blob_grid(self.width, self.height, self.step, n_blobs, rng)

    def mask(self, x: int = 0, y: int = 0, w: int | None = None, h: int | None = None) -> np.ndarray:
        """Truth mask (bool (h, w)) of a level-0 region inside the image."""
        w = self.width - x if w is None else w
        h = self.height - y if h is None else h
        s = self.step
        gy0, gx0 = y // s, x // s
        sub = self._grid[gy0 : (y + h - 1) // s + 1, gx0 : (x + w - 1) // s + 1]
        if s > 1:
            sub = np.repeat(np.repeat(sub, s, axis=0), s, axis=1)
        return sub[y - gy0 * s : y - gy0 * s + h, x - gx0 * s : x - gx0 * s + w]

    def render(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of a level-0 region inside the image."""
        out = _tiled(self._glass, h, w, (y, x))
        m = self.mask(x, y, w, h)
        if m.any():
            tex = _tiled(_texture_tile(), h, w, (y + self._offset[0], x + self._offset[1]))
            out = np.where(m[..., None], tex, out)
        return np.ascontiguousarray(out)


def _blob_grid(width: int, height: int, step: int, n_blobs: int, rng: np.random.Generator) -> np.ndarray:
    """Blob mask on a grid of ``step``-pixel cells (cell centres tested)."""
    gh, gw = math.ceil(height / step), math.ceil(width / step)
    ys = (np.arange(gh, dtype=np.float32) + 0.5) * step
    xs = (np.arange(gw, dtype=np.float32) + 0.5) * step
    grid = np.zeros((gh, gw), bool)
    short = min(width, height)
    for _ in range(n_blobs):
        a, b = rng.uniform(0.10, 0.18, size=2) * short  # semi-axes
        ks = np.arange(2, 6)
        amps = rng.uniform(0.0, 0.06, size=ks.size)
        phases = rng.uniform(0, 2 * np.pi, size=ks.size)
        reach = max(a, b) * (1 + amps.sum()) + 2 * step  # stays inside the image
        cx = rng.uniform(reach, max(reach, width - reach))
        cy = rng.uniform(reach, max(reach, height - reach))
        rot = rng.uniform(0, np.pi)
        y0, y1 = max(0, int((cy - reach) // step)), min(gh, int((cy + reach) // step) + 1)
        x0, x1 = max(0, int((cx - reach) // step)), min(gw, int((cx + reach) // step) + 1)
        dx = xs[None, x0:x1] - np.float32(cx)
        dy = ys[y0:y1, None] - np.float32(cy)
        theta = np.arctan2(dy, dx) - np.float32(rot)
        ellipse_r = a * b / np.sqrt((b * np.cos(theta)) ** 2 + (a * np.sin(theta)) ** 2)
        wobble = 1 + sum(m * np.cos(k * theta + p) for k, m, p in zip(ks, amps, phases, strict=True))
        grid[y0:y1, x0:x1] |= dx * dx + dy * dy <= (ellipse_r * wobble) ** 2
    return grid


def glass_image(width: int, height: int, *, seed: int = 0) -> np.ndarray:
    """Light glass only: ``GLASS_RGB`` ± ``GLASS_NOISE`` per channel."""
    return TissueScene(width, height, n_blobs=0, seed=seed).render(0, 0, width, height)


def blob_mask(width: int, height: int, *, n_blobs: int = 3, seed: int = 0) -> np.ndarray:
    """The bool (h, w) truth mask that :func:`tissue_image` uses for the same arguments."""
    return TissueScene(width, height, n_blobs=n_blobs, seed=seed).mask()


def tissue_image(width: int, height: int, *, n_blobs: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stained tissue blobs on glass: ``(rgb uint8 (h, w, 3), truth mask bool (h, w))``."""
    scene = TissueScene(width, height, n_blobs=n_blobs, seed=seed)
    return scene.render(0, 0, width, height), scene.mask()


@dataclass(frozen=True)
class FixtureSlide:
    """A written test slide and what is true about it (truth pixels and mask from ``scene``)."""

    path: Path
    scene: TissueScene = field(repr=False)
    mpp: float | None
    layout: str
    downsamples: tuple[int, ...]

    @property
    def size(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.scene.width, self.scene.height

    @cached_property
    def mask(self) -> np.ndarray:
        """Level-0 truth mask, bool (h, w): True on tissue."""
        return self.scene.mask()

    def mask_at(self, downsample: int) -> np.ndarray:
        """Tissue fraction (float32 in [0, 1]) per ``downsample``×``downsample`` block."""
        frac = area_downsample((self.mask * np.uint8(255))[..., None], downsample)[..., 0]
        return frac.astype(np.float32) / 255.0

    def pixels(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The level-0 RGB that was written (before compression) for a region inside the image."""
        return self.scene.render(x, y, w, h)


def make_slide(
    path: str | Path,
    width: int,
    height: int,
    *,
    mpp: float | None = 0.5,
    layout: str = "svs",
    levels: tuple[int, ...] = (1, 4),
    n_blobs: int = 3,
    seed: int = 0,
    compression: str | None = "jpeg",
    tile_size: int = 256,
) -> FixtureSlide:
    """Write a synthetic tissue slide (``n_blobs=0``: glass only) and return its truth."""
    fs = slide_truth(path, width, height, mpp=mpp, layout=layout, levels=levels, n_blobs=n_blobs, seed=seed)
    write_slide(path, TileSource(fs.scene.render, width, height), mpp=mpp, layout=layout, levels=levels,
                compression=compression, tile_size=tile_size)
    return fs


def slide_truth(
    path: str | Path,
    width: int,
    height: int,
    *,
    mpp: float | None = 0.5,
    layout: str = "svs",
    levels: tuple[int, ...] = (1, 4),
    n_blobs: int = 3,
    seed: int = 0,
) -> FixtureSlide:
    """The :class:`FixtureSlide` that :func:`make_slide` returns, without writing anything
    (for a file that was written earlier with the same arguments)."""
    scene = TissueScene(width, height, n_blobs=n_blobs, seed=seed)
    return FixtureSlide(Path(path), scene, mpp, layout, tuple(levels))


def make_roi_png(path: str | Path, width: int = 384, height: int = 256, *, mpp: float | None = 0.5,
                 seed: int = 3) -> FixtureSlide:
    """A small ROI PNG; ``mpp`` is stored as its dpi (pHYs)."""
    from PIL import Image

    scene = TissueScene(width, height, n_blobs=1, seed=seed)
    kwargs = {"dpi": (25400.0 / mpp, 25400.0 / mpp)} if mpp else {}
    Image.fromarray(scene.render(0, 0, width, height)).save(path, **kwargs)
    return FixtureSlide(Path(path), scene, mpp, "png", (1,))


def make_corrupt_files(folder: str | Path, real_slide: str | Path) -> dict[str, Path]:
    """Files no backend can read: ``zero_byte``, ``truncated`` (first 20 % of ``real_slide``),
    ``text`` (a text file named .svs) and ``unsupported`` (extension .xyz)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = Path(real_slide).read_bytes()
    files = {
        "zero_byte": (folder / "zero.svs", b""),
        "truncated": (folder / "truncated.svs", data[: len(data) // 5]),
        "text": (folder / "notes.svs", b"this is not a slide\n"),
        "unsupported": (folder / "slide.xyz", data[:4096]),
    }
    for p, content in files.values():
        p.write_bytes(content)
    return {name: p for name, (p, _) in files.items()}


__all__ = ["FixtureSlide", "TissueScene", "blob_mask", "glass_image", "make_corrupt_files", "make_roi_png", "make_slide",
           "slide_truth", "tissue_image"]
