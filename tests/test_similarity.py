"""The factored cosine similarity equals the plain projection path, on every shape it can meet."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.classify import similarity as sim_mod
from wsi_pipeline.classify.similarity import FactoredSimilarity, ProjectSimilarity, similarity_for
from wsi_pipeline.model import create_model, list_models


class MatrixModel(nn.Module):
    """``project(f) = normalize(f @ M)``, declaring ``M`` (or, with ``lie=True``, a wrong one)."""

    def __init__(self, matrix: np.ndarray, lie: bool = False) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.as_tensor(matrix, dtype=torch.float32))
        self.lie = lie
        self.name = "matrix-model"

    def projection_matrix(self) -> torch.Tensor:
        return self.matrix.flip(0) if self.lie else self.matrix

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features @ self.matrix, dim=-1)


def reference(feats: np.ndarray, matrix: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Plain float64 computation: project, L2-normalise, dot with the normalised class embeddings."""
    z = feats.astype(np.float64) @ matrix.astype(np.float64)
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    t = classes.astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    return z @ t.T


@pytest.mark.parametrize(
    ("n", "d", "p"),
    [(300, 512, 512), (257, 200, 300), (1, 130, 130), (50, 96, 32), (70, 8, 8)],
    ids=["square", "wider-projection", "one-patch", "narrower-projection", "tiny"],
)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_factored_equals_reference(monkeypatch: pytest.MonkeyPatch, n: int, d: int, p: int, backend: str) -> None:
    monkeypatch.setattr(sim_mod, "CPU_ROWS", 64)  # several row chunks, the last one partial
    rng = np.random.default_rng(d + p)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    matrix = rng.normal(size=(d, p)) / np.sqrt(d)
    classes = rng.normal(size=(5, p))
    fs = FactoredSimilarity(torch.from_numpy(matrix), torch.from_numpy(classes), torch.device("cpu"), backend)
    assert fs.numpy == (backend == "numpy")  # the torch branch is the one used on GPUs
    if p >= d:  # the triangular factor is used, in blocks of COLUMN_BLOCK columns
        assert len(fs.blocks) == -(-d // sim_mod.COLUMN_BLOCK)
        assert all(b.shape == (d - j, min(sim_mod.COLUMN_BLOCK, d - j)) for j, b in fs.blocks)
    else:
        assert len(fs.blocks) == 1 and fs.blocks[0][1].shape == (d, p)
    got = fs(torch.from_numpy(feats))
    assert got.dtype == np.float64 and got.shape == (n, 5)
    np.testing.assert_allclose(got, reference(feats, matrix, classes), atol=2e-6, rtol=0)


def test_no_patches_give_an_empty_matrix() -> None:
    fs = FactoredSimilarity(torch.eye(6), torch.eye(6)[:3], torch.device("cpu"))
    got = fs(torch.zeros(0, 6))
    assert got.shape == (0, 3) and got.dtype == np.float64


def test_backend_must_fit_the_device() -> None:
    from wsi_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="backend 'numpy' on cuda"):
        FactoredSimilarity(torch.eye(4), torch.eye(4)[:2], torch.device("cuda"), "numpy")
    with pytest.raises(ConfigError, match="backend 'cupy'"):
        FactoredSimilarity(torch.eye(4), torch.eye(4)[:2], torch.device("cpu"), "cupy")


def test_zero_feature_row_scores_zero_like_project() -> None:
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(10, 16)).astype(np.float32)
    feats[4] = 0
    model = MatrixModel(rng.normal(size=(16, 16)))
    classes = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    factored = similarity_for(model, classes)(torch.from_numpy(feats))
    plain = ProjectSimilarity(model, classes, 4)(torch.from_numpy(feats))
    assert np.all(factored[4] == 0) and np.all(plain[4] == 0)
    np.testing.assert_allclose(factored, plain, atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", [n for n in list_models() if n in ("convlm_test", "convlm_demo")])
def test_registered_models_factored_equals_project(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    classes = torch.randn(4, model.proj_dim, generator=torch.Generator().manual_seed(1))
    feats = torch.randn(333, model.embed_dim, generator=torch.Generator().manual_seed(2))
    scorer = similarity_for(model, classes)
    assert isinstance(scorer, FactoredSimilarity)
    plain = ProjectSimilarity(model, classes, 100)(feats)
    np.testing.assert_allclose(scorer(feats), plain, atol=2e-6, rtol=0)


def test_declared_matrix_is_checked_against_project(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(5)
    model = MatrixModel(rng.normal(size=(12, 12)), lie=True)
    classes = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    feats = torch.from_numpy(rng.normal(size=(20, 12)).astype(np.float32))
    with caplog.at_level(logging.WARNING):
        scorer = similarity_for(model, classes)
    assert isinstance(scorer, ProjectSimilarity)
    assert "disagrees with project()" in caplog.text
    np.testing.assert_allclose(scorer(feats), reference(feats.numpy(), model.matrix.detach().numpy(), classes.numpy()),
                               atol=2e-6)


def test_prepared_factors_are_reused_until_weights_or_classes_change() -> None:
    rng = np.random.default_rng(6)
    model = MatrixModel(rng.normal(size=(10, 10)))
    classes = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    feats = torch.from_numpy(rng.normal(size=(30, 10)).astype(np.float32))
    first = similarity_for(model, classes)
    assert similarity_for(model, classes.clone()) is first  # same values: cached
    with torch.no_grad():
        model.matrix.mul_(-1.0)  # in place, as an optimiser step would
    flipped = similarity_for(model, classes)
    assert flipped is not first
    np.testing.assert_allclose(flipped(feats), -first(feats), atol=2e-6)
    other = similarity_for(model, classes[:2])
    assert other is not flipped and other(feats).shape == (30, 2)
