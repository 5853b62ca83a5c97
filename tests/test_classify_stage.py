"""The classify stage end to end on generated slides with the random-init ``convlm_test`` model.

Predictions of a random model are arbitrary, so these tests check mechanics and consistency:
every CSV value is recomputed from the stored features with plain numpy, the JSON agrees
with the CSV, metrics agree with scikit-learn on the written predictions, reruns skip work.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from slide_factory import make_slide, tissue_image
from torch import nn

from wsi_pipeline.classify.inputs import collect_inputs
from wsi_pipeline.classify.outputs import csv_columns
from wsi_pipeline.classify.pooling import score_slide
from wsi_pipeline.classify.prompts import PromptSet, load_prompts, sample_prompt_sets
from wsi_pipeline.classify.scoring import score_features
from wsi_pipeline.classify.stage import classify_slides
from wsi_pipeline.config import TilingConfig
from wsi_pipeline.embed.stage import EmbedConfig
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.model import create_model
from wsi_pipeline.store.coords import read_coords
from wsi_pipeline.store.features import get_store
from wsi_pipeline.store.status import read_status

PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "demo.yaml"
TILING = TilingConfig(patch_size=64, target_mpp=1.0)
EMBED = EmbedConfig(model="convlm_test")  # random init, seed 0: the reference below rebuilds it
LABELS = {"s1": "glandular", "s2": "solid", "s3": "lymphoid", "blank": "glandular"}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("classify")
    d = root / "slides"
    d.mkdir()
    make_slide(d / "s1.svs", 2048, 1536, mpp=0.5, seed=1)
    make_slide(d / "s2.tif", 2048, 1536, mpp=0.5, layout="generic", seed=3)
    make_slide(d / "s3.svs", 2048, 1536, mpp=0.5, seed=2)
    make_slide(d / "blank.svs", 1024, 768, mpp=0.5, n_blobs=0, seed=4)
    (d / "broken.svs").write_bytes(b"this is not a slide\n")
    (d / "notes.txt").write_text("not an input")
    (root / "labels.csv").write_text("slide_id,label\n" + "".join(f"{k},{v}\n" for k, v in LABELS.items()))
    return root


@pytest.fixture(scope="module")
def run(slides: Path):
    return classify_slides(collect_inputs([slides / "slides"]), slides / "out", PROMPTS, tiling=TILING, embed=EMBED,
                           labels=slides / "labels.csv", prompt_sets=4, seed=1)


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _reference_model() -> nn.Module:
    torch.manual_seed(0)  # the embed stage's random-init seed
    return create_model("convlm_test")


def _class_embeddings(model: nn.Module, prompts: PromptSet) -> np.ndarray:
    """Plain prompt ensemble: every template x synonym, normalised, averaged, re-normalised."""
    rows = []
    with torch.no_grad():
        for syns in prompts.classes.values():
            texts = [t.replace(prompts.placeholder, s) for s in syns for t in prompts.templates]
            e = model.encode_text(model.tokenize(texts)).double().numpy()
            e /= np.linalg.norm(e, axis=1, keepdims=True)
            m = e.mean(0)
            rows.append(m / np.linalg.norm(m))
    return np.stack(rows)


#: fp16's unit roundoff: the relative error of a rounded normal number.
FP16_REL = 2.0**-11


def _projected(features: np.ndarray, model: nn.Module) -> np.ndarray:
    z = features.astype(np.float64) @ model.image_projection.detach().double().numpy()
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _reference_scores(features: np.ndarray, model: nn.Module, text: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return _pooled(_projected(features, model), model, text, k)


def _pooled(z: np.ndarray, model: nn.Module, text: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-K mean of the cosine similarities of (unit) embeddings ``z``, and its softmax."""
    sim = z @ text.T
    pooled = -np.sort(-sim, axis=0)[: min(k, len(sim))].mean(0)
    logits = math.exp(float(model.logit_scale.detach())) * pooled
    e = np.exp(logits - logits.max())
    return pooled, e / e.sum()


