"""Patch reading: the pipeline's region-batched reader vs one OpenSlide ``read_region`` per patch.

Builds an Aperio-like slide (mpp 0.2525, 240-px JPEG tiles, as many real 40× SVS files
have), lays the same grid the tile stage would (256 px at 0.5 µm/px → 507 px at level 0,
so patches straddle tile borders), and reads every patch both ways, side by side in one
run, in one process. Prints patches/s and the ratio.

    python benchmarks/read_bench.py [--width 24000 --height 16000 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_pipeline.embed.regions import plan_regions, read_region_patches
from wsi_pipeline.slide import open_slide
from wsi_pipeline.slide.write import TileSource, write_slide


def texture(x: int, y: int, w: int, h: int) -> np.ndarray:
    """Deterministic H&E-ish texture that JPEG cannot compress to nothing."""
    yy, xx = np.mgrid[y : y + h, x : x + w].astype(np.float32)
    v = np.sin(xx / 7.0) * np.cos(yy / 11.0) + 0.5 * np.sin((xx + yy) / 23.0)
    r = (200 + 30 * v).clip(0, 255)
    g = (120 + 40 * v).clip(0, 255)
    b = (170 + 25 * v).clip(0, 255)
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def per_patch_openslide(path: str, coords: np.ndarray, size: int) -> float:
    import openslide

    t0 = time.perf_counter()
    with openslide.OpenSlide(path) as s:
        for x, y in coords:
            np.asarray(s.read_region((int(x), int(y)), 0, (size, size)).convert("RGB"))
    return time.perf_counter() - t0


def region_batched(path: str, coords: np.ndarray, size: int, backend: str, region: int) -> float:
    t0 = time.perf_counter()
    with open_slide(path, backend=backend) as slide:
        plan = plan_regions(coords, level=0, downsample=1.0, patch_px=size, region_size=region)
        for r in plan.regions:
            read_region_patches(slide, plan, r, coords)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=24000)
    ap.add_argument("--height", type=int, default=16000)
    ap.add_argument("--mpp", type=float, default=0.2525)
    ap.add_argument("--tile", type=int, default=240)
    ap.add_argument("--region", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    size = int(round(256 * 0.5 / args.mpp))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "bench.svs")
        t0 = time.perf_counter()
        write_slide(path, TileSource(texture, args.width, args.height), mpp=args.mpp, layout="svs", tile_size=args.tile)
        print(f"slide {args.width}x{args.height} px, {args.tile}-px JPEG tiles, written in {time.perf_counter() - t0:.1f} s")
        xs = np.arange(0, args.width - size + 1, size)
        ys = np.arange(0, args.height - size + 1, size)
        coords = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
        print(f"{len(coords)} patches of {size} px at level 0 (256 px at 0.5 µm/px), region {args.region} px")

        rows = {"openslide read_region per patch": [], "region-batched (openslide)": [], "region-batched (tiffslide)": []}
        for _ in range(args.repeats):  # interleaved so that drift hits every method alike
            rows["openslide read_region per patch"].append(per_patch_openslide(path, coords, size))
            rows["region-batched (openslide)"].append(region_batched(path, coords, size, "openslide", args.region))
            rows["region-batched (tiffslide)"].append(region_batched(path, coords, size, "tiffslide", args.region))
        base = statistics.median(rows["openslide read_region per patch"])
        print(f"{'method':<34} {'patches/s':>10} {'vs per-patch':>13}")
        for name, times in rows.items():
            t = statistics.median(times)
            print(f"{name:<34} {len(coords) / t:>10.0f} {base / t:>12.2f}x")


if __name__ == "__main__":
    main()
