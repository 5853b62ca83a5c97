"""ConVLM: a CLIP-style model whose ViT refines its tokens under guidance of a text context.

Forward pass of the vision tower (see :mod:`wsi_pipeline.model.refine` for the token rules):

* **Pruning blocks** (``refine_layers``, default ``cfg.refine.layers``): after the attention
  residual and before the MLP, keep the ``ceil(keep_rate * M)`` image tokens with the
  highest head-averaged CLS attention and fuse the rest into one token (EViT).
* **Guided blocks** (``cfg.refine.layers``; they own a context MLP ``g_b``): when a context
  ``c`` (a vector in the joint text space) is given, the CLS query of every head becomes
  ``(1 - alpha) * q_cls + alpha * g_b(c)``, with ``g_b = Linear(proj_dim, hidden) → GELU →
  Linear(hidden, width)`` reshaped to ``heads × head_dim``. The output is signed and
  unbounded like ``q`` itself (the authors' Sigmoid output and hard-coded 1024-d input are
  not reproduced). The mixed query is used for the whole attention of that block (the CLS
  update and the pruning scores). ``context=None`` skips the mixing, which is exactly
  ``alpha = 0``.
* Attention outputs always come from ``scaled_dot_product_attention``; in a pruning block
  the CLS row of the attention probabilities is computed explicitly (the full ``N × N``
  matrix is never materialised). With ``keep_rate = 1`` no token is dropped and, without a
  context, the forward pass is exactly the unrefined ViT.

The pre-projection feature is the CLS token after the final LayerNorm (``embed_dim`` wide)
for ViT backbones that pool with their class token; backbones with another pooling (CONCH's
attentional pooler) override :meth:`ConVLM._pool`. :meth:`ConVLM.project` maps the feature to
the joint space and L2-normalises it.

The context MLPs live in ``model.context_mlp`` (block index → ``g_b``). The native ViT owns them
(they are part of its checkpoint); any backbone can get them from a *context adapter* file
(:mod:`wsi_pipeline.model.adapter`), which replaces the native ones.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import nn

from ..errors import ConfigError
from .refine import cls_attention, keep_and_fuse, mix_cls_query, num_kept, validate_schedule
from .vit import BlockOps, VisionTower, vision_kwargs

LOGIT_SCALE_INIT = math.log(1 / 0.07)


@dataclass
class RefineAux:
    """Auxiliary outputs of :meth:`ConVLM.forward_features` (for training losses and heatmaps).

    Attributes
    ----------
    context_out
        Block index → ``g_b(c)``, ``(B, width)``; only for guided blocks and only with a context
        (the target of the L1 term against the CLS feature).
    cls_query
        Block index → the CLS query **before** context mixing, heads concatenated, ``(B, width)``;
        for every guided or pruning block (input of a CLS-to-text regression head).
    kept_index
        Block index → ``(B, k)`` original patch indices (row-major in the patch grid) of the image
        tokens kept there, in sequence order; ``-1`` marks a fused token from an earlier block.
    num_tokens
        Sequence length (CLS and fused token included) after every block.
    cls_token
        The final CLS token after the backbone's final norm, ``(B, width)``: the target of the
        L1 term against ``g_b(c)``. It is the feature itself for CLS-pooled ViTs; for a
        backbone with another pooling (CONCH) it is the width-wide CLS token.
    """

    context_out: dict[int, torch.Tensor] = field(default_factory=dict)
    cls_query: dict[int, torch.Tensor] = field(default_factory=dict)
    kept_index: dict[int, torch.Tensor] = field(default_factory=dict)
    num_tokens: list[int] = field(default_factory=list)
    cls_token: torch.Tensor | None = None


class ContextMLP(nn.Sequential):
    """``g_b``: joint-space context → one CLS query offset per head (flattened to ``width``)."""

    def __init__(self, proj_dim: int, hidden: int, width: int) -> None:
        super().__init__(nn.Linear(proj_dim, hidden), nn.GELU(), nn.Linear(hidden, width))
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)


@lru_cache(maxsize=8)
def clip_tokenizer(context_length: int) -> SimpleTokenizer:
    """open_clip's BPE tokenizer (vocab ships with open_clip; nothing is downloaded)."""
    return SimpleTokenizer(context_length=context_length)


