"""``wsi-pipeline classify``: one command from raw slides to predictions, metrics and report.

Mechanics only (``convlm_test`` has random weights): exit codes, the printed table and
metrics block, the written files and their internal consistency.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from slide_factory import make_slide

from wsi_pipeline.cli import main

PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "demo.yaml"
CLASSES = ("glandular", "solid", "lymphoid")
FAST = ["--model", "convlm_test", "--patch-size", "64", "--target-mpp", "1.0", "--workers", "0"]


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("classify_cli")
    slides = root / "slides"
    slides.mkdir()
    make_slide(slides / "s1.svs", 2048, 1536, mpp=0.5, seed=1)
    make_slide(slides / "s2.svs", 2048, 1536, mpp=0.5, seed=3)
    make_slide(slides / "blank.svs", 1024, 768, mpp=0.5, n_blobs=0, seed=4)
    (slides / "broken.svs").write_bytes(b"this is not a slide\n")
    (root / "labels.csv").write_text("slide_id,label\ns1,glandular\ns2,solid\nblank,lymphoid\n")
    return root


@pytest.fixture(scope="module")
def first_run(workdir: Path) -> Result:
    import logging

    handlers = list(logging.getLogger().handlers)
    try:
        return _run("classify", str(workdir / "slides"), "--prompts", str(PROMPTS), "-o", str(workdir / "out"),
                    *FAST, "--labels", str(workdir / "labels.csv"), "--prompt-sets", "3")
    finally:
        logging.getLogger().handlers[:] = handlers


def test_classify_from_raw_slides(first_run: Result, workdir: Path) -> None:
    out = workdir / "out"
    assert first_run.exit_code == 1, first_run.output  # broken.svs failed; the others went through
    rows = {r["slide_id"]: r for r in _rows(out / "predictions" / "demo.csv")}
    assert set(rows) == {"s1", "s2", "blank", "broken"}
    assert rows["broken"]["status"] == "failed" and rows["broken"]["reason"].startswith("tile:")
    assert rows["blank"]["status"] == "no_tissue" and rows["blank"]["predicted"] == ""
    for sid in ("s1", "s2"):
        r = rows[sid]
        probs = [float(r[f"prob_{c}"]) for c in CLASSES]
        scores = [float(r[f"score_{c}"]) for c in CLASSES]
        assert r["status"] == "ok" and int(r["k"]) == min(10, int(r["n_patches"]))
        assert sum(probs) == pytest.approx(1.0) and r["predicted"] == CLASSES[scores.index(max(scores))]
        # probabilities = softmax(logit_scale * scores), logit_scale = 1/0.07 at random init
        e = [math.exp((s - max(scores)) / 0.07) for s in scores]
        assert probs == pytest.approx([v / sum(e) for v in e], abs=1e-5)
    text = first_run.stdout
    for token in ("slide_id", "s1", "s2", "blank", "broken", "no_tissue", "failed", "balanced accuracy",
                  "confusion matrix", "prompt-set robustness (3"):
        assert token in text, token
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 2 and metrics["prompt_sets"]["n_sets"] == 3
    doc = json.loads((out / "predictions" / "demo.json").read_text())
    assert doc["provenance"]["prompts"]["name"] == "demo" and len(doc["slides"]) == 4
    assert (out / "report.html").is_file() and (out / "montages" / "demo").is_dir()
    assert sorted(p.name for p in (out / "heatmaps" / "demo").iterdir()) == ["s1", "s2"]


def test_classify_again_on_the_output_folder(first_run: Result, workdir: Path) -> None:
    r = _run("classify", "--prompts", str(PROMPTS), "-o", str(workdir / "out"), *FAST, "--top-k", "1",
             "--no-visuals")
    # broken.svs has no coords; its failed tiling (status.csv) keeps it in the run, so exit 1
    assert r.exit_code == 1, r.output
    rows = {x["slide_id"]: x for x in _rows(workdir / "out" / "predictions" / "demo.csv")}
    assert set(rows) == {"s1", "s2", "blank", "broken"}
    assert rows["broken"]["status"] == "failed" and rows["broken"]["reason"].startswith("tile: ")
    assert rows["s1"]["k"] == "1" and rows["blank"]["status"] == "no_tissue"


def test_single_slide_input(first_run: Result, workdir: Path) -> None:
    r = _run("classify", str(workdir / "slides" / "s2.svs"), "--prompts", str(PROMPTS), "-o", str(workdir / "out"),
             *FAST, "--no-visuals")
    assert r.exit_code == 0, r.output
    assert [x["slide_id"] for x in _rows(workdir / "out" / "predictions" / "demo.csv")] == ["s2"]


@pytest.mark.parametrize(
    ("labels", "match"),
    [("slide_id,label\ns1,papillary\n", "unknown classes 'papillary'"),
     ("slide_id,label\nzz,solid\n", "not in this run: 'zz'"),
     ("slide_id,label\ns1,solid\ns2,n\xe9crose\n".encode("latin-1"), "is not UTF-8 text (line 3)")],
    ids=["unknown-class", "unknown-slide", "latin-1"],
)
def test_bad_labels_are_one_line_usage_errors(workdir: Path, tmp_path: Path, labels: str | bytes, match: str) -> None:
    p = tmp_path / "labels.csv"
    p.write_bytes(labels.encode() if isinstance(labels, str) else labels)
    r = _run("classify", str(workdir / "slides" / "s1.svs"), "--prompts", str(PROMPTS), "-o", str(tmp_path / "o"),
             *FAST, "--labels", str(p))
    assert r.exit_code == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0]
    assert not (tmp_path / "o" / "coords").exists()


def test_bad_prompt_file_is_a_usage_error(workdir: Path, tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("name: x\ntemplates: [a photo of CLASSNAME]\nclasses: {A: [a]}\n")
    r = _run("classify", str(workdir / "slides" / "s1.svs"), "--prompts", str(p), "-o", str(tmp_path / "o"), *FAST)
    assert r.exit_code == 2 and "needs at least 2 classes" in r.stderr
