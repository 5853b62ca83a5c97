"""Synthetic H&E tissue: determinism, seamless tiling, physical plausibility, files on disk."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.filters import gaussian, threshold_otsu

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.synthetic import (
    TISSUE_CLASSES,
    TUMOUR_CLASSES,
    build_scene,
    render_roi,
    render_slide,
    render_tissue,
    write_roi_dataset,
    write_slide_set,
)
from wsi_pipeline.synthetic import slide as slide_mod
from wsi_pipeline.synthetic.__main__ import main as cli_main
from wsi_pipeline.synthetic.dataset import roi_rng

MPP = 0.5


# -- measurement helpers (plain image analysis, independent of the generator) -------------
def nuclei_mask(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin-dark blobs: Otsu on the smoothed H channel of the stained (not white) pixels,
    holes filled, specks removed."""
    h = gaussian(rgb2hed(rgb)[..., 0], 1.5)
    stained = gaussian(rgb.astype(np.float64).mean(-1), 2.0, preserve_range=True) < 225
    m = ndimage.binary_fill_holes(h > threshold_otsu(h[stained]))
    return ndimage.binary_opening(m, iterations=2)


def nuclear_stats(rgb: np.ndarray) -> tuple[float, float]:
    """(median inscribed diameter of nuclear blobs in µm, nuclear area fraction)."""
    m = nuclei_mask(rgb)
    lab, n = ndimage.label(m)
    radius = np.asarray(ndimage.maximum(ndimage.distance_transform_edt(m), lab, np.arange(1, n + 1)))
    return float((2 * np.median(radius) + 1) * MPP), float(m.mean())


def white_spaces(rgb: np.ndarray, min_um2: float) -> list[np.ndarray]:
    """Bright, unstained regions (lumens, fat, vessels) of at least ``min_um2``; thin clefts removed."""
    grey = gaussian(rgb.astype(np.float64).mean(-1), 2.0, preserve_range=True)
    w = ndimage.binary_opening(grey > 215, structure=np.ones((3, 3)), iterations=3)
    lab, n = ndimage.label(w)
    comps = [lab == i for i in range(1, n + 1)]
    return [c for c in comps if c.sum() * MPP**2 >= min_um2]


def ring_nuclear_fraction(comp: np.ndarray, nuclei: np.ndarray) -> float:
    """Share of nuclear pixels in the band 3–22 µm outside a white region (its lining)."""
    inner = ndimage.binary_dilation(comp, iterations=int(3 / MPP))
    outer = ndimage.binary_dilation(comp, iterations=int(22 / MPP))
    return float(nuclei[outer & ~inner].mean())


# -- determinism and shapes ---------------------------------------------------------------
@pytest.mark.parametrize("kind", TISSUE_CLASSES)
def test_render_tissue_is_deterministic_by_seed(kind: str) -> None:
    a = render_tissue(kind, 96, 128, seed=3)
    b = render_tissue(kind, 96, 128, rng=np.random.default_rng(3))
    c = render_tissue(kind, 96, 128, seed=4)
    assert a.shape == (96, 128, 3) and a.dtype == np.uint8
    assert a.tobytes() == b.tobytes()
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


@pytest.mark.parametrize("kind", TISSUE_CLASSES)
def test_scene_windows_tile_seamlessly(kind: str) -> None:
    """A scene rendered in four windows equals the same scene rendered in one piece."""
    scene = build_scene(kind, np.random.default_rng(11), 300, 260, mpp=MPP)
    whole_h, whole_e = scene.render(-5, -7, 300, 260)
    for y0, x0, h, w in [(-5, -7, 130, 100), (125, -7, 170, 100), (-5, 93, 130, 160), (125, 93, 170, 160)]:
        part_h, part_e = scene.render(y0, x0, h, w)
        ys, xs = slice(y0 + 5, y0 + 5 + h), slice(x0 + 7, x0 + 7 + w)
        np.testing.assert_allclose(part_h, whole_h[ys, xs], atol=1e-4)
        np.testing.assert_allclose(part_e, whole_e[ys, xs], atol=1e-4)
    assert whole_h.max() > 0.5 and whole_e.max() > 0.2  # something was drawn


