"""Determinism: two CPU runs of the whole pipeline give byte-identical files.

Every output file is compared byte for byte, except the fields that are meant to differ:
``created`` timestamps (predictions JSON, metrics, report) and the ``seconds`` and
``timestamp`` columns of ``status.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from slide_factory import make_slide

from wsi_pipeline.cli import main

PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "demo.yaml"
ARGS = ["--model", "convlm_test", "--patch-size", "64", "--target-mpp", "1.0", "--workers", "0",
        "--min-tissue-area", "2000", "--prompt-sets", "2", "-q"]
#: Files whose only run-dependent content is a timestamp; compared after removing it.
TIMESTAMPED = {"status.csv", "metrics.json", "report.html", "predictions/demo.json"}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("determinism")
    slides = root / "slides"
    slides.mkdir()
    make_slide(slides / "s1.svs", 1536, 1024, mpp=0.5, seed=41)
    make_slide(slides / "s2.tif", 1536, 1024, mpp=0.5, layout="generic", seed=42)
    make_slide(slides / "blank.svs", 1024, 768, mpp=0.5, n_blobs=0, seed=43)
    (root / "labels.csv").write_text("slide_id,label\ns1,glandular\ns2,solid\n")
    outs = []
    for name in ("run1", "run2"):
        out = root / name
        r = CliRunner().invoke(main, ["classify", str(slides), "--prompts", str(PROMPTS), "-o", str(out), *ARGS,
                                      "--labels", str(root / "labels.csv")], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        outs.append(out)
    return outs[0], outs[1]


def _files(out: Path) -> dict[str, Path]:
    return {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*")) if p.is_file()}


def _without_created(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_created(v) for k, v in value.items() if k != "created"}
    if isinstance(value, list):
        return [_without_created(v) for v in value]
    return value


def _status_rows(path: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    assert rows and all(r["timestamp"] for r in rows)
    return [{k: v for k, v in r.items() if k not in ("seconds", "timestamp")} for r in rows]


def test_same_file_set_and_every_plain_file_byte_identical(two_runs: tuple[Path, Path]) -> None:
    a, b = (_files(out) for out in two_runs)
    assert sorted(a) == sorted(b)
    kinds = {Path(k).suffix for k in a}
    assert {".h5", ".csv", ".png", ".geojson", ".json"} <= kinds
    assert any(k.startswith("features/") for k in a) and any(k.startswith("heatmaps/") for k in a)
    differing = [k for k in a if k not in TIMESTAMPED and a[k].read_bytes() != b[k].read_bytes()]
    assert differing == []


def test_datasets_are_equal_and_not_trivial(two_runs: tuple[Path, Path]) -> None:
    """The byte comparison above is only meaningful if the files hold real, run-specific data."""
    a, b = two_runs
    [fdir] = (a / "features").iterdir()
    with h5py.File(fdir / "s1.h5") as f1, h5py.File(b / "features" / fdir.name / "s1.h5") as f2:
        x1, x2 = f1["features"][:], f2["features"][:]
        assert x1.shape[0] > 8 and np.array_equal(x1, x2) and np.unique(x1).size > 100
        assert dict(f1.attrs).keys() == dict(f2.attrs).keys()
    p1 = (a / "predictions" / "demo.csv").read_text()
    assert p1 == (b / "predictions" / "demo.csv").read_text()
    assert len(p1.splitlines()) == 4 and "no_tissue" in p1


@pytest.mark.parametrize("name", sorted(TIMESTAMPED))
def test_timestamped_files_differ_only_in_their_timestamps(two_runs: tuple[Path, Path], name: str) -> None:
    a, b = (out / name for out in two_runs)
    if name == "status.csv":
        assert _status_rows(a) == _status_rows(b)
    elif name.endswith(".json"):
        da, db = json.loads(a.read_text()), json.loads(b.read_text())
        assert _without_created(da) == _without_created(db) and da != _without_created(da)
    else:
        stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}")
        ta, tb = a.read_text(), b.read_text()
        assert stamp.search(ta) and stamp.sub("T", ta) == stamp.sub("T", tb)
