"""Per-slide feature files: HDF5 (CLAM/TRIDENT layout) or zarr v3, written atomically.

Both stores hold the same arrays and attributes:

* ``features`` (N, D) float32, pre-projection CLS features of the patches that were read;
* ``coords`` (N, 2) int64 level-0 top-left corners of those patches, with the coords file's
  attributes copied (so its ``n_patches`` attribute counts every patch of the coords file);
* ``failed_coords`` (M, 2) int64 level-0 corners of the patches that could not be read (their
  tile did not decode): left out of ``features`` and ``coords``, never embedded; M >= 0, the
  dataset is always written (schema version 2);
* ``embeddings`` (N, P) float16, optional: the same patches projected into the joint
  image-text space and L2-normalised by the model that embedded them, so that ``classify``
  scores without reading or projecting ``features`` (which stay pre-projection and untouched).
  Its attributes tie it to that projection: ``projection_sha256`` (sha256 of the projection
  matrix, see :meth:`~wsi_pipeline.model.convlm.ConVLM.projection_sha256`) and ``model_id``;
  :meth:`FeatureStore.read` loads it only for a matching projection (``embeddings_for``);
* file/group attributes: provenance (model, weights sha256, refinement, context, precision,
  device, package version), ``n_failed_patches`` (= M) and ``complete=True`` (written last,
  so a file without it was never finished).

``coords`` and ``failed_coords`` each keep the coords file's row order and together hold every
row of the coords file exactly once: dropping the failed rows from the coords file gives
``coords``. :meth:`FeatureStore.validate` checks exactly this. Files of schema version 1
(before ``failed_coords``) replaced unreadable patches by white ones and kept them; such a file
still validates when it has no failed patches, and is re-embedded when it has some.

Layouts: ``features/<model_id>/<slide_id>.h5`` and ``features/<model_id>.zarr/<slide_id>/``.
A zarr slide group is written in a temporary sibling folder and renamed into place, so
concurrent writers of different slides never see each other's partial groups.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import ConfigError, CorruptOutputError, one_line
from .atomic import TMP_SUFFIX, atomic_path, atomic_write_text, fsync_dir
from .provenance import jsonable

FEATURES_SCHEMA_VERSION = 2
#: Version 1: no ``failed_coords``; unreadable patches were embedded as white patches.
LEGACY_SCHEMA_VERSION = 1
FAILED_COORDS = "failed_coords"
EMBEDDINGS = "embeddings"
#: The coords attribute that names the slide file's content (copied into every features file).
FINGERPRINT = "slide_fingerprint"
#: Feature rows read beside the embeddings, to check them against the model (see ``read``).
PROBE_ROWS = 4


def _h5able(value: Any) -> Any:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    if isinstance(value, dict):
        return json.dumps(jsonable(value))
    return value


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's stored features; ``failed_coords`` is ``None`` for a schema-1 file (no such dataset).

    Read with ``embeddings_for`` and a matching ``embeddings`` dataset, ``features`` holds only
    the first :data:`PROBE_ROWS` rows (to check the embeddings against the model) and
    ``embeddings`` the projected rows; otherwise ``features`` holds every row and
    ``embeddings`` is ``None``.
    """

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any]
    coords_attrs: dict[str, Any]
    failed_coords: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    embeddings_attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def n_left_out(self) -> int:
        """Patches that could not be read and are not in ``features`` (rows of ``failed_coords``)."""
        return 0 if self.failed_coords is None else len(self.failed_coords)

    @property
    def n_blank_substituted(self) -> int:
        """Rows of ``features`` that are white substitutes of unreadable patches (schema-1 files only)."""
        if self.failed_coords is not None:
            return 0
        return int(self.attrs.get("n_failed_patches", 0) or 0)


def as_coords(coords: np.ndarray | None) -> np.ndarray:
    """``coords`` as (n, 2) int64; ``None`` is the empty (0, 2) array."""
    return np.zeros((0, 2), np.int64) if coords is None else np.asarray(coords, dtype=np.int64).reshape(-1, 2)


def _row_keys(coords: np.ndarray) -> np.ndarray:
    """One opaque, comparable key per (x, y) int64 row (for set membership of rows)."""
    return np.ascontiguousarray(coords, dtype=np.int64).view(np.dtype((np.void, 16))).ravel()


