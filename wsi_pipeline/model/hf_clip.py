"""``hf_clip``: a Hugging Face ``CLIPModel`` folder (PLIP, QuiltNet's transformers files) as released.

Written from the published layout of transformers' CLIP files, not from its code:

* **Folder**: ``config.json`` (a ``CLIPConfig``: ``text_config``, ``vision_config``,
  ``projection_dim``; older files write ``text_config_dict`` / ``vision_config_dict``, which
  win over the plain sections) beside ``model.safetensors`` (preferred) or
  ``pytorch_model.bin``. ``--weights`` is the folder or one of those files inside it. Fields
  the file omits take transformers' documented CLIP defaults (:data:`TEXT_DEFAULTS`,
  :data:`VISION_DEFAULTS`, :data:`DEFAULT_PROJECTION_DIM`, :data:`DEFAULT_EOS_ID`).
* **Architecture**: an open_clip ``CLIP`` with the same widths, depths, heads, MLP widths,
  patch and image size, context length, vocabulary and LayerNorm eps (per tower), wrapped in
  :class:`~wsi_pipeline.model.openclip.OpenClipConVLM`, so token refinement and context
  adapters behave exactly as on open_clip models. ``hidden_act`` is read from ``config.json``:
  ``quick_gelu`` → QuickGELU, ``gelu`` → exact GELU (the two load the same tensors, so the
  wrong one would load silently and move the features; open_clip #771). Any other value, or
  different activations in the two towers, is a :class:`~wsi_pipeline.errors.ConfigError`.
* **Weights**: :meth:`HfClipConVLM.convert_state_dict` renames transformers' keys to
  open_clip's (q, k, v projections concatenated into ``in_proj_*``; the two projections
  transposed) and drops the ``*.embeddings.position_ids`` buffers older files carry. Keys it
  does not know stay as they are, so the strict check of
  :func:`~wsi_pipeline.model.weights.load_weights` reports them.
* **Feature**: ``post_layernorm(CLS)`` (transformers' ``vision_model(...).pooler_output``);
  :meth:`project` is ``@ visual_projection.T`` then L2 (``get_image_features`` normalised).
* **Text pooling** follows transformers exactly: with the legacy ``eos_token_id == 2`` it
  pools at ``argmax(ids)``; otherwise at the first ``eos_token_id``. When that id is the
  largest in the vocabulary (CLIP's ``<|endoftext|>``, 49407) the first occurrence is the
  argmax, and open_clip's ``argmax`` pooling is used; else open_clip's ``eos`` pooling.
* **Tokenizer** (loaded on first use; embedding without a context never needs it): the
  folder's ``tokenizer.json`` with truncation and padding to ``max_position_embeddings``,
  padded with the ``pad_token`` of ``special_tokens_map.json`` / ``tokenizer_config.json``
  (default ``<|endoftext|>``). Without ``tokenizer.json``, ``vocab.json`` + ``merges.txt``
  are converted by ``transformers.CLIPTokenizerFast`` when transformers is installed.
* **Preprocess**: ``image_mean`` / ``image_std`` of ``preprocessor_config.json`` (OpenAI
  CLIP's when absent); input size = the vision ``image_size``.

Only adapters can be trained on this model (:attr:`HfClipConVLM.full_training` is false).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, one_line
from .config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .openclip import OpenClipConVLM
from .tokenizer import JsonTokenizer

_logger = logging.getLogger(__name__)

NAME = "hf_clip"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILE = "tokenizer.json"
#: Weights files looked for in a folder, in order of preference.
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
#: Files of a folder that decide its tokenisation (see :meth:`HfClipConVLM.definition_files`).
DEFINING_TEXT_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                       "merges.txt")

#: transformers' ``CLIPTextConfig`` / ``CLIPVisionConfig`` defaults for the fields used here.
TEXT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
DEFAULT_PROJECTION_DIM = 512
DEFAULT_EOS_ID = 49407  # transformers' current CLIPTextConfig default
LEGACY_EOS_ID = 2  # configs written by early transformers: pooling at argmax(ids)
DEFAULT_PAD_TOKEN = "<|endoftext|>"
OPEN_CLIP_LN_EPS = 1e-5

#: ``hidden_act`` → open_clip's ``quick_gelu`` flag.
ACTIVATIONS = {"quick_gelu": True, "gelu": False}


# ---------------------------------------------------------------------------------- files
def locate(weights: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(folder, weights file)`` for a model folder or a weights file inside one."""
    path = Path(weights)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a Hugging Face CLIPModel folder or a weights file in one")
    folder = path if path.is_dir() else path.parent
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{folder} has no {CONFIG_FILE}: {NAME} reads its architecture from a Hugging Face CLIPModel folder "
            f"({CONFIG_FILE} beside {' or '.join(WEIGHTS_FILES)})"
        )
    if path.is_file():
        return folder, path
    found = next((folder / n for n in WEIGHTS_FILES if (folder / n).is_file()), None)
    if found is None:
        raise CheckpointError(
            f"{folder} holds no {' or '.join(WEIGHTS_FILES)} (sharded checkpoints are not supported); "
            "download the model's weights file into it"
        )
    return folder, found


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line :class:`ConfigError`."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not readable JSON ({one_line(e)})") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------------- config
def parse_config(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``config.json`` of a ``CLIPModel`` → the architecture recorded in ``model.cfg``."""
    model_type = raw.get("model_type", "clip")
    if model_type != "clip":
        raise ConfigError(f"{source} describes a {model_type!r} model; {NAME} loads CLIPModel folders (model_type 'clip')")
    text = _tower(raw, "text", TEXT_DEFAULTS, source)
    vision = _tower(raw, "vision", VISION_DEFAULTS, source)
    act = _activation(text["hidden_act"], vision["hidden_act"], source)
    eos = _integer(_section(raw, "text", source).get("eos_token_id", DEFAULT_EOS_ID), "text_config.eos_token_id", source)
    vocab = text["vocab_size"]
    return {
        "family": NAME,
        "embed_dim": _integer(raw.get("projection_dim", DEFAULT_PROJECTION_DIM), "projection_dim", source),
        "hidden_act": act,
        "vision_cfg": {
            "width": vision["hidden_size"], "layers": vision["num_hidden_layers"],
            "heads": vision["num_attention_heads"], "mlp_ratio": _mlp_ratio(vision, "vision", source),
            "patch_size": vision["patch_size"], "image_size": vision["image_size"],
            "norm_eps": vision["layer_norm_eps"],
        },
        "text_cfg": {
            "width": text["hidden_size"], "layers": text["num_hidden_layers"], "heads": text["num_attention_heads"],
            "mlp_ratio": _mlp_ratio(text, "text", source), "context_length": text["max_position_embeddings"],
            "vocab_size": vocab, "norm_eps": text["layer_norm_eps"], "eos_token_id": eos,
            "pool": "argmax" if eos in (LEGACY_EOS_ID, vocab - 1) else "eos",
        },
    }


def _section(raw: Mapping[str, Any], tower: str, source: str) -> dict[str, Any]:
    """``<tower>_config`` overlaid with the older ``<tower>_config_dict`` (which transformers prefers)."""
    merged: dict[str, Any] = {}
    for key in (f"{tower}_config", f"{tower}_config_dict"):
        part = raw.get(key)
        if part is None:
            continue
        if not isinstance(part, dict):
            raise ConfigError(f"{source}: {key} must be a JSON object")
        merged.update(part)
    return merged


def _tower(raw: Mapping[str, Any], tower: str, defaults: Mapping[str, Any], source: str) -> dict[str, Any]:
    section = _section(raw, tower, source)
    out = {k: section.get(k, v) for k, v in defaults.items()}
    for k, v in out.items():
        where = f"{tower}_config.{k}"
        if k == "layer_norm_eps":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{source}: {where} must be a positive number, got {v!r}")
            out[k] = float(v)
        elif k != "hidden_act":
            out[k] = _integer(v, where, source)
    if out["hidden_size"] % out["num_attention_heads"]:
        raise ConfigError(f"{source}: {tower} hidden_size {out['hidden_size']} is not divisible by "
                          f"num_attention_heads {out['num_attention_heads']}")
    return out


def _integer(value: Any, where: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: {where} must be a positive integer, got {value!r}")
    return value


def _activation(text: Any, vision: Any, source: str) -> str:
    for tower, act in (("text", text), ("vision", vision)):
        if act not in ACTIVATIONS:
            raise ConfigError(
                f"{source}: {tower}_config.hidden_act {act!r} is not supported; {NAME} runs {' or '.join(ACTIVATIONS)}"
            )
    if text != vision:
        raise ConfigError(f"{source}: the text tower uses {text!r} but the vision tower {vision!r}; "
                          f"{NAME} needs one activation for both")
    return str(text)


def _mlp_ratio(tower: Mapping[str, int], name: str, source: str) -> float:
    """``intermediate_size / hidden_size``, checked to give open_clip's MLP width back exactly."""
    width, hidden = tower["hidden_size"], tower["intermediate_size"]
    ratio = hidden / width
    if int(width * ratio) != hidden:
        raise ConfigError(f"{source}: {name} intermediate_size {hidden} cannot be expressed as an MLP ratio of {width}")
    return ratio


def read_preprocess(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` from ``preprocessor_config.json``, else OpenAI CLIP's."""
    path = folder / PREPROCESSOR_FILE
    raw = read_json(path) if path.is_file() else {}
    out = []
    for key, default in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
        v = raw.get(key, default)
        ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
        )
        if not ok or (key == "image_std" and min(v) <= 0):
            raise ConfigError(f"{path}: {key} must be 3 numbers (std > 0), got {v!r}")
        out.append(tuple(float(x) for x in v))
    return out[0], out[1]


# ---------------------------------------------------------------------------------- model
def build_clip(arch: Mapping[str, Any]) -> nn.Module:
    """An untrained open_clip ``CLIP`` with the architecture of :func:`parse_config`."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    v, t = arch["vision_cfg"], arch["text_cfg"]
    vision = {
        "layers": v["layers"], "width": v["width"], "head_width": v["width"] // v["heads"],
        "mlp_ratio": v["mlp_ratio"], "patch_size": v["patch_size"], "image_size": v["image_size"],
    }
    text = {
        "context_length": t["context_length"], "vocab_size": t["vocab_size"], "width": t["width"],
        "heads": t["heads"], "layers": t["layers"], "mlp_ratio": t["mlp_ratio"], "pool_type": t["pool"],
    }
    if t["pool"] == "eos":
        text["eos_id"] = t["eos_token_id"]
    vision_cfg = CLIPVisionCfg(**_with_eps(vision, v["norm_eps"], CLIPVisionCfg, "vision"))
    text_cfg = CLIPTextCfg(**_supported(_with_eps(text, t["norm_eps"], CLIPTextCfg, "text"), CLIPTextCfg, "text"))
    return CLIP(embed_dim=arch["embed_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg,
                quick_gelu=ACTIVATIONS[arch["hidden_act"]])


def _with_eps(kwargs: dict[str, Any], eps: float, cls: type, tower: str) -> dict[str, Any]:
    if eps == OPEN_CLIP_LN_EPS:
        return kwargs
    return _supported({**kwargs, "norm_kwargs": {"eps": eps}}, cls, tower)


def _supported(kwargs: dict[str, Any], cls: type, tower: str) -> dict[str, Any]:
    """``kwargs``, or a :class:`ConfigError` when this open_clip's config class lacks one of them."""
    names = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(set(kwargs) - names)
    if missing:
        raise ConfigError(f"this open_clip version cannot express the {tower} setting {missing[0]}; "
                          "pip install -U open_clip_torch")
    return kwargs


class HfClipConVLM(OpenClipConVLM):
    """ConVLM API over a Hugging Face ``CLIPModel`` folder (see module docstring).

    Attributes
    ----------
    folder
        The model folder (tokenizer and preprocessor files are read from it).
    weights_file
        The weights file :func:`~wsi_pipeline.model.registry.create_model` loads.
    """

    #: The text tower and tokenizer are the folder's: ``train`` fits adapters, not the model.
    full_training = False

    def __init__(self, clip: nn.Module, arch: dict[str, Any], folder: Path, weights_file: Path,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(NAME, clip, arch)
        self.name = NAME
        self.cfg["preprocess"].update(mean=list(mean), std=list(std))
        self.mean, self.std = tuple(mean), tuple(std)
        self.folder = folder
        self.weights_file = str(weights_file)
        self._tokenizer: JsonTokenizer | None = None

    def definition_files(self, part: str) -> list[Path]:
        """``config.json`` (both towers: activation, sizes) and, for the image, the preprocessor
        config (mean, std); for the text, the tokenizer files. Those present, in a fixed order."""
        names = (CONFIG_FILE, PREPROCESSOR_FILE) if part == "image" else (CONFIG_FILE, *DEFINING_TEXT_FILES)
        return [self.folder / n for n in names if (self.folder / n).is_file()]

    def convert_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers' ``CLIPModel`` keys → this model's (open_clip) keys; see :func:`convert_hf_state_dict`."""
        return convert_hf_state_dict(state, Path(self.weights_file).name)

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder, self.context_length)
            self._check_eos(self._tokenizer)
        return self._tokenizer(texts)

    def _check_eos(self, tok: JsonTokenizer) -> None:
        t = self.cfg["text_cfg"]
        if t["eos_token_id"] == LEGACY_EOS_ID:
            return
        eos = special_token(self.folder, "eos_token") or DEFAULT_PAD_TOKEN
        if tok.token_id(eos) != t["eos_token_id"]:
            _logger.warning(
                "%s: the tokenizer's end token %s has id %s but config.json pools at eos_token_id %d "
                "(transformers does the same, so features match it; check the folder)",
                self.folder, eos, tok.token_id(eos), t["eos_token_id"],
            )


def build_hf_clip(weights: str | os.PathLike[str]) -> HfClipConVLM:
    """The untrained model described by the folder of ``weights`` (loaded afterwards by the registry)."""
    folder, weights_file = locate(weights)
    arch = parse_config(read_json(folder / CONFIG_FILE), str(folder / CONFIG_FILE))
    mean, std = read_preprocess(folder)
    clip = build_clip(arch)
    _logger.debug("built %s from %s (%s)", NAME, folder, arch["hidden_act"])
    return HfClipConVLM(clip, arch, folder, weights_file, mean, std)


# ---------------------------------------------------------------------------------- weights
#: Exact transformers key → open_clip key.
_RENAMED = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "logit_scale": "logit_scale",
}
#: Linear weights stored transposed: transformers ``(out, in)`` → open_clip ``(in, out)`` matrix.
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
#: Module prefixes renamed as a whole (``.weight`` / ``.bias`` follow).
_PREFIXES = {
    "vision_model.pre_layrnorm.": "visual.ln_pre.",
    "vision_model.post_layernorm.": "visual.ln_post.",
    "text_model.final_layer_norm.": "ln_final.",
}
_TOWERS = {"vision_model": "visual.transformer.resblocks.", "text_model": "transformer.resblocks."}
_BLOCK = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}
_LAYER_KEY = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("q", "k", "v")
_DROPPED = re.compile(r"^(vision_model|text_model)\.embeddings\.position_ids$")


def convert_hf_state_dict(state: Mapping[str, torch.Tensor], file_name: str = "weights") -> dict[str, torch.Tensor]:
    """Rename a transformers ``CLIPModel`` state dict to open_clip's ``CLIP`` names.

    q, k and v of every block are concatenated (in that order) into ``attn.in_proj_*``; a
    block missing one of them keeps its original keys. Unknown keys are kept unchanged for
    the strict check to report; ``*.embeddings.position_ids`` buffers are dropped.
    """
    if not any(str(k).startswith(tuple(_TOWERS)) for k in state):
        first = next(iter(state), "none")
        raise CheckpointError(
            f"weights file {file_name} is not a Hugging Face CLIPModel state dict (first key {first!r}); "
            "open_clip checkpoints load with --model open_clip:<arch>"
        )
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state.items():
        if _DROPPED.match(key):
            continue
        m = _LAYER_KEY.match(key)
        if m and m[3] in (f"self_attn.{p}_proj" for p in _QKV):
            qkv.setdefault((m[1], m[2], m[4]), {})[m[3][len("self_attn.")]] = (key, value)
            continue
        new = _rename(key)
        if key in _TRANSPOSED and value.ndim == 2:
            value = value.t().contiguous()
        out[key if new is None else new] = value
    for (tower, block, kind), parts in qkv.items():
        if set(parts) == set(_QKV):
            out[f"{_TOWERS[tower]}{block}.attn.in_proj_{kind}"] = torch.cat([parts[p][1] for p in _QKV], dim=0)
        else:  # incomplete: left for the strict check to report
            out.update(dict(parts.values()))
    return out


def _rename(key: str) -> str | None:
    """The open_clip name of a transformers key (``None``: unknown)."""
    if key in _RENAMED:
        return _RENAMED[key]
    if key in _TRANSPOSED:
        return _TRANSPOSED[key]
    for src, dst in _PREFIXES.items():
        if key.startswith(src):
            return dst + key[len(src):]
    m = _LAYER_KEY.match(key)
    if m and m[3] in _BLOCK:
        return f"{_TOWERS[m[1]]}{m[2]}.{_BLOCK[m[3]]}.{m[4]}"
    return None


# ---------------------------------------------------------------------------------- tokenizer
def special_token(folder: Path, name: str) -> str | None:
    """``name`` (e.g. ``pad_token``) from ``special_tokens_map.json``, else ``tokenizer_config.json``."""
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / file
        value = read_json(path).get(name) if path.is_file() else None
        if isinstance(value, dict):  # a serialised AddedToken
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


def load_tokenizer(folder: Path, length: int) -> JsonTokenizer:
    """The folder's tokenizer (see module docstring), padding and truncating to ``length``."""
    pad = special_token(folder, "pad_token") or DEFAULT_PAD_TOKEN
    path = folder / TOKENIZER_FILE
    if path.is_file():
        _logger.info("%s tokenizer: %s", NAME, path)
        return JsonTokenizer(path, length, pad_token=pad)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return _converted_tokenizer(folder, length, pad)
    raise CheckpointError(
        f"{folder} has no tokenizer: text encoding needs {TOKENIZER_FILE}, or vocab.json + merges.txt "
        "with transformers installed; copy them from the model's repository"
    )


def _converted_tokenizer(folder: Path, length: int, pad: str) -> JsonTokenizer:
    """``vocab.json`` + ``merges.txt`` converted by ``transformers.CLIPTokenizerFast`` (offline)."""
    try:
        from transformers import CLIPTokenizerFast
    except ImportError as e:
        raise CheckpointError(
            f"{folder} has vocab.json + merges.txt but no {TOKENIZER_FILE}; pip install transformers "
            f"to convert them, or copy {TOKENIZER_FILE} from the model's repository"
        ) from e
    try:
        fast = CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"vocab.json + merges.txt in {folder} cannot be read ({one_line(e)})") from e
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TOKENIZER_FILE
        fast.backend_tokenizer.save(str(path))
        _logger.info("%s tokenizer: converted from vocab.json + merges.txt in %s", NAME, folder)
        return JsonTokenizer(path, length, pad_token=pad)


__all__ = [
    "NAME",
    "HfClipConVLM",
    "build_clip",
    "build_hf_clip",
    "convert_hf_state_dict",
    "load_tokenizer",
    "locate",
    "parse_config",
    "read_preprocess",
]
