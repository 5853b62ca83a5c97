"""Patch-coordinate files: ``coords/<slide_id>.h5``, readable by CLAM and TRIDENT.

Layout: dataset ``coords`` (N, 2) int64 of level-0 top-left (x, y), plus dataset
``tissue_fraction`` (N,) float32. The attributes live on ``coords`` (where CLAM and
TRIDENT look for them) and are mirrored on the file root:

- TRIDENT: ``patch_size`` (px at the target resolution), ``patch_size_level0``,
  ``level0_magnification`` (= 10 / mpp_level0, *not* bucketed), ``target_magnification``
  (= 10 / target_mpp), ``overlap`` (px at the target resolution), ``level0_width``,
  ``level0_height``, ``name``.
- CLAM: ``patch_level`` (the pyramid level patches are read from), ``downsample``
  (that level's (x, y) downsample), ``level_dim`` and ``downsampled_level_dim`` (that
  level's (width, height)). CLAM reads ``patch_size`` px at ``patch_level``: that is the
  same field of view when the level's mpp equals ``target_mpp``; otherwise readers must use
  ``patch_size_level0``.
- Ours: ``mpp_level0``, ``target_mpp``, ``mpp_source``, ``min_tissue``, ``overlap_fraction``,
  ``slide_path``, ``slide_fingerprint`` (content hash of the slide file, see
  :mod:`~wsi_pipeline.slide.fingerprint`: a replaced slide is re-tiled), ``upsample_factor``
  (``mpp_level0 / target_mpp``, at least 1), ``schema_version``, ``wsi_pipeline_version``,
  ``backend``, ``backend_version``, ``complete`` (True, written last: the resume marker).

The file is written to a temporary name and renamed into place. :func:`read_coords` refuses
an HDF5 file with a ``coords`` dataset that another tool wrote (a CLAM or TRIDENT patch file
has no ``schema_version``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..errors import CorruptOutputError, OutputError
from .atomic import atomic_path

_logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: Attributes every coords file must carry (the TRIDENT and CLAM sets plus provenance).
REQUIRED_ATTRS = (
    "patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
    "level0_width", "level0_height", "name",
    "patch_level", "downsample", "level_dim", "downsampled_level_dim",
    "mpp_level0", "target_mpp", "mpp_source", "min_tissue", "slide_path", "schema_version",
    "wsi_pipeline_version", "backend", "backend_version",
)


def write_coords(
    path: str | os.PathLike[str],
    coords: np.ndarray,
    attrs: Mapping[str, Any],
    tissue_fraction: np.ndarray | None = None,
) -> None:
    """Write ``coords`` (N, 2) with ``attrs`` atomically; adds schema/provenance/``complete``."""
    arr = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    full = dict(attrs)
    full.setdefault("schema_version", SCHEMA_VERSION)
    full.setdefault("wsi_pipeline_version", __version__)
    try:
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                ds = f.create_dataset("coords", data=arr, maxshape=(None, 2), chunks=(max(1, min(len(arr), 4096)), 2))
                if tissue_fraction is not None:
                    tf = np.asarray(tissue_fraction, dtype=np.float32).reshape(-1)
                    if len(tf) != len(arr):
                        raise ValueError(f"tissue_fraction has {len(tf)} values for {len(arr)} coords")
                    f.create_dataset("tissue_fraction", data=tf)
                for k, v in full.items():
                    ds.attrs[k] = _h5_value(v)
                    f.attrs[k] = _h5_value(v)
                ds.attrs["complete"] = True
                f.attrs["complete"] = True
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e


def read_coords(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """``(coords (N, 2) int64, attrs)``; raises :class:`CorruptOutputError` on a bad file or one
    that wsi-pipeline did not write."""
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise CorruptOutputError(f"{path}: no 'coords' dataset")
            ds = f["coords"]
            coords = ds[()]
            attrs = {k: _py_value(v) for k, v in ds.attrs.items()}
    except CorruptOutputError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise CorruptOutputError(f"{path}: not a readable coords file ({e})") from e
    if "schema_version" not in attrs:
        raise CorruptOutputError(
            f"{path}: not a wsi-pipeline coords file (no schema_version attribute; a CLAM or TRIDENT patch file?): "
            "tile the slide with 'wsi-pipeline tile' (there is no importer; 'wsi-pipeline export --to clam' "
            "converts the other way)"
        )
    return np.asarray(coords), attrs


def read_coords_attrs(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The attributes of a coords file without reading its coordinates; ``None`` when unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return {k: _py_value(v) for k, v in f["coords"].attrs.items()}
    except (OSError, KeyError, ValueError):
        return None


def validate_coords(path: str | os.PathLike[str], expected: Mapping[str, Any]) -> bool | str:
    """``True`` when ``path`` is a complete coords file made with ``expected`` settings, else a reason.

    Checks: it opens, ``coords`` is (N, 2) int64, ``complete`` is true, ``schema_version``
    matches, and every key of ``expected`` equals the stored attribute (floats within a
    relative 1e-9).
    """
    if not os.path.exists(path):
        return "missing"
    try:
        coords, attrs = read_coords(path)
    except CorruptOutputError as e:
        return str(e)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.dtype != np.int64:
        return f"coords has shape {coords.shape} dtype {coords.dtype}, expected (N, 2) int64"
    if attrs.get("complete") is not True:
        return "not marked complete (interrupted write)"
    if attrs.get("schema_version") != SCHEMA_VERSION:
        return f"schema_version {attrs.get('schema_version')} != {SCHEMA_VERSION}"
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        return f"missing attributes {missing}"
    for key, want in expected.items():
        if key not in attrs:
            return f"missing attribute {key!r}"
        if not _same(attrs[key], want):
            return f"{key} is {attrs[key]!r}, now {want!r}"
    return True


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        try:
            return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
        except TypeError:
            return False
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _h5_value(v: Any) -> Any:
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return np.asarray(v)
    return v


def _py_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return [_py_value(x) for x in v.tolist()]
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


__all__ = ["REQUIRED_ATTRS", "SCHEMA_VERSION", "read_coords", "read_coords_attrs", "validate_coords", "write_coords"]
