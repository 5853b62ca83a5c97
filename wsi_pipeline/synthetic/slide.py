"""Whole synthetic slides: tissue blobs on glass, a tumour region mixed with normal stroma.

The layout is two smooth random fields over the slide: where the *tissue* field exceeds
its threshold there is tissue (a few fragments, clear of the slide border), and inside the
tissue, where the *tumour* field exceeds its threshold, the tumour morphology replaces
stroma. Both thresholds are quantiles, so the tissue coverage and the tumour share of the
tissue come out as asked. Each morphology is a :class:`~.scene.Scene` laid out over the
whole slide (objects only where they can show) and rendered tile by tile; the tiles are
blended by the soft class weights, so there are no seams.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ._noise import Fbm, blur_radius, separable_blur, smoothstep
from .render import TUMOUR_CLASSES, make_rng, single_thread_blas
from .scene import Keep, Scene, build_scene, registered_kinds
from .stain import StainStyle

_logger = logging.getLogger(__name__)

#: Class-map values.
GLASS, STROMA, TUMOUR = 0, 1, 2
_TILE = 512
_STRIDE = 8  # px between samples of the (very smooth) layout fields


@dataclass
class _Field:
    """Smooth random field: fBm plus Gaussian bumps minus a border penalty."""

    fbm: Fbm
    bumps: np.ndarray  # (k, 4): cy, cx, sigma, amplitude (px, px, px, field units)
    border: float  # strength of the push-down towards the slide border (0 = none)
    height: int
    width: int

    def _bump_terms(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.exp(-0.5 * ((ys[..., None] - self.bumps[:, 0]) / self.bumps[:, 2]) ** 2),
                np.exp(-0.5 * ((xs[..., None] - self.bumps[:, 1]) / self.bumps[:, 2]) ** 2) * self.bumps[:, 3])

    def _vignette(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Push the field down towards the slide border: ``strength * r**4`` (r = 1 at mid-edges),
        plus a steep wall in the outer 3 % so that the border itself is always glass."""
        if self.border <= 0:
            return np.float32(0.0)
        ys, xs = np.asarray(ys, np.float32) + 0.5, np.asarray(xs, np.float32) + 0.5
        ry = (ys / (self.height / 2) - 1.0) ** 2
        rx = (xs / (self.width / 2) - 1.0) ** 2
        margin = 0.03 * min(self.height, self.width)
        wall_y = np.clip(1.0 - np.minimum(ys, self.height - ys) / margin, 0.0, None) ** 2
        wall_x = np.clip(1.0 - np.minimum(xs, self.width - xs) / margin, 0.0, None) ** 2
        return np.float32(self.border) * (ry + rx) ** 2 + 50.0 * np.maximum(wall_y, wall_x)

    def grid(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Values on the separable grid ``ys × xs`` (1-D pixel coordinates)."""
        by, bx = self._bump_terms(ys.astype(np.float64), xs.astype(np.float64))
        out = self.fbm.grid(ys, xs) + (by @ bx.T).astype(np.float32)
        return out - self._vignette(ys[:, None], xs[None, :])


class _Sampled:
    """A smooth field sampled every ``stride`` px (with a margin) and interpolated bilinearly."""

    def __init__(self, field: _Field, height: int, width: int, stride: int) -> None:
        self.stride, self.origin = stride, -2 * stride
        self.ys = np.arange(self.origin, height + 3 * stride, stride)
        self.xs = np.arange(self.origin, width + 3 * stride, stride)
        self.values = field.grid(self.ys, self.xs).astype(np.float32)

    def inside(self, height: int, width: int) -> np.ndarray:
        """The samples that lie on the slide."""
        rows = (self.ys >= 0) & (self.ys < height)
        cols = (self.xs >= 0) & (self.xs < width)
        return self.values[np.ix_(rows, cols)]

    def _matrix(self, coords: np.ndarray, n: int) -> tuple[np.ndarray, int]:
        """Linear-interpolation weights (len(coords), k) over samples ``lo .. lo + k - 1``."""
        q = np.clip((coords - self.origin) / self.stride, 0, n - 1.0001)
        i0 = np.floor(q).astype(np.int64)
        t = (q - i0).astype(np.float32)
        lo = int(i0.min())
        mat = np.zeros((coords.size, int(i0.max()) + 2 - lo), np.float32)
        rows = np.arange(coords.size)
        mat[rows, i0 - lo] = 1.0 - t
        mat[rows, i0 + 1 - lo] = t
        return mat, lo

    def window(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        wy, ly = self._matrix(np.arange(y0, y0 + h, dtype=np.float64), self.values.shape[0])
        wx, lx = self._matrix(np.arange(x0, x0 + w, dtype=np.float64), self.values.shape[1])
        sub = self.values[ly : ly + wy.shape[1], lx : lx + wx.shape[1]]
        return (wy @ sub) @ wx.T

    def cell(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index of the nearest sample of points (clipped to the grid)."""
        iy = np.clip(np.round((np.asarray(ys) - self.origin) / self.stride).astype(np.int64), 0, self.ys.size - 1)
        ix = np.clip(np.round((np.asarray(xs) - self.origin) / self.stride).astype(np.int64), 0, self.xs.size - 1)
        return iy, ix


class SlideLayout:
    """Tissue and tumour regions of one slide, with soft edges.

    Parameters
    ----------
    rng : randomness.
    height, width : slide size in px.
    mpp : µm per px.
    tumour_fraction : share of the tissue area that is tumour.
    """

    def __init__(self, rng: np.random.Generator, height: int, width: int, mpp: float,
                 tumour_fraction: float) -> None:
        self.height, self.width = height, width
        short = min(height, width)
        n_frag = int(rng.integers(1, 4))
        bumps = np.column_stack([rng.uniform(0.3, 0.7, n_frag) * height, rng.uniform(0.25, 0.75, n_frag) * width,
                                 rng.uniform(0.18, 0.3, n_frag) * short, rng.uniform(1.0, 1.8, n_frag)])
        tissue = _Field(Fbm(rng, short * 0.4, octaves=3), bumps, 2.5, height, width)
        self.tissue = _Sampled(tissue, height, width, _STRIDE)
        coverage = float(rng.uniform(0.45, 0.58))
        f = self.tissue.inside(height, width)
        self.t_thr = float(np.quantile(f, 1.0 - coverage))
        self.t_soft = 3.0 * _edge_gradient(f, self.t_thr)  # ~3 px ramp
        inside = f > self.t_thr
        # tumour: a main mass around a random tissue point plus satellites
        cy, cx = np.argwhere(inside)[rng.integers(int(inside.sum()))] * _STRIDE
        bump = np.array([[cy, cx, rng.uniform(0.15, 0.3) * short, rng.uniform(0.8, 1.6)]])
        self.tumour = _Sampled(_Field(Fbm(rng, short * 0.3, octaves=3), bump, 0.0, height, width),
                               height, width, _STRIDE)
        g = self.tumour.inside(height, width)
        self.g_thr = float(np.quantile(g[inside], 1.0 - tumour_fraction))
        self.g_soft = (20.0 / mpp) * _edge_gradient(g, self.g_thr)  # ~20 µm mixing zone

    def alpha(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Tissue opacity (0–1, float32) on a pixel window."""
        return smoothstep(self.t_thr - self.t_soft, self.t_thr + self.t_soft, self.tissue.window(y0, x0, h, w))

    def tumour_weight(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Weight (0–1, float32) of the tumour morphology against stroma on a pixel window."""
        return smoothstep(self.g_thr - self.g_soft, self.g_thr + self.g_soft, self.tumour.window(y0, x0, h, w))

    def keep(self, tumour: bool) -> Keep:
        """Predicate: can an object of radius ``r`` at ``(y, x)`` show in the tumour (or stroma) area?

        Looked up on the coarse grid, dilated by each object's radius plus one cell, so it
        errs on the side of keeping.
        """
        from scipy import ndimage  # slow to import; only slides need it

        t, g = self.tissue.values, self.tumour.values
        zone = g > self.g_thr - self.g_soft if tumour else g < self.g_thr + self.g_soft
        mask = (t > self.t_thr - self.t_soft) & zone
        cache: dict[int, np.ndarray] = {}

        def pred(ys: np.ndarray, xs: np.ndarray, r: np.ndarray) -> np.ndarray:
            iy, ix = self.tissue.cell(ys, xs)
            cells = np.ceil(np.broadcast_to(r, np.shape(ys)) / _STRIDE).astype(np.int64) + 1
            ok = np.zeros(np.shape(ys), bool)
            for c in np.unique(cells):
                if int(c) not in cache:
                    cache[int(c)] = ndimage.maximum_filter(mask, size=2 * int(c) + 1, mode="nearest")
                sel = cells == c
                ok[sel] = cache[int(c)][iy[sel], ix[sel]]
            return ok

        return pred


def _edge_gradient(field: np.ndarray, thr: float) -> float:
    """Median |gradient| per px of a coarse-sampled field near its ``thr`` contour."""
    gy, gx = np.gradient(field)
    grad = np.hypot(gy, gx) / _STRIDE
    near = np.abs(field - thr) < 0.1 * (field.std() + 1e-6)
    return float(np.median(grad[near])) if near.any() else float(np.median(grad)) + 1e-6


def render_slide(
    tumour_class: str, *, width: int = 6144, height: int = 4608, mpp: float = 0.5, seed: int | None = None,
    rng: np.random.Generator | None = None, tumour_fraction: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a synthetic H&E slide whose tumour area is ``tumour_class``.

    Returns
    -------
    rgb : (height, width, 3) uint8 — tissue fragments on light glass.
    tissue_mask : (height, width) bool — where there is tissue (``class_map > 0``).
    class_map : (height, width) uint8 — 0 glass, 1 stroma (normal), 2 tumour.
    """
    if tumour_class not in registered_kinds() or tumour_class == "stroma":
        raise ConfigError(f"unknown tumour class {tumour_class!r}; use one of {', '.join(TUMOUR_CLASSES)}")
    if not 0.05 <= tumour_fraction <= 0.95:
        raise ConfigError(f"tumour_fraction must be in [0.05, 0.95], got {tumour_fraction}")
    width, height = int(width), int(height)
    if width < 256 or height < 256:
        raise ConfigError(f"slide must be at least 256x256 px, got {width}x{height}")
    gen = make_rng(seed, rng)
    layout = SlideLayout(gen, height, width, float(mpp), float(tumour_fraction))
    style = StainStyle.random(gen)
    stroma = build_scene("stroma", gen, height, width, mpp=mpp, keep=layout.keep(False))
    tumour = build_scene(tumour_class, gen, height, width, mpp=mpp, keep=layout.keep(True))
    rgb = np.empty((height, width, 3), np.uint8)
    class_map = np.empty((height, width), np.uint8)
    with single_thread_blas():
        for y0 in range(0, height, _TILE):
            for x0 in range(0, width, _TILE):
                h, w = min(_TILE, height - y0), min(_TILE, width - x0)
                rgb[y0 : y0 + h, x0 : x0 + w], class_map[y0 : y0 + h, x0 : x0 + w] = _render_tile(
                    layout, style, stroma, tumour, y0, x0, h, w)
    if _logger.isEnabledFor(logging.DEBUG):
        _logger.debug("rendered %s slide %dx%d (tumour %.2f of tissue)", tumour_class, width, height,
                      float((class_map == TUMOUR).sum() / max((class_map > 0).sum(), 1)))
    return rgb, class_map > GLASS, class_map


def _render_tile(layout: SlideLayout, style: StainStyle, stroma: Scene, tumour: Scene, y0: int, x0: int,
                 h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    pad = blur_radius(style.blur)
    py, px, ph, pw = y0 - pad, x0 - pad, h + 2 * pad, w + 2 * pad
    alpha = layout.alpha(py, px, ph, pw)
    if alpha.max() <= 1e-3:  # bare glass
        return style.glass(h, w, y0, x0), np.zeros((h, w), np.uint8)
    wt = layout.tumour_weight(py, px, ph, pw)
    hmap = np.zeros((ph, pw), np.float32)
    emap = np.zeros((ph, pw), np.float32)
    if wt.min() < 1.0:
        hs, es = stroma.render(py, px, ph, pw)
        hmap += hs * (1.0 - wt)
        emap += es * (1.0 - wt)
    if wt.max() > 0.0:
        ht, et = tumour.render(py, px, ph, pw)
        hmap += ht * wt
        emap += et * wt
    hmap *= alpha
    emap *= alpha
    if pad:
        hmap, emap = separable_blur(hmap, style.blur), separable_blur(emap, style.blur)
    core = (slice(pad, pad + h), slice(pad, pad + w))
    cmap = np.where(alpha[core] >= 0.5, np.where(wt[core] >= 0.5, TUMOUR, STROMA), GLASS).astype(np.uint8)
    return style.to_rgb(hmap, emap, y0, x0), cmap
