"""Prediction rows and their files: ``predictions/<name>.csv`` and ``.json``, the terminal table.

CSV columns, in order::

    slide_id, status, n_patches, k, predicted, prob_<class>..., score_<class>..., reason

``status`` is ``ok``, ``no_tissue`` (no patches: no prediction) or ``failed`` (``reason``
says which stage and why). ``k`` is the number of patches actually pooled,
``min(top_k, n_patches)``; ``score_<class>`` is the mean cosine similarity of those top
patches and ``prob_<class>`` is ``softmax(logit_scale * scores)``. Classes keep the prompt
file's order. The JSON holds the same rows (plus every K of the prompt file under
``by_k``, the label when known and the visual outputs) under ``slides`` and the run's
provenance under ``provenance``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store.atomic import atomic_write_text
from .pooling import SlideScores

_logger = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"
SCHEMA_VERSION = 1
STATUS_FAILED = "failed"
BASE_COLUMNS = ("slide_id", "status", "n_patches", "k", "predicted")


@dataclass
class SlidePrediction:
    """One slide's row (see the module docstring for the meaning of each field)."""

    slide_id: str
    status: str
    reason: str = ""
    n_patches: int | None = None
    k: int | None = None
    predicted: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    by_k: dict[int, dict[str, Any]] = field(default_factory=dict)
    label: str | None = None
    visuals: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # reader, mpp, patch size, model, schedule
    seconds: float = 0.0  # scoring time (status.csv only, not in the prediction files)

    @classmethod
    def failed(cls, slide_id: str, reason: str, n_patches: int | None = None) -> SlidePrediction:
        return cls(slide_id, STATUS_FAILED, " ".join(reason.split()), n_patches)

    @classmethod
    def from_scores(cls, slide_id: str, scores: SlideScores) -> SlidePrediction:
        """The row of a scored slide at its primary K (all Ks under ``by_k``)."""
        names = scores.class_names
        by_k = {}
        for k in scores.ks:
            if k in scores.pooled:
                by_k[k] = {
                    "k_used": scores.k_used(k),
                    "predicted": scores.predictions[k],
                    "scores": {c: float(v) for c, v in zip(names, scores.pooled[k], strict=True)},
                    "probabilities": {c: float(v) for c, v in zip(names, scores.probabilities[k], strict=True)},
                }
        primary = by_k.get(scores.primary_k, {})
        return cls(
            slide_id=slide_id,
            status=scores.status,
            reason="" if by_k else "no patches",
            n_patches=scores.n_patches,
            k=scores.k_used(scores.primary_k),
            predicted=primary.get("predicted"),
            probabilities=dict(primary.get("probabilities", {})),
            scores=dict(primary.get("scores", {})),
            by_k=by_k,
        )

    def csv_row(self, class_names: Sequence[str]) -> list[Any]:
        row: list[Any] = [self.slide_id, self.status, _blank(self.n_patches), _blank(self.k), _blank(self.predicted)]
        row += [_blank(self.probabilities.get(c)) for c in class_names]
        row += [_blank(self.scores.get(c)) for c in class_names]
        return [*row, self.reason]

    def to_json(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id,
            "status": self.status,
            "reason": self.reason,
            "n_patches": self.n_patches,
            "k": self.k,
            "predicted": self.predicted,
            "probabilities": self.probabilities,
            "scores": self.scores,
            "by_k": {str(k): v for k, v in self.by_k.items()},
            "label": self.label,
            "visuals": self.visuals,
            "provenance": self.provenance,
        }


def _blank(v: Any) -> Any:
    return "" if v is None else v


def csv_columns(class_names: Sequence[str]) -> list[str]:
    """The CSV header for ``class_names``."""
    return [*BASE_COLUMNS, *(f"prob_{c}" for c in class_names), *(f"score_{c}" for c in class_names), "reason"]


def safe_name(name: str) -> str:
    """A file-name-safe form of a prompt-set, slide or class name (never empty), one per name.

    A name made of ``A-Z a-z 0-9 . _ -`` only is kept as it is; any other is reduced to those
    characters and gets the first 8 hex digits of its SHA-256 appended, so that two names
    never share a file (``标本 1`` and ``切片 1`` both reduce to ``1``).
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    if slug and slug == name:
        return slug
    return f"{slug or 'unnamed'}_{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"


def prediction_paths(out_dir: str | os.PathLike[str], prompts_name: str) -> tuple[Path, Path]:
    """``(csv, json)`` paths of a prompt set's predictions."""
    folder, name = Path(out_dir) / PREDICTIONS_DIR, safe_name(prompts_name)
    return folder / f"{name}.csv", folder / f"{name}.json"  # not with_suffix: names may hold dots


def write_predictions(
    out_dir: str | os.PathLike[str],
    prompts_name: str,
    class_names: Sequence[str],
    rows: Sequence[SlidePrediction],
    provenance: Mapping[str, Any],
) -> tuple[Path, Path]:
    """Write the CSV and the JSON atomically; returns their paths."""
    csv_path, json_path = prediction_paths(out_dir, prompts_name)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_columns(class_names))
    for r in rows:
        writer.writerow(r.csv_row(class_names))
    atomic_write_text(csv_path, buf.getvalue())
    doc = {
        "schema_version": SCHEMA_VERSION,
        "columns": csv_columns(class_names),
        "classes": list(class_names),
        "provenance": dict(provenance),
        "slides": [r.to_json() for r in rows],
    }
    atomic_write_text(json_path, json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    _logger.info("predictions of %d slides written to %s", len(rows), csv_path)
    return csv_path, json_path


def read_predictions_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The CSV rows as dicts of strings (empty cells are ``""``)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def format_table(rows: Sequence[SlidePrediction], class_names: Sequence[str], max_rows: int = 40) -> str:
    """A fixed-width terminal table of the rows (at most ``max_rows``) and a count line."""
    header = ["slide_id", "status", "patches", "k", "predicted", *(f"p({c})" for c in class_names), "note"]
    body = []
    for r in rows[:max_rows]:
        probs = [f"{r.probabilities[c]:.3f}" if c in r.probabilities else "-" for c in class_names]
        note = r.reason if len(r.reason) <= 70 else r.reason[:69] + "~"
        body.append([r.slide_id, r.status, _dash(r.n_patches), _dash(r.k), r.predicted or "-", *probs, note])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=False)]
    numeric = {2, 3} | set(range(5, 5 + len(class_names)))

    def line(cells: Sequence[Any]) -> str:
        parts = [str(c).rjust(w) if i in numeric else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(cells, widths, strict=False))]
        return "  ".join(parts).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *(line(b) for b in body)]
    if len(rows) > max_rows:
        out.append(f"... {len(rows) - max_rows} more slides (see the predictions CSV)")
    status = Counter(r.status for r in rows)
    preds = Counter(r.predicted for r in rows if r.predicted)
    out.append(
        f"{len(rows)} slides: " + ", ".join(f"{n} {s}" for s, n in sorted(status.items()))
        + ("; predicted " + ", ".join(f"{c} {preds[c]}" for c in class_names if preds[c]) if preds else "")
    )
    return "\n".join(out)


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)


__all__ = [
    "BASE_COLUMNS",
    "PREDICTIONS_DIR",
    "SlidePrediction",
    "csv_columns",
    "format_table",
    "prediction_paths",
    "read_predictions_csv",
    "safe_name",
    "write_predictions",
]
