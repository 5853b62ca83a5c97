"""What ``export`` reads from an output folder: the coords files and, optionally, one model's features.

``OUT/coords/<slide_id>.h5`` gives every slide (read with
:func:`~wsi_pipeline.store.coords.read_coords` after
:func:`~wsi_pipeline.store.coords.validate_coords`); ``OUT/features/<model_id>/`` (h5) or
``OUT/features/<model_id>.zarr/`` (zarr) give the feature sets. A slide's features must be
complete and row-aligned with its coords file (the same coordinates in the same order), or the
slide is not exported: an exported ``features`` row must describe the exported ``coords`` row.
Patches that ``embed`` could not read (its ``failed_coords``) have no features: a slide with
features is exported with the rows that were read, in every file of the export, and the count of
those left out is recorded (``n_failed_patches``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import ConfigError, CorruptOutputError
from ..store.coords import read_coords, validate_coords
from ..store.features import as_coords, get_store, split_mismatch
from ..store.provenance import model_provenance

_logger = logging.getLogger(__name__)

COORDS_DIR, FEATURES_DIR = "coords", "features"
_ZARR_SUFFIX = ".zarr"


@dataclass(frozen=True)
class FeatureSet:
    """One model's features in an output folder: its id and its store (``h5`` or ``zarr``)."""

    model_id: str
    store: str


@dataclass(frozen=True)
class SlideSource:
    """One slide as stored: coords (N, 2) int64 level-0 and their attributes; features (N, D) or ``None``."""

    slide_id: str
    coords: np.ndarray
    coords_attrs: dict[str, Any]
    coords_path: Path
    features: np.ndarray | None = None
    features_path: Path | None = None
    model_id: str | None = None
    features_attrs: dict[str, Any] = field(default_factory=dict)
    n_failed: int = 0  # coords-file patches left out because embed could not read them

    def provenance(self) -> dict[str, Any]:
        """Attributes that keep what the client's own attributes drop: our geometry, mpp and sources."""
        a = self.coords_attrs
        out: dict[str, Any] = {
            "target_patch_size": int(a["patch_size"]),  # px at target_mpp, what the model saw
            "patch_size_level0": int(a["patch_size_level0"]),
            "target_mpp": float(a["target_mpp"]),
            "mpp_level0": float(a["mpp_level0"]),
            "target_magnification": float(a["target_magnification"]),
            "level0_magnification": float(a["level0_magnification"]),
            "source_patch_level": int(a["patch_level"]),  # the level wsi-pipeline read (and resized)
            "source_coords": str(self.coords_path.resolve()),
            "slide_path": str(a.get("slide_path", "")),
            "exported_by": f"wsi-pipeline {__version__}",
        }
        if self.features_path is not None:
            out["source_features"] = str(self.features_path.resolve())
            out["model_id"] = str(self.model_id)
            out["n_failed_patches"] = int(self.n_failed)
            out.update({k: v for k, v in model_provenance(self.features_attrs).items() if v is not None})
        return out


def coords_files(out_dir: str | os.PathLike[str]) -> list[Path]:
    """The coords files of ``out_dir``; :class:`ConfigError` when there are none (a usage error)."""
    folder = Path(out_dir) / COORDS_DIR
    files = sorted(p for p in folder.glob("*.h5") if not p.name.startswith(".")) if folder.is_dir() else []
    if not files:
        raise ConfigError(f"{folder} holds no coords files; run 'wsi-pipeline tile' into {out_dir} first")
    return files


def feature_sets(out_dir: str | os.PathLike[str]) -> dict[str, FeatureSet]:
    """Model id → :class:`FeatureSet` for every feature folder of ``out_dir`` (h5 wins over zarr)."""
    folder = Path(out_dir) / FEATURES_DIR
    found: dict[str, FeatureSet] = {}
    if not folder.is_dir():
        return found
    for p in sorted(folder.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if p.name.endswith(_ZARR_SUFFIX):
            found.setdefault(p.name[: -len(_ZARR_SUFFIX)], FeatureSet(p.name[: -len(_ZARR_SUFFIX)], "zarr"))
        elif any(q.suffix == ".h5" and not q.name.startswith(".") for q in p.iterdir()):
            found[p.name] = FeatureSet(p.name, "h5")
    return found


def pick_feature_set(out_dir: str | os.PathLike[str], model_id: str | None) -> FeatureSet | None:
    """The feature set to export: ``model_id`` if given, else the only one, else ``None`` when there is none.

    Raises :class:`ConfigError` when ``model_id`` is not there, or when several are and none was named.
    """
    sets = feature_sets(out_dir)
    where = Path(out_dir) / FEATURES_DIR
    if model_id is not None:
        if model_id not in sets:
            have = ", ".join(sets) or "none"
            raise ConfigError(f"--model-id {model_id}: no such features folder in {where} (found: {have})")
        return sets[model_id]
    if len(sets) > 1:
        raise ConfigError(f"{where} holds features of {len(sets)} models ({', '.join(sets)}); pick one with --model-id")
    return next(iter(sets.values()), None)


def load_slide(out_dir: str | os.PathLike[str], coords_path: Path, feature_set: FeatureSet | None) -> SlideSource:
    """Read one slide's coords (and features); :class:`CorruptOutputError` when unreadable or misaligned."""
    ok = validate_coords(coords_path, {})
    if ok is not True:
        raise CorruptOutputError(f"coords file {coords_path}: {ok}")
    coords, attrs = read_coords(coords_path)
    sid = coords_path.stem
    if feature_set is None:
        return SlideSource(sid, coords, attrs, coords_path)
    store = get_store(feature_set.store)
    features_dir = Path(out_dir) / FEATURES_DIR
    path = store.path_for(features_dir, feature_set.model_id, sid)
    if not path.exists():
        raise CorruptOutputError(f"no features of {feature_set.model_id} for this slide ({path}); run 'wsi-pipeline embed'")
    try:
        sf = store.read(features_dir, feature_set.model_id, sid)
    except Exception as e:  # truncated or foreign files raise many different errors
        raise CorruptOutputError(f"features file {path} unreadable ({type(e).__name__}: {e})") from e
    if sf.attrs.get("complete") is not True:
        raise CorruptOutputError(f"features file {path} is incomplete (interrupted write); re-run embed")
    feats = np.asarray(sf.features)
    read, failed = as_coords(sf.coords), as_coords(sf.failed_coords)
    if feats.ndim != 2 or len(feats) != len(read) or split_mismatch(coords, read, failed) is not None:
        raise CorruptOutputError(f"features file {path} does not match the coords file row for row; re-run embed")
    if len(failed):
        _logger.warning("%s: %d unreadable patches have no features and are left out of the export "
                        "(listed in %s, failed_coords)", sid, len(failed), path)
    return SlideSource(sid, read, attrs, coords_path, feats.astype(np.float32, copy=False), path,
                       feature_set.model_id, dict(sf.attrs), n_failed=len(failed))


__all__ = ["FeatureSet", "SlideSource", "coords_files", "feature_sets", "load_slide", "pick_feature_set"]
