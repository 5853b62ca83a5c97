"""Cosine similarity of stored patch features with class embeddings, in the joint space.

``sim[i, c] = normalize(project(f_i)) · t_c``. For a model whose projection is linear,
``project(f) = normalize(f @ M)`` (every ConVLM, via :meth:`ConVLM.projection_matrix`),
this is computed exactly in a factored form instead of materialising the projected
``(N, P)`` matrix::

    numerator   f_i · (M t_c)                 one (N, D) x (D, C) product, C tiny
    ||f_i M||   = ||f_i R^T||                 with M^T = Q R (QR, R upper triangular D x D)

``R^T`` is lower triangular, so ``f @ R^T`` needs only the ``j:`` rows of ``f`` for column
block ``j``: half the multiply-adds of ``f @ M`` when ``P >= D``. (For ``P < D`` the full
``M`` is cheaper and used as is.) The factors are computed once per (model weights, text
classifier) in float64. The projection is still the model's own: the factored form is checked
against ``model.project`` on a fixed probe when it is prepared, and a model without
``projection_matrix`` goes through ``model.project`` in batches.

On CPU the products run through numpy's BLAS (OpenBLAS), on other devices through torch;
``benchmarks/classify_bench.py`` measures the two paths side by side.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

_logger = logging.getLogger(__name__)

#: Columns of ``R^T`` per product (timings are flat around this value; figures in the README).
COLUMN_BLOCK = 128
#: Patches per chunk on CPU, so each chunk of ``f`` stays in cache across the column blocks.
CPU_ROWS = 1024

_PREPARED: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


def model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (CPU/float32 without any)."""
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device, (p.dtype if p.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


class FactoredSimilarity:
    """Exact cosine similarity for a linear projection ``M`` (D, P) and class embeddings (C, P)."""

    def __init__(self, matrix: torch.Tensor, classes: torch.Tensor, device: torch.device,
                 backend: str | None = None) -> None:
        """``backend``: ``"numpy"`` (CPU only) or ``"torch"``; default numpy on CPU, torch elsewhere."""
        m = matrix.detach().to("cpu", torch.float64)
        t = F.normalize(classes.detach().to("cpu", torch.float64), dim=-1)
        d, p = m.shape
        if t.shape[1] != p:
            raise ConfigError(f"projected dim {p} != text classifier dim {t.shape[1]}; "
                              "build the text classifier with the model that embedded the features")
        self.dim = d
        if p >= d:
            lower = torch.linalg.qr(m.T, mode="r").R.T  # (D, D); ||f @ M|| == ||f @ lower||
            blocks = [(j, lower[j:, j : j + COLUMN_BLOCK]) for j in range(0, d, COLUMN_BLOCK)]
        else:
            blocks = [(0, m)]
        backend = backend or ("numpy" if device.type == "cpu" else "torch")
        if backend not in ("numpy", "torch") or (backend == "numpy" and device.type != "cpu"):
            raise ConfigError(f"similarity backend {backend!r} on {device.type}: use 'torch', or 'numpy' on cpu")
        self.numpy = backend == "numpy"
        self.rows = CPU_ROWS if device.type == "cpu" else 1 << 16
        self.device = device
        self.numerator = self._cast(m @ t.T)
        self.blocks = [(j, self._cast(b)) for j, b in blocks]

    def _cast(self, t: torch.Tensor) -> Any:
        t = t.to(torch.float32)
        return np.ascontiguousarray(t.numpy()) if self.numpy else t.to(self.device).contiguous()

    def __call__(self, feats: torch.Tensor) -> np.ndarray:
        """``(N, D)`` pre-projection features → ``(N, C)`` float64 cosine similarities."""
        if feats.shape[1] != self.dim:
            raise ConfigError(f"features of dim {feats.shape[1]} do not fit the projection ({self.dim}-d input); "
                              "classify with the model that embedded them")
        x = feats.to(torch.float32)
        x = x.numpy() if self.numpy else x.to(self.device, non_blocking=True)
        out = [np.zeros((0, self.numerator.shape[1]))]  # N = 0 gives (0, C)
        for start in range(0, x.shape[0], self.rows):
            chunk = x[start : start + self.rows]
            sq = None
            for j, b in self.blocks:
                y = chunk[:, j:] @ b
                # squared row norms; numpy's einsum needs no (rows, block) temporary for y * y
                part = np.einsum("ij,ij->i", y, y) if self.numpy else (y * y).sum(1)
                sq = part if sq is None else sq + part
            num = chunk @ self.numerator
            if self.numpy:
                out.append(num / np.sqrt(np.maximum(sq, 1e-24))[:, None])
            else:
                out.append((num / sq.clamp_min(1e-24).sqrt()[:, None]).cpu().numpy())
        return np.concatenate(out).astype(np.float64)


class ProjectSimilarity:
    """Generic path: ``model.project`` in batches, then the product with the class embeddings."""

    def __init__(self, model: Any, classes: torch.Tensor, batch_size: int) -> None:
        self.model, self.batch_size = model, batch_size
        self.device, self.dtype = model_device_dtype(model)
        self.classes = F.normalize(classes.detach().float().to(self.device), dim=-1)

    def __call__(self, feats: torch.Tensor) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, feats.shape[0], self.batch_size):
                x = feats[start : start + self.batch_size].to(device=self.device, dtype=self.dtype)
                try:
                    z = self.model.project(x)
                except RuntimeError as e:
                    raise ConfigError(
                        f"features of dim {feats.shape[1]} do not fit the projection of {self.model.name}: {e}; "
                        "classify with the model that embedded them"
                    ) from e
                if z.shape[-1] != self.classes.shape[1]:
                    raise ConfigError(
                        f"projected dim {z.shape[-1]} != text classifier dim {self.classes.shape[1]}; "
                        f"build the text classifier with {self.model.name}"
                    )
                z = z.float()
                # == F.normalize(z) @ classes.T, without materialising the normalised copy of z
                out.append(((z @ self.classes.T) / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu())
        return torch.cat(out).double().numpy()


def similarity_for(model: Any, classes: torch.Tensor, batch_size: int = 4096) -> FactoredSimilarity | ProjectSimilarity:
    """The similarity function of ``model`` and class embeddings ``(C, P)``; factored when exact.

    Prepared factors are cached per model (weakly) and reused while the projection matrix and
    the class embeddings are unchanged.
    """
    get_matrix = getattr(model, "projection_matrix", None)
    if not callable(get_matrix):
        return ProjectSimilarity(model, classes, batch_size)
    matrix = get_matrix()
    key = (matrix.data_ptr(), _matrix_version(matrix), tuple(matrix.shape),
           classes.detach().cpu().float().numpy().tobytes())
    try:
        cached = _PREPARED.get(model)
    except TypeError:  # not weak-referenceable: prepare every time
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    device, dtype = model_device_dtype(model)
    scorer: FactoredSimilarity | ProjectSimilarity
    if _agrees_with_project(model, matrix, device, dtype):
        scorer = FactoredSimilarity(matrix, classes, device)
    else:
        _logger.warning("%s: projection_matrix() disagrees with project(); scoring through project()",
                        getattr(model, "name", type(model).__name__))
        scorer = ProjectSimilarity(model, classes, batch_size)
    try:
        _PREPARED[model] = (key, scorer)
    except TypeError:
        pass
    return scorer


def _matrix_version(matrix: torch.Tensor) -> tuple[str, object]:
    """What changes when ``matrix`` is modified in place: torch's private version counter
    ``Tensor._version`` while it is there and counts in-place writes (checked on a scratch
    tensor each time: microseconds), else a digest of the values (inference tensors have
    no counter either)."""
    if _version_counter_counts():
        try:
            return "version", int(matrix._version)
        except (AttributeError, RuntimeError, TypeError):
            pass
    raw = matrix.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return "digest", hashlib.blake2b(raw.tobytes(), digest_size=16).hexdigest()


def _version_counter_counts() -> bool:
    """Whether ``Tensor._version`` exists and grows with an in-place write."""
    probe = torch.zeros(1)
    try:
        before = probe._version
        probe.add_(1.0)
        return isinstance(before, int) and probe._version != before
    except (AttributeError, RuntimeError, TypeError):
        return False


def _agrees_with_project(model: Any, matrix: torch.Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    """Check the factored form on a fixed random probe against ``model.project``."""
    probe = torch.randn(4, matrix.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        z = model.project(probe.to(device=device, dtype=dtype)).float().cpu()
        ref = F.normalize(probe.double() @ matrix.detach().cpu().double(), dim=-1).float()
    cos = (F.normalize(z, dim=-1) * ref).sum(-1)
    return bool((cos > 0.99).all())


__all__ = ["FactoredSimilarity", "ProjectSimilarity", "model_device_dtype", "similarity_for"]
