"""``TrainConfig``: every option of ``wsi-pipeline train``, validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .data import Augment
from .loss import LossWeights, context_fn
from .text import TextAugment

SAVE_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """Options of ``wsi-pipeline train`` (CLI flags map one to one).

    Attributes
    ----------
    data, prompts, out_dir
        ROI source (ImageFolder or ``path,label`` CSV), training prompt file, output folder.
    model, weights
        Registered model name; optional initial weights (fine-tuning).
    epochs, batch_size, steps_per_epoch
        Steps per epoch default to ``ceil(n_train / batch_size)``.
    lr_backbone, lr_text, lr_head, weight_decay, warmup_steps
        Per-group AdamW learning rates, decoupled weight decay, linear warm-up steps.
    freeze_backbone, freeze_text
        Keep the vision tower / text tower fixed.
    adapter_only
        Train only a fresh context adapter (:mod:`wsi_pipeline.model.adapter`) on the frozen
        model (vision, text, projection and temperature fixed; any backbone); writes
        ``adapter.safetensors`` instead of model weights. Without ``weights`` the model's
        shipped weights (if any) are the base, as in ``embed``.
    adapter_layers, adapter_hidden, adapter_alpha
        Guided blocks (default: the model's refinement blocks), hidden width of each context
        MLP (default: the ViT width) and mixing weight of the adapter.
    balanced
        Class-balanced sampling.
    val_fraction
        Share of each class held out for validation (0: none).
    context_mode
        ``agnostic`` (inference context), ``label`` (paper, leaks the label), ``mix``, ``none``.
    w_align, w_context_l1, w_cls_l1, w_text
        Loss weights (0 disables an auxiliary term; ``w_text`` is the prompt-consistency term
        of :mod:`.loss`, needs ``prompts_per_class >= 2``).
    prompts_per_class
        Prompts sampled per class and step for the class text embedding.
    word_dropout, max_insert_tokens
        Text augmentation (:class:`~.text.TextAugment`).
    flips, rot90, color_jitter
        Image augmentation: flips, 90° rotations, colour jitter strength (0 disables).
    seed, threads, save_precision
        Seed of everything random; torch CPU threads (``None``: unchanged); dtype of the
        saved weights (``fp32`` or ``fp16``).
    """

    data: str
    prompts: str
    out_dir: str
    model: str = "convlm_demo"
    weights: str | None = None
    epochs: int = 10
    batch_size: int = 64
    steps_per_epoch: int | None = None
    lr_backbone: float = 5e-4
    lr_text: float = 5e-4
    lr_head: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    freeze_backbone: bool = False
    freeze_text: bool = False
    adapter_only: bool = False
    adapter_layers: tuple[int, ...] | None = None
    adapter_hidden: int | None = None
    adapter_alpha: float = 0.1
    balanced: bool = True
    val_fraction: float = 0.1
    context_mode: str = "agnostic"
    w_align: float = 1.0
    w_context_l1: float = 0.1
    w_cls_l1: float = 0.1
    w_text: float = 1.0
    prompts_per_class: int = 4
    word_dropout: float = 0.2
    max_insert_tokens: int = 2
    flips: bool = True
    rot90: bool = True
    color_jitter: float = 0.1
    seed: int = 0
    threads: int | None = None
    save_precision: str = "fp32"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option."""
        for name in ("epochs", "batch_size", "prompts_per_class"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("steps_per_epoch", "threads"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or unset, got {v!r}")
        for name in ("warmup_steps", "seed", "max_insert_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("lr_backbone", "lr_text", "lr_head"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        for name in ("weight_decay", "color_jitter"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 <= self.val_fraction < 1.0):
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.adapter_hidden is not None and (
            isinstance(self.adapter_hidden, bool) or not isinstance(self.adapter_hidden, int) or self.adapter_hidden < 1
        ):
            raise ConfigError(f"adapter_hidden must be a positive integer or unset, got {self.adapter_hidden!r}")
        if not (isinstance(self.adapter_alpha, (int, float)) and 0.0 < self.adapter_alpha <= 1.0):
            raise ConfigError(f"adapter_alpha must be in (0, 1], got {self.adapter_alpha!r}")
        if not self.adapter_only and (self.adapter_layers is not None or self.adapter_hidden is not None):
            raise ConfigError("adapter layers/hidden width are options of adapter training: add --adapter-only")
        if self.save_precision not in SAVE_PRECISIONS:
            raise ConfigError(f"save_precision must be one of {', '.join(SAVE_PRECISIONS)}, got {self.save_precision!r}")
        context_fn(self.context_mode)
        self.loss_weights()
        self.text_augment()

    def loss_weights(self) -> LossWeights:
        return LossWeights(self.w_align, self.w_context_l1, self.w_cls_l1, self.w_text)

    def text_augment(self) -> TextAugment:
        return TextAugment(self.word_dropout, self.max_insert_tokens)

    def augment(self) -> Augment:
        s = float(self.color_jitter)
        return Augment(self.flips, self.rot90, s, s, s, s / 2)


__all__ = ["SAVE_PRECISIONS", "TrainConfig"]