class ConVLM(nn.Module):
    """Base class: the refinement loop and the public API shared by all ConVLM backbones.

    Subclasses provide the vision embedding, the blocks (:class:`~wsi_pipeline.model.vit.BlockOps`),
    the final norm, the projection and the text tower.

    Attributes
    ----------
    name, cfg
        Registry name and architecture config (dict).
    embed_dim, proj_dim
        Pre-projection feature width and joint image-text width.
    width
        Token width of the vision transformer (equal to ``embed_dim`` unless the backbone pools
        into another width, as CONCH's attentional pooler does); context MLPs output this.
    input_size, mean, std
        Native input size (px) and normalisation constants for the embed stage.
    keep_rate, refine_layers
        Default refinement schedule (``cfg.refine``).
    context_alpha
        Mixing weight of the context guidance.
    weights_sha256, weights_path
        sha256 and path of the loaded weights file, or ``None`` for a random init.
    adapter_sha256
        sha256 of the context adapter file loaded on top (``None``: none).
    full_training
        Whether ``train`` may fit the whole model (class attribute). Backbones that keep a
        released text tower with its own tokenizer (CONCH, HF CLIP) set it to ``False``: only
        a context adapter is trained on them.
    """

    full_training: bool = True

    def __init__(
        self,
        name: str,
        cfg: dict[str, Any],
        *,
        embed_dim: int,
        proj_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        width: int | None = None,
    ) -> None:
        super().__init__()
        refine, pre = cfg["refine"], cfg["preprocess"]
        self.name = name
        self.cfg = cfg
        self.embed_dim = int(embed_dim)
        self.width = int(embed_dim if width is None else width)
        self.proj_dim = int(proj_dim)
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.patch_size = int(patch_size)
        self.input_size = int(pre["input_size"])
        self.mean = tuple(float(v) for v in pre["mean"])
        self.std = tuple(float(v) for v in pre["std"])
        self.keep_rate = float(refine["keep_rate"])
        self.refine_layers = tuple(int(i) for i in refine["layers"])
        self.context_alpha = float(refine["alpha"])
        self.weights_sha256: str | None = None
        self.weights_path: str | None = None
        self.adapter_sha256: str | None = None

    # ------------------------------------------------------------------ backbone hooks
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _blocks(self) -> Sequence[BlockOps]:
        raise NotImplementedError

    def _final_norm(self, cls: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final tokens ``(B, N, width)`` → pre-projection feature ``(B, embed_dim)``: the normed CLS token."""
        return self._final_norm(tokens[:, 0])

    def _context_mlps(self) -> dict[int, nn.Module]:
        """Guided block index → its context MLP (empty when the backbone has none)."""
        mlps = getattr(self, "context_mlp", None)
        return {int(k): m for k, m in mlps.items()} if mlps is not None else {}

    def set_context_mlps(self, mlps: nn.ModuleDict, alpha: float) -> None:
        """Install context MLPs (``str(block) → g_b``) with mixing weight ``alpha``, replacing any others.

        For the native ViT they replace its own (part of its checkpoint); for every other
        backbone they sit beside :attr:`state_module`, so the released checkpoint format is
        unchanged. Used by :func:`wsi_pipeline.model.adapter.load_adapter`.
        """
        bad = [k for k in mlps if not 0 <= int(k) < self.depth]
        if bad:
            raise ConfigError(f"context MLPs at blocks {bad} are outside {self.name}'s blocks 0..{self.depth - 1}")
        self.context_mlp = mlps
        self.context_alpha = float(alpha)

    @property
    def state_module(self) -> nn.Module:
        """The module whose ``state_dict`` is the checkpoint format of this model."""
        return self

    def projection_matrix(self) -> torch.Tensor:
        """The image projection ``(embed_dim, proj_dim)``: ``project(x) == normalize(x @ M)``."""
        raise NotImplementedError

    def definition_files(self, part: str) -> list[Path]:
        """Files besides the weights that define the model's ``part``: ``"image"`` (what the
        features depend on) or ``"text"`` (what the text embeddings depend on). None for models
        whose code defines them; a released folder's config and tokenizer files otherwise."""
        return []

    def definition_sha256(self, part: str) -> str | None:
        """sha256 over the names and bytes of :meth:`definition_files`, or ``None`` when there are
        none: keys that must change when such a file does (feature ``model_id``, text cache)."""
        known = vars(self).setdefault("_definition_sha256", {})  # once per part: files may be MBs
        if part not in known:
            files = self.definition_files(part)
            h = hashlib.sha256()
            for f in files:
                h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
            known[part] = h.hexdigest() if files else None
        return known[part]

    def projection_sha256(self) -> str:
        """sha256 of the projection matrix (fp32, C order): ties stored embeddings to the projection
        that made them (a fine-tuned head or other weights give another digest)."""
        w = self.projection_matrix().detach().to("cpu", torch.float32).contiguous()
        return hashlib.sha256(w.numpy().tobytes()).hexdigest()

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-projection features ``(B, embed_dim)`` → L2-normalised joint embeddings ``(B, proj_dim)``."""
        if features.shape[-1] != self.embed_dim:
            raise ConfigError(
                f"features have width {features.shape[-1]} but {self.name} projects {self.embed_dim}-d CLS "
                "features; use the model that produced them"
            )
        w = self.projection_matrix()
        return F.normalize(features.to(device=w.device, dtype=w.dtype) @ w, dim=-1)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Token ids ``(B, context_length)`` → text embeddings ``(B, proj_dim)``."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Texts → ``LongTensor (len(texts), context_length)`` with open_clip's BPE tokenizer."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared API
    def encode_prompts(self, texts: Sequence[str] | str) -> torch.Tensor:
        """L2-normalised text embeddings of ``texts`` (no grad), ``(len(texts), proj_dim)``."""
        with torch.no_grad():
            return self.encode_text(self.tokenize(texts), normalize=True)

    def encode_image(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        project: bool = False,
        keep_rate: float | None = None,
        refine_layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """CLS features ``(B, embed_dim)``, or L2-normalised ``(B, proj_dim)`` with ``project=True``.

        Parameters
        ----------
        x
            Normalised image batch ``(B, 3, H, W)``; sides must be multiples of the patch size
            (other sizes than ``input_size`` resample the position embedding bicubically).
        context
            ``(proj_dim,)`` or ``(B, proj_dim)`` vector in the joint text space, or ``None``.
        keep_rate, refine_layers
            Override the default refinement schedule; ``keep_rate=1.0`` switches pruning off.
        """
        feats = self.forward_features(x, context, keep_rate, refine_layers)
        return self.project(feats) if project else feats

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        project: bool = False,
        keep_rate: float | None = None,
        refine_layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Same as :meth:`encode_image`."""
        return self.encode_image(x, context, project, keep_rate, refine_layers)

    def forward_features(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        keep_rate: float | None = None,
        refine_layers: Sequence[int] | None = None,
        return_aux: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, RefineAux]:
        """The refined CLS feature ``(B, embed_dim)``; with ``return_aux`` also a :class:`RefineAux`."""
        keep, layers = self._schedule(keep_rate, refine_layers)
        x = x.to(self._param_dtype()) if x.is_floating_point() else x
        tokens = self._embed(x)
        b, n, _ = tokens.shape
        guides = self._guides(context, b)
        aux = RefineAux()
        mlps = self._context_mlps()
        idx = torch.arange(n - 1, device=tokens.device).expand(b, -1)
        for i, ops in enumerate(self._blocks()):
            m = tokens.shape[1] - 1
            n_keep = num_kept(m, keep) if i in layers else m
            guide = guides.get(i)
            if n_keep >= m and guide is None and not (return_aux and (i in mlps or i in layers)):
                tokens = ops.plain(tokens)
            else:
                tokens, idx = self._refining_step(
                    ops, tokens, idx, guide, n_keep if n_keep < m else None, aux if return_aux else None, i
                )
            aux.num_tokens.append(tokens.shape[1])
        feats = self._pool(tokens)
        if return_aux:
            aux.context_out = {i: g.flatten(1) for i, g in guides.items()}
            aux.cls_token = self._final_norm(tokens[:, 0])
            return feats, aux
        return feats

    # ------------------------------------------------------------------ internals
    def _param_dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def _schedule(
        self, keep_rate: float | None, refine_layers: Sequence[int] | None
    ) -> tuple[float, frozenset[int]]:
        keep = self.keep_rate if keep_rate is None else keep_rate
        layers = self.refine_layers if refine_layers is None else refine_layers
        try:
            layers = tuple(operator.index(i) for i in layers)
        except TypeError as e:
            raise ConfigError(f"refine layers must be integers, got {layers!r}") from e
        validate_schedule(keep, layers, self.depth)
        return float(keep), frozenset(layers)

    def _guides(self, context: torch.Tensor | None, batch: int) -> dict[int, torch.Tensor]:
        """Block index → ``g_b(c)`` reshaped to ``(B, heads, head_dim)``; empty without a context."""
        if context is None:
            return {}
        mlps = self._context_mlps()
        if not mlps:
            raise ConfigError(f"model {self.name} has no context MLPs; pass context=None (--context none)")
        c = torch.as_tensor(context)
        if c.ndim == 1:
            c = c.unsqueeze(0)
        if c.ndim != 2 or c.shape[-1] != self.proj_dim or c.shape[0] not in (1, batch):
            raise ConfigError(
                f"context must have shape ({self.proj_dim},) or ({batch}, {self.proj_dim}), got {tuple(c.shape)}; "
                f"use a text embedding of {self.name}"
            )
        if c.device.type != "meta" and not bool(torch.isfinite(c).all()):
            raise ConfigError("context vector contains NaN or inf; rebuild it from the prompt file")
        out = {}
        hd = self.width // self.num_heads
        for i, mlp in mlps.items():
            w = next(mlp.parameters())
            g = mlp(c.to(device=w.device, dtype=w.dtype))
            out[i] = g.reshape(g.shape[0], self.num_heads, hd).expand(batch, -1, -1)
        return out

    def _refining_step(
        self,
        ops: BlockOps,
        x: torch.Tensor,
        idx: torch.Tensor,
        guide: torch.Tensor | None,
        n_keep: int | None,
        aux: RefineAux | None,
        block: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = ops.qkv(ops.norm1(x))
        if aux is not None:
            aux.cls_query[block] = q[:, :, 0].flatten(1)
        if guide is not None:
            q = mix_cls_query(q, guide, self.context_alpha)
        x = x + ops.attn_out(F.scaled_dot_product_attention(q, k, v))
        if n_keep is not None:
            x, idx, kept = keep_and_fuse(x, cls_attention(q, k), n_keep, idx)
            if aux is not None:
                aux.kept_index[block] = kept
        return x + ops.mlp_branch(x), idx


class ViTConVLM(ConVLM):
    """Native ConVLM: :class:`~wsi_pipeline.model.vit.VisionTower`, open_clip ``TextTransformer``,
    linear image projection, context MLPs at ``cfg.refine.layers`` and a learned ``logit_scale``.

    Text tower init is open_clip's; ``image_projection`` is normal with std ``width**-0.5``;
    ``logit_scale`` starts at ``ln(1/0.07)``. Nothing is seeded here.
    """

    def __init__(self, name: str, cfg: dict[str, Any]) -> None:
        v, t, r = cfg["vision_cfg"], cfg["text_cfg"], cfg["refine"]
        super().__init__(
            name,
            cfg,
            embed_dim=v["width"],
            proj_dim=cfg["embed_dim"],
            depth=v["layers"],
            num_heads=v["heads"],
            patch_size=v["patch_size"],
        )
        self.visual = VisionTower(**vision_kwargs(v))
        self.image_projection = nn.Parameter(torch.empty(self.embed_dim, self.proj_dim))
        nn.init.normal_(self.image_projection, std=self.embed_dim**-0.5)
        self.context_mlp = nn.ModuleDict(
            {
                str(i): ContextMLP(
                    self.proj_dim, int(r.get("context_hidden", self.embed_dim)), self.embed_dim
                )
                for i in r["layers"]
            }
        )
        self.text = TextTransformer(
            context_length=int(t["context_length"]),
            vocab_size=int(t["vocab_size"]),
            width=int(t["width"]),
            heads=int(t["heads"]),
            layers=int(t["layers"]),
            mlp_ratio=float(t.get("mlp_ratio", 4.0)),
            output_dim=self.proj_dim,
        )
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.context_length = int(t["context_length"])

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.embed(x)

    def _blocks(self) -> Sequence[BlockOps]:
        return self.visual.blocks  # type: ignore[return-value]

    def _final_norm(self, cls: torch.Tensor) -> torch.Tensor:
        return self.visual.norm(cls)

    def projection_matrix(self) -> torch.Tensor:
        return self.image_projection

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self.text(tokens.to(self.text.token_embedding.weight.device))
        return F.normalize(emb, dim=-1) if normalize else emb

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        return clip_tokenizer(self.context_length)([texts] if isinstance(texts, str) else list(texts))


__all__ = ["LOGIT_SCALE_INIT", "ConVLM", "ContextMLP", "RefineAux", "ViTConVLM", "clip_tokenizer"]
