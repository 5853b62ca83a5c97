"""Hard synthetic slides for tissue segmentation, each with a known truth mask (plain module).

Tissue is the procedural H&E of :mod:`wsi_pipeline.synthetic` (glands with lumens, stroma,
solid tumour), rendered with a chosen :class:`~wsi_pipeline.synthetic.StainStyle` inside a
known mask (a smooth random field thresholded at the wanted coverage) on glass of the
style's colour; then the scan effects of the fixture are applied. The slides are written as
JPEG-compressed pyramidal SVS files, so they go through the whole ``tile`` stage.

Fixtures (:data:`HARD_SLIDES`):

- ``tinted_glass``: light bluish glass, pale lumen-rich glandular tissue (the look of the
  demo slide ``glandular_1000000``, exaggerated);
- ``faded_eosin``: stroma (mostly eosin) with the eosin at 40 % of its nominal strength;
- ``falloff``: illumination falling off towards the corners (to 70 % brightness there);
- ``ink``: blue, green and black marker strokes on the glass (the truth mask keeps them off
  the tissue, so ink is never tissue);
- ``dense``: tissue covering ≈ 85 % of the slide, so glass is scarce;
- ``blue_haematoxylin``: lymphoid tissue whose haematoxylin scans blue (red absorbed more
  than green) with the eosin halved: a control that the ink rule leaves tissue alone.

>>> hs = make_hard_slide(tmp / "ink.svs", "ink")          # doctest: +SKIP
>>> frac = patch_truth(hs.truth, 256)                       # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from wsi_pipeline.slide.write import TileSource, write_slide
from wsi_pipeline.synthetic import StainStyle, build_scene
from wsi_pipeline.synthetic.render import render_window
from wsi_pipeline.synthetic.stain import E_OD, H_OD

#: Level-0 px per cell of the truth mask (and of the ink and fall-off maps): 4 µm at 0.5 µm/px.
CELL = 8
#: Rendering tile, px.
TILE = 512
#: Marker inks as optical densities (R, G, B) over the glass: on glass of 240 the blue ink is
#: about (54, 98, 187), the green (72, 169, 98) and the black (32, 36, 44), whose brightest
#: channel is above the ``black_value`` of 40.
INK_OD = {"blue": (1.5, 0.9, 0.25), "green": (1.2, 0.35, 0.9), "black": (2.0, 1.9, 1.7)}


@dataclass(frozen=True)
class HardSpec:
    """How one hard slide is made."""

    name: str
    kind: str  # synthetic morphology inside the tissue mask
    coverage: float  # tissue share of the slide
    background: tuple[float, float, float]  # glass RGB
    h_scale: float = 1.0  # haematoxylin strength
    h_od: tuple[float, float, float] | None = None  # haematoxylin OD direction (default: the nominal one)
    e_scale: float = 1.0  # eosin strength
    falloff: float = 0.0  # brightness lost in the corners (0.3: corners at 70 %)
    ink: bool = False
    border: bool = True  # keep tissue clear of the slide border
    size: tuple[int, int] = (4096, 3072)  # (width, height) px at 0.5 µm/px
    seed: int = 0


HARD_SLIDES: dict[str, HardSpec] = {s.name: s for s in (
    HardSpec("tinted_glass", "glandular", 0.45, (232.3, 236.4, 243.8), h_scale=0.55, e_scale=0.45, seed=11),
    HardSpec("faded_eosin", "stroma", 0.45, (243.0, 241.0, 245.0), e_scale=0.4, seed=12),
    HardSpec("falloff", "solid", 0.45, (240.0, 240.0, 243.0), falloff=0.3, seed=13),
    HardSpec("ink", "glandular", 0.40, (241.0, 240.0, 244.0), ink=True, seed=14),
    HardSpec("dense", "solid", 0.85, (236.0, 238.0, 246.0), border=False, seed=15),
    HardSpec("blue_haematoxylin", "lymphoid", 0.45, (240.0, 240.0, 243.0), h_scale=1.3, e_scale=0.5,
             h_od=(0.78, 0.60, 0.39), seed=16),
)}


@dataclass(frozen=True)
class HardSlide:
    """A written hard slide and its level-0 truth mask (bool (h, w), True on tissue)."""

    name: str
    path: Path
    truth: np.ndarray
    mpp: float


def _field_mask(rng: np.random.Generator, gh: int, gw: int, coverage: float, border: bool) -> np.ndarray:
    """Bool (gh, gw): a smooth random field above its ``1 − coverage`` quantile."""
    f = ndi.gaussian_filter(rng.normal(size=(gh, gw)), sigma=min(gh, gw) / 10.0, mode="reflect")
    f /= f.std() + 1e-12
    if border:  # push the field down towards the border, steeply in the outer 4 %
        ys = (np.arange(gh) + 0.5) / gh * 2 - 1
        xs = (np.arange(gw) + 0.5) / gw * 2 - 1
        r = np.maximum(np.abs(ys)[:, None], np.abs(xs)[None, :])
        f -= 1.5 * r**4 + 50.0 * np.clip(r - 0.92, 0, None)
    return f > np.quantile(f, 1.0 - coverage)


def _segment_distance(gy: np.ndarray, gx: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Distance of the points (gy, gx) to the segment p–q (all in cells)."""
    d = q - p
    t = np.clip(((gy - p[0]) * d[0] + (gx - p[1]) * d[1]) / max(float(d @ d), 1e-9), 0.0, 1.0)
    return np.hypot(gy - (p[0] + t * d[0]), gx - (p[1] + t * d[1]))


