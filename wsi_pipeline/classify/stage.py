"""The ``classify`` stage: slides (or an earlier output folder) in, predictions, metrics and visuals out.

>>> s = classify_slides(["a.svs"], "out/", "configs/prompts/nsclc.yaml")   # doctest: +SKIP
>>> print(s.table()); print(s.metrics_block())                          # doctest: +SKIP

Steps: load and check the prompt file and labels (before any work) → ``tile`` the slides
whose coords are missing or stale (ROI images with :func:`.inputs.roi_tiling_config`) →
``embed`` the slides whose features are missing or stale → build the text classifier(s) →
score every slide with :func:`~.pooling.score_slide_sets` (features read from disk in a
background thread while the previous slide is scored) → write predictions CSV/JSON,
``metrics.json``, the per-patch scores for QuPath (``scores/<prompts>/<slide>.geojson``, see
:mod:`.qupath`; also with ``visuals=False``), heatmaps, montages and ``report.html``. A slide
that fails in any stage is a ``failed`` row with the stage and reason; the batch goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..config import TilingConfig
from ..errors import ConfigError, SlideError, WsiPipelineError, one_line
from ..progress import Progress
from ..runtime.executor import Executor, RuntimeConfig, make_executor
from ..runtime.locks import LOCKED_REASON_PREFIX
from ..store.atomic import atomic_write_text, ensure_writable_dir
from ..store.features import SlideFeatures
from ..store.status import latest_status, read_status
from .inputs import collect_inputs, is_roi_image, roi_tiling_config
from .metrics import check_label_slides, compute_metrics, format_metrics, load_labels, prompt_set_robustness
from .outputs import SlidePrediction, format_table, write_predictions
from .pooling import DEFAULT_TOP_K, STATUS_NO_TISSUE, SlideScores, validate_ks
from .prompts import PromptSet, load_prompts, sample_prompt_sets
from .scoring import STAGE, OnScored, score_features

if TYPE_CHECKING:
    from ..embed.stage import EmbedConfig

_logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TEXT_CACHE_DIR = Path("cache") / "text_classifiers"


@dataclass
class ClassifySummary:
    """Everything a ``classify`` run produced; ``table()`` and ``metrics_block()`` are for the terminal."""

    prompts_name: str
    class_names: tuple[str, ...]
    ks: tuple[int, ...]
    model_id: str
    rows: list[SlidePrediction]
    predictions_csv: Path
    predictions_json: Path
    metrics: dict[str, Any] | None = None
    metrics_path: Path | None = None
    report_path: Path | None = None
    tile_results: list[Any] = field(default_factory=list)
    embed_summary: Any = None
    tiling: TilingConfig | None = None  # what the slides were tiled with (None: several settings)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)

    @property
    def n_failed(self) -> int:
        return self.count("failed")

    def table(self, max_rows: int = 40) -> str:
        """Fixed-width table of the predictions (first ``max_rows`` slides) and a count line."""
        return format_table(self.rows, self.class_names, max_rows=max_rows)

    def metrics_block(self) -> str:
        """The metrics block, or ``""`` when no labels were given."""
        return format_metrics(self.metrics) if self.metrics else ""

    @property
    def line(self) -> str:
        return (f"classify: {self.count('ok')} ok, {self.count('no_tissue')} no_tissue, {self.n_failed} failed "
                f"in {self.seconds:.1f} s -> {self.predictions_csv}")


def resolve_ks(top_k: int | None, prompts: PromptSet) -> tuple[int, ...]:
    """``top_k`` first (when given), then the prompt file's Ks, else :data:`DEFAULT_TOP_K`."""
    ks = list(prompts.top_k) or [DEFAULT_TOP_K]
    if top_k is not None:
        (k,) = validate_ks(top_k)
        ks = [k, *(x for x in ks if x != k)]
    return validate_ks(ks)


