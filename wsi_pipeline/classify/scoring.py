"""Scoring stored features: read each slide's feature file, score it, one row per slide.

Only the stored features are scored: patches that could not be read were left out by
``embed`` (listed in ``failed_coords``, counted in each row's ``provenance.n_failed_patches``),
so they never take part in top-K pooling; an older feature file that still holds white
substitutes for them is refused.

Reading runs in a background thread one slide ahead of scoring, so the disk read of slide
``i + 1`` overlaps the projection and similarity of slide ``i`` (torch releases the GIL in
its matrix products). Used by :func:`~.stage.classify_slides` and by the benchmark.

**Stored embeddings.** Feature files written by ``embed`` also hold the
patches' projected, L2-normalised embeddings, tied to the projection by its sha256. When the
model's projection has that digest, only the embeddings (float16, a quarter of the bytes of
fp32 features at 512 → 512) are read and the similarity is one ``N × P × C`` product; the
first :data:`~wsi_pipeline.store.features.PROBE_ROWS` feature rows are read too and projected
again as a check (cosine ≥ :data:`PROBE_MIN_COS`; fp16 storage keeps ~1e-6). A file without
embeddings, or whose embeddings fail the check, is scored from its features as before.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import ConfigError, CorruptOutputError, one_line
from ..progress import NullProgress, Progress
from ..runtime.perslide import SlideStep
from ..store.features import SlideFeatures, get_store
from ..store.provenance import model_provenance, slide_provenance
from .outputs import SlidePrediction
from .pooling import ProjectionModel, SlideScores, score_slide_sets
from .similarity import model_device_dtype

_logger = logging.getLogger(__name__)

STAGE = "classify"
#: Minimum cosine between stored embeddings and the model's projection of the probe rows.
PROBE_MIN_COS = 0.999

#: Called after a slide is scored: (slide_id, scores, features) → visuals entry for the JSON.
OnScored = Callable[[str, SlideScores, SlideFeatures], dict[str, Any]]


def score_features(
    features_dir: str | os.PathLike[str],
    model_id: str,
    slide_ids: Sequence[str],
    model: ProjectionModel | None,
    classifiers: Sequence[Any],
    class_names: Sequence[str],
    ks: Sequence[int],
    *,
    store: str = "h5",
    failed: dict[str, str] | None = None,
    on_scored: OnScored | None = None,
    progress: Progress | None = None,
    status_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[SlidePrediction], dict[str, list[str | None]], dict[str, float]]:
    """Score stored features: one row per slide id, in order.

    ``classifiers[0]`` is the prompt ensemble (the rows); the others are extra prompt sets,
    whose primary-K predictions are returned per slide. ``failed`` slides (id → reason) are
    not read. Features are read in a background thread one slide ahead of scoring.

    Returns
    -------
    rows, set_predictions, timings
        ``timings`` holds ``read`` (seconds spent reading, overlapped with scoring),
        ``read_wait`` (seconds scoring waited for a read), ``score``, ``visuals`` and ``scoring_total``.
    """
    failed = dict(failed or {})
    st = get_store(store)
    progress = progress or NullProgress()
    todo = [s for s in slide_ids if s not in failed]
    timings = dict.fromkeys(("read", "read_wait", "score", "visuals"), 0.0)
    results: dict[str, SlidePrediction] = {}
    set_preds: dict[str, list[str | None]] = {}
    t_all = time.perf_counter()
    digest = _projection_digest(model)
    check = _EmbeddingsCheck(model) if digest is not None else None
    step = SlideStep(STAGE, status_dir, explain=_unreadable_features)
    progress.start(len(slide_ids))
    try:
        for sid, loaded, read_s, wait_s in _prefetched(
            todo, lambda s: st.read(features_dir, model_id, s, embeddings_for=digest)
        ):
            t0 = time.perf_counter()
            timings["read"] += read_s
            timings["read_wait"] += wait_s
            progress.start_slide(sid, 1)

            def work(sid: str = sid, loaded: Any = loaded, t0: float = t0) -> SlidePrediction:
                if isinstance(loaded, BaseException):
                    raise loaded
                if model is None:
                    raise ConfigError("no model given to score the features with")
                check_no_blank_patches(loaded)
                if check is not None and not check(loaded):
                    _logger.warning("%s: stored embeddings disagree with the model's projection; scoring from the "
                                    "features (re-run embed --overwrite to rewrite them)", sid)
                    loaded = st.read(features_dir, model_id, sid)
                scored = score_slide_sets(loaded.features, loaded.attrs, model, classifiers, class_names, ks,
                                          embeddings=loaded.embeddings)
                row = SlidePrediction.from_scores(sid, scored[0])
                row.provenance = {**slide_provenance(loaded.coords_attrs), **model_provenance(loaded.attrs),
                                  "n_failed_patches": loaded.n_left_out}
                set_preds[sid] = [s.prediction for s in scored[1:]]
                timings["score"] += time.perf_counter() - t0
                if on_scored is not None and scored[0].status == "ok":
                    t1 = time.perf_counter()
                    row.visuals = on_scored(sid, scored[0], loaded)
                    timings["visuals"] += time.perf_counter() - t1
                return row

            results[sid] = step.run(sid, work, failed=functools.partial(_failed_row, sid), seconds_from=t0)
            progress.advance(1)
            progress.end_slide(sid, results[sid].status)
        for sid, reason in failed.items():
            if sid in slide_ids:
                results[sid] = SlidePrediction.failed(sid, reason)
                step.record(results[sid])
    finally:
        progress.close()
    timings["scoring_total"] = time.perf_counter() - t_all
    return [results[s] for s in slide_ids], set_preds, timings


def _projection_digest(model: Any) -> str | None:
    digest = getattr(model, "projection_sha256", None)
    return digest() if callable(digest) else None


class _EmbeddingsCheck:
    """Whether a slide's stored embeddings agree with ``model``: shape, and the model's projection
    of the probe feature rows (cosine >= :data:`PROBE_MIN_COS`). Files without embeddings pass."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device, self.dtype = model_device_dtype(model)
        self.proj_dim = getattr(model, "proj_dim", None)

    def __call__(self, sf: SlideFeatures) -> bool:
        emb, probe = sf.embeddings, sf.features
        if emb is None:
            return True
        if emb.ndim != 2 or len(emb) != len(sf.coords) or (self.proj_dim is not None and emb.shape[1] != self.proj_dim):
            return False
        if not len(probe):
            return True
        import torch

        with torch.inference_mode():
            ref = self.model.project(torch.from_numpy(np.asarray(probe, np.float32)).to(self.device, self.dtype))
        stored = torch.from_numpy(emb[: len(probe)].astype(np.float32))
        return bool((torch.nn.functional.cosine_similarity(ref.float().cpu(), stored, dim=-1) >= PROBE_MIN_COS).all())


