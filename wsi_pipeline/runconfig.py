"""Run configs: one YAML file that holds the options of every stage (``--config run.yaml``).

A run config is a flat mapping ``option: value``. Its keys are the long option names of
``tile``, ``embed`` and ``classify`` (``min-tissue`` and ``min_tissue`` alike, ``out`` for
``-o/--out``, ``inputs`` for the slides) and the tiling settings that have no flag (the
:class:`~wsi_pipeline.config.TilingConfig` fields, such as ``median_size``). A tiling preset
is a run config with tiling keys only. A relative path in the file (the values of
:data:`PATH_KEYS`) is taken relative to the file's folder when it exists there, else as given
(relative to the working folder, or a shipped name such as ``prompts: demo``); ``out`` is
always relative to the file's folder.

Each of those verbs writes the options it ran with, after merging (flags win over the file,
the file wins over the defaults), to ``OUT/run_config.yaml``: grouped by stage under comment
headings, paths made absolute and ``out: .`` (the folder of the file), so that
``--config OUT/run_config.yaml`` repeats the run there and ``-o OTHER`` repeats it elsewhere.
Which keys exist and which stage they belong to is decided by the command line
(:mod:`wsi_pipeline.cli`); this module reads and writes the file.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from .config import option_key, read_yaml_mapping
from .errors import ConfigError
from .resources import resolve
from .store.atomic import atomic_write_text

#: File name of the effective run config in an output folder.
RUN_CONFIG_NAME = "run_config.yaml"
#: Keys whose values are paths (``inputs``: a list of them; ``@list.txt`` items too).
PATH_KEYS = ("inputs", "out", "list", "mpp_csv", "slide_params", "weights", "adapter", "context", "slides",
             "prompts", "labels")


def read_run_config(source: str | os.PathLike[str], known: Collection[str]) -> tuple[Path, dict[str, Any]]:
    """``(path, {key: value})`` of a run config given as a path or a shipped preset name.

    Raises :class:`ConfigError` (one line naming the file) for an unreadable file, invalid
    YAML, a value that is not a mapping, a key given twice (``min-tissue`` and
    ``min_tissue``) and a key not in ``known``.
    """
    path = resolve("tiling", source, "--config")
    values: dict[str, Any] = {}
    for raw, value in read_yaml_mapping(path).items():
        key = option_key(raw)
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config {path}: unknown option {raw!r}{hint}")
        if key in values:
            raise ConfigError(f"config {path}: option {key!r} is given twice")
        values[key] = _anchored(key, value, path.parent) if key in PATH_KEYS else value
    return path, values


def _anchored(key: str, value: Any, folder: Path) -> Any:
    """A relative path of the file → relative to ``folder`` when it exists there (``out``: always)."""
    if isinstance(value, (list, tuple)):
        return [_anchored(key, v, folder) for v in value]
    if not isinstance(value, str) or not value:
        return value
    at, rest = ("@", value[1:]) if value.startswith("@") else ("", value)
    if os.path.isabs(rest):
        return value
    candidate = folder / rest
    return at + str(candidate) if key == "out" or candidate.exists() else value


def read_written_config(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The keys of ``OUT/run_config.yaml`` as written by an earlier verb; ``{}`` when absent or unreadable."""
    path = Path(out_dir) / RUN_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        return {option_key(k): v for k, v in read_yaml_mapping(path).items()}
    except ConfigError:
        return {}


def write_run_config(out_dir: str | os.PathLike[str], sections: Mapping[str, Mapping[str, Any]],
                     header: str) -> Path:
    """Write ``OUT/run_config.yaml`` atomically: ``header`` as comment lines, then one block per section."""
    import yaml

    blocks = ["".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())]
    for title, values in sections.items():
        if values:
            body = yaml.safe_dump(dict(values), sort_keys=False, allow_unicode=True, default_flow_style=False)
            blocks.append(f"# {title}\n{body}")
    path = Path(out_dir) / RUN_CONFIG_NAME
    atomic_write_text(path, "\n".join(blocks))
    return path


__all__ = ["PATH_KEYS", "RUN_CONFIG_NAME", "option_key", "read_run_config", "read_written_config", "write_run_config"]