def classify_slides(
    inputs: Sequence[str | os.PathLike[str]] | None,
    out_dir: str | os.PathLike[str],
    prompts_path: str | os.PathLike[str],
    *,
    tiling: TilingConfig | None = None,
    embed: EmbedConfig | None = None,
    top_k: int | None = None,
    labels: str | os.PathLike[str] | None = None,
    prompt_sets: int = 0,
    seed: int = 0,
    visuals: bool = True,
    progress: Progress | None = None,
    runtime: RuntimeConfig | None = None,
    recursive: bool = False,
) -> ClassifySummary:
    """Tile and embed what is missing or stale, then classify every slide zero-shot.

    Parameters
    ----------
    inputs : slide / ROI image paths, folders and ``@list.txt`` files (expanded by
        :func:`.inputs.collect_inputs`, descending into sub-folders when ``recursive``), or
        ``None`` to classify the slides already tiled into ``out_dir/coords``.
    out_dir : output folder (shared with ``tile`` and ``embed``).
    prompts_path : prompt file (YAML, or CONCH/MI-Zero JSON).
    tiling, embed : :class:`~wsi_pipeline.config.TilingConfig` and
        :class:`~wsi_pipeline.embed.stage.EmbedConfig` (defaults when ``None``).
    top_k : primary K (default: the prompt file's first ``top_k``, else 50).
    labels : ``slide_id,label`` CSV; enables metrics.
    prompt_sets : number of MI-Zero-style single-synonym prompt sets (needs ``labels``).
    seed : seed of the prompt-set sampling.
    visuals : write heatmaps, montages and ``report.html``.
    progress : progress hooks (the CLI draws bars).
    runtime : executor for ``tile`` and ``embed`` (``local`` or ``ray``), ``--shard`` and lock
        timeout. With a shard only its slides are processed; predictions go to
        ``predictions/<name>_shard-<i>-of-<n>.csv`` and metrics and ``report.html`` are left to
        a final run without ``--shard`` on the same folder (which only scores: tile and embed
        outputs validate and are skipped).

    Raises
    ------
    ConfigError
        Bad prompt file, labels naming unknown slides or classes, bad options, no slides.
    OutputError
        ``out_dir`` is not writable.
    """
    from ..embed.stage import EmbedConfig, find_coords_files, load_encoder, resolve_device
    from ..tiling.stage import check_unique_ids, slide_id_from_path

    t_start = time.perf_counter()
    tiling = tiling or TilingConfig()
    tiling_used: TilingConfig | None = tiling  # what the scored slides were tiled with (None: several)
    embed = embed or EmbedConfig()
    runtime = runtime or RuntimeConfig()
    executor = make_executor(runtime)  # e.g. Ray not installed: a usage error before any work
    prompts = load_prompts(prompts_path)
    ks = resolve_ks(top_k, prompts)
    if embed.adapter is not None and embed.context is None:  # an adapter acts through a context: the prompts'
        embed = dataclasses.replace(embed, context=str(prompts_path))
        _logger.info("context for adapter %s: the classes of %s", embed.adapter, prompts_path)
    for name, value in (("prompt_sets", prompt_sets), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    label_map = load_labels(labels, prompts.class_names) if labels is not None else None
    if prompt_sets and label_map is None:
        raise ConfigError("--prompt-sets needs --labels: robustness is the balanced accuracy of each prompt set")
    coords_files = find_coords_files(out_dir) if inputs is None else []
    if inputs is None and not coords_files:  # before the folder is made: nothing written
        raise ConfigError(f"{Path(out_dir) / 'coords'} holds no coords files; give slide paths so they are tiled first")
    out = ensure_writable_dir(out_dir)
    paths: list[Path] | None = None
    tile_failed: dict[str, str] = {}
    if inputs is None:
        tiling_used = _tiling_of(coords_files, tiling)
        # slides whose tiling failed have no coords file, but stay in the run as failed rows
        tile_failed = {sid: f"tile: {row['reason']}" for sid, row in latest_status(out, "tile").items()
                       if row["status"] == "failed" and not (out / "coords" / f"{sid}.h5").exists()}
        slide_ids = sorted([p.stem for p in coords_files] + list(tile_failed))
    else:
        paths = collect_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs, recursive=recursive)
        slide_ids = check_unique_ids(paths, out)
    if label_map is not None:
        check_label_slides(label_map, slide_ids, f"labels CSV {labels}")
    shard = runtime.shard
    if shard is not None:  # labels were checked against every slide; work on this shard's only
        slide_ids = shard.select(slide_ids)
        paths = None if paths is None else shard.select(paths, key=slide_id_from_path)
        _logger.info("shard %s: %d slides; run classify without --shard afterwards for metrics and report",
                     shard, len(slide_ids))
        runtime = runtime.with_(shard=None)
    # the model first: a bad checkpoint is a usage error before any slide is tiled
    model = load_encoder(embed, resolve_device(embed.device)) if slide_ids else None

    failed, tile_results, embed_summary = _tile_and_embed(paths, slide_ids, out, tiling, embed, progress, runtime,
                                                          executor, model, tile_failed)
    timings = {"tile_embed": time.perf_counter() - t_start}

    model_id = embed_summary.model_id if embed_summary else ""
    classifiers: list[Any] = []
    n_scorable = sum(s not in failed for s in slide_ids)
    if n_scorable and model is not None:
        classifiers = _load_classifiers(model, embed, prompts, out, prompt_sets, seed)
    on_scored = _on_scored_callback(out, prompts.name, embed.slides_dir, visuals)
    rows, set_preds, score_timings = score_features(
        out / "features", model_id, slide_ids, model, classifiers, prompts.class_names, ks,
        store=embed.store, failed=failed, on_scored=on_scored, progress=progress, status_dir=out,
    )
    timings.update(score_timings)
    tiled = {row["slide_id"]: row["reason"] for row in read_status(out)
             if row["stage"] == "tile" and row["status"] == "ok"}
    for r in rows:
        r.label = label_map.get(r.slide_id) if label_map else None
        why = tiled.get(r.slide_id) if r.status == STATUS_NO_TISSUE else None
        if why:  # why the last tiling found none: "no tissue found", "image is 80x60 px, smaller than …"
            r.reason = f"no patches: {why}"
    provenance = _provenance(prompts, prompts_path, ks, embed, model, model_id, tiling_used, labels, prompt_sets,
                             seed)
    t0 = time.perf_counter()
    if shard is not None:
        provenance["shard"] = str(shard)
    name = prompts.name if shard is None else f"{prompts.name}_{shard.tag}"
    csv_path, json_path = write_predictions(out, name, prompts.class_names, rows, provenance)
    summary = ClassifySummary(prompts.name, prompts.class_names, ks, model_id, rows, csv_path, json_path,
                              tile_results=tile_results, embed_summary=embed_summary, timings=timings,
                              tiling=tiling_used)
    if label_map is not None and shard is None:
        summary.metrics = _metrics(rows, label_map, prompts.class_names, set_preds, prompt_sets, seed)
        summary.metrics["provenance"] = {k: provenance[k] for k in ("prompts", "top_k", "model", "created")}
        summary.metrics["labels"] = os.path.abspath(labels) if labels is not None else None
        summary.metrics_path = out / METRICS_FILE
        atomic_write_text(summary.metrics_path, json.dumps(summary.metrics, indent=1, allow_nan=False) + "\n")
    if visuals and shard is None:
        from .visuals import write_classify_report

        model_prov = provenance["model"]
        info = {"prompts": f"{prompts.name} (sha256 {prompts.sha256[:12]})", "classes": ", ".join(prompts.class_names),
                "top-K": ks[0], "model": model_id or embed.model,
                "weights sha256": (model_prov.get("weights_sha256") or "")[:16] or "none (random init)",
                "tiling": (f"{tiling_used.patch_size} px at {tiling_used.target_mpp:g} µm/px" if tiling_used
                           else "several settings (see each slide's provenance)"),
                "wsi-pipeline": provenance["wsi_pipeline_version"], "created": provenance["created"]}
        summary.report_path = write_classify_report(out, f"wsi-pipeline classify: {prompts.name}", rows,
                                                    prompts.class_names, info, summary.metrics_block() or None)
    timings["write"] = time.perf_counter() - t0
    summary.seconds = time.perf_counter() - t_start
    _logger.debug(summary.line)
    return summary


