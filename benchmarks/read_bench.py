"""Patch reading: the pipeline's region-batched reader vs one ``read_region`` per patch.

Builds an Aperio-like slide (mpp 0.2525, 240-px JPEG tiles, as many real 40× SVS files
have), lays the same grid the tile stage would (256 px at 0.5 µm/px → 507 px at level 0,
so patches straddle tile borders) and reads every patch with each method, side by side
in one run, repeats interleaved so that load drift hits every method alike. Prints the
median patches/s (wall clock) and the speed-up over per-patch OpenSlide.

Methods: per-patch ``read_region`` through openslide-python and through tiffslide (what
CLAM-style extractors do); the region-batched reader of the embed stage in this process
with each backend (``auto`` shows which one it picks); and the embed stage's DataLoader
(``RegionDataset`` + ``make_loader``, fork workers) with 0 and ``--workers`` workers.
By default the loader hands out the patches at read size, so it measures reading; give
``--input-size 224`` to include the resize to the model input done in the workers.

    python benchmarks/read_bench.py [--width 12000 --height 8000 --repeats 3 --workers 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from wsi_pipeline.embed.dataset import RegionDataset, make_loader
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


def per_patch_openslide(path: str, coords: np.ndarray, size: int) -> None:
    """openslide-python as CLAM uses it: PIL RGBA per patch, converted to RGB."""
    import openslide

    with openslide.OpenSlide(path) as s:
        for x, y in coords:
            np.asarray(s.read_region((int(x), int(y)), 0, (size, size)).convert("RGB"))


def per_patch_tiffslide(path: str, coords: np.ndarray, size: int) -> None:
    """tiffslide's own ``read_region`` per patch, as an array."""
    import tiffslide

    with tiffslide.TiffSlide(path) as s:
        for x, y in coords:
            s.read_region((int(x), int(y)), 0, (size, size), as_array=True)


def region_batched(path: str, coords: np.ndarray, size: int, backend: str, region: int) -> None:
    """The embed stage's reader in this process: one read per region, patches cut out."""
    with open_slide(path, backend=backend) as slide:
        plan = plan_regions(coords, level=0, downsample=1.0, patch_px=size, region_size=region)
        for r in plan.regions:
            read_region_patches(slide, plan, r, coords)


def loader(path: str, coords: np.ndarray, size: int, backend: str, region: int, workers: int,
           input_size: int) -> None:
    """The embed stage's DataLoader over regions (fork workers), drained completely."""
    with open_slide(path, backend=backend) as slide:
        plan = plan_regions(coords, level=0, downsample=1.0, patch_px=size, region_size=region)
        dataset = RegionDataset(slide, coords, plan, input_size)
        n = 0
        for indices, _patches, _failed in make_loader(dataset, workers=workers, pin_memory=False,
                                                      mp_context="fork" if workers else None):
            n += len(indices)
    if n != len(coords):
        raise RuntimeError(f"loader returned {n} patches, expected {len(coords)}")


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(run: Callable[[], None]) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    run()
    return time.perf_counter() - t0, cpu_seconds() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=12000)
    ap.add_argument("--height", type=int, default=8000)
    ap.add_argument("--mpp", type=float, default=0.2525)
    ap.add_argument("--tile", type=int, default=240)
    ap.add_argument("--region", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the last row")
    ap.add_argument("--input-size", type=int, default=0,
                    help="resize patches to this size in the loader rows (0: no resize)")
    args = ap.parse_args()

    size = int(round(256 * 0.5 / args.mpp))
    input_size = args.input_size or size
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "bench.svs")
        t0 = time.perf_counter()
        write_slide(path, TileSource(texture, args.width, args.height), mpp=args.mpp, layout="svs", tile_size=args.tile)
        print(f"slide {args.width}x{args.height} px, {args.tile}-px JPEG tiles, written in {time.perf_counter() - t0:.1f} s")
        xs = np.arange(0, args.width - size + 1, size)
        ys = np.arange(0, args.height - size + 1, size)
        coords = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
        with open_slide(path) as s:
            auto = s.backend
        print(f"{len(coords)} patches of {size} px at level 0 (256 px at 0.5 µm/px), region {args.region} px; "
              f"auto picks {auto}; loader input {input_size} px")

        methods: dict[tuple[str, str, int], Callable[[], None]] = {
            ("per-patch read_region", "openslide", 0): lambda: per_patch_openslide(path, coords, size),
            ("per-patch read_region", "tiffslide", 0): lambda: per_patch_tiffslide(path, coords, size),
        }
        for backend in ("auto", "openslide", "tiffslide"):
            methods[("region-batched", backend, 0)] = (
                lambda b=backend: region_batched(path, coords, size, b, args.region))
        for w in sorted({0, args.workers}):
            methods[("region-batched DataLoader", "auto", w)] = (
                lambda w=w: loader(path, coords, size, "auto", args.region, w, input_size))

        times: dict[tuple[str, str, int], list[tuple[float, float]]] = {k: [] for k in methods}
        load0 = os.getloadavg()[0]
        for _ in range(args.repeats):
            for key, run in methods.items():
                times[key].append(measure(run))
        n = len(coords)
        base = statistics.median(t for t, _ in times[("per-patch read_region", "openslide", 0)])
        print(f"{'method':<27} {'backend':<14} {'workers':>7} {'patches/s':>10} {'vs per-patch openslide':>23} "
              f"{'CPU ms/patch':>13}")
        for (name, backend, w), runs in times.items():
            t = statistics.median(x for x, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            label = f"auto={auto}" if backend == "auto" else backend
            print(f"{name:<27} {label:<14} {w:>7} {n / t:>10.0f} {base / t:>22.2f}x {1000 * cpu / n:>13.1f}")
        print(f"median of {args.repeats} interleaved runs, wall clock; {os.cpu_count()} CPUs, "
              f"load average {load0:.1f} before and {os.getloadavg()[0]:.1f} after")

if __name__ == "__main__":
    main()
