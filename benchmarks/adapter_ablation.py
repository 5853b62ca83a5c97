"""The shape of ConVLM's ablation, on a frozen backbone: does a trained context adapter help?

One run, side by side, on held-out synthetic ROIs (balanced accuracy, zero-shot with the
full prompt ensemble of ``configs/prompts/demo.yaml``, whose templates the backbone never
saw):

1. zero-shot, no refinement (keep 1.0), no context;
2. zero-shot with token refinement (keep 0.7 at the backbone's blocks), no context;
3. refinement + the backbone's own context MLPs (trained jointly with it), for reference;
4. refinement + a context adapter trained here with everything else frozen
   (``train --adapter-only``);
5. a diagnostic: the same adapter fed each image's own class text as context (the paper's
   training-time input; it leaks the label, so it is an upper bound, not a usable setting).

The backbone is the shipped demo model (``convlm_demo``, synthetic tissue only). It is at
ceiling on its own training distribution (ROIs rendered at 0.5 µm/px), so the adapter is
trained and tested where the frozen backbone is weak too: tissue rendered at a coarser scale
(``--shift-mpp``, default 0.9 µm/px, i.e. 1.8× smaller structures than it was trained on).
Adapter training ROIs and test ROIs come from different seeds. The context at inference and
in training is the embedding of demo.yaml's ``context`` sentence (label-agnostic).

    python benchmarks/adapter_ablation.py                 # ~5 min on 2 CPU cores
    python benchmarks/adapter_ablation.py --train-per-class 60 --epochs 2 --test-per-class 30   # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sklearn.metrics import balanced_accuracy_score  # noqa: E402

from wsi_pipeline.classify.prompts import load_prompts  # noqa: E402
from wsi_pipeline.classify.textclassifier import build_text_classifier  # noqa: E402
from wsi_pipeline.embed.dataset import normalize  # noqa: E402
from wsi_pipeline.model import create_model, shipped_weights  # noqa: E402
from wsi_pipeline.model.adapter import load_adapter  # noqa: E402
from wsi_pipeline.synthetic import TISSUE_CLASSES, TUMOUR_CLASSES, write_roi_dataset  # noqa: E402
from wsi_pipeline.train import TrainConfig, train_model  # noqa: E402
from wsi_pipeline.train.data import load_roi_table, read_images  # noqa: E402
from wsi_pipeline.train.evaluation import inference_context  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVAL_PROMPTS = ROOT / "configs" / "prompts" / "demo.yaml"
TRAIN_PROMPTS = ROOT / "configs" / "prompts" / "demo_train.yaml"
#: Seeds never used by the demo model's training (0, 10,000+) or the demo / test slides (1,000,000+).
TRAIN_SEED, TEST_SEED = 6_000_000, 7_000_000


def data(work: Path, name: str, classes, n: int, seed: int, mpp: float) -> tuple[torch.Tensor, list[str], Path]:
    folder = work / name
    if not (folder / "labels.csv").is_file():
        write_roi_dataset(folder, classes, n_per_class=n, size=256, seed=seed, mpp=mpp)
    table = load_roi_table(str(folder))
    return read_images(table.paths, 128), list(table.labels), folder


@torch.inference_mode()
def balanced_accuracy(model, images: torch.Tensor, labels: list[str], class_names, weights: torch.Tensor,
                      context: torch.Tensor | str | None, keep: float) -> float:
    """Zero-shot balanced accuracy; ``context="label"`` feeds each image its own class's text embedding."""
    y = torch.tensor([class_names.index(lab) for lab in labels])
    preds = []
    for start in range(0, len(images), 128):
        x = normalize(images[start : start + 128], model.mean, model.std, torch.float32)
        ctx = weights[y[start : start + 128]] if isinstance(context, str) else context
        feats = model.encode_image(x, context=ctx, keep_rate=keep)
        preds.append((model.project(feats) @ weights.T).argmax(1).numpy())
    return float(balanced_accuracy_score(y.numpy(), np.concatenate(preds)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=None, help="Folder for data and the adapter run [a temp folder].")
    p.add_argument("--shift-mpp", type=float, default=0.9, help="Render scale of the shifted ROIs (µm/px).")
    p.add_argument("--train-per-class", type=int, default=150)
    p.add_argument("--test-per-class", type=int, default=60)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="adapter_ablation_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    # the task's context sentence is a property of the task: the adapter trains with the one inference uses
    eval_prompts = load_prompts(EVAL_PROMPTS)
    train_prompts = yaml.safe_load(TRAIN_PROMPTS.read_text(encoding="utf-8"))
    train_prompts["context"] = eval_prompts.context
    train_prompts_path = work / "train_prompts.yaml"
    train_prompts_path.write_text(yaml.safe_dump(train_prompts, sort_keys=False), encoding="utf-8")

    _, _, train_dir = data(work, "train_shifted", TISSUE_CLASSES, args.train_per_class, TRAIN_SEED, args.shift_mpp)
    tests = {
        "in-domain (0.5 µm/px)": data(work, "test_0.5", TUMOUR_CLASSES, args.test_per_class, TEST_SEED, 0.5)[:2],
        f"shifted ({args.shift_mpp:g} µm/px)": data(work, "test_shifted", TUMOUR_CLASSES, args.test_per_class,
                                                    TEST_SEED + 1, args.shift_mpp)[:2],
    }
    t_data = time.perf_counter() - t0

    weights = shipped_weights("convlm_demo")
    if weights is None:
        print("no shipped convlm_demo weights (models/convlm_demo.safetensors)", file=sys.stderr)
        return 2
    run = train_model(TrainConfig(str(train_dir), str(train_prompts_path), str(work / "adapter_run"),
                                  model="convlm_demo", weights=str(weights), adapter_only=True, epochs=args.epochs,
                                  batch_size=64, lr_head=2e-3, warmup_steps=10, val_fraction=0.1, seed=args.seed,
                                  threads=args.threads))
    t_train = time.perf_counter() - t0 - t_data

    native = create_model("convlm_demo", weights=weights)
    adapted = create_model("convlm_demo", weights=weights)
    load_adapter(adapted, run.weights)
    class_weights = build_text_classifier(native, eval_prompts)
    context = inference_context(native, eval_prompts, class_weights)
    keep = native.keep_rate
    rows = [
        ("zero-shot, no refinement", native, None, 1.0),
        (f"+ refinement (keep {keep:g} at blocks {list(native.refine_layers)})", native, None, keep),
        ("+ refinement + the backbone's own context MLPs", native, context, keep),
        ("+ refinement + trained context adapter", adapted, context, keep),
        ("diagnostic: adapter fed the true class's text *", adapted, "label", keep),
    ]
    print(f"backbone convlm_demo (frozen), weights {native.weights_sha256[:12]}; adapter {run.weights.name} "
          f"({run.weights.stat().st_size / 1e3:.0f} kB, sha256 {run.sha256[:12]}), trained on "
          f"{4 * args.train_per_class} shifted ROIs for {args.epochs} epochs in {t_train:.0f} s")
    print(f"test ROIs per class: {args.test_per_class}; classes {', '.join(eval_prompts.class_names)}; "
          f"prompts {EVAL_PROMPTS.name} (held-out templates), context = its context sentence")
    header = f"{'condition':<52}" + "".join(f"{name:>24}" for name in tests)
    print(header)
    for label, model, ctx, k in rows:
        accs = [balanced_accuracy(model, imgs, labs, eval_prompts.class_names, class_weights, ctx, k)
                for imgs, labs in tests.values()]
        print(f"{label:<52}" + "".join(f"{a:>24.3f}" for a in accs))
    print("* leaks the label (the paper's training-time input); an upper bound, not a usable setting")
    for name, (imgs, _) in tests.items():
        with torch.inference_mode():
            x = normalize(imgs, adapted.mean, adapted.std, torch.float32)
            plain = adapted.project(adapted.encode_image(x, keep_rate=keep))
            guided = adapted.project(adapted.encode_image(x, context=context, keep_rate=keep))
        change = 1.0 - (plain * guided).sum(-1)
        print(f"adapter's effect on the projected embeddings, {name}: 1 - cos median {change.median():.2e}, "
              f"max {change.max():.2e}")
    print(f"chance: {1 / len(eval_prompts.class_names):.3f}; total {time.perf_counter() - t0:.0f} s "
          f"(data {t_data:.0f} s); work folder {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
