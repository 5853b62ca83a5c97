"""Beer–Lambert H&E colour model with per-image stain and imaging jitter.

Morphologies render two stain *concentration* maps (haematoxylin ``h`` and eosin ``e``,
about 0–2). Colour is ``background * exp(-(h * s_h * v_H + e * s_e * v_E))`` with optical-
density vectors near Ruifrok & Johnston's, so that ``skimage.color.rgb2hed`` separates
them again. A :class:`StainStyle` draws stain vectors, intensities, background, blur and
sensor noise per image (or per slide), so class colours overlap and only morphology tells
the classes apart.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ._noise import pixel_noise

#: Optical density per unit concentration (R, G, B), unit-normalised.
H_OD = np.array([0.65, 0.70, 0.29])
E_OD = np.array([0.10, 0.90, 0.35])
#: Clear-glass colour before jitter.
GLASS_RGB = np.array([243.0, 241.0, 245.0])


@dataclass(frozen=True)
class StainStyle:
    """One image's (or slide's) staining and scanning appearance."""

    h_od: np.ndarray  # (3,) haematoxylin OD vector × intensity
    e_od: np.ndarray  # (3,) eosin OD vector × intensity
    background: np.ndarray  # (3,) clear-glass RGB
    blur: float  # Gaussian blur sigma, px
    noise: float  # sensor noise amplitude, grey levels
    seed: int  # seed of the pixel noise

    @classmethod
    def random(cls, rng: np.random.Generator, strength: float = 1.0) -> StainStyle:
        """Draw a plausible staining; ``strength`` scales every jitter (0 = the nominal stain)."""
        j = float(strength)

        def vec(base: np.ndarray, hue: float) -> np.ndarray:
            v = np.clip(base + rng.normal(0, hue * j, 3), 0.02, None)
            return v / np.linalg.norm(v)

        h_amt = np.exp(rng.normal(0, 0.22 * j))
        e_amt = np.exp(rng.normal(0, 0.30 * j))
        bg = GLASS_RGB + rng.normal(0, 4 * j, 3) - rng.uniform(0, 10 * j)
        return cls(
            h_od=vec(H_OD, 0.06) * h_amt,
            e_od=vec(E_OD, 0.08) * e_amt,
            background=np.clip(bg, 200, 255),
            blur=float(rng.uniform(0.0, 1.1) * j),
            noise=float(rng.uniform(1.0, 5.0) * j),
            seed=int(rng.integers(2**32)),
        )

    def to_rgb(self, h: np.ndarray, e: np.ndarray, y0: int = 0, x0: int = 0) -> np.ndarray:
        """Concentrations (H, W) → RGB uint8 (H, W, 3); ``(y0, x0)`` places the sensor noise.

        Blur is not applied here: blur the concentration maps first (see ``render_window``).
        """
        out = np.empty((*h.shape, 3), np.uint8)
        noise = None
        if self.noise > 0:
            noise = pixel_noise(y0, x0, h.shape[0], h.shape[1], self.seed) * np.float32(self.noise) + 0.5
        for c in range(3):
            od = h * np.float32(self.h_od[c]) + e * np.float32(self.e_od[c])
            chan = np.exp(-od) * np.float32(self.background[c])
            chan = chan + noise if noise is not None else chan + 0.5
            np.clip(chan, 0, 255, out=chan)
            out[..., c] = chan
        return out


    def glass(self, h: int, w: int, y0: int = 0, x0: int = 0) -> np.ndarray:
        """Bare glass: what :meth:`to_rgb` gives for zero stain, computed directly."""
        noise = (pixel_noise(y0, x0, h, w, self.seed) * np.float32(self.noise) if self.noise > 0
                 else np.zeros((h, w), np.float32)) + np.float32(0.5)
        out = np.empty((h, w, 3), np.uint8)
        for c in range(3):
            out[..., c] = np.clip(noise + np.float32(self.background[c]), 0, 255)
        return out


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode with JPEG at ``quality`` (block and ringing artefacts)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))
