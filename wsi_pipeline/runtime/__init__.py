"""Scale-out and robustness: executors (local, Ray), ``--shard i/n`` and per-slide lock files.

* :mod:`.executor`: :class:`RuntimeConfig` and the executor registry (``local``, ``ray``);
  a stage maps its per-slide work (a :class:`WorkerSpec`) over the slides with one.
* :mod:`.ray_executor`: Ray actors that build their worker (e.g. load the model) once.
* :mod:`.shard`: deterministic split of the slides by a hash of the slide id.
* :mod:`.locks`: ``out/locks/<stage>/…/<slide_id>.lock`` with stale-lock clearing.
* :mod:`.options`: the matching command-line options.

Ray is optional and imported only when ``--executor ray`` is used.
"""

from __future__ import annotations

from .executor import (
    EXECUTORS,
    Executor,
    LocalExecutor,
    RuntimeConfig,
    WorkerSpec,
    make_executor,
    open_executor,
)
from .locks import DEFAULT_LOCK_TIMEOUT_S, LockInfo, SlideLock, SlideLocks, parse_duration
from .shard import Shard, parse_shard, shard_index

__all__ = [
    "DEFAULT_LOCK_TIMEOUT_S",
    "EXECUTORS",
    "Executor",
    "LocalExecutor",
    "LockInfo",
    "RuntimeConfig",
    "Shard",
    "SlideLock",
    "SlideLocks",
    "WorkerSpec",
    "make_executor",
    "open_executor",
    "parse_duration",
    "parse_shard",
    "shard_index",
]
