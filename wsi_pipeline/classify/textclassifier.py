"""Zero-shot text classifier: one L2-normalised prompt-ensemble embedding per class.

For every class each template is filled with each synonym, encoded by the model's text
tower and L2-normalised; the class embedding is the mean of those S x T vectors,
re-normalised (CONCH / MI-Zero recipe). Results can be cached on disk, keyed by the model
name, its weights' SHA-256 and the prompt set's SHA-256.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__
from ..errors import CheckpointError, ConfigError
from ..store.atomic import atomic_path
from .prompts import PromptSet
from .similarity import model_device_dtype

_logger = logging.getLogger(__name__)

CACHE_FORMAT = "1"
_TENSOR_KEY = "text_classifier"


@runtime_checkable
class TextModel(Protocol):
    """What :func:`build_text_classifier` needs from a model."""

    name: str
    weights_sha256: str | None

    def tokenize(self, texts: list[str]) -> torch.Tensor: ...

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor: ...


def build_text_classifier(
    model: TextModel,
    prompts: PromptSet,
    batch_size: int = 64,
    cache_dir: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """Encode the prompt ensemble of every class.

    Parameters
    ----------
    model : TextModel
        Provides ``tokenize``, ``encode_text``, ``name`` and ``weights_sha256``.
    prompts : PromptSet
        Classes, synonyms and templates.
    batch_size : int
        Texts encoded per forward pass.
    cache_dir : path, optional
        Folder for the cache file; ``None`` disables caching. Models without a weights
        hash (random initialisation) are never cached.

    Returns
    -------
    torch.Tensor
        ``(C, E)`` float32 on the CPU, rows L2-normalised, rows in ``prompts.class_names`` order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    path = cache_path(model, prompts, cache_dir) if cache_dir is not None else None
    if cache_dir is not None and path is None:
        _logger.debug("model %s has no weights hash; text classifier not cached", model.name)
    if path is not None and path.exists():
        cached = _read_cache(path, model, prompts)
        if cached is not None:
            _logger.debug("text classifier loaded from %s", path)
            return cached

    weights = _encode_classes(model, prompts, batch_size)
    if path is not None:
        _write_cache(path, weights, model, prompts)
        _logger.debug("text classifier cached at %s", path)
    return weights


def cache_path(
    model: TextModel, prompts: PromptSet, cache_dir: str | os.PathLike[str]
) -> Path | None:
    """Cache file for (model, weights, text definition, prompts), or ``None`` when the model has
    no weights hash. The text definition is what a released folder's tokenizer and config files
    say (:func:`_text_definition`): a changed tokenizer gets its own file, never the old matrix."""
    sha = getattr(model, "weights_sha256", None)
    if not sha:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(model.name)).strip("-") or "model"
    definition = _text_definition(model)
    tag = f"_d{definition[:8]}" if definition else ""
    return Path(cache_dir) / f"textclf_{slug}_{sha[:16]}{tag}_{prompts.sha256[:16]}.safetensors"


def _text_definition(model: TextModel) -> str:
    """sha256 of the files besides the weights that define the model's text side, or ``""``."""
    digest = getattr(model, "definition_sha256", None)
    return (digest("text") or "") if callable(digest) else ""


def _encode_classes(model: TextModel, prompts: PromptSet, batch_size: int) -> torch.Tensor:
    texts = prompts.expand()
    flat = [t for cls in prompts.class_names for t in texts[cls]]
    device, _ = model_device_dtype(model)
    was_training = bool(getattr(model, "training", False))
    if isinstance(model, torch.nn.Module):
        model.eval()
    chunks = []
    try:
        with torch.inference_mode():
            for start in range(0, len(flat), batch_size):
                tokens = model.tokenize(flat[start : start + batch_size]).to(device)
                emb = model.encode_text(tokens, normalize=True)
                chunks.append(F.normalize(emb.float(), dim=-1).cpu())
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)
    emb = torch.cat(chunks)
    if emb.ndim != 2 or emb.shape[0] != len(flat):
        raise CheckpointError(
            f"text tower of {model.name} returned shape {tuple(emb.shape)} for {len(flat)} texts; "
            "expected (texts, dim)"
        )
    if not torch.isfinite(emb).all():
        raise CheckpointError(f"text tower of {model.name} produced non-finite embeddings; check the weights")
    per_class = torch.split(emb, [len(texts[c]) for c in prompts.class_names])
    weights = torch.stack([F.normalize(e.mean(dim=0), dim=-1) for e in per_class])
    _logger.debug(
        "text classifier %s: %d classes x %d prompts on %s", prompts.name, len(per_class), len(flat), model.name
    )
    return weights.contiguous()


def _metadata(model: TextModel, prompts: PromptSet) -> dict[str, str]:
    return {
        "format": CACHE_FORMAT,
        "model": str(model.name),
        "weights_sha256": str(model.weights_sha256),
        "text_definition_sha256": _text_definition(model),
        "wsi_pipeline_version": __version__,  # tokenisation or encode_text may change between versions
        "prompts_sha256": prompts.sha256,
        "classes": json.dumps(list(prompts.class_names)),
    }


def _read_cache(path: Path, model: TextModel, prompts: PromptSet) -> torch.Tensor | None:
    """The cached classifier, or ``None`` (with a warning) when the file is unusable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = f.get_tensor(_TENSOR_KEY)
    except Exception as e:  # any unreadable cache file is rebuilt
        _logger.warning("ignoring unreadable text-classifier cache %s (%s); rebuilding", path, e)
        return None
    if meta != _metadata(model, prompts) or weights.shape[0] != len(prompts.class_names):
        _logger.warning("text-classifier cache %s does not match model/prompts; rebuilding", path)
        return None
    if weights.ndim != 2 or not torch.isfinite(weights).all():
        _logger.warning("text-classifier cache %s holds invalid values; rebuilding", path)
        return None
    return weights.float()


def _write_cache(path: Path, weights: torch.Tensor, model: TextModel, prompts: PromptSet) -> None:
    with atomic_path(path) as tmp:
        save_file({_TENSOR_KEY: weights}, str(tmp), metadata=_metadata(model, prompts))


__all__ = ["TextModel", "build_text_classifier", "cache_path"]
