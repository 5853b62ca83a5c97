"""tiffslide backend (pure Python: tifffile + zarr)."""

from __future__ import annotations

import importlib.util
import logging
import math
from typing import ClassVar

import numpy as np

from ._mpp import normalise_metadata
from ._tiff import check_data_extent, series_pages
from .base import SlideInfo, register_backend

_logger = logging.getLogger(__name__)

TIFFSLIDE_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide"})


def _available() -> bool:
    return importlib.util.find_spec("tiffslide") is not None


def _version() -> str:
    import tifffile
    import tiffslide

    return f"tiffslide {tiffslide.__version__} (tifffile {tifffile.__version__})"


def level_rect(
    location: tuple[int, int], downsample: float, size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) at a level: the level pixel containing the level-0 ``location``."""
    x0 = math.floor(location[0] / downsample)
    y0 = math.floor(location[1] / downsample)
    return x0, y0, x0 + int(size[0]), y0 + int(size[1])


class TiffSlideBackend:
    """One ``tiffslide.TiffSlide`` handle; regions are read from its zarr store."""

    name: ClassVar[str] = "tiffslide"

    def __init__(self, path: str) -> None:
        import tiffslide

        self._slide = tiffslide.TiffSlide(path)
        try:
            series = self._slide.ts_tifffile.series[int(self._slide.properties["tiffslide.series-index"])]
            if series.dtype != np.uint8:
                raise ValueError(f"unsupported sample type {series.dtype}; expected 8-bit RGB")
            self._axes = str(self._slide.properties["tiffslide.series-axes"])
            if self._axes not in ("YXS", "YX"):
                raise ValueError(f"unsupported axes {self._axes!r}; expected a 2-D RGB or grey image")
            check_data_extent(path, series_pages(series))
        except Exception:
            self._slide.close()
            raise
        props = {str(k): str(v) for k, v in self._slide.properties.items() if v is not None}
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
        """RGB uint8 (h, w, 3); out-of-bounds pixels are white."""
        from tiffslide._zarr import get_zarr_selection

        w, h = max(int(size[0]), 0), max(int(size[1]), 0)
        out = np.full((h, w, 3), 255, np.uint8)
        lw, lh = self._info.level_dimensions[level]
        x0, y0, x1, y1 = level_rect(location, self._info.level_downsamples[level], (w, h))
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, lw), min(y1, lh)
        if cx0 >= cx1 or cy0 >= cy1:
            return out
        rows, cols = slice(cy0, cy1), slice(cx0, cx1)
        selection = (rows, cols, slice(None)) if self._axes == "YXS" else (rows, cols, ...)
        arr = np.asarray(get_zarr_selection(self._slide.zarr_group, selection=selection, level=level))
        if arr.ndim == 2:
            arr = arr[..., None]
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = arr[..., :3] if arr.shape[2] >= 3 else arr[..., :1]
        return out

    def close(self) -> None:
        self._slide.close()


register_backend(
    TiffSlideBackend.name,
    TiffSlideBackend,
    priority=20,
    extensions=TIFFSLIDE_EXTENSIONS,
    is_available=_available,
    version=_version,
)