def _tile_and_embed(
    paths: Sequence[Path] | None, slide_ids: Sequence[str], out: Path, tiling: TilingConfig, embed: EmbedConfig,
    progress: Progress | None, runtime: RuntimeConfig, executor: Executor, model: Any = None,
    tile_failed: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], list[Any], Any]:
    """Run ``tile`` (when ``paths`` are given; ROI images with their own settings) and ``embed``
    on one executor; both skip slides whose outputs validate. Returns (failed id -> reason,
    tile results, embed summary); ``tile_failed`` are slides already known to have failed
    tiling. A slide another live run holds is failed here: it cannot be scored yet."""
    from ..embed.stage import embed_slides
    from ..tiling.stage import tile_slides

    failed: dict[str, str] = dict(tile_failed or {})
    tile_results: list[Any] = []
    with executor:  # Ray: one session for both stages (the stages' own executors reuse it)
        if paths is not None:
            wsis = [p for p in paths if not is_roi_image(p)]
            rois = [p for p in paths if is_roi_image(p)]
            if wsis:
                tile_results += tile_slides(wsis, out, tiling, progress=progress, runtime=runtime)
            if rois:
                tile_results += tile_slides(rois, out, roi_tiling_config(tiling), progress=progress, runtime=runtime)
            failed.update({r.slide_id: f"tile: {r.reason}" for r in tile_results if _not_done(r)})
        to_embed = [s for s in slide_ids if s not in failed]
        embed_summary = None
        if to_embed:
            embed_summary = embed_slides(out, embed, slide_ids=to_embed, progress=progress, runtime=runtime,
                                         model=model)
    if embed_summary is not None:
        failed.update({r.slide_id: f"embed: {r.reason}" for r in embed_summary.results if _not_done(r)})
        done = {r.slide_id for r in embed_summary.results}
        failed.update({s: "embed: no coords file; tile the slide first" for s in to_embed if s not in done})
    return failed, tile_results, embed_summary


