"""CONCH v1 (CoCa, Lu et al. 2024) in its released checkpoint layout, with token refinement.

Written from the published architecture facts, not from CONCH's code (CC BY-NC-ND):

* **Vision**: ``visual.trunk`` is a timm-named ViT (patch 16, width 768, 12 blocks, 448 px;
  our :class:`~wsi_pipeline.model.vit.VisionTower`). Its final norm is applied to *every*
  token, then ``visual.attn_pool_contrast`` (one learned query, ``n_head`` heads, LayerNorms
  on query and keys; open_clip's ``AttentionalPooler``) attends over all of them and
  ``visual.ln_contrast`` normalises the result. That 512-d vector is the stored
  pre-projection feature (CONCH's ``encode_image(proj_contrast=False, normalize=False)``);
  :meth:`project` is ``@ visual.proj_contrast`` then L2. ``visual.attn_pool_caption`` and
  ``visual.ln_caption`` (captioning) are held so the released file loads strictly; they are
  never run.
* **Refinement** runs on the trunk's blocks exactly as on the native ViT. The attentional
  pooler then sees the refined sequence: CLS, the kept tokens and the fused token (instead of
  all 785 tokens at 448 px).
* **Text**: ``text.*`` is a causal transformer (width 768, 12 layers, context 128) whose
  *appended* CLS embedding ``text.cls_emb`` is pooled, then ``text.ln_final`` and
  ``text.text_projection``. Token ids are the first 127 positions; the CLS is position 128.
  The CLS row may not attend to padding (id 0) with CoCa's original one-position offset
  (the mask column of token ``j`` is ``j + 1``), which the released weights were trained
  with; open_clip's ``TextTransformer(embed_cls=True)`` implements exactly that legacy mask.
* **Tokenizer**: CONCH's byte-level BPE (``conch_byte_level_bpe_uncased.json``) is not ours
  to ship. It is looked up, in order, in ``$WSI_PIPELINE_CONCH_TOKENIZER``, beside the
  weights file (that name or ``tokenizer.json``), and in an installed ``conch`` package
  (``conch/open_clip_custom/tokenizers/``); see ``models/conch_v1.md``. Only text encoding
  needs it (classify, ``--context``); embedding without a context does not.

Architectures are JSON files (``model_configs/conch_*.json``, ``"family": "conch"``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import AttentionalPooler, TextTransformer
from torch import nn

from ..errors import CheckpointError, ConfigError
from .convlm import LOGIT_SCALE_INIT, ConVLM
from .tokenizer import JsonTokenizer
from .vit import BlockOps, VisionTower, vision_kwargs

_logger = logging.getLogger(__name__)

FAMILY = "conch"
TOKENIZER_ENV = "WSI_PIPELINE_CONCH_TOKENIZER"
TOKENIZER_FILE = "conch_byte_level_bpe_uncased.json"
#: Where CONCH's own package keeps the tokenizer, relative to the ``conch`` package folder.
PACKAGE_TOKENIZER = Path("open_clip_custom") / "tokenizers" / TOKENIZER_FILE
PAD_TOKEN = "<pad>"


class ConchVisual(nn.Module):
    """``visual.*`` of the released file: timm trunk, contrastive and captioning poolers."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        v, pool = cfg["vision_cfg"], cfg["pool"]
        width, dim, cap = int(v["width"]), int(cfg["embed_dim"]), int(pool["caption_dim"])
        heads = int(pool["heads"])
        self.trunk = VisionTower(**vision_kwargs(v))
        self.attn_pool_contrast = AttentionalPooler(dim, width, n_head=heads, n_queries=1)
        self.ln_contrast = nn.LayerNorm(dim)
        self.proj_contrast = nn.Parameter(torch.randn(dim, dim) * width**-0.5)
        self.attn_pool_caption = AttentionalPooler(cap, width, n_head=heads, n_queries=int(pool["caption_queries"]))
        self.ln_caption = nn.LayerNorm(cap)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Trunk tokens (before the final norm) → the 512-d attention-pooled, layer-normed feature."""
        x = self.trunk.norm(tokens)
        return self.ln_contrast(self.attn_pool_contrast(x)[:, 0])


class ConchCoCa(nn.Module):
    """The modules and names of the released ``pytorch_model.bin`` (CoCa without ``text_decoder``)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        t = cfg["text_cfg"]
        self.visual = ConchVisual(cfg)
        kwargs: dict[str, Any] = {}
        if "correct_cls_mask" in TextTransformer.__init__.__code__.co_varnames:
            kwargs["correct_cls_mask"] = False  # the mask the released weights were trained with
        n_tokens = int(t["context_length"]) - 1  # the last position belongs to the CLS embedding
        self.text = TextTransformer(
            context_length=n_tokens,
            vocab_size=int(t["vocab_size"]),
            width=int(t["width"]),
            heads=int(t["heads"]),
            layers=int(t["layers"]),
            mlp_ratio=float(t.get("mlp_ratio", 4.0)),
            output_dim=int(cfg["embed_dim"]),
            embed_cls=True,
            pad_id=int(t.get("pad_id", 0)),
            **kwargs,
        )
        if self.text.positional_embedding.shape[0] != n_tokens + 1:
            raise ConfigError(
                "this open_clip version builds CoCa text towers differently from CONCH's; "
                "pip install -U open_clip_torch"
            )
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))