# ---------------------------------------------------------------------------- the full run
def test_rows_cover_every_slide_with_status(run) -> None:
    by_id = {r.slide_id: r for r in run.rows}
    assert [r.slide_id for r in run.rows] == ["blank", "broken", "s1", "s2", "s3"]  # notes.txt is not an input
    assert by_id["broken"].status == "failed" and by_id["broken"].reason.startswith("tile: ")
    assert by_id["blank"].status == "no_tissue" and by_id["blank"].n_patches == 0 and by_id["blank"].predicted is None
    for sid in ("s1", "s2", "s3"):
        assert by_id[sid].status == "ok" and by_id[sid].n_patches > 10
    assert run.n_failed == 1 and run.ks == (10, 50)
    table = run.table()
    assert all(sid in table for sid in by_id) and "5 slides: 1 failed, 1 no_tissue, 3 ok" in table


def test_csv_values_recomputed_from_stored_features(run, slides: Path) -> None:
    prompts = load_prompts(PROMPTS)
    header, rows = _csv(run.predictions_csv)
    assert run.predictions_csv == slides / "out" / "predictions" / "demo.csv"
    assert header == ["slide_id", "status", "n_patches", "k", "predicted", "prob_glandular", "prob_solid",
                      "prob_lymphoid", "score_glandular", "score_solid", "score_lymphoid", "reason"]
    assert header == csv_columns(prompts.class_names)
    model = _reference_model()
    text = _class_embeddings(model, prompts)
    for row in rows:
        if row["status"] != "ok":
            assert row["predicted"] == "" and row["prob_solid"] == ""
            continue
        with h5py.File(slides / "out" / "features" / run.model_id / f"{row['slide_id']}.h5", "r") as f:
            feats, emb = f["features"][:], f["embeddings"][:]
        assert emb.dtype == np.float16 and emb.shape == (len(feats), 32)
        # the stored embeddings are the reference projection of the stored features, rounded to fp16
        z = _projected(feats, model)
        assert np.all(np.abs(emb.astype(np.float64) - z) <= np.abs(z) * FP16_REL + 2.0**-24)
        # classify scores exactly the stored embeddings ...
        pooled, probs = _pooled(emb.astype(np.float64), model, text, 10)
        assert int(row["n_patches"]) == len(feats) and int(row["k"]) == min(10, len(feats))
        np.testing.assert_allclose([float(row[f"score_{c}"]) for c in prompts.class_names], pooled, atol=2e-6)
        np.testing.assert_allclose([float(row[f"prob_{c}"]) for c in prompts.class_names], probs, atol=2e-6)
        assert row["predicted"] == prompts.class_names[int(np.argmax(pooled))]
        # ... which is the float64 recipe on the features, within fp16 rounding (|Δcos| <= 2^-11 by Cauchy-Schwarz)
        exact, _ = _reference_scores(feats, model, text, 10)
        np.testing.assert_allclose(pooled, exact, atol=FP16_REL)


