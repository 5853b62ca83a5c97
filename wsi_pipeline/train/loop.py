"""``train_model``: train or fine-tune a ConVLM on labelled ROI patches.

>>> res = train_model(TrainConfig("rois/", "configs/prompts/demo_train.yaml", "run/"))  # doctest: +SKIP
>>> res.weights, res.history[-1]["val_bacc"]                                           # doctest: +SKIP

AdamW with one learning rate per parameter group (``backbone``, ``text``, ``head``; see
:data:`GROUP_RULES`), linear warm-up then cosine decay per step, the objective of
:mod:`.loss`, prompts re-sampled every step (:mod:`.text`). Each epoch is validated the way
inference works: the text classifier is the full prompt ensemble
(:func:`~wsi_pipeline.classify.textclassifier.build_text_classifier`) and the context is the
label-agnostic one the embed stage uses; the balanced accuracy with the label's own context
(the paper's training-time input, ``val_bacc_label``) and without context is logged beside
it (:mod:`.evaluation`). Options: :class:`~.config.TrainConfig`. Outputs in ``out_dir``: ``model.safetensors`` (+ ``.json`` sidecar), ``config.json``,
``train_log.json``, ``train_log.csv`` and ``aux_heads.safetensors`` (training-only heads).

With ``adapter_only`` the model (vision, text, projection, temperature) is frozen and only a
fresh context adapter trains, on any backbone; the prompts are encoded once by the frozen
text tower (:class:`~.text.PromptBank`) and ``adapter.safetensors`` replaces
``model.safetensors``.

Runs are bit-identical for the same seed, data, torch build and thread count on the CPU.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from .. import __version__
from ..classify.prompts import PromptSet, load_prompts
from ..embed.dataset import normalize
from ..errors import ConfigError
from ..store.atomic import atomic_path, atomic_write_text, ensure_writable_dir
from .config import SAVE_PRECISIONS, TrainConfig
from .data import epoch_order, load_roi_table, read_images, stratified_split
from .evaluation import evaluate
from .loss import ClsRegressionHeads, class_embeddings, context_fn, convlm_loss
from .progress import NullTrainProgress, TrainProgress
from .text import PromptBank, PromptSampler

_logger = logging.getLogger(__name__)

#: Parameter name prefix → group (first match wins; anything else is ``head``).
GROUP_RULES: tuple[tuple[str, str], ...] = (
    ("visual.", "backbone"),
    ("clip.visual.proj", "head"),
    ("clip.visual.", "backbone"),
    ("text.", "text"),
    ("clip.logit_", "head"),
    ("clip.", "text"),
)
GROUPS = ("backbone", "text", "head")
#: Parameters never weight-decayed (besides every tensor with fewer than 2 dimensions).
NO_DECAY_SUBSTRINGS = ("token_embedding", "positional_embedding", "pos_embed", "cls_token", "class_embedding")
WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
HEADS_FILE = "aux_heads.safetensors"


@dataclass
class TrainResult:
    """What :func:`train_model` wrote and measured."""

    out_dir: Path
    weights: Path
    config_path: Path
    log_json: Path
    log_csv: Path
    sha256: str
    classes: tuple[str, ...]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    model: Any = None

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


# ----------------------------------------------------------------------------- pieces
def param_group(name: str) -> str:
    """The optimiser group of a parameter name (see :data:`GROUP_RULES`)."""
    return next((g for prefix, g in GROUP_RULES if name.startswith(prefix)), "head")


def build_optimizer(model: torch.nn.Module, extra: torch.nn.Module | None, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one (decay, no-decay) pair of groups per LR group."""
    lrs = {"backbone": cfg.lr_backbone, "text": cfg.lr_text, "head": cfg.lr_head}
    frozen = {g for g, off in (("backbone", cfg.freeze_backbone), ("text", cfg.freeze_text)) if off}
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    named = list(model.named_parameters()) + [(f"aux.{n}", p) for n, p in (extra.named_parameters() if extra else [])]
    for name, p in named:
        if not p.requires_grad:  # frozen by the caller (adapter training)
            continue
        group = param_group(name)
        if group in frozen:
            p.requires_grad_(False)
            continue
        decay = p.ndim >= 2 and not any(s in name for s in NO_DECAY_SUBSTRINGS)
        buckets.setdefault((group, decay), []).append(p)
    groups = [
        {"params": ps, "lr": lrs[g], "base_lr": lrs[g], "weight_decay": cfg.weight_decay if decay else 0.0, "name": g}
        for (g, decay), ps in buckets.items()
    ]
    if not groups:
        raise ConfigError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ----------------------------------------------------------------------------- main
