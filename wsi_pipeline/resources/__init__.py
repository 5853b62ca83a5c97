"""Files that ship inside the package: tiling presets, prompt files and the demo weights.

::

    resources/tiling/*.yaml      tiling presets (run configs with tiling keys only)
    resources/prompts/*.yaml     prompt files
    resources/models/*.safetensors (+ .json sidecar)   shipped weights

They are package data, so a wheel install has them as well as a source checkout (where
``configs/tiling`` and ``configs/prompts`` are links to these folders). A user names one by
its stem (``--config 40x_512``, ``--prompts demo``) or passes a path; :func:`resolve`
decides which.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

#: The folder of this package (a real directory in a wheel install and in a checkout).
RESOURCES_DIR = Path(__file__).resolve().parent
#: Kind → (sub-folder, file suffix).
KINDS: dict[str, tuple[str, str]] = {
    "tiling": ("tiling", ".yaml"),
    "prompts": ("prompts", ".yaml"),
    "models": ("models", ".safetensors"),
}


def shipped_dir(kind: str) -> Path:
    """The folder that holds the shipped files of ``kind`` (``tiling``, ``prompts``, ``models``)."""
    return RESOURCES_DIR / KINDS[kind][0]


def shipped_names(kind: str) -> list[str]:
    """Stems of the shipped files of ``kind``, sorted."""
    suffix = KINDS[kind][1]
    return sorted(p.name[: -len(suffix)] for p in shipped_dir(kind).glob(f"*{suffix}") if p.is_file())


def shipped_file(kind: str, name: str) -> Path | None:
    """The shipped file of ``kind`` called ``name`` (with or without its suffix), else ``None``."""
    suffix = KINDS[kind][1]
    stem = name[: -len(suffix)] if name.endswith(suffix) else name
    if not stem or os.sep in stem or "/" in stem or stem.startswith("."):
        return None
    path = shipped_dir(kind) / f"{stem}{suffix}"
    return path if path.is_file() else None


def resolve(kind: str, value: str | os.PathLike[str], what: str) -> Path:
    """``value`` as a file: an existing path as is, else the shipped file of that name.

    ``what`` names the option in the error (``"--prompts"``): a value that is neither an
    existing file nor a shipped name is one :class:`ConfigError` line listing the shipped names.
    """
    path = Path(value)
    if path.is_file():
        return path
    found = shipped_file(kind, str(value))
    if found is not None:
        return found
    names = ", ".join(shipped_names(kind)) or "none"
    problem = "is a folder, not a file" if path.is_dir() else "is neither a file nor a shipped name"
    raise ConfigError(f"{what} {str(value)!r} {problem} (shipped: {names})")


__all__ = ["KINDS", "RESOURCES_DIR", "resolve", "shipped_dir", "shipped_file", "shipped_names"]
