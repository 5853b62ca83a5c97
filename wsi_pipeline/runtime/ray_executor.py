"""The ``ray`` executor: slides spread over a Ray cluster, one long-lived actor per slot.

Each actor builds its worker once with the stage's factory (the embed stage loads the
model there) and then processes whole slides through the same per-slide function as the
local executor. Actors ask for ``num_cpus`` CPUs and, for embedding, ``--gpus-per-worker``
GPUs; there are as many actors as the cluster has slots (and no more than slides). Slides
are handed to whichever actor is idle; results are returned in input order.

``--ray-address auto|HOST:PORT`` joins a running cluster (left running afterwards);
without it a local Ray is started in-process with ``ray.init(num_cpus=…)`` and shut down
at the end. A session that is already initialised (e.g. by a caller) is reused as is.
Output folders must be on a filesystem every node sees.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError, WsiPipelineError, one_line
from ..progress import NullProgress, Progress
from .executor import Executor, RuntimeConfig, WorkerSpec, status_of
from .locks import this_host

_logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[distributed]" (or pip install "ray>=2.9")'


def import_ray() -> Any:
    """The ``ray`` module, or :class:`ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from e
    return ray


class _ActorShell:
    """Holds one worker inside a Ray actor; a start-up error is kept and handed to the driver."""

    def __init__(self, factory: Any) -> None:
        self.worker: Any = None
        self.error: BaseException | None = None
        try:
            self.worker = factory()
        except WsiPipelineError as e:  # e.g. a bad checkpoint: the driver re-raises it as is
            self.error = e
        except Exception as e:  # unexpected: keep one line, never an unpicklable object
            self.error = RuntimeError(f"Ray worker failed to start: {type(e).__name__}: {one_line(e)}")

    def ready(self) -> tuple[str, BaseException | None]:
        return f"{this_host()}:{os.getpid()}", self.error

    def run(self, item: Any) -> Any:
        return self.worker(item, NullProgress())


class RayExecutor(Executor):
    """Maps a :class:`WorkerSpec` over items with a pool of Ray actors."""

    name = "ray"
    remote = True

    def __init__(self, runtime: RuntimeConfig) -> None:
        super().__init__(runtime)
        self.ray = import_ray()
        self._owns_session = False

    def __enter__(self) -> RayExecutor:
        ray = self.ray
        if ray.is_initialized():
            return self
        common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        address = self.runtime.ray_address
        try:
            if address:
                ray.init(address=address, **common)
            else:
                ray.init(num_cpus=self.runtime.ray_num_cpus, **common)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"--ray-address {address}" if address else "a local Ray"
            raise ConfigError(f"cannot start {where}: {one_line(e).rstrip('.')}; start the cluster with 'ray start --head' "
                              "or drop --ray-address for a local Ray") from e
        self._owns_session = True
        _logger.info("Ray: %s (%s)", address or "local session started in-process", self._resources_line())
        return self

    def close(self) -> None:
        if self._owns_session:
            self.ray.shutdown()
            self._owns_session = False

    def _resources_line(self) -> str:
        res = self.ray.cluster_resources()
        return f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"

    def slots(self, spec: WorkerSpec[Any, Any]) -> tuple[int, float]:
        """(number of actors the cluster can hold at once, GPUs per actor)."""
        res = self.ray.cluster_resources()
        gpus = float(res.get("GPU", 0.0))
        num_gpus = spec.num_gpus
        if num_gpus is None:
            num_gpus = 1.0 if gpus >= 1 else 0.0
        if num_gpus > 0:
            if gpus < num_gpus:
                raise ConfigError(f"--gpus-per-worker {num_gpus:g}: the Ray cluster has {gpus:g} GPUs; "
                                  "use --gpus-per-worker 0 to run on CPUs")
            return max(1, int(gpus // num_gpus)), num_gpus
        cpus = float(res.get("CPU", 1.0))
        return max(1, int(cpus // max(spec.num_cpus, 1e-3))), 0.0

    def map(self, spec: WorkerSpec[Any, Any], items: Sequence[Any], progress: Progress | None = None) -> list[Any]:
        if not items:
            return []
        ray = self.ray
        progress = progress or NullProgress()
        n_slots, num_gpus = self.slots(spec)
        n_actors = min(n_slots, len(items))
        actor_cls = ray.remote(_ActorShell).options(num_cpus=spec.num_cpus, num_gpus=num_gpus, max_restarts=0)
        actors = [actor_cls.remote(spec.factory) for _ in range(n_actors)]
        try:
            started = ray.get([a.ready.remote() for a in actors])
            for _, error in started:
                if error is not None:
                    raise error
            _logger.info("Ray: %d workers (%g CPU, %g GPU each) on %s", n_actors, spec.num_cpus, num_gpus,
                         ", ".join(sorted({w for w, _ in started})))
            progress.start(len(items))
            return self._dispatch(spec, items, actors, progress)
        finally:
            for a in actors:
                ray.kill(a)

    def _dispatch(self, spec: WorkerSpec[Any, Any], items: Sequence[Any], actors: list[Any],
                  progress: Progress) -> list[Any]:
        ray = self.ray
        results: list[Any] = [None] * len(items)
        pending: dict[Any, tuple[Any, int]] = {}
        next_i = 0
        alive = list(actors)

        def submit(actor: Any) -> None:
            nonlocal next_i
            pending[actor.run.remote(items[next_i])] = (actor, next_i)
            next_i += 1

        for a in alive:
            if next_i < len(items):
                submit(a)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor, i = pending.pop(ref)
            label = spec.label(items[i])
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # the process died (OOM, node lost, killed)
                alive.remove(actor)
                result = spec.on_error(items[i], f"Ray worker died: {one_line(e)}")
            except ray.exceptions.RayTaskError as e:  # an unexpected exception inside the worker
                cause = getattr(e, "cause", None) or e
                result = spec.on_error(items[i], f"unexpected {type(cause).__name__}: {one_line(cause)}")
            results[i] = result
            status = status_of(result)
            reason = str(getattr(result, "reason", ""))
            if status == "failed":
                _logger.error("%s: %s", label, reason)
            elif status == "skipped" and reason.startswith("locked"):
                _logger.info("%s: skipped, %s", label, reason)
            progress.end_slide(label, status)
            if next_i < len(items):
                if actor in alive:
                    submit(actor)
                elif not alive and not pending:
                    for j in range(next_i, len(items)):
                        results[j] = spec.on_error(items[j], "no Ray workers left (all died); rerun to resume")
                        progress.end_slide(spec.label(items[j]), "failed")
                    next_i = len(items)
        return results


__all__ = ["INSTALL_HINT", "RayExecutor", "import_ray"]
