"""The wheel is the product: it must carry the demo weights, the tiling presets and the prompt files.

(``.ci/wheel_smoke`` goes further: it installs the wheel into a fresh virtual environment
outside the checkout and runs ``wsi-pipeline demo`` there.)
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from wsi_pipeline.model import shipped_weights
from wsi_pipeline.resources import shipped_names

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_weights_presets_and_prompts(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy, so that the build leaves no build/ folder in the checkout
    shutil.copytree(ROOT / "wsi_pipeline", src / "wsi_pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("wsi_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        weights = zf.read("wsi_pipeline/resources/models/convlm_demo.safetensors")
    tiling, prompts = shipped_names("tiling"), shipped_names("prompts")
    assert {"20x_256", "40x_512", "biopsy_20x_256"} <= set(tiling) and {"demo", "demo_train", "nsclc"} <= set(prompts)
    expected = {f"wsi_pipeline/resources/tiling/{n}.yaml" for n in tiling}
    expected |= {f"wsi_pipeline/resources/prompts/{n}.yaml" for n in prompts}
    expected |= {"wsi_pipeline/resources/models/convlm_demo.safetensors.json", "wsi_pipeline/py.typed",
                 "wsi_pipeline/model/model_configs/convlm_demo.json"}
    assert expected <= names, sorted(expected - names)
    shipped = shipped_weights("convlm_demo")
    assert shipped is not None
    assert hashlib.sha256(weights).hexdigest() == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert not [n for n in names if n.startswith(("tests/", "models/", "configs/", "scripts/", "benchmarks/"))]
