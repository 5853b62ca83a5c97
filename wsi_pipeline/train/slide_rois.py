"""Training ROIs cut from synthetic whole slides, labelled by their known tissue composition.

Pure single-morphology ROIs (:func:`wsi_pipeline.synthetic.write_roi_dataset`) never show
what the tile stage also keeps on a real run: patches at the tissue border (part glass)
and tumour mixed with stroma. A model trained on pure ROIs alone reads a tissue edge
(white glass beside tissue) as "open lumens" and scores it as glandular. This module
renders slides with :func:`wsi_pipeline.synthetic.render_slide` and cuts patches on a
grid, labelling each from the slide's class map:

* tissue share of the patch below ``min_tissue``: skipped;
* tumour share *of the tissue* at least ``tumour_min``: the slide's tumour class;
* tumour share of the tissue at most ``stroma_max``: ``stroma``;
* anything in between: skipped (ambiguous).

Output: ImageFolder layout ``out_dir/<label>/s<seed>_<x>_<y>.png`` and ``labels.csv``
(``path,label``), like :func:`~wsi_pipeline.synthetic.write_roi_dataset`.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..store.atomic import atomic_write_text, ensure_writable_dir

_logger = logging.getLogger(__name__)

NORMAL_LABEL = "stroma"


def label_patch(class_map: np.ndarray, tumour_class: str, *, min_tissue: float, tumour_min: float,
                stroma_max: float) -> str | None:
    """The label of one patch of a slide's class map (0 glass, 1 stroma, 2 tumour), or ``None``."""
    tissue = float((class_map > 0).mean())
    if tissue < min_tissue:
        return None
    tumour = float((class_map == 2).mean()) / tissue
    if tumour >= tumour_min:
        return tumour_class
    if tumour <= stroma_max:
        return NORMAL_LABEL
    return None


def write_slide_rois(
    out_dir: str | os.PathLike[str],
    classes: Sequence[str] = ("glandular", "solid", "lymphoid"),
    n_per_class: int = 10,
    seed: int = 10_000,
    size: tuple[int, int] = (3072, 2304),
    *,
    patch: int = 256,
    stride: int = 192,
    min_tissue: float = 0.15,
    tumour_min: float = 0.6,
    stroma_max: float = 0.15,
    mpp: float = 0.5,
) -> Path:
    """Render ``n_per_class`` slides per tumour class and write their labelled patches.

    Slide ``k`` (class-major) uses seed ``seed + k`` and a grid offset drawn from it.
    Returns the path of ``labels.csv``.
    """
    from ..report.png import write_png
    from ..synthetic import TUMOUR_CLASSES, render_slide

    bad = [c for c in classes if c not in TUMOUR_CLASSES]
    if bad or not classes:
        raise ConfigError(f"unknown tumour class(es) {bad}; use some of {', '.join(TUMOUR_CLASSES)}")
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ConfigError(f"n_per_class must be a positive integer, got {n_per_class!r}")
    if not (0 < stride and 0 < patch <= min(size)):
        raise ConfigError(f"patch {patch} / stride {stride} do not fit slides of {size}")
    out = ensure_writable_dir(out_dir)
    rows: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    for k, label in enumerate(c for c in classes for _ in range(n_per_class)):
        s = int(seed) + k
        rng = np.random.default_rng([s, 2])
        frac = float(rng.uniform(0.35, 0.65))
        rgb, _, cmap = render_slide(label, width=int(size[0]), height=int(size[1]), mpp=mpp, seed=s,
                                    tumour_fraction=frac)
        oy, ox = (int(v) for v in rng.integers(0, stride, 2))
        for y in range(oy, rgb.shape[0] - patch + 1, stride):
            for x in range(ox, rgb.shape[1] - patch + 1, stride):
                lab = label_patch(cmap[y : y + patch, x : x + patch], label, min_tissue=min_tissue,
                                  tumour_min=tumour_min, stroma_max=stroma_max)
                if lab is None:
                    continue
                rel = f"{lab}/s{s}_{x}_{y}.png"
                write_png(out / rel, rgb[y : y + patch, x : x + patch])
                rows.append((rel, lab))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("path", "label"))
    writer.writerows(rows)
    atomic_write_text(out / "labels.csv", buf.getvalue())
    _logger.info("wrote %d slide ROIs from %d slides to %s in %.1fs", len(rows), n_per_class * len(classes), out,
                 time.perf_counter() - t0)
    return out / "labels.csv"


__all__ = ["NORMAL_LABEL", "label_patch", "write_slide_rois"]
