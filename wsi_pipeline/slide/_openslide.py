"""OpenSlide backend (openslide-python with the openslide-bin wheel).

Regions are read straight into a numpy buffer through OpenSlide's C call, as the
premultiplied ARGB that the library produces, and composited on white in one numpy pass.
openslide-python's own ``read_region`` would first un-premultiply every pixel, wrap the
buffer in a PIL image and leave an RGBA→RGB conversion and an array copy to the caller,
which for a large region costs about as much as OpenSlide's own read. The public path
is the fallback for openslide-python releases whose low-level call is missing, takes
other arguments or behaves otherwise (see :class:`OpenSlideBackend`).

A DICOM WSI (a folder of ``.dcm`` files, one per pyramid level, plus label and
overview instances, all of one series) is opened as one slide: OpenSlide >= 4.0 reads
the series from any one of its files (vendor ``dicom``, mpp from the pixel spacing).

What remains is OpenSlide's own painting and JPEG decoding (measured figures: README,
"Benchmarks"); a bigger tile cache or tile-aligned sub-block reads were no faster.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
from typing import Any, ClassVar

import numpy as np

from ..errors import SlideOpenError, UnsupportedFormatError
from ._mpp import build_slide_info
from ._tiff import file_picture_problem
from .base import SlideInfo, find_folder_members, is_io_error, register_backend

_logger = logging.getLogger(__name__)

#: File extensions OpenSlide may open (it decides by content; these are only probed).
OPENSLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm"}
)

#: A folder of these files is one DICOM WSI (OpenSlide >= 4.0 opens it from any member).
DICOM_FOLDER_MEMBERS = frozenset({".dcm"})
#: The property that names a DICOM series (OpenSlide's ``dicom.*`` properties).
DICOM_SERIES_KEY = "dicom.SeriesInstanceUID"

#: OpenSlide's vendor of a plain TIFF: it reads the first page whatever its channels mean.
GENERIC_TIFF = "generic-tiff"

#: Byte positions of (R, G, B, A) inside one native-endian ARGB ``uint32``.
_ARGB_BYTES = (2, 1, 0, 3) if sys.byteorder == "little" else (1, 2, 3, 0)


def _available() -> bool:
    return importlib.util.find_spec("openslide") is not None


def _version() -> str:
    import openslide

    return f"openslide {openslide.__library_version__} (python {openslide.__version__})"


def _python_version() -> str:
    import openslide

    return str(openslide.__version__)


def argb32_to_rgb(argb: np.ndarray) -> np.ndarray:
    """OpenSlide's premultiplied native-endian ARGB ``uint32`` (h, w) → RGB uint8 on white."""
    px = argb.view(np.uint8).reshape(*argb.shape, 4)
    r, g, b, a = _ARGB_BYTES
    rgb = np.empty((*argb.shape, 3), np.uint8)
    rgb[..., 0] = px[..., r]  # three strided copies beat one fancy-indexed copy by ~4x
    rgb[..., 1] = px[..., g]
    rgb[..., 2] = px[..., b]
    alpha = px[..., a]
    if alpha.size and alpha.min() < 255:  # slide edges, unscanned areas
        rgb = np.minimum(rgb + (255 - alpha[..., None]).astype(np.uint16), 255).astype(np.uint8)
    return rgb


def straight_rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite straight (un-premultiplied) RGBA (h, w, 4) on white, rounding to nearest."""
    if rgba.size == 0 or int(rgba[..., 3].min()) == 255:
        return np.ascontiguousarray(rgba[..., :3])
    color = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def is_openslide_file_error(e: BaseException) -> bool:
    """What OpenSlide raises for a damaged or unsupported file: ``OpenSlideError`` (with its
    ``OpenSlideUnsupportedFormatError``) and ``OSError``; plus our own slide errors."""
    import openslide

    return is_io_error(e) or isinstance(e, openslide.OpenSlideError)


def _lowlevel_reader() -> Any:
    """openslide-python's private ctypes binding of ``openslide_read_region``, or ``None``."""
    from openslide import lowlevel

    return getattr(lowlevel, "_read_region", None)


#: What a changed private binding raises when called the old way (not the file's fault).
_API_CHANGE_ERRORS = (TypeError, AttributeError, ctypes.ArgumentError)
#: Side of the window that a fast read is checked on against openslide-python's public
#: ``read_region``, until one window with opaque pixels has matched.
_CHECK_SIDE = 64


