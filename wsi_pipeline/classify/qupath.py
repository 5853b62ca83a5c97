"""Per-patch class scores as a QuPath tile layer: ``scores/<prompts>/<slide_id>.geojson``.

One GeoJSON Feature per scored patch, in the order of the features file (patches that could
not be read were left out by ``embed`` and have no tile; their number is the provenance's
``n_failed_patches``):

* ``geometry``: the patch square as a Polygon in level-0 pixels (x right, y down), from the
  patch's ``coords`` row and ``patch_size_level0``;
* ``properties.objectType = "tile"``;
* ``properties.measurements``: ``"<class> score"`` = the cosine similarity of the patch to
  the class (what the heatmaps show and top-K pooling averages) and ``"<class> prob"`` =
  the patch's zero-shot probability, ``softmax(logit_scale · scores)`` over the classes;
* ``properties.classification``: the class of highest score, with ``name`` and ``color``
  (QuPath refuses a classification without both).

QuPath (File › Import objects) reads this as tiles it can colour by any measurement
(Measure › Show measurement maps). Provenance (slide, model, prompt file) is in the
``wsi_pipeline`` member of the collection, which GeoJSON readers ignore. The file is written
for every slide that has patches, with or without ``--no-visuals``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..report.geojson import feature_collection, write_feature_collection
from ..store.features import SlideFeatures
from ..store.provenance import model_provenance, slide_provenance
from .outputs import safe_name
from .pooling import SlideScores, softmax

SCORES_DIR = "scores"
#: Class colours (RGB) in class order, repeated when there are more classes.
CLASS_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def scores_path(out_dir: str | os.PathLike[str], prompts_name: str, slide_id: str) -> Path:
    """``out_dir/scores/<prompts>/<slide_id>.geojson`` (names made file-system safe)."""
    return Path(out_dir) / SCORES_DIR / safe_name(prompts_name) / f"{safe_name(slide_id)}.geojson"


def tile_features(coords: np.ndarray, patch_size_level0: int, similarity: np.ndarray,
                  class_names: Sequence[str], logit_scale: float) -> list[dict[str, Any]]:
    """One QuPath tile Feature per row of ``coords`` / ``similarity`` (N, C)."""
    sim = np.asarray(similarity, dtype=np.float64)
    probs = softmax(logit_scale * sim) if len(sim) else sim
    best = np.argmax(sim, axis=1) if len(sim) else np.zeros(0, dtype=np.int64)
    classes = [{"name": c, "color": list(CLASS_COLORS[i % len(CLASS_COLORS)])} for i, c in enumerate(class_names)]
    s = int(patch_size_level0)
    out = []
    for (x, y), row_s, row_p, b in zip(np.asarray(coords, dtype=np.int64).tolist(), sim.tolist(), probs.tolist(),
                                       best.tolist(), strict=True):
        measurements: dict[str, float] = {}
        for c, v, p in zip(class_names, row_s, row_p, strict=True):
            measurements[f"{c} score"] = v
            measurements[f"{c} prob"] = p
        out.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]},
            "properties": {"objectType": "tile", "classification": dict(classes[b]), "measurements": measurements},
        })
    return out


def write_scores_geojson(out_dir: str | os.PathLike[str], prompts_name: str, slide_id: str, scores: SlideScores,
                         features: SlideFeatures) -> Path:
    """Write the tile layer of one scored slide atomically; returns its path."""
    tiles = tile_features(features.coords, int(features.coords_attrs["patch_size_level0"]), scores.similarity,
                          scores.class_names, scores.logit_scale)
    provenance = {**slide_provenance(features.coords_attrs), **model_provenance(features.attrs),
                  "prompts": prompts_name, "output": "per-patch class scores", "logit_scale": scores.logit_scale,
                  "measurements": "<class> score: cosine similarity; <class> prob: softmax(logit_scale * scores)",
                  "n_failed_patches": features.n_left_out}
    path = scores_path(out_dir, prompts_name, slide_id)
    write_feature_collection(path, feature_collection(tiles, provenance))
    return path


__all__ = ["CLASS_COLORS", "SCORES_DIR", "scores_path", "tile_features", "write_scores_geojson"]
