"""Ground-truth labels and slide-level metrics of a zero-shot run.

Labels come from a CSV with a header holding ``slide_id`` and ``label`` columns (other
columns are ignored). Metrics use scikit-learn: balanced accuracy, support-weighted F1,
macro one-vs-rest ROC AUC over the classes that have both positive and negative slides
(the others are listed as skipped, never silently counted), and the confusion matrix
(rows: true class, columns: predicted class, both in prompt-file order). Prompt-set
robustness follows MI-Zero: balanced accuracy of each random single-synonym prompt set,
summarised by its median and inter-quartile range.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..userfiles import read_csv_table, where

_logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("slide_id", "label")
_SHOW = 5  # names shown in an error message before "and N more"


def load_labels(path: str | os.PathLike[str], class_names: Sequence[str]) -> dict[str, str]:
    """Read ``slide_id,label`` rows and check every label is one of ``class_names``.

    Raises
    ------
    ConfigError
        The file is unreadable, lacks the columns, has an empty cell, lists a slide twice
        with different labels, or names classes the prompt file does not have (all named).
    """
    p = Path(path)
    labels: dict[str, str] = {}
    for lineno, row in read_csv_table(p, "labels CSV", LABEL_COLUMNS):
        sid, label = row["slide_id"], row["label"]
        if not sid or not label:
            raise ConfigError(f"{where('labels CSV', p, lineno)}: empty slide_id or label")
        if labels.get(sid, label) != label:
            raise ConfigError(
                f"{where('labels CSV', p, lineno)}: slide {sid!r} is labelled both {labels[sid]!r} and {label!r}"
            )
        labels[sid] = label
    if not labels:
        raise ConfigError(f"labels CSV {p} has no rows")
    unknown = sorted(set(labels.values()) - set(class_names))
    if unknown:
        raise ConfigError(
            f"labels CSV {p}: unknown classes {_names(unknown)} (prompt classes: {', '.join(class_names)}); "
            "fix the labels or the prompt file"
        )
    return labels


def check_label_slides(labels: Mapping[str, str], slide_ids: Iterable[str], source: str = "labels CSV") -> None:
    """:class:`ConfigError` naming the labelled slides that are not part of the run."""
    known = set(slide_ids)
    unknown = sorted(set(labels) - known)
    if unknown:
        raise ConfigError(
            f"{source}: {len(unknown)} labelled slides are not in this run: {_names(unknown)}; "
            "use the slide ids (file names without extension) of the inputs"
        )


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(repr(s) for s in items[:_SHOW])
    return shown + (f" and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def compute_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Balanced accuracy, weighted F1, macro OvR AUC and the confusion matrix.

    Parameters
    ----------
    y_true, y_pred : sequences of class names, one per evaluated slide.
    probs : array (n, C)
        Class probabilities in ``class_names`` order.
    class_names : the prompt classes (order of the matrix rows/columns).

    Returns
    -------
    dict
        ``n``, ``classes``, ``support``, ``balanced_accuracy``, ``weighted_f1``,
        ``macro_auc_ovr`` (``None`` when no class has both positives and negatives),
        ``auc_per_class`` (``None`` for undefined), ``auc_skipped_classes`` and
        ``confusion_matrix``. All values are ``None`` when ``n == 0``.
    """
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

    classes = list(class_names)
    y_true, y_pred = list(y_true), list(y_pred)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_true), len(classes))
    n = len(y_true)
    support = {c: int(sum(t == c for t in y_true)) for c in classes}
    out: dict[str, Any] = {"n": n, "classes": classes, "support": support}
    if n == 0:
        out.update(balanced_accuracy=None, weighted_f1=None, macro_auc_ovr=None,
                   auc_per_class=dict.fromkeys(classes), auc_skipped_classes=classes,
                   confusion_matrix=[[0] * len(classes) for _ in classes])
        return out
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected here
        warnings.simplefilter("ignore")
        bacc = float(balanced_accuracy_score(y_true, y_pred))
        wf1 = float(f1_score(y_true, y_pred, labels=classes, average="weighted", zero_division=0))
    auc: dict[str, float | None] = {}
    for i, c in enumerate(classes):
        positives = np.array([t == c for t in y_true])
        auc[c] = float(roc_auc_score(positives, probs[:, i])) if 0 < positives.sum() < n else None
    defined = [v for v in auc.values() if v is not None]
    out.update(
        balanced_accuracy=bacc,
        weighted_f1=wf1,
        macro_auc_ovr=float(np.mean(defined)) if defined else None,
        auc_per_class=auc,
        auc_skipped_classes=[c for c, v in auc.items() if v is None],
        confusion_matrix=confusion_matrix(y_true, y_pred, labels=classes).astype(int).tolist(),
    )
    return out


