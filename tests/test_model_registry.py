"""Registry contract: every registered model, its JSON config and its model card."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.model import ConVLM, create_model, list_models, list_schemas, register_model
from wsi_pipeline.model import registry as registry_mod
from wsi_pipeline.model.adapter import new_adapter
from wsi_pipeline.model.config import config_dir, get_config, list_configs, validate_config
from wsi_pipeline.model.registry import weights_defined

CARDS = Path(__file__).resolve().parents[1] / "models"
RUN_FULLY_BELOW = 25_000_000  # parameters; bigger models are checked on the meta device only
RUN_BACKWARD_BELOW = 5_000_000  # the backward pass is checked on tiny models only


def test_registered_models_json_configs_and_cards_agree():
    names = set(list_models())
    assert {"convlm_test", "convlm_demo", "convlm_vit_b16", "convlm_vit_l16", "conch_v1", "conch_test"} <= names
    config_built = {n for n in names if not weights_defined(registry_mod._MODELS[n])}
    assert set(list_configs()) == config_built
    cards = {p.stem for p in CARDS.glob("*.md")}
    assert cards == names | set(list_schemas()), (
        "every model (and schema) needs models/<name>.md and vice versa"
    )
    for name in names:
        text = (CARDS / f"{name}.md").read_text(encoding="utf-8")
        for needle in ("Architecture", "Parameters", "Weights", "Licence", name):
            assert needle in text, f"models/{name}.md lacks {needle!r}"


@pytest.fixture(scope="module")
def weights_for(tmp_path_factory):
    """``name -> weights`` for models defined by their weights (a tiny folder per family), else ``None``."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path | None:
        if not weights_defined(registry_mod._MODELS[name]):
            return None
        if name not in made:
            factory = WEIGHTS_FACTORIES[name]  # a new weights-defined model needs a tiny factory here
            made[name] = factory(tmp_path_factory.mktemp(name))
        return made[name]

    return get


def _tiny_hf_clip(folder: Path) -> Path:
    from hf_factory import TINY_TEXT, TINY_VISION, clip_tokenizer, make_clip_folder

    make_clip_folder(folder, clip_tokenizer(folder / "bpe"), TINY_VISION, TINY_TEXT, "gelu", seed=0)
    return folder


WEIGHTS_FACTORIES = {"hf_clip": _tiny_hf_clip}


def _meta_inputs(model: ConVLM) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.empty(2, 3, model.input_size, model.input_size, device="meta")
    return x, torch.empty(model.proj_dim, device="meta")


@pytest.mark.parametrize("name", list_models())
def test_contract_shapes_on_meta(name, weights_for):
    model = create_model(name, weights=weights_for(name), device="meta")
    assert isinstance(model, ConVLM) and model.name == name and not model.training
    if name in list_configs():
        cfg = get_config(name)
        v, r, p = cfg["vision_cfg"], cfg["refine"], cfg["preprocess"]
        assert model.width == v["width"] and model.proj_dim == cfg["embed_dim"]
        assert model.input_size == p["input_size"] and model.context_alpha == r["alpha"] == 0.1
        assert model.refine_layers == tuple(r["layers"])
    assert model.input_size % model.patch_size == 0
    assert len(model.mean) == len(model.std) == 3 and all(s > 0 for s in model.std)
    assert model.keep_rate == 0.7 and all(0 < i < model.depth for i in model.refine_layers)
    assert model.weights_sha256 is None and model.adapter_sha256 is None
    assert isinstance(model.logit_scale, torch.nn.Parameter) and model.logit_scale.shape == ()
    assert model.projection_matrix().shape == (model.embed_dim, model.proj_dim)
    x, c = _meta_inputs(model)
    assert model.encode_image(x).shape == (2, model.embed_dim)
    if not model._context_mlps():  # released backbones: no context without an adapter
        with pytest.raises(ConfigError, match="no context MLPs"):
            model.encode_image(x, context=c)
        new_adapter(model)
    assert model.encode_image(x, context=c, project=True).shape == (2, model.proj_dim)
    tokens = model.tokenize(["an H&E image of tumour"])
    assert tokens.shape == (1, model.context_length)
    assert model.encode_text(tokens.to("meta")).shape == (1, model.proj_dim)


