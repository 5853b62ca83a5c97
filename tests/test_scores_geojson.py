"""``classify`` writes per-patch class scores QuPath imports: ``scores/<prompts>/<slide>.geojson``.

The file is parsed with a plain reader that applies QuPath's documented import rules
(``../shared/reference/real-models.md``: File › Import objects, ``PathIO.readObjects``): a
FeatureCollection of Features; Polygon/MultiPolygon geometry in level-0 pixels;
``properties.objectType`` one of annotation, detection, tile; a classification needs both
``name`` and ``color`` or the import throws; ``properties.measurements`` maps names to numbers.
Every measurement is recomputed from the features file and the model's text classifier.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from slide_factory import make_slide
from zeroshot_reference import FP16_COS

from wsi_pipeline.classify.prompts import load_prompts
from wsi_pipeline.classify.textclassifier import build_text_classifier
from wsi_pipeline.cli import main
from wsi_pipeline.embed.stage import EmbedConfig, load_encoder
from wsi_pipeline.store.features import get_store

PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "demo.yaml"
FAST = ["--model", "convlm_test", "--patch-size", "64", "--target-mpp", "1.0", "--workers", "0"]
QUPATH_OBJECT_TYPES = {"annotation", "detection", "tile"}


def qupath_read(path: Path) -> list[dict]:
    """QuPath's import rules as plain code: one dict (type, polygon rings, class, measurements) per object."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("type") != "FeatureCollection":
        raise ValueError("not a FeatureCollection")
    objects = []
    for feat in doc["features"]:
        if feat.get("type") != "Feature":
            raise ValueError("not a Feature")
        geom = feat["geometry"]
        if geom["type"] not in ("Polygon", "MultiPolygon"):
            raise ValueError(f"geometry {geom['type']}")
        props = feat.get("properties", {})
        if props.get("objectType", "annotation") not in QUPATH_OBJECT_TYPES:
            raise ValueError(f"objectType {props.get('objectType')}")
        cls = props.get("classification")
        if cls is not None and not ("name" in cls and "color" in cls):
            raise ValueError("classification needs name and color")  # QuPath throws here
        meas = props.get("measurements", {})
        if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   for k, v in meas.items()):
            raise ValueError("measurements must map names to numbers")
        objects.append({"type": props.get("objectType"), "rings": geom["coordinates"], "class": cls,
                        "measurements": meas})
    return objects


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def classified(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scores_geojson")
    slides = root / "slides"
    slides.mkdir()
    make_slide(slides / "s1.svs", 2048, 1536, mpp=0.5, seed=1)
    make_slide(slides / "blank.svs", 1024, 768, mpp=0.5, n_blobs=0, seed=4)
    r = _run("classify", slides, "--prompts", PROMPTS, "-o", root / "out", *FAST, "--no-visuals", "-q")
    assert r.exit_code == 0, r.output
    return root / "out"


def test_scores_geojson_follows_qupath_rules_and_recomputes(classified: Path) -> None:
    objects = qupath_read(classified / "scores" / "demo" / "s1.geojson")
    (model_dir,) = (classified / "features").iterdir()
    sf = get_store("h5").read(classified / "features", model_dir.name, "s1")
    assert len(objects) == len(sf.coords) > 0  # one tile per patch, in the features' order
    s = int(sf.coords_attrs["patch_size_level0"])
    for obj, (x, y) in zip(objects, sf.coords.tolist(), strict=True):
        assert obj["type"] == "tile"
        assert obj["rings"] == [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]

    prompts = load_prompts(PROMPTS)
    model = load_encoder(EmbedConfig(model="convlm_test"), torch.device("cpu"))  # the same seeded random init
    with torch.no_grad():
        text = build_text_classifier(model, prompts)  # (C, E), rows L2-normalised
        img = model.project(torch.from_numpy(sf.features))  # (N, E), L2-normalised
        cos = (img @ text.T).double().numpy()
        scale = float(model.logit_scale.exp())
    names = prompts.class_names
    got = np.array([[o["measurements"][f"{c} score"] for c in names] for o in objects])
    np.testing.assert_allclose(got, cos, atol=FP16_COS)  # scored from the fp16 embeddings embed stored
    e = np.exp(scale * (cos - cos.max(axis=1, keepdims=True)))
    probs = np.array([[o["measurements"][f"{c} prob"] for c in names] for o in objects])
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), atol=scale * FP16_COS / 2)
    assert all(set(o["measurements"]) == {f"{c} {m}" for c in names for m in ("score", "prob")} for o in objects)
    for o, row in zip(objects, cos, strict=True):
        assert o["class"]["name"] == names[int(np.argmax(row))]
        assert len(o["class"]["color"]) == 3 and all(0 <= v <= 255 for v in o["class"]["color"])
    assert not any(math.isnan(v) for o in objects for v in o["measurements"].values())


def test_scores_geojson_provenance_and_no_file_without_patches(classified: Path) -> None:
    doc = json.loads((classified / "scores" / "demo" / "s1.geojson").read_text())
    prov = doc["wsi_pipeline"]
    assert prov["slide_id"] == "s1" and prov["model_name"] == "convlm_test" and prov["prompts"] == "demo"
    assert prov["patch_size_level0"] == 128
    assert not (classified / "scores" / "demo" / "blank.geojson").exists()  # no_tissue: nothing to colour