def test_json_agrees_with_csv_and_records_provenance(run) -> None:
    doc = json.loads(run.predictions_json.read_text())
    _, rows = _csv(run.predictions_csv)
    assert doc["schema_version"] == 1 and doc["classes"] == ["glandular", "solid", "lymphoid"]
    assert [s["slide_id"] for s in doc["slides"]] == [r["slide_id"] for r in rows]
    for s, r in zip(doc["slides"], rows, strict=True):
        assert s["status"] == r["status"] and (s["predicted"] or "") == r["predicted"]
        for c in doc["classes"]:
            assert str(s["probabilities"].get(c, "")) == r[f"prob_{c}"]
        if s["status"] == "ok":
            assert s["by_k"]["50"]["k_used"] == min(50, s["n_patches"]) and s["label"] == LABELS[s["slide_id"]]
            assert s["by_k"]["10"]["scores"] == s["scores"]
    prov = doc["provenance"]
    assert prov["prompts"]["sha256"] == load_prompts(PROMPTS).sha256 and prov["top_k"] == 10 and prov["ks"] == [10, 50]
    assert prov["model"]["model_id"] == run.model_id and prov["model"]["name"] == "convlm_test"
    assert prov["model"]["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    assert prov["tiling"]["patch_size"] == 64 and prov["prompt_sets"] == 4


def test_metrics_agree_with_sklearn_on_written_predictions(run, slides: Path) -> None:
    m = json.loads((slides / "out" / "metrics.json").read_text())
    _, rows = _csv(run.predictions_csv)
    ok = [r for r in rows if r["status"] == "ok"]
    y_true = [LABELS[r["slide_id"]] for r in ok]
    y_pred = [r["predicted"] for r in ok]
    classes = ["glandular", "solid", "lymphoid"]
    assert m["n"] == 3 and m["n_excluded"] == 1 and m["excluded"] == ["blank"]
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=classes).tolist()
    aucs = []
    for c in classes:  # one positive and two negatives per class: AUC = share of negatives ranked below
        pos = next(float(r[f"prob_{c}"]) for r in ok if LABELS[r["slide_id"]] == c)
        negs = [float(r[f"prob_{c}"]) for r in ok if LABELS[r["slide_id"]] != c]
        aucs.append(sum((pos > n) + 0.5 * (pos == n) for n in negs) / len(negs))
    assert [m["auc_per_class"][c] for c in classes] == pytest.approx(aucs)
    assert m["macro_auc_ovr"] == pytest.approx(np.mean(aucs)) and m["auc_skipped_classes"] == []
    assert "balanced accuracy" in run.metrics_block() and "confusion matrix" in run.metrics_block()

    # robustness: each value is the balanced accuracy of one single-synonym prompt set, recomputed here
    prompts = load_prompts(PROMPTS)
    model = _reference_model()
    values = []
    for ps in sample_prompt_sets(prompts, 4, seed=1):
        text = _class_embeddings(model, ps)
        preds = []
        for r in ok:
            with h5py.File(slides / "out" / "features" / run.model_id / f"{r['slide_id']}.h5", "r") as f:
                pooled, _ = _reference_scores(f["features"][:], model, text, 10)
            preds.append(classes[int(np.argmax(pooled))])
        values.append(balanced_accuracy_score(y_true, preds))
    rob = m["prompt_sets"]["balanced_accuracy"]
    assert m["prompt_sets"]["n_sets"] == 4 and rob["values"] == pytest.approx(values)
    assert rob["median"] == pytest.approx(float(np.median(values)))


def test_visuals_and_report_links_resolve(run, slides: Path) -> None:
    out = slides / "out"
    doc = json.loads(run.predictions_json.read_text())
    for s in doc["slides"]:
        if s["status"] != "ok":
            assert s["visuals"] == {}
            continue
        assert set(s["visuals"]["heatmaps"]) == {"glandular", "solid", "lymphoid"}
        for rel in [*s["visuals"]["heatmaps"].values(), s["visuals"]["montage"]]:
            with Image.open(out / rel) as im:
                assert im.format == "PNG" and min(im.size) >= 96
    page = (out / "report.html").read_text()
    links = set(re.findall(r'(?:href|src)="([^"]+)"', page))
    assert len(links) == 4 + 3 * 3 + 3  # thumbnails (not for broken) + heatmaps + montages
    for link in links:
        assert not link.startswith(("/", "http", "file:")) and (out / link).is_file(), link
    for sid in ("s1", "s2", "s3", "blank", "broken"):
        assert f'id="slide-{sid}"' in page
    assert page.count('class="contour"') >= 3  # tissue outlines of the three tissue slides


