"""Held-out evaluation of a trained model on freshly generated synthetic ROIs.

Used by ``scripts/train_demo_model.py`` to measure the numbers in the model card:
zero-shot balanced accuracy on ROIs rendered with seeds no training run used, with the
evaluation prompt file (held-out templates), and the same with the class prompts swapped
between classes (the predictions must follow the text).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from ..classify.prompts import PromptSet
from ..classify.textclassifier import build_text_classifier
from ..embed.dataset import normalize, resize_patches
from ..errors import ConfigError
from .evaluation import inference_context


def render_rois(classes: Sequence[str], n_per_class: int, seed: int, input_size: int,
                size: int = 256) -> tuple[torch.Tensor, np.ndarray]:
    """ROIs of ``classes`` (generator keys ``(seed, class, i)``), resized like the embed stage.

    Returns ``uint8 (N, 3, input_size, input_size)`` and the class index of every ROI.
    """
    from ..synthetic import render_roi
    from ..synthetic.dataset import roi_rng

    imgs, labels = [], []
    for c, kind in enumerate(classes):
        for i in range(n_per_class):
            imgs.append(render_roi(kind, size, rng=roi_rng(seed, kind, i)))
            labels.append(c)
    return resize_patches(np.stack(imgs), input_size), np.asarray(labels)


def swap_classes(prompts: PromptSet, shift: int = 1) -> PromptSet:
    """``prompts`` with the synonyms of class ``i`` given to class ``(i + shift) % C``."""
    names = prompts.class_names
    if shift % len(names) == 0:
        raise ConfigError(f"shift {shift} leaves every class with its own synonyms")
    syns = [prompts.classes[c] for c in names]
    classes = {names[(i + shift) % len(names)]: syns[i] for i in range(len(names))}
    return dataclasses.replace(prompts, name=f"{prompts.name}-swapped", classes={c: classes[c] for c in names})


@torch.inference_mode()
def zero_shot_predict(model: torch.nn.Module, images_u8: torch.Tensor, prompts: PromptSet,
                      context: bool = True, batch_size: int = 128) -> np.ndarray:
    """Class index per image: ensemble text classifier, context as the embed stage builds it."""
    model.eval()
    weights = build_text_classifier(model, prompts)
    ctx = inference_context(model, prompts, weights) if context else None
    preds = []
    for s in range(0, len(images_u8), batch_size):
        x = normalize(images_u8[s : s + batch_size], model.mean, model.std, torch.float32)
        z = model.project(model.encode_image(x, context=ctx))
        preds.append((z @ weights.t()).argmax(1).numpy())
    return np.concatenate(preds)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """scikit-learn's balanced accuracy as a float."""
    return float(balanced_accuracy_score(y_true, y_pred))


__all__ = ["balanced_accuracy", "render_rois", "swap_classes", "zero_shot_predict"]
