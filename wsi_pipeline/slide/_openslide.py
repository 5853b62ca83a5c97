"""OpenSlide backend (openslide-python with the openslide-bin wheel)."""

from __future__ import annotations

import importlib.util
import logging
from typing import ClassVar

import numpy as np

from ._mpp import normalise_metadata
from .base import SlideInfo, register_backend

_logger = logging.getLogger(__name__)

#: File extensions OpenSlide may open (it decides by content; these are only probed).
OPENSLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm"}
)


def _available() -> bool:
    return importlib.util.find_spec("openslide") is not None


def _version() -> str:
    import openslide

    return f"openslide {openslide.__library_version__} (python {openslide.__version__})"


def premultiplied_rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's premultiplied RGBA on white: ``rgb + (255 - alpha)``."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = rgb.astype(np.uint16) + (255 - alpha)
    return np.minimum(out, 255).astype(np.uint8)


class OpenSlideBackend:
    """One ``openslide.OpenSlide`` handle."""

    name: ClassVar[str] = "openslide"

    def __init__(self, path: str) -> None:
        import openslide

        self._slide = openslide.OpenSlide(path)
        props = {str(k): str(v) for k, v in self._slide.properties.items()}
        meta = normalise_metadata(props)
        self._info = SlideInfo(
            path=path,
            backend=self.name,
            backend_version=_version(),
            level_dimensions=tuple((int(w), int(h)) for w, h in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp_x=meta.mpp_x,
            mpp_y=meta.mpp_y,
            mpp_source=meta.mpp_source,
            objective_power=meta.objective_power,
            vendor=meta.vendor,
            properties=props,
        )

    @property
    def info(self) -> SlideInfo:
        return self._info

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3); transparent (unscanned or out-of-bounds) pixels are white."""
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            return np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)
        region = self._slide.read_region((int(location[0]), int(location[1])), int(level), (w, h))
        return premultiplied_rgba_to_rgb(np.asarray(region))

    def close(self) -> None:
        self._slide.close()


register_backend(
    OpenSlideBackend.name,
    OpenSlideBackend,
    priority=10,
    extensions=OPENSLIDE_EXTENSIONS,
    is_available=_available,
    version=_version,
)
