#!/usr/bin/env python
"""Regenerate the shipped demo model ``convlm_demo.safetensors`` exactly.

    python scripts/train_demo_model.py --work /tmp/convlm_demo [--install]

1. Training data (seeds documented in ``models/convlm_demo.md`` and ``wsi_pipeline/demo.py``):
   pure ROIs of the four tissue classes (``write_roi_dataset``, seed 0) and labelled
   patches cut from synthetic training slides (``write_slide_rois``, slide seeds 10 000+),
   joined into ``WORK/train.csv``.
2. Training: the same as
   ``wsi-pipeline train --data WORK/train.csv --prompts configs/prompts/demo_train.yaml
   --model convlm_demo -o WORK/run`` with the options in :data:`TRAIN_OPTIONS`, on 2 CPU threads.
3. Held-out evaluation: ROIs (generator seed 3 000 000) and 12 slides (seeds 2 000 000+) with
   ``configs/prompts/demo.yaml`` (held-out templates), plus the prompt-swap check;
   written to ``WORK/heldout_metrics.json``.
4. ``--install`` copies the weights and their sidecar into the package
   (``wsi_pipeline/resources/models/``; the card stays ``models/convlm_demo.md``).

Bit-identical weights need the same torch build and CPU thread count (2).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROI_SEED = 0
ROIS_PER_CLASS = 1000
SLIDE_SEED = 10_000  # wsi_pipeline.demo.TRAIN_SLIDE_SEEDS: the demo refuses these seeds
SLIDES_PER_CLASS = 10
THREADS = 2
TRAIN_OPTIONS: dict[str, object] = dict(
    model="convlm_demo",
    epochs=5,
    batch_size=64,
    lr_backbone=5e-4,
    lr_text=5e-4,
    lr_head=1e-3,
    weight_decay=0.05,
    warmup_steps=30,
    balanced=True,
    val_fraction=0.1,
    context_mode="agnostic",
    w_align=1.0,
    w_context_l1=0.1,
    w_cls_l1=0.1,
    w_text=1.0,
    prompts_per_class=4,
    word_dropout=0.2,
    max_insert_tokens=2,
    flips=True,
    rot90=True,
    color_jitter=0.1,
    seed=0,
    threads=THREADS,
    save_precision="fp16",
)


def make_data(work: Path) -> Path:
    """Write the ROIs and slide patches and the joined ``train.csv``; return its path."""
    from wsi_pipeline.synthetic import TISSUE_CLASSES, TUMOUR_CLASSES, write_roi_dataset
    from wsi_pipeline.train.slide_rois import write_slide_rois

    rows: list[tuple[str, str]] = []
    for sub, make in (
        ("rois", lambda d: write_roi_dataset(d, TISSUE_CLASSES, ROIS_PER_CLASS, size=256, seed=ROI_SEED)),
        ("slide_rois", lambda d: write_slide_rois(d, TUMOUR_CLASSES, SLIDES_PER_CLASS, seed=SLIDE_SEED)),
    ):
        labels = work / sub / "labels.csv"
        if not labels.is_file():
            make(work / sub)
        with open(labels, newline="", encoding="utf-8") as fh:
            rows += [(f"{sub}/{r['path']}", r["label"]) for r in csv.DictReader(fh)]
    out = work / "train.csv"
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(("path", "label"))
        w.writerows(rows)
    return out


def heldout_metrics(weights: Path, work: Path) -> dict[str, object]:
    """Held-out ROI and slide balanced accuracy, with and without swapped prompts."""
    import numpy as np

    from wsi_pipeline.classify.prompts import load_prompts
    from wsi_pipeline.demo import TEST_ROI_SEED, TEST_SLIDE_SEED, run_demo
    from wsi_pipeline.model import create_model
    from wsi_pipeline.synthetic import TUMOUR_CLASSES
    from wsi_pipeline.train.heldout import balanced_accuracy, render_rois, swap_classes, zero_shot_predict

    model = create_model("convlm_demo", weights=weights)
    demo = load_prompts(ROOT / "configs" / "prompts" / "demo.yaml")
    imgs, y = render_rois(TUMOUR_CLASSES, 50, TEST_ROI_SEED, model.input_size)
    pred = zero_shot_predict(model, imgs, demo)
    swapped = zero_shot_predict(model, imgs, swap_classes(demo))
    t0 = time.perf_counter()
    res = run_demo(work / "heldout_slides", n_per_class=4, seed=TEST_SLIDE_SEED, weights=weights, visuals=False)
    return {
        "roi_balanced_accuracy": balanced_accuracy(y, pred),
        "roi_n": int(len(y)),
        "roi_swapped_accuracy": float(np.mean(swapped == y)),
        "roi_swapped_follows_text": float(np.mean(swapped == (y + 1) % len(TUMOUR_CLASSES))),
        "slide_balanced_accuracy": res.balanced_accuracy,
        "slide_n": len(res.truth),
        "slide_seconds": round(time.perf_counter() - t0, 1),
        "slide_table": res.table(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--work", type=Path, default=Path("/tmp/convlm_demo"), help="scratch folder")
    parser.add_argument("--install", action="store_true", help="copy the weights into the package (wsi_pipeline/resources/models/)")
    parser.add_argument("--skip-eval", action="store_true", help="do not run the held-out evaluation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from wsi_pipeline.train import TqdmTrainProgress, TrainConfig, train_model

    work = args.work.resolve()
    t0 = time.perf_counter()
    data = make_data(work)
    print(f"data ready in {time.perf_counter() - t0:.0f} s: {data}", flush=True)
    cfg = TrainConfig(str(data), str(ROOT / "configs" / "prompts" / "demo_train.yaml"), str(work / "run"),
                      **TRAIN_OPTIONS)  # type: ignore[arg-type]
    result = train_model(cfg, progress=TqdmTrainProgress())
    final = result.final
    print(f"trained in {result.seconds:.0f} s; val balanced accuracy {final.get('val_bacc', float('nan')):.4f} "
          f"(label context {final.get('val_bacc_label', float('nan')):.4f}); sha256 {result.sha256}", flush=True)
    summary: dict[str, object] = {"train_seconds": round(result.seconds, 1), "sha256": result.sha256,
                                  "size_bytes": result.weights.stat().st_size, "final_epoch": final}
    if not args.skip_eval:
        summary.update(heldout_metrics(result.weights, work))
        print(summary["slide_table"])
    (work / "heldout_metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "slide_table"}, indent=1))
    if args.install:
        dest = ROOT / "wsi_pipeline" / "resources" / "models" / "convlm_demo.safetensors"  # package data
        shutil.copyfile(result.weights, dest)
        shutil.copyfile(result.weights.with_name(result.weights.name + ".json"), dest.with_name(dest.name + ".json"))
        print(f"installed {dest} (sha256 {result.sha256}); update models/convlm_demo.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
