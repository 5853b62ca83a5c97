"""``hf_clip``: Hugging Face ``CLIPModel`` folders as released, checked against transformers' own code.

Every reference comes from transformers (``CLIPModel`` saved with ``save_pretrained`` on seeded
random weights, LayerNorms randomised too) and its fast CLIP tokenizer, built from the OpenAI
BPE that open_clip ships. Tolerance for "the same model": cosine >= 0.999999 and max abs diff
<= 1e-5 in fp32 on the CPU; the smallest real format error (QuickGELU vs GELU) is far outside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from hf_factory import TINY_TEXT, TINY_VISION, clip_tokenizer, make_clip_folder
from zeroshot_reference import (
    FP16_COS,
    class_embeddings,
    normalized_pixels,
    read_predictions,
    slide_probabilities,
)

from wsi_pipeline.errors import CheckpointError, ConfigError
from wsi_pipeline.model import create_model

COS_MIN = 0.999999
ATOL = 1e-5
MEAN, STD = (0.52, 0.44, 0.61), (0.21, 0.27, 0.19)  # not OpenAI's: proves preprocessor_config.json is read
LONG = "an H&E image of " + " ".join(["poorly differentiated tumour cells with nuclear atypia"] * 20)
TEXTS = ["a photo of a cat", "an H&E image of lung adenocarcinoma.", "Squamous-cell carcinoma, keratinising!", LONG]
QUICK_VISION = {**TINY_VISION, "intermediate_size": 192, "num_attention_heads": 2, "num_hidden_layers": 2}
QUICK_TEXT = {**TINY_TEXT, "num_attention_heads": 4, "eos_token_id": 2}  # the legacy config value


# ------------------------------------------------------------------------------ folders
@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return clip_tokenizer(tmp_path_factory.mktemp("bpe"))


def make_folder(folder: Path, tokenizer, vision: dict, text: dict, act: str, seed: int, projection: int = 32,
                formats: tuple[bool, ...] = (True,)):
    return make_clip_folder(folder, tokenizer, vision, text, act, seed, projection, formats, mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def gelu_dir(tmp_path_factory, hf_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("gelu")
    make_folder(folder, hf_tokenizer, TINY_VISION, TINY_TEXT, "gelu", seed=0, formats=(True, False))
    return folder


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory, hf_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("quick")
    make_folder(folder, hf_tokenizer, QUICK_VISION, QUICK_TEXT, "quick_gelu", seed=1, formats=(True, False))
    return folder


def _reference(folder: Path):
    return transformers.CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _compare(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(max abs diff, min row cosine)``."""
    diff = float((ours - ref).abs().max())
    cos = float(F.cosine_similarity(ours.double(), ref.double(), dim=-1).min())
    return diff, cos


