"""Patch reading: the pipeline's region-batched reader vs one ``read_region`` per patch, and how
reading scales with reader processes.

Builds an Aperio-like slide (mpp 0.2525, 240-px JPEG tiles, as many real 40× SVS files
have), lays the same grid the tile stage would (256 px at 0.5 µm/px → 507 px at level 0,
so patches straddle tile borders) and reads every patch with each method, side by side
in one run, repeats interleaved so that load drift hits every method alike. Prints the
median patches/s (wall clock) and the speed-up over per-patch OpenSlide.

Methods: per-patch ``read_region`` through openslide-python and through tiffslide (what
CLAM-style extractors do); the region-batched reader of the embed stage in this process
with each backend (``auto`` shows which one it picks).

Reader scaling: the embed stage's DataLoader (``RegionDataset`` + ``make_loader``, fork
workers) with each ``--workers`` count, through tiffslide (what ``auto`` picks for SVS and
generic TIFF) and through OpenSlide (what formats that only OpenSlide reads, such as MIRAX or
Hamamatsu VMS, get; ``--backends`` picks). Prints patches/s in total and per reader process
(0 workers: the main process reads), and, with ``--model-rate``, how many reader processes
that per-process rate needs to feed a model running at that many patches/s (e.g. the GPU rate
that ``embed_bench.py`` measures). By default the loader hands out the patches at read size,
so it measures reading; give ``--input-size 224`` to include the resize to the model input
done in the workers, as embedding does.

    python benchmarks/read_bench.py [--width 12000 --height 8000 --repeats 3]
    python benchmarks/read_bench.py --sweep-only --workers 0 1 2 4 8 14 --input-size 224 --model-rate 3000
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _texture import Repeating

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


def default_workers() -> list[int]:
    """0, 1, 2, 4, ... up to the number of cores, and the number of cores."""
    cores = os.cpu_count() or 1
    return sorted({0, cores, *(2**k for k in range(cores.bit_length()) if 2**k <= cores)})


def readers_needed(model_rate: float, per_process: float) -> int:
    """Reader processes that, at ``per_process`` patches/s each, keep up with ``model_rate``."""
    return math.ceil(model_rate / per_process) if per_process > 0 else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=12000)
    ap.add_argument("--height", type=int, default=8000)
    ap.add_argument("--mpp", type=float, default=0.2525)
    ap.add_argument("--tile", type=int, default=240)
    ap.add_argument("--region", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=default_workers(),
                    help="DataLoader worker counts of the scaling sweep (default: %(default)s, up to the cores)")
    ap.add_argument("--backends", nargs="+", default=["tiffslide", "openslide"],
                    help="backends of the scaling sweep (default: %(default)s)")
    ap.add_argument("--model-rate", type=float, default=0.0, metavar="PATCHES_PER_S",
                    help="print how many reader processes feed a model at this rate")
    ap.add_argument("--sweep-only", action="store_true", help="skip the per-patch / region-batched comparison")
    ap.add_argument("--input-size", type=int, default=0,
                    help="resize patches to this size in the loader (0: no resize)")
    args = ap.parse_args()

    size = int(round(256 * 0.5 / args.mpp))
    input_size = args.input_size or size
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "bench.svs")
        t0 = time.perf_counter()
        pixels = Repeating(texture(0, 0, 480, 480), args.width)  # cheap to render at any size
        write_slide(path, TileSource(pixels.read, args.width, args.height), mpp=args.mpp, layout="svs",
                    tile_size=args.tile)
        print(f"slide {args.width}x{args.height} px, {args.tile}-px JPEG tiles, written in {time.perf_counter() - t0:.1f} s")
        xs = np.arange(0, args.width - size + 1, size)
        ys = np.arange(0, args.height - size + 1, size)
        coords = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
        with open_slide(path) as s:
            auto = s.backend
        print(f"{len(coords)} patches of {size} px at level 0 (256 px at 0.5 µm/px), region {args.region} px; "
              f"auto picks {auto}; loader input {input_size} px")

        methods: dict[tuple[str, str, int], Callable[[], None]] = {}
        if not args.sweep_only:
            methods[("per-patch read_region", "openslide", 0)] = lambda: per_patch_openslide(path, coords, size)
            methods[("per-patch read_region", "tiffslide", 0)] = lambda: per_patch_tiffslide(path, coords, size)
            for backend in ("auto", "openslide", "tiffslide"):
                methods[("region-batched", backend, 0)] = (
                    lambda b=backend: region_batched(path, coords, size, b, args.region))
        for backend in args.backends:
            for w in sorted(set(args.workers)):
                methods[("DataLoader", backend, w)] = (
                    lambda b=backend, w=w: loader(path, coords, size, b, args.region, w, input_size))

        times: dict[tuple[str, str, int], list[tuple[float, float]]] = {k: [] for k in methods}
        load0 = os.getloadavg()[0]
        for _ in range(args.repeats):
            for key, run in methods.items():
                times[key].append(measure(run))
        n = len(coords)
        rate = {k: n / statistics.median(t for t, _ in runs) for k, runs in times.items()}
        cpu_ms = {k: 1000 * statistics.median(c for _, c in runs) / n for k, runs in times.items()}

        if not args.sweep_only:
            base = rate[("per-patch read_region", "openslide", 0)]
            print(f"{'method':<22} {'backend':<14} {'patches/s':>10} {'vs per-patch openslide':>23} {'CPU ms/patch':>13}")
            for (name, backend, w), r in rate.items():
                if name != "DataLoader":
                    label = f"auto={auto}" if backend == "auto" else backend
                    print(f"{name:<22} {label:<14} {r:>10.0f} {r / base:>22.2f}x {cpu_ms[name, backend, w]:>13.1f}")

        need = f"readers for {args.model_rate:g}/s" if args.model_rate else ""
        print(f"reader scaling (DataLoader, {input_size}-px output):")
        w0 = min(args.workers)
        print(f"{'backend':<10} {'workers':>7} {'readers':>7} {'patches/s':>10} {'per reader':>10} "
              f"{f'vs {w0} workers':>12} {'CPU ms/patch':>13} {need:>20}")
        for backend in args.backends:
            first = rate[("DataLoader", backend, w0)]
            for w in sorted(set(args.workers)):
                r, readers = rate[("DataLoader", backend, w)], max(1, w)
                extra = f"{readers_needed(args.model_rate, r / readers):>20}" if args.model_rate else ""
                print(f"{backend:<10} {w:>7} {readers:>7} {r:>10.0f} {r / readers:>10.0f} {r / first:>11.2f}x "
                      f"{cpu_ms['DataLoader', backend, w]:>13.1f} {extra}")
        if args.model_rate:
            for backend in args.backends:
                enough = [w for w in sorted(set(args.workers)) if rate["DataLoader", backend, w] >= args.model_rate]
                top = max(args.workers)
                per = rate["DataLoader", backend, top] / max(1, top)
                verdict = (f"reached with {', '.join(map(str, enough))} workers" if enough else
                           f"no measured worker count reached it; at the per-reader rate of {top} workers "
                           f"({per:.0f}/s) it needs {readers_needed(args.model_rate, per)} reader processes "
                           f"(this machine has {os.cpu_count()} cores)")
                print(f"feeding {args.model_rate:g} patches/s through {backend}: {verdict}")
        print(f"median of {args.repeats} interleaved runs, wall clock; {os.cpu_count()} CPUs, "
              f"load average {load0:.1f} before and {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
