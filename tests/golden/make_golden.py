"""Regenerate the golden outputs of ``convlm_test``: ``python tests/golden/make_golden.py``.

The model is the seed-0 random init; the input is a fixed normal batch (generator seed 1234).
Only regenerate after an intended change of the model's numerics, and say so in the commit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from wsi_pipeline.model import create_model  # noqa: E402

GOLDEN = Path(__file__).with_name("convlm_test.npz")
MODEL_SEED = 0
INPUT_SEED = 1234
PROMPTS = [
    "an H&E image of lung adenocarcinoma.",
    "an H&E image of squamous cell carcinoma.",
    "normal lung tissue",
]


def make_input() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(INPUT_SEED))


def compute(x: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """All golden arrays for input ``x`` (default: :func:`make_input`)."""
    x = make_input() if x is None else x
    torch.manual_seed(MODEL_SEED)
    model = create_model("convlm_test")
    with torch.no_grad():
        tokens = model.tokenize(PROMPTS)
        text = model.encode_text(tokens, normalize=True)
        context = F.normalize(text.mean(0), dim=-1)
        full = model.encode_image(x, keep_rate=1.0)
        refined, aux = model.forward_features(x, return_aux=True)
        guided, aux_c = model.forward_features(x, context=context, return_aux=True)
        projected = model.project(guided)
    out = {
        "x": x,
        "tokens": tokens,
        "text": text,
        "context": context,
        "feat_full": full,
        "feat_refined": refined,
        "feat_context": guided,
        "projected_context": projected,
        "logit_scale": model.logit_scale.detach(),
    }
    for i, kept in aux.kept_index.items():
        out[f"kept_{i}"] = kept
    for i, kept in aux_c.kept_index.items():
        out[f"kept_context_{i}"] = kept
    return {k: v.numpy() for k, v in out.items()}


def main() -> int:
    arrays = compute()
    np.savez_compressed(GOLDEN, **arrays)
    print(f"wrote {GOLDEN} ({', '.join(sorted(arrays))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
