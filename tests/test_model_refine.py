"""Token refinement (EViT keep-and-fuse) and context guidance of the native ConVLM ViT.

References are written here from scratch on top of timm's ViT (explicit softmax attention,
per-sample python loops), so they share no code with the library.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.model import create_model
from wsi_pipeline.model.refine import keep_and_fuse, num_kept, token_schedule


@functools.cache
def _pristine(seed: int):
    torch.manual_seed(seed)
    return create_model("convlm_test")


def _model(seed: int = 0):
    """A fresh copy of the seeded convlm_test (built once per seed)."""
    return copy.deepcopy(_pristine(seed))


def _timm_twin(model) -> VisionTransformer:
    """timm ViT with the same weights as ``model.visual``."""
    v = model.cfg["vision_cfg"]
    vit = VisionTransformer(
        img_size=v["image_size"],
        patch_size=v["patch_size"],
        embed_dim=v["width"],
        depth=v["layers"],
        num_heads=v["heads"],
        mlp_ratio=v["mlp_ratio"],
        qkv_bias=True,
        num_classes=0,
        dynamic_img_size=True,
    ).eval()
    vit.load_state_dict(model.visual.state_dict(), strict=True)
    return vit


def _reference_forward(
    vit: VisionTransformer,
    x: torch.Tensor,
    keep: float,
    layers: tuple[int, ...],
    q_cls_override: dict[int, torch.Tensor] | None = None,
):
    """Plain EViT: explicit attention, sorted-index keep, unnormalised fusion; per-sample loops."""
    t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    b = t.shape[0]
    index = [list(range(t.shape[1] - 1)) for _ in range(b)]
    kept_log: dict[int, list[list[int]]] = {}
    for i, blk in enumerate(vit.blocks):
        h = blk.norm1(t)
        n, c = h.shape[1], h.shape[2]
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(h).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        if q_cls_override and i in q_cls_override:
            q = q.clone()
            q[:, :, 0] = q_cls_override[i]
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        t = t + blk.ls1(blk.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))
        m = n - 1
        n_keep = math.ceil(keep * m - 1e-9)
        if i in layers and n_keep < m:
            score = attn[:, :, 0, 1:].mean(dim=1)
            rows, new_index, kept_log[i] = [], [], []
            for s in range(b):
                order = sorted(range(m), key=lambda j: -float(score[s, j]))
                keep_ids = sorted(order[:n_keep])
                fused = sum(score[s, j] * t[s, 1 + j] for j in range(m) if j not in keep_ids)
                rows.append(torch.cat([t[s, :1], t[s, [1 + j for j in keep_ids]], fused[None]]))
                kept_log[i].append([index[s][j] for j in keep_ids])
                new_index.append([index[s][j] for j in keep_ids] + [-1])
            t, index = torch.stack(rows), new_index
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return vit.norm(t)[:, 0], kept_log


def test_keep_counts_and_evit_token_schedule():
    assert num_kept(196, 0.7) == 138
    # 0.55 * 100 is 55.00000000000001 in floating point: a bare ceil would keep 56
    assert 0.55 * 100 > 55 and math.ceil(0.55 * 100) == 56
    assert num_kept(100, 0.55) == 55 and num_kept(10, 0.7) == 7
    assert num_kept(16, 0.7) == 12 and num_kept(5, 0.01) == 1 and num_kept(16, 1.0) == 16
    sched = token_schedule(196, 12, 0.7, (3, 6, 9))
    assert [s[0] for s in sched] == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2
    assert sched[3] == (197, 140) and sched[6] == (140, 100) and sched[9] == (100, 72)


def test_keep_and_fuse_against_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 5, generator=g)
    attn = torch.rand(3, 8, generator=g)
    index = torch.tensor([[0, 1, 2, 3, 4, 5, 6, -1]] * 3)
    out, new_index, kept = keep_and_fuse(x, attn, 5, index)
    assert out.shape == (3, 7, 5) and new_index.shape == (3, 6)
    for s in range(3):
        top = sorted(sorted(range(8), key=lambda j: -float(attn[s, j]))[:5])
        assert kept[s].tolist() == [int(index[s, j]) for j in top]
        assert new_index[s, -1] == -1
        fused = sum(attn[s, j] * x[s, 1 + j] for j in range(8) if j not in top)  # unnormalised weights
        torch.testing.assert_close(out[s, -1], fused)
        torch.testing.assert_close(out[s, 1:-1], x[s, [1 + j for j in top]])
        torch.testing.assert_close(out[s, 0], x[s, 0])


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_unrefined_equals_timm_vit(size):
    model = _model()
    vit = _timm_twin(model)
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = vit.forward_head(vit.forward_features(x), pre_logits=True)
        out = model.encode_image(x, keep_rate=1.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_refined_equals_reference_evit():
    model = _model()
    vit = _timm_twin(model)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, ref_kept = _reference_forward(vit, x, 0.7, (1, 2))
        out, aux = model.forward_features(x, return_aux=True)  # defaults: keep 0.7 at (1, 2)
        full = model.encode_image(x, keep_rate=1.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - full).abs().max() > 1e-3  # pruning really changed the result
    assert set(aux.kept_index) == {1, 2}
    for i in (1, 2):
        assert aux.kept_index[i].tolist() == ref_kept[i]
    assert aux.num_tokens == [17, 14, 12, 12] == [s[1] for s in token_schedule(16, 4, 0.7, (1, 2))]
    # the fused token of block 1 is an image token at block 2: it can be kept (index -1)
    assert aux.kept_index[2].shape == (4, 10)


def test_keep_rate_one_is_exactly_the_plain_vit():
    model = _model()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model.visual(x)
        assert torch.equal(model.encode_image(x, keep_rate=1.0), plain)
        assert torch.equal(model.encode_image(x, refine_layers=()), plain)
        # keep rates that keep every token at every block (ceil(0.97 * 16) = 16) are no-ops too
        assert torch.equal(model.encode_image(x, keep_rate=0.97, refine_layers=(1, 2)), plain)
        # asking for aux outputs routes blocks 1 and 2 through the explicit path: still identical
        feats, aux = model.forward_features(x, keep_rate=1.0, return_aux=True)
    assert torch.equal(feats, plain)
    assert set(aux.cls_query) == {1, 2} and aux.kept_index == {} and aux.context_out == {}
    assert aux.num_tokens == [17] * 4


def test_batch_items_are_refined_independently():
    model = _model()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    c = model.encode_prompts(["tumour"])[0]
    with torch.no_grad():
        batch = model.encode_image(x, context=c)
        single = torch.cat([model.encode_image(x[i : i + 1], context=c) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)


def test_context_none_is_alpha_zero_exactly():
    model = _model()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    c = torch.randn(model.proj_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        none = model.encode_image(x)
        assert not torch.equal(model.encode_image(x, context=c), none)  # alpha 0.1 does something
        model.context_alpha = 0.0
        assert torch.equal(model.encode_image(x, context=c), none)


def _strong_context(model):
    """alpha = 1 and a large g_b: the CLS query of blocks 1 and 2 is replaced by g_b(c)."""
    model.context_alpha = 1.0
    with torch.no_grad():
        for mlp in model.context_mlp.values():
            mlp[2].weight.mul_(300.0)
    return model


def test_context_decides_which_tokens_are_kept():
    model = _strong_context(_model())
    vit = _timm_twin(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    gen = torch.Generator().manual_seed(9)
    c1, c2 = F.normalize(torch.randn(2, model.proj_dim, generator=gen), dim=-1)
    with torch.no_grad():
        _, aux0 = model.forward_features(x, return_aux=True)
        _, aux1 = model.forward_features(x, context=c1, return_aux=True)
        _, aux2 = model.forward_features(x, context=c2, return_aux=True)
        # reference: EViT with the CLS query replaced by g_b(c), written against timm's blocks
        heads, hd = model.num_heads, model.embed_dim // model.num_heads
        g = {i: model.context_mlp[str(i)](c1).reshape(1, heads, hd).expand(2, -1, -1) for i in (1, 2)}
        out_ref, kept_ref = _reference_forward(vit, x, 0.7, (1, 2), q_cls_override=g)
        out1 = model.encode_image(x, context=c1)
    assert aux1.kept_index[1].tolist() == kept_ref[1] and aux1.kept_index[2].tolist() == kept_ref[2]
    torch.testing.assert_close(out1, out_ref, atol=1e-4, rtol=0)
    assert aux1.kept_index[1].tolist() != aux0.kept_index[1].tolist()
    assert aux1.kept_index[1].tolist() != aux2.kept_index[1].tolist()


def test_aux_outputs_for_training():
    model = _model()
    model.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    c = torch.randn(2, model.proj_dim, generator=torch.Generator().manual_seed(11))
    feats, aux = model.forward_features(x, context=c, return_aux=True)
    assert set(aux.context_out) == set(aux.cls_query) == {1, 2}
    torch.testing.assert_close(aux.context_out[1], model.context_mlp["1"](c))
    # CLS query of block 1 before mixing = qkv of the plain tokens after block 0
    with torch.no_grad():
        t = model.visual.blocks[0](model.visual.embed(x))
        q = model.visual.blocks[1].attn.qkv(model.visual.blocks[1].norm1(t))[:, 0, : model.embed_dim]
    torch.testing.assert_close(aux.cls_query[1].detach(), q)
    loss = (model.project(feats) ** 2).sum() + sum((g - feats).abs().mean() for g in aux.context_out.values())
    loss = loss + sum(qc.pow(2).mean() for qc in aux.cls_query.values())
    loss.backward()
    no_grad = [
        n
        for n, p in model.named_parameters()
        if not n.startswith("text.")
        and n != "logit_scale"
        and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)
    ]
    assert no_grad == []


def test_bad_schedule_context_and_images_raise_config_errors():
    model = _model()
    x = torch.zeros(1, 3, 32, 32)
    for kw in (
        {"keep_rate": 0.0},
        {"keep_rate": 1.5},
        {"refine_layers": (4,)},
        {"refine_layers": (-1,)},
        {"refine_layers": (1.5,)},
        {"context": torch.zeros(model.proj_dim + 1)},
        {"context": torch.zeros(3, model.proj_dim)},
        {"context": torch.full((model.proj_dim,), float("nan"))},
    ):
        with pytest.raises(ConfigError):
            model.encode_image(x, **kw)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        model.encode_image(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ConfigError, match="width 7"):
        model.project(torch.zeros(2, 7))