# -- physical plausibility ------------------------------------------------------------------
def test_nuclear_size_and_density_per_class() -> None:
    stats = {k: [nuclear_stats(render_tissue(k, 384, 384, seed=s)) for s in range(3)]
             for k in ("lymphoid", "solid", "stroma")}
    lymph_d = np.median([d for d, _ in stats["lymphoid"]])
    solid_d = np.median([d for d, _ in stats["solid"]])
    assert 4.5 <= lymph_d <= 8.5, lymph_d  # lymphocytes ~6-7 µm
    assert solid_d >= 7.5 and solid_d >= 1.3 * lymph_d, (solid_d, lymph_d)  # large tumour nuclei
    for (_, f_lymph), (_, f_solid), (_, f_stroma) in zip(*stats.values(), strict=True):
        assert f_lymph > 0.3  # dense sheets
        assert f_stroma < 0.12  # sparse spindle cells
        assert f_lymph > f_solid > f_stroma


def test_glands_have_nucleus_lined_lumens_and_fat_does_not() -> None:
    min_area = np.pi * 10**2  # lumens of at least 20 µm across
    for seed in range(2):
        rgb = render_tissue("glandular", 512, 512, seed=seed)
        lumens = white_spaces(rgb, min_area)
        assert lumens, f"glandular seed {seed}: no open lumen"
        nuc = nuclei_mask(rgb)
        assert np.median([ring_nuclear_fraction(c, nuc) for c in lumens]) > 0.22
    for seed in (9, 10):  # stroma seeds with fat lobules
        rgb = render_tissue("stroma", 512, 512, seed=seed)
        fat = white_spaces(rgb, min_area)
        assert len(fat) >= 3, f"stroma seed {seed}: expected fat vacuoles"
        nuc = nuclei_mask(rgb)
        assert np.median([ring_nuclear_fraction(c, nuc) for c in fat]) < 0.12


def test_mean_colour_alone_does_not_separate_classes() -> None:
    """Stain jitter makes class colours overlap: a nearest-mean-colour rule is far from perfect."""
    feats, labels = [], []
    for ci, kind in enumerate(TISSUE_CLASSES):
        for i in range(8):
            feats.append(render_roi(kind, 128, rng=roi_rng(0, kind, i)).reshape(-1, 3).mean(0))
            labels.append(ci)
    x, y = np.array(feats), np.array(labels)
    centroids = np.stack([x[y == c].mean(0) for c in range(len(TISSUE_CLASSES))])
    pred = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == y).mean() < 0.8


# -- slides ------------------------------------------------------------------------------
def test_render_slide_truth_matches_image(monkeypatch: pytest.MonkeyPatch) -> None:
    rgb, tissue, cmap = render_slide("solid", width=896, height=640, seed=5, tumour_fraction=0.4)
    assert rgb.shape == (640, 896, 3) and rgb.dtype == np.uint8
    assert tissue.dtype == bool and cmap.dtype == np.uint8 and set(np.unique(cmap)) == {0, 1, 2}
    assert np.array_equal(tissue, cmap > 0)
    assert abs((cmap == 2).sum() / tissue.sum() - 0.4) < 0.05
    assert 0.3 < tissue.mean() < 0.75
    assert not tissue[:4].any() and not tissue[-4:].any()  # glass along the border
    # segment tissue from the pixels alone (saturation) and compare with the truth
    sat = gaussian(rgb.max(-1).astype(float) - rgb.min(-1), 4.0, preserve_range=True)
    seg = ndimage.binary_fill_holes(sat > 25)
    iou = (seg & tissue).sum() / (seg | tissue).sum()
    assert iou > 0.9 and abs(seg.mean() - tissue.mean()) < 0.05, (iou, seg.mean(), tissue.mean())
    glass = rgb[ndimage.binary_erosion(~tissue, iterations=8)].astype(float)
    assert glass.mean() > 220 and np.ptp(glass.mean(0)) < 15  # light, neutral glass
    # a different tiling gives the same slide (no seams), a different seed another one
    monkeypatch.setattr(slide_mod, "_TILE", 384)
    rgb2, _, cmap2 = render_slide("solid", width=896, height=640, seed=5, tumour_fraction=0.4)
    assert np.abs(rgb2.astype(int) - rgb).max() <= 1 and np.array_equal(cmap2, cmap)
    rgb3, _, _ = render_slide("solid", width=896, height=640, seed=6, tumour_fraction=0.4)
    assert np.abs(rgb3.astype(int) - rgb).mean() > 5