class OpenSlideBackend:
    """One ``openslide.OpenSlide`` handle; a folder of DICOM files is opened through one of them.

    Regions are read through openslide-python's private ``lowlevel._read_region`` and the
    handle's private ``_osr`` (see the module notes). If either is missing, raises one of
    :data:`_API_CHANGE_ERRORS` (a changed signature), or gives other pixels than the public
    ``read_region`` on the first window with tissue, the handle logs a warning and reads
    through the public API from then on: same pixels (within one grey level where alpha
    is partial: the public path un-premultiplies), slower.
    """

    name: ClassVar[str] = "openslide"

    def __init__(self, path: str) -> None:
        import openslide

        member, series = dicom_series_member(path) if os.path.isdir(path) else (path, None)
        self._slide = openslide.OpenSlide(member)
        self._read_raw = _lowlevel_reader() if hasattr(self._slide, "_osr") else None
        self._checked = False
        raw = self._slide.properties  # a damaged file may list a property it has no value for
        props = {k: v for k in raw if (v := raw.get(k)) is not None}
        if series is not None and props.get(DICOM_SERIES_KEY) != series:
            self._slide.close()
            raise SlideOpenError(f"OpenSlide opened series {props.get(DICOM_SERIES_KEY)} from {member}, "
                                 f"not its own series {series}")
        problem = file_picture_problem(member) if props.get("openslide.vendor") == GENERIC_TIFF else None
        if problem is not None:  # e.g. a fluorescence OME-TIFF, which OpenSlide reads as its first channel
            self._slide.close()
            raise UnsupportedFormatError(problem)
        self._info = build_slide_info(path, self.name, _version(), self._slide.level_dimensions,
                                      self._slide.level_downsamples, props)

    @property
    def info(self) -> SlideInfo:
        return self._info

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3); transparent (unscanned or out-of-bounds) pixels are white."""
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            return np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)
        x, y, level = int(location[0]), int(location[1]), int(level)
        if self._read_raw is not None:
            try:
                rgb = self._read_fast(x, y, level, w, h)  # OpenSlideError on a damaged tile
                if not self._checked:
                    self._check_fast_path(rgb, x, y, level)
            except _API_CHANGE_ERRORS as e:
                self._fall_back(f"{type(e).__name__}: {e}")
            else:
                if self._read_raw is not None:
                    return rgb
        return self._read_public(x, y, level, w, h)

    def _read_fast(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        buf = np.empty((h, w), np.uint32)
        # raises OpenSlideError (and latches the handle) on a decode error
        self._read_raw(self._slide._osr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), x, y, level, w, h)
        return argb32_to_rgb(buf)

    def _read_public(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        return straight_rgba_to_rgb(np.asarray(self._slide.read_region((x, y), level, (w, h))))

    def _check_fast_path(self, rgb: np.ndarray, x: int, y: int, level: int) -> None:
        """Compare a fast read with the public reader on its top-left window; a window without
        opaque pixels (glass outside the scan) proves nothing, so the next read is checked too."""
        h, w = min(rgb.shape[0], _CHECK_SIDE), min(rgb.shape[1], _CHECK_SIDE)
        rgba = np.asarray(self._slide.read_region((x, y), level, (w, h)))
        diff = np.abs(rgb[:h, :w].astype(np.int16) - straight_rgba_to_rgb(rgba))
        if diff.size and int(diff.max()) > 1:  # un-premultiplying rounds by at most 1
            self._fall_back(f"pixels differ from the public read_region by up to {int(diff.max())}")
        elif (rgba[..., 3] == 255).any():
            self._checked = True

    def _fall_back(self, why: str) -> None:
        _logger.warning("%s: openslide.lowlevel._read_region is not usable with openslide-python %s (%s); "
                        "reading through the public read_region", self._info.path, _python_version(), why)
        self._read_raw = None

    def close(self) -> None:
        self._slide.close()


# -- DICOM WSI: a folder of .dcm files of one series --------------------------------------------
def dicom_series_member(folder: str) -> tuple[str, str]:
    """The ``.dcm`` file to open a DICOM WSI folder through, and its series UID.

    OpenSlide opens a whole series from any one of its files (it finds the others in the
    same folder). Every member is probed, so that a folder holding two series is refused
    instead of silently read as one of them; DICOM files that are no WSI instance
    (annotations, reports) are skipped.
    """
    import openslide

    found = find_folder_members(folder)
    members = found[1] if found is not None and found[0] == ".dcm" else []
    series: dict[str, str] = {}
    errors: list[str] = []
    for member in members:
        try:
            with openslide.OpenSlide(member) as probe:
                uid = str(probe.properties.get(DICOM_SERIES_KEY, ""))
        except openslide.OpenSlideError as e:
            _logger.debug("%s: not a WSI instance (%s)", member, e)
            errors.append(f"{os.path.basename(member)}: {e}")
            continue
        series.setdefault(uid, member)
    if not series:
        raise SlideOpenError(f"no DICOM WSI instance among {len(members)} .dcm files"
                             + (f" ({errors[0]})" if errors else ""))
    if len(series) > 1:
        raise UnsupportedFormatError(
            f"the folder holds {len(series)} DICOM WSI series ({', '.join(sorted(series))}); "
            "give each series its own folder"
        )
    uid, member = next(iter(series.items()))
    return member, uid


register_backend(
    OpenSlideBackend.name,
    OpenSlideBackend,
    priority=10,
    extensions=OPENSLIDE_EXTENSIONS,
    is_available=_available,
    version=_version,
    folder_members=DICOM_FOLDER_MEMBERS,
    is_file_error=is_openslide_file_error,
)