def _ink_strokes(gh: int, gw: int, mpp: float) -> dict[str, np.ndarray]:
    """Coverage (0..1, float32 (gh, gw)) of a blue arc, a green wave and a black tick and dot."""
    gy, gx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    um = 1.0 / (mpp * CELL)  # cells per µm
    t = np.linspace(0.15, 0.85, 40) * math.pi
    paths = {
        "blue": (np.column_stack([0.5 * gh - 0.42 * gh * np.sin(t), 0.5 * gw - 0.44 * gw * np.cos(t)]), 90),
        "green": (np.column_stack([0.93 * gh + 0.025 * gh * np.sin(np.linspace(0, 6 * math.pi, 40)),
                                   np.linspace(0.12, 0.88, 40) * gw]), 70),
        "black": (np.array([[0.80 * gh, 0.05 * gw], [0.90 * gh, 0.08 * gw], [0.62 * gh, 0.14 * gw]]), 60),
    }
    out = {}
    for name, (pts, width_um) in paths.items():
        d = np.full((gh, gw), np.inf, np.float32)
        for p, q in zip(pts[:-1], pts[1:], strict=True):
            d = np.minimum(d, _segment_distance(gy, gx, p, q))
        if name == "black":  # and a dot
            d = np.minimum(d, np.hypot(gy - 0.10 * gh, gx - 0.93 * gw) - 60 * um)
        half = 0.5 * width_um * um
        out[name] = np.clip(half + 0.5 - d, 0.0, 1.0).astype(np.float32)  # ~1 cell soft edge
    return out


