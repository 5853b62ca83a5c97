"""Visual outputs of ``classify``: per-slide heatmaps and montages, and the HTML report.

Layout inside the output folder (all links in ``report.html`` are relative to it)::

    heatmaps/<prompts>/<slide>/<class>.png     similarity of every patch to the class
                                               (unreadable patches hatched grey: missing)
    montages/<prompts>/<slide>.png             top-K patches of the predicted class
    report.html

Names are made file-system safe with :func:`~wsi_pipeline.classify.outputs.safe_name`, which
gives two names two files (two slide ids never share a heatmap folder or a montage); two
classes whose file names differ only in case get a numeric suffix. A visual that cannot be
made (thumbnail missing, slide file moved) is logged and left out: it never fails a slide.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import WsiPipelineError
from ..report.heatmap import slide_heatmaps, thumbnail_scale
from ..report.html import ReportSlide, contour_rings, render_report, write_report
from ..report.montage import MAX_PATCHES, read_patches, render_montage, top_patch_indices
from ..report.png import write_png
from ..store.features import SlideFeatures
from ..store.provenance import model_provenance, slide_provenance
from .outputs import SlidePrediction, safe_name
from .pooling import SlideScores

_logger = logging.getLogger(__name__)

HEATMAP_DIR, MONTAGE_DIR, REPORT_FILE = "heatmaps", "montages", "report.html"


def class_file_names(class_names: Sequence[str]) -> dict[str, str]:
    """Class → unique, file-system-safe file stem."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for c in class_names:
        stem, i = safe_name(c), 1
        while stem.lower() in used:
            i += 1
            stem = f"{safe_name(c)}_{i}"
        used.add(stem.lower())
        out[c] = stem
    return out


def _load_thumbnail(out: Path, slide_id: str) -> Any | None:
    from PIL import Image

    path = out / "thumbnails" / f"{slide_id}.png"
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        _logger.warning("%s: thumbnail %s unreadable (%s); heatmaps drawn on a blank canvas", slide_id, path, e)
        return None


def write_slide_visuals(
    out_dir: str | os.PathLike[str],
    prompts_name: str,
    slide_id: str,
    scores: SlideScores,
    features: SlideFeatures,
    slide_path: str | None,
) -> dict[str, Any]:
    """Write the class heatmaps and the top-patch montage of one scored slide.

    Returns ``{"heatmaps": {class: relative path}, "montage": relative path or None}``.
    """
    out = Path(out_dir)
    names = scores.class_names
    stems = class_file_names(names)
    provenance = {**slide_provenance(features.coords_attrs), **model_provenance(features.attrs),
                  "prompts": prompts_name, "k": scores.k_used(scores.primary_k)}
    rel_dir = Path(HEATMAP_DIR) / safe_name(prompts_name) / safe_name(slide_id)
    images = slide_heatmaps(_load_thumbnail(out, slide_id), scores.similarity, features.coords,
                            features.coords_attrs, names, slide_id=slide_id, missing_coords=features.failed_coords)
    heat_prov = {**provenance, "output": "cosine-similarity heatmap"}
    if features.n_left_out:
        heat_prov["missing"] = f"{features.n_left_out} unreadable patches, not scored: hatched grey"
    heatmaps = {}
    for c, img in images.items():
        rel = rel_dir / f"{stems[c]}.png"
        write_png(out / rel, img, {**heat_prov, "class": c})
        heatmaps[c] = rel.as_posix()
    montage = None
    if scores.prediction is not None and slide_path:
        col = names.index(scores.prediction)
        idx = top_patch_indices(scores.similarity, col, min(scores.k_used(scores.primary_k), MAX_PATCHES))
        try:
            patches = read_patches(slide_path, features.coords[idx], features.coords_attrs)
        except WsiPipelineError as e:
            _logger.warning("%s: no montage, slide unreadable (%s)", slide_id, e)
        else:
            captions = [f"#{r + 1}  {scores.similarity[i, col]:.3f}" for r, i in enumerate(idx)]
            img = render_montage(patches, captions, title=f"{slide_id}: top {len(idx)} patches of {scores.prediction}")
            rel = Path(MONTAGE_DIR) / safe_name(prompts_name) / f"{safe_name(slide_id)}.png"
            write_png(out / rel, img, {**provenance, "output": "top-K patch montage", "class": scores.prediction})
            montage = rel.as_posix()
    return {"heatmaps": heatmaps, "montage": montage}


def report_slide(out_dir: str | os.PathLike[str], row: SlidePrediction) -> ReportSlide:
    """The report entry of one prediction row (thumbnail and tissue contour when present)."""
    out = Path(out_dir)
    entry = ReportSlide(
        slide_id=row.slide_id, status=row.status, reason=row.reason, n_patches=row.n_patches, k=row.k,
        predicted=row.predicted, label=row.label, probabilities=row.probabilities,
        heatmaps=dict(row.visuals.get("heatmaps", {})), montage=row.visuals.get("montage"),
    )
    thumb = out / "thumbnails" / f"{row.slide_id}.png"
    if not thumb.is_file():
        return entry
    try:
        from PIL import Image

        from ..report.geojson import read_geojson
        from ..store.coords import read_coords

        with Image.open(thumb) as im:
            entry.thumb_size = im.size
        entry.thumbnail = f"thumbnails/{row.slide_id}.png"
        tissue = out / "tissue" / f"{row.slide_id}.geojson"
        coords_file = out / "coords" / f"{row.slide_id}.h5"
        if tissue.is_file() and coords_file.is_file():
            _, attrs = read_coords(coords_file)
            entry.contours = contour_rings(read_geojson(tissue), thumbnail_scale(attrs, entry.thumb_size))
    except (OSError, WsiPipelineError, KeyError, ValueError) as e:
        _logger.warning("%s: thumbnail or tissue contour left out of the report (%s)", row.slide_id, e)
    return entry


def write_classify_report(
    out_dir: str | os.PathLike[str],
    title: str,
    rows: Sequence[SlidePrediction],
    class_names: Sequence[str],
    info: Mapping[str, Any],
    metrics_text: str | None = None,
) -> Path:
    """Render and write ``report.html`` in ``out_dir``."""
    page = render_report(title, class_names, [report_slide(out_dir, r) for r in rows], info=info,
                         metrics_text=metrics_text)
    return write_report(Path(out_dir) / REPORT_FILE, page)


__all__ = ["class_file_names", "report_slide", "write_classify_report", "write_slide_visuals"]
