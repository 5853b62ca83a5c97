"""Weights shipped with the package (``wsi_pipeline/resources/models/<name>.safetensors``) and their notices.

``create_model(name)`` without weights always means a random init; callers that want the
shipped weights ask :func:`shipped_weights` for the file. It looks in the folders of
``$WSI_PIPELINE_MODELS`` (``os.pathsep``-separated) first, then in the package's own
``resources/models/`` (package data: present in a wheel install as in a checkout). The model
cards stay in the repository's ``models/<name>.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..resources import shipped_dir

MODELS_ENV = "WSI_PIPELINE_MODELS"
#: The package's own folder of shipped weights.
SHIPPED_MODELS_DIR = shipped_dir("models")

#: One-line warnings shown whenever shipped weights with caveats are used.
SHIPPED_NOTICES: dict[str, str] = {
    "convlm_demo": (
        "convlm_demo was trained on synthetic H&E-like tissue only: a demo model, not for real slides "
        "or clinical use (model card: models/convlm_demo.md in the source repository)"
    ),
}


def models_dirs() -> list[Path]:
    """Folders searched for shipped weights, in order."""
    env = [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p.strip()]
    return [*env, SHIPPED_MODELS_DIR]


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


__all__ = ["MODELS_ENV", "SHIPPED_MODELS_DIR", "SHIPPED_NOTICES", "models_dirs", "shipped_notice", "shipped_weights"]