def split_mismatch(expected: np.ndarray, coords: np.ndarray, failed: np.ndarray) -> str | None:
    """``None`` when ``coords`` and ``failed`` split ``expected``: each in ``expected``'s order,
    every row of ``expected`` in exactly one of them; otherwise what differs."""
    if len(coords) + len(failed) != len(expected):
        return f"holds {len(coords)} read + {len(failed)} failed patches for {len(expected)} coords in the coords file"
    if len(failed) == 0:
        return None if np.array_equal(coords, expected) else "coords differ from the current coords file"
    is_failed = np.isin(_row_keys(expected), _row_keys(failed))
    if not (np.array_equal(expected[is_failed], failed) and np.array_equal(expected[~is_failed], coords)):
        return "coords and failed_coords differ from the current coords file"
    return None


# --------------------------------------------------------------------------------- HDF5
def _h5_path(root: Path, model_id: str, slide_id: str) -> Path:
    return root / model_id / f"{slide_id}.h5"


@dataclass(frozen=True)
class Embeddings:
    """Projected, L2-normalised patch embeddings ``(N, P)`` and what ties them to their projection."""

    values: np.ndarray
    projection_sha256: str
    model_id: str

    def attrs(self) -> dict[str, Any]:
        return {"projection_sha256": self.projection_sha256, "model_id": self.model_id, "normalized": True}


def _h5_write(
    root: Path,
    model_id: str,
    slide_id: str,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: Mapping[str, Any],
    coords_attrs: Mapping[str, Any],
    failed_coords: np.ndarray | None = None,
    embeddings: Embeddings | None = None,
) -> Path:
    final = _h5_path(root, model_id, slide_id)
    with atomic_path(final) as tmp:
        with h5py.File(tmp, "w") as f:
            n, d = features.shape
            chunks = (max(1, min(n, 1024)), d) if n else None
            f.create_dataset("features", data=features.astype(np.float32, copy=False), chunks=chunks)
            c = f.create_dataset("coords", data=coords.astype(np.int64, copy=False).reshape(-1, 2))
            for k, v in coords_attrs.items():
                c.attrs[k] = _h5able(v)
            f.create_dataset(FAILED_COORDS, data=as_coords(failed_coords))
            if embeddings is not None:
                e = f.create_dataset(EMBEDDINGS, data=embeddings.values.astype(np.float16, copy=False))
                for k, v in embeddings.attrs().items():
                    e.attrs[k] = v
            for k, v in attrs.items():
                f.attrs[k] = _h5able(v)
            f.attrs["complete"] = True  # last: marks the file finished
            f.flush()
    return final


def _read_all(dset: Any) -> np.ndarray:
    out = np.empty(dset.shape, dset.dtype)
    if out.size:
        dset.read_direct(out)  # no intermediate copy (a quarter faster than dset[:])
    return out


def _h5_read(root: Path, model_id: str, slide_id: str, embeddings_for: str | None = None) -> SlideFeatures:
    with h5py.File(_h5_path(root, model_id, slide_id), "r") as f:
        e_attrs = {k: jsonable(v) for k, v in f[EMBEDDINGS].attrs.items()} if EMBEDDINGS in f else {}
        use = _use_embeddings(e_attrs, embeddings_for)
        return SlideFeatures(
            features=f["features"][:PROBE_ROWS] if use else _read_all(f["features"]),
            coords=f["coords"][:],
            attrs={k: jsonable(v) for k, v in f.attrs.items()},
            coords_attrs={k: jsonable(v) for k, v in f["coords"].attrs.items()},
            failed_coords=f[FAILED_COORDS][:] if FAILED_COORDS in f else None,
            embeddings=_read_all(f[EMBEDDINGS]) if use else None,
            embeddings_attrs=e_attrs,
        )


def _use_embeddings(e_attrs: Mapping[str, Any], embeddings_for: str | None) -> bool:
    """Load the stored embeddings instead of the features: asked for, and made by that projection."""
    return embeddings_for is not None and e_attrs.get("projection_sha256") == embeddings_for


# --------------------------------------------------------------------------------- zarr
def _zarr_root(root: Path, model_id: str) -> Path:
    return root / f"{model_id}.zarr"


def _zarr_path(root: Path, model_id: str, slide_id: str) -> Path:
    return _zarr_root(root, model_id) / slide_id


def _ensure_zarr_root(path: Path) -> None:
    meta = path / "zarr.json"
    if not meta.exists():
        path.mkdir(parents=True, exist_ok=True)
        doc = {"zarr_format": 3, "node_type": "group", "attributes": {}}
        atomic_write_text(meta, json.dumps(doc))


