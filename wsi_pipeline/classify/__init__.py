"""Zero-shot slide classification: prompt files, text classifiers, top-K pooling and the stage.

Prompt handling is imported eagerly (no torch); the torch-based parts load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .prompts import (
    DEFAULT_PLACEHOLDER,
    PromptSet,
    load_prompt_sets,
    load_prompts,
    parse_prompts,
    sample_prompt_sets,
    save_prompts,
)

_LAZY = {
    "build_text_classifier": "textclassifier",
    "TextModel": "textclassifier",
    "DEFAULT_TOP_K": "pooling",
    "ProjectionModel": "pooling",
    "SlideScores": "pooling",
    "score_slide": "pooling",
    "score_slide_sets": "pooling",
    "ClassifySummary": "stage",
    "classify_slides": "stage",
    "collect_inputs": "inputs",
    "load_labels": "metrics",
    "compute_metrics": "metrics",
    "topk_pool": "pooling",
    "validate_ks": "pooling",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_PLACEHOLDER",
    "PromptSet",
    "load_prompt_sets",
    "load_prompts",
    "parse_prompts",
    "sample_prompt_sets",
    "save_prompts",
    *_LAZY,
]
