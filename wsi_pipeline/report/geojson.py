"""Tissue polygons as GeoJSON (level-0 pixel coordinates), importable into QuPath.

QuPath reads a ``FeatureCollection`` whose features carry
``properties.objectType = "annotation"`` and an optional ``classification``; coordinates
are image pixels at full resolution, y downwards, which is what we write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import CorruptOutputError
from ..store.atomic import atomic_write_text
from ..store.provenance import KEY as PROVENANCE_KEY

TISSUE_CLASS = {"name": "Tissue", "color": [0, 160, 0]}


def polygons_to_geojson(polygons: Iterable[Any], properties: Mapping[str, Any] | None = None,
                        provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A FeatureCollection dict with one annotation feature per (multi)polygon.

    ``provenance`` goes into a ``wsi_pipeline`` member of the collection (a foreign member in
    RFC 7946 terms: GeoJSON readers such as QuPath and shapely ignore it).
    """
    from shapely.geometry import mapping

    features = []
    for i, poly in enumerate(polygons):
        props: dict[str, Any] = {
            "objectType": "annotation",
            "classification": dict(TISSUE_CLASS),
            "name": f"tissue {i + 1}",
            "area_px": float(poly.area),
        }
        props.update(properties or {})
        features.append({"type": "Feature", "geometry": mapping(poly), "properties": props})
    return feature_collection(features, provenance)


def feature_collection(features: list[dict[str, Any]], provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A FeatureCollection of ``features``, with ``provenance`` in the ``wsi_pipeline`` member."""
    doc: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if provenance is not None:
        doc[PROVENANCE_KEY] = dict(provenance)
    return doc


def write_feature_collection(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> None:
    """Write a GeoJSON document atomically (temp file + rename)."""
    atomic_write_text(path, json.dumps(doc, separators=(",", ":"), default=_json_default))


def write_geojson(path: str | os.PathLike[str], polygons: Iterable[Any],
                  properties: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None) -> None:
    """Write the polygons atomically (temp file + rename)."""
    write_feature_collection(path, polygons_to_geojson(polygons, properties, provenance))


def read_geojson(path: str | os.PathLike[str]) -> list[Any]:
    """The shapely geometries of a FeatureCollection; :class:`CorruptOutputError` if invalid."""
    from shapely.geometry import shape

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("type") != "FeatureCollection" or not isinstance(doc.get("features"), list):
            raise ValueError("not a FeatureCollection")
        return [shape(feat["geometry"]) for feat in doc["features"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptOutputError(f"{path}: not a valid tissue GeoJSON ({e})") from e


def _json_default(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"cannot serialise {type(v).__name__}")


__all__ = ["feature_collection", "polygons_to_geojson", "read_geojson", "write_feature_collection", "write_geojson"]
