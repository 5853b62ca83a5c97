"""Context adapters: train on a frozen base, save, attach anywhere, refuse any other base."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from slide_factory import make_slide

from wsi_pipeline.cli import main
from wsi_pipeline.config import TilingConfig
from wsi_pipeline.embed.stage import EmbedConfig, embed_slides
from wsi_pipeline.errors import CheckpointError, ConfigError
from wsi_pipeline.model import create_model, save_weights
from wsi_pipeline.model.adapter import ADAPTER_FORMAT, load_adapter, new_adapter, read_adapter, save_adapter
from wsi_pipeline.store.features import get_store
from wsi_pipeline.synthetic import TISSUE_CLASSES, write_roi_dataset
from wsi_pipeline.tiling.stage import tile_slides
from wsi_pipeline.train import TrainConfig, train_model

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PROMPTS = ROOT / "configs" / "prompts" / "demo_train.yaml"
PROMPTS = ROOT / "configs" / "prompts" / "demo.yaml"


OPEN_CLIP_TINY = "wsi-adapter-tiny-vit"
#: One tiny model per backbone family: the adapter mechanism must work on every one of them.
BACKBONES = ["convlm_test", "conch_test", f"open_clip:{OPEN_CLIP_TINY}", "hf_clip"]


@pytest.fixture(scope="module", autouse=True)
def _tiny_open_clip(tmp_path_factory):
    import open_clip

    path = tmp_path_factory.mktemp("oc") / f"{OPEN_CLIP_TINY}.json"
    path.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(path)


def _base(tmp_path: Path, name: str, seed: int = 0) -> Path:
    """Weights of a tiny ``name`` on seed ``seed`` in the family's own layout (a folder for hf_clip)."""
    if name == "hf_clip":
        from hf_factory import TINY_TEXT, TINY_VISION, clip_tokenizer, make_clip_folder

        folder = tmp_path / f"hf-{seed}"
        make_clip_folder(folder, clip_tokenizer(tmp_path / "bpe"), TINY_VISION, TINY_TEXT, "gelu", seed=seed)
        return folder
    torch.manual_seed(seed)
    path = tmp_path / f"{name.replace(':', '-')}-{seed}.safetensors"
    save_weights(create_model(name), path)
    return path


def _x(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def _ctx(model) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(model.proj_dim, generator=torch.Generator().manual_seed(8)), dim=0)


@pytest.mark.parametrize("name", BACKBONES)
def test_round_trip_is_exact_and_declares_its_base(tmp_path, name):
    weights = _base(tmp_path, name)
    model = create_model(name, weights=weights)
    torch.manual_seed(1)
    new_adapter(model, layers=(0, 2), hidden=16, alpha=0.2)
    with torch.no_grad():  # make the adapter matter: random-init MLP outputs are tiny
        for p in model.context_mlp.parameters():
            p.mul_(50)
        ref = model.encode_image(_x(), context=_ctx(model))
    path = tmp_path / "adapter.safetensors"
    sha = save_adapter(model, path)
    assert model.adapter_sha256 == sha
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), sorted(f.keys())
    assert meta["format"] == ADAPTER_FORMAT and meta["base_model"] == name
    assert meta["base_weights_sha256"] == model.weights_sha256 and json.loads(meta["layers"]) == [0, 2]
    assert float(meta["alpha"]) == 0.2 and meta["hidden"] == "16" and float(meta["keep_rate"]) == 0.7
    assert json.loads(meta["refine_layers"]) == list(model.refine_layers) == [1, 2]
    assert keys == sorted(f"context_mlp.{b}.{i}.{w}" for b in (0, 2) for i in (0, 2) for w in ("weight", "bias"))

    fresh = create_model(name, weights=weights)
    info = load_adapter(fresh, path)
    assert info.sha256 == sha == fresh.adapter_sha256 and fresh.context_alpha == 0.2
    assert fresh.refine_layers == (1, 2) and fresh.keep_rate == 0.7  # the schedule it was trained with
    with torch.no_grad():
        out = fresh.encode_image(_x(), context=_ctx(fresh))
        plain = fresh.encode_image(_x())
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.allclose(out, plain, atol=1e-4)


