"""Vectorised stamping of many small objects (nuclei, fat cells, glands) into pixel windows.

An object set is a :class:`Blobs` (centre, semi-axes, angle and free per-object
parameters). :func:`stamp` finds, for every object overlapping the window, the pixels
within its elliptical support (a quadratic form over an ``(N, S, S)`` patch, in bounded
batches), evaluates a profile on just those pixels and merges the values into the target
layers with ``np.maximum.at``, so overlapping objects never add up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Largest number of patch pixels evaluated at once (bounds the temporary memory).
_BATCH_PIXELS = 2_000_000


@dataclass
class Blobs:
    """Ellipse-like objects in global pixel coordinates.

    ``a``/``b`` are the semi-axes (px) along/across the angle ``theta`` (radians, x towards
    y); ``extra`` holds any further per-object parameters, all of length ``n``.
    """

    cy: np.ndarray
    cx: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.cy.size)

    def subset(self, keep: np.ndarray) -> Blobs:
        return Blobs(self.cy[keep], self.cx[keep], self.a[keep], self.b[keep], self.theta[keep],
                     {k: v[keep] for k, v in self.extra.items()})

    @staticmethod
    def concat(parts: Sequence[Blobs]) -> Blobs:
        keys = set.intersection(*(set(p.extra) for p in parts)) if parts else set()
        cat = np.concatenate
        return Blobs(cat([p.cy for p in parts]), cat([p.cx for p in parts]), cat([p.a for p in parts]),
                     cat([p.b for p in parts]), cat([p.theta for p in parts]),
                     {k: cat([p.extra[k] for p in parts]) for k in keys})


class Patch:
    """The pixels of a batch that lie inside objects' support, as flat arrays.

    ``dy``/``dx`` are offsets (px) from the owning object's centre and ``rho`` the
    elliptical radius (1 on the nominal boundary); the owner of pixel ``i`` is object
    ``idx[local[i]]`` of the Blobs. ``u``/``v`` (offsets along/across the major axis) are
    computed on first use.
    """

    def __init__(self, dy: np.ndarray, dx: np.ndarray, rho: np.ndarray, idx: np.ndarray, local: np.ndarray,
                 blobs: Blobs) -> None:
        self.dy, self.dx, self.rho, self.idx, self.local, self.blobs = dy, dx, rho, idx, local, blobs
        self._uv: tuple[np.ndarray, np.ndarray] | None = None

    def gather(self, per_object: np.ndarray) -> np.ndarray:
        """Per-pixel values of a per-object array (over all the Blobs' objects)."""
        return self.gather_local(np.asarray(per_object)[self.idx])

    def gather_local(self, per_batch_object: np.ndarray) -> np.ndarray:
        """Per-pixel values of an array over this batch's objects (``blobs[idx]``)."""
        return np.asarray(per_batch_object, np.float32)[self.local]

    def param(self, name: str) -> np.ndarray:
        """Per-pixel value of an object parameter (``a``, ``b``, ``theta`` or an extra)."""
        src = {"a": self.blobs.a, "b": self.blobs.b, "theta": self.blobs.theta}.get(name)
        return self.gather(src if src is not None else self.blobs.extra[name])

    @property
    def u(self) -> np.ndarray:
        return self._rotated()[0]

    @property
    def v(self) -> np.ndarray:
        return self._rotated()[1]

    def _rotated(self) -> tuple[np.ndarray, np.ndarray]:
        if self._uv is None:
            t = self.blobs.theta[self.idx]
            c, s = np.cos(t).astype(np.float32)[self.local], np.sin(t).astype(np.float32)[self.local]
            self._uv = (self.dx * c + self.dy * s, self.dy * c - self.dx * s)
        return self._uv


Profile = Callable[[Patch], Sequence[np.ndarray]]


def stamp(
    layers: Sequence[np.ndarray], y0: int, x0: int, blobs: Blobs, profile: Profile,
    reach: float | np.ndarray = 1.0,
) -> None:
    """Merge ``profile`` values of every object into ``layers`` (windows at ``(y0, x0)``) by max.

    Parameters
    ----------
    layers : 2-D float32 C-contiguous arrays of the same shape, modified in place.
    y0, x0 : global coordinates of the windows' top-left pixel.
    blobs : the objects.
    profile : ``Patch -> values``, one flat array per layer.
    reach : elliptical radius (scalar or per object) beyond which the profile is zero; the
        profile is evaluated up to ``reach`` plus one pixel of anti-aliasing.
    """
    if blobs.n == 0:
        return
    h, w = layers[0].shape
    support = np.broadcast_to(np.asarray(reach, np.float64), (blobs.n,)) + 0.6 / blobs.b
    half = np.ceil(blobs.a * support + 1.0).astype(np.int64)
    hit = ((blobs.cy + half >= y0) & (blobs.cy - half < y0 + h)
           & (blobs.cx + half >= x0) & (blobs.cx - half < x0 + w))
    order = np.flatnonzero(hit)
    if order.size == 0:
        return
    order = order[np.argsort(half[order], kind="stable")]  # similar sizes batch together
    flats = [lay.reshape(-1) for lay in layers]
    start = 0
    while start < order.size:
        size = 2 * int(half[order[start]]) + 1
        stop = min(order.size, start + max(1, _BATCH_PIXELS // (size * size)))
        stop = start + int(np.searchsorted(half[order[start:stop]], half[order[start]] * 1.25, side="right"))
        idx = order[start:stop]
        _stamp_batch(flats, h, w, y0, x0, blobs, idx, int(half[idx].max()), support[idx], profile)
        start = stop


def _stamp_batch(
    flats: list[np.ndarray], h: int, w: int, y0: int, x0: int, blobs: Blobs, idx: np.ndarray, s_half: int,
    support: np.ndarray, profile: Profile,
) -> None:
    off = np.arange(-s_half, s_half + 1)
    iy = np.floor(blobs.cy[idx]).astype(np.int64)
    ix = np.floor(blobs.cx[idx]).astype(np.int64)
    gy, gx = (iy - y0)[:, None] + off, (ix - x0)[:, None] + off  # (N, S) window rows / columns
    dy = ((iy - blobs.cy[idx])[:, None] + off).astype(np.float32)
    dx = ((ix - blobs.cx[idx])[:, None] + off).astype(np.float32)
    # rho² = A dx² + B dx dy + C dy² (the rotated ellipse as a quadratic form)
    t, a2, b2 = blobs.theta[idx], blobs.a[idx] ** 2, blobs.b[idx] ** 2
    c, s = np.cos(t), np.sin(t)
    qa = (c * c / a2 + s * s / b2).astype(np.float32)[:, None]
    qb = (2 * c * s * (1 / a2 - 1 / b2)).astype(np.float32)[:, None]
    qc = (s * s / a2 + c * c / b2).astype(np.float32)[:, None]
    row = np.where((gy >= 0) & (gy < h), qc * dy * dy, np.inf).astype(np.float32)
    col = np.where((gx >= 0) & (gx < w), qa * dx * dx, np.inf).astype(np.float32)
    q = row[:, :, None] + col[:, None, :]
    q += (qb * dy)[:, :, None] * dx[:, None, :]
    n, r, k = np.nonzero(q < (support.astype(np.float32) ** 2)[:, None, None])
    if n.size == 0:
        return
    patch = Patch(dy[n, r], dx[n, k], np.sqrt(np.maximum(q[n, r, k], 0.0)), idx, n, blobs)
    target = gy[n, r] * w + gx[n, k]
    for flat, val in zip(flats, profile(patch), strict=True):
        val = np.broadcast_to(np.asarray(val, np.float32), target.shape)
        m = val > 1e-3
        np.maximum.at(flat, target[m], val[m])


def edge(x: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """Anti-aliased inside test: 1 where ``x > 0``, 0 where ``x < 0``, ~1 px ramp (x in px/scale)."""
    return np.clip(x * scale + 0.5, 0.0, 1.0)