def train_model(cfg: TrainConfig, progress: TrainProgress | None = None) -> TrainResult:
    """Train ``cfg.model`` on the ROIs of ``cfg.data`` against the prompts of ``cfg.prompts``.

    Raises
    ------
    ConfigError
        Bad options, unreadable data, or data labels the prompt file has no class for.
    CheckpointError
        ``cfg.weights`` does not fit the model.
    OutputError
        ``cfg.out_dir`` is not writable.
    """
    from ..embed.stage import resolve_weights
    from ..model import create_model
    from ..model.adapter import new_adapter

    cfg.validate()
    progress = progress or NullTrainProgress()
    t_start = time.perf_counter()
    prompts = load_prompts(cfg.prompts)
    table = load_roi_table(cfg.data)
    classes = prompts.class_names
    unknown = sorted(set(table.labels) - set(classes))
    if unknown:
        raise ConfigError(f"ROI labels {', '.join(unknown)} have no class in {cfg.prompts} "
                          f"(classes: {', '.join(classes)}); add them to the prompt file")
    missing = [c for c in classes if c not in set(table.labels)]
    if missing:
        _logger.warning("prompt classes without training images (used as negatives only): %s", ", ".join(missing))
    out = ensure_writable_dir(cfg.out_dir)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        _set_seed(cfg.seed)
        if cfg.adapter_only:
            model = create_model(cfg.model, weights=resolve_weights(cfg.model, cfg.weights))
            model.requires_grad_(False)
            new_adapter(model, cfg.adapter_layers, cfg.adapter_hidden, cfg.adapter_alpha)
            _logger.info("adapter training on frozen %s (weights %s): blocks %s", model.name,
                         (model.weights_sha256 or "random init")[:12],
                         ", ".join(map(str, sorted(int(k) for k in model._context_mlps()))))
        else:
            model = create_model(cfg.model, weights=cfg.weights)
            if not getattr(model, "full_training", True):
                raise ConfigError(f"{cfg.model} keeps its released text tower and tokenizer: train a context "
                                  "adapter on it with --adapter-only")
        images = read_images(table.paths, model.input_size)
        labels = torch.tensor([classes.index(lab) for lab in table.labels], dtype=torch.long)
        train_idx, val_idx = stratified_split(labels.tolist(), cfg.val_fraction, cfg.seed, table.slides)
        _logger.info("%d ROIs from %s (%s); %d train, %d validation", len(table), table.source,
                     ", ".join(f"{k} {v}" for k, v in table.counts().items()), len(train_idx), len(val_idx))
        history, heads = _fit(model, images, labels, torch.from_numpy(train_idx), torch.from_numpy(val_idx),
                              prompts, cfg, progress)
    finally:
        torch.set_num_threads(old_threads)
        progress.close()
    seconds = time.perf_counter() - t_start
    return _save(model, heads, out, cfg, prompts, table, len(train_idx), len(val_idx), history, seconds)


