"""Tumour morphologies: glandular (adenocarcinoma-like), solid sheets and lymphoid sheets."""

from __future__ import annotations

import numpy as np

from ._noise import ValueNoise, hex_points, smoothstep
from ._stamp import Blobs, Patch, edge, stamp
from .scene import Scene, harmonics, make_nuclei, register_kind
from .stroma import StromaScene


class _GlandStroma(StromaScene):
    """Stroma between glands: no fat, fewer vessels."""

    fat = 0.0
    vessels = 0.4


def _gland_profile(p: Patch) -> list[np.ndarray]:
    """[outer, lumen] of an irregular gland; ``lum`` is the lumen's relative size."""
    d = p.rho / (1.0 + harmonics(p, {k: (f"h{k}", f"p{k}") for k in (2, 3, 4)}))
    a = p.param("a")
    return [edge(1.0 - d, a), edge(p.param("lum") - d, a)]


@register_kind("glandular")
class GlandularScene(Scene):
    """Glands with open white lumens lined by one layer of columnar cells with basal nuclei."""

    def layout(self, rng: np.random.Generator) -> None:
        um = self.um
        self.stroma = _GlandStroma(rng, self.height, self.width, mpp=self.mpp, keep=self._keep)
        mean_d = float(rng.uniform(70, 140))
        spacing = mean_d * float(rng.uniform(1.12, 1.4))
        ys, xs = hex_points(rng, self.box(120), float(um(spacing)), 0.14)
        keep = rng.random(ys.size) > rng.uniform(0.0, 0.2)
        ys, xs = ys[keep], xs[keep]
        n = ys.size
        diam = np.clip(mean_d * np.exp(rng.normal(0, 0.2, n)), 60, min(200, spacing * 0.92))
        aspect = rng.uniform(1.0, 1.6, n)
        a = um(diam / 2 * np.sqrt(aspect))
        b = um(diam / 2 / np.sqrt(aspect))
        b = np.minimum(b, a)
        height = um(rng.uniform(14, 24, n))  # columnar epithelium height
        lum = np.clip(1.0 - height / b, 0.3, 0.85)
        extra = {"lum": lum}
        for k in (2, 3, 4):
            extra[f"h{k}"] = rng.uniform(0, 0.09 / (k - 1), n)
            extra[f"p{k}"] = rng.uniform(0, 2 * np.pi, n)
        glands = Blobs(ys, xs, a, b, rng.uniform(0, np.pi, n), {k: v.astype(np.float32) for k, v in extra.items()})
        self.glands = self.keep(glands, reach=1.3)
        self.nuclei = self.keep(self._basal_nuclei(rng, self.glands))
        self.e_epi = float(rng.uniform(0.4, 0.65))
        self.h_epi = float(rng.uniform(0.06, 0.14))
        self.secretion = float(rng.uniform(0.0, 0.12))

    def _basal_nuclei(self, rng: np.random.Generator, g: Blobs) -> Blobs:
        """Elongated nuclei near the outer edge of each gland, pointing at its centre."""
        if g.n == 0:
            return make_nuclei(*(np.zeros(0) for _ in range(5)))
        per = 2 * np.pi * np.sqrt((g.a**2 + g.b**2) / 2)
        count = np.maximum(np.round(per / self.um(rng.uniform(4.5, 6.5))).astype(int), 6)
        rep = np.repeat(np.arange(g.n), count)
        k = np.arange(rep.size) - np.repeat(np.cumsum(count) - count, count)
        phi = 2 * np.pi * (k + rng.uniform(-0.15, 0.15, rep.size)) / count[rep]
        ex = {key: val[rep].astype(np.float64) for key, val in g.extra.items()}
        r = 1.0 + sum(ex[f"h{j}"] * np.cos(j * phi + ex[f"p{j}"]) for j in (2, 3, 4))
        depth = (1.0 - ex["lum"]) * np.clip(rng.normal(0.3, 0.07, rep.size), 0.15, 0.55)
        rad = (1.0 - depth) * r
        u, v = g.a[rep] * rad * np.cos(phi), g.b[rep] * rad * np.sin(phi)
        c, s = np.cos(g.theta[rep]), np.sin(g.theta[rep])
        dx, dy = u * c - v * s, u * s + v * c
        m = rep.size
        return make_nuclei(g.cy[rep] + dy, g.cx[rep] + dx, self.um(rng.uniform(4.0, 6.5, m)),
                           self.um(rng.uniform(1.4, 2.2, m)), np.arctan2(dy, dx),
                           dark=rng.uniform(0.85, 1.2, m), irr2=rng.uniform(0, 0.1, m), ph2=rng.uniform(0, 6.3, m))

    def render(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        hs, es = self.stroma.render(y0, x0, h, w)
        grain = self.grain.window(y0, x0, h, w)
        outer, lumen = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
        reach = 1.0 + sum(self.glands.extra[f"h{k}"] for k in (2, 3, 4)) if self.glands.n else 1.0
        stamp([outer, lumen], y0, x0, self.glands, _gland_profile, reach=reach)
        epi = np.clip(outer - lumen, 0, 1)
        rest = 1.0 - outer
        e = es * rest + epi * np.float32(self.e_epi) * (0.85 + 0.15 * grain)
        e += lumen * np.float32(self.secretion) * (0.5 + 0.5 * smoothstep(-1, 1, grain))
        hmap = hs * rest + epi * np.float32(self.h_epi)
        self.stamp_nuclei(hmap, y0, x0, self.nuclei, grain)
        return hmap, e


@register_kind("solid")
class SolidScene(Scene):
    """Solid sheets of large pleomorphic vesicular/hyperchromatic nuclei, thin septa, mitoses."""

    def layout(self, rng: np.random.Generator) -> None:
        um = self.um
        mean_d = float(rng.uniform(10.5, 16))  # nuclear diameter, µm
        spacing = mean_d * float(rng.uniform(1.45, 1.8))
        ys, xs = hex_points(rng, self.box(20), float(um(spacing)), 0.18)
        self.septa = ValueNoise(int(rng.integers(2**32)), float(um(rng.uniform(110, 200))))
        self.septa_w = float(rng.uniform(0.04, 0.12)) if rng.random() < 0.7 else 0.0
        ok = np.abs(self.septa.at(ys, xs)) > self.septa_w * 1.6
        ys, xs = ys[ok], xs[ok]
        n = ys.size
        size = np.clip(mean_d * np.exp(rng.normal(0, 0.16, n)), 9.5, 19)
        aspect = rng.uniform(1.0, 1.5, n)
        a, b = um(size / 2 * np.sqrt(aspect)), um(size / 2 / np.sqrt(aspect))
        ves = (rng.random(n) < rng.uniform(0.25, 0.9)).astype(float) * rng.uniform(0.6, 1.0, n)
        has_nuc = (ves > 0) & (rng.random(n) < 0.85)
        mitosis = rng.random(n) < rng.uniform(0.005, 0.03)
        dark = np.where(ves > 0, rng.uniform(0.9, 1.25, n), rng.uniform(1.0, 1.45, n))
        irr = rng.uniform(0.02, 0.14, n)
        a = np.where(mitosis, um(rng.uniform(4.5, 6.5, n)), a)
        b = np.where(mitosis, um(rng.uniform(1.6, 2.4, n)), b)
        self.nuclei = self.keep(make_nuclei(
            ys, xs, a, b, rng.uniform(0, np.pi, n),
            dark=np.where(mitosis, 1.9, dark), ves=np.where(mitosis, 0.0, ves),
            irr2=np.where(mitosis, 0.25, irr), ph2=rng.uniform(0, 6.3, n),
            irr3=np.where(mitosis, 0.25, irr * rng.uniform(0.3, 1.0, n)), ph3=rng.uniform(0, 6.3, n),
            nuc_y=rng.uniform(-0.35, 0.35, n), nuc_x=rng.uniform(-0.35, 0.35, n),
            nuc_r=np.where(has_nuc & ~mitosis, um(rng.uniform(0.9, 1.7, n)), 0.0),
        ))
        self.e_cyto = float(rng.uniform(0.3, 0.6))
        self.h_cyto = float(rng.uniform(0.05, 0.16))
        self.e_septa = float(rng.uniform(0.7, 1.0))

    def render(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        grain = self.grain.window(y0, x0, h, w)
        e = np.float32(self.e_cyto) * (0.82 + 0.18 * grain)
        hmap = np.full((h, w), self.h_cyto, np.float32)
        if self.septa_w > 0:
            sep = 1.0 - smoothstep(self.septa_w * 0.6, self.septa_w, np.abs(self.septa.window(y0, x0, h, w)))
            e = e * (1 - sep) + sep * np.float32(self.e_septa) * (0.8 + 0.2 * grain)
            hmap = hmap * (1 - sep) + sep * 0.04
        self.stamp_nuclei(hmap, y0, x0, self.nuclei, grain)
        return hmap, e


@register_kind("lymphoid")
class LymphoidScene(Scene):
    """Dense sheets of small, round, dark, uniform lymphocyte nuclei with scant cytoplasm."""

    def layout(self, rng: np.random.Generator) -> None:
        um = self.um
        spacing = float(rng.uniform(7.6, 9.4))
        ys, xs = hex_points(rng, self.box(10), float(um(spacing)), 0.2)
        thin = ValueNoise(int(rng.integers(2**32)), float(um(60)))
        drop = rng.uniform(0.0, 0.3) * smoothstep(-1.0, 1.0, thin.at(ys, xs))
        ok = rng.random(ys.size) >= drop
        ys, xs = ys[ok], xs[ok]
        n = ys.size
        r = um(rng.uniform(3.0, 3.5) * np.exp(rng.normal(0, 0.05, n)))
        big = rng.random(n) < rng.uniform(0.0, 0.04)  # occasional larger, paler blasts
        r = np.where(big, r * 1.6, r)
        self.nuclei = self.keep(make_nuclei(
            ys, xs, r, r / rng.uniform(1.0, 1.15, n), rng.uniform(0, np.pi, n),
            dark=np.where(big, 0.9, rng.uniform(1.15, 1.45, n)), ves=np.where(big, 0.6, 0.0),
            irr2=rng.uniform(0, 0.05, n), ph2=rng.uniform(0, 6.3, n),
        ))
        self.e_bg = float(rng.uniform(0.18, 0.4))
        self.h_bg = float(rng.uniform(0.04, 0.12))

    def render(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        grain = self.grain.window(y0, x0, h, w)
        e = np.float32(self.e_bg) * (0.8 + 0.2 * grain)
        hmap = np.full((h, w), self.h_bg, np.float32)
        self.stamp_nuclei(hmap, y0, x0, self.nuclei, grain)
        return hmap, e
