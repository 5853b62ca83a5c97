"""``open_clip:<arch>``: refinement on an open_clip ViT, reusing its weights and checkpoints."""

from __future__ import annotations

import hashlib
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.model import create_model, load_weights, save_weights
from wsi_pipeline.model.config import get_config
from wsi_pipeline.model.convlm import ViTConVLM

ARCH = "wsi-test-tiny-vit"
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    """Register a tiny open_clip architecture (a JSON config, as open_clip ships them)."""
    path = tmp_path_factory.mktemp("oc") / f"{ARCH}.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    return f"open_clip:{ARCH}"


def _wrapped(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name)


def _x(seed: int = 0, b: int = 3) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_unrefined_equals_open_clip_encode_image(tiny_arch):
    model = _wrapped(tiny_arch)
    clip = model.clip
    x = _x()
    with torch.no_grad():
        ref = clip.encode_image(x)
        feats = model.encode_image(x, keep_rate=1.0)
        torch.testing.assert_close(feats @ clip.visual.proj, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.project(feats), F.normalize(ref, dim=-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            model.encode_image(x, keep_rate=1.0, project=True),
            clip.encode_image(x, normalize=True),
            atol=1e-5,
            rtol=0,
        )
    assert model.embed_dim == 64 and model.proj_dim == 32 and model.input_size == 32
    assert model.refine_layers == (1, 2) and model.keep_rate == 0.7
    assert model.logit_scale is clip.logit_scale


def test_text_tower_and_tokenizer_are_open_clips(tiny_arch):
    model = _wrapped(tiny_arch)
    texts = ["an H&E image of adenocarcinoma.", "squamous cell carcinoma"]
    tokens = model.tokenize(texts)
    assert torch.equal(tokens, open_clip.get_tokenizer(ARCH)(texts))
    assert tokens.shape == (2, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_prompts(texts), model.clip.encode_text(tokens, normalize=True)
        )


def _native_twin(clip) -> ViTConVLM:
    """A native ConVLM holding the open_clip ViT's weights (ln_pre on, zero patch bias, eps 1e-5)."""
    cfg = get_config("convlm_test")
    cfg["embed_dim"] = 32
    cfg["vision_cfg"].update(layers=3, ln_pre=True, norm_eps=1e-5)
    native = ViTConVLM("twin", cfg).eval()
    v = clip.visual
    sd = {
        "patch_embed.proj.weight": v.conv1.weight,
        "patch_embed.proj.bias": torch.zeros(64),
        "cls_token": v.class_embedding.view(1, 1, -1),
        "pos_embed": v.positional_embedding[None],
        "norm_pre.weight": v.ln_pre.weight,
        "norm_pre.bias": v.ln_pre.bias,
        "norm.weight": v.ln_post.weight,
        "norm.bias": v.ln_post.bias,
    }
    for i, blk in enumerate(v.transformer.resblocks):
        pairs = {
            "norm1": blk.ln_1,
            "norm2": blk.ln_2,
            "attn.proj": blk.attn.out_proj,
            "mlp.fc1": blk.mlp.c_fc,
            "mlp.fc2": blk.mlp.c_proj,
        }
        for ours, mod in pairs.items():
            sd[f"blocks.{i}.{ours}.weight"], sd[f"blocks.{i}.{ours}.bias"] = mod.weight, mod.bias
        sd[f"blocks.{i}.attn.qkv.weight"], sd[f"blocks.{i}.attn.qkv.bias"] = (
            blk.attn.in_proj_weight,
            blk.attn.in_proj_bias,
        )
    native.visual.load_state_dict(sd, strict=True)
    return native


def test_refined_equals_native_refinement_on_same_weights(tiny_arch):
    model = _wrapped(tiny_arch)
    native = _native_twin(model.clip)
    x = _x(1, b=4)
    with torch.no_grad():
        torch.testing.assert_close(
            native.encode_image(x, keep_rate=1.0), model.encode_image(x, keep_rate=1.0), atol=1e-5, rtol=0
        )
        a, aux_a = model.forward_features(x, keep_rate=0.6, refine_layers=(1, 2), return_aux=True)
        b, aux_b = native.forward_features(x, keep_rate=0.6, refine_layers=(1, 2), return_aux=True)
        full = model.encode_image(x, keep_rate=1.0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - full).abs().max() > 1e-3
    for i in (1, 2):
        assert torch.equal(aux_a.kept_index[i], aux_b.kept_index[i])
    assert aux_a.num_tokens == [17, 12, 9]
    assert set(aux_a.cls_query) == {1, 2} and aux_a.context_out == {}
    torch.testing.assert_close(aux_a.cls_query[1], aux_b.cls_query[1], atol=1e-5, rtol=0)


def test_context_is_refused(tiny_arch):
    model = _wrapped(tiny_arch)
    with pytest.raises(ConfigError, match="no context MLPs"):
        model.encode_image(_x(), context=torch.zeros(32))


def test_open_clip_checkpoint_loads_with_its_own_keys(tiny_arch, tmp_path, caplog):
    source = _wrapped(tiny_arch, seed=1)
    x = _x(2)
    with torch.no_grad():
        expected = source.encode_image(x)
    ckpt = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(source.clip.state_dict(), ckpt)  # the layout open_clip / QuiltNet ship
    with caplog.at_level("WARNING"):
        model = create_model(tiny_arch, weights=ckpt)
    assert "initialized randomly" not in caplog.text  # open_clip's own warning, false here: weights load after
    assert model.weights_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), expected)
    st = tmp_path / "tiny.safetensors"
    save_weights(model, st)
    other = _wrapped(tiny_arch, seed=3)
    load_weights(other, st)
    with torch.no_grad():
        assert torch.equal(other.encode_image(x), expected)


