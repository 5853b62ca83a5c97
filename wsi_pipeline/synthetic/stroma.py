"""Normal stroma: wavy pink collagen, sparse spindle nuclei, fat lobules and small vessels."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from ._noise import Fbm, ValueNoise, hex_points, poisson_points
from ._stamp import Blobs, Patch, edge, stamp
from .scene import Scene, circle_profile, make_nuclei, register_kind


def _vessel_profile(p: Patch) -> list[np.ndarray]:
    """[outer (wall + lumen), lumen] of a vessel; ``wall`` is relative to the lumen size."""
    b = p.param("b")
    return [edge(1.0 + p.param("wall") - p.rho, b), edge(1.0 - p.rho, b)]


def _inside_any(ys: np.ndarray, xs: np.ndarray, discs: Blobs, radius: np.ndarray) -> np.ndarray:
    """Whether each point lies within ``radius`` of any disc centre (chunked brute force)."""
    out = np.zeros(ys.size, bool)
    if discs.n == 0:
        return out
    step = max(1, 2_000_000 // discs.n)
    for i in range(0, ys.size, step):
        d2 = (ys[i : i + step, None] - discs.cy) ** 2 + (xs[i : i + step, None] - discs.cx) ** 2
        out[i : i + step] = (d2 < radius**2).any(axis=1)
    return out


@register_kind("stroma")
class StromaScene(Scene):
    """Fibrous stroma. ``fat``/``vessels`` scale how many fat lobules and vessels appear."""

    fat = 1.0
    vessels = 1.0

    def layout(self, rng: np.random.Generator) -> None:
        um = self.um
        self.theta = float(rng.uniform(0, np.pi))
        self.warp = Fbm(rng, float(um(rng.uniform(35, 70))), octaves=2)
        self.warp_amp = float(um(rng.uniform(5, 14)))
        self.period = float(um(rng.uniform(4.5, 8.0)))
        self.wiggle = ValueNoise(int(rng.integers(2**32)), float(um(rng.uniform(6, 12))))
        self.wiggle_amp = self.period * float(rng.uniform(0.15, 0.4))
        self.cleft = ValueNoise(int(rng.integers(2**32)), float(um(rng.uniform(12, 30))))
        self.cleft_amt = float(rng.uniform(0.05, 0.3))
        self.loose = ValueNoise(int(rng.integers(2**32)), float(um(rng.uniform(30, 70))))
        self.looseness = float(rng.uniform(0.1, 0.6))
        self.e_level = float(rng.uniform(0.55, 0.95))
        self.e_wall = float(rng.uniform(0.8, 1.1))

        # fat lobules: where a smooth field exceeds a threshold covering ~frac of the area
        frac = float(rng.uniform(0.03, 0.25)) if rng.random() < 0.65 * self.fat else 0.0
        self.fat_field = ValueNoise(int(rng.integers(2**32)), float(um(rng.uniform(120, 220))))
        self.fat_thr = NormalDist().inv_cdf(1 - frac) if frac > 0 else np.inf
        diam = float(rng.uniform(45, 90))
        ys, xs = hex_points(rng, self.box(60), float(um(diam + 2.5)), 0.07)
        infat = self.fat_field.at(ys, xs) > self.fat_thr
        r = um(diam / 2) * rng.uniform(0.85, 1.0, int(infat.sum()))
        self.fat_cells = self.keep(Blobs(ys[infat], xs[infat], r, r * rng.uniform(0.8, 1.0, r.size),
                                         rng.uniform(0, np.pi, r.size)))

        # vessels: a few small lumens with a wall, red cells and flat endothelial nuclei
        vy, vx = poisson_points(rng, self.box(60), 6e-6 * self.vessels / self.px**2)
        ok = self.fat_field.at(vy, vx) <= self.fat_thr
        vy, vx = vy[ok], vx[ok]
        n = vy.size
        va = um(rng.uniform(6, 24, n))
        vb = va / rng.uniform(1.0, 2.5, n)
        vt = rng.uniform(0, np.pi, n)
        wall = um(rng.uniform(2.5, 9, n)) / vb
        self.vessel_blobs = self.keep(Blobs(vy, vx, va, vb, vt, {"wall": wall.astype(np.float32)}), reach=1.5)
        self.rbc = self._red_cells(rng, self.vessel_blobs)
        endo = self._ring_points(rng, self.vessel_blobs, float(um(9)))
        # spindle fibroblast nuclei along the fibres, none inside fat or vessels
        sy, sx = poisson_points(rng, self.box(20), rng.uniform(1 / 1400, 1 / 500) / float(um(1)) ** 2)
        ok = ~_inside_any(sy, sx, self.vessel_blobs, self.vessel_blobs.a * (1 + self.vessel_blobs.extra["wall"])
                          + um(4))
        ok &= ~_inside_any(sy, sx, self.fat_cells, self.fat_cells.a + um(3))
        sy, sx = sy[ok], sx[ok]
        ang = self._fibre_angle(sy, sx) + rng.normal(0, 0.15, sy.size)
        m = sy.size
        spindle = make_nuclei(sy, sx, um(rng.uniform(5, 9, m)), um(rng.uniform(1.1, 1.9, m)), ang,
                              dark=rng.uniform(0.75, 1.05, m), irr2=rng.uniform(0, 0.08, m),
                              ph2=rng.uniform(0, 6.3, m))
        # a few round inflammatory cells
        ly, lx = poisson_points(rng, self.box(10), rng.uniform(0, 1 / 4000) / float(um(1)) ** 2)
        ok = ~_inside_any(ly, lx, self.fat_cells, self.fat_cells.a + um(2))
        ly, lx = ly[ok], lx[ok]
        lr = um(rng.uniform(2.8, 3.4, ly.size))
        lymph = make_nuclei(ly, lx, lr, lr * 0.92, rng.uniform(0, np.pi, ly.size), dark=1.1)
        self.nuclei = self.keep(Blobs.concat([spindle, lymph, endo]))

    def _fibre_angle(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Direction of the collagen fibres at points (perpendicular to the phase gradient)."""
        d = 1.0
        gy = np.sin(self.theta) + self.warp_amp * (self.warp.at(ys + d, xs) - self.warp.at(ys - d, xs)) / (2 * d)
        gx = np.cos(self.theta) + self.warp_amp * (self.warp.at(ys, xs + d) - self.warp.at(ys, xs - d)) / (2 * d)
        return np.arctan2(gx, -gy)

    def _red_cells(self, rng: np.random.Generator, vessels: Blobs) -> Blobs:
        if vessels.n == 0:
            return Blobs(*(np.zeros(0) for _ in range(5)))
        count = rng.poisson(vessels.a * vessels.b / float(self.um(7)) ** 2 * rng.uniform(0, 0.5, vessels.n))
        rep = np.repeat(np.arange(vessels.n), count)
        rad = np.sqrt(rng.uniform(0, 0.7, rep.size))
        phi = rng.uniform(0, 2 * np.pi, rep.size)
        u, v = vessels.a[rep] * rad * np.cos(phi), vessels.b[rep] * rad * np.sin(phi)
        c, s = np.cos(vessels.theta[rep]), np.sin(vessels.theta[rep])
        r = self.um(3.6) * np.ones(rep.size)
        return Blobs(vessels.cy[rep] + u * s + v * c, vessels.cx[rep] + u * c - v * s, r, r * 0.95,
                     np.zeros(rep.size))

    def _ring_points(self, rng: np.random.Generator, rings: Blobs, spacing: float) -> Blobs:
        """Flat endothelial nuclei along each vessel lumen's boundary, tangential."""
        if rings.n == 0:
            return make_nuclei(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))
        per = 2 * np.pi * np.sqrt((rings.a**2 + rings.b**2) / 2)
        count = np.maximum(np.round(per / spacing).astype(int), 3)
        rep = np.repeat(np.arange(rings.n), count)
        k = np.arange(rep.size) - np.repeat(np.cumsum(count) - count, count)
        phi = 2 * np.pi * (k + rng.uniform(-0.2, 0.2, rep.size)) / count[rep]
        rad = 1.0 + rings.extra["wall"][rep] * 0.15
        u, v = rings.a[rep] * rad * np.cos(phi), rings.b[rep] * rad * np.sin(phi)
        c, s = np.cos(rings.theta[rep]), np.sin(rings.theta[rep])
        tangent = np.arctan2(rings.b[rep] * np.cos(phi), -rings.a[rep] * np.sin(phi)) + rings.theta[rep]
        n = rep.size
        return make_nuclei(rings.cy[rep] + u * s + v * c, rings.cx[rep] + u * c - v * s,
                           self.um(rng.uniform(4, 6, n)), self.um(rng.uniform(1.0, 1.4, n)), tangent,
                           dark=rng.uniform(0.8, 1.0, n))

    def fibres(self, y0: int, x0: int, h: int, w: int, grain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Collagen only (no cells): ``(h, e)`` concentrations."""
        ys, xs = self.coords(y0, x0, h, w)
        phase = self.warp.window(y0, x0, h, w) * np.float32(self.warp_amp)
        phase += self.wiggle.window(y0, x0, h, w) * np.float32(self.wiggle_amp)
        phase += ys * np.float32(np.sin(self.theta)) + xs * np.float32(np.cos(self.theta))
        phase *= np.float32(2 * np.pi / self.period)
        t = np.cos(phase) * 0.5 + 0.5  # 1 on a fibre, 0 between fibres
        # thin white clefts between fibres where the cleft field is high
        c = np.clip(self.cleft.window(y0, x0, h, w) + 0.5, 0.0, 1.5) * np.float32(self.cleft_amt)
        gap = np.clip((t - c) * 8.0 + 0.5, 0.0, 1.0) * 0.8 + 0.2
        loose = np.clip(self.loose.window(y0, x0, h, w), 0.0, 1.0) * np.float32(self.looseness)
        e = (t * 0.38 + 0.62) * gap
        e *= np.float32(self.e_level) - np.float32(self.e_level) * loose
        e *= 0.86 + 0.14 * grain
        return np.full_like(e, 0.05), e

    def render(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        grain = self.grain.window(y0, x0, h, w)
        hmap, e = self.fibres(y0, x0, h, w, grain)
        clear = np.zeros((h, w), np.float32)
        stamp([clear], y0, x0, self.fat_cells, circle_profile)
        outer, lumen = np.zeros_like(clear), np.zeros_like(clear)
        stamp([outer, lumen], y0, x0, self.vessel_blobs, _vessel_profile,
              reach=1.0 + self.vessel_blobs.extra["wall"])
        wall = np.clip(outer - lumen, 0, 1)
        keep = (1 - np.maximum(clear, lumen)) * (1 - wall)
        e = e * keep + wall * np.float32(self.e_wall) * (0.9 + 0.1 * grain)
        hmap = hmap * keep + wall * 0.08
        if self.rbc.n:
            rbc = np.zeros_like(clear)
            stamp([rbc], y0, x0, self.rbc, circle_profile)
            e = np.maximum(e, rbc * 1.6)
        self.stamp_nuclei(hmap, y0, x0, self.nuclei, grain)
        return hmap, e
