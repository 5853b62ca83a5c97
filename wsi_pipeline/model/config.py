"""Architecture configs: JSON files in ``model_configs/`` (open_clip style), loaded and validated.

A config looks like::

    {
      "embed_dim": 512,                  # JOINT image-text space width (open_clip naming);
                                         # exposed as ``ConVLM.proj_dim``
      "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12,
                     "mlp_ratio": 4.0, "qkv_bias": true, "ln_pre": false, "norm_eps": 1e-6},
      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
      "refine": {"keep_rate": 0.7, "layers": [3, 6, 9], "alpha": 0.1, "context_hidden": 768},
      "preprocess": {"input_size": 224, "mean": [...], "std": [...]}
    }

``vision_cfg.width`` is the pre-projection CLS width, exposed as ``ConVLM.embed_dim``.
An optional ``"family"`` names the model class (default ``convlm``, the native ViT; ``conch``
adds a ``pool`` section, see :data:`FAMILY_SECTIONS`).
``refine.layers`` are 0-based block indices; they are the default pruning schedule and
the blocks that own a context MLP.
"""

from __future__ import annotations

import copy
import json
import math
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError

CONFIG_PACKAGE = "wsi_pipeline.model"
CONFIG_DIR = "model_configs"

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_FAMILY = "convlm"
#: Sections a family needs besides the common ones (``"family"`` absent means ``convlm``, the
#: native ViT; ``conch`` is CONCH v1's CoCa layout, see :mod:`wsi_pipeline.model.conch`).
FAMILY_SECTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    DEFAULT_FAMILY: {},
    "conch": {"pool": ("heads", "caption_dim", "caption_queries")},
}

_REQUIRED: dict[str, tuple[str, ...]] = {
    "vision_cfg": ("image_size", "patch_size", "width", "layers", "heads"),
    "text_cfg": ("context_length", "vocab_size", "width", "heads", "layers"),
    "refine": ("keep_rate", "layers", "alpha"),
    "preprocess": ("input_size", "mean", "std"),
}


def config_dir() -> Path:
    """Folder holding the shipped architecture JSON files."""
    return Path(str(resources.files(CONFIG_PACKAGE).joinpath(CONFIG_DIR)))


def list_configs() -> list[str]:
    """Names (file stems) of the shipped architecture configs, sorted."""
    return sorted(p.stem for p in config_dir().glob("*.json"))


@cache
def _load(name: str) -> dict[str, Any]:
    path = config_dir() / f"{name}.json"
    if not path.is_file():
        raise ConfigError(
            f"no architecture config {path.name} in {path.parent}; known: {', '.join(list_configs())}"
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"architecture config {path} is not valid JSON: {e}") from e
    validate_config(cfg, source=str(path))
    return cfg


def get_config(name: str) -> dict[str, Any]:
    """A validated deep copy of the shipped config ``name``."""
    return copy.deepcopy(_load(name))


def default_refine_layers(depth: int) -> tuple[int, ...]:
    """EViT's placement generalised to any depth: blocks ``depth*k//4`` for k = 1, 2, 3 (12 → 3, 6, 9)."""
    return tuple(sorted({depth * k // 4 for k in (1, 2, 3)} & set(range(1, depth))))


def validate_config(cfg: dict[str, Any], source: str = "config") -> None:
    """Raise :class:`ConfigError` naming the first problem in an architecture config."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    family = cfg.get("family", DEFAULT_FAMILY)
    if family not in FAMILY_SECTIONS:
        raise ConfigError(f"{source}: unknown family {family!r}; known: {', '.join(FAMILY_SECTIONS)}")
    if not isinstance(cfg.get("embed_dim"), int) or cfg["embed_dim"] <= 0:
        raise ConfigError(f"{source}: 'embed_dim' (joint space width) must be a positive integer")
    for section, keys in {**_REQUIRED, **FAMILY_SECTIONS[family]}.items():
        sec = cfg.get(section)
        if not isinstance(sec, dict):
            raise ConfigError(f"{source}: missing section '{section}'")
        missing = [k for k in keys if k not in sec]
        if missing:
            raise ConfigError(f"{source}: '{section}' lacks {', '.join(missing)}")
    v, t, r, p = cfg["vision_cfg"], cfg["text_cfg"], cfg["refine"], cfg["preprocess"]
    for sec_name, sec in (("vision_cfg", v), ("text_cfg", t)):
        if sec["width"] % sec["heads"]:
            raise ConfigError(
                f"{source}: {sec_name}.width {sec['width']} is not divisible by heads {sec['heads']}"
            )
    if v["image_size"] % v["patch_size"]:
        raise ConfigError(
            f"{source}: image_size {v['image_size']} is not a multiple of patch_size {v['patch_size']}"
        )
    if p["input_size"] != v["image_size"]:
        raise ConfigError(
            f"{source}: preprocess.input_size {p['input_size']} != vision_cfg.image_size {v['image_size']}"
        )
    if not (0.0 < float(r["keep_rate"]) <= 1.0):
        raise ConfigError(f"{source}: refine.keep_rate must be in (0, 1], got {r['keep_rate']}")
    if not (0.0 <= float(r["alpha"]) <= 1.0):
        raise ConfigError(f"{source}: refine.alpha must be in [0, 1], got {r['alpha']}")
    layers = r["layers"]
    if not isinstance(layers, list) or any(
        not isinstance(i, int) or not 0 <= i < v["layers"] for i in layers
    ):
        raise ConfigError(f"{source}: refine.layers must be 0-based block indices below depth {v['layers']}")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{source}: refine.layers has duplicates: {layers}")
    for key in ("mean", "std"):
        vals = p[key]
        if not (isinstance(vals, list) and len(vals) == 3 and all(isinstance(x, (int, float)) for x in vals)):
            raise ConfigError(f"{source}: preprocess.{key} must be a list of 3 numbers")
    if any(not math.isfinite(s) or s <= 0 for s in p["std"]):
        raise ConfigError(f"{source}: preprocess.std must be positive")


__all__ = [
    "DEFAULT_FAMILY",
    "FAMILY_SECTIONS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "config_dir",
    "default_refine_layers",
    "get_config",
    "list_configs",
    "validate_config",
]
