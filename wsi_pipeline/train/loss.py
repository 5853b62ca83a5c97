"""The ConVLM training objective.

``L = w_align · CE(s · cos(project(f), T), y) + w_context · Σ_b L1(g_b(c), sg[f])
      + w_cls · Σ_b L1(h_b(q_cls,b), sg[T_y]) + w_text · CE(s_t · cos(e_i, T^-i), class(i))``

* ``f`` is the refined CLS feature (:meth:`ConVLM.forward_features`), ``project`` the
  model's projection + L2 norm, ``T`` the ``(C, proj_dim)`` class text embeddings of this
  step (each the normalised mean of freshly sampled prompts, so the text tower learns),
  ``s = exp(logit_scale)`` (clamped to 100, as CLIP does).
* **Context** ``c`` fed to the guided blocks comes from a registered *context mode*
  (:data:`CONTEXT_MODES`). The paper feeds the true class's text embedding while training,
  which leaks the label and never happens at inference; the default ``agnostic`` mode
  feeds what inference feeds (the normalised mean of the class embeddings, or the
  embedding of the prompt file's ``context`` sentence when it has one; the latter is
  applied by the training loop).
* ``g_b(c)`` are the context-MLP outputs of the guided blocks (their L1 target ``f`` is the final
  CLS token, which is the feature itself except for attention-pooled backbones) and ``h_b`` small linear
  heads (training only, :class:`ClsRegressionHeads`) that regress the pre-mixing CLS query of
  every refining block onto the class text embedding. ``sg`` is stop-gradient: the L1 terms
  train the context MLPs and the regression heads (and, through ``q_cls``, the vision
  tower) but never pull the CLS feature or the text embeddings towards a shared target.
  A weight of 0 skips a term.
* The last term is **not in the paper** (whose text embeddings come from a frozen,
  pre-trained tower): every sampled prompt embedding ``e_i`` is classified against the
  class embeddings, its own class's computed without it (leave-one-out), with a fixed
  scale ``s_t = 1 / 0.07``. A text tower trained from scratch otherwise first lowers the
  alignment loss by collapsing all class embeddings onto one vector (loss = ln C), from
  which it recovers only slowly; this term keeps the classes apart and teaches the tower
  which synonyms belong together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

#: CLIP's cap on the learned temperature: exp(logit_scale) <= 100.
MAX_LOGIT_SCALE = math.log(100.0)
#: Fixed scale of the prompt-consistency term.
TEXT_SCALE = 1.0 / 0.07

#: ``(class_emb (C, D), labels (B,), generator) -> context (B, D) or (D,) or None``.
ContextFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], "torch.Tensor | None"]


def agnostic_context(class_emb: torch.Tensor) -> torch.Tensor:
    """The label-agnostic context used at inference: normalised mean of the class embeddings."""
    return F.normalize(class_emb.mean(dim=0), dim=-1)


def _ctx_agnostic(class_emb: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return agnostic_context(class_emb.detach())


def _ctx_label(class_emb: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return class_emb.detach()[labels]


def _ctx_none(class_emb: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> None:
    return None


def _ctx_mix(class_emb: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per image: the label's own context with probability 1/2, else the agnostic one."""
    use_label = torch.rand(labels.shape, generator=gen) < 0.5
    emb = class_emb.detach()
    return torch.where(use_label[:, None], emb[labels], agnostic_context(emb).expand(len(labels), -1))


#: Registered context modes (``--context-mode``).
CONTEXT_MODES: dict[str, ContextFn] = {
    "agnostic": _ctx_agnostic,
    "label": _ctx_label,
    "none": _ctx_none,
    "mix": _ctx_mix,
}


def context_fn(mode: str) -> ContextFn:
    """The context function of ``mode``; :class:`ConfigError` for an unknown mode."""
    if mode not in CONTEXT_MODES:
        raise ConfigError(f"unknown context mode {mode!r}; use one of {', '.join(CONTEXT_MODES)}")
    return CONTEXT_MODES[mode]


