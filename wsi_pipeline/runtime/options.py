"""Command-line options of the runtime (executor, Ray, shard, locks), shared by tile, embed and classify.

Kept here so that ``cli.py`` stays a thin layer: :data:`RUNTIME_OPTIONS` are the click options
(``cli.py`` files them under the "Runtime" section of ``--help``), :func:`runtime_config` turns
the parsed values into a :class:`RuntimeConfig`.
"""

from __future__ import annotations

from typing import Any

import click

from ..errors import ConfigError
from .executor import RuntimeConfig, executor_names
from .locks import parse_duration
from .shard import parse_shard

RUNTIME_OPTIONS = [
    click.option("--executor", type=click.Choice(executor_names()), default="local", show_default=True,
                 help="Run slides in this process, or spread them over a Ray cluster (pip install -e '.[distributed]')."),
    click.option("--ray-address", default=None,
                 help="Ray cluster to join: auto or HOST:PORT [a local Ray started in-process]."),
    click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
                 help="GPUs per Ray embedding actor [1 if the cluster has GPUs, else 0]."),
    click.option("--shard", default=None,
                 help="Only shard i of n, 0-based 'i/n' (e.g. $SLURM_ARRAY_TASK_ID/8): n jobs cover every slide once."),
    click.option("--lock-timeout", default="6h", show_default=True,
                 help="A slide lock older than this is stale and cleared (e.g. 6h, 90m, 3600s)."),
]


def runtime_config(params: dict[str, Any]) -> RuntimeConfig:
    """The :class:`RuntimeConfig` of a command's parsed options; :class:`ConfigError` when they clash."""
    if params.get("executor") != "ray" and params.get("gpus_per_worker") is not None:
        raise ConfigError("--gpus-per-worker needs --executor ray")
    return RuntimeConfig(
        executor=params.get("executor") or "local",
        ray_address=params.get("ray_address"),
        gpus_per_worker=params.get("gpus_per_worker"),
        shard=parse_shard(params.get("shard")),
        lock_timeout_s=parse_duration(params.get("lock_timeout") or "6h"),
    )


__all__ = ["RUNTIME_OPTIONS", "runtime_config"]
