"""A plain reference of the MI-Zero / CONCH zero-shot recipe, for tests against upstream models.

Written from the published recipe, independently of ``wsi_pipeline.classify``: the class
embedding is the L2-normalised mean of the L2-normalised embeddings of every template ×
synonym prompt; a patch's score for a class is the cosine similarity; a slide's score is the
mean of its ``k`` best patch scores per class; probabilities are
``softmax(exp(logit_scale) · scores)``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: Classify scores the embeddings ``embed`` stored in float16: each cosine is within fp16's unit
#: roundoff 2^-11 of the float32 recipe (|Δ(z·t)| ≤ Σ|z_i||t_i|·2^-11 ≤ 2^-11 for unit z, t), and each
#: probability within exp(logit_scale)·2^-12 (softmax's Jacobian has ∞-norm ≤ 1/2).
FP16_COS = 2.0**-11

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def class_embeddings(encode: Callable[[list[str]], torch.Tensor], classes: dict[str, Sequence[str]],
                     templates: Sequence[str], placeholder: str = "CLASSNAME") -> torch.Tensor:
    """``(C, D)``: per class the normalised mean of the normalised prompt embeddings."""
    rows = []
    for synonyms in classes.values():
        texts = [t.replace(placeholder, s) for s in synonyms for t in templates]
        rows.append(F.normalize(F.normalize(encode(texts).float(), dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


def slide_probabilities(patch_emb: torch.Tensor, class_emb: torch.Tensor, k: int,
                        logit_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(scores, probabilities) of one slide, each ``(C,)``; ``patch_emb`` need not be normalised."""
    sim = F.normalize(patch_emb.double(), dim=-1) @ F.normalize(class_emb.double(), dim=-1).T  # (N, C)
    k = min(k, sim.shape[0])
    scores = sim.topk(k, dim=0).values.mean(0)
    probs = torch.softmax(float(np.exp(logit_scale)) * scores, dim=0)
    return scores.numpy(), probs.numpy()


def normalized_pixels(rgb: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → ``(1, 3, H, W)`` float32 normalised (default: OpenAI CLIP's mean and std)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(255.0)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def stained_rois(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` PNG crops of the real stained image ``skimage.data.immunohistochemistry()``."""
    from PIL import Image
    from skimage.data import immunohistochemistry

    img = immunohistochemistry()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        path = folder / f"roi_{i}.png"
        Image.fromarray(img[y : y + size, x : x + size]).save(path)
        paths.append(path)
    return paths


def read_predictions(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


__all__ = ["FP16_COS", "class_embeddings", "normalized_pixels", "read_predictions", "slide_probabilities", "stained_rois"]