def test_an_adapter_replaces_the_native_context_mlps(tmp_path):
    weights = _base(tmp_path, "convlm_test")
    model = create_model("convlm_test", weights=weights)
    with torch.no_grad():
        native = model.encode_image(_x(), context=_ctx(model))
    torch.manual_seed(2)
    new_adapter(model)
    with torch.no_grad():
        for p in model.context_mlp.parameters():
            p.mul_(50)
        adapted = model.encode_image(_x(), context=_ctx(model))
    assert not torch.allclose(native, adapted, atol=1e-4)
    assert sorted(model._context_mlps()) == [1, 2]


def test_adapters_are_refused_on_any_other_base(tmp_path):
    weights = _base(tmp_path, "convlm_test")
    model = create_model("convlm_test", weights=weights)
    new_adapter(model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    other = create_model("convlm_test", weights=_base(tmp_path, "convlm_test", seed=1))
    with pytest.raises(CheckpointError, match=r"was trained on convlm_test weights [0-9a-f]{12}, not on [0-9a-f]{12}"):
        load_adapter(other, path)
    with pytest.raises(CheckpointError, match="was trained on model convlm_test, not conch_test"):
        load_adapter(create_model("conch_test"), path)
    with pytest.raises(CheckpointError, match="not on none"):
        load_adapter(create_model("convlm_test"), path)  # a random init is another base too
    with pytest.raises(CheckpointError, match="is not a context adapter"):
        load_adapter(other, weights)  # model weights passed as an adapter
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_adapter(cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_adapter(tmp_path / "nope.safetensors")


def test_tampered_shapes_are_refused(tmp_path):
    weights = _base(tmp_path, "convlm_test")
    model = create_model("convlm_test", weights=weights)
    new_adapter(model, hidden=16)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = blob[8 : 8 + n].replace(b'"hidden":"16"', b'"hidden":"17"')
    (tmp_path / "bad.safetensors").write_bytes(blob[:8] + header + blob[8 + n :])
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_adapter(create_model("convlm_test", weights=weights), tmp_path / "bad.safetensors")


def test_new_adapter_checks_its_settings():
    model = create_model("convlm_test")
    with pytest.raises(ConfigError, match="outside"):
        new_adapter(model, layers=(1, 9))
    with pytest.raises(ConfigError, match="alpha"):
        new_adapter(model, alpha=0.0)


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def rois(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter_rois")
    write_roi_dataset(out, TISSUE_CLASSES, n_per_class=6, size=64, seed=11)
    return out


def _adapter_cfg(data: Path, prompts: Path, out: Path, weights: Path, name: str = "conch_test", **kw) -> TrainConfig:
    base = dict(model=name, weights=str(weights), adapter_only=True, epochs=2, batch_size=8, steps_per_epoch=6,
                lr_head=5e-3, warmup_steps=0, val_fraction=0.25, seed=3, threads=1)
    base.update(kw)
    return TrainConfig(str(data), str(prompts), str(out), **base)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", BACKBONES)
def test_adapter_training_touches_nothing_but_the_adapter(rois, tmp_path, name):
    weights = _base(tmp_path, name)
    before = {k: v.clone() for k, v in create_model(name, weights=weights).state_module.state_dict().items()}
    a = train_model(_adapter_cfg(rois, TRAIN_PROMPTS, tmp_path / "a", weights, name))
    b = train_model(_adapter_cfg(rois, TRAIN_PROMPTS, tmp_path / "b", weights, name))
    assert a.weights.name == "adapter.safetensors" and not (tmp_path / "a" / "model.safetensors").exists()
    assert a.sha256 == b.sha256, "adapter training is not deterministic"
    torch.manual_seed(3)  # what training started from: the same seed, model build and adapter init
    start = create_model(name, weights=weights)
    new_adapter(start)
    trained_state, init_state = a.model.context_mlp.state_dict(), start.context_mlp.state_dict()
    assert all(not torch.equal(trained_state[k], init_state[k]) for k in init_state), "the adapter did not train"
    assert {"loss_align", "loss_context_l1", "loss_cls_l1"} <= set(a.history[-1])
    after = a.model.state_module.state_dict()
    if name == "convlm_test":  # the native model holds its context MLPs in its checkpoint: only those changed
        changed = sorted({k.split(".")[0] for k in before if not torch.equal(before[k], after[k])})
        assert changed == ["context_mlp"]
    else:
        assert all(torch.equal(before[k], after[k]) for k in before)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["base_weights_sha256"] == a.model.weights_sha256 and config["weights"] == "adapter.safetensors"
    info, _ = read_adapter(a.weights)
    assert info.base_model == name and info.base_weights_sha256 == a.model.weights_sha256


def test_full_training_of_a_released_backbone_is_refused(rois, tmp_path):
    weights = _base(tmp_path, "conch_test")
    cfg = _adapter_cfg(rois, TRAIN_PROMPTS, tmp_path / "r", weights, adapter_only=False)
    with pytest.raises(ConfigError, match="--adapter-only"):
        train_model(cfg)
    with pytest.raises(ConfigError, match="add --adapter-only"):
        TrainConfig(str(rois), str(TRAIN_PROMPTS), str(tmp_path / "r"), adapter_hidden=8).validate()


# ----------------------------------------------------------------------------- embed / classify / CLI
@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapter_embed")
    make_slide(root / "a.svs", 1400, 1000, mpp=0.5, layout="svs", levels=(1, 4), seed=1)
    out = root / "out"
    [r] = tile_slides([root / "a.svs"], out, TilingConfig(patch_size=64, target_mpp=1.0, seg_level_mpp=4.0,
                                                          min_tissue_area=2000.0))
    assert r.status == "ok" and r.n_patches > 5
    return out


@pytest.fixture(scope="module")
def trained(rois, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapter_run")
    weights = _base(root, "conch_test")
    res = train_model(_adapter_cfg(rois, TRAIN_PROMPTS, root / "run", weights))
    return weights, res.weights


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_embed_with_an_adapter(tiled, trained):
    weights, adapter = trained
    base = dict(model="conch_test", weights=str(weights), workers=0, device="cpu")
    with pytest.raises(ConfigError, match="has no context MLPs: add --adapter"):  # a usage error, not a failed slide
        embed_slides(tiled, EmbedConfig(**base, context=str(PROMPTS)))
    plain = embed_slides(tiled, EmbedConfig(**base))
    adapted = embed_slides(tiled, EmbedConfig(**base, context=str(PROMPTS), adapter=str(adapter)))
    assert plain.count("ok") == adapted.count("ok") == 1
    sha = read_adapter(adapter)[0].sha256
    assert f"-a{sha[:8]}_" in adapted.model_id and "-a" not in plain.model_id
    store = get_store("h5")
    f0 = store.read(tiled / "features", plain.model_id, "a")
    f1 = store.read(tiled / "features", adapted.model_id, "a")
    assert f1.attrs["adapter_sha256"] == sha and f0.attrs["adapter_sha256"] == "none"
    assert f1.attrs["context_alpha"] == 0.1
    assert not np.allclose(f0.features, f1.features, atol=1e-5)


def test_cli_refuses_adapters_in_one_line(tiled, trained, tmp_path):
    weights, adapter = trained
    res = _invoke("embed", tiled, "--model", "conch_test", "--weights", weights, "--adapter", adapter, "--workers", "0",
                  "-q")
    assert res.exit_code == 2 and res.output.strip().startswith("error: --adapter") and "--context" in res.output
    other = _base(tmp_path, "conch_test", seed=5)
    res = _invoke("embed", tiled, "--model", "conch_test", "--weights", other, "--adapter", adapter,
                  "--context", PROMPTS, "--workers", "0", "-q")
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and "was trained on conch_test weights" in res.output
    assert "Traceback" not in res.output


def test_train_cli_adapter_only(rois, tmp_path):
    weights = _base(tmp_path, "convlm_test")
    res = _invoke("train", "--data", rois, "--prompts", TRAIN_PROMPTS, "-o", tmp_path / "run", "--model", "convlm_test",
                  "--weights", weights, "--adapter-only", "--adapter-layers", "1,3", "--adapter-hidden", "8",
                  "--epochs", "1", "--batch-size", "8", "--threads", "1", "-q")
    assert res.exit_code == 0, res.output
    assert "adapter.safetensors" in res.output
    info, _ = read_adapter(tmp_path / "run" / "adapter.safetensors")
    assert info.layers == (1, 3) and info.hidden == 8
    res = _invoke("train", "--data", rois, "--prompts", TRAIN_PROMPTS, "-o", tmp_path / "r2", "--model", "convlm_test",
                  "--adapter-layers", "1,x", "--adapter-only")
    assert res.exit_code == 2 and "--adapter-layers" in res.output


def test_classify_uses_its_prompts_as_the_adapters_context(tiled, trained, tmp_path):
    import shutil

    weights, adapter = trained
    out = tmp_path / "out"
    shutil.copytree(tiled / "coords", out / "coords")
    res = _invoke("classify", "--prompts", PROMPTS, "-o", out, "--model", "conch_test", "--weights", weights,
                  "--adapter", adapter, "--workers", "0", "--no-visuals", "-q")
    assert res.exit_code == 0, res.output
    [features_dir] = (out / "features").iterdir()
    sf = get_store("h5").read(out / "features", features_dir.name, "a")
    assert sf.attrs["context_source"] == str(PROMPTS) and sf.attrs["adapter_sha256"] != "none"
    pred = json.loads((out / "predictions" / "demo.json").read_text())
    assert pred["slides"][0]["provenance"]["adapter_sha256"] == sf.attrs["adapter_sha256"]


def test_training_feeds_the_prompt_files_context_sentence(rois, tmp_path, monkeypatch):
    """With a ``context:`` sentence, "agnostic" training feeds its embedding, as the embed stage does."""
    import yaml

    from wsi_pipeline.train import loop

    prompts = yaml.safe_load(TRAIN_PROMPTS.read_text(encoding="utf-8"))
    prompts["context"] = "an H&E section of a tumour, to be classified by its growth pattern"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prompts), encoding="utf-8")
    seen: list[torch.Tensor] = []
    real = loop.convlm_loss

    def spy(model, *args, context=None, **kw):
        seen.append(context.detach().clone())
        return real(model, *args, context=context, **kw)

    monkeypatch.setattr(loop, "convlm_loss", spy)
    weights = _base(tmp_path, "conch_test")
    res = train_model(_adapter_cfg(rois, path, tmp_path / "run", weights, epochs=1, steps_per_epoch=2))
    expected = res.model.encode_prompts([prompts["context"]])[0]
    assert len(seen) == 2 and all(torch.allclose(c, expected, atol=1e-6) for c in seen)


def test_adapters_written_under_the_old_refinement_name_still_load(tmp_path):
    """Adapters of earlier versions record their schedule as ``prune_layers``; they load the same."""
    from safetensors.torch import load_file, save_file

    model = create_model("convlm_test")
    torch.manual_seed(1)
    new_adapter(model, layers=(0, 2), hidden=16, alpha=0.2)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta["prune_layers"] = meta.pop("refine_layers")
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=meta)
    assert read_adapter(old)[0].refine_layers == read_adapter(path)[0].refine_layers == (1, 2)
    del meta["prune_layers"]
    save_file(load_file(str(path)), str(old), metadata=meta)
    with pytest.raises(CheckpointError, match="incomplete metadata"):
        read_adapter(old)