def test_every_output_file_records_its_provenance(run, slides: Path) -> None:
    """Thumbnail, GeoJSON, heatmaps, montage and JSON rows carry what made them (from the h5 attrs)."""
    from wsi_pipeline import __version__
    from wsi_pipeline.store.provenance import read_png_provenance

    out = slides / "out"
    _, cattrs = read_coords(out / "coords" / "s2.h5")
    fattrs = get_store("h5").read(out / "features", run.model_id, "s2").attrs
    slide_side = {"slide_id": "s2", "backend": "tiffslide", "mpp_level0": 0.5, "mpp_source": "tiffslide.mpp-x",
                  "target_mpp": 1.0, "patch_size": 64, "patch_size_level0": 128, "wsi_pipeline_version": __version__}
    model_side = {"model_name": "convlm_test", "model_id": run.model_id, "weights_sha256": fattrs["weights_sha256"],
                  "keep_rate": 0.7, "refine_layers": [1, 2], "context_hash": "none", "precision": "fp32"}
    assert cattrs["backend"] == "tiffslide" and cattrs["mpp_source"] == "tiffslide.mpp-x"

    thumb = read_png_provenance(out / "thumbnails" / "s2.png")
    assert {k: thumb[k] for k in slide_side} == slide_side and "backend_version" in thumb
    geo = json.loads((out / "tissue" / "s2.geojson").read_text())
    assert {k: geo["wsi_pipeline"][k] for k in slide_side} == slide_side
    assert geo["wsi_pipeline"]["tiling_config"]["patch_size"] == 64 and geo["wsi_pipeline"]["seg_threshold"] >= 8

    row = next(s for s in json.loads(run.predictions_json.read_text())["slides"] if s["slide_id"] == "s2")
    assert {k: row["provenance"][k] for k in (*slide_side, *model_side)} == {**slide_side, **model_side}
    for c, rel in row["visuals"]["heatmaps"].items():
        heat = read_png_provenance(out / rel)
        assert {k: heat[k] for k in (*slide_side, *model_side)} == {**slide_side, **model_side}
        assert heat["class"] == c and heat["prompts"] == "demo" and heat["k"] == 10
    montage = read_png_provenance(out / row["visuals"]["montage"])
    assert montage["class"] == row["predicted"] and montage["model_id"] == run.model_id
    page = (out / "report.html").read_text()
    assert f"<b>wsi-pipeline</b>: {__version__}" in page and "<b>tiling</b>: 64 px at 1 µm/px" in page


def test_status_csv_gets_classify_rows(run, slides: Path) -> None:
    rows = {r["slide_id"]: r for r in read_status(slides / "out") if r["stage"] == "classify"}
    assert {k: v["status"] for k, v in rows.items()} == {
        "blank": "no_tissue", "broken": "failed", "s1": "ok", "s2": "ok", "s3": "ok"}


def test_rerun_on_output_folder_skips_work_and_agrees(run, slides: Path) -> None:
    again = classify_slides(None, slides / "out", PROMPTS, embed=EMBED, top_k=1, visuals=False)
    assert {r.status for r in again.embed_summary.results} == {"skipped"}
    # the slides with coords, and the one whose tiling failed (status.csv), still a failed row
    assert [r.slide_id for r in again.rows] == ["blank", "broken", "s1", "s2", "s3"]
    broken = next(r for r in again.rows if r.slide_id == "broken")
    assert broken.status == "failed" and broken.reason.startswith("tile: ") and "not a readable slide" in broken.reason
    assert again.ks == (1, 10, 50) and again.model_id == run.model_id
    first = {r.slide_id: r for r in run.rows}
    for r in again.rows:
        if r.status == "ok":
            assert r.k == 1 and r.by_k[10]["scores"] == pytest.approx(first[r.slide_id].scores, abs=1e-6)
            assert r.predicted == max(r.scores, key=r.scores.get)


# ---------------------------------------------------------------------------- early errors
def test_label_and_option_errors_come_before_any_work(slides: Path, tmp_path: Path) -> None:
    inputs = [slides / "slides" / "s1.svs"]
    bad = tmp_path / "labels.csv"
    bad.write_text("slide_id,label\ns1,glandular\nnope,solid\n")
    with pytest.raises(ConfigError, match=r"not in this run: 'nope'"):
        classify_slides(inputs, tmp_path / "out", PROMPTS, embed=EMBED, labels=bad)
    bad.write_text("slide_id,label\ns1,papillary\n")
    with pytest.raises(ConfigError, match=r"unknown classes 'papillary'"):
        classify_slides(inputs, tmp_path / "out", PROMPTS, embed=EMBED, labels=bad)
    with pytest.raises(ConfigError, match="--prompt-sets needs --labels"):
        classify_slides(inputs, tmp_path / "out", PROMPTS, embed=EMBED, prompt_sets=5)
    with pytest.raises(ConfigError, match="holds no coords files"):
        classify_slides(None, tmp_path / "empty", PROMPTS, embed=EMBED)
    assert not (tmp_path / "out" / "coords").exists()


