"""Window-independent noise: hashed lattices, cubic B-spline value noise, point layouts.

Every field here is a pure function of global pixel coordinates and an integer seed, so a
slide rendered tile by tile is identical to one rendered in one piece (no seams) and no
full-canvas lattice is ever stored.
"""

from __future__ import annotations

import numpy as np

_M1, _M2, _M3, _M4 = (np.uint32(v) for v in (0x27D4EB2D, 0x165667B1, 0x2C1B3C6D, 0x297A2D39))


def hash_uniform(iy: np.ndarray, ix: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) float32 per integer lattice point ``(iy, ix)`` (broadcast), from ``seed``."""
    with np.errstate(over="ignore"):
        y = np.asarray(iy, dtype=np.int64).astype(np.uint32)
        x = np.asarray(ix, dtype=np.int64).astype(np.uint32)
        h = (y * _M1) ^ (x * _M2) ^ np.uint32(seed & 0xFFFFFFFF)
        h ^= h >> np.uint32(15)
        h *= _M3
        h ^= h >> np.uint32(12)
        h *= _M4
        h ^= h >> np.uint32(15)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def pixel_noise(y0: int, x0: int, h: int, w: int, seed: int) -> np.ndarray:
    """White noise in [-1, 1) for the window ``[y0, y0+h) × [x0, x0+w)`` (global pixels)."""
    iy = np.arange(y0, y0 + h)[:, None]
    ix = np.arange(x0, x0 + w)[None, :]
    return hash_uniform(iy, ix, seed) * 2.0 - 1.0


def fine_noise(y0: int, x0: int, h: int, w: int, seed: int) -> np.ndarray:
    """Grainy noise correlated over ~2 px, about unit std (hash noise smoothed by [1, 2, 1]²)."""
    n = pixel_noise(y0 - 1, x0 - 1, h + 2, w + 2, seed)
    n = n[:-2] + 2 * n[1:-1] + n[2:]
    n = n[:, :-2] + 2 * n[:, 1:-1] + n[:, 2:]
    return n * np.float32(np.sqrt(3.0) / 6.0)


def separable_blur(arr: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2-D array, ``valid`` mode: the result is ``2 * blur_radius(sigma)`` smaller."""
    r = blur_radius(sigma)
    if r == 0:
        return arr
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    h, w = arr.shape
    out = k[0] * arr[: h - 2 * r]
    for i in range(1, 2 * r + 1):
        out = out + k[i] * arr[i : h - 2 * r + i]
    res = k[0] * out[:, : w - 2 * r]
    for i in range(1, 2 * r + 1):
        res = res + k[i] * out[:, i : w - 2 * r + i]
    return res


def blur_radius(sigma: float) -> int:
    """Kernel half-width used by :func:`separable_blur` (0 = no blur)."""
    return int(np.ceil(2.5 * sigma)) if sigma > 0.05 else 0


