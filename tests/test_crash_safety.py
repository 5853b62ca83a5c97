"""Crash safety: ``wsi-pipeline embed`` killed with SIGKILL at several points, then rerun.

The killed run is a real subprocess running the real CLI; a small wrapper (``_KILLER``
below, test-only) patches one function so that the process SIGKILLs itself at a named
point. After every kill: whatever sits at a final output path is complete (validates and
equals the uninterrupted run byte for byte); a rerun clears the dead run's lock and
temporary files and finishes; all outputs are then byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from slide_factory import make_slide

from wsi_pipeline.cli import main
from wsi_pipeline.config import TilingConfig
from wsi_pipeline.store.coords import read_coords
from wsi_pipeline.store.features import get_store
from wsi_pipeline.store.status import read_status
from wsi_pipeline.tiling.stage import tile_slides

pytestmark = pytest.mark.slow  # four real subprocesses, each SIGKILLed

ARGS = ["--model", "convlm_test", "--workers", "0", "--batch-size", "4"]
SLIDES = ("s1", "s2", "s3")

#: Runs the CLI with one kill point armed (WSI_TEST_KILL_AT); slide and batch counts are 1-based.
_KILLER = r"""
import os, signal, sys

point = os.environ["WSI_TEST_KILL_AT"]
state = {"slide": 0, "batch": 0}


def die():
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


from wsi_pipeline.embed import stage as embed_stage
from wsi_pipeline.store import atomic, features

real_embed, real_call, real_replace = embed_stage.embed_coords, embed_stage.Encoder.__call__, os.replace


def embed_coords(*args, **kwargs):
    state["slide"] += 1
    state["batch"] = 0
    return real_embed(*args, **kwargs)


def call(self, batch):
    state["batch"] += 1
    if point == "mid_slide" and state["slide"] == 2 and state["batch"] == 2:
        die()
    return real_call(self, batch)


def atomic_path(final):
    if point == "before_first_write":
        die()
    return atomic.atomic_path(final)


def replace(src, dst):
    is_features = str(dst).endswith(".h5") and os.sep + "features" + os.sep in str(dst)
    if is_features and state["slide"] == 2 and point == "before_rename":
        die()
    real_replace(src, dst)
    if is_features and state["slide"] == 2 and point == "after_rename":
        die()


embed_stage.embed_coords, embed_stage.Encoder.__call__, features.atomic_path, os.replace = embed_coords, call, atomic_path, replace
from wsi_pipeline.cli import main

main(prog_name="wsi-pipeline")
"""


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    (root / "slides").mkdir()
    for i, sid in enumerate(SLIDES):
        make_slide(root / "slides" / f"{sid}.svs", 1536, 1024, mpp=0.5, seed=20 + i)
    results = tile_slides(sorted((root / "slides").iterdir()), root / "tiled",
                          TilingConfig(patch_size=64, target_mpp=1.0, min_tissue_area=2000.0))
    assert all(r.status == "ok" and (r.n_patches or 0) > 8 for r in results)  # >= 3 batches of 4 each
    return root / "tiled"


@pytest.fixture(scope="module")
def baseline(tiled: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Feature files of an uninterrupted run: relative path → bytes."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    shutil.copytree(tiled / "coords", out / "coords")
    r = CliRunner().invoke(main, ["embed", str(out), *ARGS, "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return _feature_bytes(out)


def _feature_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "features").rglob("*.h5"))
            if not p.name.startswith(".")}


def _kill_run(out: Path, point: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WSI_TEST_KILL_AT": point, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", _KILLER, "embed", str(out), *ARGS, "-q"], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("point", "done_before_kill", "locked", "statuses"),
    [
        ("before_first_write", 0, "s1", ["ok", "ok", "ok"]),
        ("mid_slide", 1, "s2", ["ok", "skipped", "ok", "ok"]),
        ("before_rename", 1, "s2", ["ok", "skipped", "ok", "ok"]),
        ("after_rename", 2, "s2", ["ok", "skipped", "skipped", "ok"]),  # s2 was done; its row was never written
    ],
)
def test_sigkill_then_rerun_gives_identical_outputs(tiled: Path, baseline: dict[str, bytes], tmp_path: Path,
                                                    point: str, done_before_kill: int, locked: str,
                                                    statuses: list[str]) -> None:
    out = tmp_path / "out"
    shutil.copytree(tiled / "coords", out / "coords")
    killed = _kill_run(out, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # after the kill: only complete files at final paths, each identical to the uninterrupted run
    on_disk = _feature_bytes(out)
    assert len(on_disk) == done_before_kill
    assert all(on_disk[k] == baseline[k] for k in on_disk)
    [model_dir] = {Path(k).parent for k in baseline}
    store = get_store("h5")
    for rel in on_disk:
        sid = Path(rel).stem
        coords, _ = read_coords(out / "coords" / f"{sid}.h5")
        assert store.validate(out / "features", model_dir.name, f"{sid}", coords) is None
    temps = list((out / "features").rglob("*.tmp"))
    assert len(temps) == (1 if point == "before_rename" else 0)  # the complete temp is never taken as done
    [lock] = list((out / "locks" / "embed").rglob("*.lock"))  # the dead run's lock, left behind
    assert lock.stem == locked

    rerun = CliRunner().invoke(main, ["embed", str(out), *ARGS], catch_exceptions=False)
    assert rerun.exit_code == 0, rerun.output
    assert f"cleared stale embed lock of {lock.stem}" in rerun.stderr and "is gone" in rerun.stderr
    assert _feature_bytes(out) == baseline  # byte-identical to the uninterrupted run
    assert not list(out.rglob("*.tmp")) and not list((out / "locks").rglob("*.lock"))
    assert [r["status"] for r in read_status(out) if r["stage"] == "embed"] == statuses
