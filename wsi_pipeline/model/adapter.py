"""Context adapters: ConVLM's context guidance as a small file on top of any backbone.

An adapter is the set of context MLPs ``g_b`` (one per guided block, see
:mod:`wsi_pipeline.model.convlm`) trained for one base model and one base weights file,
with the backbone and text tower frozen (``wsi-pipeline train --adapter-only``). It attaches
to every backbone the registry builds (the native ViT, ``open_clip:<arch>``, CONCH,
Hugging Face CLIP) through :meth:`ConVLM.set_context_mlps`; the base checkpoint is never
changed.

File layout (safetensors): tensors ``context_mlp.<block>.0.{weight,bias}`` (context →
hidden) and ``context_mlp.<block>.2.{weight,bias}`` (hidden → width), the names the native
ViT uses in its own checkpoint, and string metadata:

``format``
    ``wsi_pipeline.context_adapter``
``base_model``, ``base_weights_sha256``
    The registry name and the sha256 of the weights it was trained on (``none`` for a
    random init); :func:`load_adapter` refuses any other base.
``layers``, ``alpha``
    Guided blocks (JSON list) and mixing weight.
``keep_rate``, ``refine_layers``
    The refinement schedule it was trained with; it becomes the adapted model's default.
``hidden``, ``proj_dim``, ``width``, ``wsi_pipeline_version``
    Shapes (checked against the model) and the writing version.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, ConfigError, one_line
from ..store.atomic import atomic_path
from .convlm import ContextMLP, ConVLM
from .weights import file_sha256, sort_safetensors_metadata

_logger = logging.getLogger(__name__)

ADAPTER_FORMAT = "wsi_pipeline.context_adapter"
DEFAULT_ALPHA = 0.1
PREFIX = "context_mlp."
_NO_WEIGHTS = "none"


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter file declares (its metadata) and its sha256."""

    path: str
    sha256: str
    base_model: str
    base_weights_sha256: str
    layers: tuple[int, ...]
    alpha: float
    keep_rate: float
    refine_layers: tuple[int, ...]
    hidden: int
    proj_dim: int
    width: int


