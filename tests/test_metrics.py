"""Labels CSV validation and slide-level metrics against plain reference computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.classify.metrics import (
    check_label_slides,
    compute_metrics,
    format_metrics,
    load_labels,
    prompt_set_robustness,
)
from wsi_pipeline.errors import ConfigError

CLASSES = ("LUAD", "LUSC", "SCLC")


def _write(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ---------------------------------------------------------------------------- labels
def test_load_labels_reads_rows_bom_extra_columns_and_case(tmp_path: Path) -> None:
    p = _write(tmp_path, "\ufeffSlide_ID,site,Label\na,x,LUAD\n b ,y, LUSC \n\n,,\na,x,LUAD\n")
    assert load_labels(p, CLASSES) == {"a": "LUAD", "b": "LUSC"}


def test_unknown_classes_are_all_named_in_one_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "slide_id,label\na,LUAD\nb,adeno\nc,Squamous\nd,adeno\n")
    with pytest.raises(ConfigError) as e:
        load_labels(p, CLASSES)
    msg = str(e.value)
    assert "\n" not in msg
    assert "'Squamous'" in msg and "'adeno'" in msg and "LUAD, LUSC, SCLC" in msg and str(p) in msg
    assert "'LUAD'" not in msg.split("(prompt classes")[0]


def test_unknown_slides_are_named_and_truncated(tmp_path: Path) -> None:
    labels = {f"s{i}": "LUAD" for i in range(8)} | {"known": "LUSC"}
    with pytest.raises(ConfigError) as e:
        check_label_slides(labels, ["known", "other"], "labels.csv")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("labels.csv: 8 labelled slides are not in this run")
    assert "'s0'" in msg and "'s4'" in msg and "'s5'" not in msg and "and 3 more" in msg
    check_label_slides({"known": "LUSC"}, ["known", "other"])  # a subset is fine


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("slide,label\na,LUAD\n", "columns 'slide_id, label'"),
        ("slide_id,label\na,LUAD\na,LUSC\n", "labelled both 'LUAD' and 'LUSC'"),
        ("slide_id,label\na,\n", "line 2: empty slide_id or label"),
        ("slide_id,label\n", "has no rows"),
    ],
)
def test_bad_labels_files(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_labels(_write(tmp_path, text), CLASSES)


def test_missing_labels_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read labels CSV"):
        load_labels(tmp_path / "nope.csv", CLASSES)


# ---------------------------------------------------------------------------- metrics
def ref_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney: P(score of a positive > score of a negative), ties count one half."""
    p, n = score[pos], score[~pos]
    wins = sum((a > b) + 0.5 * (a == b) for a in p for b in n)
    return wins / (len(p) * len(n))


def ref_metrics(y_true: list[str], y_pred: list[str], classes: tuple[str, ...]) -> tuple[float, float, list[list[int]]]:
    cm = [[sum(t == a and p == b for t, p in zip(y_true, y_pred, strict=True)) for b in classes] for a in classes]
    recalls, f1s, weights = [], [], []
    for i in range(len(classes)):
        tp = cm[i][i]
        support = sum(cm[i])
        predicted = sum(row[i] for row in cm)
        if support:
            recalls.append(tp / support)
        prec = tp / predicted if predicted else 0.0
        rec = tp / support if support else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        weights.append(support)
    wf1 = sum(f * w for f, w in zip(f1s, weights, strict=True)) / sum(weights)
    return sum(recalls) / len(recalls), wf1, cm


