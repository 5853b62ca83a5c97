"""Top-K pooling and slide scoring against independent reference computations."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.classify.pooling import SlideScores, score_slide, topk_pool, validate_ks
from wsi_pipeline.errors import ConfigError, CorruptOutputError
from wsi_pipeline.model import create_model

SHA = "ab" * 32
ATTRS = {"projected": False, "normalized": False, "weights_sha256": SHA, "embed_dim": 8}


class FakeProjModel(nn.Module):
    """Linear projection to the joint space (+ L2 norm), learned-style log logit scale."""

    def __init__(self, weight: np.ndarray, log_scale: float = math.log(1 / 0.07), sha: str | None = SHA) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        self.logit_scale = nn.Parameter(torch.tensor(log_scale))
        self.name = "fake-clip"
        self.weights_sha256 = sha

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(features), dim=-1)


def ref_topk(sim: np.ndarray, k: int) -> np.ndarray:
    """Plain-Python reference: per column, sort descending and average the first min(k, N)."""
    out = []
    for c in range(sim.shape[1]):
        col = sorted(sim[:, c].tolist(), reverse=True)
        kk = min(k, len(col))
        out.append(sum(col[:kk]) / kk)
    return np.array(out)


def test_topk_pool_matches_reference() -> None:
    sim = np.random.default_rng(0).uniform(-1, 1, size=(37, 4))
    pooled = topk_pool(sim, [5, 1, 37, 10])
    assert list(pooled) == [5, 1, 37, 10]
    for k, v in pooled.items():
        assert v.shape == (4,)
        np.testing.assert_allclose(v, ref_topk(sim, k), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pooled[1], sim.max(axis=0))
    # torch input gives the same result
    pooled_t = topk_pool(torch.from_numpy(sim), 10)
    np.testing.assert_allclose(pooled_t[10], pooled[10])


def test_topk_pool_k_larger_than_n_uses_all_patches() -> None:
    sim = np.random.default_rng(1).normal(size=(3, 2))
    pooled = topk_pool(sim, (50, 100, 2))
    np.testing.assert_allclose(pooled[50], sim.mean(axis=0))
    np.testing.assert_allclose(pooled[100], sim.mean(axis=0))
    np.testing.assert_allclose(pooled[2], ref_topk(sim, 2))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, [], [5, 5], ["5"]])
def test_validate_ks_rejects_bad_k(bad: object) -> None:
    with pytest.raises(ConfigError, match="top-K"):
        validate_ks(bad)  # type: ignore[arg-type]


def test_score_slide_matches_reference_computation() -> None:
    rng = np.random.default_rng(42)
    feats = rng.normal(size=(60, 8)).astype(np.float32)
    proj = rng.normal(size=(6, 8))
    text = rng.normal(size=(3, 6))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    model = FakeProjModel(proj, log_scale=math.log(20.0))

    res = score_slide(feats, ATTRS, model, text, ["a", "b", "c"], ks=(10, 1, 100), batch_size=7)

    z = feats.astype(np.float64) @ proj.T
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ text.T
    np.testing.assert_allclose(res.similarity, sim, atol=1e-5)
    assert res.status == "ok" and res.n_patches == 60 and res.primary_k == 10
    for k in (10, 1, 100):
        pooled = ref_topk(sim, k)
        np.testing.assert_allclose(res.pooled[k], pooled, atol=1e-5)
        e = np.exp(20.0 * pooled - (20.0 * pooled).max())
        np.testing.assert_allclose(res.probabilities[k], e / e.sum(), atol=1e-4)
        assert res.predictions[k] == "abc"[int(np.argmax(pooled))]
    assert res.k_used(100) == 60
    assert res.logit_scale == pytest.approx(20.0, rel=1e-6)


def planted_slide(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A few patches match class B strongly, many match class A weakly; returned pre-projection.

    Patches are built in the joint space and mapped back through an orthogonal projection, so
    the planted structure only appears if score_slide applies the projection.
    """
    rng = np.random.default_rng(seed)
    e = np.eye(8)
    text = e[:3]  # classes A, B, C along the first three axes

    def noise(n: int, scale: float) -> np.ndarray:
        v = np.zeros((n, 8))
        v[:, 3:] = rng.normal(size=(n, 5))
        return scale * v / np.linalg.norm(v, axis=1, keepdims=True)

    strong_b = e[1] + noise(4, 0.1)
    weak_a = 0.4 * e[0] + noise(200, 0.9)
    background = noise(100, 1.0) + 0.05 * rng.normal(size=(100, 8))
    joint = np.concatenate([weak_a, strong_b, background])
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    return (joint @ rotation).astype(np.float32), rotation, text  # Linear: project(f) = f @ rotation.T


def test_planted_features_k1_predicts_b_and_k50_predicts_a() -> None:
    feats, proj, text = planted_slide()
    res = score_slide(feats, ATTRS, FakeProjModel(proj), text, ["A", "B", "C"], ks=[1, 5, 50])
    assert res.predictions == {1: "B", 5: "B", 50: "A"}
    assert res.pooled[1][1] > 0.95 and res.pooled[50][0] == pytest.approx(0.41, abs=0.03)
    assert res.prediction == "B"  # primary K is the first one given
    # skipping the projection would have scrambled the planted structure
    naive = feats / np.linalg.norm(feats, axis=1, keepdims=True) @ text.T
    assert not np.allclose(naive, res.similarity, atol=0.1)


