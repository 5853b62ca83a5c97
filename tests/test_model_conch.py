"""CONCH v1 as released: features, projections and text embeddings against CONCH's own code.

The reference is the upstream model code from PyPI (``conch-fork``, CC BY-NC-ND: used here as
a test reference only, never imported by the package). Every comparison builds the upstream
CoCa on seeded random weights (LayerNorms and biases perturbed too, so that a wrong norm or
bias shows), saves it in the released layout (the state dict without ``text_decoder.*``),
loads that file through ``create_model`` and compares with refinement off. Two correct
implementations agree to rel ~1e-6 in fp32; the threshold below (cosine ≥ 0.999999, i.e.
1 − cos ≤ 1e-6) is 20× tighter than the smallest real format error (a wrong activation).
"""

from __future__ import annotations

import json
import warnings

import h5py
import pytest
import torch
import torch.nn.functional as F
from zeroshot_reference import (
    TOY_PROMPTS,
    assert_row_matches,
    class_embeddings,
    classify_rois,
    roi_patches,
    slide_probabilities,
)

from wsi_pipeline.errors import CheckpointError
from wsi_pipeline.model import conch as conch_mod
from wsi_pipeline.model import create_model
from wsi_pipeline.model.adapter import load_adapter

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # timm.models.layers, imported by CONCH's code
    from conch.open_clip_custom.coca_model import CoCa
    from conch.open_clip_custom.custom_tokenizer import DEFAULT_TOKENIZER, TOKENIZER_DIR
    from conch.open_clip_custom.factory import CFG_DIR, create_model_from_pretrained
from transformers import PreTrainedTokenizerFast

MIN_COS = 0.999999
TINY = dict(
    embed_dim=32,
    embed_dim_caption=64,
    multimodal_cfg=dict(context_length=24, vocab_size=32007, width=64, heads=4, layers=1),
    text_cfg=dict(context_length=24, vocab_size=32007, width=64, heads=4, layers=2, embed_cls=True,
                  output_tokens=True),
    vision_cfg=dict(image_size=32, patch_size=8, layers=4, width=64, num_heads=4, attentional_pool_caption=True,
                    attentional_pool_contrast=True, n_queries_contrast=1, n_queries_caption=4, output_tokens=True),
)
TEXTS = [
    "an H&E image of invasive ductal carcinoma.",
    "a photomicrograph of normal breast tissue, benign",
    "Ünïcödé and   extra   spaces, IHC: Ki-67 40%",
    "",
    " ".join(["a very long prompt that will be truncated"] * 30),
]


def _released(coca: torch.nn.Module, path) -> dict[str, torch.Tensor]:
    """Perturb norms and biases (they init to 1/0), save without the text decoder, as released."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in coca.named_parameters():
            if name.endswith("bias") or ".ln" in name or "norm" in name or name.startswith("ln"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    state = {k: v for k, v in coca.state_dict().items() if not k.startswith("text_decoder.")}
    torch.save(state, path)
    return state


def _upstream_tokenizer() -> PreTrainedTokenizerFast:
    """CONCH's tokenizer with the file's own settings (see the card on ``add_prefix_space``)."""
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / DEFAULT_TOKENIZER), bos_token="<start_of_text>",
                                   eos_token="<end_of_text>", pad_token="<pad>", add_prefix_space=True)


def _upstream_ids(texts, length: int) -> torch.Tensor:
    """Upstream's ``tokenize``: ``length`` ids, then the pad column that the CLS position replaces."""
    ids = _upstream_tokenizer().batch_encode_plus(texts, max_length=length, add_special_tokens=True, truncation=True,
                                                  padding="max_length", return_tensors="pt")["input_ids"]
    return F.pad(ids, (0, 1), value=0)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).min())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    up = CoCa(**TINY).eval()
    path = tmp_path_factory.mktemp("conch_tiny") / "pytorch_model.bin"
    _released(up, path)
    return up, path


