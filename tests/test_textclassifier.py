"""Text classifier: prompt-ensemble averaging against a hand computation, and the disk cache."""

from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.classify.prompts import load_prompts, parse_prompts
from wsi_pipeline.classify.textclassifier import build_text_classifier, cache_path
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.model import create_model

PROMPT_DIR = Path(__file__).resolve().parents[1] / "configs" / "prompts"
PROMPTS = parse_prompts(
    "name: toy\ntemplates: [CLASSNAME., an H&E image of CLASSNAME., a photo of CLASSNAME tissue.]\n"
    "classes:\n  A: [alpha, alpha tumour]\n  B: [beta, beta cells, big beta]\n  C: [gamma]\n"
)
PROMPTS_TEXT_B = "name: toy2\ntemplates: [CLASSNAME.]\nclasses: {A: [alpha], B: [beta]}\n"


class FakeTextModel(nn.Module):
    """Tiny deterministic text tower: hashed word ids -> mean embedding -> linear projection."""

    def __init__(self, proj_dim: int = 6, seed: int = 0, sha: str | None = "ab" * 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.length = 101, 12
        self.tok = nn.Embedding(self.vocab, 16, padding_idx=0)
        self.text_proj = nn.Linear(16, proj_dim, bias=False)
        with torch.no_grad():
            self.tok.weight.copy_(torch.randn(self.vocab, 16, generator=g))
            self.tok.weight[0].zero_()
            self.text_proj.weight.copy_(torch.randn(proj_dim, 16, generator=g))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.name = "fake-clip"
        self.weights_sha256 = sha
        self.encode_calls = 0

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [zlib.crc32(w.encode()) % (self.vocab - 1) + 1 for w in text.lower().split()][: self.length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        self.encode_calls += 1
        mask = (tokens != 0).float().unsqueeze(-1)
        x = self.text_proj((self.tok(tokens) * mask).sum(1) / mask.sum(1).clamp(min=1))
        return F.normalize(x, dim=-1) if normalize else x


def hand_classifier(model: FakeTextModel, prompts_dict: dict[str, list[str]], templates: list[str]) -> torch.Tensor:
    """Independent reference: encode each filled prompt alone, normalise, average, renormalise."""
    rows = []
    with torch.no_grad():
        for synonyms in prompts_dict.values():
            vecs = []
            for syn in synonyms:
                for tpl in templates:
                    v = model.encode_text(model.tokenize([tpl.replace("CLASSNAME", syn)]), normalize=False)[0]
                    vecs.append(v / v.norm())
            mean = torch.stack(vecs).sum(0) / len(vecs)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def test_ensemble_average_matches_hand_computation() -> None:
    model = FakeTextModel()
    w = build_text_classifier(model, PROMPTS, batch_size=4)  # 4 does not divide 18 texts
    ref = hand_classifier(model, {c: list(s) for c, s in PROMPTS.classes.items()}, list(PROMPTS.templates))
    assert w.shape == (3, 6) and w.dtype == torch.float32
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(3))
    single = F.normalize(model.encode_text(model.tokenize(["alpha."])), dim=-1)[0]
    assert not torch.allclose(w[0], single, atol=1e-3)  # the ensemble is not just one prompt
    assert model.training  # train/eval mode is restored


def test_batch_size_does_not_change_result() -> None:
    model = FakeTextModel()
    a = build_text_classifier(model, PROMPTS, batch_size=1)
    b = build_text_classifier(model, PROMPTS, batch_size=64)
    torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="batch_size"):
        build_text_classifier(model, PROMPTS, batch_size=0)


def test_cache_hit_miss_and_key(tmp_path: Path) -> None:
    model = FakeTextModel()
    w1 = build_text_classifier(model, PROMPTS, cache_dir=tmp_path)
    path = cache_path(model, PROMPTS, tmp_path)
    assert path is not None and path.exists()
    assert model.weights_sha256[:16] in path.name and PROMPTS.sha256[:16] in path.name
    calls = model.encode_calls
    w2 = build_text_classifier(model, PROMPTS, cache_dir=tmp_path)
    assert model.encode_calls == calls  # served from the cache
    assert torch.equal(w1, w2)

    other_prompts = parse_prompts(PROMPTS_TEXT_B)
    build_text_classifier(model, other_prompts, cache_dir=tmp_path)
    other_weights = FakeTextModel(seed=1, sha="cd" * 32)
    w3 = build_text_classifier(other_weights, PROMPTS, cache_dir=tmp_path)
    assert not torch.allclose(w1, w3)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_corrupt_cache_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = FakeTextModel()
    ref = build_text_classifier(model, PROMPTS)
    path = cache_path(model, PROMPTS, tmp_path)
    path.write_bytes(b"\x00garbage, not safetensors")
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline.classify.textclassifier"):
        w = build_text_classifier(model, PROMPTS, cache_dir=tmp_path)
    assert "unreadable" in caplog.text
    torch.testing.assert_close(w, ref)
    calls = model.encode_calls
    torch.testing.assert_close(build_text_classifier(model, PROMPTS, cache_dir=tmp_path), ref)
    assert model.encode_calls == calls  # the rebuilt file is valid


def test_random_init_model_is_not_cached(tmp_path: Path) -> None:
    model = FakeTextModel(sha=None)
    build_text_classifier(model, PROMPTS, cache_dir=tmp_path)
    assert cache_path(model, PROMPTS, tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_real_test_model() -> None:
    model = create_model("convlm_test")
    prompts = load_prompts(PROMPT_DIR / "demo.yaml")
    w = build_text_classifier(model, prompts, batch_size=16)
    assert w.shape[0] == 3 and torch.isfinite(w).all()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(3))
    # hand check of one class with the real tokenizer / text tower
    with torch.no_grad():
        texts = prompts.expand()["solid"]
        e = F.normalize(model.encode_text(model.tokenize(texts), normalize=True).float(), dim=-1)
        ref = F.normalize(e.mean(0), dim=-1)
    torch.testing.assert_close(w[1], ref, rtol=1e-4, atol=1e-5)