def assert_same(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, what
    diff, cos = _compare(ours, ref)
    print(f"{what}: max abs diff {diff:.2e}, 1 - min cos {1 - cos:.1e}")
    assert cos >= COS_MIN and diff <= ATOL, f"{what}: max abs diff {diff:.2e}, min cos {cos:.9f}"


def _hf_text(ref, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ids (padding to 77, truncation) and normalised text features."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        feats = ref.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return enc["input_ids"], F.normalize(feats, dim=-1)


def _check_against_transformers(model, ref, tokenizer, size: int, label: str) -> None:
    x = _pixels(3, size)
    with torch.no_grad():
        assert_same(model.encode_image(x, keep_rate=1.0), ref.vision_model(pixel_values=x).pooler_output,
                    f"{label} pre-projection")
        assert_same(model.encode_image(x, keep_rate=1.0, project=True),
                    F.normalize(ref.get_image_features(pixel_values=x), dim=-1), f"{label} projected")
        ids, ref_text = _hf_text(ref, tokenizer, TEXTS)
        tokens = model.tokenize(TEXTS)
        assert torch.equal(tokens, ids), f"{label}: token ids differ from transformers'"
        assert_same(model.encode_text(tokens), ref_text, f"{label} text")
        assert float((ref_text @ ref_text.T - torch.eye(len(TEXTS))).max()) < 0.99  # the prompts are told apart
        assert float(model.logit_scale) == pytest.approx(float(ref.logit_scale))


# ------------------------------------------------------------------------------ tokenizer
def test_bpe_construction_matches_open_clip(hf_tokenizer):
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    for text in ("a photo of a cat", "an H&E image of lung adenocarcinoma."):
        expected = [simple.encoder["<start_of_text>"], *simple.encode(text), simple.encoder["<end_of_text>"]]
        assert hf_tokenizer(text)["input_ids"] == expected
    assert len(hf_tokenizer) == 49408 and hf_tokenizer.eos_token_id == 49407


# ------------------------------------------------------------------------------ (a) equivalence
@pytest.mark.parametrize("target", ["", "model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("which", ["gelu", "quick_gelu"])
def test_matches_transformers(which, target, gelu_dir, quick_dir, hf_tokenizer):
    folder = gelu_dir if which == "gelu" else quick_dir
    model = create_model("hf_clip", weights=folder / target if target else folder)
    expected_file = folder / (target or "model.safetensors")
    assert model.name == "hf_clip" and model.weights_path == str(expected_file)
    assert model.cfg["hidden_act"] == which and model.full_training is False
    assert model.mean == MEAN and model.std == STD and model.input_size == 32
    import hashlib

    assert model.weights_sha256 == hashlib.sha256(expected_file.read_bytes()).hexdigest()
    _check_against_transformers(model, _reference(folder), hf_tokenizer, 32, f"{which}/{target or 'folder'}")


def test_architecture_is_read_from_config(gelu_dir, quick_dir):
    g = create_model("hf_clip", weights=gelu_dir)
    q = create_model("hf_clip", weights=quick_dir)
    assert (g.depth, g.num_heads, g.embed_dim, g.proj_dim, g.context_length) == (3, 4, 64, 32, 77)
    assert (q.depth, q.num_heads) == (2, 2)
    assert g.clip.visual.transformer.resblocks[0].mlp.c_fc.out_features == 256
    assert q.clip.visual.transformer.resblocks[0].mlp.c_fc.out_features == 192
    assert g.clip.transformer.resblocks[0].mlp.c_fc.out_features == 128
    assert g.cfg["text_cfg"]["pool"] == q.cfg["text_cfg"]["pool"] == "argmax"  # eos 49407 = top id; legacy 2


# ------------------------------------------------------------------------------ (b) activation
def test_activation_is_read_from_config_json(gelu_dir, tmp_path):
    """The same tensors declared quick_gelu must not match transformers' gelu model (open_clip #771)."""
    folder = tmp_path / "relabelled"
    shutil.copytree(gelu_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["hidden_act"] = cfg["vision_config"]["hidden_act"] = "quick_gelu"
    (folder / "config.json").write_text(json.dumps(cfg))
    wrong = create_model("hf_clip", weights=folder)
    assert wrong.cfg["hidden_act"] == "quick_gelu"
    x = _pixels(3, 32)
    with torch.no_grad():
        diff, cos = _compare(wrong.encode_image(x, keep_rate=1.0), _reference(gelu_dir).vision_model(x).pooler_output)
    print(f"gelu weights read as quick_gelu: max abs diff {diff:.2e}, 1 - min cos {1 - cos:.1e}")
    assert cos < COS_MIN


# ------------------------------------------------------------------------------ (c) PLIP-shaped
@pytest.mark.slow
def test_plip_shaped_full_size_bin(tmp_path, hf_tokenizer):
    """ViT-B/32 + 512-wide text, quick_gelu, pytorch_model.bin, config in the older *_config_dict form."""
    folder = tmp_path / "plip"
    folder.mkdir()
    # transformers' defaults are PLIP's shapes: vision 768 / 12 blocks / 12 heads / patch 32 / 224 px, text 512 / 12 / 8
    ref = make_folder(folder, hf_tokenizer, {}, {"eos_token_id": 2}, "quick_gelu", seed=2, projection=512,
                      formats=(False,))
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    n_pos = sum(k.endswith("position_ids") for k in state)
    assert len(state) == 398 + n_pos and n_pos == 0  # transformers >= 4.31 no longer writes position_ids
    del state
    # the older layout: *_config_dict sections and defaults left out
    (folder / "config.json").write_text(json.dumps({
        "model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": 512,
        "text_config_dict": {"eos_token_id": 2}, "vision_config_dict": {"hidden_act": "quick_gelu"},
    }))
    read_back = transformers.CLIPConfig.from_pretrained(str(folder))
    for tower in ("text_config", "vision_config"):
        a, b = getattr(read_back, tower).to_dict(), getattr(ref.config, tower).to_dict()
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "hidden_act",
                    "layer_norm_eps", "eos_token_id"):
            assert a.get(key) == b.get(key), (tower, key)
    model = create_model("hf_clip", weights=folder)
    assert model.cfg["vision_cfg"] == {"width": 768, "layers": 12, "heads": 12, "mlp_ratio": 4.0,
                                       "patch_size": 32, "image_size": 224, "norm_eps": 1e-5}
    assert (model.cfg["text_cfg"]["width"], model.cfg["text_cfg"]["layers"]) == (512, 12)
    x = _pixels(2, 224, seed=5)
    with torch.no_grad():
        assert_same(model.encode_image(x, keep_rate=1.0), ref.vision_model(pixel_values=x).pooler_output,
                    "PLIP-shaped pre-projection")
        assert_same(model.encode_image(x, keep_rate=1.0, project=True),
                    F.normalize(ref.get_image_features(pixel_values=x), dim=-1), "PLIP-shaped projected")
        ids, ref_text = _hf_text(ref, hf_tokenizer, TEXTS[1:])
        tokens = model.tokenize(TEXTS[1:])
        assert torch.equal(tokens, ids)
        assert_same(model.encode_text(tokens), ref_text, "PLIP-shaped text")


# ------------------------------------------------------------------------------ text pooling
def test_text_pooling_follows_transformers_eos_rule(tmp_path, hf_tokenizer, caplog):
    """eos_token_id not the top id: transformers pools at its first occurrence, and so do we."""
    folder = tmp_path / "eos"
    ref = make_folder(folder, hf_tokenizer, TINY_VISION, {**TINY_TEXT, "eos_token_id": 49406}, "gelu", seed=3)
    model = create_model("hf_clip", weights=folder)
    assert model.cfg["text_cfg"]["pool"] == "eos"
    ids, ref_text = _hf_text(ref, hf_tokenizer, TEXTS)
    with torch.no_grad():
        assert_same(model.encode_text(model.tokenize(TEXTS)), ref_text, "first-eos pooling")
        argmax_pooled = F.normalize(model.clip.encode_text(ids), dim=-1)
    assert "pools at eos_token_id 49406" in caplog.text
    model.clip.text_pool_type = "argmax"  # the rule that would be wrong here
    with torch.no_grad():
        _, cos = _compare(F.normalize(model.clip.encode_text(ids), dim=-1), ref_text)
    assert cos < COS_MIN and argmax_pooled.shape == ref_text.shape


# ------------------------------------------------------------------------------ (d) refinement, adapters
def test_refinement_and_context_adapter(gelu_dir):
    from wsi_pipeline.model.adapter import new_adapter

    model = create_model("hf_clip", weights=gelu_dir)
    assert model.refine_layers == (1, 2) and model.keep_rate == 0.7
    x = _pixels(2, 32, seed=7)
    with torch.no_grad():
        full, aux_full = model.forward_features(x, keep_rate=1.0, return_aux=True)
        refined, aux = model.forward_features(x, return_aux=True)
    assert aux_full.num_tokens == [17, 17, 17]
    assert aux.num_tokens == [17, 14, 12]  # 16 patches → keep 12 + fused; 13 → keep 10 + fused
    assert float((full - refined).abs().max()) > 1e-3
    torch.manual_seed(0)
    new_adapter(model)
    c = model.encode_prompts("an H&E image of lung adenocarcinoma.")[0]
    with torch.no_grad():
        guided = model.encode_image(x, context=c, keep_rate=1.0)
        plain = model.encode_image(x, keep_rate=1.0)
    assert torch.allclose(plain, full, atol=1e-6)
    assert float((guided - plain).abs().max()) > 1e-4


# ------------------------------------------------------------------------------ (e) bad inputs
def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def _copy(src: Path, dst: Path, names: tuple[str, ...]) -> Path:
    dst.mkdir()
    for n in names:
        shutil.copy(src / n, dst / n)
    return dst


def test_folder_errors(gelu_dir, quick_dir, tmp_path):
    no_cfg = _copy(gelu_dir, tmp_path / "no_cfg", ("model.safetensors", "tokenizer.json"))
    with pytest.raises(CheckpointError, match="has no config.json") as e:
        create_model("hf_clip", weights=no_cfg)
    _one_line(e)
    with pytest.raises(CheckpointError, match="has no config.json"):
        create_model("hf_clip", weights=no_cfg / "model.safetensors")
    no_weights = _copy(gelu_dir, tmp_path / "no_weights", ("config.json", "tokenizer.json"))
    with pytest.raises(CheckpointError, match="holds no model.safetensors or pytorch_model.bin") as e:
        create_model("hf_clip", weights=no_weights)
    _one_line(e)
    with pytest.raises(ConfigError, match="defined by its weights"):
        create_model("hf_clip")
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model("hf_clip", weights=tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"vision_config": {"hidden_act": "gelu_new"}}, "vision_config.hidden_act 'gelu_new' is not supported"),
        ({"text_config": {"hidden_act": "quick_gelu"}}, "text tower uses 'quick_gelu' but the vision tower 'gelu'"),
        ({"text_config": {"num_attention_heads": 3}}, "not divisible by num_attention_heads 3"),
        ({"vision_config": {"intermediate_size": "big"}}, "intermediate_size must be a positive integer"),
        ({"model_type": "siglip"}, "describes a 'siglip' model"),
    ],
)
def test_config_errors(gelu_dir, tmp_path, edit, match):
    folder = _copy(gelu_dir, tmp_path / "bad", ("model.safetensors",))
    cfg = json.loads((gelu_dir / "config.json").read_text())
    for key, value in edit.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match) as e:
        create_model("hf_clip", weights=folder)
    _one_line(e)


