"""Executor registry, the local executor, Ray's absence and option validation (no Ray cluster needed)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from wsi_pipeline.cli import main
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.progress import NullProgress
from wsi_pipeline.runtime import EXECUTORS, LocalExecutor, RuntimeConfig, WorkerSpec, open_executor
from wsi_pipeline.runtime.options import runtime_config


class _Recorder:
    """A progress sink that records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def start(self, n: int) -> None:
        self.calls.append(("start", n))

    def start_slide(self, sid: str, n: int) -> None:
        self.calls.append(("start_slide", sid))

    def advance(self, n: int) -> None:
        self.calls.append(("advance", n))

    def end_slide(self, sid: str, status: str) -> None:
        self.calls.append(("end_slide", sid))

    def close(self) -> None:
        self.calls.append(("close", None))


def test_registry_and_runtime_validation() -> None:
    assert list(EXECUTORS) == ["local", "ray"]
    with pytest.raises(ConfigError, match="--executor 'dask': choose one of local, ray"):
        RuntimeConfig(executor="dask")
    with pytest.raises(ConfigError, match="--ray-address needs --executor ray"):
        RuntimeConfig(ray_address="auto")
    with pytest.raises(ConfigError, match="--gpus-per-worker"):
        RuntimeConfig(executor="ray", gpus_per_worker=-1)
    with pytest.raises(ConfigError, match="--gpus-per-worker needs --executor ray"):
        runtime_config({"executor": "local", "gpus_per_worker": 1.0, "lock_timeout": "6h"})
    rt = runtime_config({"executor": "local", "shard": "1/3", "lock_timeout": "90m"})
    assert str(rt.shard) == "1/3" and rt.lock_timeout_s == 5400


def test_local_executor_builds_one_worker_and_keeps_order() -> None:
    built: list[int] = []

    def factory() -> Any:
        built.append(1)

        def work(item: int, progress: Any) -> int:
            progress.start_slide(str(item), 1)
            progress.end_slide(str(item), "ok")
            return item * item

        return work

    rec = _Recorder()
    with open_executor(RuntimeConfig()) as ex:
        assert isinstance(ex, LocalExecutor) and not ex.remote
        assert ex.map(WorkerSpec(factory, on_error=lambda i, r: None), [3, 1, 2], rec) == [9, 1, 4]
        assert ex.map(WorkerSpec(factory, on_error=lambda i, r: None), [], rec) == []
    assert built == [1]  # once per map call with items, never per item
    assert rec.calls[0] == ("start", 3) and [c for c in rec.calls if c[0] == "start_slide"] == [
        ("start_slide", "3"), ("start_slide", "1"), ("start_slide", "2")]


def test_worker_start_error_comes_before_progress() -> None:
    def factory() -> Any:
        raise ConfigError("bad checkpoint")

    rec = _Recorder()
    with pytest.raises(ConfigError, match="bad checkpoint"):
        LocalExecutor(RuntimeConfig()).map(WorkerSpec(factory, on_error=lambda i, r: None), [1], rec)
    assert rec.calls == []


def test_missing_ray_is_a_one_line_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" raises ImportError
    with pytest.raises(ConfigError, match=r'needs Ray, which is not installed: pip install -e "\.\[distributed\]"'):
        with open_executor(RuntimeConfig(executor="ray")):
            pass
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG")
    r = CliRunner().invoke(main, ["tile", str(png), "-o", str(tmp_path / "o"), "--executor", "ray", "-q"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        'error: --executor ray needs Ray, which is not installed: pip install -e ".[distributed]" '
        '(or pip install "ray>=2.9")']
    assert not (tmp_path / "o").exists()


def test_cli_rejects_gpus_without_ray(tmp_path: Path) -> None:
    (tmp_path / "coords").mkdir()
    r = CliRunner().invoke(main, ["embed", str(tmp_path), "--gpus-per-worker", "1"])
    assert r.exit_code == 2 and r.output.strip() == "error: --gpus-per-worker needs --executor ray"
    r = CliRunner().invoke(main, ["embed", str(tmp_path), "--lock-timeout", "soon"])
    assert r.exit_code == 2 and "--lock-timeout 'soon'" in r.output


def _fake_ray(cpus: float, gpus: float) -> Any:
    return SimpleNamespace(cluster_resources=lambda: {"CPU": cpus, "GPU": gpus})


@pytest.mark.parametrize(
    ("cpus", "gpus", "num_cpus", "num_gpus", "expected"),
    [(8, 0, 1, 0.0, (8, 0.0)), (8, 0, 1, None, (8, 0.0)), (8, 4, 1, None, (4, 1.0)), (8, 4, 1, 0.5, (8, 0.5)),
     (8, 4, 1, 2.0, (2, 2.0)), (2, 0, 4, 0.0, (1, 0.0))],
)
def test_ray_slots(cpus: float, gpus: float, num_cpus: float, num_gpus: float | None,
                   expected: tuple[int, float]) -> None:
    from wsi_pipeline.runtime.ray_executor import RayExecutor

    ex = RayExecutor.__new__(RayExecutor)  # no Ray session: only the resource arithmetic
    ex.ray = _fake_ray(cpus, gpus)
    spec = WorkerSpec(lambda: None, on_error=lambda i, r: None, num_cpus=num_cpus, num_gpus=num_gpus)
    assert ex.slots(spec) == expected


def test_ray_slots_refuse_gpus_the_cluster_lacks() -> None:
    from wsi_pipeline.runtime.ray_executor import RayExecutor

    ex = RayExecutor.__new__(RayExecutor)
    ex.ray = _fake_ray(16, 0)
    with pytest.raises(ConfigError, match="--gpus-per-worker 1: the Ray cluster has 0 GPUs"):
        ex.slots(WorkerSpec(lambda: None, on_error=lambda i, r: None, num_gpus=1.0))


def test_ray_address_without_cluster_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=r"^cannot start --ray-address auto: .*'ray start --head'"):
        with open_executor(RuntimeConfig(executor="ray", ray_address="auto")):
            pass
    assert not ray.is_initialized()


def test_null_progress_is_accepted() -> None:
    ex = LocalExecutor(RuntimeConfig())
    assert ex.map(WorkerSpec(lambda: (lambda i, p: i + 1), on_error=lambda i, r: None), [1, 2], NullProgress()) == [2, 3]
