"""The one PNG writer: atomic (temp file + rename), with the output's provenance when given."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..store.atomic import atomic_path
from ..store.provenance import png_info


def write_png(path: str | os.PathLike[str], image: Any, provenance: Mapping[str, Any] | None = None, *,
              compress_level: int = 6) -> Path:
    """Save a PIL image or an ``(h, w[, c])`` uint8 array as PNG.

    ``provenance`` is stored as JSON text (:func:`~wsi_pipeline.store.provenance.png_info`).
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    final = Path(path)
    extra = {"pnginfo": png_info(provenance)} if provenance is not None else {}
    with atomic_path(final) as tmp:
        image.save(tmp, format="PNG", compress_level=compress_level, **extra)
    return final


__all__ = ["write_png"]
