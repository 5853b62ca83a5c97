"""Plain pre-norm ViT building blocks for the native ConVLM vision tower.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so
a timm ViT state dict loads into :class:`VisionTower` unchanged.

Every block exposes the small set of operations that the refinement loop in
:mod:`wsi_pipeline.model.convlm` needs (:class:`BlockOps`); the open_clip wrapper provides
the same operations over ``nn.MultiheadAttention`` weights.

Initialisation (no seeding here; callers seed the global torch RNG): linear and conv
weights and ``pos_embed`` truncated-normal with std 0.02, ``cls_token`` normal std 0.02,
biases zero, LayerNorm weight 1 / bias 0, LayerScale (when enabled) at ``ls_init``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .refine import resample_pos_embed


class BlockOps(Protocol):
    """The operations of one transformer block used by the refinement loop."""

    num_heads: int

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The block's unmodified forward pass."""

    def norm1(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-attention LayerNorm."""

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``(B, H, N, hd)`` from the normalised tokens."""

    def attn_out(self, o: torch.Tensor) -> torch.Tensor:
        """Output projection and layer scale of the attention result ``(B, H, N, hd)`` → ``(B, N, D)``."""

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``ls2(mlp(norm2(x)))``, the MLP residual branch."""


class LayerScale(nn.Module):
    """Per-channel residual scale ``x * gamma``."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention holding a fused ``qkv`` projection and an output ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    """``fc1 → GELU → fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; implements :class:`BlockOps`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        ls_init: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1: nn.Module = LayerScale(dim, ls_init) if ls_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2: nn.Module = LayerScale(dim, ls_init) if ls_init else nn.Identity()

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = h.shape
        qkv = self.attn.qkv(h).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attn_out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = o.shape
        return self.ls1(self.attn.proj(o.transpose(1, 2).reshape(b, n, -1)))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x))
        x = x + self.attn_out(F.scaled_dot_product_attention(q, k, v))
        return x + self.mlp_branch(x)

    forward = plain


class VisionTower(nn.Module):
    """Patch embedding, CLS token, learned position embedding, blocks and final norm."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ln_pre: bool = False,
        norm_eps: float = 1e-6,
        ls_init: float | None = None,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"vision width {width} is not divisible by {heads} heads; fix the model config")
        if image_size % patch_size:
            raise ConfigError(f"image size {image_size} is not a multiple of patch size {patch_size}")
        self.patch_size = patch_size
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.width = width
        self.num_heads = heads
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, width))
        self.norm_pre: nn.Module = nn.LayerNorm(width, eps=norm_eps) if ln_pre else nn.Identity()
        self.blocks = nn.ModuleList(
            [Block(width, heads, mlp_ratio, qkv_bias, norm_eps, ls_init) for _ in range(layers)]
        )
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.init_weights()

    def init_weights(self) -> None:
        """Re-initialise all parameters with the scheme in the module docstring."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale):
                nn.init.constant_(m.gamma, m.init_value)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, 3, H, W)`` → tokens ``(B, 1 + H/p * W/p, D)`` (position embedding resampled if needed)."""
        check_image(x, self.patch_size)
        x = self.patch_embed.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        pos = resample_pos_embed(self.pos_embed[0], self.grid, grid)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + pos.to(x.dtype)
        return self.norm_pre(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unrefined CLS feature after the final norm, ``(B, D)``."""
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x[:, 0])


def check_image(x: torch.Tensor, patch_size: int) -> None:
    """Raise :class:`ConfigError` unless ``x`` is ``(B, 3, H, W)`` with ``H`` and ``W`` multiples of the patch."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ConfigError(f"expected an image batch of shape (B, 3, H, W), got {tuple(x.shape)}")
    if x.shape[-1] % patch_size or x.shape[-2] % patch_size:
        raise ConfigError(
            f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {patch_size}; "
            "resize or crop the patches"
        )


def vision_kwargs(vcfg: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :class:`VisionTower` from a ``vision_cfg`` dict."""
    return {
        "image_size": int(vcfg["image_size"]),
        "patch_size": int(vcfg["patch_size"]),
        "width": int(vcfg["width"]),
        "layers": int(vcfg["layers"]),
        "heads": int(vcfg["heads"]),
        "mlp_ratio": float(vcfg.get("mlp_ratio", 4.0)),
        "qkv_bias": bool(vcfg.get("qkv_bias", True)),
        "ln_pre": bool(vcfg.get("ln_pre", False)),
        "norm_eps": float(vcfg.get("norm_eps", 1e-6)),
        "ls_init": vcfg.get("ls_init"),
    }


__all__ = [
    "Attention",
    "Block",
    "BlockOps",
    "LayerScale",
    "Mlp",
    "VisionTower",
    "check_image",
    "vision_kwargs",
]
