"""Weights shipped with the project (``models/<name>.safetensors``) and their notices.

``create_model(name)`` without weights always means a random init; callers that want the
shipped weights ask :func:`shipped_weights` for the file. It looks in the folders of
``$WSI_PIPELINE_MODELS`` (``os.pathsep``-separated) first, then in the repository's
``models/`` folder.
"""

from __future__ import annotations

import os
from pathlib import Path

MODELS_ENV = "WSI_PIPELINE_MODELS"
#: The repository's ``models/`` folder (exists in a source checkout / editable install).
REPO_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"

#: One-line warnings shown whenever shipped weights with caveats are used.
SHIPPED_NOTICES: dict[str, str] = {
    "convlm_demo": (
        "convlm_demo was trained on synthetic H&E-like tissue only: a demo model, not for real slides "
        "or clinical use (see models/convlm_demo.md)"
    ),
}


def models_dirs() -> list[Path]:
    """Folders searched for shipped weights, in order."""
    env = [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p.strip()]
    return [*env, REPO_MODELS_DIR]


def shipped_weights(name: str) -> Path | None:
    """``<dir>/<name>.safetensors`` from the first folder of :func:`models_dirs` that has it, else ``None``."""
    for d in models_dirs():
        path = d / f"{name}.safetensors"
        if path.is_file():
            return path
    return None


def shipped_notice(name: str) -> str | None:
    """The one-line caveat to show when ``name``'s shipped weights are used, if any."""
    return SHIPPED_NOTICES.get(name)


__all__ = ["MODELS_ENV", "REPO_MODELS_DIR", "SHIPPED_NOTICES", "models_dirs", "shipped_notice", "shipped_weights"]
