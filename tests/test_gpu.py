"""CUDA paths against the CPU results. Skipped where no CUDA GPU is present (CI has none).

Run on a GPU machine with ``HF_HUB_OFFLINE=1 python -m pytest -q -m gpu`` (every test here carries the
``gpu`` marker; ``-m "not gpu"`` leaves them out).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from slide_factory import make_slide

from wsi_pipeline.classify.similarity import FactoredSimilarity
from wsi_pipeline.config import TilingConfig
from wsi_pipeline.embed.dataset import normalize
from wsi_pipeline.embed.stage import EmbedConfig, embed_slides
from wsi_pipeline.model import create_model
from wsi_pipeline.model.shipped import shipped_weights
from wsi_pipeline.store.features import get_store
from wsi_pipeline.synthetic.render import TISSUE_CLASSES, render_roi
from wsi_pipeline.tiling.stage import tile_slides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons need true fp32 matmuls and convolutions."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1)


def test_refined_guided_forward_on_gpu_equals_cpu() -> None:
    torch.manual_seed(0)
    cpu = create_model("convlm_test").eval()
    gpu = create_model("convlm_test").eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    x = torch.randn(8, 3, cpu.input_size, cpu.input_size, generator=torch.Generator().manual_seed(1))
    c = F.normalize(torch.randn(cpu.proj_dim, generator=torch.Generator().manual_seed(2)), dim=0)
    with torch.inference_mode():
        ref = cpu.encode_image(x, context=c)
        got = gpu.encode_image(x.cuda(), context=c.cuda())
        torch.testing.assert_close(got.cpu(), ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gpu.encode_image(x.cuda(), context=c.cuda())
    assert (_cos(low, ref) > 0.99).all()


@pytest.mark.parametrize("p", [512, 256])
def test_factored_similarity_on_gpu_equals_numpy(p: int) -> None:
    g = torch.Generator().manual_seed(p)
    matrix, classes = torch.randn(384, p, generator=g) / 20, torch.randn(4, p, generator=g)
    feats = torch.randn(5000, 384, generator=g)
    ref = FactoredSimilarity(matrix, classes, torch.device("cpu"))(feats)
    got = FactoredSimilarity(matrix, classes, torch.device("cuda"))(feats)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_embed_on_gpu_matches_cpu(tmp_path: Path) -> None:
    make_slide(tmp_path / "slides" / "a.svs", 1600, 1200, mpp=0.5, seed=5)
    out = tmp_path / "out"
    (res,) = tile_slides([tmp_path / "slides" / "a.svs"], out, TilingConfig(patch_size=128, min_tissue_area=2000.0))
    assert res.status == "ok" and res.n_patches > 10
    feats = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        run = out / device / precision
        run.mkdir(parents=True)
        (run / "coords").symlink_to(out / "coords", target_is_directory=True)
        summary = embed_slides(run, EmbedConfig(model="convlm_test", device=device, precision=precision, batch_size=16))
        assert [r.status for r in summary.results] == ["ok"]
        feats[device, precision] = get_store("h5").read(run / "features", summary.model_id, "a").features
    ref = torch.from_numpy(feats["cpu", "fp32"])
    np.testing.assert_allclose(feats["cuda", "fp32"], feats["cpu", "fp32"], atol=1e-4, rtol=1e-4)
    assert (_cos(torch.from_numpy(feats["cuda", "bf16"]), ref) > 0.99).all()



def kept_token_agreement(device: str, per_class: int = 16) -> dict[str, float]:
    """Which tokens each refining block keeps under bf16 autocast against fp32, per image, and
    how far the features move; the shipped demo model (trained, so its CLS attention is peaked
    as a real model's is) on synthetic tissue ROIs of each class."""
    model = create_model("convlm_demo", weights=shipped_weights("convlm_demo"), device=device).eval()
    rois = np.stack([render_roi(kind, model.input_size, seed=i) for kind in TISSUE_CLASSES for i in range(per_class)])
    x = normalize(torch.from_numpy(rois).permute(0, 3, 1, 2).to(device), model.mean, model.std, torch.float32)
    with torch.inference_mode():
        ref, aux = model.forward_features(x, return_aux=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            low, aux_low = model.forward_features(x, return_aux=True)
    assert sorted(aux.kept_index) == sorted(aux_low.kept_index) == sorted(model.refine_layers)
    same = torch.ones(len(x), dtype=torch.bool)
    jaccard = []
    for block, kept in aux.kept_index.items():
        a, b = kept.sort(dim=1).values.cpu(), aux_low.kept_index[block].sort(dim=1).values.cpu()
        same &= (a == b).all(dim=1)
        for u, v in zip(a.tolist(), b.tolist(), strict=True):
            jaccard.append(len(set(u) & set(v)) / len(set(u) | set(v)))
    return {"images": len(x), "blocks": len(aux.kept_index), "same_kept_fraction": float(same.float().mean()),
            "mean_jaccard": float(np.mean(jaccard)), "max_feature_diff": float((low.float() - ref).abs().max()),
            "max_feature": float(ref.abs().max()), "min_cos": float(_cos(low, ref).min())}


def test_bf16_keeps_the_tokens_fp32_keeps(record_property: Callable[[str, object], None]) -> None:
    """bf16 moves attention scores near the keep threshold, so a few tokens may swap places
    there, and the features barely move. Prints and records the numbers (gpu_suite.sh shows them)."""
    m = kept_token_agreement("cuda")
    for k, v in m.items():
        record_property(k, v)
    print(f"kept-token agreement, bf16 vs fp32: {m['same_kept_fraction']:.0%} of {m['images']} images keep the "
          f"same tokens at all {m['blocks']} refining blocks, mean Jaccard {m['mean_jaccard']:.3f}; "
          f"max |feature diff| {m['max_feature_diff']:.3g} (max |feature| {m['max_feature']:.3g}), "
          f"min cos {m['min_cos']:.5f}")
    assert m["same_kept_fraction"] >= 0.5 and m["mean_jaccard"] >= 0.95
    assert m["min_cos"] > 0.99
