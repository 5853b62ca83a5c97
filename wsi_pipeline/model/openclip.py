"""``open_clip:<arch>``: token refinement on the ViT of an open_clip CLIP model, reusing its weights.

The wrapped model keeps the open_clip ``CLIP`` module intact (``state_module``), so open_clip
checkpoints (``open_clip_pytorch_model.bin`` / ``.safetensors``, e.g. QuiltNet) load with
their own key names. Non-refining blocks run open_clip's own ``ResidualAttentionBlock``;
refining blocks compute q, k, v from ``attn.in_proj_weight`` explicitly. The pre-projection
feature is ``ln_post(CLS)``; :meth:`project` is ``@ visual.proj`` followed by L2-norm.

Context MLPs are **off** for open_clip backbones (they have no trained ``g_b``): passing a
context raises :class:`~wsi_pipeline.errors.ConfigError`. Supported towers: open_clip
``VisionTransformer`` with class-token pooling, no attentional pooler, default blocks;
text towers that use open_clip's own BPE tokenizer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, default_refine_layers
from .convlm import ConVLM, clip_tokenizer
from .refine import resample_pos_embed
from .vit import BlockOps, check_image

_logger = logging.getLogger(__name__)

SCHEMA = "open_clip"
DEFAULT_KEEP_RATE = 0.7


class OpenClipBlockOps:
    """:class:`~wsi_pipeline.model.vit.BlockOps` over an open_clip ``ResidualAttentionBlock``.

    A plain object (not an ``nn.Module``) so the block's parameters are registered only once,
    under the CLIP model.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.num_heads = int(block.attn.num_heads)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)

    def norm1(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.ln_1(x)

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = h.shape
        attn = self.block.attn
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        qkv = qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attn_out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = o.shape
        return self.block.ls_1(self.block.attn.out_proj(o.transpose(1, 2).reshape(b, n, -1)))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.ls_2(self.block.mlp(self.block.ln_2(x)))


def check_supported(clip: nn.Module, arch: str) -> None:
    """Raise :class:`ConfigError` unless ``clip`` has a ViT tower this wrapper can refine."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(clip, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise ConfigError(
            f"open_clip:{arch} has a {type(visual).__name__} image tower; only ViT towers are supported"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise ConfigError(
            f"open_clip:{arch} pools with '{visual.pool_type}'/attention; only CLS-token pooling is supported"
        )
    blocks = visual.transformer.resblocks
    if not all(isinstance(b, ResidualAttentionBlock) and b.attn.batch_first for b in blocks):
        raise ConfigError(
            f"open_clip:{arch} uses custom attention blocks; only default ViT blocks are supported"
        )


class OpenClipConVLM(ConVLM):
    """ConVLM API over an open_clip ``CLIP`` model (see module docstring)."""

    def __init__(self, arch: str, clip: nn.Module, model_cfg: dict[str, Any]) -> None:
        check_supported(clip, arch)
        visual = clip.visual
        depth = len(visual.transformer.resblocks)
        width = int(visual.transformer.width)
        heads = int(visual.transformer.resblocks[0].attn.num_heads)
        image_size = int(visual.image_size[0])
        cfg = {
            **model_cfg,
            "refine": {
                "keep_rate": DEFAULT_KEEP_RATE,
                "layers": list(default_refine_layers(depth)),
                "alpha": 0.0,
                "context": False,
            },
            "preprocess": {
                "input_size": image_size,
                "mean": list(OPENAI_CLIP_MEAN),
                "std": list(OPENAI_CLIP_STD),
            },
        }
        super().__init__(
            f"{SCHEMA}:{arch}",
            cfg,
            embed_dim=width,
            proj_dim=int(visual.output_dim),
            depth=depth,
            num_heads=heads,
            patch_size=int(visual.patch_size[0]),
        )
        self.clip = clip
        self.arch = arch
        self._ops = tuple(OpenClipBlockOps(b) for b in visual.transformer.resblocks)
        self.context_length = int(clip.context_length)

    @property
    def state_module(self) -> nn.Module:
        return self.clip

    @property
    def logit_scale(self) -> torch.Tensor:  # type: ignore[override]
        """The CLIP model's learned log temperature."""
        return self.clip.logit_scale

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        check_image(x, self.patch_size)
        x = visual.conv1(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        pos = resample_pos_embed(visual.positional_embedding, tuple(visual.grid_size), grid)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        return visual.ln_pre(x)

    def _blocks(self) -> Sequence[BlockOps]:
        return self._ops

    def _final_norm(self, cls: torch.Tensor) -> torch.Tensor:
        return self.clip.visual.ln_post(cls)

    def projection_matrix(self) -> torch.Tensor:
        return self.clip.visual.proj

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        device = self.clip.token_embedding.weight.device
        return self.clip.encode_text(tokens.to(device), normalize=normalize)

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        return clip_tokenizer(self.context_length)([texts] if isinstance(texts, str) else list(texts))


def build_open_clip(arch: str) -> OpenClipConVLM:
    """An untrained ``open_clip:<arch>`` model (weights are loaded afterwards by the registry)."""
    import open_clip

    if ":" in arch or arch not in open_clip.list_models():
        raise ConfigError(
            f"unknown open_clip architecture {arch!r}; use a built-in name such as ViT-B-16 or ViT-B-32-quickgelu "
            "(hub and local-dir schemas are not supported offline; pass the checkpoint with --weights)"
        )
    model_cfg = open_clip.get_model_config(arch) or {}
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ConfigError(f"open_clip:{arch} needs a HuggingFace text tower/tokenizer; not supported offline")
    device = torch.empty(()).device  # the default device: "meta" inside create_model(..., device="meta")
    with _without_random_init_warning():  # the weights are loaded after building, from --weights
        clip = open_clip.create_model(arch, pretrained=None, device=device, precision="fp32")
    _logger.debug("built open_clip %s", arch)
    return OpenClipConVLM(arch, clip, model_cfg)


class _RandomInitWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded … initialized randomly" (logged on the root
    logger): every build here is weightless by design, and ``--weights`` is loaded afterwards."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    root, drop = logging.getLogger(), _RandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


__all__ = ["OpenClipBlockOps", "OpenClipConVLM", "build_open_clip", "check_supported"]
