"""The ``ray`` executor on a local 2-CPU Ray: results identical to ``local``, actors, failures.

Needs ``pip install -e ".[distributed]"``; skipped (with that reason) without Ray.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from slide_factory import make_slide

from wsi_pipeline.classify.stage import classify_slides
from wsi_pipeline.cli import main
from wsi_pipeline.config import TilingConfig
from wsi_pipeline.embed.stage import EmbedConfig
from wsi_pipeline.errors import CheckpointError
from wsi_pipeline.runtime import RuntimeConfig, WorkerSpec, open_executor
from wsi_pipeline.runtime.locks import this_host
from wsi_pipeline.store.status import latest_status

ray = pytest.importorskip("ray", reason='Ray is optional: pip install -e ".[distributed]"')
pytestmark = pytest.mark.ray

PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "demo.yaml"
TILING = TilingConfig(patch_size=64, target_mpp=1.0, min_tissue_area=2000.0)
EMBED = EmbedConfig(model="convlm_test", workers=0, batch_size=8)
SLIDES = ("s1", "s2", "s3")
RAY = RuntimeConfig(executor="ray")


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """A local Ray with 2 CPUs for this module; the executor reuses it (and leaves it running)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors can't import test modules
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("ray_slides")
    return [make_slide(d / f"{sid}.svs", 1536, 1024, mpp=0.5, seed=50 + i).path for i, sid in enumerate(SLIDES)]


@pytest.fixture(scope="module")
def local_out(slides: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    summary = classify_slides(slides, out, PROMPTS, tiling=TILING, embed=EMBED, visuals=False)
    assert [r.status for r in summary.rows] == ["ok"] * 3
    return out


def _outputs(out: Path) -> dict[str, bytes]:
    keep = ("coords", "features", "thumbnails", "tissue", "predictions")
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] in keep and not p.name.endswith(".json")}


def test_classify_on_ray_is_identical_to_local(ray_session: None, slides: list[Path], local_out: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = classify_slides(slides, out, PROMPTS, tiling=TILING, embed=EMBED, visuals=False, runtime=RAY)
    assert ray.is_initialized()  # the caller's session was reused, not shut down
    assert [r.status for r in summary.rows] == ["ok"] * 3
    ours, theirs = _outputs(out), _outputs(local_out)
    assert sorted(ours) == sorted(theirs) and len(ours) == 3 * 4 + 1
    assert ours == theirs  # coords, thumbnails, GeoJSON, features and the predictions CSV, byte for byte
    # embedding ran in actors (not the driver), each loading the model once and embedding whole slides
    workers = [r.worker for r in summary.embed_summary.results]
    assert len(workers) == 3 and f"{this_host()}:{os.getpid()}" not in workers
    assert 1 <= len(set(workers)) <= 2  # 2 CPUs: at most 2 actors, so one of them embedded two slides
    for stage in ("tile", "embed"):
        assert {r["status"] for r in latest_status(out, stage).values()} == {"ok"}
    assert not list((out / "locks").rglob("*.lock"))


def test_cli_on_ray_resumes_and_checks_gpus(ray_session: None, slides: list[Path], local_out: Path) -> None:
    r = CliRunner().invoke(main, ["tile", *map(str, slides), "-o", str(local_out), "--patch-size", "64",
                                  "--target-mpp", "1.0", "--min-tissue-area", "2000", "--executor", "ray", "-q"])
    assert r.exit_code == 0 and "tile: 0 ok, 3 skipped, 0 failed" in r.output, r.output
    r = CliRunner().invoke(main, ["embed", str(local_out), "--model", "convlm_test", "--executor", "ray",
                                  "--gpus-per-worker", "1", "-q"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (
        "error: --gpus-per-worker 1: the Ray cluster has 0 GPUs; use --gpus-per-worker 0 to run on CPUs")


class _DiesOn:
    """A worker whose process exits (as on OOM or node loss) when it meets ``fatal``."""

    def __init__(self, fatal: str) -> None:
        self.fatal = fatal

    def __call__(self, item: str, progress: Any) -> tuple[str, str]:
        if item == self.fatal:
            os._exit(1)
        return item, "ok"


def _died(item: str, reason: str) -> tuple[str, str]:
    return item, reason


def test_a_dying_worker_fails_its_slide_and_the_rest_go_on(ray_session: None) -> None:
    import functools

    spec = WorkerSpec(functools.partial(_DiesOn, "boom"), on_error=_died)
    items = ["a", "boom", "b", "c", "d"]
    with open_executor(RAY) as ex:
        results = ex.map(spec, items)
    assert [r[0] for r in results] == items  # input order
    assert [r[1] for r in results if r[0] != "boom"] == ["ok"] * 4
    assert dict(results)["boom"].startswith("Ray worker died: ")


def _bad_checkpoint() -> Any:
    raise CheckpointError("weights file w.safetensors is truncated or corrupt; re-export or re-download it")


def test_a_worker_start_error_reaches_the_driver_as_is(ray_session: None) -> None:
    with open_executor(RAY) as ex, pytest.raises(CheckpointError, match=r"^weights file w.safetensors is truncated"):
        ex.map(WorkerSpec(_bad_checkpoint, on_error=_died), ["a", "b"])