def test_features_read_back_from_h5(tmp_path: Path) -> None:
    feats, proj, text = planted_slide(seed=3)
    path = tmp_path / "slide.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        f.attrs.update({"projected": False, "normalized": False, "weights_sha256": SHA, "embed_dim": 8})
    with h5py.File(path, "r") as f:
        res = score_slide(f["features"][:], dict(f.attrs), FakeProjModel(proj), text, ["A", "B", "C"], ks=50)
    assert res.prediction == "A" and res.n_patches == len(feats)


def test_no_patches_gives_no_tissue() -> None:
    res = score_slide(np.zeros((0, 8), np.float32), ATTRS, FakeProjModel(np.eye(8)), np.eye(8)[:2], ["A", "B"], 50)
    assert isinstance(res, SlideScores)
    assert res.status == "no_tissue" and res.prediction is None and res.pooled == {}
    row = res.record()
    assert row == {"status": "no_tissue", "n_patches": 0, "k": 50, "k_used": 0, "prediction": None,
                   "score_A": None, "score_B": None, "prob_A": None, "prob_B": None}


def test_record_row() -> None:
    feats, proj, text = planted_slide()
    res = score_slide(feats, ATTRS, FakeProjModel(proj), text, ["A", "B", "C"], ks=[50, 1])
    row = res.record(1)
    assert row["prediction"] == "B" and row["k"] == 1 and row["k_used"] == 1
    assert row["score_B"] == pytest.approx(float(res.pooled[1][1]))
    assert sum(row[f"prob_{c}"] for c in "ABC") == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="K=7 was not scored"):
        res.record(7)


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        ({**ATTRS, "projected": True}, "projected=True"),
        ({**ATTRS, "projected": np.bool_(True)}, "projected=True"),
        ({**ATTRS, "projected": "true"}, "projected=True"),
        ({k: v for k, v in ATTRS.items() if k != "projected"}, "no 'projected' attribute"),
        ({**ATTRS, "projected": "maybe"}, "not a boolean"),
        ({**ATTRS, "weights_sha256": "cd" * 32}, "classify with the model"),
        ({**ATTRS, "weights_sha256": "none (random init, seed 0)"}, "random init"),
    ],
)
def test_refuses_projected_or_foreign_features(attrs: dict, match: str) -> None:
    feats = np.ones((4, 8), np.float32)
    with pytest.raises(ConfigError, match=match):
        score_slide(feats, attrs, FakeProjModel(np.eye(8)), np.eye(8)[:2], ["A", "B"])


def test_random_init_model_and_features_agree() -> None:
    attrs = {**ATTRS, "weights_sha256": "none (random init, seed 0)", "projected": np.bool_(False)}
    res = score_slide(np.eye(8, dtype=np.float32)[:3], attrs, FakeProjModel(np.eye(8), sha=None),
                      np.eye(8)[:2], ["A", "B"], ks=1)
    assert res.prediction == "A"


def test_bad_inputs_raise_typed_errors() -> None:
    model = FakeProjModel(np.eye(8))
    with pytest.raises(CorruptOutputError, match="NaN"):
        score_slide(np.full((3, 8), np.nan, np.float32), ATTRS, model, np.eye(8)[:2], ["A", "B"])
    with pytest.raises(CorruptOutputError, match="embed_dim=8"):
        score_slide(np.ones((3, 5), np.float32), ATTRS, model, np.eye(8)[:2], ["A", "B"])
    with pytest.raises(ConfigError, match="do not fit the projection"):
        score_slide(np.ones((3, 5), np.float32), {**ATTRS, "embed_dim": 5}, model, np.eye(8)[:2], ["A", "B"])
    with pytest.raises(ConfigError, match="3 class names"):
        score_slide(np.ones((3, 8), np.float32), ATTRS, model, np.eye(8)[:2], ["A", "B", "C"])
    with pytest.raises(ConfigError, match="text classifier dim"):
        score_slide(np.ones((3, 8), np.float32), ATTRS, model, np.eye(4)[:2], ["A", "B"])


def test_real_test_model() -> None:
    model = create_model("convlm_test")
    dim = int(model.embed_dim)
    feats = np.random.default_rng(0).normal(size=(20, dim)).astype(np.float32)
    with torch.no_grad():
        z = model.project(torch.from_numpy(feats)).float().numpy()
        text = F.normalize(torch.randn(3, z.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1).numpy()
    attrs = {"projected": False, "weights_sha256": model.weights_sha256 or "none", "embed_dim": dim}
    res = score_slide(feats, attrs, model, text, ["x", "y", "z"], ks=5)
    sim = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ text.T
    np.testing.assert_allclose(res.similarity, sim, atol=1e-4)
    np.testing.assert_allclose(res.pooled[5], ref_topk(sim, 5), atol=1e-4)
