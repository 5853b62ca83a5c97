"""Atomic writers of the exported files: an HDF5 file of datasets with attributes, a torch tensor.

Both write to a temporary file beside the target and rename it into place
(:func:`~wsi_pipeline.store.atomic.atomic_path`), so a client never sees a half-written
file and a rerun replaces each file whole.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import OutputError
from ..store.atomic import atomic_path

#: Attributes of one dataset, or of the file root (key ``""``).
Attrs = Mapping[str, Any]


def write_h5(path: str | os.PathLike[str], datasets: Mapping[str, np.ndarray],
             attrs: Mapping[str, Attrs] | None = None) -> Path:
    """Write ``datasets`` (name → array) with ``attrs`` (dataset name or ``""`` for the root → attributes)."""
    final = Path(path)
    try:
        with atomic_path(final) as tmp, h5py.File(tmp, "w") as f:
            for name, data in datasets.items():
                f.create_dataset(name, data=data)
            for name, values in (attrs or {}).items():
                target = f[name] if name else f
                for k, v in values.items():
                    target.attrs[k] = v
    except OSError as e:
        raise OutputError(f"cannot write {final}: {e.strerror or e}") from e
    return final


def write_tensor(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Save ``array`` as a plain float32 CPU tensor with ``torch.save`` (loads with ``weights_only=True``)."""
    import torch

    final = Path(path)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    try:
        with atomic_path(final) as tmp, open(tmp, "wb") as fh:
            torch.save(tensor, fh)  # a file object: the archive is not named after the temporary file
    except OSError as e:
        raise OutputError(f"cannot write {final}: {e.strerror or e}") from e
    return final


__all__ = ["write_h5", "write_tensor"]