class ConchConVLM(ConVLM):
    """ConVLM API over :class:`ConchCoCa` (see module docstring)."""

    #: The text tower is CONCH's with CONCH's tokenizer: ``train`` can fit an adapter, not the model.
    full_training = False

    def __init__(self, name: str, cfg: dict[str, Any]) -> None:
        v = cfg["vision_cfg"]
        super().__init__(
            name,
            cfg,
            embed_dim=cfg["embed_dim"],
            proj_dim=cfg["embed_dim"],
            depth=v["layers"],
            num_heads=v["heads"],
            patch_size=v["patch_size"],
            width=v["width"],
        )
        self.coca = ConchCoCa(cfg)
        self.context_length = int(cfg["text_cfg"]["context_length"]) - 1
        self._tokenizer: JsonTokenizer | None = None

    @property
    def state_module(self) -> nn.Module:
        return self.coca

    @property
    def logit_scale(self) -> torch.Tensor:  # type: ignore[override]
        return self.coca.logit_scale

    @property
    def trunk(self) -> VisionTower:
        return self.coca.visual.trunk

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.embed(x)

    def _blocks(self) -> Sequence[BlockOps]:
        return self.trunk.blocks  # type: ignore[return-value]

    def _final_norm(self, cls: torch.Tensor) -> torch.Tensor:
        return self.trunk.norm(cls)

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.coca.visual.pool(tokens)

    def projection_matrix(self) -> torch.Tensor:
        return self.coca.visual.proj_contrast

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        text = self.coca.text
        emb = text(tokens.to(text.token_embedding.weight.device))
        return F.normalize(emb, dim=-1) if normalize else emb

    def definition_files(self, part: str) -> list[Path]:
        """The tokenizer file for the text (found as :meth:`tokenize` finds it); the image is the code's."""
        if part != "text":
            return []
        try:
            return [find_tokenizer(self.weights_path)]
        except CheckpointError:
            return []  # tokenize will say why

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        if self._tokenizer is None:
            path = find_tokenizer(self.weights_path)
            self._tokenizer = JsonTokenizer(path, self.context_length, pad_token=PAD_TOKEN, pad_id=0)
            _logger.info("CONCH tokenizer: %s", path)
        return self._tokenizer(texts)


def find_tokenizer(weights_path: str | os.PathLike[str] | None) -> Path:
    """CONCH's tokenizer file (see module docstring for the search order) or a one-line error."""
    candidates: list[Path] = []
    env = os.environ.get(TOKENIZER_ENV, "").strip()
    if env:
        candidates.append(Path(env))
    if weights_path:
        folder = Path(weights_path).parent
        candidates += [folder / TOKENIZER_FILE, folder / "tokenizer.json"]
    try:
        spec = importlib.util.find_spec("conch")
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(root) / PACKAGE_TOKENIZER)
    for path in candidates:
        if path.is_file():
            return path
    if env:
        raise CheckpointError(f"{TOKENIZER_ENV}={env} is not a file; point it at {TOKENIZER_FILE}")
    raise CheckpointError(
        f"CONCH's tokenizer ({TOKENIZER_FILE}) was not found: install CONCH's code "
        "(pip install git+https://github.com/mahmoodlab/CONCH.git), copy the file beside the weights, "
        f"or set {TOKENIZER_ENV}=PATH (see models/conch_v1.md)"
    )


__all__ = ["FAMILY", "ConchCoCa", "ConchConVLM", "find_tokenizer"]