class HardScene:
    """Renders a :class:`HardSpec` by region (for streaming into the slide writer)."""

    def __init__(self, spec: HardSpec, mpp: float = 0.5) -> None:
        self.spec, self.mpp = spec, mpp
        self.width, self.height = spec.size
        rng = np.random.default_rng(spec.seed)
        gh, gw = -(-self.height // CELL), -(-self.width // CELL)
        grid = _field_mask(rng, gh, gw, spec.coverage, spec.border)
        self.ink = _ink_strokes(gh, gw, mpp) if spec.ink else {}
        if self.ink:  # strokes lie on glass: carve the tissue away under them, with a 40 µm margin
            cover = np.maximum.reduce(list(self.ink.values())) > 0
            grid &= ~ndi.binary_dilation(cover, iterations=int(40 / (mpp * CELL)) + 1)
        self.grid = grid
        self.scene = build_scene(spec.kind, rng, self.height, self.width, mpp=mpp)
        h_dir = H_OD if spec.h_od is None else np.asarray(spec.h_od) / np.linalg.norm(spec.h_od)
        self.style = StainStyle(h_od=h_dir * spec.h_scale, e_od=E_OD * spec.e_scale,
                                background=np.asarray(spec.background, np.float64), blur=0.6, noise=3.0,
                                seed=int(rng.integers(2**32)))

    def _cells(self, arr: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
        gy0, gx0 = y // CELL, x // CELL
        sub = arr[gy0 : (y + h - 1) // CELL + 1, gx0 : (x + w - 1) // CELL + 1]
        sub = np.repeat(np.repeat(sub, CELL, axis=0), CELL, axis=1)
        return sub[y - gy0 * CELL : y - gy0 * CELL + h, x - gx0 * CELL : x - gx0 * CELL + w]

    def mask(self, x: int = 0, y: int = 0, w: int | None = None, h: int | None = None) -> np.ndarray:
        """Truth mask (bool (h, w)) of a level-0 region."""
        w = self.width - x if w is None else w
        h = self.height - y if h is None else h
        return self._cells(self.grid, x, y, w, h)

    def render(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of a level-0 region."""
        m = self.mask(x, y, w, h)
        rgb = self.style.glass(h, w, y, x)
        if m.any():
            rgb = np.where(m[..., None], render_window(self.scene, self.style, y, x, h, w), rgb)
        if not (self.spec.falloff or self.ink):
            return rgb
        out = rgb.astype(np.float32)
        for name, cover in self.ink.items():
            a = self._cells(cover, x, y, w, h)
            if a.any():
                out *= np.exp(-a[..., None] * np.asarray(INK_OD[name], np.float32))
        if self.spec.falloff:
            ys = (np.arange(y, y + h, dtype=np.float32) + 0.5) / self.height * 2 - 1
            xs = (np.arange(x, x + w, dtype=np.float32) + 0.5) / self.width * 2 - 1
            r2 = (ys[:, None] ** 2 + xs[None, :] ** 2) / 2.0  # 1 in the corners
            out *= (1.0 - self.spec.falloff * r2)[..., None]
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def make_hard_slide(path: str | Path, name: str, mpp: float = 0.5) -> HardSlide:
    """Write the hard slide ``name`` (a key of :data:`HARD_SLIDES`) as an SVS and return its truth."""
    scene = HardScene(HARD_SLIDES[name], mpp)
    write_slide(path, TileSource(scene.render, scene.width, scene.height), mpp=mpp, layout="svs", levels=(1, 4))
    return HardSlide(name, Path(path), scene.mask(), mpp)


def patch_truth(truth: np.ndarray, patch_px: int) -> np.ndarray:
    """True tissue fraction of every patch of the global grid anchored at (0, 0): (rows, cols)."""
    h, w = truth.shape
    ny, nx = h // patch_px, w // patch_px
    blocks = truth[: ny * patch_px, : nx * patch_px].reshape(ny, patch_px, nx, patch_px)
    return blocks.sum(axis=(1, 3), dtype=np.int64) / float(patch_px * patch_px)


@dataclass(frozen=True)
class PatchScore:
    """Kept patches against the truth: counts and the share of kept patches on tissue."""

    kept: int
    truth: int
    on_tissue: float

    @property
    def count_error(self) -> float:
        """Relative error of the kept count against the truth count."""
        return (self.kept - self.truth) / max(self.truth, 1)


def score_patches(coords: np.ndarray, truth: np.ndarray, patch_px: int, min_tissue: float,
                  on_tissue_min: float) -> PatchScore:
    """Compare kept level-0 patch corners with the truth mask.

    ``truth`` counts the grid patches whose true tissue fraction is ≥ ``min_tissue``;
    ``on_tissue`` is the share of kept patches whose true fraction is ≥ ``on_tissue_min``.
    """
    frac = patch_truth(truth, patch_px)
    coords = np.asarray(coords).reshape(-1, 2)
    kept = frac[coords[:, 1] // patch_px, coords[:, 0] // patch_px] if len(coords) else np.zeros(0)
    on = float((kept >= on_tissue_min).mean()) if len(kept) else 1.0
    return PatchScore(len(coords), int((frac >= min_tissue - 1e-9).sum()), on)


__all__ = ["HARD_SLIDES", "HardScene", "HardSlide", "HardSpec", "PatchScore", "make_hard_slide", "patch_truth",
           "score_patches"]
