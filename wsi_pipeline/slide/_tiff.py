"""TIFF integrity checks shared by the tifffile-based backends."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np


def check_data_extent(path: str, pages: Iterable[Any]) -> None:
    """Raise ``ValueError`` if any strip/tile of ``pages`` lies beyond the end of the file.

    Catches truncated copies at open time instead of at the first unlucky region read.
    """
    size = os.path.getsize(path)
    for page in pages:
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if offsets.size and int((offsets + counts).max()) > size:
            raise ValueError(
                f"file is truncated: page {page.index} needs {int((offsets + counts).max())} bytes, "
                f"file has {size}"
            )


def series_pages(series: Any) -> list[Any]:
    """All pages of every pyramid level of a tifffile series."""
    return [p for level in series.levels for p in level.pages if p is not None]
