"""Write synthetic data sets: ROI patches (ImageFolder layout) and SVS slide sets."""

from __future__ import annotations

import csv
import io
import logging
import os
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..report.png import write_png
from ..store.atomic import atomic_path, atomic_write_text, ensure_writable_dir
from .render import TISSUE_CLASSES, TUMOUR_CLASSES, render_roi
from .scene import registered_kinds
from .slide import TUMOUR, render_slide

_logger = logging.getLogger(__name__)

#: Default slide size (width, height) at 0.5 µm/px: ~3 × 2.3 mm, a few hundred 256-px tissue patches.
DEFAULT_SLIDE_SIZE = (6144, 4608)


def write_class_map(path: str | os.PathLike[str], class_map: np.ndarray, mpp: float) -> Path:
    """Write a slide's truth atomically as ``.npz`` (``class_map`` uint8, ``mpp``).

    Not a PNG on purpose: folder scans for slides must never pick up the truth maps.
    """
    final = Path(path)
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, class_map=class_map, mpp=np.float64(mpp))
    return final


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return path


def _check_classes(classes: Sequence[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    classes = tuple(classes)
    if not classes:
        raise ConfigError(f"no {what} classes given; use some of {', '.join(allowed)}")
    bad = [c for c in classes if c not in allowed]
    if bad:
        raise ConfigError(f"unknown {what} class(es) {', '.join(map(repr, bad))}; use some of {', '.join(allowed)}")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"{what} classes must be unique, got {', '.join(classes)}")
    return classes


def _check_count(n: int, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def roi_rng(seed: int, kind: str, index: int) -> np.random.Generator:
    """The generator of ROI ``index`` of class ``kind``: independent of the other classes."""
    return np.random.default_rng([int(seed), zlib.crc32(kind.encode()), int(index)])


def write_roi_dataset(
    out_dir: str | os.PathLike[str], classes: Sequence[str] = TISSUE_CLASSES, n_per_class: int = 50,
    size: int = 256, seed: int = 0, *, mpp: float = 0.5,
) -> Path:
    """Write ``out_dir/<class>/<i>.png`` ROI patches and ``out_dir/labels.csv``; return the CSV path.

    ``labels.csv`` has columns ``path,label`` with paths relative to ``out_dir``. ROI ``i``
    of a class depends only on ``(seed, class, i)``, so adding classes or ROIs keeps the
    existing ones byte-identical.
    """
    classes = _check_classes(classes, registered_kinds(), "tissue")
    n_per_class = _check_count(n_per_class, "n_per_class")
    size = _check_count(size, "size")
    out = ensure_writable_dir(out_dir)
    rows = []
    t0 = time.perf_counter()
    for kind in classes:
        for i in range(n_per_class):
            rgb = render_roi(kind, size, mpp=mpp, rng=roi_rng(seed, kind, i))
            rel = f"{kind}/{i}.png"
            write_png(out / rel, rgb)
            rows.append((rel, kind))
    labels = _write_csv(out / "labels.csv", ("path", "label"), rows)
    _logger.info("wrote %d ROIs (%d classes) to %s in %.1fs", len(rows), len(classes), out,
                 time.perf_counter() - t0)
    return labels


@dataclass(frozen=True)
class SlideRecord:
    """What :func:`write_slide_set` wrote for one slide (a row of ``truth/manifest.csv``)."""

    slide_id: str
    label: str
    seed: int
    width: int
    height: int
    mpp: float
    tumour_fraction: float
    tissue_px: int
    tumour_px: int


def _slide_job(out: str, label: str, slide_seed: int, size: tuple[int, int], mpp: float,
               tumour_fraction: float, truth: bool) -> SlideRecord:
    from ..slide.write import write_slide  # the writer pulls in tifffile; import only when used

    slide_id = f"{label}_{slide_seed}"
    rgb, tissue, class_map = render_slide(label, width=size[0], height=size[1], mpp=mpp, seed=slide_seed,
                                          tumour_fraction=tumour_fraction)
    write_slide(Path(out) / f"{slide_id}.svs", rgb, mpp=mpp, layout="svs")
    if truth:
        write_class_map(Path(out) / "truth" / f"{slide_id}.npz", class_map, mpp)
    return SlideRecord(slide_id, label, slide_seed, size[0], size[1], mpp, round(tumour_fraction, 4),
                       int(tissue.sum()), int((class_map == TUMOUR).sum()))


def write_slide_set(
    out_dir: str | os.PathLike[str], classes: Sequence[str] = TUMOUR_CLASSES, n_per_class: int = 2,
    seed: int = 0, size: tuple[int, int] = DEFAULT_SLIDE_SIZE, *, mpp: float = 0.5,
    tumour_fraction: float | None = None, truth: bool = True, workers: int = 1,
) -> Path:
    """Write SVS slides ``out_dir/<class>_<seed>.svs`` and ``out_dir/labels.csv``; return the CSV path.

    Parameters
    ----------
    out_dir : output folder (created).
    classes : tumour classes; each slide's tumour area is one class, mixed with stroma.
    n_per_class : slides per class. Slide ``k`` (class-major order) gets seed ``seed + k``,
        which is also in its file name, so the name fixes the content.
    size : (width, height) in pixels at ``mpp``.
    tumour_fraction : tumour share of the tissue; ``None`` draws 0.35–0.65 per slide.
    truth : also write ``truth/<slide_id>.npz`` (``class_map``: 0 glass, 1 stroma, 2 tumour,
        at level 0; ``mpp``) and ``truth/manifest.csv`` (one :class:`SlideRecord` per slide).
    workers : slides rendered in parallel processes (1 = in this process).

    ``labels.csv`` has columns ``slide_id,label``.
    """
    classes = _check_classes(classes, TUMOUR_CLASSES, "tumour")
    n_per_class = _check_count(n_per_class, "n_per_class")
    workers = _check_count(workers, "workers")
    if len(size) != 2 or min(size) < 256:
        raise ConfigError(f"size must be (width, height), each at least 256 px, got {size!r}")
    out = ensure_writable_dir(out_dir)
    jobs = []
    for k, label in enumerate(c for c in classes for _ in range(n_per_class)):
        slide_seed = int(seed) + k
        frac = tumour_fraction if tumour_fraction is not None else float(
            np.random.default_rng([slide_seed, 1]).uniform(0.35, 0.65))
        jobs.append((str(out), label, slide_seed, (int(size[0]), int(size[1])), float(mpp), float(frac), truth))
    t0 = time.perf_counter()
    if workers == 1:
        records = [_slide_job(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            records = list(pool.map(_slide_job, *zip(*jobs, strict=True)))
    if truth:
        fields = list(asdict(records[0]))
        _write_csv(out / "truth" / "manifest.csv", fields, [[getattr(r, f) for f in fields] for r in records])
    labels = _write_csv(out / "labels.csv", ("slide_id", "label"), [(r.slide_id, r.label) for r in records])
    _logger.info("wrote %d slides to %s in %.1fs", len(records), out, time.perf_counter() - t0)
    return labels
