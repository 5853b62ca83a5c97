"""The context vector for context-guided refinement, from a prompt file.

If the prompt file has a ``context:`` text, its (normalised) text embedding is the
context; otherwise the context is the normalised mean of the class embeddings (each the
normalised ensemble over templates × synonyms). It never depends on a slide's label.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContextVector:
    vector: torch.Tensor  # (proj_dim,), L2-normalised
    sha256: str  # identifies the prompt file and the way the vector was built
    source: str  # the prompt file path


def load_context(path: str | None, model: Any) -> ContextVector | None:
    """``None`` for no context (``--context none``); otherwise the vector for ``model``."""
    if path is None or str(path).lower() == "none":
        return None
    from ..classify.prompts import load_prompts
    from ..classify.textclassifier import build_text_classifier

    prompts = load_prompts(path)
    if prompts.context:
        with torch.inference_mode():
            vec = model.encode_text(model.tokenize([prompts.context]), normalize=True)[0]
        mode = "text"
    else:
        weights = torch.as_tensor(build_text_classifier(model, prompts))
        vec = weights.float().mean(dim=0)
        mode = "class-mean"
    vec = F.normalize(vec.float().detach().cpu(), dim=-1)
    digest = hashlib.sha256(f"{prompts.sha256}|{mode}".encode()).hexdigest()
    _logger.info("context from %s (%s, hash %s)", path, mode, digest[:8])
    return ContextVector(vec, digest, str(path))