# ---------------------------------------------------------------------------- ROI images
def test_roi_folder_is_tiled_at_its_own_resolution(tmp_path: Path) -> None:
    rois = tmp_path / "rois"
    rois.mkdir()
    rgb, _ = tissue_image(512, 384, n_blobs=2, seed=1)
    Image.fromarray(rgb).save(rois / "with_mpp.png", dpi=(25400 / 0.25, 25400 / 0.25))
    Image.fromarray(rgb).save(rois / "no_mpp.jpg", quality=92)
    s = classify_slides(collect_inputs([rois]), tmp_path / "out", PROMPTS,
                        tiling=TilingConfig(patch_size=64, target_mpp=0.5), visuals=False)
    by_id = {r.slide_id: r for r in s.rows}
    _, a = read_coords(tmp_path / "out" / "coords" / "no_mpp.h5")
    _, b = read_coords(tmp_path / "out" / "coords" / "with_mpp.h5")
    assert a["mpp_source"] == "default" and a["mpp_level0"] == 0.5 and a["patch_size_level0"] == 64  # 1:1 pixels
    assert b["mpp_level0"] == pytest.approx(0.25) and b["patch_size_level0"] == 128  # resampled to 0.5 µm/px
    assert json.loads(a["tiling_config"])["min_tissue_area"] == 0.0
    assert by_id["no_mpp"].status == "ok" and by_id["no_mpp"].n_patches > by_id["with_mpp"].n_patches > 0
    assert by_id["with_mpp"].status == "ok" and by_id["with_mpp"].predicted in ("glandular", "solid", "lymphoid")


def test_roi_smaller_than_a_patch_is_one_white_padded_patch(tmp_path: Path) -> None:
    """A 200 x 150 crop with 256 px patches: one patch at (0, 0), white beyond the image."""
    from wsi_pipeline.embed.dataset import normalize, resize_patches

    rois = tmp_path / "rois"
    rois.mkdir()
    rgb, truth = tissue_image(600, 450, n_blobs=4, seed=1)
    crop = rgb[90:240, 160:360]
    assert truth[90:240, 160:360].mean() > 0.9  # mostly tissue: ~0.43 of the padded patch
    Image.fromarray(crop).save(rois / "small.png")
    s = classify_slides(collect_inputs([rois]), tmp_path / "out", PROMPTS, tiling=TilingConfig(patch_size=256),
                        embed=EMBED, visuals=False)
    assert [(r.slide_id, r.status, r.n_patches) for r in s.rows] == [("small", "ok", 1)]
    coords, attrs = read_coords(tmp_path / "out" / "coords" / "small.h5")
    np.testing.assert_array_equal(coords, [[0, 0]])
    assert attrs["patch_size_level0"] == 256 and json.loads(attrs["tiling_config"])["pad_small_images"] is True

    padded = np.full((256, 256, 3), 255, np.uint8)
    padded[:150, :200] = crop
    torch.manual_seed(0)
    model = create_model("convlm_test").eval()
    with torch.no_grad():
        x = normalize(resize_patches(padded[None], model.input_size), model.mean, model.std, torch.float32)
        expected = model.encode_image(x).numpy()
    feats_dir = next((tmp_path / "out" / "features").iterdir())
    got = get_store("h5").read(feats_dir.parent, feats_dir.name, "small").features
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_slide_smaller_than_a_patch_says_so(tmp_path: Path) -> None:
    from wsi_pipeline.tiling.stage import tile_slides

    rgb, _ = tissue_image(200, 150, n_blobs=1, seed=4)
    Image.fromarray(rgb).save(tmp_path / "tiny.png")
    (res,) = tile_slides([tmp_path / "tiny.png"], tmp_path / "out", TilingConfig(patch_size=256, default_mpp=0.5))
    assert res.status == "ok" and res.n_patches == 0
    assert res.reason == ("image is 200x150 px, smaller than one 256-px patch at 0.5 µm/px (256 px here); "
                          "lower --patch-size")