class ClsRegressionHeads(nn.Module):
    """``h_b``: one linear map per refining block, CLS query (``width``) → joint space (``proj_dim``).

    Training-only (the paper's ``Token_cls_reg``, without its output ReLU, which could not
    match signed embeddings); saved beside the model, not in it.
    """

    def __init__(self, blocks: list[int], width: int, proj_dim: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({str(b): nn.Linear(width, proj_dim) for b in blocks})
        for m in self.heads.values():
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, cls_query: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {int(b): h(cls_query[int(b)]) for b, h in self.heads.items() if int(b) in cls_query}


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three terms; 0 disables a term."""

    align: float = 1.0
    context_l1: float = 0.1
    cls_l1: float = 0.1
    text: float = 1.0

    def __post_init__(self) -> None:
        for name in ("align", "context_l1", "cls_l1", "text"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"loss weight {name} must be a finite number >= 0, got {v!r}")
        if self.align <= 0:
            raise ConfigError("the alignment loss weight must be > 0: it is the objective that trains the model")


@dataclass
class LossOutput:
    """Total loss, its weighted parts (floats, for the log) and the alignment logits."""

    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)
    logits: torch.Tensor | None = None


def class_embeddings(prompt_emb: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(C, D)``: per class the normalised mean of its normalised prompt embeddings (class-major rows)."""
    e = F.normalize(prompt_emb, dim=-1)
    return F.normalize(e.view(n_classes, -1, e.shape[-1]).mean(dim=1), dim=-1)


def prompt_consistency_loss(prompt_emb: torch.Tensor, n_classes: int) -> torch.Tensor:
    """CE of every prompt against the class embeddings, its own class left out of its own class's mean."""
    e = F.normalize(prompt_emb, dim=-1)
    n = e.shape[0] // n_classes
    if n < 2:
        raise ConfigError("the prompt-consistency term needs at least 2 prompts per class and step")
    sums = e.view(n_classes, n, -1).sum(dim=1)  # (C, D)
    labels = torch.arange(n_classes, device=e.device).repeat_interleave(n)
    logits = e @ F.normalize(sums, dim=-1).t()
    own = (e * F.normalize(sums[labels] - e, dim=-1)).sum(-1)
    logits = logits.scatter(1, labels[:, None], own[:, None])
    return F.cross_entropy(TEXT_SCALE * logits, labels)


def alignment_logits(model: nn.Module, feats: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale) · cos(project(feats), class_emb)``, shape ``(B, C)``."""
    scale = model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    return scale * model.project(feats) @ F.normalize(class_emb, dim=-1).t()


def convlm_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_emb: torch.Tensor,
    weights: LossWeights,
    *,
    context: torch.Tensor | None,
    heads: ClsRegressionHeads | None = None,
    prompt_emb: torch.Tensor | None = None,
) -> LossOutput:
    """The objective of the module docstring for one batch.

    Parameters
    ----------
    model
        A :class:`~wsi_pipeline.model.ConVLM` in train mode.
    images
        Normalised images ``(B, 3, S, S)``.
    labels
        Class indices ``(B,)`` into the rows of ``class_emb``.
    class_emb
        Class text embeddings ``(C, proj_dim)`` (with grad when the text tower trains).
    weights
        :class:`LossWeights`.
    context
        Context vector(s) for the guided blocks, or ``None``.
    heads
        CLS regression heads; required when ``weights.cls_l1 > 0``.
    prompt_emb
        The step's prompt embeddings ``(C * n, proj_dim)``, class-major, for the
        prompt-consistency term (``None`` skips it, e.g. with a frozen text tower).
    """
    need_aux = weights.context_l1 > 0 or weights.cls_l1 > 0
    out = model.forward_features(images, context=context, return_aux=need_aux)
    feats, aux = out if need_aux else (out, None)
    logits = alignment_logits(model, feats, class_emb)
    align = F.cross_entropy(logits, labels)
    total = weights.align * align
    parts = {"align": float(align.detach())}
    if aux is not None and weights.context_l1 > 0 and aux.context_out:
        target = aux.cls_token.detach()  # the feature itself for CLS-pooled ViTs
        l1 = torch.stack([F.l1_loss(g.to(target.dtype), target) for g in aux.context_out.values()]).sum()
        total = total + weights.context_l1 * l1
        parts["context_l1"] = float(l1.detach())
    if aux is not None and weights.cls_l1 > 0:
        if heads is None:
            raise ConfigError("cls_l1 > 0 needs CLS regression heads")
        target = F.normalize(class_emb.detach(), dim=-1)[labels]
        preds = heads(aux.cls_query)
        if preds:
            l1 = torch.stack([F.l1_loss(p, target) for p in preds.values()]).sum()
            total = total + weights.cls_l1 * l1
            parts["cls_l1"] = float(l1.detach())
    if prompt_emb is not None and weights.text > 0:
        lt = prompt_consistency_loss(prompt_emb, class_emb.shape[0])
        total = total + weights.text * lt
        parts["text"] = float(lt.detach())
    parts["total"] = float(total.detach())
    return LossOutput(total, parts, logits.detach())


__all__ = [
    "CONTEXT_MODES",
    "MAX_LOGIT_SCALE",
    "TEXT_SCALE",
    "ClsRegressionHeads",
    "LossOutput",
    "LossWeights",
    "agnostic_context",
    "alignment_logits",
    "class_embeddings",
    "prompt_consistency_loss",
    "context_fn",
    "convlm_loss",
]
