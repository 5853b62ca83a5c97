"""TIFF integrity and layout checks and the file-error test shared by the TIFF-reading backends."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import SlideOpenError
from .base import LIBRARY_DATA_ERRORS, is_io_error, raised_in

#: Libraries under the tifffile-based backends: a data error raised inside them is the file's.
TIFF_LIBRARIES = ("tifffile", "tiffslide", "zarr", "numcodecs", "imagecodecs")
#: Axes of one 2-D picture: grey (YX), interleaved samples (YXS) or planar samples (SYX).
PICTURE_AXES = frozenset({"YX", "YXS", "SYX"})
#: Photometric interpretations of three or four samples that are colour (RGB, RGBA).
COLOUR_PHOTOMETRICS = frozenset({"RGB", "YCBCR"})
_AXIS_NAMES = {"C": "channels", "S": "samples per pixel", "Z": "z planes", "T": "time points", "I": "images",
               "Q": "planes"}


def picture_problem(series: Any) -> str | None:
    """Why level 0 of a tifffile ``series`` is not one 2-D 8-bit grey or RGB(A) picture, or ``None``.

    The message names what was found: a fluorescence OME-TIFF stores one grey page per
    channel (axes ``CYX``), a multispectral file interleaves more samples than RGBA, a stack
    has ``Z`` or ``T`` planes. Each would otherwise be read as a grey brightfield slide (its
    first channel or plane).
    """
    level = series.levels[0]
    axes, shape = str(level.axes), tuple(int(n) for n in level.shape)
    samples = dict(zip(axes, shape, strict=True)).get("S", 1)
    photometric = getattr(level.keyframe.photometric, "name", str(level.keyframe.photometric))
    if axes in PICTURE_AXES and (samples in (1, 2) or (samples in (3, 4) and photometric in COLOUR_PHOTOMETRICS)):
        if level.dtype != np.uint8:  # OpenSlide opens such a TIFF, then fails on every tile
            return (f"unsupported sample type {level.dtype} ({samples} per pixel, photometric {photometric}); "
                    "wsi-pipeline reads 8-bit RGB or grey slides")
        return None
    planes = ", ".join(f"{n} {_AXIS_NAMES.get(a, a)}" for a, n in zip(axes, shape, strict=True) if a not in "YX")
    return (f"not a brightfield RGB image: {planes} of {level.dtype} (axes {axes}, photometric {photometric}); "
            "a multichannel fluorescence image or a stack? wsi-pipeline reads RGB or grey slides")


def file_picture_problem(path: str) -> str | None:
    """:func:`picture_problem` of a TIFF file's first series (``None`` when tifffile cannot
    parse it: the caller's reader decides about such a file)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            return picture_problem(tf.series[0]) if tf.series else None
    except Exception as e:
        if is_tiff_file_error(e):
            return None
        raise


def check_data_extent(path: str, pages: Iterable[Any]) -> None:
    """Raise :class:`SlideOpenError` if any strip/tile of ``pages`` lies beyond the end of the file.

    Catches truncated copies at open time instead of at the first unlucky region read.
    """
    size = os.path.getsize(path)
    for page in pages:
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if offsets.shape != counts.shape:
            raise SlideOpenError(f"page {page.index} has {offsets.size} data offsets but {counts.size} byte counts")
        if offsets.size and int((offsets + counts).max()) > size:
            raise SlideOpenError(
                f"file is truncated: page {page.index} needs {int((offsets + counts).max())} bytes, "
                f"file has {size}"
            )


def series_pages(series: Any) -> list[Any]:
    """All pages of every pyramid level of a tifffile series."""
    return [p for level in series.levels for p in level.pages if p is not None]


def is_codec_error(e: BaseException) -> bool:
    """An imagecodecs decode error (``Jpeg8Error``, ``DeflateError``...: each its own
    ``RuntimeError`` subclass). Its ``DelayedImportError`` (a codec missing from this
    installation) is no file error."""
    return type(e).__module__.partition(".")[0] == "imagecodecs" and not isinstance(e, ImportError)


def is_tiff_file_error(e: BaseException, libraries: tuple[str, ...] = TIFF_LIBRARIES) -> bool:
    """True for what a damaged or unsupported TIFF raises through tifffile, tiffslide, zarr
    or imagecodecs: ``OSError``, our :class:`~wsi_pipeline.errors.SlideError`, codec errors,
    and data errors (``ValueError`` such as ``TiffFileError``, ``ZeroDivisionError``,
    ``NotImplementedError``, ``MemoryError`` for an absurd size...) raised inside those
    libraries. Provoked by truncating and overwriting bytes of generated slides: these are
    the types that came out. A ``TypeError``, ``AttributeError`` or ``ImportError``, or a
    data error raised in our own code, is a bug."""
    if is_io_error(e) or is_codec_error(e):
        return True
    return isinstance(e, LIBRARY_DATA_ERRORS) and raised_in(e, libraries)