def new_adapter(
    model: ConVLM,
    layers: Sequence[int] | None = None,
    hidden: int | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> nn.ModuleDict:
    """Install freshly initialised context MLPs on ``model`` (replacing any) and return them.

    ``layers`` default to the model's refinement blocks, ``hidden`` to its width; the MLPs
    are drawn from the global torch RNG (seed it) and put on the model's device and dtype.
    """
    layers = tuple(model.refine_layers if layers is None else layers)
    if not layers:
        raise ConfigError(f"an adapter needs at least one guided block; {model.name} has no refinement blocks")
    if not 0.0 < float(alpha) <= 1.0:
        raise ConfigError(f"adapter alpha must be in (0, 1], got {alpha}")
    hidden = int(model.width if hidden is None else hidden)
    mlps = nn.ModuleDict({str(i): ContextMLP(model.proj_dim, hidden, model.width) for i in layers})
    _match_model(mlps, model)
    model.set_context_mlps(mlps, alpha)
    model.adapter_sha256 = None
    return mlps


def adapter_state(model: ConVLM) -> dict[str, torch.Tensor]:
    """The model's context-MLP tensors under the adapter file's names (CPU, contiguous)."""
    mlps = getattr(model, "context_mlp", None)
    if mlps is None or not len(mlps):
        raise ConfigError(f"{model.name} has no context MLPs to save")
    return {PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in mlps.state_dict().items()}


def save_adapter(model: ConVLM, path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> str:
    """Write ``model``'s context MLPs as an adapter file; return (and record) its sha256.

    The model's current default schedule (``keep_rate``, ``refine_layers``) is recorded as the
    one the adapter was trained with.
    """
    from .. import __version__

    state = {k: v.to(dtype) for k, v in adapter_state(model).items()}
    layers = sorted(model._context_mlps())
    first = model.context_mlp[str(layers[0])]
    meta = {
        "format": ADAPTER_FORMAT,
        "base_model": model.name,
        "base_weights_sha256": model.weights_sha256 or _NO_WEIGHTS,
        "layers": json.dumps(layers),
        "alpha": repr(float(model.context_alpha)),
        "keep_rate": repr(float(model.keep_rate)),
        "refine_layers": json.dumps(list(model.refine_layers)),
        "hidden": str(int(first[0].out_features)),
        "proj_dim": str(int(model.proj_dim)),
        "width": str(int(model.width)),
        "wsi_pipeline_version": __version__,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
        sort_safetensors_metadata(tmp)
        digest = file_sha256(tmp)
    model.adapter_sha256 = digest
    _logger.info("saved adapter of %s (%d tensors, blocks %s) to %s (sha256 %s)", model.name, len(state), layers,
                 path, digest[:12])
    return digest


def read_adapter(path: str | os.PathLike[str]) -> tuple[AdapterInfo, dict[str, torch.Tensor]]:
    """The declared metadata and tensors of an adapter file; one-line :class:`CheckpointError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter file {path} does not exist; check --adapter")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"adapter file {path} is not a safetensors file or is truncated ({one_line(e)}); "
            "re-export it with 'wsi-pipeline train --adapter-only'"
        ) from e
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(
            f"{path.name} is not a context adapter (format {meta.get('format', 'missing')!r}); "
            "pass a file written by 'wsi-pipeline train --adapter-only' (model weights go to --weights)"
        )
    try:
        info = AdapterInfo(
            path=str(path),
            sha256=file_sha256(path),
            base_model=meta["base_model"],
            base_weights_sha256=meta["base_weights_sha256"],
            layers=tuple(int(i) for i in json.loads(meta["layers"])),
            alpha=float(meta["alpha"]),
            keep_rate=float(meta["keep_rate"]),
            # "prune_layers": the name adapters written before the refinement vocabulary was unified use
            refine_layers=tuple(int(i) for i in json.loads(meta.get("refine_layers", meta.get("prune_layers")))),
            hidden=int(meta["hidden"]),
            proj_dim=int(meta["proj_dim"]),
            width=int(meta["width"]),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"adapter file {path.name} has incomplete metadata ({e}); re-export it") from e
    bad = [k for k in state if not k.startswith(PREFIX)]
    if bad:
        raise CheckpointError(f"adapter file {path.name} holds other tensors than context MLPs ({bad[0]}, …)")
    return info, state


def load_adapter(model: ConVLM, path: str | os.PathLike[str]) -> AdapterInfo:
    """Attach the adapter at ``path`` to ``model`` after checking it was trained on this model and weights.

    The model's default refinement schedule becomes the one the adapter was trained with;
    ``model.adapter_sha256`` records the file.
    """
    info, state = read_adapter(path)
    name = Path(path).name
    if info.base_model != model.name:
        raise CheckpointError(
            f"adapter {name} was trained on model {info.base_model}, not {model.name}; "
            "use the --model it was trained on"
        )
    have = model.weights_sha256 or _NO_WEIGHTS
    if info.base_weights_sha256 != have:
        raise CheckpointError(
            f"adapter {name} was trained on {info.base_model} weights {info.base_weights_sha256[:12]}, "
            f"not on {have[:12]}; use it with the same --weights file"
        )
    if (info.proj_dim, info.width) != (model.proj_dim, model.width):
        raise CheckpointError(
            f"adapter {name} has context width {info.proj_dim} → {info.width}, but {model.name} needs "
            f"{model.proj_dim} → {model.width}"
        )
    mlps = nn.ModuleDict({str(i): ContextMLP(info.proj_dim, info.hidden, info.width) for i in info.layers})
    expected = {PREFIX + k for k in mlps.state_dict()}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(
            f"adapter file {name} does not match its declared blocks {list(info.layers)} "
            f"(missing {missing[:2]}, unexpected {extra[:2]}); re-export it"
        )
    try:
        mlps.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"adapter file {name} has tensors of the wrong shape ({str(e).splitlines()[-1].strip()})") from e
    from .refine import validate_schedule

    validate_schedule(info.keep_rate, info.refine_layers, model.depth)
    _match_model(mlps, model)
    model.set_context_mlps(mlps, info.alpha)
    model.keep_rate, model.refine_layers = info.keep_rate, info.refine_layers
    model.adapter_sha256 = info.sha256
    _logger.info("attached adapter %s (blocks %s, alpha %g, sha256 %s) to %s", name, list(info.layers), info.alpha,
                 info.sha256[:12], model.name)
    return info


def _match_model(mlps: nn.Module, model: nn.Module) -> None:
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    if p is not None:
        mlps.to(device=p.device, dtype=p.dtype)


__all__ = [
    "ADAPTER_FORMAT",
    "DEFAULT_ALPHA",
    "AdapterInfo",
    "adapter_state",
    "load_adapter",
    "new_adapter",
    "read_adapter",
    "save_adapter",
]
