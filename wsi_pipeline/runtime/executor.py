"""Executors: how a stage maps its per-slide work function over the slides.

A stage describes its work as a :class:`WorkerSpec`: a ``factory`` that builds a worker
once (the embed stage loads its model there) and the worker, called once per slide with
``worker(item, progress)``, returns that slide's result (and never raises for a bad
slide). An executor decides where workers live:

* ``local`` (default): one worker in this process, slides in order.
* ``ray`` (``pip install -e ".[distributed]"``): one Ray actor per free slot of the
  cluster, each built once by the same factory, slides handed to whichever is idle;
  results come back in input order, so outputs are identical to ``local``.

>>> with open_executor(RuntimeConfig(executor="local")) as ex:             # doctest: +SKIP
...     results = ex.map(WorkerSpec(make_worker, on_error), items, progress)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from ..errors import ConfigError
from ..progress import NullProgress, Progress
from .locks import DEFAULT_LOCK_TIMEOUT_S
from .shard import Shard

_logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Worker(Protocol):
    """Processes one item (slide) and returns its result; never raises for a bad slide."""

    def __call__(self, item: Any, progress: Progress) -> Any: ...


@dataclass(frozen=True)
class WorkerSpec(Generic[T, R]):
    """What a stage asks an executor to run.

    Parameters
    ----------
    factory : builds one worker (picklable for Ray: a module-level class or ``functools.partial``).
    on_error : result for an item whose worker died or raised unexpectedly, given the item
        and a one-line reason; it also records the slide's status row.
    label : the slide id of an item (for progress and logs).
    num_cpus, num_gpus : resources of one Ray actor; ``num_gpus=None`` means 1 GPU when the
        cluster has GPUs, else 0.
    """

    factory: Callable[[], Any]
    on_error: Callable[[Any, str], Any]
    label: Callable[[Any], str] = str
    num_cpus: float = 1.0
    num_gpus: float | None = 0.0


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and which slides a stage processes (the CLI's ``--executor … --lock-timeout``)."""

    executor: str = "local"
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    gpus_per_worker: float | None = None
    shard: Shard | None = None
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--executor {self.executor!r}: choose one of {', '.join(EXECUTORS)}")
        if self.gpus_per_worker is not None and not self.gpus_per_worker >= 0:
            raise ConfigError(f"--gpus-per-worker {self.gpus_per_worker!r}: must be >= 0")
        if not self.lock_timeout_s > 0:
            raise ConfigError(f"--lock-timeout must be longer than 0 s, got {self.lock_timeout_s!r}")
        if self.executor == "local" and (self.ray_address or self.ray_num_cpus):
            raise ConfigError("--ray-address needs --executor ray")

    def with_(self, **changes: Any) -> RuntimeConfig:
        return dataclasses.replace(self, **changes)


def status_of(result: Any) -> str:
    return str(getattr(result, "status", "ok"))


class Executor(ABC):
    """Maps a :class:`WorkerSpec` over items; a context manager (Ray starts and stops there)."""

    name: str = ""
    #: ``True`` when workers may run on other machines (paths must be absolute).
    remote: bool = False

    def __init__(self, runtime: RuntimeConfig) -> None:
        self.runtime = runtime

    @abstractmethod
    def map(self, spec: WorkerSpec[T, R], items: Sequence[T], progress: Progress | None = None) -> list[R]:
        """One result per item, in input order; calls ``progress.start`` once the workers are built."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`__enter__` started."""


class LocalExecutor(Executor):
    """One worker in this process; the worker reports per-slide progress itself."""

    name = "local"

    def map(self, spec: WorkerSpec[T, R], items: Sequence[T], progress: Progress | None = None) -> list[R]:
        if not items:
            return []
        progress = progress or NullProgress()
        worker = spec.factory()  # may raise (e.g. a bad checkpoint) before any bar is drawn
        progress.start(len(items))
        return [worker(item, progress) for item in items]


def _ray_executor(runtime: RuntimeConfig) -> Executor:
    from .ray_executor import RayExecutor

    return RayExecutor(runtime)


#: Executor name → constructor. Add one here to support another engine.
EXECUTORS: dict[str, Callable[[RuntimeConfig], Executor]] = {
    "local": LocalExecutor,
    "ray": _ray_executor,
}


def executor_names() -> list[str]:
    return list(EXECUTORS)


def make_executor(runtime: RuntimeConfig | None = None) -> Executor:
    runtime = runtime or RuntimeConfig()
    return EXECUTORS[runtime.executor](runtime)


@contextmanager
def open_executor(runtime: RuntimeConfig | None = None) -> Iterator[Executor]:
    """The executor of ``runtime``, started for the ``with`` block (Ray: reuses a running session)."""
    with make_executor(runtime) as ex:
        yield ex


def absolute(path: str | os.PathLike[str] | None) -> str | None:
    """``path`` made absolute (workers on other machines or folders must find it), ``None`` kept."""
    return None if path is None else os.path.abspath(os.fspath(path))


__all__ = [
    "EXECUTORS",
    "Executor",
    "LocalExecutor",
    "RuntimeConfig",
    "Worker",
    "WorkerSpec",
    "absolute",
    "executor_names",
    "make_executor",
    "open_executor",
    "status_of",
]
