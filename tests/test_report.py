"""Heatmaps, montages and the HTML report: pixel-exact checks and a headless-Chromium render."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slide_factory import make_roi_png

from wsi_pipeline.report.heatmap import (
    BAR_PANEL,
    MIN_SIDE,
    VIRIDIS_ANCHORS,
    apply_colormap,
    colormap_lut,
    paint_values,
    patch_boxes,
    render_heatmap,
    slide_heatmaps,
    thumbnail_scale,
)
from wsi_pipeline.report.html import ReportSlide, contour_rings, render_report, write_report
from wsi_pipeline.report.montage import read_patches, render_montage, top_patch_indices
from wsi_pipeline.report.png import write_png
from wsi_pipeline.report.thumbnail import render_thumbnail
from wsi_pipeline.slide import open_slide

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


# ---------------------------------------------------------------------------- colour map
def test_lut_hits_anchors_and_interpolates_linearly() -> None:
    lut = colormap_lut(n=257)  # 8 segments of 32 steps: anchors land exactly on entries
    for i, anchor in enumerate(VIRIDIS_ANCHORS):
        assert tuple(lut[32 * i]) == anchor
    mid = (np.array(VIRIDIS_ANCHORS[0]) + np.array(VIRIDIS_ANCHORS[1])) / 2
    np.testing.assert_array_equal(lut[16], np.round(mid).astype(np.uint8))
    default = colormap_lut()
    assert default.shape == (256, 3) and default.dtype == np.uint8
    assert tuple(apply_colormap(np.array([0.0, 1.0, 7.0, -1.0, np.nan]), default)[:, 0]) == (68, 253, 253, 68, 68)


# ---------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(("w0", "h0", "seg_scale", "max_side"), [(1000, 700, 16, 2048), (5003, 2999, 16, 64),
                                                                  (777, 1201, 8, 100)])
def test_thumbnail_scale_matches_the_tile_renderer(w0: int, h0: int, seg_scale: int, max_side: int) -> None:
    """The tile stage renders a ceil(w0/s) x ceil(h0/s) picture (s level-0 px per pixel), shrunk to max_side."""
    low = np.full((math.ceil(h0 / seg_scale), math.ceil(w0 / seg_scale), 3), 200, np.uint8)
    thumb = render_thumbnail(low, (seg_scale, seg_scale), max_side=max_side)
    renderer_fx = thumb.width / (low.shape[1] * seg_scale)  # what render_thumbnail uses internally
    renderer_fy = thumb.height / (low.shape[0] * seg_scale)
    attrs = {"level0_width": w0, "level0_height": h0, "mpp_level0": 0.5, "seg_mpp": 0.5 * seg_scale}
    fx, fy = thumbnail_scale(attrs, thumb.size)
    assert fx == pytest.approx(renderer_fx, rel=1e-12) and fy == pytest.approx(renderer_fy, rel=1e-12)
    assert thumbnail_scale({"level0_width": w0, "level0_height": h0}, thumb.size) == (thumb.width / w0,
                                                                                      thumb.height / h0)


def test_paint_values_averages_overlaps_like_a_pixel_loop() -> None:
    coords = np.array([[0, 0], [50, 0], [25, 25], [180, 130]])
    vals = np.array([[1.0, -1.0], [3.0, 0.0], [5.0, 2.0], [7.0, 7.0]])
    size = (20, 15)
    boxes = patch_boxes(coords, 100, (0.1, 0.1), size)
    assert boxes.tolist() == [[0, 0, 10, 10], [5, 0, 15, 10], [2, 2, 12, 12], [18, 13, 20, 15]]
    grid, covered = paint_values(vals, boxes, size)
    for y in range(15):
        for x in range(20):
            hits = [v for (x0, y0, x1, y1), v in zip(boxes.tolist(), vals, strict=True) if x0 <= x < x1 and y0 <= y < y1]
            assert covered[y, x] == bool(hits)
            np.testing.assert_allclose(grid[y, x], np.mean(hits, axis=0) if hits else [0.0, 0.0])


def test_render_heatmap_blends_exactly_and_draws_the_bar() -> None:
    h, w = 60, 80
    grid = np.zeros((h, w))
    covered = np.zeros((h, w), bool)
    grid[10:30, 10:30], covered[10:30, 10:30] = 0.2, True
    grid[30:50, 40:60], covered[30:50, 40:60] = 1.0, True
    img = np.asarray(render_heatmap(np.full((h, w, 3), 255, np.uint8), grid, covered, (0.2, 1.0), alpha=0.5))
    assert img.shape == (max(h, 96), w + BAR_PANEL, 3)
    lut = colormap_lut()
    np.testing.assert_array_equal(img[20, 20], np.round(0.5 * 255 + 0.5 * lut[0].astype(float)).astype(np.uint8))
    np.testing.assert_array_equal(img[40, 50], np.round(0.5 * 255 + 0.5 * lut[255].astype(float)).astype(np.uint8))
    np.testing.assert_array_equal(img[5, 5], [255, 255, 255])  # uncovered keeps the background
    x_bar = w + 8 + 8  # middle of the bar
    np.testing.assert_array_equal(img[6, x_bar], lut[255])  # top of the bar: high values
    np.testing.assert_array_equal(img[img.shape[0] - 7, x_bar], lut[0])
    text = img[:, w + 8 + 16 + 5:]  # the tick labels are drawn in black
    assert (text.sum(axis=2) < 200).sum() > 30


def test_slide_heatmaps_share_the_range_and_enlarge_small_thumbnails() -> None:
    thumb = Image.new("RGB", (40, 30), (255, 255, 255))
    attrs = {"level0_width": 4000, "level0_height": 3000, "patch_size_level0": 1000}
    coords = np.array([[0, 0], [1000, 0], [2000, 2000]])
    sim = np.array([[0.1, 0.5], [0.3, 0.2], [0.9, -0.1]])
    maps = slide_heatmaps(thumb, sim, coords, attrs, ["x", "y"], slide_id="s", alpha=1.0)
    assert list(maps) == ["x", "y"]
    lut = colormap_lut()
    scale = MIN_SIDE / 40  # enlarged: 40 -> 384 px wide
    for cls, col in (("x", 0), ("y", 1)):
        img = np.asarray(maps[cls])
        assert img.shape[1] == MIN_SIDE + BAR_PANEL
        for (x, y), v in zip(coords, sim[:, col], strict=True):
            px = (int((x + 500) / 100 * scale), 18 + int((y + 500) / 100 * scale))  # patch centre, below title
            idx = round((v - (-0.1)) / 1.0 * 255)
            np.testing.assert_array_equal(img[px[1], px[0]], lut[idx])


# ---------------------------------------------------------------------------- montage
def test_montage_places_patches_row_major() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0), (0, 200, 200)]
    patches = [np.full((50, 50, 3), c, np.uint8) for c in colours]
    img = np.asarray(render_montage(patches, [f"#{i}" for i in range(5)], tile=40, columns=2, pad=4, title="t"))
    rows = 3
    assert img.shape == (18 + 4 + rows * (40 + 14 + 4), max(4 + 2 * 44, 160), 3)
    for i, c in enumerate(colours):
        x = 4 + (i % 2) * 44 + 20
        y = 18 + 4 + (i // 2) * (40 + 14 + 4) + 20
        np.testing.assert_array_equal(img[y, x], c)
    assert (img[18 + 4 + 40 + 2: 18 + 4 + 40 + 12, 4:44].sum(axis=2) < 200).any()  # caption under tile 0


def test_top_patch_indices_best_first_stable_ties() -> None:
    sim = np.array([[0.1, 0.0], [0.5, 0.0], [0.5, 1.0], [0.2, 0.0]])
    assert top_patch_indices(sim, 0, 3).tolist() == [1, 2, 3]
    assert top_patch_indices(sim, 1, 10).tolist() == [2, 0, 1, 3]


def test_read_patches_equals_read_region(tmp_path: Path) -> None:
    roi = make_roi_png(tmp_path / "roi.png", 200, 150, mpp=0.5)
    attrs = {"patch_size_level0": 64, "patch_level": 0, "backend": "image"}
    coords = np.array([[0, 0], [100, 50], [136, 86]])
    patches = read_patches(str(roi.path), coords, attrs)
    with open_slide(roi.path) as s:
        for (x, y), p in zip(coords, patches, strict=True):
            np.testing.assert_array_equal(p, s.read_region((int(x), int(y)), 0, (64, 64)))


# ---------------------------------------------------------------------------- HTML
def test_contour_rings_scale_and_keep_holes() -> None:
    from shapely.geometry import Polygon

    poly = Polygon([(0, 0), (1000, 0), (1000, 500), (0, 500)], [[(100, 100), (200, 100), (200, 200), (100, 200)]])
    rings = contour_rings([poly], (0.1, 0.2))
    assert len(rings) == 2
    assert set(rings[0]) == {(0.0, 0.0), (100.0, 0.0), (100.0, 100.0), (0.0, 100.0)}
    assert set(rings[1]) == {(10.0, 20.0), (20.0, 20.0), (20.0, 40.0), (10.0, 40.0)}


def test_report_escapes_names_and_quotes_links() -> None:
    s = ReportSlide(
        slide_id='a<script>alert(1)</script>&"', status="ok", n_patches=3, k=3, predicted="B&C",
        label="A", probabilities={"A": 0.25, "B&C": 0.75}, thumbnail="thumbnails/a b.png", thumb_size=(40, 20),
        contours=[[(0, 0), (10, 0), (10, 5)]], heatmaps={"A": "heatmaps/p/a b/A.png", "B&C": "heatmaps/p/a b/B_C.png"},
        montage="montages/p/a#b.png",
    )
    page = render_report("t <1>", ["A", "B&C"], [s, ReportSlide("z", "failed", reason="tile: <bad>")],
                         info={"model": "m"}, metrics_text="x < y")
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;bad&gt;" in page
    assert 'href="thumbnails/a%20b.png"' in page and 'href="montages/p/a%23b.png"' in page
    assert 'src="heatmaps/p/a%20b/B_C.png"' in page  # predicted class shown inline
    assert "width:75.0%" in page and "width:25.0%" in page and "B&amp;C" in page
    assert 'class="pred wrong"' in page  # label A, predicted B&C
    assert 'd="M0,0 L10,0 L10,5 Z"' in page and "x &lt; y" in page
    assert "<th>label</th>" in page
    links = re.findall(r'(?:href|src)="([^"]+)"', page)
    assert links and all(not link.startswith(("/", "file:", "http")) for link in links)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return exe


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    exe = _chromium()
    out = tmp_path / "out dir"
    thumb = np.full((60, 90, 3), 240, np.uint8)
    thumb[10:50, 10:80] = (255, 0, 255)  # magenta: proves the SVG <image> link resolved
    write_png(out / "thumbnails" / "s 1.png", Image.fromarray(thumb))
    write_png(out / "heatmaps" / "p" / "s 1" / "A.png", Image.new("RGB", (200, 120), (0, 255, 255)))  # cyan <img>
    slide = ReportSlide("s 1", "ok", n_patches=12, k=10, predicted="A", probabilities={"A": 0.8, "B": 0.2},
                        thumbnail="thumbnails/s 1.png", thumb_size=(90, 60), contours=[[(5, 5), (85, 5), (85, 55)]],
                        heatmaps={"A": "heatmaps/p/s 1/A.png"})
    page = write_report(out / "report.html", render_report("demo", ["A", "B"], [slide], info={"prompts": "p"}))
    shot = tmp_path / "shot.png"
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,800",
           f"--screenshot={shot}", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (800, 1200)
    background = np.median(img.reshape(-1, 3), axis=0)
    assert (np.abs(img - background).sum(axis=2) > 60).mean() > 0.02, "screenshot is blank"
    magenta = (img[..., 0] > 230) & (img[..., 1] < 30) & (img[..., 2] > 230)
    cyan = (img[..., 0] < 30) & (img[..., 1] > 230) & (img[..., 2] > 230)
    assert magenta.sum() > 500, "thumbnail (relative SVG image link) did not render"
    assert cyan.sum() > 2000, "heatmap (relative <img> link) did not render"