def _fit(model: Any, images: torch.Tensor, labels: torch.Tensor, train_idx: torch.Tensor, val_idx: torch.Tensor,
         prompts: PromptSet, cfg: TrainConfig, progress: TrainProgress,
         ) -> tuple[list[dict[str, Any]], ClsRegressionHeads | None]:
    from ..model.convlm import clip_tokenizer

    weights = cfg.loss_weights()
    refine_blocks = sorted(set(model._context_mlps()) | set(model.refine_layers))
    heads = ClsRegressionHeads(refine_blocks, model.width, model.proj_dim) if weights.cls_l1 > 0 else None
    model.train()
    optimizer = build_optimizer(model, heads, cfg)
    if cfg.adapter_only:  # frozen text tower: encode every prompt once, with the model's own tokenizer
        sampler: PromptSampler | PromptBank = PromptBank(model, prompts, cfg.seed)
    else:
        vocab = int(model.state_module.state_dict()[_token_key(model)].shape[0])
        sampler = PromptSampler(prompts, clip_tokenizer(model.context_length), model.context_length, vocab,
                                cfg.text_augment(), cfg.seed)
    text_trains = not (cfg.freeze_text or cfg.adapter_only)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 2)
    ctx_gen = torch.Generator().manual_seed(cfg.seed + 3)
    augment, ctx_of = cfg.augment(), context_fn(cfg.context_mode)
    has_ctx = bool(model._context_mlps())
    if not has_ctx and cfg.context_mode != "none":
        _logger.info("%s has no context MLPs; training without context", model.name)
    # a prompt file with a context sentence: "agnostic" feeds its embedding, as the embed stage does
    context_text = prompts.context if cfg.context_mode == "agnostic" and prompts.context else None
    fixed_ctx = model.encode_prompts([context_text])[0] if context_text and not text_trains else None
    steps = cfg.steps_per_epoch or math.ceil(len(train_idx) / cfg.batch_size)
    total, step = steps * cfg.epochs, 0
    train_labels = labels[train_idx]
    history: list[dict[str, Any]] = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = train_idx[epoch_order(train_labels, steps * cfg.batch_size, data_gen, cfg.balanced)]
        sums: dict[str, float] = {}
        correct = 0
        progress.start_epoch(epoch, cfg.epochs, steps)
        for s in range(steps):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            y = labels[idx]
            x = normalize(augment(images[idx], aug_gen), model.mean, model.std, torch.float32)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, total, cfg.warmup_steps)
            if isinstance(sampler, PromptBank):
                prompt_emb = sampler.sample(cfg.prompts_per_class)
            else:
                with torch.set_grad_enabled(text_trains):
                    prompt_emb = model.encode_text(sampler.sample(cfg.prompts_per_class), normalize=True)
            class_emb = class_embeddings(prompt_emb, len(prompts.class_names))
            if has_ctx and context_text is not None:  # the prompt file's context sentence, as inference uses it
                ctx = fixed_ctx if fixed_ctx is not None else model.encode_prompts([context_text])[0]
            else:
                ctx = ctx_of(class_emb, y, ctx_gen) if has_ctx else None
            out = convlm_loss(model, x, y, class_emb, weights, context=ctx, heads=heads,
                              prompt_emb=prompt_emb if text_trains and cfg.prompts_per_class >= 2 else None)
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            optimizer.step()
            step += 1
            for k, v in out.parts.items():
                sums[k] = sums.get(k, 0.0) + v
            correct += int((out.logits.argmax(1) == y).sum()) if out.logits is not None else 0
            progress.step(out.parts["total"])
        record: dict[str, Any] = {"epoch": epoch, **{f"loss_{k}" if k != "total" else "loss": v / steps
                                                    for k, v in sums.items()}}
        record["train_acc"] = correct / (steps * cfg.batch_size)
        record["logit_scale"] = float(model.logit_scale.detach().exp())
        record["lr_backbone"] = cfg.lr_backbone * lr_factor(step - 1, total, cfg.warmup_steps)
        if len(val_idx):
            record.update(evaluate(model, images[val_idx], labels[val_idx], prompts))
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        progress.end_epoch(epoch, record)
        _logger.info("epoch %d/%d: %s", epoch, cfg.epochs,
                     ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
    model.eval()
    return history, heads


def _token_key(model: Any) -> str:
    keys = [k for k in model.state_module.state_dict() if k.endswith("token_embedding.weight")]
    if not keys:
        raise ConfigError(f"model {model.name} has no token embedding; it cannot be trained on text here")
    return keys[0]


def _save(model: Any, heads: ClsRegressionHeads | None, out: Path, cfg: TrainConfig, prompts: PromptSet,
          table: Any, n_train: int, n_val: int, history: list[dict[str, Any]], seconds: float) -> TrainResult:
    from ..model import save_weights
    from ..model.adapter import save_adapter

    if cfg.adapter_only:  # the base weights stay as they are: only the adapter is written
        weights_path = out / ADAPTER_FILE
        sha = save_adapter(model, weights_path, dtype=SAVE_PRECISIONS[cfg.save_precision])
        base = {"base_weights": model.weights_path, "base_weights_sha256": model.weights_sha256}
    else:
        dtype = SAVE_PRECISIONS[cfg.save_precision]
        to_save = model if cfg.save_precision == "fp32" else copy.deepcopy(model).to(dtype)
        weights_path = out / WEIGHTS_FILE
        sha = save_weights(to_save, weights_path)
        if to_save is not model:  # the returned model is the file's: rounded as it was saved, same sha256
            with torch.no_grad():
                for t in model.state_dict().values():
                    if t.is_floating_point():
                        t.copy_(t.to(dtype))
        model.weights_sha256 = sha
        base = {}
    if heads is not None:
        with atomic_path(out / HEADS_FILE) as tmp:
            save_file({k: v.detach().contiguous() for k, v in heads.state_dict().items()}, str(tmp))
    config = {
        "train_config": dataclasses.asdict(cfg),
        "model": model.name,
        "model_cfg": model.cfg,
        "classes": list(prompts.class_names),
        "prompts_sha256": prompts.sha256,
        "data": {"source": table.source, "counts": table.counts(), "n_train": n_train, "n_val": n_val},
        "weights": weights_path.name,
        "sha256": sha,
        **base,
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if cfg.threads is None else cfg.threads,
        "wsi_pipeline_version": __version__,
    }
    config_path = out / "config.json"
    atomic_write_text(config_path, json.dumps(_jsonable(config), indent=2) + "\n")
    log_json = out / "train_log.json"
    atomic_write_text(log_json, json.dumps({"epochs": history, "seconds": round(seconds, 1),
                                            "context_mode": cfg.context_mode}, indent=1) + "\n")
    log_csv = out / "train_log.csv"
    atomic_write_text(log_csv, _csv(history))
    _logger.info("saved %s (sha256 %s) in %.0f s", weights_path, sha[:12], seconds)
    return TrainResult(out, weights_path, config_path, log_json, log_csv, sha, prompts.class_names, history,
                       seconds, model)


def _csv(history: Sequence[dict[str, Any]]) -> str:
    fields: list[str] = []
    for rec in history:
        fields += [k for k in rec if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


__all__ = [
    "ADAPTER_FILE",
    "GROUPS",
    "GROUP_RULES",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "lr_factor",
    "param_group",
    "train_model",
]
