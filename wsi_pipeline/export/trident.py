"""TRIDENT layout: ``<mag>x_<ps>px_<ov>px_overlap/patches/<id>_patches.h5`` and ``features_<encoder>/<id>.h5``.

TRIDENT reads ``patch_size`` as pixels **at the target magnification** and finds the level-0
size either in ``patch_size_level0`` or as ``patch_size * level0_magnification /
target_magnification`` (rounded down). Our coords file already uses TRIDENT's meaning; the
export writes TRIDENT's attribute set on ``coords`` with one adjustment:
``level0_magnification`` is the magnification for which that product is exactly our
``patch_size_level0`` (the measured ``10 / mpp_level0`` whenever the level-0 size is a whole
number, as on 0.25 and 0.5 µm/px slides; the measured mpp stays in ``mpp_level0``). No CLAM
attributes are written (``patch_level`` would be read in CLAM's meaning); the level we read
from is kept as ``source_patch_level``.

Features: ``features`` (N, D) float32 and ``coords`` (with the same attributes) per slide,
``features.attrs = {name, savetodir, encoder}`` with the encoder named by our model id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .files import write_h5
from .source import SlideSource


def magnification_label(magnification: float) -> str:
    """``20.0`` → ``"20x"``, ``33.3333`` → ``"33.3333x"`` (TRIDENT's folder naming for whole magnifications)."""
    return f"{magnification:.6g}x"


def job_name(attrs: dict[str, Any]) -> str:
    """TRIDENT's coords folder name: ``<mag>x_<patch_size>px_<overlap>px_overlap``."""
    return f"{magnification_label(float(attrs['target_magnification']))}_{int(attrs['patch_size'])}px_" \
           f"{int(attrs['overlap'])}px_overlap"


def level0_magnification(patch_size: int, patch_size_level0: int, target_magnification: float) -> float:
    """The level-0 magnification for which ``floor(patch_size * m / target) == patch_size_level0``,
    and TRIDENT's own ``patch_size * m // target`` (float floor division, which can come out one
    lower where the quotient rounds up to a whole number) gives it too."""
    mag = patch_size_level0 * target_magnification / patch_size
    while min(math.floor(patch_size * mag / target_magnification),
              patch_size * mag // target_magnification) < patch_size_level0:  # float rounding fell short
        mag = math.nextafter(mag, math.inf)
    return mag


def trident_attrs(src: SlideSource, patches_dir: Path) -> dict[str, Any]:
    """The ``coords`` attributes of ``<id>_patches.h5``: our provenance, then TRIDENT's set."""
    a = src.coords_attrs
    ps, ps0, tmag = int(a["patch_size"]), int(a["patch_size_level0"]), float(a["target_magnification"])
    return {
        **src.provenance(),
        "patch_size": ps,
        "patch_size_level0": ps0,
        "level0_magnification": level0_magnification(ps, ps0, tmag),
        "target_magnification": tmag,
        "overlap": int(a["overlap"]),
        "name": src.slide_id,
        "savetodir": str(patches_dir.resolve()),
        "level0_width": int(a["level0_width"]),
        "level0_height": int(a["level0_height"]),
    }


@dataclass(frozen=True)
class TridentExporter:
    """Writes one slide in TRIDENT's job layout under ``dest``."""

    name: str = "trident"
    help: str = "TRIDENT: <mag>x_<ps>px_<ov>px_overlap/{patches,features_<model_id>}/"
    model_in_paths: bool = True

    def export_slide(self, src: SlideSource, dest: Path) -> list[Path]:
        job = dest / job_name(src.coords_attrs)
        attrs = trident_attrs(src, job / "patches")
        coords = src.coords.astype(np.int64, copy=False).reshape(-1, 2)
        written = [write_h5(job / "patches" / f"{src.slide_id}_patches.h5", {"coords": coords}, {"coords": attrs})]
        if src.features is not None:
            feats_dir = job / f"features_{src.model_id}"
            feats_attrs = {"name": src.slide_id, "savetodir": str(feats_dir.resolve()), "encoder": str(src.model_id)}
            written.append(write_h5(feats_dir / f"{src.slide_id}.h5", {"features": src.features, "coords": coords},
                                    {"coords": attrs, "features": feats_attrs}))
        return written


__all__ = ["TridentExporter", "job_name", "level0_magnification", "magnification_label", "trident_attrs"]
