"""``wsi-pipeline demo``: held-out synthetic slides → tile → embed → zero-shot classify → report.

>>> res = run_demo("demo_out/")          # doctest: +SKIP
>>> print(res.table()); print(res.balanced_accuracy)  # doctest: +SKIP

The slides come from :mod:`wsi_pipeline.synthetic` with seeds that no training run used
(see the seed ranges below); they are classified with ``configs/prompts/demo.yaml``, whose
templates the demo model never saw, and the shipped demo model ``convlm_demo`` (card:
``models/convlm_demo.md``), which was trained on synthetic tissue only.

Seed ranges (documented in ``models/convlm_demo.md``):

* ``0`` — the training ROIs of the shipped model (``write_roi_dataset(seed=0)``; each ROI's
  generator is keyed by ``(0, class, index)``, so no slide seed repeats them);
* ``10_000`` – ``10_029`` — the training slides of the shipped model (:data:`TRAIN_SLIDE_SEEDS`);
  a demo whose slide seeds overlap them is refused with the shipped weights (not held out);
* ``1_000_000 +`` — demo slides (:data:`DEMO_SEED`);
* ``2_000_000 +`` — test slides and ``3_000_000`` test ROIs (``tests/test_demo_model.py``).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError

_logger = logging.getLogger(__name__)

DEMO_SEED = 1_000_000
TEST_SLIDE_SEED = 2_000_000
TEST_ROI_SEED = 3_000_000
TRAIN_ROI_SEED = 0
#: Slide seeds the shipped demo model was trained on (scripts/train_demo_model.py: 10 per class).
TRAIN_SLIDE_SEEDS = range(10_000, 10_030)
#: Demo slide size (width, height) at 0.5 µm/px: ~1.5 × 1.2 mm, about 60-80 tissue patches of 256 px.
DEMO_SLIDE_SIZE = (3072, 2304)
DEMO_MODEL = "convlm_demo"


def demo_prompts_path() -> Path:
    """The shipped prompt file ``demo`` (``configs/prompts/demo.yaml`` in a checkout)."""
    from .resources import shipped_dir, shipped_file

    path = shipped_file("prompts", "demo")
    if path is None:
        raise ConfigError(f"the shipped prompt file demo.yaml is missing from {shipped_dir('prompts')}; "
                          "reinstall wsi-pipeline or pass prompts=")
    return path


@dataclass
class DemoResult:
    """Truth, predictions and balanced accuracy of one demo run."""

    out_dir: Path
    slides_dir: Path
    truth: dict[str, str]
    predicted: dict[str, str | None]
    balanced_accuracy: float
    accuracy: float
    model: str
    weights: Path
    weights_sha256: str | None
    notice: str | None
    report_path: Path | None
    predictions_csv: Path
    seconds: float
    summary: Any = field(default=None, repr=False)

    def table(self) -> str:
        """``slide_id  truth  predicted  ✓/✗`` lines, then the accuracy line."""
        w = max([len("slide_id"), *(len(s) for s in self.truth)])
        lines = [f"{'slide_id':<{w}}  {'truth':<10}  {'predicted':<10}  ok"]
        for sid, true in self.truth.items():
            pred = self.predicted.get(sid)
            lines.append(f"{sid:<{w}}  {true:<10}  {pred or '-':<10}  {'yes' if pred == true else 'NO'}")
        lines.append(f"balanced accuracy {self.balanced_accuracy:.3f} "
                     f"(accuracy {self.accuracy:.3f}, {len(self.truth)} slides)")
        return "\n".join(lines)


def _read_labels(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["slide_id"]: r["label"] for r in csv.DictReader(fh)}


def _slides_ready(slides_dir: Path, n_per_class: int, seed: int, size: tuple[int, int]) -> bool:
    """Whether ``slides_dir`` already holds exactly the slides this call would write."""
    from .synthetic import TUMOUR_CLASSES

    manifest, labels = slides_dir / "truth" / "manifest.csv", slides_dir / "labels.csv"
    if not (manifest.is_file() and labels.is_file()):
        return False
    expected = [(f"{c}_{seed + k}", str(seed + k)) for k, c in
                enumerate(c for c in TUMOUR_CLASSES for _ in range(n_per_class))]
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    got = [(r["slide_id"], r["seed"]) for r in rows]
    sizes_ok = all((int(r["width"]), int(r["height"])) == tuple(size) for r in rows)
    return got == expected and sizes_ok and all((slides_dir / f"{s}.svs").is_file() for s, _ in expected)


def run_demo(
    out_dir: str | os.PathLike[str] = "demo_out",
    *,
    n_per_class: int = 2,
    seed: int = DEMO_SEED,
    model: str = DEMO_MODEL,
    weights: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | None = None,
    size: tuple[int, int] = DEMO_SLIDE_SIZE,
    context: bool = True,
    top_k: int | None = None,
    visuals: bool = True,
    workers: int = 1,
    progress: Any = None,
) -> DemoResult:
    """Generate held-out synthetic slides and classify them zero-shot with the demo model.

    Parameters
    ----------
    out_dir : output folder: ``slides/`` (SVS, ``labels.csv``, ``truth/``) and the classify
        outputs (coords, features, predictions, ``metrics.json``, ``report.html``).
    n_per_class : slides per tumour class (3 classes).
    seed : seed of the first slide (slide ``k`` gets ``seed + k``); keep it in the demo range.
    model, weights : model name and weights (default: the shipped weights of ``model``).
    prompts : prompt file (default ``configs/prompts/demo.yaml``).
    size : slide (width, height) in px at 0.5 µm/px.
    context : use the prompt file as embedding context (context-guided refinement).
    top_k : primary K (default: the prompt file's first ``top_k``).
    visuals : write heatmaps, montages and ``report.html``.
    workers : slides rendered in parallel processes.
    progress : progress hooks passed on to ``classify_slides``.

    Raises
    ------
    CheckpointError
        No weights given and none shipped for ``model``.
    ConfigError
        Bad options or prompt file.
    """
    from .classify.stage import classify_slides
    from .embed.stage import EmbedConfig
    from .model import shipped_notice, shipped_weights
    from .model.shipped import models_dirs
    from .synthetic import TUMOUR_CLASSES, write_slide_set

    t0 = time.perf_counter()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    overlap = set(range(seed, seed + 3 * n_per_class)) & set(TRAIN_SLIDE_SEEDS)
    if overlap:
        what = (f"slide seeds {min(overlap)}–{max(overlap)} were training slides of the shipped {model} "
                f"(seeds {TRAIN_SLIDE_SEEDS.start:,}–{TRAIN_SLIDE_SEEDS.stop - 1:,}), so they are not held out")
        if weights is None:
            raise ConfigError(f"--seed {seed}: {what}; pick another --seed (default {DEMO_SEED:,})")
        _logger.warning("%s (if these weights were trained the same way)", what)
    if weights is None:
        found = shipped_weights(model)
        if found is None:
            raise CheckpointError(f"no shipped weights for {model} ({model}.safetensors in "
                                  f"{', '.join(map(str, models_dirs()))}); reinstall wsi-pipeline, pass weights= (--weights), "
                                  "or retrain it with scripts/train_demo_model.py --install")
        weights_path = found
        notice = shipped_notice(model)
    else:
        weights_path, notice = Path(weights), None
    prompts_path = Path(prompts) if prompts is not None else demo_prompts_path()
    out = Path(out_dir)
    slides_dir = out / "slides"
    if _slides_ready(slides_dir, n_per_class, seed, size):
        _logger.info("reusing the %d demo slides in %s", n_per_class * len(TUMOUR_CLASSES), slides_dir)
        labels_csv = slides_dir / "labels.csv"
    else:
        labels_csv = write_slide_set(slides_dir, TUMOUR_CLASSES, n_per_class, seed=seed, size=size, workers=workers)
    truth = _read_labels(labels_csv)
    slide_paths = [slides_dir / f"{sid}.svs" for sid in truth]
    embed = EmbedConfig(model=model, weights=str(weights_path), context=str(prompts_path) if context else None)
    summary = classify_slides(slide_paths, out, prompts_path, embed=embed, top_k=top_k, labels=labels_csv,
                              visuals=visuals, progress=progress)
    predicted = {r.slide_id: r.predicted for r in summary.rows}
    metrics = summary.metrics or {}
    n_ok = sum(predicted.get(s) == t for s, t in truth.items())
    bacc = metrics.get("balanced_accuracy")
    return DemoResult(
        out_dir=out, slides_dir=slides_dir, truth=truth, predicted=predicted,
        balanced_accuracy=float(bacc) if bacc is not None else float("nan"),
        accuracy=n_ok / len(truth), model=model, weights=weights_path,
        weights_sha256=_sha_of(weights_path),
        notice=notice, report_path=summary.report_path, predictions_csv=summary.predictions_csv,
        seconds=time.perf_counter() - t0, summary=summary,
    )


def _sha_of(path: Path) -> str:
    from .model.weights import file_sha256

    return file_sha256(path)


__all__ = ["DEMO_MODEL", "DEMO_SEED", "DEMO_SLIDE_SIZE", "TEST_ROI_SEED", "TEST_SLIDE_SEED", "TRAIN_ROI_SEED",
           "TRAIN_SLIDE_SEEDS", "DemoResult", "demo_prompts_path", "run_demo"]