# ---------------------------------------------------------------------------- inputs
def test_collect_inputs_folders_lists_and_errors(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("b.svs", "a.png", ".hidden.svs", "notes.txt", "sub/c.tif"):
        (tmp_path / "d" / name).write_bytes(b"x")
    assert [p.name for p in collect_inputs([tmp_path / "d"])] == ["a.png", "b.svs"]
    assert [p.name for p in collect_inputs([tmp_path / "d"], recursive=True)] == ["a.png", "b.svs", "c.tif"]
    lst = tmp_path / "list.txt"
    lst.write_text("# slides\nd/b.svs\n\n" + str(tmp_path / "d" / "sub" / "c.tif") + "\n")
    got = collect_inputs([f"@{lst}", tmp_path / "d" / "b.svs"])
    assert [p.name for p in got] == ["b.svs", "c.tif"]  # duplicates removed
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no slide files in folder"):
        collect_inputs([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="does not exist"):
        collect_inputs([tmp_path / "missing.svs"])
    lst.write_text("gone.svs\n")  # kept: the stage records it as a failed slide, the batch goes on
    assert collect_inputs([f"@{lst}"]) == [Path("gone.svs")]
    with pytest.raises(ConfigError, match="no input slides"):
        collect_inputs([])


# ---------------------------------------------------------------------------- scoring loop
class Linear(nn.Module):
    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float32))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.name, self.weights_sha256 = "lin", None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x @ self.w, dim=-1)


def test_score_features_matches_score_slide_and_isolates_bad_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = Linear(rng.normal(size=(6, 4)))
    text = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    attrs = {"projected": False, "weights_sha256": "none", "embed_dim": 6, "model_id": "m"}
    store = get_store("h5")
    ids = [f"s{i}" for i in range(6)]
    feats = {sid: rng.normal(size=(5 + 7 * i, 6)).astype(np.float32) for i, sid in enumerate(ids)}
    for sid, f in feats.items():
        store.write(tmp_path, "m", sid, f, np.zeros((len(f), 2)), attrs, {})
    path = store.path_for(tmp_path, "m", "s2")
    path.write_bytes(path.read_bytes()[:300])  # truncated
    store.path_for(tmp_path, "m", "s4").unlink()
    rows, _, timings = score_features(tmp_path, "m", [*ids, "gone"], model, [text], ["a", "b", "c"], (3,),
                                      failed={"gone": "embed: boom"})
    assert [r.slide_id for r in rows] == [*ids, "gone"]
    assert [r.status for r in rows] == ["ok", "ok", "failed", "ok", "failed", "ok", "failed"]
    assert "features unreadable" in rows[2].reason and "features unreadable" in rows[4].reason
    assert rows[6].reason == "embed: boom"
    for r in rows:
        if r.status == "ok":
            ref = score_slide(feats[r.slide_id], attrs, model, text, ["a", "b", "c"], 3)
            assert r.predicted == ref.prediction and r.k == 3
            assert [r.probabilities[c] for c in "abc"] == pytest.approx(ref.probabilities[3].tolist(), abs=1e-12)
    assert timings["read"] > 0 and timings["score"] > 0