def _tiling_of(coords_files: Sequence[Path], tiling: TilingConfig) -> TilingConfig | None:
    """The tiling settings ``coords_files`` record (``tiling`` for what they do not record), or
    ``None`` when they record several (ROI images, per-slide settings): with no INPUTS nothing
    is tiled, so this, not the options, is what the run used."""
    from ..store.coords import read_coords_attrs

    found = {str(a["tiling_config"]) for a in map(read_coords_attrs, coords_files) if a and "tiling_config" in a}
    if len(found) != 1:
        _logger.info("the slides in this folder were tiled with %d different settings", len(found))
        return None
    used = tiling.merge(json.loads(found.pop()))
    _logger.info("scoring the slides as they were tiled: %d px at %g µm/px", used.patch_size, used.target_mpp)
    return used


def _not_done(result: Any) -> bool:
    """Failed, or skipped because another run holds the slide (its outputs are not there yet)."""
    return result.status == "failed" or (result.status == "skipped" and result.reason.startswith(LOCKED_REASON_PREFIX))


def _load_classifiers(model: Any, embed: EmbedConfig, prompts: PromptSet, out: Path, prompt_sets: int,
                      seed: int) -> list[Any]:
    """The text classifiers of ``model`` (the embed model): the ensemble first, then the prompt sets."""
    from .textclassifier import build_text_classifier

    cache = out / TEXT_CACHE_DIR
    classifiers = [build_text_classifier(model, prompts, cache_dir=cache)]
    for p in sample_prompt_sets(prompts, prompt_sets, seed) if prompt_sets else []:
        classifiers.append(build_text_classifier(model, p, cache_dir=cache))
    _logger.info("text classifier %s: %d classes x %d prompts on %s%s", prompts.name, len(prompts.class_names),
                 sum(len(v) for v in prompts.expand().values()), embed.model,
                 f", plus {prompt_sets} single-synonym prompt sets" if prompt_sets else "")
    return classifiers


