"""Benchmark of the ``tile`` stage on a ~100,000 × 80,000 px pyramidal slide.

Builds a generic pyramidal TIFF (JPEG tiles, levels 1/4/16/64, 0.25 µm/px, ≈40 % tissue in
a few large ellipses) in a few seconds: a handful of 256² tiles are JPEG-encoded once and
their bytes are written again and again (tissue or glass, chosen per tile from a coarse
map). Then the tile stage runs on it in a fresh subprocess, which reports its wall time
and peak RSS (``resource.getrusage``), so that the generation does not count.

Usage::

    python benchmarks/tile_bench.py [--width 100000 --height 80000] [--keep DIR] [--backend auto]

Goal on a 2-core machine: < 10 s and < 1 GB peak RSS.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TILE = 256
MPP = 0.25
DOWNSAMPLES = (1, 4, 16, 64)


def _encoded_tiles(seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    """JPEG bytes exactly as tifffile writes them: (tissue variants, glass variants)."""
    import tifffile
    from skimage.data import immunohistochemistry

    rng = np.random.default_rng(seed)
    ihc = (immunohistochemistry().astype(np.float32) * np.array([0.93, 0.74, 0.86], np.float32)).astype(np.uint8)
    tissue = [np.ascontiguousarray(ihc[y : y + TILE, x : x + TILE]) for y, x in ((0, 0), (256, 128), (100, 256))]
    glass = [(240 + rng.integers(-3, 4, (TILE, TILE, 3))).astype(np.uint8) for _ in range(2)]

    def encode(tile: np.ndarray) -> bytes:
        buf = io.BytesIO()
        with tifffile.TiffWriter(buf) as tw:
            tw.write(tile, tile=(TILE, TILE), photometric="rgb", compression="jpeg", compressionargs={"level": 85})
        with tifffile.TiffFile(io.BytesIO(buf.getvalue())) as tf:
            page = tf.pages[0]
            off, n = page.dataoffsets[0], page.databytecounts[0]
        return buf.getvalue()[off : off + n]

    return [encode(t) for t in tissue], [encode(t) for t in glass]


def tissue_map(width: int, height: int, cell: int) -> np.ndarray:
    """Bool map on ``cell``-px cells: four ellipses covering ≈40 % of the slide."""
    gh, gw = -(-height // cell), -(-width // cell)
    ys = (np.arange(gh) + 0.5)[:, None] / gh
    xs = (np.arange(gw) + 0.5)[None, :] / gw
    m = np.zeros((gh, gw), bool)
    for cx, cy, a, b in ((0.28, 0.30, 0.18, 0.19), (0.71, 0.29, 0.17, 0.19), (0.29, 0.73, 0.18, 0.18),
                         (0.72, 0.72, 0.18, 0.17)):
        m |= ((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2 <= 1.0
    return m


def write_bench_slide(path: str | os.PathLike[str], width: int, height: int) -> float:
    """Write the benchmark slide; returns its tissue fraction."""
    import tifffile

    tissue_tiles, glass_tiles = _encoded_tiles()
    cmap = tissue_map(width, height, TILE)  # one cell per level-0 tile

    def tiles(ds: int) -> Iterator[bytes]:
        lw, lh = -(-width // ds), -(-height // ds)
        for ty in range(-(-lh // TILE)):
            for tx in range(-(-lw // TILE)):
                cy = min(int((ty + 0.5) * TILE * ds) // TILE, cmap.shape[0] - 1)
                cx = min(int((tx + 0.5) * TILE * ds) // TILE, cmap.shape[1] - 1)
                pool = tissue_tiles if cmap[cy, cx] else glass_tiles
                yield pool[(tx * 7 + ty * 3) % len(pool)]

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, ds in enumerate(DOWNSAMPLES):
            lw, lh = -(-width // ds), -(-height // ds)
            per_cm = 1e4 / (MPP * ds)
            tw.write(tiles(ds), shape=(lh, lw, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="jpeg", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                     subfiletype=1 if k else 0, metadata=None, software=False)
    return float(cmap.mean())


def _run_tile(slide: str, out: str, backend: str) -> None:
    """Child process: tile one slide, print wall time and peak RSS as JSON."""
    t0 = time.perf_counter()
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.tiling import tile_slides

    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    results = tile_slides([slide], out, TilingConfig(backend=backend), overwrite=True)
    wall = time.perf_counter() - t1
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    r = results[0]
    print(json.dumps({"status": r.status, "reason": r.reason, "n_patches": r.n_patches, "wall_s": wall,
                      "import_s": t_import, "peak_rss_mib": rss_mib}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=100_000)
    ap.add_argument("--height", type=int, default=80_000)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--keep", help="write the slide and outputs here and keep them")
    ap.add_argument("--child", nargs=2, metavar=("SLIDE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _run_tile(args.child[0], args.child[1], args.backend)
        return
    with tempfile.TemporaryDirectory(prefix="tile-bench-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        slide = work / "bench_slide.tif"
        t0 = time.perf_counter()
        frac = write_bench_slide(slide, args.width, args.height)
        gen = time.perf_counter() - t0
        print(f"slide: {args.width} x {args.height} px @ {MPP} µm/px, levels {DOWNSAMPLES}, "
              f"{frac:.0%} tissue, {slide.stat().st_size / 2**20:.0f} MiB, written in {gen:.1f} s")
        proc = subprocess.run([sys.executable, __file__, "--backend", args.backend, "--child", str(slide),
                               str(work / "out")], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(proc.returncode)
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        n_grid = (args.width // 512) * (args.height // 512)  # 256 px at 0.5 µm/px = 512 level-0 px
        print(f"tile stage: {m['status']} {m['reason']}".rstrip()
              + f", {m['n_patches']} patches (tissue map predicts ≈ {frac * n_grid:.0f})")
        print(f"wall time: {m['wall_s']:.2f} s (imports {m['import_s']:.2f} s not included)")
        print(f"peak RSS: {m['peak_rss_mib']:.0f} MiB")
        print(f"goal: < 10 s and < 1024 MiB -> {'met' if m['wall_s'] < 10 and m['peak_rss_mib'] < 1024 else 'NOT met'}")


if __name__ == "__main__":
    main()