def _zarr_write(
    root: Path,
    model_id: str,
    slide_id: str,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: Mapping[str, Any],
    coords_attrs: Mapping[str, Any],
    failed_coords: np.ndarray | None = None,
    embeddings: Embeddings | None = None,
) -> Path:
    import zarr

    zroot = _zarr_root(root, model_id)
    _ensure_zarr_root(zroot)
    final = zroot / slide_id
    tmp = zroot / f".{slide_id}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        n, d = features.shape
        every = {"write_empty_chunks": True}  # all chunks on disk: a missing one is damage (see _zarr_array)
        group.create_array("features", data=features.astype(np.float32, copy=False),
                           chunks=(max(1, min(n, 1024)), max(d, 1)), config=every)
        c = group.create_array("coords", data=coords.astype(np.int64, copy=False).reshape(-1, 2),
                               chunks=(max(1, min(n, 65536)), 2), config=every)
        c.attrs.update({k: jsonable(v) for k, v in coords_attrs.items()})
        failed = as_coords(failed_coords)
        group.create_array(FAILED_COORDS, data=failed, chunks=(max(1, min(len(failed), 65536)), 2), config=every)
        if embeddings is not None:
            vals = embeddings.values.astype(np.float16, copy=False)
            e = group.create_array(EMBEDDINGS, data=vals, chunks=(max(1, min(n, 4096)), max(vals.shape[1], 1)),
                                   config=every)
            e.attrs.update(embeddings.attrs())
        group.attrs.update({k: jsonable(v) for k, v in attrs.items()})
        group.attrs["complete"] = True
        for p in sorted(tmp.rglob("*"), reverse=True):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(zroot)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _zarr_read(root: Path, model_id: str, slide_id: str, embeddings_for: str | None = None) -> SlideFeatures:
    import zarr

    group = zarr.open_group(str(_zarr_path(root, model_id, slide_id)), mode="r")
    feats, crds = _zarr_array(group, "features"), _zarr_array(group, "coords")
    e_attrs = dict(group[EMBEDDINGS].attrs) if EMBEDDINGS in group else {}
    use = _use_embeddings(e_attrs, embeddings_for)
    return SlideFeatures(
        features=np.asarray(feats[:PROBE_ROWS] if use else feats[...]),
        coords=np.asarray(crds[...]),
        attrs=dict(group.attrs),
        coords_attrs=dict(crds.attrs),
        failed_coords=np.asarray(_zarr_array(group, FAILED_COORDS)[...]) if FAILED_COORDS in group else None,
        embeddings=np.asarray(_zarr_array(group, EMBEDDINGS)[...]) if use else None,
        embeddings_attrs=e_attrs,
    )


