"""The shipped demo model: integrity, and zero-shot accuracy on held-out synthetic data.

Held-out data uses seeds no training run used (see ``wsi_pipeline/demo.py``): ROIs with
generator keys ``(3_000_000, class, i)`` and slides with seeds ``2_000_000 +``; the prompts
are ``configs/prompts/demo.yaml``, whose templates the model never saw in training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from wsi_pipeline.classify.prompts import load_prompts
from wsi_pipeline.demo import TEST_ROI_SEED, TEST_SLIDE_SEED, run_demo
from wsi_pipeline.embed.context import load_context
from wsi_pipeline.embed.dataset import resize_patches
from wsi_pipeline.model import create_model, shipped_notice, shipped_weights
from wsi_pipeline.model.weights import file_sha256, sidecar_path
from wsi_pipeline.synthetic import TUMOUR_CLASSES, render_roi
from wsi_pipeline.synthetic.dataset import roi_rng

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "models" / "convlm_demo.md"
DEMO_PROMPTS = ROOT / "configs" / "prompts" / "demo.yaml"
N_ROIS = 20  # per tumour class


@pytest.fixture(scope="module")
def weights() -> Path:
    path = shipped_weights("convlm_demo")
    assert path is not None, "convlm_demo.safetensors is not shipped; run scripts/train_demo_model.py --install"
    return path


@pytest.fixture(scope="module")
def model(weights: Path) -> torch.nn.Module:
    return create_model("convlm_demo", weights=weights)


@pytest.fixture(scope="module")
def heldout_rois(model: torch.nn.Module) -> tuple[torch.Tensor, np.ndarray]:
    imgs = [render_roi(c, 256, rng=roi_rng(TEST_ROI_SEED, c, i)) for c in TUMOUR_CLASSES for i in range(N_ROIS)]
    y = np.repeat(np.arange(len(TUMOUR_CLASSES)), N_ROIS)
    return resize_patches(np.stack(imgs), model.input_size), y


def class_weights(model: torch.nn.Module, classes: dict[str, list[str]], templates: list[str]) -> torch.Tensor:
    """The prompt ensemble written out: per class the re-normalised mean of normalised prompt embeddings."""
    rows = []
    with torch.no_grad():
        for syns in classes.values():
            texts = [t.replace("CLASSNAME", s) for s in syns for t in templates]
            e = F.normalize(model.encode_text(model.tokenize(texts)), dim=-1)
            rows.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)


def predict(model: torch.nn.Module, imgs_u8: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    x = (imgs_u8.float() / 255.0 - mean) / std
    ctx = load_context(str(DEMO_PROMPTS), model).vector  # the context the embed stage uses
    with torch.no_grad():
        z = F.normalize(model.encode_image(x, context=ctx) @ model.image_projection, dim=-1)
    return (z @ w.t()).argmax(1).numpy()


def balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean([(p[y == c] == c).mean() for c in np.unique(y)]))


def test_card_records_the_sha256_of_the_shipped_file(weights: Path) -> None:
    card = CARD.read_text(encoding="utf-8")
    found = re.findall(r"sha256[^0-9a-f]*([0-9a-f]{64})", card)
    assert found, "the card names no sha256"
    digest = file_sha256(weights)
    assert set(found) == {digest}
    assert json.loads(sidecar_path(weights).read_text())["sha256"] == digest
    assert "synthetic" in card and "not for real slides" in card and "clinical" in card
    assert "scripts/train_demo_model.py" in card


def test_shipped_file_is_small_fp16_and_loads_into_fp32(weights: Path, model: torch.nn.Module) -> None:
    assert weights.stat().st_size <= 20 * 1024 * 1024
    with safe_open(str(weights), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert model.weights_sha256 == file_sha256(weights)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert "synthetic" in (shipped_notice("convlm_demo") or "")
    torch.manual_seed(0)
    assert create_model("convlm_demo").weights_sha256 is None  # no weights given: still a random init


def test_heldout_rois_zero_shot(model: torch.nn.Module, heldout_rois: tuple) -> None:
    imgs, y = heldout_rois
    prompts = load_prompts(DEMO_PROMPTS)
    w = class_weights(model, {c: list(s) for c, s in prompts.classes.items()}, list(prompts.templates))
    p = predict(model, imgs, w)
    assert balanced_accuracy(y, p) >= 0.95, np.bincount(p * 3 + y, minlength=9).reshape(3, 3)


def test_swapped_prompts_move_the_predictions(model: torch.nn.Module, heldout_rois: tuple) -> None:
    imgs, y = heldout_rois
    prompts = load_prompts(DEMO_PROMPTS)
    syns = [list(prompts.classes[c]) for c in TUMOUR_CLASSES]
    swapped = {c: syns[(i - 1) % 3] for i, c in enumerate(TUMOUR_CLASSES)}  # class i gets class i-1's text
    p = predict(model, imgs, class_weights(model, swapped, list(prompts.templates)))
    assert (p == y).mean() <= 0.1  # accuracy collapses ...
    assert (p == (y + 1) % 3).mean() >= 0.9  # ... because the predictions follow the text


@pytest.mark.slow
def test_heldout_slides_full_classify_path(tmp_path: Path, weights: Path, model: torch.nn.Module) -> None:
    from wsi_pipeline.classify.pooling import score_slide
    from wsi_pipeline.store.features import get_store

    res = run_demo(tmp_path, n_per_class=4, seed=TEST_SLIDE_SEED, weights=weights, visuals=False, workers=2)
    assert len(res.truth) == 12 and all(s.startswith(tuple(TUMOUR_CLASSES)) for s in res.truth)
    assert res.balanced_accuracy >= 0.95, res.table()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["balanced_accuracy"] == pytest.approx(res.balanced_accuracy)
    assert res.summary.ks[0] == 10  # top-K pooling with the prompt file's primary K
    # re-score the stored features with the class prompts swapped: the slide predictions follow the text
    prompts = load_prompts(DEMO_PROMPTS)
    syns = [list(prompts.classes[c]) for c in TUMOUR_CLASSES]
    swapped = {c: syns[(i - 1) % 3] for i, c in enumerate(TUMOUR_CLASSES)}
    w = class_weights(model, swapped, list(prompts.templates))
    store, follows = get_store("h5"), 0
    for sid, truth in res.truth.items():
        sf = store.read(tmp_path / "features", res.summary.model_id, sid)
        pred = score_slide(sf.features, sf.attrs, model, w, TUMOUR_CLASSES, (10,)).prediction
        follows += pred == TUMOUR_CLASSES[(TUMOUR_CLASSES.index(truth) + 1) % 3]
    assert follows >= 11


@pytest.mark.slow
def test_cli_demo_verb(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from wsi_pipeline.cli import main

    out = tmp_path / "demo_out"
    result = CliRunner().invoke(main, ["demo", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "balanced accuracy" in result.output and "synthetic" in result.output
    truth = (out / "slides" / "labels.csv").read_text().splitlines()[1:]
    assert len(truth) == 6 and all(line.split(",")[0] in result.output for line in truth)
    assert (out / "report.html").is_file() and (out / "metrics.json").is_file()


def test_card_cli_command_matches_the_training_script() -> None:
    """The ``wsi-pipeline train`` line in the card trains with exactly the script's options."""
    import importlib.util

    from wsi_pipeline.train import TrainConfig

    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    card = CARD.read_text(encoding="utf-8")
    line = re.search(r"wsi-pipeline train (.+)", card).group(1)
    flags = dict(re.findall(r"--([a-z-]+) (\S+)", line))
    assert flags.pop("prompts") == "configs/prompts/demo_train.yaml" and flags.pop("model") == "convlm_demo"
    assert flags.pop("data") == "WORK/train.csv"
    cli = TrainConfig("d", "p", "o", model="convlm_demo", epochs=int(flags.pop("epochs")),
                      threads=int(flags.pop("threads")), save_precision=flags.pop("save-precision"))
    assert not flags, flags
    assert cli == TrainConfig("d", "p", "o", **script.TRAIN_OPTIONS)


def test_demo_refuses_the_training_slide_seeds(tmp_path: Path) -> None:
    """Seeds 9,998 – 10,003 (2 per class) include training slides 10,000 – 10,003: not held out."""
    import importlib.util

    from click.testing import CliRunner

    from wsi_pipeline.cli import main
    from wsi_pipeline.demo import TRAIN_SLIDE_SEEDS

    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    trained = range(script.SLIDE_SEED, script.SLIDE_SEED + 3 * script.SLIDES_PER_CLASS)  # 3 tumour classes
    assert TRAIN_SLIDE_SEEDS == trained
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "d"), "--seed", "9998"])
    assert result.exit_code == 2, result.output
    assert "slide seeds 10000–10003 were training slides of the shipped convlm_demo" in result.stderr
    assert not (tmp_path / "d").exists()