def test_metrics_match_plain_reference() -> None:
    rng = np.random.default_rng(7)
    y_true = list(rng.choice(CLASSES, size=40))
    probs = rng.dirichlet(np.ones(3), size=40)
    y_pred = [CLASSES[i] for i in probs.argmax(1)]
    m = compute_metrics(y_true, y_pred, probs, CLASSES)
    bacc, wf1, cm = ref_metrics(y_true, y_pred, CLASSES)
    assert m["n"] == 40 and m["confusion_matrix"] == cm
    assert m["balanced_accuracy"] == pytest.approx(bacc, abs=1e-12)
    assert m["weighted_f1"] == pytest.approx(wf1, abs=1e-12)
    aucs = [ref_auc(np.array([t == c for t in y_true]), probs[:, i]) for i, c in enumerate(CLASSES)]
    assert [m["auc_per_class"][c] for c in CLASSES] == pytest.approx(aucs, abs=1e-12)
    assert m["macro_auc_ovr"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert m["auc_skipped_classes"] == [] and m["support"] == {c: y_true.count(c) for c in CLASSES}


def test_class_absent_from_labels_is_skipped_in_auc_not_counted() -> None:
    y_true = ["LUAD", "LUAD", "LUSC", "LUSC", "LUSC"]
    y_pred = ["LUAD", "SCLC", "LUSC", "LUAD", "LUSC"]  # SCLC is predicted but never true
    probs = np.array([[.7, .1, .2], [.3, .2, .5], [.1, .8, .1], [.5, .4, .1], [.2, .6, .2]])
    m = compute_metrics(y_true, y_pred, probs, CLASSES)
    assert m["auc_per_class"]["SCLC"] is None and m["auc_skipped_classes"] == ["SCLC"]
    luad = ref_auc(np.array([t == "LUAD" for t in y_true]), probs[:, 0])
    lusc = ref_auc(np.array([t == "LUSC" for t in y_true]), probs[:, 1])
    assert m["macro_auc_ovr"] == pytest.approx((luad + lusc) / 2)
    # balanced accuracy averages recall over the true classes only: (1/2 + 2/3) / 2
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["confusion_matrix"] == [[1, 0, 1], [1, 2, 0], [0, 0, 0]]


def test_single_true_class_has_no_auc_and_empty_input_has_no_metrics() -> None:
    m = compute_metrics(["LUAD", "LUAD"], ["LUAD", "LUSC"], np.array([[.6, .3, .1], [.2, .7, .1]]), CLASSES)
    assert m["macro_auc_ovr"] is None and m["auc_skipped_classes"] == list(CLASSES)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    empty = compute_metrics([], [], np.zeros((0, 3)), CLASSES)
    assert empty["n"] == 0 and empty["balanced_accuracy"] is None and empty["macro_auc_ovr"] is None
    assert empty["confusion_matrix"] == [[0] * 3] * 3


def test_prompt_set_robustness_golden() -> None:
    y_true = ["LUAD", "LUAD", "LUSC", "LUSC"]
    sets = [
        ["LUSC", "LUSC", "LUAD", "LUAD"],  # 0.0
        ["LUAD", "LUSC", "LUAD", "LUSC"],  # 0.5
        ["LUAD", "LUAD", "LUSC", "LUSC"],  # 1.0
        ["LUAD", "LUAD", "LUSC", "LUSC"],  # 1.0
    ]
    r = prompt_set_robustness(y_true, sets, seed=3)
    b = r["balanced_accuracy"]
    assert r["n_sets"] == 4 and r["seed"] == 3 and b["values"] == [0.0, 0.5, 1.0, 1.0]
    assert (b["median"], b["q1"], b["q3"]) == pytest.approx((0.75, 0.375, 1.0))
    assert b["iqr"] == pytest.approx(0.625)


def test_format_metrics_block() -> None:
    y_true = ["LUAD", "LUSC", "LUSC"]
    m = compute_metrics(y_true, ["LUAD", "LUSC", "LUAD"], np.array([[.8, .1, .1], [.1, .8, .1], [.5, .4, .1]]), CLASSES)
    m["prompt_sets"] = prompt_set_robustness(y_true, [["LUAD", "LUSC", "LUSC"]], seed=0)
    text = format_metrics(m)
    assert "balanced accuracy  0.750" in text and "weighted F1" in text
    assert "no AUC for SCLC" in text
    lines = text.splitlines()
    row = next(line for line in lines if line.strip().startswith("LUSC") and line.strip()[4:].strip()[0].isdigit())
    assert row.split()[1:] == ["1", "1", "0"]
    assert "median 1.000" in text
