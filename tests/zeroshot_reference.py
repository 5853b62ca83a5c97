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


#: A two-class prompt file for the CLI tests (JSON is YAML).
TOY_PROMPTS = {"name": "toy", "templates": ["an image of CLASSNAME.", "CLASSNAME, H&E."],
               "classes": {"tumour": ["carcinoma", "tumour cells"], "normal": ["benign tissue", "stroma"]}}


def classify_rois(tmp_path: Path, model_args: Sequence[str], n: int = 3, size: int = 96, patch: int = 32,
                  top_k: int = 3, seed: int = 0) -> tuple[Path, list[Path], dict[str, dict[str, str]]]:
    """Run ``wsi-pipeline classify`` on ``n`` stained ROI crops with ``model_args`` and refinement off.

    Returns the output folder, the ROI paths and the predictions CSV rows by slide id.
    """
    import json

    from click.testing import CliRunner

    from wsi_pipeline.cli import main

    rois = stained_rois(tmp_path / "rois", n=n, size=size, seed=seed)
    prompts = tmp_path / "toy.yaml"
    prompts.write_text(json.dumps(TOY_PROMPTS))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["classify", str(tmp_path / "rois"), "--prompts", str(prompts), "-o", str(out),
                                    *model_args, "--keep-rate", "1.0", "--patch-size", str(patch), "--min-tissue", "0",
                                    "--top-k", str(top_k), "--workers", "0", "--device", "cpu", "--no-visuals"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, rois, read_predictions(out / "predictions" / "toy.csv")


def roi_patches(roi: Path, coords: np.ndarray, patch: int, mean: Sequence[float] = MEAN,
                std: Sequence[float] = STD) -> torch.Tensor:
    """The normalised ``patch``-px crops of an ROI PNG at ``coords``, ``(N, 3, patch, patch)``."""
    from PIL import Image

    img = np.asarray(Image.open(roi).convert("RGB"))
    return torch.cat([normalized_pixels(img[y : y + patch, x : x + patch], mean, std) for x, y in coords])


def assert_row_matches(row: dict[str, str], scores: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                       logit_scale: float) -> None:
    """A predictions CSV row equals the reference recipe within the fp16 bound of :data:`FP16_COS`."""
    assert row["status"] == "ok" and row["predicted"] == classes[int(np.argmax(scores))]
    scale = float(np.exp(logit_scale))
    for i, cls in enumerate(classes):
        assert abs(float(row[f"score_{cls}"]) - scores[i]) <= FP16_COS
        assert abs(float(row[f"prob_{cls}"]) - probs[i]) <= scale * FP16_COS / 2


__all__ = ["FP16_COS", "TOY_PROMPTS", "assert_row_matches", "classify_rois", "roi_patches", "class_embeddings", "normalized_pixels", "read_predictions", "slide_probabilities", "stained_rois"]
