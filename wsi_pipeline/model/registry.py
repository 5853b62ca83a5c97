"""Model registry: ``register_model`` builders, ``list_models`` and ``create_model``.

Registered names build models from the JSON files in ``model_configs/``; the config's
``family`` picks the class (:data:`FAMILIES`: the native
:class:`~wsi_pipeline.model.convlm.ViTConVLM`, or CONCH's CoCa layout). A builder that takes a
``weights`` argument reads its architecture from the weights themselves (``hf_clip``: a Hugging
Face ``CLIPModel`` folder). Names of the form ``<schema>:<arch>`` are dispatched to a schema
builder; the only schema is ``open_clip`` (see :mod:`wsi_pipeline.model.openclip`).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..errors import ConfigError
from .conch import FAMILY as CONCH_FAMILY
from .conch import ConchConVLM
from .config import DEFAULT_FAMILY, get_config
from .convlm import ConVLM, ViTConVLM
from .hf_clip import build_hf_clip
from .openclip import SCHEMA as OPEN_CLIP_SCHEMA
from .openclip import build_open_clip
from .weights import load_weights

_logger = logging.getLogger(__name__)

Builder = Callable[..., ConVLM]
F = TypeVar("F", bound=Builder)

#: Config ``family`` → model class built from a ``model_configs/*.json`` file.
FAMILIES: dict[str, Callable[[str, dict[str, Any]], ConVLM]] = {
    DEFAULT_FAMILY: ViTConVLM,
    CONCH_FAMILY: ConchConVLM,
}

_MODELS: dict[str, Builder] = {}
_SCHEMAS: dict[str, Callable[[str], ConVLM]] = {OPEN_CLIP_SCHEMA: build_open_clip}
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register_model(fn: F) -> F:
    """Decorator: register a builder under its function name.

    A builder takes no argument, or one ``weights`` argument when the architecture is read
    from the weights (a folder or a file inside one); it returns the untrained model and
    sets ``model.weights_file`` to the file :func:`create_model` then loads.
    """
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Registered model names, sorted (``open_clip:<arch>`` names are not listed)."""
    return sorted(_MODELS)


def list_schemas() -> list[str]:
    """Prefixes accepted as ``<schema>:<arch>`` by :func:`create_model`."""
    return sorted(_SCHEMAS)


def create_model(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> ConVLM:
    """Build a model in eval mode.

    Parameters
    ----------
    name
        A name from :func:`list_models` or ``open_clip:<arch>``.
    weights
        Safetensors or torch checkpoint; ``None`` leaves the random init, drawn from the
        global torch RNG (seed it for reproducible runs).
    device
        Torch device; ``"meta"`` builds shapes only (no weights may be given).
    precision
        Parameter dtype: ``fp32``, ``fp16`` or ``bf16``.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a torch device; use e.g. cpu, cuda or cuda:1") from e
    builder = _resolve(name)
    if weights_defined(builder):
        if weights is None:
            raise ConfigError(f"model {name} is defined by its weights: pass --weights (a model folder or a file in one)")
        build: Callable[[], ConVLM] = lambda: builder(weights)  # noqa: E731
    else:
        if dev.type == "meta" and weights is not None:
            raise ConfigError("weights cannot be loaded on the meta device; build on cpu or cuda")
        build = builder
    if dev.type == "meta":
        with torch.device("meta"):
            model = build()
    else:
        model = build()
        if weights is not None:
            load_weights(model, getattr(model, "weights_file", None) or weights)
    model = model.to(device=dev, dtype=PRECISIONS[precision])
    model.eval()
    _logger.info(
        "created %s (%s, %s, weights %s)",
        model.name,
        dev,
        precision,
        model.weights_sha256[:12] if model.weights_sha256 else "random init",
    )
    return model


def _resolve(name: str) -> Builder:
    if name in _MODELS:
        return _MODELS[name]
    schema, sep, arch = str(name).partition(":")
    if sep and schema in _SCHEMAS:
        return lambda: _SCHEMAS[schema](arch)
    raise ConfigError(
        f"unknown model {name!r}; available: {', '.join(list_models())} or "
        f"{', '.join(s + ':<arch>' for s in list_schemas())}"
    )


#: Tiny models for tests and plumbing: a random init is what they are for, so they need no weights.
TEST_MODELS = frozenset({"convlm_test", "conch_test"})


def is_test_model(name: str) -> bool:
    return name in TEST_MODELS


def defined_by_weights(name: str) -> bool:
    """Whether model ``name`` takes its architecture from its weights (``hf_clip``); an unknown
    name raises :class:`ConfigError`, listing the known ones."""
    return weights_defined(_resolve(name))


def weights_defined(builder: Builder) -> bool:
    """Whether ``builder`` reads its architecture from the weights (takes a ``weights`` argument)."""
    return "weights" in inspect.signature(builder).parameters


def _from_config(name: str) -> ConVLM:
    cfg = get_config(name)
    return FAMILIES[cfg.get("family", DEFAULT_FAMILY)](name, cfg)


@register_model
def convlm_test() -> ConVLM:
    """Tiny ViT (width 64, depth 4, patch 8 at 32 px) + tiny text tower, for tests."""
    return _from_config("convlm_test")


@register_model
def convlm_demo() -> ConVLM:
    """Small ViT (width 128, depth 6, patch 16 at 128 px), trainable on a laptop CPU; see models/convlm_demo.md."""
    return _from_config("convlm_demo")


@register_model
def convlm_vit_s16() -> ConVLM:
    """ViT-S/16 at 224 px (the EViT DeiT-S setting) with a CLIP-B text tower, 512-d joint space."""
    return _from_config("convlm_vit_s16")


@register_model
def convlm_vit_b16() -> ConVLM:
    """ViT-B/16 at 224 px with a CLIP-B text tower, 512-d joint space."""
    return _from_config("convlm_vit_b16")


@register_model
def convlm_vit_l16() -> ConVLM:
    """ViT-L/16 at 224 px with a CLIP-L text tower, 768-d joint space."""
    return _from_config("convlm_vit_l16")


@register_model
def conch_v1() -> ConVLM:
    """CONCH v1 as released (``pytorch_model.bin``): ViT-B/16 at 448 px, attentional pooler, 512-d."""
    return _from_config("conch_v1")


@register_model
def conch_test() -> ConVLM:
    """Tiny CONCH-layout model (width 64, depth 4, 32 px) for tests."""
    return _from_config("conch_test")


@register_model
def hf_clip(weights: str | os.PathLike[str]) -> ConVLM:
    """A Hugging Face ``CLIPModel`` folder as released (PLIP, QuiltNet's transformers files); see models/hf_clip.md."""
    return build_hf_clip(weights)


__all__ = ["FAMILIES", "TEST_MODELS", "defined_by_weights", "is_test_model", "weights_defined", "PRECISIONS", "create_model", "list_models", "list_schemas", "register_model"]