def test_tiny_conch_matches_upstream(tiny):
    up, path = tiny
    model = create_model("conch_test", weights=path)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = up.encode_image(x, proj_contrast=False, normalize=False)
        feats = model.encode_image(x, keep_rate=1.0)
        ref_proj = up.encode_image(x)
        proj = model.encode_image(x, keep_rate=1.0, project=True)
        texts = ["an H&E image of tumour", "benign stroma", "lymphocytes"]
        ours_ids = model.tokenize(texts)
        ref_text = up.encode_text(_upstream_ids(texts, 23))
        text = model.encode_prompts(texts)
    assert feats.shape == (3, 32) and ours_ids.shape == (3, 23)
    assert torch.equal(ours_ids, _upstream_ids(texts, 23)[:, :-1])
    for a, b in ((ref, feats), (ref_proj, proj), (ref_text, text)):
        assert _cos(a, b) >= MIN_COS
        assert float((a - b).abs().max()) <= 1e-5
    assert float(model.logit_scale.detach()) == float(up.logit_scale.detach())
    assert model.weights_sha256 and model.context_length == 23


def test_refinement_on_the_conch_trunk(tiny):
    _, path = tiny
    model = create_model("conch_test", weights=path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats, aux = model.forward_features(x, return_aux=True)
        full = model.encode_image(x, keep_rate=1.0)
    # 16 patches: keep ceil(0.7 * 16) = 12 (+ fused) at block 1, ceil(0.7 * 13) = 10 (+ fused) at block 2
    assert aux.num_tokens == [17, 14, 12, 12]
    assert feats.shape == full.shape and _cos(feats, full) < MIN_COS
    assert aux.cls_token.shape == (2, 64)  # the trunk width: the context L1 target, not the pooled 32-d feature


def test_tokenizer_matches_transformers_with_the_file_settings():
    model = create_model("conch_v1", device="meta")
    ours = model.tokenize(TEXTS)
    assert ours.shape == (len(TEXTS), 127)
    assert torch.equal(ours, _upstream_ids(TEXTS, 127)[:, :-1])
    assert ours[4, -1] == 2 and ours[3, :3].tolist() == [1, 2, 0]  # truncation keeps <end_of_text>; "" is sot, eot


def test_missing_tokenizer_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(conch_mod.TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(conch_mod.importlib.util, "find_spec", lambda name: None)
    weights = tmp_path / "pytorch_model.bin"
    with pytest.raises(CheckpointError, match=r"CONCH's tokenizer \(conch_byte_level_bpe_uncased.json\) was not found"):
        conch_mod.find_tokenizer(weights)
    monkeypatch.setenv(conch_mod.TOKENIZER_ENV, str(tmp_path / "nope.json"))
    with pytest.raises(CheckpointError, match="is not a file"):
        conch_mod.find_tokenizer(weights)
    (tmp_path / conch_mod.TOKENIZER_FILE).write_bytes((TOKENIZER_DIR / DEFAULT_TOKENIZER).read_bytes())
    monkeypatch.delenv(conch_mod.TOKENIZER_ENV)
    assert conch_mod.find_tokenizer(weights) == tmp_path / conch_mod.TOKENIZER_FILE  # beside the weights


def test_classify_cli_on_rois_matches_an_upstream_reference(tiny, tmp_path):
    """``classify`` on ROI PNGs with the released layout == the MI-Zero recipe on upstream embeddings."""
    up, path = tiny
    out, rois, preds = classify_rois(tmp_path, ["--model", "conch_test", "--weights", str(path)])
    with torch.no_grad():
        text = class_embeddings(lambda t: up.encode_text(_upstream_ids(t, 23)), TOY_PROMPTS["classes"],
                                TOY_PROMPTS["templates"])
    [features_dir] = (out / "features").iterdir()
    for roi in rois:
        with h5py.File(features_dir / f"{roi.stem}.h5", "r") as f:
            stored, coords = torch.from_numpy(f["features"][:]), f["coords"][:]
        assert len(coords) >= 3  # a 96 px crop holds 9 patch positions; the tissue mask keeps most
        with torch.no_grad():
            ref = up.encode_image(roi_patches(roi, coords, 32), proj_contrast=False, normalize=False)
            patch_emb = up.visual.forward_project(ref)
        assert _cos(stored, ref) >= MIN_COS
        scores, probs = slide_probabilities(patch_emb, text, k=3, logit_scale=float(up.logit_scale.detach()))
        assert preds[roi.stem]["k"] == "3"
        assert_row_matches(preds[roi.stem], scores, probs, list(TOY_PROMPTS["classes"]),
                           float(up.logit_scale.detach()))


# ----------------------------------------------------------------------------- the real size
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """CONCH v1 at its real size (ViT-B/16 at 448 px, 200 M parameters), built with CONCH's code."""
    cfg = json.loads((CFG_DIR / "conch_ViT-B-16.json").read_text())
    cfg.pop("custom_text")
    torch.manual_seed(0)
    coca = CoCa(**cfg)
    path = tmp_path_factory.mktemp("conch_v1") / "pytorch_model.bin"
    state = _released(coca, path)
    del coca
    up, _ = create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=str(path))
    return up.eval(), path, state


@pytest.mark.slow
def test_conch_v1_as_released_matches_upstream(released):
    up, path, state = released
    assert len(state) == 326 and not any(k.startswith("text_decoder.") for k in state)
    assert state["visual.trunk.pos_embed"].shape == (1, 785, 768) and state["text.cls_emb"].shape == (768,)
    model = create_model("conch_v1", weights=path)
    assert set(model.state_module.state_dict()) == set(state)
    x = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        pairs = [
            (up.encode_image(x, proj_contrast=False, normalize=False), model.encode_image(x, keep_rate=1.0)),
            (up.encode_image(x), model.encode_image(x, keep_rate=1.0, project=True)),
            (up.encode_text(_upstream_ids(TEXTS, 127)), model.encode_prompts(TEXTS)),
        ]
    for ref, ours in pairs:
        assert ref.shape == ours.shape and ours.shape[-1] == 512
        assert _cos(ref, ours) >= MIN_COS and float((ref - ours).abs().max()) <= 1e-4


@pytest.mark.slow
def test_adapter_on_conch_v1(released, tmp_path):
    """``train --adapter-only`` on the released file: a small file that changes the features, tied to the base."""
    from wsi_pipeline.synthetic import TISSUE_CLASSES, write_roi_dataset
    from wsi_pipeline.train import TrainConfig, train_model

    _, path, _ = released
    write_roi_dataset(tmp_path / "rois", TISSUE_CLASSES, n_per_class=2, size=64, seed=5)
    prompts = tmp_path / "p.yaml"
    prompts.write_text(json.dumps({"name": "p", "templates": ["an image of CLASSNAME."],
                                   "classes": {c: [c] for c in TISSUE_CLASSES}}))
    cfg = TrainConfig(str(tmp_path / "rois"), str(prompts), str(tmp_path / "run"), model="conch_v1", weights=str(path),
                      adapter_only=True, epochs=1, batch_size=2, steps_per_epoch=1, val_fraction=0.0, warmup_steps=0,
                      w_cls_l1=0.0, seed=0)
    result = train_model(cfg)
    size, base = result.weights.stat().st_size, path.stat().st_size
    assert result.weights.name == "adapter.safetensors" and size < 0.05 * base, (size, base)
    model = create_model("conch_v1", weights=path)
    info = load_adapter(model, result.weights)
    assert info.base_weights_sha256 == model.weights_sha256 and info.layers == (3, 6, 9)
    x = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(5))
    c = model.encode_prompts(["an image of tumour"])[0]
    with torch.no_grad():
        assert _cos(model.encode_image(x, context=c), model.encode_image(x)) < MIN_COS
    with pytest.raises(CheckpointError, match="was trained on conch_v1 weights"):
        load_adapter(create_model("conch_v1", device="meta"), result.weights)
