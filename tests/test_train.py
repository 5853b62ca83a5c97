"""ConVLM training: data, sampling, augmentation, the objective, determinism and saved weights.

Training runs use the tiny ``convlm_test`` model on a few generated 64-px ROIs, so the
whole file runs in well under a minute on two cores.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from wsi_pipeline.classify.prompts import load_prompts
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.model import create_model
from wsi_pipeline.model.convlm import clip_tokenizer
from wsi_pipeline.synthetic import TISSUE_CLASSES, write_roi_dataset
from wsi_pipeline.train import (
    Augment,
    LossWeights,
    PromptSampler,
    TextAugment,
    TrainConfig,
    convlm_loss,
    train_model,
)
from wsi_pipeline.train.data import epoch_order, load_roi_table, read_images, stratified_split
from wsi_pipeline.train.loop import lr_factor, param_group
from wsi_pipeline.train.loss import CONTEXT_MODES, ClsRegressionHeads, context_fn

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PROMPTS = ROOT / "configs" / "prompts" / "demo_train.yaml"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def rois(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rois")
    write_roi_dataset(out, TISSUE_CLASSES, n_per_class=6, size=64, seed=11)
    return out


def tiny_config(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(model="convlm_test", epochs=2, batch_size=16, steps_per_epoch=30, lr_backbone=1e-3, lr_text=1e-3,
                lr_head=5e-3, warmup_steps=0, val_fraction=0.2, seed=3, threads=1)
    base.update(kw)
    return TrainConfig(str(data), str(TRAIN_PROMPTS), str(out), **base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(rois: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    a = train_model(tiny_config(rois, tmp_path_factory.mktemp("run_a")))
    b = train_model(tiny_config(rois, tmp_path_factory.mktemp("run_b")))
    return a, b


# ----------------------------------------------------------------------------- reference
def plain_class_embeddings(model: torch.nn.Module, prompts) -> torch.Tensor:
    """The CONCH ensemble, written out: mean of normalised prompt embeddings, re-normalised."""
    rows = []
    with torch.no_grad():
        for texts in prompts.expand().values():
            e = F.normalize(model.encode_text(model.tokenize(texts), normalize=False), dim=-1)
            rows.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)


def plain_loss(model: torch.nn.Module, images_u8: torch.Tensor, y: torch.Tensor, prompts) -> float:
    """Zero-shot CE with the label-agnostic context, from first principles."""
    x = (images_u8.float() / 255.0 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    t = plain_class_embeddings(model, prompts)
    ctx = F.normalize(t.mean(0), dim=-1)
    with torch.no_grad():
        f = model.encode_image(x, context=ctx)
        z = F.normalize(f @ model.image_projection, dim=-1)
        logits = model.logit_scale.exp() * z @ t.t()
    return float(F.cross_entropy(logits, y))


# ----------------------------------------------------------------------------- data
def test_image_folder_and_csv_give_the_same_table(rois: Path) -> None:
    folder = load_roi_table(rois)
    table = load_roi_table(rois / "labels.csv")
    assert len(folder) == 24 and folder.counts() == dict.fromkeys(sorted(TISSUE_CLASSES), 6)
    assert sorted(zip(folder.paths, folder.labels, strict=True)) == sorted(zip(table.paths, table.labels, strict=True))


def test_bad_roi_sources_raise_config_errors(tmp_path: Path, rois: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_roi_table(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no class folders"):
        load_roi_table(tmp_path / "empty")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,x\n")
    with pytest.raises(ConfigError, match="needs a header with columns 'path, label'"):
        load_roi_table(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\nnot_there.png,solid\n")
    with pytest.raises(ConfigError, match=r"missing.csv line 2: image not_there.png not found"):
        load_roi_table(missing)


def test_labels_without_prompt_class_are_refused(rois: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "rois.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerow([str(rois / "solid" / "0.png"), "solid"])
        w.writerow([str(rois / "stroma" / "0.png"), "necrosis"])
    with pytest.raises(ConfigError, match="ROI labels necrosis have no class"):
        train_model(tiny_config(csv_path, tmp_path / "out"))


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(val_fraction=1.0), dict(lr_text=-1.0),
                                 dict(context_mode="oracle"), dict(w_align=0.0), dict(save_precision="int8"),
                                 dict(word_dropout=1.5)])
def test_bad_options_raise_config_errors(rois: Path, tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ConfigError):
        tiny_config(rois, tmp_path, **bad).validate()


def test_read_images_uses_the_embed_resize(rois: Path) -> None:
    from PIL import Image

    from wsi_pipeline.embed.dataset import resize_patches

    table = load_roi_table(rois)
    imgs = read_images(table.paths[:3], 32)
    ref = resize_patches(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in table.paths[:3]]), 32)
    assert imgs.dtype == torch.uint8 and imgs.shape == (3, 3, 32, 32)
    assert torch.equal(imgs, ref)


def test_stratified_split_is_per_class_and_deterministic() -> None:
    y = [0] * 20 + [1] * 10 + [2] * 1
    tr, va = stratified_split(y, 0.2, seed=5)
    assert np.bincount(np.asarray(y)[va], minlength=3).tolist() == [4, 2, 0]
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(31))
    tr2, va2 = stratified_split(y, 0.2, seed=5)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert len(stratified_split(y, 0.0, seed=5)[1]) == 0


def test_a_slide_column_keeps_each_slide_on_one_side(rois: Path, tmp_path: Path) -> None:
    """Patches of one slide never land in both training and validation."""
    rng = np.random.default_rng(0)
    slides = [f"s{i // 7}" for i in range(70)]  # 10 slides of 7 patches, mixed classes
    y = rng.integers(0, 3, size=70).tolist()
    for seed in range(5):
        tr, va = stratified_split(y, 0.2, seed=seed, slides=slides)
        assert sorted(np.concatenate([tr, va]).tolist()) == list(range(70))
        g = np.asarray(slides)
        assert not set(g[tr]) & set(g[va]) and 0 < len(va) <= 14
        assert set(np.asarray(y)[tr]) == {0, 1, 2}  # every class keeps training images
    assert np.array_equal(stratified_split(y, 0.2, 3, slides)[1], stratified_split(y, 0.2, 3, slides)[1])
    # the CSV column: read, and every row must have one
    rows = (rois / "labels.csv").read_text().splitlines()
    with_slides = tmp_path / "with_slides.csv"
    with_slides.write_text("\n".join([rows[0] + ",slide", *(f"{r},{i % 4}" for i, r in enumerate(rows[1:]))]) + "\n")
    for p in load_roi_table(rois / "labels.csv").paths:
        (tmp_path / p.parent.name).mkdir(exist_ok=True)
        shutil.copy(p, tmp_path / p.parent.name / p.name)
    table = load_roi_table(with_slides)
    assert table.slides == tuple(str(i % 4) for i in range(len(rows) - 1))
    assert load_roi_table(rois / "labels.csv").slides is None
    with_slides.write_text(with_slides.read_text().replace(",1\n", ",\n", 1))
    with pytest.raises(ConfigError, match="empty slide"):
        load_roi_table(with_slides)


def test_balanced_sampler_equalises_classes() -> None:
    labels = torch.tensor([0] * 90 + [1] * 10)
    order = epoch_order(labels, 4000, torch.Generator().manual_seed(0), balanced=True)
    frac = float((labels[order] == 1).float().mean())
    assert abs(frac - 0.5) < 0.03  # 10 % of the images, half of the draws
    plain = epoch_order(labels, 100, torch.Generator().manual_seed(0), balanced=False)
    assert sorted(plain.tolist()) == list(range(100))  # a permutation: every image once


def test_augment_is_seeded_and_geometric_ops_only_move_pixels() -> None:
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    geo = Augment(flips=True, rot90=True, brightness=0, contrast=0, saturation=0, stain=0)
    out = geo(x, torch.Generator().manual_seed(1))
    for a, b in zip(x, out, strict=True):  # each output is one of the 8 dihedral transforms of its input
        cands = [torch.rot90(t, k, dims=(-2, -1)) for t in (a, a.flip(-1)) for k in range(4)]
        assert any(torch.equal(b, c) for c in cands)
    assert not torch.equal(out, x)
    full = Augment()
    o1, o2 = full(x, torch.Generator().manual_seed(2)), full(x, torch.Generator().manual_seed(2))
    assert torch.equal(o1, o2) and o1.dtype == torch.uint8
    assert not torch.equal(o1, full(x, torch.Generator().manual_seed(3)))
    assert torch.equal(Augment.off()(x, torch.Generator()), x)


# ----------------------------------------------------------------------------- text
def test_prompt_sampler_without_augmentation_matches_the_tokenizer() -> None:
    prompts = load_prompts(TRAIN_PROMPTS)
    tok = clip_tokenizer(48)
    sampler = PromptSampler(prompts, tok, 48, 49408, None, seed=0)
    expanded = {c: set(v) for c, v in prompts.expand().items()}
    for c, cls in enumerate(prompts.class_names):
        for _ in range(5):
            before, syn, after = sampler.text(c)
            text = " ".join(p for p in (before, syn, after) if p)
            assert text.replace(" .", ".").replace(" ,", ",").replace(" :", ":") in expanded[cls] or any(
                text.split() == t.split() for t in expanded[cls])
            assert sampler.pad(sampler.tokens(before, syn, after)) == tok([text])[0].tolist()


def test_prompt_sampler_augmentation_keeps_the_synonym_intact() -> None:
    prompts = load_prompts(TRAIN_PROMPTS)
    tok = clip_tokenizer(48)
    a = PromptSampler(prompts, tok, 48, 49408, TextAugment(0.5, 3), seed=4)
    b = PromptSampler(prompts, tok, 48, 49408, TextAugment(0.5, 3), seed=4)
    assert torch.equal(a.sample(3), b.sample(3))  # same seed, same batch
    inserted = 0
    for c in range(len(prompts.class_names)):
        for _ in range(20):
            before, syn, after = a.text(c)
            ids = a.tokens(before, syn, after)
            syn_ids = tok.encode(syn)
            assert any(ids[i : i + len(syn_ids)] == syn_ids for i in range(len(ids)))
            inserted += len(ids) - len(tok.encode(" ".join(p for p in (before, syn, after) if p)))
    assert inserted > 0


# ----------------------------------------------------------------------------- objective
@pytest.fixture(scope="module")
def model_and_batch(rois: Path) -> tuple:
    torch.manual_seed(0)
    model = create_model("convlm_test")
    model.train()
    table = load_roi_table(rois)
    imgs = read_images(table.paths[::3], model.input_size)
    x = (imgs.float() / 255.0 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    prompts = load_prompts(TRAIN_PROMPTS)
    y = torch.tensor([prompts.class_names.index(lab) for lab in table.labels[::3]])
    return model, x, y, plain_class_embeddings(model, prompts)


def test_alignment_loss_is_scaled_cosine_cross_entropy(model_and_batch: tuple) -> None:
    model, x, y, t = model_and_batch
    out = convlm_loss(model, x, y, t, LossWeights(1.0, 0.0, 0.0), context=None)
    with torch.no_grad():
        z = F.normalize(model.encode_image(x) @ model.image_projection, dim=-1)
        ref = F.cross_entropy(model.logit_scale.exp() * z @ t.t(), y)
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-5)
    assert set(out.parts) == {"align", "total"}  # weight 0 disables the auxiliary terms


def test_context_l1_term_matches_a_plain_computation(model_and_batch: tuple) -> None:
    model, x, y, t = model_and_batch
    ctx = F.normalize(t.mean(0), dim=-1)
    out = convlm_loss(model, x, y, t, LossWeights(1.0, 0.5, 0.0), context=ctx)
    with torch.no_grad():
        f = model.encode_image(x, context=ctx)
        z = F.normalize(f @ model.image_projection, dim=-1)
        ce = F.cross_entropy(model.logit_scale.exp() * z @ t.t(), y)
        l1 = sum((model.context_mlp[str(b)](ctx) - f).abs().mean() for b in model.refine_layers)
    assert out.parts["context_l1"] == pytest.approx(float(l1), rel=1e-5)
    assert out.total.item() == pytest.approx(float(ce + 0.5 * l1), rel=1e-5)


def test_cls_regression_term_needs_heads_and_is_positive(model_and_batch: tuple) -> None:
    model, x, y, t = model_and_batch
    with pytest.raises(ConfigError, match="regression heads"):
        convlm_loss(model, x, y, t, LossWeights(1.0, 0.0, 1.0), context=None)
    heads = ClsRegressionHeads(list(model.refine_layers), model.embed_dim, model.proj_dim)
    out = convlm_loss(model, x, y, t, LossWeights(1.0, 0.0, 1.0), context=None, heads=heads)
    # with zero-initialised biases and tiny weights the prediction is ~0: L1 ~ mean |target| per block
    expected = len(model.refine_layers) * float(t[y].abs().mean())
    assert out.parts["cls_l1"] == pytest.approx(expected, rel=0.2)


def test_context_modes() -> None:
    t = F.normalize(torch.randn(4, 8), dim=-1)
    y = torch.tensor([0, 3, 3, 1, 2, 0])
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(context_fn("agnostic")(t, y, g), F.normalize(t.mean(0), dim=-1))
    assert torch.equal(context_fn("label")(t, y, g), t[y])
    assert context_fn("none")(t, y, g) is None
    mix = context_fn("mix")(t, y, g)
    agn = F.normalize(t.mean(0), dim=-1)
    assert all(torch.equal(r, t[i]) or torch.equal(r, agn) for r, i in zip(mix, y, strict=True))
    assert set(CONTEXT_MODES) == {"agnostic", "label", "none", "mix"}
    with pytest.raises(ConfigError, match="unknown context mode"):
        context_fn("truth")


def test_schedule_and_parameter_groups() -> None:
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    model = create_model("convlm_test", device="meta")
    groups = {n: param_group(n) for n, _ in model.named_parameters()}
    assert groups["visual.blocks.0.attn.qkv.weight"] == "backbone"
    assert groups["text.token_embedding.weight"] == "text"
    assert {groups["image_projection"], groups["logit_scale"], groups["context_mlp.1.0.weight"]} == {"head"}


# ----------------------------------------------------------------------------- training
def test_two_epochs_lower_the_loss(trained: tuple, rois: Path) -> None:
    a, _ = trained
    prompts = load_prompts(TRAIN_PROMPTS)
    table = load_roi_table(rois)
    imgs = read_images(table.paths, 32)
    y = torch.tensor([prompts.class_names.index(lab) for lab in table.labels])
    torch.manual_seed(3)  # the training seed: the same random init train_model started from
    before = plain_loss(create_model("convlm_test"), imgs, y, prompts)
    after = plain_loss(create_model("convlm_test", weights=a.weights), imgs, y, prompts)
    assert after < before - 0.1, (before, after)
    assert a.history[-1]["loss_align"] < a.history[0]["loss_align"]
    assert [r["epoch"] for r in a.history] == [1, 2]
    for key in ("loss", "loss_align", "loss_context_l1", "loss_cls_l1", "val_bacc", "val_bacc_label", "val_bacc_none"):
        assert all(math.isfinite(r[key]) for r in a.history), key


def test_training_is_deterministic(trained: tuple) -> None:
    a, b = trained
    assert a.sha256 == b.sha256
    sa, sb = load_file(str(a.weights)), load_file(str(b.weights))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in b.history]


def test_outputs_and_reload(trained: tuple) -> None:
    a, _ = trained
    for p in (a.weights, a.config_path, a.log_json, a.log_csv, a.out_dir / "aux_heads.safetensors",
              a.out_dir / "model.safetensors.json"):
        assert p.is_file(), p
    config = json.loads(a.config_path.read_text())
    assert config["sha256"] == a.sha256 and config["train_config"]["seed"] == 3
    assert config["classes"] == list(TISSUE_CLASSES)
    log = json.loads(a.log_json.read_text())
    assert [r["loss"] for r in log["epochs"]] == [r["loss"] for r in a.history]
    rows = list(csv.DictReader(open(a.log_csv)))
    assert len(rows) == 2 and float(rows[1]["val_bacc"]) == pytest.approx(a.history[1]["val_bacc"])
    reloaded = create_model("convlm_test", weights=a.weights)
    assert reloaded.weights_sha256 == a.sha256
    ref = a.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in reloaded.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded.encode_image(x), a.model.eval().encode_image(x))


def test_fp16_save_and_frozen_text_tower(rois: Path, tmp_path: Path, trained: tuple) -> None:
    res = train_model(tiny_config(rois, tmp_path, epochs=1, freeze_text=True, save_precision="fp16"))
    state = load_file(str(res.weights))
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    torch.manual_seed(3)
    init = create_model("convlm_test").state_dict()
    model = create_model("convlm_test", weights=res.weights)  # fp16 file into an fp32 model
    assert next(model.parameters()).dtype == torch.float32
    for k, v in model.state_dict().items():
        if k.startswith("text."):
            assert torch.equal(v, init[k].half().float()), k  # frozen: only the fp16 rounding differs
    assert not torch.equal(model.state_dict()["visual.blocks.0.attn.qkv.weight"],
                           init["visual.blocks.0.attn.qkv.weight"].half().float())
    # the returned model is the saved file's (its sha256 names that file): equal weights, equal features
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert res.model.weights_sha256 == model.weights_sha256


def test_cli_train_verb(rois: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from wsi_pipeline.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", str(rois), "--prompts", str(TRAIN_PROMPTS),
                                       "--model", "convlm_test", "-o", str(out), "--epochs", "1",
                                       "--batch-size", "8", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "train_log.json").is_file()
    bad = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "nope"), "--prompts", str(TRAIN_PROMPTS),
                                    "--model", "convlm_test", "-o", str(out)])
    assert bad.exit_code == 2 and "does not exist" in bad.output


# ----------------------------------------------------------------------------- slide patches
def test_slide_patch_labels_follow_the_class_map() -> None:
    from wsi_pipeline.train.slide_rois import label_patch

    rules = dict(min_tissue=0.15, tumour_min=0.6, stroma_max=0.15)
    cm = np.zeros((20, 20), np.uint8)
    assert label_patch(cm, "solid", **rules) is None  # glass only
    cm[:, :6] = 2  # 30 % tissue, all of it tumour (a tumour edge on glass)
    assert label_patch(cm, "solid", **rules) == "solid"
    cm[:, :6] = 1  # the same edge, all stroma
    assert label_patch(cm, "solid", **rules) == "stroma"
    cm[:, :10], cm[:, 10:] = 1, 2  # half stroma, half tumour: ambiguous, skipped
    assert label_patch(cm, "solid", **rules) is None
    cm[:] = 0
    cm[0, 0] = 2  # 0.25 % tissue: below min_tissue
    assert label_patch(cm, "solid", **rules) is None


def test_write_slide_rois_is_deterministic(tmp_path: Path) -> None:
    from PIL import Image

    from wsi_pipeline.train.slide_rois import write_slide_rois

    kw = dict(size=(768, 640), patch=128, stride=128)
    a = write_slide_rois(tmp_path / "a", ("lymphoid",), 1, seed=10_000, **kw)
    b = write_slide_rois(tmp_path / "b", ("lymphoid",), 1, seed=10_000, **kw)
    rows = list(csv.DictReader(open(a)))
    assert rows and {r["label"] for r in rows} <= {"lymphoid", "stroma"}
    assert a.read_text() == b.read_text()
    for r in rows:
        assert r["path"].startswith(f"{r['label']}/s10000_")
        pa, pb = a.parent / r["path"], b.parent / r["path"]
        assert pa.read_bytes() == pb.read_bytes()
        assert Image.open(pa).size == (128, 128)
    assert load_roi_table(a).counts() == load_roi_table(a.parent).counts()


def test_swap_classes_rotates_synonyms() -> None:
    from wsi_pipeline.train.heldout import swap_classes

    p = load_prompts(ROOT / "configs" / "prompts" / "demo.yaml")
    s = swap_classes(p)
    names = p.class_names
    assert s.class_names == names and s.templates == p.templates
    for i, c in enumerate(names):
        assert s.classes[names[(i + 1) % len(names)]] == p.classes[c]
    with pytest.raises(ConfigError, match="own synonyms"):
        swap_classes(p, shift=len(names))
