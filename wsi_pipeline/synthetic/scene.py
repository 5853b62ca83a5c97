"""Morphology scenes: the base class, the registry and the shared nucleus model.

A *scene* lays one morphology's objects (nuclei, glands, fat cells, ...) out over a
canvas once, from a numpy ``Generator``, and then renders any pixel window of it as two
stain-concentration maps ``(h, e)``. Rendering draws no random numbers, so windows
tile seamlessly and a tiled slide equals one rendered in one piece. All sizes are in µm
and converted with the scene's ``px`` (pixels per µm, including the per-image ±20 %
scale jitter).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from ..errors import ConfigError
from ._noise import GrainNoise, smoothstep
from ._stamp import Blobs, Patch, edge, stamp

#: ``keep(ys, xs, radius_px) -> bool``: whether objects there can be visible (slide compositing).
Keep = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class Scene(ABC):
    """One morphology laid out over ``height × width`` pixels at ``mpp`` µm/px.

    Parameters
    ----------
    rng : source of every random choice (consumed only here, in ``__init__``).
    height, width : canvas size in pixels (objects are also laid out in a margin around it).
    mpp : µm per pixel.
    keep : optional predicate dropping objects that no window will show.
    """

    #: registry name, set by :func:`register_kind`
    kind: str = ""

    def __init__(self, rng: np.random.Generator, height: int, width: int, *, mpp: float = 0.5,
                 keep: Keep | None = None) -> None:
        self.height, self.width, self.mpp = int(height), int(width), float(mpp)
        self.scale = float(rng.uniform(0.8, 1.2))
        self.px = self.scale / self.mpp
        self._keep = keep
        self.grain = GrainNoise(int(rng.integers(2**32)))
        self.layout(rng)

    @abstractmethod
    def layout(self, rng: np.random.Generator) -> None:
        """Draw every random parameter and object of the scene."""

    @abstractmethod
    def render(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Haematoxylin and eosin concentrations (float32, ``(h, w)``) of a pixel window."""

    # -- helpers for subclasses -------------------------------------------------------------
    def um(self, value: float | np.ndarray) -> float | np.ndarray:
        """Nominal µm → pixels of this scene."""
        return value * self.px

    def box(self, margin_um: float) -> tuple[float, float, float, float]:
        """Canvas plus a margin, as ``(y_lo, x_lo, y_hi, x_hi)`` in px."""
        m = float(self.um(margin_um))
        return -m, -m, self.height + m, self.width + m

    def keep(self, blobs: Blobs, reach: float = 1.0) -> Blobs:
        """Drop objects the ``keep`` predicate rules out (no-op without one)."""
        if self._keep is None or blobs.n == 0:
            return blobs
        return blobs.subset(self._keep(blobs.cy, blobs.cx, blobs.a * reach))

    def coords(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Broadcastable global pixel-centre coordinates of a window, float32."""
        return (np.arange(y0, y0 + h, dtype=np.float32)[:, None],
                np.arange(x0, x0 + w, dtype=np.float32)[None, :])

    def stamp_nuclei(self, hmap: np.ndarray, y0: int, x0: int, blobs: Blobs, grain: np.ndarray) -> None:
        """Stamp nuclei into ``hmap`` (max) with chromatin ``grain`` texture."""
        layer = np.zeros_like(hmap)
        reach = 1.0 + blobs.extra["irr2"] + blobs.extra["irr3"] if blobs.n else 1.0
        stamp([layer], y0, x0, blobs, nucleus_profile, reach=reach)
        layer *= 0.82 + 0.3 * grain
        np.maximum(hmap, layer, out=hmap)


_KINDS: dict[str, type[Scene]] = {}


def register_kind(name: str) -> Callable[[type[Scene]], type[Scene]]:
    """Class decorator adding a :class:`Scene` subclass to the registry under ``name``."""

    def deco(cls: type[Scene]) -> type[Scene]:
        if name in _KINDS:
            raise ConfigError(f"tissue kind {name!r} is already registered; pick another name")
        cls.kind = name
        _KINDS[name] = cls
        return cls

    return deco


def registered_kinds() -> tuple[str, ...]:
    """Names of every registered morphology, in registration order."""
    return tuple(_KINDS)


def build_scene(kind: str, rng: np.random.Generator, height: int, width: int, *, mpp: float = 0.5,
                keep: Keep | None = None) -> Scene:
    """Lay out the morphology ``kind``; unknown names raise :class:`ConfigError`."""
    try:
        cls = _KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown tissue kind {kind!r}; use one of {', '.join(_KINDS)}") from None
    if height <= 0 or width <= 0:
        raise ConfigError(f"canvas size must be positive, got {height}x{width}")
    if not (np.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"mpp must be a positive number, got {mpp}")
    return cls(rng, height, width, mpp=mpp, keep=keep)


# -- nuclei -------------------------------------------------------------------------------
_NUCLEUS_DEFAULTS = {"dark": 1.0, "ves": 0.0, "irr2": 0.0, "ph2": 0.0, "irr3": 0.0, "ph3": 0.0,
                     "nuc_y": 0.0, "nuc_x": 0.0, "nuc_r": 0.0}


def make_nuclei(cy: np.ndarray, cx: np.ndarray, a: np.ndarray, b: np.ndarray, theta: np.ndarray,
                **extra: np.ndarray | float) -> Blobs:
    """Nuclei as :class:`Blobs`; missing profile parameters take neutral defaults.

    ``dark`` is the haematoxylin concentration, ``ves`` (0–1) how vesicular (pale centre,
    dark rim), ``irr2``/``irr3`` boundary irregularity, ``nuc_*`` a nucleolus (offset as a
    fraction of the semi-axes, radius in px; radius 0 = none).
    """
    n = np.asarray(cy).size
    full = {k: np.broadcast_to(np.asarray(extra.get(k, d), np.float32), (n,)).copy()
            for k, d in _NUCLEUS_DEFAULTS.items()}
    theta = np.broadcast_to(np.asarray(theta, np.float64), (n,))
    return Blobs(np.asarray(cy, np.float64), np.asarray(cx, np.float64), np.broadcast_to(a, (n,)).astype(np.float64),
                 np.broadcast_to(b, (n,)).astype(np.float64), theta.copy(), full)


def nucleus_profile(p: Patch) -> list[np.ndarray]:
    """Haematoxylin of an irregular, optionally vesicular ellipse with a nucleolus."""
    b = p.param("b")
    d = p.rho
    if np.any(p.param("irr2") > 0) or np.any(p.param("irr3") > 0):
        d = d / (1.0 + harmonics(p, {2: ("irr2", "ph2"), 3: ("irr3", "ph3")}))
    body = p.param("dark")
    ves = p.param("ves")
    if np.any(ves > 0):
        body = body * (1.0 - 0.72 * ves * (1.0 - smoothstep(0.45, 0.92, d)))
    nuc_r = p.param("nuc_r")
    if np.any(nuc_r > 0):
        dist2 = ((p.u - p.param("nuc_y") * p.param("a")) ** 2 + (p.v - p.param("nuc_x") * b) ** 2)
        spot = np.where(nuc_r > 0, 1.25 * p.param("dark") * np.exp(-dist2 / np.maximum(nuc_r, 0.1) ** 2), 0.0)
        body = np.maximum(body, spot)
    return [edge(1.0 - d, b) * body]


def harmonics(p: Patch, terms: dict[int, tuple[str, str]]) -> np.ndarray:
    """``sum_k amp_k * cos(k * phi + phase_k)`` around each ellipse, without trigonometry per pixel.

    ``phi`` is the elliptical angle of each pixel; ``terms`` maps the order k (2, 3 or 4) to
    the names of its amplitude and phase parameters.
    """
    inv = 1.0 / np.maximum(p.rho, 1e-6)
    c, s = p.u / p.param("a") * inv, p.v / p.param("b") * inv  # cos(phi), sin(phi)
    c2, s2 = c * c - s * s, 2 * c * s
    trig = {2: lambda: (c2, s2), 3: lambda: (c * c2 - s * s2, s * c2 + c * s2),
            4: lambda: (c2 * c2 - s2 * s2, 2 * s2 * c2)}
    out = np.zeros_like(p.rho)
    ex = p.blobs.extra
    for k, (amp, phase) in terms.items():
        ck, sk = trig[k]()
        amp_i, ph_i = ex[amp][p.idx], ex[phase][p.idx]
        out += p.gather_local(amp_i * np.cos(ph_i)) * ck - p.gather_local(amp_i * np.sin(ph_i)) * sk
    return out


def circle_profile(p: Patch) -> list[np.ndarray]:
    """1 inside the ellipse, anti-aliased edge (fat cells, lumens, red cells)."""
    return [edge(1.0 - p.rho, p.param("b"))]

