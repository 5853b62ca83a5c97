"""Benchmark of the ``tile`` stage on a slide the size of a user's: 100,000 × 80,000 px, two cases.

* **pyramid**: a real Aperio-layout SVS as a 40× scanner writes it (0.2525 µm/px, 240-px JPEG
  Q70 tiles, levels 1/4/16/64, thumbnail page), written by :func:`wsi_pipeline.slide.write.write_slide`:
  level 0 is rendered lazily, strip by strip, from a :class:`~wsi_pipeline.slide.write.TileSource`
  (never whole in memory), and every reduced level is area-averaged from what level 0 shows, so
  the pyramid is consistent. Segmentation reads the level nearest 8 µm/px.
* **level 0 only**: the same level 0 (the same tiles, byte for byte) with no reduced level and
  no thumbnail: segmentation must read level 0 itself, in chunks, several at once in threads
  (run a second time with one thread, side by side).

Tissue (≈ 40 %, four large ellipses) is a tinted immunohistochemistry texture, glass is
near-white with a little noise. Each case is tiled in a fresh subprocess that reports its wall
time and peak RSS (``VmHWM``), side by side in one run; the slide generation and
the imports are not timed. The patch count is checked against what the tissue map predicts.

Generated slides are cached in ``--cache-dir`` (default ``~/.cache/wsi-pipeline-bench/tile_bench``;
about 0.8 GB each at full size, written in a few minutes), keyed by size and generator version; ``--no-cache`` writes them
to a temporary folder and deletes them. ``--cold`` evicts each slide from the page cache
before its timed run (reads then come from the disk).

    python benchmarks/tile_bench.py [--width 100000 --height 80000] [--cold] [--no-cache]

Goal on a 2-core machine: < 10 s and < 1 GB peak RSS for each case.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _texture import Repeating

MPP = 0.2525  # a 40× Aperio scan
TILE = 240
QUALITY = 70  # what Aperio scanners write ("JPEG/RGB Q=70")
LEVELS = (1, 4, 16, 64)
GENERATOR_VERSION = 2  # bump when the rendering below changes: cached slides are then regenerated
CASES = {"pyramid": LEVELS, "level 0 only": (1,)}
#: Ellipses (centre x, centre y, half-axis x, half-axis y) in fractions of the slide: ≈ 40 % tissue.
ELLIPSES = ((0.28, 0.30, 0.18, 0.19), (0.71, 0.29, 0.17, 0.19), (0.29, 0.73, 0.18, 0.18), (0.72, 0.72, 0.18, 0.17))
MASK_CELL = 8  # the renderer decides tissue or glass per 8×8-px cell
PERIOD = 480  # texture period, a multiple of the tile: level-0 strips see 2 row phases


class BenchSlide:
    """Level-0 pixels of the benchmark slide, rendered on demand for ``write_slide``."""

    def __init__(self, width: int, height: int, seed: int = 0) -> None:
        from skimage.data import immunohistochemistry

        self.width, self.height = width, height
        ihc = immunohistochemistry()[:PERIOD, :PERIOD].astype(np.float32) * np.array([0.93, 0.74, 0.86], np.float32)
        glass = 240 + np.random.default_rng(seed).integers(-3, 4, ihc.shape)
        self.tissue, self.glass = Repeating(ihc.astype(np.uint8), width), Repeating(glass.astype(np.uint8), width)

    def mask(self, x: int, y: int, w: int, h: int, cell: int) -> np.ndarray:
        """Tissue on ``cell``-px cells covering the region, judged at each cell's centre."""
        xs = (x + (np.arange(-(-w // cell)) + 0.5) * cell)[None, :] / self.width
        ys = (y + (np.arange(-(-h // cell)) + 0.5) * cell)[:, None] / self.height
        m = np.zeros((ys.shape[0], xs.shape[1]), bool)
        for cx, cy, a, b in ELLIPSES:
            m |= ((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2 <= 1.0
        return m

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB of a level-0 region: glass, with the tissue texture copied over each run of tissue cells."""
        out, tissue, c = self.glass.read(x, y, w, h).copy(), self.tissue.read(x, y, w, h), MASK_CELL
        for i, row in enumerate(self.mask(x, y, w, h, c)):
            edges = np.flatnonzero(np.diff(np.concatenate([[0], row.view(np.int8), [0]])))
            r0, r1 = i * c, min(h, (i + 1) * c)
            for a, b in zip(edges[::2] * c, np.minimum(edges[1::2] * c, w), strict=True):
                out[r0:r1, a:b] = tissue[r0:r1, a:b]
        return out

    def predicted_patches(self) -> tuple[int, float]:
        """(patches a perfect segmentation keeps with the tile stage's defaults, tissue fraction)."""
        from wsi_pipeline.config import TilingConfig
        from wsi_pipeline.tiling.grid import grid_spec, select_patches

        cfg, cell = TilingConfig(), 32
        m = self.mask(0, 0, self.width, self.height, cell)
        spec = grid_spec(cfg.patch_size, cfg.target_mpp, MPP, cfg.overlap)
        coords, _ = select_patches(m, (cell, cell), (self.width, self.height), spec, cfg.min_tissue)
        return len(coords), float(m.mean())


def slide_paths(folder: Path, width: int, height: int) -> dict[str, Path]:
    stem = f"bench_{width}x{height}_v{GENERATOR_VERSION}"
    return {case: folder / f"{stem}_{'pyramid' if len(levels) > 1 else 'level0'}.svs"
            for case, levels in CASES.items()}


def ensure_slides(paths: dict[str, Path], source: BenchSlide) -> dict[str, float | None]:
    """Write the slides that are not there yet; returns each one's generation seconds (None: cached)."""
    from wsi_pipeline.slide.write import TileSource, write_slide

    seconds: dict[str, float | None] = {}
    for case, path in paths.items():
        if path.exists():
            seconds[case] = None
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        levels = CASES[case]
        t0 = time.perf_counter()
        write_slide(path, TileSource(source.read, source.width, source.height), mpp=MPP, layout="svs",
                    tile_size=TILE, quality=QUALITY, levels=levels, thumbnail=len(levels) > 1)
        seconds[case] = time.perf_counter() - t0
    return seconds


def evict(path: Path) -> None:
    """Drop ``path`` from the page cache (``posix_fadvise(DONTNEED)``), so that it is read from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def peak_rss_mib() -> float:
    """This process's peak resident set since its ``exec`` (``VmHWM``). ``ru_maxrss`` is not used:
    Linux carries the high-water mark over ``exec``, so a child would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_tile(slide: str, out: str, backend: str, seg_threads: int | None) -> None:
    """Child process: tile one slide, print wall time, peak RSS and what segmentation read as JSON."""
    t0 = time.perf_counter()
    from wsi_pipeline.config import TilingConfig
    from wsi_pipeline.tiling import lowres

    if seg_threads is not None:
        lowres.READ_THREADS = seg_threads
    from wsi_pipeline.store.coords import read_coords
    from wsi_pipeline.tiling import tile_slides

    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    [r] = tile_slides([slide], out, TilingConfig(backend=backend), overwrite=True)
    wall = time.perf_counter() - t1
    rss_mib = peak_rss_mib()
    attrs = read_coords(r.coords_path)[1] if r.status == "ok" else {}
    print(json.dumps({"status": r.status, "reason": r.reason, "n_patches": r.n_patches, "wall_s": wall,
                      "import_s": t_import, "peak_rss_mib": rss_mib, "seg_level": attrs.get("seg_level"),
                      "seg_factor": attrs.get("seg_factor"), "backend": attrs.get("backend")}))


def tile_in_child(slide: Path, out: Path, backend: str, seg_threads: int | None = None) -> dict[str, object]:
    threads = [] if seg_threads is None else ["--seg-threads", str(seg_threads)]
    proc = subprocess.run([sys.executable, __file__, "--backend", backend, *threads, "--child", str(slide), str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"tiling {slide.name} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=100_000)
    ap.add_argument("--height", type=int, default=80_000)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "wsi-pipeline-bench" / "tile_bench",
                    help="where generated slides are kept between runs (default: %(default)s)")
    ap.add_argument("--no-cache", action="store_true", help="generate into a temporary folder, deleted after")
    ap.add_argument("--cold", action="store_true", help="evict each slide from the page cache before tiling it")
    ap.add_argument("--seg-threads", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=2, metavar=("SLIDE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _run_tile(args.child[0], args.child[1], args.backend, args.seg_threads)
        return

    source = BenchSlide(args.width, args.height)
    predicted, frac = source.predicted_patches()
    with tempfile.TemporaryDirectory(prefix="tile-bench-") as tmp:
        paths = slide_paths(Path(tmp) if args.no_cache else args.cache_dir, args.width, args.height)
        generated = ensure_slides(paths, source)
        print(f"slide: {args.width} x {args.height} px @ {MPP} µm/px, Aperio SVS, {TILE}-px JPEG Q{QUALITY} tiles, "
              f"{frac:.0%} tissue; in {paths['pyramid'].parent}")
        for case, path in paths.items():
            levels = "/".join(map(str, CASES[case])) + (" + thumbnail" if len(CASES[case]) > 1 else "")
            gen = "cached" if generated[case] is None else f"written in {generated[case]:.1f} s"
            print(f"  {case:<13} downsamples {levels:<22} {path.stat().st_size / 2**20:7.0f} MiB  ({gen})")
        from wsi_pipeline.tiling.lowres import READ_THREADS

        runs = [(case, path, None) for case, path in paths.items()]
        if READ_THREADS > 1:  # the same level-0 read in one thread, side by side
            runs.append(("level 0, 1 thread", paths["level 0 only"], 1))
        results = {}
        for case, path, threads in runs:
            if args.cold:
                evict(path)
            results[case] = tile_in_child(path, Path(tmp) / "out" / case.replace(" ", "_").replace(",", ""),
                                          args.backend, threads)

    print(f"{'case':<17} {'segmentation read':<20} {'patches':>8} {'predicted':>9} {'wall s':>7} "
          f"{'peak RSS MiB':>12}  goal (< 10 s, < 1024 MiB)")
    for case, m in results.items():
        read = f"level {m['seg_level']}, ÷{m['seg_factor']}" if m["status"] == "ok" else f"{m['status']}: {m['reason']}"
        met = m["wall_s"] < 10 and m["peak_rss_mib"] < 1024
        print(f"{case:<17} {read:<20} {m['n_patches']:>8} {predicted:>9} {m['wall_s']:>7.2f} "
              f"{m['peak_rss_mib']:>12.0f}  {'met' if met else 'NOT met'}")
    a, b = results["level 0 only"], results["pyramid"]
    print(f"level 0 only vs pyramid: {a['wall_s'] / b['wall_s']:.1f}x the wall time, "
          f"{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x the peak RSS; backend {b['backend']}; "
          f"imports ({b['import_s']:.2f} s) not timed; page cache "
          f"{'evicted before each run (--cold)' if args.cold else 'as generation or earlier runs left it'}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if "level 0, 1 thread" in results:
        one = results["level 0, 1 thread"]
        print(f"level 0 only: {READ_THREADS} reader threads are {one['wall_s'] / a['wall_s']:.2f}x as fast as 1 "
              f"({one['wall_s']:.1f} s -> {a['wall_s']:.1f} s)")


if __name__ == "__main__":
    main()