@pytest.mark.parametrize("arch, patch", [("ViT-B-16", 16), ("ViT-B-32", 32)])
def test_real_architectures_construct_on_meta(arch, patch):
    model = create_model(f"open_clip:{arch}", device="meta")
    assert (model.embed_dim, model.proj_dim, model.input_size, model.patch_size) == (768, 512, 224, patch)
    assert model.refine_layers == (3, 6, 9) and model.depth == 12 and model.num_heads == 12
    assert model.tokenize(["x"]).shape == (1, 77)
    x = torch.empty(2, 3, 224, 224, device="meta")
    assert model.encode_image(x, project=True).shape == (2, 512)


def test_non_vit_towers_are_refused():
    with pytest.raises(ConfigError, match="only ViT towers"):
        create_model("open_clip:RN50", device="meta")


def test_factored_similarity_uses_the_clip_projection(tiny_arch):
    """Zero-shot scoring of open_clip features: factored form (proj_dim < width) == project()."""
    from wsi_pipeline.classify.similarity import FactoredSimilarity, ProjectSimilarity, similarity_for

    model = _wrapped(tiny_arch)
    assert model.projection_matrix() is model.clip.visual.proj
    classes = torch.randn(3, model.proj_dim, generator=torch.Generator().manual_seed(1))
    feats = torch.randn(50, model.embed_dim, generator=torch.Generator().manual_seed(2))
    scorer = similarity_for(model, classes)
    assert isinstance(scorer, FactoredSimilarity)
    expected = ProjectSimilarity(model, classes, 16)(feats)
    torch.testing.assert_close(torch.from_numpy(scorer(feats)), torch.from_numpy(expected), atol=2e-6, rtol=0)


def test_classify_cli_on_rois_matches_open_clip(tiny_arch, tmp_path):
    """``classify`` on ROI PNGs with an open_clip checkpoint == the MI-Zero recipe on open_clip's own embeddings."""
    from zeroshot_reference import (
        TOY_PROMPTS,
        assert_row_matches,
        class_embeddings,
        classify_rois,
        roi_patches,
        slide_probabilities,
    )

    from wsi_pipeline.store.features import get_store

    torch.manual_seed(3)
    clip = open_clip.create_model(ARCH, pretrained=None).eval()
    with torch.no_grad():  # LayerNorms and biases init to 1 / 0, which would hide mapping mistakes
        for name, p in clip.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    ckpt = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip.state_dict(), ckpt)
    out, rois, preds = classify_rois(tmp_path, ["--model", tiny_arch, "--weights", str(ckpt)], seed=4)
    tokenizer = open_clip.get_tokenizer(ARCH)
    with torch.no_grad():
        text = class_embeddings(lambda t: clip.encode_text(tokenizer(t)), TOY_PROMPTS["classes"],
                                TOY_PROMPTS["templates"])
    [features_dir] = (out / "features").iterdir()
    for roi in rois:
        sf = get_store("h5").read(out / "features", features_dir.name, roi.stem)
        with torch.no_grad():
            ref = clip.encode_image(roi_patches(roi, sf.coords, 32))  # projected, not normalised
            stored = torch.from_numpy(sf.features) @ clip.visual.proj  # our pre-projection feature, projected
        assert F.cosine_similarity(ref.double(), stored.double(), dim=-1).min() >= 0.999999
        scores, probs = slide_probabilities(ref, text, k=3, logit_scale=float(clip.logit_scale.detach()))
        assert_row_matches(preds[roi.stem], scores, probs, list(TOY_PROMPTS["classes"]),
                           float(clip.logit_scale.detach()))
