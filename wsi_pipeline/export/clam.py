"""CLAM layout: ``patches/<id>.h5``, ``h5_files/<id>.h5`` and ``pt_files/<id>.pt``.

CLAM's patch reader takes ``coords`` and the attributes ``patch_level`` and ``patch_size``
of the ``coords`` dataset and reads ``read_region(coord, patch_level, (patch_size, patch_size))``:
its ``patch_size`` is in pixels **at** ``patch_level``. Our coords file says ``patch_size`` at
the target mpp, which is the same field of view only when a pyramid level sits at the target.
So the export chooses a level at which the level-0 square we embedded
(``patch_size_level0``) is a whole number of pixels and every coordinate falls on a pixel
of that level: the level we read from when that is exact, else level 0 (an Aperio 40×
slide tiled at 0.5 µm/px: level 0, ``patch_size`` 512). CLAM then reads exactly our
square; resizing it to ``target_patch_size`` (CLAM's ``--target_patch_size``) gives what the
model saw.

Feature files follow CLAM's ``extract_features_fp.py``: ``h5_files/<id>.h5`` with
``features`` (N, D) float32 and ``coords`` (N, 2) int32, and ``pt_files/<id>.pt`` (a plain
float32 tensor N×D), rows in the order of ``patches/<id>.h5``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .files import write_h5, write_tensor
from .source import SlideSource

_logger = logging.getLogger(__name__)

PATCHES_DIR, H5_DIR, PT_DIR = "patches", "h5_files", "pt_files"
_EXACT = 1e-6


@dataclass(frozen=True)
class ClamGeometry:
    """Where CLAM reads a patch: ``patch_size`` px at ``patch_level`` (downsample and size of that level)."""

    patch_level: int
    patch_size: int
    downsample: tuple[float, float]
    level_dim: tuple[int, int]


def clam_geometry(coords: np.ndarray, attrs: dict[str, Any]) -> ClamGeometry:
    """The CLAM ``patch_level``/``patch_size`` that cover exactly ``patch_size_level0`` at every coordinate.

    The level we read from is kept when its downsample is the same in x and y, divides
    ``patch_size_level0`` into a whole number of pixels and maps every coordinate onto a
    pixel of that level; otherwise level 0 (always exact).
    """
    ps0 = int(attrs["patch_size_level0"])
    level = int(attrs["patch_level"])
    ds = tuple(float(v) for v in np.ravel(attrs["downsample"]))
    if level > 0 and len(ds) == 2 and abs(ds[0] - ds[1]) <= _EXACT * ds[0]:
        px = ps0 / ds[0]
        on_pixels = np.abs(coords / ds[0] - np.round(coords / ds[0])) <= _EXACT
        if abs(px - round(px)) <= _EXACT and round(px) >= 1 and bool(np.all(on_pixels)):
            lw, lh = (int(v) for v in np.ravel(attrs["level_dim"]))
            return ClamGeometry(level, int(round(px)), (ds[0], ds[1]), (lw, lh))
        _logger.debug("level %d (downsample %s) is not exact for %d px at level 0; CLAM reads level 0",
                      level, ds, ps0)
    return ClamGeometry(0, ps0, (1.0, 1.0), (int(attrs["level0_width"]), int(attrs["level0_height"])))


def clam_attrs(src: SlideSource, patches_dir: Path) -> dict[str, Any]:
    """The ``coords`` attributes of ``patches/<id>.h5``: CLAM's set, then our provenance."""
    g = clam_geometry(src.coords, src.coords_attrs)
    return {
        **src.provenance(),
        "patch_size": g.patch_size,
        "patch_level": g.patch_level,
        "downsample": np.asarray(g.downsample, dtype=np.float64),
        "level_dim": np.asarray(g.level_dim, dtype=np.int64),
        "downsampled_level_dim": np.asarray(g.level_dim, dtype=np.int64),
        "name": src.slide_id,
        "save_path": str(patches_dir.resolve()),
    }


@dataclass(frozen=True)
class ClamExporter:
    """Writes one slide in CLAM's layout under ``dest``."""

    name: str = "clam"
    help: str = "CLAM: patches/, h5_files/, pt_files/"
    model_in_paths: bool = False

    def export_slide(self, src: SlideSource, dest: Path) -> list[Path]:
        patches_dir = dest / PATCHES_DIR
        attrs = clam_attrs(src, patches_dir)
        coords = src.coords.astype(np.int64, copy=False).reshape(-1, 2)
        written = [write_h5(patches_dir / f"{src.slide_id}.h5", {"coords": coords}, {"coords": attrs})]
        if src.features is not None:
            written.append(write_h5(dest / H5_DIR / f"{src.slide_id}.h5",
                                    {"features": src.features, "coords": coords.astype(np.int32)},
                                    {"coords": attrs}))
            written.append(write_tensor(dest / PT_DIR / f"{src.slide_id}.pt", src.features))
        return written


__all__ = ["ClamExporter", "ClamGeometry", "clam_attrs", "clam_geometry"]