def _on_scored_callback(out: Path, prompts_name: str, slides_dir: str | None, visuals: bool) -> OnScored:
    """Per scored slide: the QuPath tile layer of patch scores (always), then the visuals (when asked)."""
    from ..embed.stage import resolve_slide_path
    from .qupath import write_scores_geojson
    from .visuals import write_slide_visuals

    def on_scored(sid: str, scores: SlideScores, sf: SlideFeatures) -> dict[str, Any]:
        try:
            write_scores_geojson(out, prompts_name, sid, scores, sf)
        except (OSError, ValueError, KeyError, WsiPipelineError) as e:
            _logger.warning("%s: patch scores GeoJSON not written (%s: %s)", sid, type(e).__name__, one_line(e))
        if not visuals:
            return {}
        try:
            slide_path: str | None = resolve_slide_path(dict(sf.coords_attrs), slides_dir)
        except SlideError as e:
            _logger.warning("%s: no montage (%s)", sid, e)
            slide_path = None
        try:
            return write_slide_visuals(out, prompts_name, sid, scores, sf, slide_path)
        except (OSError, ValueError, KeyError, WsiPipelineError) as e:
            _logger.warning("%s: visuals not written (%s: %s)", sid, type(e).__name__, one_line(e))
            return {}

    return on_scored


def _metrics(rows: Sequence[SlidePrediction], labels: dict[str, str], class_names: Sequence[str],
             set_preds: dict[str, list[str | None]], prompt_sets: int, seed: int) -> dict[str, Any]:
    evaluated = [r for r in rows if r.slide_id in labels and r.status == "ok"]
    excluded = sorted(r.slide_id for r in rows if r.slide_id in labels and r.status != "ok")
    if excluded:
        _logger.warning("metrics exclude %d labelled slides without a prediction (e.g. %s)", len(excluded), excluded[0])
    probs = np.array([[r.probabilities[c] for c in class_names] for r in evaluated]).reshape(-1, len(class_names))
    y_true = [labels[r.slide_id] for r in evaluated]
    m = compute_metrics(y_true, [r.predicted or "" for r in evaluated], probs, class_names)
    m.update(n_excluded=len(excluded), excluded=excluded, slides=[r.slide_id for r in evaluated])
    if prompt_sets:
        per_set = [[set_preds[r.slide_id][i] or "" for r in evaluated] for i in range(prompt_sets)]
        m["prompt_sets"] = prompt_set_robustness(y_true, per_set, seed)
    return m


def _provenance(prompts: PromptSet, prompts_path: Any, ks: Sequence[int], embed: EmbedConfig, model: Any, model_id: str,
                tiling: TilingConfig | None, labels: Any, prompt_sets: int, seed: int) -> dict[str, Any]:
    import torch

    scale = float(model.logit_scale.detach().float().exp()) if model is not None else None
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wsi_pipeline_version": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "prompts": {"name": prompts.name, "path": os.path.abspath(prompts_path), "sha256": prompts.sha256,
                    "classes": list(prompts.class_names), "n_templates": len(prompts.templates)},
        "top_k": int(ks[0]),
        "ks": [int(k) for k in ks],
        "model": {"name": embed.model, "model_id": model_id, "weights": embed.weights,
                  "weights_sha256": getattr(model, "weights_sha256", None), "logit_scale": scale},
        "embed": _jsonable(dataclasses.asdict(embed)),
        "tiling": tiling.signature() if tiling else "several settings (see each slide's provenance)",
        "roi_tiling": "ROI images (PNG/JPEG) without mpp are tiled at target_mpp (1:1); no tissue-area filters",
        "labels": os.path.abspath(labels) if labels is not None else None,
        "prompt_sets": prompt_sets,
        "seed": seed,
    }


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


__all__ = ["STAGE", "ClassifySummary", "classify_slides", "resolve_ks", "score_features"]
