"""Saving and loading ConVLM weights with strict, readable checks.

* :func:`save_weights` writes ``<path>`` (safetensors) and a sidecar ``<path>.json``
  (``{"name", "sha256", "format", "num_tensors", "wsi_pipeline_version", "cfg"}``), both atomically.
* :func:`load_weights` reads safetensors (detected by content, not extension) or a torch
  checkpoint via ``torch.load(weights_only=True)`` (``state_dict`` / ``model`` nesting and a
  DDP ``module.`` prefix are accepted), maps a released layout onto the model's own when the
  model has ``convert_state_dict``, checks keys and shapes strictly, and records the file's
  sha256 and path in ``model.weights_sha256`` and ``model.weights_path``. Every problem is a one-line
  :class:`~wsi_pipeline.errors.CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, one_line
from ..store.atomic import atomic_path, atomic_write_text

_logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"
_SHOW = 3  # keys listed per category in an error message
_NESTING_KEYS = ("state_dict", "model", "module")


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """``weights.safetensors`` → ``weights.safetensors.json``."""
    p = Path(path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> str:
    """Write the model's ``state_module`` state dict as safetensors plus a JSON sidecar; return the sha256.

    The model's ``weights_sha256`` is set to the new file's hash.
    """
    from .. import __version__

    module = getattr(model, "state_module", model)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    name = str(getattr(model, "name", type(model).__name__))
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"name": name, "format": "wsi_pipeline.convlm"})
        sort_safetensors_metadata(tmp)
        digest = file_sha256(tmp)
    sidecar = {
        "name": name,
        "sha256": digest,
        "format": "safetensors",
        "num_tensors": len(state),
        "wsi_pipeline_version": __version__,
        "cfg": getattr(model, "cfg", None),
    }
    atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    if hasattr(model, "weights_sha256"):
        model.weights_sha256 = digest
    _logger.info("saved %d tensors of %s to %s (sha256 %s)", len(state), name, path, digest[:12])
    return digest


def sort_safetensors_metadata(path: str | os.PathLike[str]) -> None:
    """Rewrite a safetensors header in place with its ``__metadata__`` keys sorted.

    safetensors serialises the metadata from a hash map, so its key order (and with it the
    file's sha256) changes from call to call; sorted keys make equal tensors give equal bytes.
    The header keeps its length (it is re-padded with spaces); nothing else changes.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(blob) <= n:
            f.seek(8)
            f.write(blob + b" " * (n - len(blob)))


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> str:
    """Load ``path`` into the model strictly; return (and record in ``weights_sha256``) the file's sha256."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist; check --weights")
    digest = file_sha256(path)
    _check_sidecar(model, path, digest)
    state = read_state_dict(path)
    convert = getattr(model, "convert_state_dict", None)
    if convert is not None:  # a released layout other than the model's own (e.g. Hugging Face CLIP)
        state = convert(state)
    module = getattr(model, "state_module", model)
    check_state_dict(module, state, path, getattr(model, "name", type(model).__name__))
    module.load_state_dict(state, strict=True)
    if hasattr(model, "weights_sha256"):
        model.weights_sha256 = digest
        model.weights_path = str(path)
    _logger.info("loaded %s into %s (sha256 %s)", path, getattr(model, "name", "model"), digest[:12])
    return digest


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch checkpoint (unnested), on the CPU."""
    path = Path(path)
    if _looks_like_safetensors(path):
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise _corrupt(path, e) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"weights file {path} contains pickled objects other than tensors and is refused as unsafe; "
                "re-save its state_dict only"
            ) from e
        raise _corrupt(path, e) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error) as e:
        raise _corrupt(path, e) from e
    return _unnest(obj, path)


def _corrupt(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"weights file {path} is truncated or corrupt ({one_line(e, sentence=True)}); "
                           "re-export or re-download it")


def check_state_dict(module: nn.Module, state: Mapping[str, Any], path: Path | str, name: str) -> None:
    """Raise :class:`CheckpointError` listing missing/unexpected keys and shape mismatches."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape
    ]
    not_tensor = [k for k in expected if k in state and not isinstance(state[k], torch.Tensor)]
    parts = [
        _describe(missing, "missing key"),
        _describe(unexpected, "unexpected key"),
        _describe(mismatched, "shape mismatch", "file vs model: "),
        _describe(not_tensor, "non-tensor value"),
    ]
    parts = [p for p in parts if p]
    if parts:
        raise CheckpointError(
            f"weights file {Path(path).name} does not fit model {name}: {'; '.join(parts)}; "
            "use the checkpoint made for this architecture"
        )


def _describe(items: list[str], what: str, prefix: str = "") -> str:
    """``"2 shape mismatches (file vs model: a, b)"``: the count, ``what`` (plural from 2 on) and the first items."""
    if not items:
        return ""
    shown = ", ".join(items[:_SHOW]) + (", …" if len(items) > _SHOW else "")
    plural = what + ("es" if what.endswith(("s", "sh", "ch", "x")) else "s")
    return f"{len(items)} {what if len(items) == 1 else plural} ({prefix}{shown})"


def _unnest(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"weights file {path} holds no state dict (found {type(obj).__name__}); save model.state_dict()"
        )
    state = dict(obj)
    if all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length followed by ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < (1 << 32)


def _check_sidecar(model: nn.Module, path: Path, digest: str) -> None:
    side = sidecar_path(path)
    if not side.is_file():
        return
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"sidecar {side} is not valid JSON ({e}); delete or re-export it") from e
    if meta.get("sha256") and meta["sha256"] != digest:
        raise CheckpointError(
            f"weights file {path} does not match the sha256 in {side.name} (file changed or truncated); re-export it"
        )
    name = getattr(model, "name", None)
    if meta.get("name") and name and meta["name"] != name:
        raise CheckpointError(
            f"weights file {path} was saved for model {meta['name']}, not {name}; pick the matching model"
        )


__all__ = [
    "check_state_dict",
    "file_sha256",
    "load_weights",
    "read_state_dict",
    "save_weights",
    "sidecar_path",
    "sort_safetensors_metadata",
]