def _zarr_array(group: Any, name: str) -> Any:
    """``group[name]``, refused when a chunk file is missing: zarr reads a missing chunk as
    its fill value, so a chunk lost in a copy would pass as zero features."""
    arr = group[name]
    if arr.nchunks_initialized != arr.nchunks:
        raise CorruptOutputError(f"zarr array {name!r} misses {arr.nchunks - arr.nchunks_initialized} of "
                                 f"{arr.nchunks} chunk files")
    return arr


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class FeatureStore:
    """One storage format: where a slide's features live, how to write and read them."""

    name: str
    path: Callable[[Path, str, str], Path]
    write_fn: Callable[..., Path]
    read_fn: Callable[..., SlideFeatures]

    def write(
        self,
        features_dir: str | os.PathLike[str],
        model_id: str,
        slide_id: str,
        features: np.ndarray,
        coords: np.ndarray,
        attrs: Mapping[str, Any],
        coords_attrs: Mapping[str, Any],
        failed_coords: np.ndarray | None = None,
        embeddings: Embeddings | None = None,
    ) -> Path:
        """Write one slide atomically; ``failed_coords`` (default: none) are the unread patches left out,
        ``embeddings`` (optional) the projected rows of ``features``."""
        return self.write_fn(Path(features_dir), model_id, slide_id, features, coords, attrs, coords_attrs,
                             failed_coords, embeddings)

    def read(self, features_dir: str | os.PathLike[str], model_id: str, slide_id: str, *,
             embeddings_for: str | None = None) -> SlideFeatures:
        """One slide. With ``embeddings_for`` (a projection's sha256) and stored embeddings made by
        that projection, the embeddings are read instead of the features (see :class:`SlideFeatures`)."""
        return self.read_fn(Path(features_dir), model_id, slide_id, embeddings_for)

    def path_for(self, features_dir: str | os.PathLike[str], model_id: str, slide_id: str) -> Path:
        return self.path(Path(features_dir), model_id, slide_id)

    def validate(
        self,
        features_dir: str | os.PathLike[str],
        model_id: str,
        slide_id: str,
        expected_coords: np.ndarray,
        coords_attrs: Mapping[str, Any] | None = None,
        precision: str | None = None,
    ) -> str | None:
        """``None`` when the stored slide is complete and matches; otherwise why it must be redone.

        Matches: same ``model_id``, schema version 2 (or 1 without failed patches), one
        finite feature row per stored coord, ``n_failed_patches`` = rows of ``failed_coords``,
        ``coords`` + ``failed_coords`` split ``expected_coords`` (see :func:`split_mismatch`),
        and the slide file they were read from is the one the current coords file records
        (``slide_fingerprint`` of ``coords_attrs``: a slide re-tiled after its file was replaced
        keeps no features, even where its coords come out the same; features written before
        fingerprints were recorded are judged by their coords alone). ``precision``, when given
        (a run that asked for one, not ``auto``), must be the stored ``precision``.
        """
        path = self.path_for(features_dir, model_id, slide_id)
        if not path.exists():
            return "missing"
        try:
            sf = self.read(features_dir, model_id, slide_id)
        except Exception as e:  # truncated/corrupt files raise many different errors
            return f"unreadable ({type(e).__name__}: {one_line(e)})"
        if sf.attrs.get("complete") is not True:
            return "incomplete (no complete=True attribute)"
        if sf.attrs.get("model_id") != model_id:
            return f"written by another model setting ({sf.attrs.get('model_id')!r})"
        if precision is not None and sf.attrs.get("precision") != precision:
            return f"embedded in {sf.attrs.get('precision')}, not the {precision} this run asks for"
        want, got = (coords_attrs or {}).get(FINGERPRINT), sf.coords_attrs.get(FINGERPRINT)
        if want and got and want != got:
            return "read from another slide file (the slide was replaced and re-tiled since)"
        reason = _schema_mismatch(sf)
        if reason is not None:
            return reason
        coords, failed = as_coords(sf.coords), as_coords(sf.failed_coords)
        if sf.features.ndim != 2 or sf.features.shape[0] != len(coords):
            return f"holds {sf.features.shape[0] if sf.features.ndim else '?'} features for {len(coords)} coords"
        if int(sf.attrs.get("n_failed_patches", 0) or 0) != len(failed):
            return f"n_failed_patches={sf.attrs.get('n_failed_patches')} but {len(failed)} failed_coords"
        reason = split_mismatch(as_coords(expected_coords), coords, failed)
        if reason is not None:
            return reason
        if not np.all(np.isfinite(sf.features)):
            return "non-finite features"
        if sf.embeddings_attrs and sf.embeddings_attrs.get("model_id") != model_id:
            return f"embeddings written for another model setting ({sf.embeddings_attrs.get('model_id')!r})"
        return None


def _schema_mismatch(sf: SlideFeatures) -> str | None:
    """Why ``sf``'s schema cannot be resumed from (``None`` when it can)."""
    version = sf.attrs.get("features_schema_version")
    if version == LEGACY_SCHEMA_VERSION and sf.failed_coords is None:
        if sf.n_blank_substituted:
            return (f"holds {sf.n_blank_substituted} white substitutes of unreadable patches (schema 1); "
                    "re-embedding leaves them out")
        return None
    if version != FEATURES_SCHEMA_VERSION:
        return f"schema version {version} (expected {FEATURES_SCHEMA_VERSION})"
    if sf.failed_coords is None:
        return f"no {FAILED_COORDS} dataset"
    return None


_STORES: dict[str, FeatureStore] = {
    "h5": FeatureStore("h5", _h5_path, _h5_write, _h5_read),
    "zarr": FeatureStore("zarr", _zarr_path, _zarr_write, _zarr_read),
}


def get_store(name: str) -> FeatureStore:
    """The feature store called ``name`` (``h5`` or ``zarr``)."""
    try:
        return _STORES[name]
    except KeyError:
        raise ConfigError(f"unknown feature store {name!r} (choose from {', '.join(_STORES)})") from None


def store_names() -> list[str]:
    return list(_STORES)

