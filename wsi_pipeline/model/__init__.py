"""ConVLM models: ViT with context-guided token refinement, text tower, registry and weights I/O.

>>> from wsi_pipeline.model import create_model
>>> model = create_model("convlm_test")            # random init; seed torch first
>>> feats = model.encode_image(x)                   # (B, embed_dim), pre-projection CLS
>>> z = model.project(feats)                        # (B, proj_dim), L2-normalised
"""

from .convlm import ConVLM, RefineAux
from .registry import (
    create_model,
    defined_by_weights,
    is_test_model,
    list_models,
    list_schemas,
    register_model,
)
from .shipped import shipped_notice, shipped_weights
from .weights import load_weights, save_weights

__all__ = [
    "ConVLM",
    "RefineAux",
    "create_model",
    "defined_by_weights",
    "is_test_model",
    "list_models",
    "list_schemas",
    "load_weights",
    "register_model",
    "save_weights",
    "shipped_notice",
    "shipped_weights",
]
