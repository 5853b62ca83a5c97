"""The ``export`` verb: an output folder in, the files another tool reads out.

>>> summary = export_outputs("out/", "clam", "clam_out/")   # doctest: +SKIP
>>> print(summary.line)                                       # doctest: +SKIP

Every slide of ``OUT/coords`` is read (with one model's features when ``OUT/features``
holds any: ``model_id``, or the only one), checked (complete, features row-aligned with the
coords) and handed to the chosen exporter, which writes each file atomically. A slide whose
files are unreadable is a ``failed`` result and one log line; the others still export.
Usage errors (no coords, unknown format or model id, several models and none named,
unwritable destination) raise :class:`~wsi_pipeline.errors.WsiPipelineError` before any work.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError, WsiPipelineError, one_line
from ..store.atomic import atomic_write_text, ensure_writable_dir
from .clam import ClamExporter
from .source import SlideSource, coords_files, load_slide, pick_feature_set
from .trident import TridentExporter

_logger = logging.getLogger(__name__)

#: In a destination whose layout does not name the model: which model's features it holds.
MODEL_FILE = "wsi_pipeline_export.json"


class Exporter(Protocol):
    """One target layout: ``export_slide`` writes one slide under ``dest`` and returns the files.
    ``model_in_paths``: the feature files' paths name the model (else one model per ``dest``)."""

    name: str
    help: str
    model_in_paths: bool

    def export_slide(self, src: SlideSource, dest: Path) -> list[Path]: ...


EXPORTERS: dict[str, Exporter] = {e.name: e for e in (ClamExporter(), TridentExporter())}


def exporter_names() -> list[str]:
    return list(EXPORTERS)


def get_exporter(name: str) -> Exporter:
    try:
        return EXPORTERS[name]
    except KeyError:
        raise ConfigError(f"unknown export format {name!r} (choose from {', '.join(EXPORTERS)})") from None


@dataclass(frozen=True)
class ExportResult:
    """Outcome of one slide: ``status`` is ``ok`` or ``failed``."""

    slide_id: str
    status: str
    reason: str = ""
    n_patches: int = 0
    files: tuple[str, ...] = ()


@dataclass
class ExportSummary:
    to: str
    dest: Path
    model_id: str | None
    results: list[ExportResult] = field(default_factory=list)
    notice: str = ""
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def line(self) -> str:
        feats = f"features {self.model_id}" if self.model_id else "patches only"
        return (f"export --to {self.to}: {self.count('ok')} ok, {self.count('failed')} failed ({feats}) "
                f"in {self.seconds:.1f} s -> {self.dest}")


def export_outputs(out_dir: str | os.PathLike[str], to: str, dest: str | os.PathLike[str],
                   model_id: str | None = None) -> ExportSummary:
    """Export every slide of ``out_dir`` in the ``to`` layout (``clam`` or ``trident``) under ``dest``."""
    t0 = time.perf_counter()
    exporter = get_exporter(to)
    files = coords_files(out_dir)
    feature_set = pick_feature_set(out_dir, model_id)
    target = ensure_writable_dir(dest)
    if feature_set is not None and not exporter.model_in_paths:
        _claim_for_model(target, to, feature_set.model_id)
    summary = ExportSummary(to, target, feature_set.model_id if feature_set else None)
    if feature_set is None:
        summary.notice = f"{Path(out_dir) / 'features'} holds no features: exporting patch coordinates only"
        _logger.debug(summary.notice)  # the CLI prints it as a note
    for path in files:
        sid = path.stem
        try:
            src = load_slide(out_dir, path, feature_set)
            written = exporter.export_slide(src, target)
            left_out = f"{src.n_failed} unreadable patches left out" if src.n_failed else ""
            result = ExportResult(sid, "ok", left_out, n_patches=len(src.coords), files=tuple(str(p) for p in written))
        except WsiPipelineError as e:
            result = ExportResult(sid, "failed", one_line(e))
            _logger.error("%s: %s", sid, result.reason)
        summary.results.append(result)
    summary.seconds = time.perf_counter() - t0
    return summary


def _claim_for_model(dest: Path, to: str, model_id: str) -> None:
    """Mark ``dest`` as holding ``model_id``'s features (``MODEL_FILE``); :class:`ConfigError` when
    it holds another model's: the layout's file names do not say which model wrote them, so two
    models in one folder would mix silently."""
    marker = dest / MODEL_FILE
    try:
        held = json.loads(marker.read_text(encoding="utf-8")).get("model_id") if marker.exists() else None
    except (OSError, ValueError, AttributeError):
        held = None
    if held is not None and held != model_id:
        raise ConfigError(f"{dest} holds a {to} export of the features of {held}; export {model_id} into "
                          f"another folder ({to}'s file names do not name the model, so they would mix)")
    if held is None:
        atomic_write_text(marker, json.dumps({"format": to, "model_id": model_id}, indent=1) + "\n")


__all__ = ["EXPORTERS", "ExportResult", "ExportSummary", "Exporter", "export_outputs", "exporter_names",
           "get_exporter"]
