"""The ``embed`` stage: coords files in, one feature file per slide out.

The model is loaded once per process. For each slide the coords are grouped into read
regions (see :mod:`.regions`), a DataLoader reads and resizes them in worker processes,
and the main process normalises on the device and runs the encoder in
``torch.inference_mode`` with autocast for fp16/bf16. A patch whose pixels cannot be read
(its tile does not decode) is left out: it is never embedded, its corner goes to the feature
file's ``failed_coords`` and is counted in ``n_failed_patches``; above ``max_failed_fraction``
of a slide's patches (or all of them) the slide fails. A slide is skipped only when its
feature file validates (complete, same model id, ``coords`` + ``failed_coords`` = the coords
file's coords, read from the slide file the coords file records; see
:meth:`~wsi_pipeline.store.features.FeatureStore.validate`), or while another live run holds
its lock (``out/locks/embed/<model_id>/<slide_id>.lock``). A slide file whose content changed
since it was tiled (see :func:`check_slide_unchanged`) fails: its coords belong to the old
file. :class:`SlideEmbedder` is the per-slide work that an executor (``local`` or ``ray``)
maps over the slides.

Beside the pre-projection ``features`` each file stores ``embeddings``: the same rows
projected and L2-normalised by the model (fp32 math, stored as float16), tied to the
projection by its sha256, so that ``classify`` reads and scores only those.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import ConfigError, SlideError, TooManyFailedPatchesError
from ..progress import NullProgress, Progress
from ..runtime.executor import RuntimeConfig, WorkerSpec, absolute, make_executor
from ..runtime.locks import DEFAULT_LOCK_TIMEOUT_S, SlideLocks, this_host
from ..runtime.perslide import SlideStep, worker_died
from ..slide import open_slide
from ..store.coords import read_coords
from ..store.features import FEATURES_SCHEMA_VERSION, Embeddings, get_store
from .context import ContextVector, load_context
from .dataset import RegionDataset, make_loader, normalize
from .regions import plan_regions

_logger = logging.getLogger(__name__)

STAGE = "embed"
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class EmbedConfig:
    """Options of the embed stage (CLI flags map one to one)."""

    model: str = "convlm_demo"
    weights: str | None = None
    random_init: bool = False  # a model without weights runs only when asked (test models always may)
    batch_size: int = 64
    workers: int = 0
    device: str = "auto"
    precision: str = "auto"
    keep_rate: float | None = None
    refine_layers: tuple[int, ...] | None = None
    context: str | None = None
    adapter: str | None = None
    store: str = "h5"
    slides_dir: str | None = None
    region_size: int = 2048
    max_failed_fraction: float = 0.01
    overwrite: bool = False
    mp_context: str | None = None


@dataclass
class EmbedResult:
    slide_id: str
    status: str  # ok | failed | skipped
    reason: str = ""
    n_patches: int = 0
    seconds: float = 0.0
    n_failed_patches: int = 0
    path: str | None = None
    model_id: str = ""
    worker: str = ""
    data_wait_seconds: float = 0.0
    compute_seconds: float = 0.0


@dataclass
class EmbedSummary:
    results: list[EmbedResult] = field(default_factory=list)
    model_id: str = ""
    seconds: float = 0.0
    data_wait_seconds: float = 0.0
    compute_seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.results if r.status == "ok")

    @property
    def line(self) -> str:
        rate = self.n_patches / self.seconds if self.seconds > 0 else 0.0
        return (
            f"embed: {self.count('ok')} ok, {self.count('failed')} failed, {self.count('skipped')} skipped; "
            f"{self.n_patches} patches in {self.seconds:.1f} s ({rate:.1f} patches/s)"
        )


# ----------------------------------------------------------------------------- helpers
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return dev


_AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in _AUTOCAST:
        raise ConfigError(f"--precision {precision!r}: choose auto, fp32, fp16 or bf16")
    return precision


def make_model_id(
    name: str, weights_sha256: str | None, keep_rate: float, refine_layers: Sequence[int], context_hash: str | None,
    adapter_sha256: str | None = None, definition_sha256: str | None = None,
) -> str:
    """A folder-safe id that differs whenever the features would differ (``definition_sha256``:
    a released folder's config files, for models that read their architecture from them)."""
    base = name.replace(":", "-").replace("/", "-")
    if weights_sha256:
        base += f"-w{weights_sha256[:8]}"
    if definition_sha256:
        base += f"-d{definition_sha256[:8]}"
    if adapter_sha256:
        base += f"-a{adapter_sha256[:8]}"
    refine = "full" if keep_rate >= 1.0 or not refine_layers else f"k{keep_rate:g}-l{'.'.join(map(str, refine_layers))}"
    ctx = f"ctx-{context_hash[:8]}" if context_hash else "ctx-none"
    return f"{base}_{refine}_{ctx}"


def find_coords_files(out_dir: str | os.PathLike[str]) -> list[Path]:
    coords_dir = Path(out_dir) / "coords"
    return sorted(p for p in coords_dir.glob("*.h5") if not p.name.startswith("."))


def resolve_slide_path(attrs: dict[str, Any], slides_dir: str | None) -> str:
    recorded = str(attrs.get("slide_path", ""))
    if slides_dir:
        candidate = Path(slides_dir) / Path(recorded).name
        if candidate.exists():
            return str(candidate)
        raise SlideError(f"slide {Path(recorded).name!r} not found under --slides {slides_dir}")
    if recorded and Path(recorded).exists():
        return recorded
    raise SlideError(f"slide file {recorded!r} recorded in the coords file no longer exists; pass --slides DIR")


def check_slide_unchanged(attrs: dict[str, Any], slides_dir: str | None) -> None:
    """Raise :class:`SlideError` when the slide file is not the one the coords file was made
    from (its content fingerprint differs from the recorded ``slide_fingerprint``).

    Not checked: coords files written before fingerprints were recorded, and slides that are
    not found (features that validate are still used; embedding such a slide fails anyway).
    """
    from ..slide.fingerprint import slide_fingerprint

    recorded = attrs.get("slide_fingerprint")
    if not recorded:
        return
    try:
        path = resolve_slide_path(attrs, slides_dir)
    except SlideError:
        return
    if slide_fingerprint(path) != recorded:
        raise SlideError(f"slide file {path} changed since it was tiled (replaced or modified: its content differs); "
                         "re-run tile (or classify) on it")


def resolve_weights(model_name: str, weights: str | None, *, random_init: bool = False) -> str | None:
    """``weights`` if given, else the weights shipped for ``model_name`` (``models/``), else ``None``
    (a random init): refused with :class:`ConfigError` unless ``random_init`` asks for it or the
    model is a test model (or takes its architecture from its weights, which then say so)."""
    from ..model import defined_by_weights, is_test_model, shipped_notice, shipped_weights

    if weights is not None:
        return weights
    shipped = shipped_weights(model_name)
    if shipped is None:
        if is_test_model(model_name) or defined_by_weights(model_name):
            return None
        if not random_init:
            raise ConfigError(f"model {model_name} has no weights here: pass --weights (its released checkpoint, "
                              "see its card in models/), or --random-init for random weights (speed and plumbing "
                              "only: the features mean nothing)")
        _logger.warning("%s runs with random weights (--random-init): its features mean nothing", model_name)
        return None
    notice = shipped_notice(model_name)
    if notice:
        _logger.warning(notice)
    return str(shipped)


def load_encoder(cfg: EmbedConfig, device: torch.device) -> Any:
    """The model, in eval mode on ``device``, with ``cfg.weights`` or the shipped weights, and
    ``cfg.adapter`` attached (refused unless it was trained on exactly these weights).

    A model without weights (none given, none shipped; see :func:`resolve_weights`) keeps its
    random init, seeded so that runs agree.
    """
    from ..model import create_model
    from ..model.adapter import load_adapter

    weights = resolve_weights(cfg.model, cfg.weights, random_init=cfg.random_init)
    if weights is None:
        torch.manual_seed(RANDOM_INIT_SEED)
    model = create_model(cfg.model, weights=weights, device=str(device), precision="fp32")
    if cfg.adapter is not None:
        load_adapter(model, cfg.adapter)
    model.eval()
    return model


def check_adapter_context(cfg: EmbedConfig) -> None:
    """An adapter acts only through a context: refuse ``--adapter`` without ``--context``."""
    if cfg.adapter is not None and cfg.context in (None, "none"):
        raise ConfigError(
            f"--adapter {cfg.adapter} needs a context to guide the model: add --context PROMPTS.yaml "
            "(classify uses its --prompts file when --context is not given)"
        )


# ----------------------------------------------------------------------------- encoding
class Encoder:
    """Batches patches from region chunks and runs the model on full batches."""

    def __init__(self, model: Any, cfg: EmbedConfig, device: torch.device, precision: str, context: ContextVector | None):
        self.model = model
        self.device = device
        self.batch_size = int(cfg.batch_size)
        self.autocast_dtype = _AUTOCAST[precision]
        self.keep_rate = model.keep_rate if cfg.keep_rate is None else float(cfg.keep_rate)
        self.refine_layers = tuple(model.refine_layers if cfg.refine_layers is None else cfg.refine_layers)
        from ..model.refine import validate_schedule

        validate_schedule(self.keep_rate, self.refine_layers, model.depth)  # a usage error, not N failed slides
        if context is not None and not model._context_mlps():
            raise ConfigError(f"model {cfg.model} has no context MLPs: add --adapter FILE (trained with "
                              "'train --adapter-only') or leave out --context")
        self.context = None if context is None else context.vector.to(device)
        self.compute_seconds = 0.0

    def project(self, features: np.ndarray) -> np.ndarray:
        """The stored projected embeddings of a slide's features (see :func:`_project_rows`)."""
        t0 = time.perf_counter()
        out = _project_rows(self.model, features, self.device)
        self.compute_seconds += time.perf_counter() - t0
        return out

    @torch.inference_mode()
    def __call__(self, batch_u8: torch.Tensor) -> np.ndarray:
        t0 = time.perf_counter()
        x = normalize(batch_u8.to(self.device, non_blocking=True), self.model.mean, self.model.std, torch.float32)
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                feats = self.model.encode_image(
                    x, context=self.context, keep_rate=self.keep_rate, refine_layers=self.refine_layers
                )
        else:
            feats = self.model.encode_image(x, context=self.context, keep_rate=self.keep_rate, refine_layers=self.refine_layers)
        out = feats.float().cpu().numpy()
        self.compute_seconds += time.perf_counter() - t0
        return out


@dataclass(frozen=True)
class SlideEmbedding:
    """What :func:`embed_coords` made of one slide's coords."""

    features: np.ndarray  # (n_read, D) float32: the patches that were read, in coords order
    failed: np.ndarray  # (N,) bool over the coords: True where the patch could not be read
    wait_seconds: float  # time the encoder waited for the DataLoader

    @property
    def n_failed(self) -> int:
        return int(self.failed.sum())


def _project_rows(model: Any, features: np.ndarray, device: torch.device, batch: int = 8192) -> np.ndarray:
    """``model.project`` of float32 feature rows, in fp32 (no autocast), as float16 ``(N, P)``."""
    out = np.empty((len(features), model.proj_dim), np.float16)
    with torch.inference_mode():
        for start in range(0, len(features), batch):
            rows = torch.from_numpy(features[start : start + batch]).to(device)
            out[start : start + batch] = model.project(rows).float().cpu().numpy()
    return out


def embed_coords(
    slide_path: str,
    coords: np.ndarray,
    coords_attrs: dict[str, Any],
    encoder: Encoder,
    cfg: EmbedConfig,
    progress: Progress,
) -> SlideEmbedding:
    """Embed the readable patches of one slide; patches that cannot be read are left out, never embedded."""
    n = len(coords)
    dim = int(encoder.model.embed_dim)
    feats = np.zeros((n, dim), dtype=np.float32)
    failed = np.zeros(n, dtype=bool)
    if n == 0:
        return SlideEmbedding(feats, failed, 0.0)
    slide = open_slide(slide_path, backend=str(coords_attrs.get("backend", "auto")))
    with slide:
        w0, h0 = slide.info.dimensions
        if (int(coords_attrs.get("level0_width", w0)), int(coords_attrs.get("level0_height", h0))) != (w0, h0):
            raise SlideError(f"{slide_path}: slide size {w0}x{h0} differs from the coords file; re-run tile")
        level = int(coords_attrs["patch_level"])
        downsample = float(slide.info.level_downsamples[level])
        patch_px = max(1, int(round(float(coords_attrs["patch_size_level0"]) / downsample)))
        plan = plan_regions(coords, level=level, downsample=downsample, patch_px=patch_px, region_size=cfg.region_size)
        dataset = RegionDataset(slide, coords, plan, encoder.model.input_size)
        loader = make_loader(
            dataset, workers=cfg.workers, pin_memory=encoder.device.type == "cuda", mp_context=cfg.mp_context
        )
        wait = 0.0
        pending_idx: list[torch.Tensor] = []
        pending_x: list[torch.Tensor] = []
        n_pending = 0

        def flush(upto: int) -> None:
            nonlocal pending_idx, pending_x, n_pending
            idx = torch.cat(pending_idx)
            xs = torch.cat(pending_x)
            for start in range(0, upto, encoder.batch_size):
                stop = min(start + encoder.batch_size, upto)
                feats[idx[start:stop].numpy()] = encoder(xs[start:stop])
                progress.advance(stop - start)
            pending_idx, pending_x = [idx[upto:]], [xs[upto:]]
            n_pending = len(idx) - upto

        t_wait = time.perf_counter()
        for indices, patches, failed_indices in loader:
            wait += time.perf_counter() - t_wait
            if len(failed_indices):
                failed[failed_indices.numpy()] = True
                progress.advance(len(failed_indices))
            pending_idx.append(indices)
            pending_x.append(patches)
            n_pending += len(indices)
            if n_pending >= encoder.batch_size:
                flush(n_pending - n_pending % encoder.batch_size)
            t_wait = time.perf_counter()
        if n_pending:
            flush(n_pending)
    return SlideEmbedding(feats[~failed] if failed.any() else feats, failed, wait)


class SlideEmbedder:
    """The per-slide work of the embed stage: the model is loaded once, then whole slides are embedded.

    Built once per process (local) or per Ray actor. ``model`` (local only) reuses an
    encoder that is already loaded with the same settings.
    """

    def __init__(self, out_dir: str | os.PathLike[str], cfg: EmbedConfig, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
                 model: Any = None) -> None:
        self.out_dir, self.cfg = Path(out_dir), cfg
        self.store = get_store(cfg.store)
        self.features_dir = self.out_dir / "features"
        device = resolve_device(cfg.device)
        precision = resolve_precision(cfg.precision, device)
        model = model if model is not None else load_encoder(cfg, device)
        context = load_context(cfg.context, model)
        self.encoder = Encoder(model, cfg, device, precision, context)
        self.model_id = make_model_id(cfg.model, model.weights_sha256, self.encoder.keep_rate,
                                      self.encoder.refine_layers, context.sha256 if context else None,
                                      model.adapter_sha256, model.definition_sha256("image"))
        self.base_attrs = {
            "model_name": cfg.model,
            "model_id": self.model_id,
            "weights_sha256": model.weights_sha256 or f"none (random init, seed {RANDOM_INIT_SEED})",
            "definition_sha256": model.definition_sha256("image") or "none (defined by the code)",
            "embed_dim": int(model.embed_dim),
            "projected": False,
            "normalized": False,
            "keep_rate": float(self.encoder.keep_rate),
            "refine_layers": list(self.encoder.refine_layers),
            "context_hash": context.sha256 if context else "none",
            "context_source": context.source if context else "none",
            "adapter_sha256": model.adapter_sha256 or "none",
            "adapter_path": cfg.adapter or "none",
            "context_alpha": float(model.context_alpha) if context else 0.0,
            "precision": precision,
            "device": str(device),
            "input_size": int(model.input_size),
            "wsi_pipeline_version": __version__,
            "features_schema_version": FEATURES_SCHEMA_VERSION,
        }
        self.projection_sha256 = model.projection_sha256()
        # Resume honours a precision the user asked for; `auto` takes whatever a slide holds
        # (each file records its own), so a folder moves between GPU and CPU machines.
        self.required_precision = None if cfg.precision == "auto" else precision
        locks = SlideLocks(self.out_dir, STAGE, scope=self.model_id, timeout_s=lock_timeout_s)
        locks.clear_stale()
        self.step = SlideStep(STAGE, self.out_dir, locks=locks)

    def __call__(self, coords_path: str | os.PathLike[str], progress: Progress) -> EmbedResult:
        """Embed one slide under its lock (``skipped`` when its features validate or a live run holds it)."""
        coords_path = Path(coords_path)
        slide_id = coords_path.stem
        compute0 = self.encoder.compute_seconds
        result = EmbedResult(slide_id, "failed", model_id=self.model_id, worker=f"{this_host()}:{os.getpid()}")
        final = self.store.path_for(self.features_dir, self.model_id, slide_id)

        def work() -> EmbedResult:
            coords, cattrs = read_coords(coords_path)
            result.n_patches = len(coords)
            check_slide_unchanged(cattrs, self.cfg.slides_dir)
            reason = "overwrite requested" if self.cfg.overwrite else self.store.validate(
                self.features_dir, self.model_id, slide_id, coords, cattrs, self.required_precision)
            if reason is None:
                result.status, result.reason = "skipped", "features exist and validate"
                result.path = str(final)
            else:
                _logger.debug("%s: embedding (%s)", slide_id, reason)
                self._embed(coords, cattrs, result, progress)
            return result

        # ``result`` carries what was learnt before a failure (patch counts, data wait)
        result = self.step.run(
            slide_id, work, failed=lambda reason: dataclasses.replace(result, status="failed", reason=reason),
            skipped=lambda reason: dataclasses.replace(result, status="skipped", reason=reason),
            outputs=(final,),  # a dead run's temp files
        )
        result.compute_seconds = self.encoder.compute_seconds - compute0
        progress.end_slide(slide_id, result.status)
        return result

    def _embed(self, coords: np.ndarray, cattrs: dict[str, Any], result: EmbedResult, progress: Progress) -> None:
        cfg, slide_id = self.cfg, result.slide_id
        progress.start_slide(slide_id, len(coords))
        slide_path = resolve_slide_path(cattrs, cfg.slides_dir)
        emb = embed_coords(slide_path, coords, cattrs, self.encoder, cfg, progress)
        result.data_wait_seconds = emb.wait_seconds
        result.n_failed_patches = emb.n_failed
        check_failed_patches(emb.n_failed, len(coords), cfg.max_failed_fraction)
        attrs = dict(self.base_attrs, n_failed_patches=emb.n_failed, slide_id=slide_id, slide_path=slide_path)
        embeddings = Embeddings(self.encoder.project(emb.features), self.projection_sha256, self.model_id)
        result.path = str(self.store.write(self.features_dir, self.model_id, slide_id, emb.features,
                                           coords[~emb.failed], attrs, cattrs, failed_coords=coords[emb.failed],
                                           embeddings=embeddings))
        result.status = "ok"
        if emb.n_failed:
            result.reason = f"{emb.n_failed} of {len(coords)} patches unreadable, left out"
            _logger.warning("%s: %s (tolerated up to %.0f%%)", slide_id, result.reason, 100 * cfg.max_failed_fraction)


def check_failed_patches(n_failed: int, n_patches: int, max_fraction: float) -> None:
    """Raise :class:`TooManyFailedPatchesError` when more than ``max_fraction`` (or all) of a
    slide's patches could not be read; the others are left out of its features."""
    if n_patches and n_failed == n_patches:
        raise TooManyFailedPatchesError(f"all {n_patches} patches unreadable; the slide file is damaged")
    if n_patches and n_failed > max_fraction * n_patches:
        raise TooManyFailedPatchesError(
            f"{n_failed} of {n_patches} patches unreadable (> {max_fraction:.0%}); the slide file is damaged"
        )


def _failed_item(coords_path: str, reason: str) -> EmbedResult:
    return EmbedResult(Path(coords_path).stem, "failed", reason)


def embed_slides(
    out_dir: str | os.PathLike[str],
    cfg: EmbedConfig,
    *,
    slide_ids: Iterable[str] | None = None,
    progress: Progress | None = None,
    runtime: RuntimeConfig | None = None,
    model: Any = None,
) -> EmbedSummary:
    """Embed every slide tiled into ``out_dir`` (or only ``slide_ids``); never raises for one bad slide.

    ``runtime`` picks the executor (``ray``: one model per actor, ``--gpus-per-worker``
    GPUs each), the ``--shard`` and the lock timeout. ``model`` (local executor only)
    reuses an encoder already loaded with ``cfg``'s settings.
    """
    runtime = runtime or RuntimeConfig()
    executor = make_executor(runtime)  # e.g. Ray not installed: a usage error before any work
    progress = progress or NullProgress()
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    get_store(cfg.store)  # an unknown store is a usage error before any work
    check_adapter_context(cfg)
    coords_files = find_coords_files(out_dir)
    if slide_ids is not None:
        wanted = set(slide_ids)
        coords_files = [p for p in coords_files if p.stem in wanted]
    if runtime.shard is not None:
        n_all = len(coords_files)
        coords_files = runtime.shard.select(coords_files, key=lambda p: p.stem)
        _logger.info("shard %s: %d of %d slides", runtime.shard, len(coords_files), n_all)
    # absolute paths in recorded attributes (slide_path, context_source) whatever the executor
    cfg = dataclasses.replace(cfg, weights=absolute(cfg.weights), slides_dir=absolute(cfg.slides_dir),
                              adapter=absolute(cfg.adapter),
                              context=None if cfg.context in (None, "none") else absolute(cfg.context))
    try:
        with executor as ex:
            if ex.remote:  # actors may run in another folder or on another machine
                out_dir, model = out_dir.absolute(), None
            spec = WorkerSpec(
                functools.partial(SlideEmbedder, str(out_dir), cfg, runtime.lock_timeout_s, model),
                on_error=functools.partial(worker_died, STAGE, str(out_dir), _failed_item), label=lambda p: Path(p).stem,
                num_gpus=runtime.gpus_per_worker,
            )
            results = ex.map(spec, [str(p) for p in coords_files], progress)
    finally:
        progress.close()
    summary = EmbedSummary(results=results, model_id=next((r.model_id for r in results if r.model_id), ""))
    summary.data_wait_seconds = sum(r.data_wait_seconds for r in results)
    summary.compute_seconds = sum(r.compute_seconds for r in results)
    summary.seconds = time.perf_counter() - t_start
    return summary
