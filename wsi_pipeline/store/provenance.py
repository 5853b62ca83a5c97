"""Provenance: the settings that made an output, recorded in the output itself.

HDF5 files carry their provenance as attributes (see :mod:`.coords` and :mod:`.features`).
The other outputs take theirs from those attributes, through the two functions here:

* :func:`slide_provenance` (from a coords file's attributes): package version, reader and its
  version, mpp and where it came from, target mpp, patch size;
* :func:`model_provenance` (from a features file's attributes): model name and id, weights
  sha256, refinement schedule, context hash, precision.

PNG files (thumbnails, heatmaps, montages) store the mapping as JSON in an ``iTXt`` chunk
named ``wsi_pipeline`` (:func:`png_info`; read back with :func:`read_png_provenance`), and
GeoJSON files as a ``wsi_pipeline`` member of the FeatureCollection.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import __version__

#: PNG text key and GeoJSON member that hold the provenance.
KEY = "wsi_pipeline"

SLIDE_KEYS = ("name", "backend", "backend_version", "mpp_level0", "mpp_source", "target_mpp", "patch_size",
              "patch_size_level0", "wsi_pipeline_version")
MODEL_KEYS = ("model_name", "model_id", "weights_sha256", "adapter_sha256", "keep_rate", "refine_layers",
              "context_hash", "precision")
#: Attribute names of older wsi-pipeline versions → today's (read, never written).
OLD_MODEL_KEYS = {"prune_layers": "refine_layers"}


def jsonable(value: Any) -> Any:
    """An HDF5/zarr attribute value as plain Python: numpy scalars/arrays, bytes, lists of them."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def slide_provenance(coords_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The slide-side provenance out of a coords file's attributes (``name`` becomes ``slide_id``)."""
    out = {k: jsonable(coords_attrs[k]) for k in SLIDE_KEYS if k in coords_attrs}
    if "name" in out:
        out["slide_id"] = out.pop("name")
    out.setdefault("wsi_pipeline_version", __version__)
    return out


def model_provenance(feature_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The model-side provenance out of a features file's attributes (old attribute names read
    under today's, see :data:`OLD_MODEL_KEYS`)."""
    attrs = {OLD_MODEL_KEYS.get(k, k): v for k, v in feature_attrs.items()}
    return {k: jsonable(attrs[k]) for k in MODEL_KEYS if k in attrs}


def png_info(provenance: Mapping[str, Any]) -> Any:
    """A ``PIL.PngImagePlugin.PngInfo`` with ``Software`` and the provenance as JSON."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", f"wsi-pipeline {__version__}")
    info.add_itxt(KEY, json.dumps({k: jsonable(v) for k, v in provenance.items()}, sort_keys=True))
    return info


def read_png_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The provenance stored in a PNG by :func:`png_info` (``{}`` when there is none)."""
    from PIL import Image

    with Image.open(path) as im:
        text = getattr(im, "text", {}).get(KEY)
    return json.loads(text) if text else {}


__all__ = ["KEY", "jsonable", "model_provenance", "png_info", "read_png_provenance", "slide_provenance"]