def check_no_blank_patches(sf: SlideFeatures) -> None:
    """Refuse a schema-1 feature file that holds white substitutes of unreadable patches: they
    would take part in top-K pooling. Re-running embed leaves them out."""
    if sf.n_blank_substituted:
        raise CorruptOutputError(f"features hold {sf.n_blank_substituted} white substitutes of unreadable patches "
                                 "(written by an older wsi-pipeline); re-run embed to leave them out")


def _prefetched(ids: Sequence[str], read: Callable[[str], SlideFeatures]) -> Iterator[tuple[str, Any, float, float]]:
    """Yield ``(id, features or the exception, read seconds, wait seconds)``, reading one ahead."""

    def timed(sid: str) -> tuple[Any, float]:
        t0 = time.perf_counter()
        try:
            value: Any = read(sid)
        except Exception as e:  # handed to the consumer, which turns it into a failed row
            value = e
        return value, time.perf_counter() - t0

    if not ids:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="classify-read") as pool:
        pending = pool.submit(timed, ids[0])
        for i, sid in enumerate(ids):
            t0 = time.perf_counter()
            value, read_s = pending.result()
            wait_s = time.perf_counter() - t0
            if i + 1 < len(ids):
                pending = pool.submit(timed, ids[i + 1])
            yield sid, value, read_s, wait_s


def _failed_row(slide_id: str, reason: str) -> SlidePrediction:
    return SlidePrediction.failed(slide_id, f"classify: {reason}")


def _unreadable_features(e: Exception) -> str | None:
    """A feature file that cannot be read (truncated, foreign, its h5 damaged)."""
    if isinstance(e, (OSError, KeyError, ValueError)):
        return f"features unreadable ({type(e).__name__}: {one_line(e)}); re-run embed"
    return None


__all__ = ["OnScored", "check_no_blank_patches", "score_features"]