def prompt_set_robustness(y_true: Sequence[str], preds_per_set: Sequence[Sequence[str]], seed: int) -> dict[str, Any]:
    """Median and IQR of the balanced accuracy over MI-Zero-style prompt sets.

    Parameters
    ----------
    y_true : true classes of the evaluated slides.
    preds_per_set : for each prompt set, the predicted classes of the same slides.
    seed : the sampling seed (recorded).
    """
    from sklearn.metrics import balanced_accuracy_score

    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for preds in preds_per_set:
            values.append(float(balanced_accuracy_score(list(y_true), list(preds))) if len(y_true) else float("nan"))
    arr = np.asarray(values, dtype=np.float64)
    ok = len(arr) > 0 and bool(np.isfinite(arr).all())
    q1, med, q3 = (float(v) for v in np.percentile(arr, [25, 50, 75])) if ok else (None, None, None)
    return {
        "n_sets": len(values),
        "seed": int(seed),
        "balanced_accuracy": {
            "median": med, "q1": q1, "q3": q3,
            "iqr": None if q1 is None or q3 is None else q3 - q1,
            "values": values if ok else [],
        },
    }


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """The terminal block: headline metrics, confusion matrix and prompt-set robustness."""
    classes = list(metrics["classes"])
    lines = [f"metrics ({metrics['n']} labelled slides evaluated"
             + (f", {metrics['n_excluded']} excluded: not scored" if metrics.get("n_excluded") else "") + ")"]
    skipped = metrics.get("auc_skipped_classes") or []
    note = f"  (no AUC for {', '.join(skipped)}: no positive or no negative slides)" if skipped else ""
    lines += [
        f"  balanced accuracy  {_fmt(metrics.get('balanced_accuracy'))}",
        f"  weighted F1        {_fmt(metrics.get('weighted_f1'))}",
        f"  macro AUC (OvR)    {_fmt(metrics.get('macro_auc_ovr'))}{note}",
        "confusion matrix (rows: true, columns: predicted)",
    ]
    width = max([len(c) for c in classes] + [4])
    lines.append("  " + " " * width + "  " + "  ".join(c.rjust(max(len(c), 4)) for c in classes))
    for c, row in zip(classes, metrics["confusion_matrix"], strict=True):
        cells = "  ".join(str(v).rjust(max(len(k), 4)) for k, v in zip(classes, row, strict=True))
        lines.append(f"  {c.ljust(width)}  {cells}")
    rob = metrics.get("prompt_sets")
    if rob:
        b = rob["balanced_accuracy"]
        lines.append(
            f"prompt-set robustness ({rob['n_sets']} single-synonym sets, seed {rob['seed']}): "
            f"balanced accuracy median {_fmt(b['median'])}, IQR {_fmt(b['q1'])}-{_fmt(b['q3'])}"
        )
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


__all__ = [
    "LABEL_COLUMNS",
    "check_label_slides",
    "compute_metrics",
    "format_metrics",
    "load_labels",
    "prompt_set_robustness",
]