def test_write_slide_set_reopens_with_mpp(tmp_path) -> None:
    from wsi_pipeline.slide import open_slide

    labels = write_slide_set(tmp_path, classes=("lymphoid",), n_per_class=1, seed=7, size=(512, 384))
    with open(labels, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{"slide_id": "lymphoid_7", "label": "lymphoid"}]
    rgb, _, cmap = render_slide("lymphoid", width=512, height=384, seed=7,
                                tumour_fraction=float(np.random.default_rng([7, 1]).uniform(0.35, 0.65)))
    with open_slide(tmp_path / "lymphoid_7.svs") as s:
        assert s.info.mpp == pytest.approx(MPP)
        assert s.info.dimensions == (512, 384)
        region = np.asarray(s.read_region((0, 0), 0, (512, 384)))[..., :3]
    assert np.abs(region.astype(float) - rgb).mean() < 4  # JPEG-compressed copy of the render
    with np.load(tmp_path / "truth" / "lymphoid_7.npz") as truth:
        assert np.array_equal(truth["class_map"], cmap) and float(truth["mpp"]) == MPP
    with open(tmp_path / "truth" / "manifest.csv", newline="") as fh:
        manifest = list(csv.DictReader(fh))
    assert int(manifest[0]["tumour_px"]) == int((cmap == 2).sum())


# -- ROI data set and CLI --------------------------------------------------------------------
def test_write_roi_dataset_is_reproducible(tmp_path) -> None:
    a = write_roi_dataset(tmp_path / "a", classes=("glandular", "stroma"), n_per_class=2, size=64, seed=1)
    b = write_roi_dataset(tmp_path / "b", classes=("stroma",), n_per_class=2, size=64, seed=1)
    with open(a, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == ["glandular", "glandular", "stroma", "stroma"]
    for r in rows:
        img = np.asarray(Image.open(a.parent / r["path"]))
        i = int(r["path"].split("/")[1].split(".")[0])
        assert np.array_equal(img, render_roi(r["label"], 64, rng=roi_rng(1, r["label"], i)))
    # a ROI depends only on (seed, class, index): same bytes whatever else was written
    assert (a.parent / "stroma/1.png").read_bytes() == (b.parent / "stroma/1.png").read_bytes()
    assert (a.parent / "stroma/0.png").read_bytes() != (a.parent / "stroma/1.png").read_bytes()


def test_cli_writes_slides_and_rois(tmp_path, capsys) -> None:
    rc = cli_main(["--out", str(tmp_path), "--slides", "3", "--rois", "1", "--size", "384x256",
                   "--roi-size", "64", "--seed", "2"])
    assert rc == 0
    slides = sorted(p.name for p in (tmp_path / "slides").glob("*.svs"))
    assert slides == ["glandular_2.svs", "lymphoid_4.svs", "solid_3.svs"]
    assert sorted(p.parent.name for p in (tmp_path / "rois").glob("*/*.png")) == sorted(TISSUE_CLASSES)
    assert "done in" in capsys.readouterr().out


def test_bad_input_raises_typed_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown tissue kind"):
        render_tissue("papillary", 32, 32)
    with pytest.raises(ConfigError, match="seed"):
        render_roi("solid", 32, seed=-1)
    with pytest.raises(ConfigError, match="tumour class"):
        render_slide("stroma", width=256, height=256)
    with pytest.raises(ConfigError, match="tumour_fraction"):
        render_slide("solid", width=256, height=256, tumour_fraction=1.5)
    with pytest.raises(ConfigError, match="tumour class"):
        write_slide_set(tmp_path, classes=("stroma",))
    with pytest.raises(ConfigError, match="n_per_class"):
        write_roi_dataset(tmp_path, n_per_class=0)
    assert set(TUMOUR_CLASSES) < set(TISSUE_CLASSES)