def test_tokenizer_files(gelu_dir, tmp_path, hf_tokenizer):
    bare = _copy(gelu_dir, tmp_path / "bare", ("config.json", "model.safetensors"))
    model = create_model("hf_clip", weights=bare)
    with torch.no_grad():
        model.encode_image(_pixels(1, 32))  # image features need no tokenizer
    with pytest.raises(CheckpointError, match=r"needs tokenizer.json, or vocab.json \+ merges.txt") as e:
        model.encode_prompts(["a photo of a cat"])
    _one_line(e)
    slow_only = _copy(gelu_dir, tmp_path / "slow", ("config.json", "model.safetensors", "vocab.json", "merges.txt",
                                                     "special_tokens_map.json", "tokenizer_config.json"))
    model = create_model("hf_clip", weights=slow_only)
    ids, _ = _hf_text(_reference(gelu_dir), hf_tokenizer, TEXTS)
    assert torch.equal(model.tokenize(TEXTS), ids)


def test_weights_errors(gelu_dir, quick_dir, tmp_path):
    other = _copy(gelu_dir, tmp_path / "other", ("config.json",))
    shutil.copy(quick_dir / "model.safetensors", other / "model.safetensors")  # 2 blocks, 2 heads, MLP 192
    with pytest.raises(CheckpointError, match=r"does not fit model hf_clip: .*missing key.*shape mismatch") as e:
        create_model("hf_clip", weights=other)
    _one_line(e)

    from safetensors.torch import load_file

    state = load_file(str(gelu_dir / "model.safetensors"))
    legacy = _copy(gelu_dir, tmp_path / "legacy", ("config.json",))
    torch.save({**state, "text_model.embeddings.position_ids": torch.arange(77)[None],
                "vision_model.embeddings.position_ids": torch.arange(17)[None]}, legacy / "pytorch_model.bin")
    a = create_model("hf_clip", weights=legacy)
    b = create_model("hf_clip", weights=gelu_dir)
    x = _pixels(2, 32)
    with torch.no_grad():
        assert torch.equal(a.encode_image(x, keep_rate=1.0), b.encode_image(x, keep_rate=1.0))

    extra = _copy(gelu_dir, tmp_path / "extra", ("config.json",))
    torch.save({**state, "text_model.pooler.weight": torch.zeros(3)}, extra / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"1 unexpected key \(text_model.pooler.weight\)"):
        create_model("hf_clip", weights=extra)

    no_q = _copy(gelu_dir, tmp_path / "no_q", ("config.json",))
    torch.save({k: v for k, v in state.items() if k != "vision_model.encoder.layers.1.self_attn.q_proj.bias"},
               no_q / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing key \(visual.transformer.resblocks.1.attn.in_proj_bias\)"):
        create_model("hf_clip", weights=no_q)

    open_clip_file = _copy(gelu_dir, tmp_path / "oc", ("config.json",))
    torch.save({"visual.conv1.weight": torch.zeros(1)}, open_clip_file / "open_clip_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a Hugging Face CLIPModel state dict.*open_clip:<arch>") as e:
        create_model("hf_clip", weights=open_clip_file / "open_clip_pytorch_model.bin")
    _one_line(e)


# ------------------------------------------------------------------------------ (f) classify CLI
def _roi(seed: int, w: int, h: int) -> np.ndarray:
    """Stain-coloured noise: every pixel saturated enough to count as tissue."""
    rng = np.random.default_rng(seed)
    base = np.array([200, 110, 170]) + rng.integers(-40, 40, size=3)
    return np.clip(base + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)


def test_classify_cli_matches_transformers_recipe(gelu_dir, hf_tokenizer, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from wsi_pipeline.cli import main
    from wsi_pipeline.store.features import get_store

    rois = tmp_path / "rois"
    rois.mkdir()
    images = {"roi_a": _roi(1, 96, 64), "roi_b": _roi(2, 64, 64), "roi_c": _roi(3, 128, 96)}
    for name, rgb in images.items():
        Image.fromarray(rgb).save(rois / f"{name}.png")
    classes = {"tumour": ["adenocarcinoma", "tumour"], "stroma": ["stroma"], "immune": ["lymphocytes", "immune cells"]}
    templates = ["an H&E image of CLASSNAME.", "CLASSNAME tissue"]
    prompts = tmp_path / "p.yaml"
    prompts.write_text(json.dumps({"name": "hf", "templates": templates, "classes": classes, "top_k": 3}))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["classify", str(rois), "--prompts", str(prompts), "-o", str(out), "--model", "hf_clip",
                                  "--weights", str(gelu_dir), "--keep-rate", "1.0", "--workers", "0", "--device", "cpu",
                                  "--no-visuals", "--patch-size", "32"], catch_exceptions=False)
    assert r.exit_code == 0, r.output

    ref = _reference(gelu_dir)
    with torch.no_grad():
        class_emb = class_embeddings(lambda t: _hf_text(ref, hf_tokenizer, t)[1], classes, templates)
    rows = read_predictions(out / "predictions" / "hf.csv")
    (feats_dir,) = (out / "features").iterdir()
    assert set(rows) == set(images)
    for name, rgb in images.items():
        stored = get_store("h5").read(feats_dir.parent, feats_dir.name, name)
        assert len(stored.coords) == (rgb.shape[0] // 32) * (rgb.shape[1] // 32)
        x = torch.cat([normalized_pixels(rgb[y : y + 32, x : x + 32], MEAN, STD) for x, y in stored.coords])
        with torch.no_grad():
            assert_same(torch.from_numpy(np.asarray(stored.features)), ref.vision_model(pixel_values=x).pooler_output,
                        f"classify features {name}")
            img = ref.get_image_features(pixel_values=x)
        scores, probs = slide_probabilities(img, class_emb, k=3, logit_scale=float(ref.logit_scale.detach()))
        row = rows[name]
        assert row["status"] == "ok" and int(row["k"]) == min(3, len(x))
        assert row["predicted"] == list(classes)[int(scores.argmax())]
        np.testing.assert_allclose([float(row[f"score_{c}"]) for c in classes], scores, atol=FP16_COS)
        scale = float(ref.logit_scale.detach().exp())
        np.testing.assert_allclose([float(row[f"prob_{c}"]) for c in classes], probs, atol=scale * FP16_COS / 2)


def test_a_changed_config_or_tokenizer_is_never_served_from_old_outputs(gelu_dir, tmp_path):
    """Editing config.json (the activation) in place gives another feature model_id and another
    text-cache entry; editing a tokenizer file gives another text-cache entry (the weights file,
    and so its sha256, stays the same in both cases)."""
    from wsi_pipeline.classify.prompts import load_prompts
    from wsi_pipeline.classify.textclassifier import build_text_classifier, cache_path
    from wsi_pipeline.embed.stage import EmbedConfig, load_encoder, make_model_id

    folder = tmp_path / "plip"
    shutil.copytree(gelu_dir, folder)
    prompts = load_prompts(Path(__file__).resolve().parents[1] / "configs" / "prompts" / "demo.yaml")
    cache = tmp_path / "cache"

    def state():
        model = load_encoder(EmbedConfig(model="hf_clip", weights=str(folder)), torch.device("cpu"))
        text = build_text_classifier(model, prompts, cache_dir=cache)
        fresh = build_text_classifier(model, prompts)  # no cache
        torch.testing.assert_close(text, fresh, rtol=0, atol=0)  # never an old matrix
        mid = make_model_id("hf_clip", model.weights_sha256, 1.0, (), None, None, model.definition_sha256("image"))
        return mid, cache_path(model, prompts, cache), model.weights_sha256

    first = state()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["hidden_act"] = cfg["vision_config"]["hidden_act"] = "quick_gelu"
    (folder / "config.json").write_text(json.dumps(cfg))
    second = state()
    assert second[2] == first[2] and second[0] != first[0] and second[1] != first[1]
    tok = folder / "tokenizer_config.json"
    tok.write_text(tok.read_text().rstrip()[:-1] + ', "comment": "edited"}')
    third = state()
    assert third[0] == second[0] and third[1] != second[1]
