"""Token refinement (EViT keep-and-fuse) and context-guided CLS queries, as pure tensor functions.

Conventions used throughout :mod:`wsi_pipeline.model`:

* A token sequence is ``(B, N, D)`` with the CLS token first, so it holds ``M = N - 1``
  *image tokens*. A fused token made by an earlier refining block is an ordinary image
  token from then on (it can be kept or fused again).
* At a refining block with keep rate ``r`` the ``k = ceil(r * M)`` image tokens with the
  highest head-averaged CLS attention are kept (``ceil`` with a 1e-9 tolerance: ``0.55 * 100``
  is 55.00000000000001 in floating point and keeps 55, not 56). If ``k >= M`` the block does
  not refine at all.
* Kept tokens stay in their **incoming sequence order** (the top-k indices are sorted),
  so a run is deterministic and position information stays with each token.
* The dropped tokens are fused into one token ``sum_i a_i x_i`` appended at the end, with
  ``a_i`` the **unnormalised** CLS attention of token ``i`` (the softmax over all ``N``
  keys, averaged over heads), exactly as EViT does. The fused token's norm thus shrinks
  with the attention mass of what was dropped.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError

_CEIL_TOL = 1e-9


def num_kept(num_image_tokens: int, keep_rate: float) -> int:
    """Number of image tokens a refining block keeps: ``ceil(keep_rate * M)`` (at least 1)."""
    if num_image_tokens <= 0:
        return 0
    return max(1, min(num_image_tokens, math.ceil(keep_rate * num_image_tokens - _CEIL_TOL)))


def token_schedule(
    num_patches: int, depth: int, keep_rate: float, refine_layers: Sequence[int]
) -> list[tuple[int, int]]:
    """Sequence lengths (CLS included) seen by every block: ``[(attention_len, mlp_len), ...]``.

    A refining block runs attention on the incoming tokens and its MLP on the refined ones
    (kept + one fused token). At 224 px / patch 16 with keep 0.7 at (3, 6, 9) the lengths
    are 197 → 140 → 100 → 72, as in the EViT paper.
    """
    validate_schedule(keep_rate, refine_layers, depth)
    layers = set(refine_layers)
    out: list[tuple[int, int]] = []
    m = num_patches
    for i in range(depth):
        n_in = m + 1
        if i in layers:
            k = num_kept(m, keep_rate)
            if k < m:
                m = k + 1
        out.append((n_in, m + 1))
    return out


def validate_schedule(keep_rate: float, refine_layers: Sequence[int], depth: int) -> None:
    """Raise :class:`ConfigError` unless ``0 < keep_rate <= 1`` and every layer is in ``[0, depth)``."""
    if (
        isinstance(keep_rate, bool)
        or not isinstance(keep_rate, numbers.Real)
        or not 0.0 < float(keep_rate) <= 1.0
    ):
        raise ConfigError(f"keep rate must be in (0, 1], got {keep_rate!r}; use 1.0 to switch refinement off")
    bad = [
        layer
        for layer in refine_layers
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < depth
    ]
    if bad:
        raise ConfigError(
            f"refine layers {bad} are outside the model's blocks 0..{depth - 1}; pick 0-based block indices"
        )


def mix_cls_query(q: torch.Tensor, guide: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return ``q`` with its CLS query replaced by ``(1 - alpha) * q_cls + alpha * guide``.

    Parameters
    ----------
    q
        Queries ``(B, H, N, hd)``, CLS at position 0.
    guide
        Context-MLP output reshaped per head, ``(B, H, hd)``.
    alpha
        Mixing weight in ``[0, 1]``.
    """
    q_cls = (1.0 - alpha) * q[:, :, 0] + alpha * guide.to(q.dtype)
    return torch.cat([q_cls.unsqueeze(2), q[:, :, 1:]], dim=2)


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Head-averaged CLS→image-token attention probabilities ``(B, N - 1)``, in float32.

    The CLS row of ``softmax(q k^T * scale)`` is computed explicitly over all ``N`` keys
    (CLS included), averaged over heads, and the CLS column is dropped; the values are not
    renormalised.
    """
    hd = q.shape[-1]
    scale = hd**-0.5 if scale is None else scale
    logits = (q[:, :, :1].float() @ k.float().transpose(-2, -1)) * scale  # (B, H, 1, N)
    probs = logits.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, N)
    return probs[:, 1:]


def keep_and_fuse(
    x: torch.Tensor, cls_attn: torch.Tensor, n_keep: int, token_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``n_keep`` most attended image tokens and fuse the others into one token.

    Parameters
    ----------
    x
        Tokens ``(B, N, D)`` after the attention residual (CLS first).
    cls_attn
        ``(B, N - 1)`` head-averaged CLS attention of the image tokens (see :func:`cls_attention`).
    n_keep
        How many image tokens to keep, ``1 <= n_keep < N - 1``.
    token_index
        ``(B, N - 1)`` original patch index of every image token (``-1`` for a fused token).

    Returns
    -------
    x_new
        ``(B, n_keep + 2, D)``: CLS, kept tokens in incoming order, fused token.
    index_new
        ``(B, n_keep + 1)`` original patch indices of the new image tokens (fused = -1).
    kept
        ``(B, n_keep)`` original patch indices of the kept tokens.
    """
    b, n, d = x.shape
    m = n - 1
    if not 1 <= n_keep < m:
        raise ValueError(f"n_keep must be in [1, {m - 1}], got {n_keep}")
    img = x[:, 1:]
    top = cls_attn.topk(n_keep, dim=1, sorted=False).indices.sort(dim=1).values  # (B, k)
    kept_tokens = img.gather(1, top.unsqueeze(-1).expand(-1, -1, d))
    dropped = torch.ones(b, m, dtype=torch.bool, device=x.device).scatter_(1, top, False)
    weights = (cls_attn * dropped).to(x.dtype)  # zero for kept tokens, unnormalised otherwise
    fused = torch.einsum("bm,bmd->bd", weights, img).unsqueeze(1)
    x_new = torch.cat([x[:, :1], kept_tokens, fused], dim=1)
    kept = token_index.gather(1, top)
    index_new = torch.cat([kept, kept.new_full((b, 1), -1)], dim=1)
    return x_new, index_new, kept


def resample_pos_embed(
    pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Bicubically resample a ``(1 + H*W, D)`` position embedding (CLS row first) to a new grid.

    Uses ``antialias=True`` and float32 internally (the same recipe as timm's
    ``resample_abs_pos_embed``); returns ``pos`` unchanged when the grid is the same.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    d = pos.shape[-1]
    cls, grid = pos[:1], pos[1:]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, d).to(pos.dtype)
    return torch.cat([cls, grid], dim=0)


__all__ = [
    "cls_attention",
    "keep_and_fuse",
    "mix_cls_query",
    "num_kept",
    "resample_pos_embed",
    "token_schedule",
    "validate_schedule",
]