@pytest.mark.parametrize("name", list_models())
def test_small_models_run_fully(name, weights_for):
    weights = weights_for(name)
    n_params = sum(p.numel() for p in create_model(name, weights=weights, device="meta").parameters())
    if n_params > RUN_FULLY_BELOW:
        pytest.skip(f"{name} has {n_params / 1e6:.0f}M parameters; checked on meta only")
    torch.manual_seed(0)
    model = create_model(name, weights=weights)
    if weights is None:
        assert math.isclose(float(model.logit_scale.detach()), math.log(1 / 0.07), rel_tol=1e-6)
    x = torch.randn(2, 3, model.input_size, model.input_size)
    with torch.no_grad():
        feats = model.encode_image(x)
        z = model.project(feats)
        full = model.encode_image(x, keep_rate=1.0)
    assert not torch.allclose(feats, full, atol=1e-4), "refinement left the feature unchanged"
    t = model.encode_prompts(["adenocarcinoma", "squamous cell carcinoma"])
    assert feats.shape == (2, model.embed_dim) and torch.isfinite(feats).all()
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
    assert not t.requires_grad
    if not model._context_mlps():
        new_adapter(model)
    if n_params > RUN_BACKWARD_BELOW:
        return
    model.train()
    loss = (model.encode_image(x, context=t.mean(0), project=True) @ t.T).sum()
    loss = loss + model.encode_text(model.tokenize(["x"])).sum()
    loss.backward()
    unused = ("logit_scale", "attn_pool_caption", "ln_caption")  # CONCH's captioning pooler is never run
    missing = [n for n, p in model.named_parameters() if not any(u in n for u in unused) and p.grad is None]
    assert missing == []


def test_tokenizer_is_open_clip_bpe_with_cfg_context_length():
    model = create_model("convlm_test", device="meta")
    tokens = model.tokenize(["an H&E image of adenocarcinoma."])
    assert tokens.dtype == torch.long and tokens.shape == (1, 32)
    # golden ids from open_clip's bundled BPE vocab: <sot> ... <eot>, zero padded
    assert tokens[0, :12].tolist() == [49406, 550, 327, 261, 324, 2867, 539, 594, 9429, 46810, 269, 49407]
    assert tokens[0, 12:].eq(0).all()
    assert model.tokenize("one text").shape == (1, 32)


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_precision_sets_parameter_dtype(precision, dtype):
    torch.manual_seed(0)
    ref = create_model("convlm_test")
    torch.manual_seed(0)
    model = create_model("convlm_test", precision=precision)
    assert {p.dtype for p in model.parameters()} == {dtype}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.encode_image(x, keep_rate=1.0)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.encode_image(x, keep_rate=1.0), atol=0.1, rtol=0.05)


def test_create_model_rejects_bad_input():
    with pytest.raises(ConfigError, match="unknown model 'nope'.*convlm_test"):
        create_model("nope")
    with pytest.raises(ConfigError, match="precision"):
        create_model("convlm_test", precision="fp8")
    with pytest.raises(ConfigError, match="device"):
        create_model("convlm_test", device="not-a-device")
    with pytest.raises(ConfigError, match="meta"):
        create_model("convlm_test", device="meta", weights="w.safetensors")
    with pytest.raises(ConfigError, match="open_clip architecture"):
        create_model("open_clip:hf-hub:someone/model")
    with pytest.raises(ConfigError, match="open_clip architecture"):
        create_model("open_clip:No-Such-ViT")


def test_register_model_decorator_adds_a_builder():
    def convlm_tmp_for_test() -> ConVLM:
        return create_model("convlm_test", device="meta")

    try:
        assert register_model(convlm_tmp_for_test) is convlm_tmp_for_test
        assert "convlm_tmp_for_test" in list_models()
        assert create_model("convlm_tmp_for_test", device="meta").name == "convlm_test"
        with pytest.raises(ValueError, match="twice"):
            register_model(convlm_tmp_for_test)
    finally:
        registry_mod._MODELS.pop("convlm_tmp_for_test", None)


def test_config_validation_names_the_problem(tmp_path):
    good = get_config("convlm_test")
    validate_config(good)
    bad = get_config("convlm_test")
    bad["refine"]["layers"] = [1, 9]
    with pytest.raises(ConfigError, match="refine.layers"):
        validate_config(bad)
    bad = get_config("convlm_test")
    bad["preprocess"]["input_size"] = 64
    with pytest.raises(ConfigError, match="input_size"):
        validate_config(bad)
    bad = get_config("convlm_test")
    del bad["text_cfg"]
    with pytest.raises(ConfigError, match="text_cfg"):
        validate_config(bad)
    assert (config_dir() / "convlm_test.json").is_file()
