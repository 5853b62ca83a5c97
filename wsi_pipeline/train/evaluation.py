"""Validation as inference does it: full prompt ensemble, label-agnostic context."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from ..classify.prompts import PromptSet
from ..classify.textclassifier import build_text_classifier
from ..embed.dataset import normalize
from .loss import agnostic_context


def inference_context(model: Any, prompts: PromptSet, class_weights: torch.Tensor) -> torch.Tensor:
    """The context the embed stage builds from ``prompts`` (its ``context`` text, else the class mean)."""
    if prompts.context:
        with torch.inference_mode():
            vec = model.encode_text(model.tokenize([prompts.context]), normalize=True)[0]
        return F.normalize(vec.float(), dim=-1)
    return agnostic_context(class_weights.float())


@torch.inference_mode()
def evaluate(model: Any, images: torch.Tensor, labels: torch.Tensor, prompts: PromptSet,
             batch_size: int = 128) -> dict[str, float]:
    """Balanced accuracy on ``uint8`` images with the full prompt ensemble, per context.

    Keys: ``val_bacc`` (inference context), ``val_bacc_label`` (each image's own class text
    as context, the paper's training input), ``val_bacc_none`` (no context).
    """
    was_training = model.training
    model.eval()
    try:
        weights = build_text_classifier(model, prompts)
        ctx = inference_context(model, prompts, weights)
        has_ctx = bool(model._context_mlps())
        modes: dict[str, Callable[[torch.Tensor], torch.Tensor | None]] = {"val_bacc": lambda y: ctx}
        if has_ctx:
            modes["val_bacc_label"] = lambda y: weights[y]
            modes["val_bacc_none"] = lambda y: None
        preds: dict[str, list[np.ndarray]] = {k: [] for k in modes}
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size], model.mean, model.std, torch.float32)
            y = labels[start : start + batch_size]
            for key, make in modes.items():
                feats = model.encode_image(x, context=make(y) if has_ctx else None)
                preds[key].append((model.project(feats) @ weights.t()).argmax(1).numpy())
    finally:
        model.train(was_training)
    y_true = labels.numpy()
    return {k: float(balanced_accuracy_score(y_true, np.concatenate(v))) for k, v in preds.items()}


__all__ = ["evaluate", "inference_context"]
