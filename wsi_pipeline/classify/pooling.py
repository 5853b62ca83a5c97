"""Slide-level zero-shot scores: projection, cosine similarity and top-K pooling.

:func:`score_slide` is the only path from stored patch features to a prediction. It takes
the *pre-projection* features together with their stored attributes and the model, and always
applies the model's projection and L2 normalisation itself; features marked
``projected=True`` (or not marked at all) are refused. Skipping the projection is the most
common zero-shot mistake (near-chance AUC), so there is no way to ask for it. For models with a
linear projection (``projection_matrix()``) the similarity is computed in an exact factored form
that halves the work; see :mod:`wsi_pipeline.classify.similarity`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import ConfigError, CorruptOutputError
from .similarity import similarity_for

_logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 50
STATUS_OK = "ok"
STATUS_NO_TISSUE = "no_tissue"


class ProjectionModel(Protocol):
    """What :func:`score_slide` needs from a model."""

    name: str
    weights_sha256: str | None
    logit_scale: torch.Tensor

    def project(self, features: torch.Tensor) -> torch.Tensor: ...

    # Optional: ``projection_matrix() -> (D, P) tensor`` when ``project(x) == normalize(x @ M)``.


def validate_ks(ks: int | Sequence[int]) -> tuple[int, ...]:
    """Normalise ``ks`` to a tuple of distinct positive ints (order kept; the first is primary)."""
    if isinstance(ks, (int, np.integer, str)) or not isinstance(ks, Iterable):
        values: tuple[Any, ...] = (ks,)
    else:
        values = tuple(ks)
    if not values:
        raise ConfigError("top-K: no K given; pass at least one positive integer")
    out: list[int] = []
    for k in values:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"top-K: {k!r} is not a positive integer; use e.g. 1, 5 or 50")
        if int(k) in out:
            raise ConfigError(f"top-K: K={k} given twice; list each K once")
        out.append(int(k))
    return tuple(out)


def topk_pool(sim: np.ndarray | torch.Tensor, ks: int | Sequence[int]) -> dict[int, np.ndarray]:
    """Per class, the mean of the ``min(K, N)`` largest similarities.

    Parameters
    ----------
    sim : array (N, C)
        Patch-to-class similarities, N >= 1.
    ks : int or sequence of int
        K values; several may be asked for at once.

    Returns
    -------
    dict
        K (as requested) -> float64 array ``(C,)``.
    """
    ks = validate_ks(ks)
    if isinstance(sim, torch.Tensor):
        sim = sim.detach().cpu().numpy()
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"topk_pool needs a non-empty (N, C) array, got shape {sim.shape}")
    n = sim.shape[0]
    k_max = min(max(ks), n)
    top = np.partition(sim, n - k_max, axis=0)[n - k_max :] if k_max < n else sim
    top = -np.sort(-top, axis=0)  # descending per class
    return {k: top[: min(k, n)].mean(axis=0) for k in ks}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class SlideScores:
    """Zero-shot result of one slide.

    ``pooled``, ``probabilities`` and ``predictions`` are keyed by the requested K; they are
    empty for a slide without patches (``status == "no_tissue"``). ``similarity`` holds the
    ``(N, C)`` cosine similarities (for heatmaps).
    """

    status: str
    class_names: tuple[str, ...]
    n_patches: int
    ks: tuple[int, ...]
    logit_scale: float
    similarity: np.ndarray = field(repr=False)
    pooled: dict[int, np.ndarray] = field(default_factory=dict)
    probabilities: dict[int, np.ndarray] = field(default_factory=dict)
    predictions: dict[int, str] = field(default_factory=dict)

    @property
    def primary_k(self) -> int:
        return self.ks[0]

    @property
    def prediction(self) -> str | None:
        """Predicted class at the primary K, or ``None`` for a slide without patches."""
        return self.predictions.get(self.primary_k)

    def k_used(self, k: int) -> int:
        """The K actually pooled: ``min(k, n_patches)``."""
        return min(k, self.n_patches)

    def record(self, k: int | None = None) -> dict[str, Any]:
        """One flat row (status, n_patches, k, k_used, prediction, score_<class>, prob_<class>)."""
        k = self.primary_k if k is None else k
        if k not in self.ks:
            raise ConfigError(f"K={k} was not scored; scored K values are {list(self.ks)}")
        row: dict[str, Any] = {
            "status": self.status,
            "n_patches": self.n_patches,
            "k": k,
            "k_used": self.k_used(k),
            "prediction": self.predictions.get(k),
        }
        pooled, probs = self.pooled.get(k), self.probabilities.get(k)
        for i, c in enumerate(self.class_names):
            row[f"score_{c}"] = None if pooled is None else float(pooled[i])
        for i, c in enumerate(self.class_names):
            row[f"prob_{c}"] = None if probs is None else float(probs[i])
        return row


def score_slide(
    features: np.ndarray | torch.Tensor,
    attrs: Mapping[str, Any],
    model: ProjectionModel,
    text_classifier: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    ks: int | Sequence[int] = (DEFAULT_TOP_K,),
    *,
    batch_size: int = 4096,
) -> SlideScores:
    """Score one slide from its stored pre-projection patch features.

    Parameters
    ----------
    features : array (N, D)
        Pre-projection patch features as stored by ``embed``.
    attrs : mapping
        The features' stored attributes; must say ``projected=False``. ``weights_sha256``
        (absent or ``"none ..."`` = random init) must match the model's; ``embed_dim``, when
        present, must match ``features``.
    model : ProjectionModel
        Supplies ``project`` (features -> L2-normalised joint space) and ``logit_scale`` (log).
    text_classifier : array (C, E)
        From :func:`~wsi_pipeline.classify.textclassifier.build_text_classifier`.
    class_names : sequence of str
        Row names of ``text_classifier``.
    ks : int or sequence of int
        Top-K values; the first is the primary K.

    Returns
    -------
    SlideScores
        Cosine similarities, pooled scores, ``softmax(logit_scale.exp() * pooled)`` and argmax
        per K; ``status="no_tissue"`` and no prediction when N == 0.
    """
    return score_slide_sets(features, attrs, model, [text_classifier], class_names, ks, batch_size=batch_size)[0]


def score_slide_sets(
    features: np.ndarray | torch.Tensor,
    attrs: Mapping[str, Any],
    model: ProjectionModel,
    text_classifiers: Sequence[np.ndarray | torch.Tensor],
    class_names: Sequence[str],
    ks: int | Sequence[int] = (DEFAULT_TOP_K,),
    *,
    batch_size: int = 4096,
    embeddings: np.ndarray | None = None,
) -> list[SlideScores]:
    """:func:`score_slide` for several text classifiers of the same classes, projecting once.

    The features are projected and normalised once and compared with all classifiers in one
    matrix product (e.g. the full prompt ensemble plus MI-Zero-style single-synonym sets).
    Returns one :class:`SlideScores` per classifier, in order; each equals what
    :func:`score_slide` gives for that classifier alone.

    ``embeddings`` ``(N, P)``: the slide's stored projected, L2-normalised embeddings (checked
    against the model by the caller, see :mod:`.scoring`); the similarity is then one
    ``N × P × C`` product and ``features`` are not used beyond their attributes.
    """
    ks = validate_ks(ks)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    class_names = tuple(class_names)
    n_cls = len(class_names)
    if not text_classifiers:
        raise ConfigError("no text classifier given; build one from the prompt file")
    _check_attrs(attrs, model)
    blocks = [torch.as_tensor(w).detach().float().cpu() for w in text_classifiers]
    for w in blocks:
        if w.ndim != 2 or w.shape[0] != n_cls or w.shape[1] != blocks[0].shape[1]:
            raise ConfigError(
                f"text classifier has shape {tuple(w.shape)} but {n_cls} class names were given; "
                "build it from the same prompt file"
            )
    weights = torch.cat(blocks)
    if embeddings is not None:
        features = embeddings  # only its row count and shape are used before the product below
    feats = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features).detach()
    scale = float(torch.as_tensor(model.logit_scale).detach().float().exp().cpu())
    n = int(feats.shape[0]) if feats.ndim >= 1 else 0
    if n == 0:
        _logger.debug("slide has no patches: status %s", STATUS_NO_TISSUE)
        empty = np.zeros((0, n_cls))
        return [SlideScores(STATUS_NO_TISSUE, class_names, 0, ks, scale, empty) for _ in blocks]
    if feats.ndim != 2:
        raise CorruptOutputError(f"features must be a 2-D (patches, dim) array, got shape {tuple(feats.shape)}")
    if embeddings is None and "embed_dim" in attrs and int(attrs["embed_dim"]) != feats.shape[1]:
        raise CorruptOutputError(
            f"features have dim {feats.shape[1]} but their attrs say embed_dim={int(attrs['embed_dim'])}; re-run embed"
        )
    if embeddings is not None:  # already projected and normalised: one product
        # torch converts float16 with F16C instructions (numpy does not: 4x slower at 10,000 x 768)
        sim_all = (torch.from_numpy(np.ascontiguousarray(embeddings)).float() @ weights.T).numpy()
        # a NaN or inf anywhere in a row makes every similarity of that row non-finite: check the (N, C) result
        if not np.isfinite(sim_all).all():
            raise CorruptOutputError("stored embeddings contain NaN or inf values; re-run embed for this slide")
    else:
        if not _all_finite(feats):
            raise CorruptOutputError("features contain NaN or inf values; re-run embed for this slide")
        sim_all = similarity_for(model, weights, batch_size)(feats)
    pooled_all = topk_pool(sim_all, ks)
    out = []
    for i in range(len(blocks)):
        cols = slice(i * n_cls, (i + 1) * n_cls)
        sim = sim_all[:, cols]
        pooled = {k: p[cols] for k, p in pooled_all.items()}
        probs = {k: softmax(scale * p) for k, p in pooled.items()}
        preds = {k: class_names[int(np.argmax(p))] for k, p in pooled.items()}
        out.append(SlideScores(STATUS_OK, class_names, n, ks, scale, sim, pooled, probs, preds))
    return out


def _all_finite(t: torch.Tensor) -> bool:
    """``isfinite(t).all()``; numpy on CPU (several times faster than torch's there)."""
    if t.device.type == "cpu":
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


def _check_attrs(attrs: Mapping[str, Any], model: ProjectionModel) -> None:
    if "projected" not in attrs:
        raise ConfigError(
            "features carry no 'projected' attribute, so they may already be projected; "
            "classify features written by wsi-pipeline embed (stored pre-projection)"
        )
    if _as_bool(attrs["projected"], "projected"):
        raise ConfigError(
            "features are marked projected=True; zero-shot scoring applies the projection itself and "
            "needs pre-projection features: re-run embed without projection"
        )
    stored, expected = _weights_hash(attrs.get("weights_sha256")), _weights_hash(getattr(model, "weights_sha256", None))
    if stored != expected:
        raise ConfigError(
            f"features were embedded with weights {stored or 'random init'} but the model has "
            f"{expected or 'random init'}; classify with the model (weights) that embedded them"
        )


def _weights_hash(value: Any) -> str | None:
    """A weights hash, or ``None`` for none/random initialisation (``"none (random init ...)"``)."""
    if isinstance(value, bytes):
        value = value.decode()
    text = "" if value is None else str(value).strip()
    return None if not text or text.lower().startswith("none") else text


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        return bool(value)
    text = value.decode() if isinstance(value, bytes) else str(value)
    if text.strip().lower() in ("true", "1", "yes"):
        return True
    if text.strip().lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"features attribute {key}={value!r} is not a boolean; re-run embed")


__all__ = [
    "DEFAULT_TOP_K",
    "STATUS_NO_TISSUE",
    "STATUS_OK",
    "ProjectionModel",
    "SlideScores",
    "score_slide",
    "score_slide_sets",
    "softmax",
    "topk_pool",
    "validate_ks",
]