def test_stored_embeddings_are_checked_and_old_files_still_score(run, slides: Path, tmp_path: Path, caplog) -> None:
    """A file without embeddings (older embed) or with embeddings that disagree with the model is
    scored from its features: exactly the float64 recipe, as before embeddings were stored."""
    import shutil

    from wsi_pipeline.classify.scoring import score_features

    prompts = load_prompts(PROMPTS)
    model = _reference_model()
    text = _class_embeddings(model, prompts)
    src = slides / "out" / "features" / run.model_id
    dst = tmp_path / "features" / run.model_id
    shutil.copytree(src, dst)
    with h5py.File(dst / "s1.h5", "a") as f:
        del f["embeddings"]  # as written before embeddings were stored,
        f.attrs["prune_layers"] = f.attrs["refine_layers"]  # and before refinement had one name
        del f.attrs["refine_layers"]
    with h5py.File(dst / "s2.h5", "a") as f:
        f["embeddings"][:] = f["embeddings"][:][::-1]  # rows no longer match their features
    with h5py.File(dst / "s3.h5", "a") as f:
        f["embeddings"].attrs["projection_sha256"] = "0" * 64  # made by another projection: never read
    with caplog.at_level("WARNING", logger="wsi_pipeline.classify.scoring"):
        rows, _, _ = score_features(tmp_path / "features", run.model_id, ["s1", "s2", "s3"], model,
                                    [torch.as_tensor(text).float()], prompts.class_names, (10,))
    assert "s2: stored embeddings disagree" in caplog.text and "s1:" not in caplog.text
    assert [r.provenance["refine_layers"] for r in rows] == [[1, 2]] * 3
    for row in rows:
        with h5py.File(dst / f"{row.slide_id}.h5", "r") as f:
            feats = f["features"][:]
        pooled, _ = _reference_scores(feats, model, text, 10)
        np.testing.assert_allclose([row.scores[c] for c in prompts.class_names], pooled, atol=2e-6)


def test_summary_table_golden() -> None:
    from wsi_pipeline.classify.outputs import SlidePrediction, format_table

    rows = [SlidePrediction("a", "ok", n_patches=13, k=10, predicted="B", probabilities={"A": 0.25, "B": 0.75}),
            SlidePrediction.failed("bad", "tile: not a readable\nslide"),
            SlidePrediction("blank", "no_tissue", "no patches", 0, 0)]
    assert format_table(rows, ["A", "B"]).splitlines() == [
        "slide_id  status     patches   k  predicted   p(A)   p(B)  note",
        "--------  ---------  -------  --  ---------  -----  -----  " + "-" * 26,
        "a         ok              13  10  B          0.250  0.750",
        "bad       failed           -   -  -              -      -  tile: not a readable slide",
        "blank     no_tissue        0   0  -              -      -  no patches",
        "3 slides: 1 failed, 1 no_tissue, 1 ok; predicted B 1",
    ]
    assert format_table(rows, ["A", "B"], max_rows=1).splitlines()[-2] == "... 2 more slides (see the predictions CSV)"


def test_score_slide_sets_equals_one_call_per_classifier() -> None:
    from wsi_pipeline.classify.pooling import score_slide_sets

    rng = np.random.default_rng(5)
    model = Linear(rng.normal(size=(6, 4)))
    feats = rng.normal(size=(40, 6)).astype(np.float32)
    attrs = {"projected": False, "weights_sha256": "none", "embed_dim": 6}
    texts = [F.normalize(torch.as_tensor(rng.normal(size=(3, 4)), dtype=torch.float32), dim=-1) for _ in range(3)]
    many = score_slide_sets(feats, attrs, model, texts, ["a", "b", "c"], (5, 40))
    assert len(many) == 3
    for got, text in zip(many, texts, strict=True):
        ref = score_slide(feats, attrs, model, text, ["a", "b", "c"], (5, 40))
        np.testing.assert_allclose(got.similarity, ref.similarity, atol=1e-6)
        for k in (5, 40):
            np.testing.assert_allclose(got.probabilities[k], ref.probabilities[k], atol=1e-6)
            assert got.predictions[k] == ref.predictions[k]
    with pytest.raises(ConfigError, match="no text classifier"):
        score_slide_sets(feats, attrs, model, [], ["a", "b", "c"])
    with pytest.raises(ConfigError, match="2 class names"):
        score_slide_sets(feats, attrs, model, [texts[0], texts[1][:2]], ["a", "b"])


def test_prediction_paths_keep_dots_in_prompt_names(tmp_path: Path) -> None:
    from wsi_pipeline.classify.outputs import prediction_paths

    csv_path, json_path = prediction_paths(tmp_path, "nsclc.v2")
    assert (csv_path.name, json_path.name) == ("nsclc.v2.csv", "nsclc.v2.json")
    assert prediction_paths(tmp_path, "nsclc")[0] != prediction_paths(tmp_path, "nsclc.v2")[0]
