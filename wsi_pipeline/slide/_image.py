"""Plain-image backend: PNG, JPEG or a non-pyramidal TIFF as a single-level "slide".

TIFFs are read lazily through tifffile's zarr store, so a region read decodes only the
strips or tiles it touches. PNG and JPEG are decoded once on first read (they are the
small ROI images this backend exists for). The resolution comes from the TIFF
resolution tags or the PNG/JPEG dpi, with the usual placeholder values ignored.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np

from ..errors import SlideOpenError, SlideReadError, UnsupportedFormatError
from ._mpp import TiffResolution, build_slide_info
from ._tiff import TIFF_LIBRARIES, check_data_extent, is_tiff_file_error, picture_problem
from .base import SlideInfo, raised_in, register_backend

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, both byte orders


def _version() -> str:
    import PIL
    import tifffile

    return f"pillow {PIL.__version__}, tifffile {tifffile.__version__}"


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """(h, w) or (h, w, c) uint8 to (h, w, 3); alpha is composited on white."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] in (2, 4):  # grey+alpha / RGBA: straight alpha over white
        color, alpha = arr[..., :-1].astype(np.uint16), arr[..., -1:].astype(np.uint16)
        arr = ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


class _TiffPixels:
    """Lazy (h, w, c) view of level 0 of a TIFF's first series."""

    def __init__(self, path: str) -> None:
        import tifffile

        self._tf = tifffile.TiffFile(path)
        try:
            self._init(path)
        except BaseException:
            self._tf.close()
            raise

    def _init(self, path: str) -> None:
        import zarr

        if not self._tf.series:
            raise SlideOpenError("the TIFF holds no image (no readable page)")
        series = self._tf.series[0]
        page = series.levels[0].keyframe
        check_data_extent(path, series.levels[0].pages)
        if page.dtype != np.uint8:
            raise UnsupportedFormatError(f"unsupported sample type {page.dtype}; expected 8-bit grey or RGB")
        self.axes = series.levels[0].axes
        problem = picture_problem(series)
        if problem is not None:
            raise UnsupportedFormatError(problem)
        self._z: Any = zarr.open_array(series.aszarr(level=0), mode="r")
        shape = series.levels[0].shape
        self.height, self.width = (shape[1], shape[2]) if self.axes == "SYX" else (shape[0], shape[1])
        tags = page.tags
        self.resolution = None
        if "XResolution" in tags and "YResolution" in tags:
            unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
            self.resolution = TiffResolution(_ratio(tags["XResolution"].value),
                                             _ratio(tags["YResolution"].value), int(unit))
        self.format = "TIFF"

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self.axes == "SYX":
            return np.moveaxis(np.asarray(self._z[:, y0:y1, x0:x1]), 0, -1)
        return np.asarray(self._z[y0:y1, x0:x1])

    def close(self) -> None:
        self._tf.close()


class _PilPixels:
    """PNG/JPEG: header now, pixels decoded once on first read."""

    def __init__(self, path: str) -> None:
        from PIL import Image

        self._path = path
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()  # CRC check: catches truncated or damaged files at open time
            self.format = str(im.format)
            self.width, self.height = im.size
            dpi = im.info.get("dpi")
        self.resolution = TiffResolution(float(dpi[0]), float(dpi[1]), "inch") if dpi else None
        self._pixels: np.ndarray | None = None

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self._pixels is None:
            from PIL import Image

            with Image.open(self._path) as im:
                mode = "RGBA" if ("A" in im.mode or "transparency" in im.info) else "RGB"
                self._pixels = _to_rgb(np.asarray(im.convert(mode)))
        return self._pixels[y0:y1, x0:x1]

    def close(self) -> None:
        self._pixels = None


def is_image_file_error(e: BaseException) -> bool:
    """What a damaged or unsupported image raises: the TIFF libraries' errors (see
    :func:`~._tiff.is_tiff_file_error`), and Pillow's (``UnidentifiedImageError`` is an
    ``OSError``; a broken PNG raises ``SyntaxError``, a huge one ``DecompressionBombError``)."""
    from PIL import Image

    if isinstance(e, Image.DecompressionBombError) or (isinstance(e, SyntaxError) and raised_in(e, ("PIL",))):
        return True
    return is_tiff_file_error(e, (*TIFF_LIBRARIES, "PIL"))


def _ratio(value: object) -> float:
    if isinstance(value, tuple):
        num, den = value
        return float(num) / float(den) if den else float("nan")
    return float(value)  # type: ignore[arg-type]


class ImageBackend:
    """A single-level slide over a plain image file."""

    name: ClassVar[str] = "image"

    def __init__(self, path: str) -> None:
        with open(path, "rb") as fh:
            is_tiff = fh.read(4) in _TIFF_MAGIC
        self._px: _TiffPixels | _PilPixels = _TiffPixels(path) if is_tiff else _PilPixels(path)
        props = {"image.format": self._px.format, "image.width": str(self._px.width),
                 "image.height": str(self._px.height)}
        res = self._px.resolution
        if res is not None:
            props.update({"image.XResolution": f"{res.x:g}", "image.YResolution": f"{res.y:g}",
                          "image.ResolutionUnit": str(res.unit)})
        self._info = build_slide_info(path, self.name, _version(), [(self._px.width, self._px.height)], [1.0],
                                      props, res)

    @property
    def info(self) -> SlideInfo:
        return self._info

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) at level 0 (the only level); out-of-bounds pixels are white."""
        if level != 0:
            raise SlideReadError(f"level {level} out of range (image has 1 level)")
        w, h = max(int(size[0]), 0), max(int(size[1]), 0)
        x0, y0 = int(location[0]), int(location[1])
        out = np.full((h, w, 3), 255, np.uint8)
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + w, self._px.width), min(y0 + h, self._px.height)
        if cx0 < cx1 and cy0 < cy1:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = _to_rgb(self._px.read(cy0, cy1, cx0, cx1))
        return out

    def close(self) -> None:
        self._px.close()


register_backend(
    ImageBackend.name,
    ImageBackend,
    priority=30,
    extensions=IMAGE_EXTENSIONS,
    is_available=lambda: True,
    version=_version,
    is_file_error=is_image_file_error,
    parallel_reads=False,  # PNG and JPEG are decoded whole on open: one more handle, one more copy
)