def _bspline_weights(t: np.ndarray) -> np.ndarray:
    """Cubic B-spline weights (..., 4) for lattice offsets -1, 0, 1, 2 at fraction ``t``."""
    t2, t3 = t * t, t * t * t
    return np.stack(
        [(1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6], axis=-1
    ).astype(np.float32)


def _variance_factor() -> float:
    w = _bspline_weights(np.linspace(0, 1, 1001, dtype=np.float64))
    return float((w**2).sum(axis=1).mean())


#: std of 2-D B-spline value noise built from lattice values uniform in [-1, 1).
_STD = float(np.sqrt(1.0 / 3.0) * _variance_factor())


def _interp_matrix(coords: np.ndarray, cell: float) -> tuple[np.ndarray, int]:
    """Dense (len(coords), n_lattice) interpolation matrix and the first lattice index."""
    q = (coords.astype(np.float64) + 0.5) / cell
    i0 = np.floor(q).astype(np.int64)
    w = _bspline_weights(q - i0)
    lo = int(i0.min()) - 1
    n = int(i0.max()) + 3 - lo
    mat = np.zeros((coords.size, n), np.float32)
    rows = np.arange(coords.size)
    for k in range(4):
        mat[rows, i0 - 1 + k - lo] = w[:, k]
    return mat, lo


class ValueNoise:
    """Smooth noise with feature size ``cell`` px, roughly zero-mean and unit-std.

    Parameters
    ----------
    seed : integer seed of the hashed lattice.
    cell : lattice spacing in pixels (the blob size is about ``cell``).
    """

    def __init__(self, seed: int, cell: float) -> None:
        self.seed = int(seed)
        self.cell = max(float(cell), 1.0)

    def grid(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Values on the separable grid ``ys × xs`` (1-D global pixel coordinates)."""
        wy, ly = _interp_matrix(np.asarray(ys), self.cell)
        wx, lx = _interp_matrix(np.asarray(xs), self.cell)
        lat = hash_uniform(np.arange(ly, ly + wy.shape[1])[:, None], np.arange(lx, lx + wx.shape[1])[None, :],
                           self.seed)
        lat = lat * np.float32(2.0 / _STD) - np.float32(1.0 / _STD)
        return (wy @ lat) @ wx.T

    def window(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Values on the pixel window ``[y0, y0+h) × [x0, x0+w)``."""
        return self.grid(np.arange(y0, y0 + h), np.arange(x0, x0 + w))

    def at(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Values at scattered points (1-D arrays of equal length)."""
        qy = (np.asarray(ys, np.float64) + 0.5) / self.cell
        qx = (np.asarray(xs, np.float64) + 0.5) / self.cell
        iy, ix = np.floor(qy).astype(np.int64), np.floor(qx).astype(np.int64)
        wy, wx = _bspline_weights(qy - iy), _bspline_weights(qx - ix)
        k = np.arange(-1, 3)
        lat = hash_uniform((iy[:, None] + k)[:, :, None], (ix[:, None] + k)[:, None, :], self.seed)
        lat = lat * np.float32(2.0 / _STD) - np.float32(1.0 / _STD)
        return np.einsum("ni,nij,nj->n", wy, lat, wx)


class GrainNoise:
    """Pixel-scale grain (:func:`fine_noise`) with the ``window`` interface of :class:`ValueNoise`."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def window(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return fine_noise(y0, x0, h, w, self.seed)


class Fbm:
    """A sum of ``octaves`` :class:`ValueNoise` layers, each half the size and amplitude."""

    def __init__(self, rng: np.random.Generator, cell: float, octaves: int = 3, gain: float = 0.5) -> None:
        self.layers = [ValueNoise(int(rng.integers(2**32)), cell / 2**k) for k in range(octaves)]
        amps = np.array([gain**k for k in range(octaves)])
        self.amps = (amps / np.sqrt((amps**2).sum())).astype(np.float32)

    def window(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return sum(a * n.window(y0, x0, h, w) for a, n in zip(self.amps, self.layers, strict=True))

    def grid(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return sum(a * n.grid(ys, xs) for a, n in zip(self.amps, self.layers, strict=True))

    def at(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return sum(a * n.at(ys, xs) for a, n in zip(self.amps, self.layers, strict=True))


def smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at ``lo`` to 1 at ``hi``."""
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def hex_points(
    rng: np.random.Generator, box: tuple[float, float, float, float], spacing: float, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """Centres of a randomly rotated, jittered hexagonal packing covering ``box``.

    ``box`` is ``(y_lo, x_lo, y_hi, x_hi)`` in pixels; ``jitter`` is the displacement std as a
    fraction of ``spacing``. Returns ``(ys, xs)`` float arrays.
    """
    y_lo, x_lo, y_hi, x_hi = box
    cy, cx = (y_lo + y_hi) / 2, (x_lo + x_hi) / 2
    half = 0.5 * np.hypot(y_hi - y_lo, x_hi - x_lo) + spacing
    row = spacing * np.sqrt(3.0) / 2
    j, i = np.meshgrid(np.arange(-half, half, spacing), np.arange(-half, half, row))
    j = j + (np.round(i / row) % 2) * spacing / 2
    a = rng.uniform(0, np.pi)
    ys = cy + i * np.cos(a) - j * np.sin(a)
    xs = cx + i * np.sin(a) + j * np.cos(a)
    inside = (ys >= y_lo) & (ys < y_hi) & (xs >= x_lo) & (xs < x_hi)
    ys, xs = ys[inside], xs[inside]
    ys = ys + rng.normal(0, jitter * spacing, ys.size)
    xs = xs + rng.normal(0, jitter * spacing, xs.size)
    return ys, xs


def poisson_points(
    rng: np.random.Generator, box: tuple[float, float, float, float], per_px2: float
) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random points in ``box`` with mean density ``per_px2`` (points per pixel²)."""
    y_lo, x_lo, y_hi, x_hi = box
    n = rng.poisson(max(per_px2, 0.0) * (y_hi - y_lo) * (x_hi - x_lo))
    return rng.uniform(y_lo, y_hi, n), rng.uniform(x_lo, x_hi, n)
