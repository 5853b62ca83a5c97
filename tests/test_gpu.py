"""CUDA paths against the CPU results. Skipped where no CUDA GPU is present (CI has none).

Run on a GPU machine with ``HF_HUB_OFFLINE=1 python -m pytest -q tests/test_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from slide_factory import make_slide

from wsi_pipeline.classify.similarity import FactoredSimilarity
from wsi_pipeline.config import TilingConfig
from wsi_pipeline.embed.runner import EmbedConfig, embed_slides
from wsi_pipeline.model import create_model
from wsi_pipeline.store.features import get_store
from wsi_pipeline.tiling.stage import tile_slides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
