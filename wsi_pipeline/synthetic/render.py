"""Render single-morphology images (whole canvases and ROI patches)."""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import ConfigError
from . import stroma as _stroma  # noqa: F401  (registers "stroma")
from . import tumour as _tumour  # noqa: F401  (registers the tumour kinds)
from ._noise import blur_radius, separable_blur
from .scene import Scene, build_scene, registered_kinds
from .stain import StainStyle, jpeg_roundtrip

#: Tumour morphologies, in label order; a slide's tumour area is one of these.
TUMOUR_CLASSES: tuple[str, ...] = ("glandular", "solid", "lymphoid")
#: Every morphology: the tumour classes plus normal stroma.
TISSUE_CLASSES: tuple[str, ...] = (*TUMOUR_CLASSES, "stroma")


def single_thread_blas() -> contextlib.AbstractContextManager[object]:
    """Limit BLAS to one thread: the noise matmuls are tiny and threads only add overhead."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def make_rng(seed: int | None = None, rng: np.random.Generator | None = None) -> np.random.Generator:
    """``rng`` if given, else a generator seeded with ``seed`` (0 when both are ``None``)."""
    if rng is not None:
        if not isinstance(rng, np.random.Generator):
            raise ConfigError(f"rng must be a numpy Generator, got {type(rng).__name__}")
        return rng
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(0 if seed is None else int(seed))


def render_window(scene: Scene, style: StainStyle, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """RGB ``uint8`` (h, w, 3) of a window of ``scene`` under ``style`` (blurred with context)."""
    pad = blur_radius(style.blur)
    hmap, emap = scene.render(y0 - pad, x0 - pad, h + 2 * pad, w + 2 * pad)
    if pad:
        hmap, emap = separable_blur(hmap, style.blur), separable_blur(emap, style.blur)
    return style.to_rgb(hmap, emap, y0, x0)


def render_tissue(
    kind: str, height: int, width: int, *, mpp: float = 0.5, seed: int | None = None,
    rng: np.random.Generator | None = None, stain_jitter: float = 1.0,
) -> np.ndarray:
    """One morphology filling an ``height × width`` canvas, as RGB ``uint8``.

    Parameters
    ----------
    kind : one of :data:`TISSUE_CLASSES` (or another registered kind).
    height, width : canvas size in pixels.
    mpp : µm per pixel; every structure has its physical size at this resolution.
    seed, rng : randomness; ``rng`` wins when both are given.
    stain_jitter : scale of the stain/scan jitter (0 = nominal H&E, no blur or noise).
    """
    gen = make_rng(seed, rng)
    scene = build_scene(kind, gen, int(height), int(width), mpp=mpp)
    style = StainStyle.random(gen, stain_jitter)
    with single_thread_blas():
        return render_window(scene, style, 0, 0, int(height), int(width))


def render_roi(kind: str, size: int = 256, *, mpp: float = 0.5, seed: int | None = None,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """A ``size × size`` ROI patch of ``kind`` with stain, blur, noise and JPEG-like artefacts."""
    gen = make_rng(seed, rng)
    rgb = render_tissue(kind, size, size, mpp=mpp, rng=gen)
    if gen.random() < 0.7:
        rgb = jpeg_roundtrip(rgb, int(gen.integers(55, 96)))
    return rgb


__all__ = ["TISSUE_CLASSES", "TUMOUR_CLASSES", "make_rng", "registered_kinds", "render_roi", "render_tissue",
           "render_window"]
