"""Benchmark: classify stored features end to end (h5 files on disk -> predictions CSV).

Generates ``--n-files`` feature files of ``--n-patches`` x ``--dim`` float32 (written through
the real feature store, so the layout is what ``embed`` writes), then times
:func:`wsi_pipeline.classify.scoring.score_features` + :func:`~wsi_pipeline.classify.outputs.write_predictions`
with a linear ``--dim`` -> ``--proj-dim`` projection model and a random text classifier.
Prints the wall time, the time spent reading features (in the prefetch thread) and how long
scoring waited for reads, per file and extrapolated to 1,000 files. Then, side by side on one
slide's features in memory, the two similarity paths of :mod:`wsi_pipeline.classify.similarity`:
``model.project`` in batches (torch) and the factored form the pipeline uses for linear
projections, through torch's BLAS and through numpy's (the pipeline's choice on CPU).

The default (1,000 x 10,000 x 512) is ~20 GB; check ``df -h`` first. ``--chunk N`` keeps at
most N files on disk: each chunk is generated, classified (timed) and deleted, and the
timings are summed. ``--cold`` evicts each file from the page cache before timing
(``posix_fadvise(DONTNEED)`` on those files only), so reads come from the disk.

    python benchmarks/classify_bench.py --n-files 100 --cold
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.classify.outputs import write_predictions
from wsi_pipeline.classify.scoring import score_features
from wsi_pipeline.classify.similarity import FactoredSimilarity, ProjectSimilarity
from wsi_pipeline.store.features import get_store

MODEL_ID = "bench"


class LinearProjection(nn.Module):
    """``project(x) = normalize(x @ W)``; random init; the learned-scale default of CLIP."""

    def __init__(self, dim: int, proj_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, proj_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.name = "bench-linear"
        self.weights_sha256 = None

    def projection_matrix(self) -> torch.Tensor:
        return self.proj.weight.T

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(features), dim=-1)


def generate(folder: Path, ids: list[str], n_patches: int, dim: int, seed: int) -> float:
    store = get_store("h5")
    attrs = {"projected": False, "normalized": False, "weights_sha256": "none (random init)", "embed_dim": dim,
             "model_id": MODEL_ID, "features_schema_version": 1}
    coords_attrs = {"patch_size_level0": 256, "level0_width": 100_000, "level0_height": 100_000}
    side = math.ceil(math.sqrt(n_patches))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_patches] * 256
    t0 = time.perf_counter()
    for i, sid in enumerate(ids):
        rng = np.random.default_rng(seed + i)
        feats = rng.standard_normal((n_patches, dim), dtype=np.float32)
        store.write(folder, MODEL_ID, sid, feats, grid, attrs, coords_attrs)
    return time.perf_counter() - t0


def evict(folder: Path) -> None:
    for p in (folder / MODEL_ID).glob("*.h5"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-files", type=int, default=1000)
    ap.add_argument("--n-patches", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--proj-dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=0, help="at most this many files on disk at once (0: all)")
    ap.add_argument("--cold", action="store_true", help="evict the files from the page cache before timing")
    ap.add_argument("--dir", default=None, help="work folder (default: a new temporary folder, deleted after)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where the projection model (and so the scoring) runs")
    args = ap.parse_args(argv)

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="classify_bench_"))
    need_gb = args.n_files * args.n_patches * args.dim * 4 / 1e9
    free_gb = shutil.disk_usage(work).free / 1e9
    chunk = args.chunk or args.n_files
    print(f"features: {args.n_files} files x {args.n_patches} patches x {args.dim}-d float32 = {need_gb:.1f} GB; "
          f"{free_gb:.0f} GB free in {work}; chunks of {chunk} files; torch threads {torch.get_num_threads()}")
    if chunk * args.n_patches * args.dim * 4 / 1e9 > 0.8 * free_gb:
        print("not enough disk space for one chunk; use --chunk or fewer files", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = LinearProjection(args.dim, args.proj_dim).eval().to(args.device)
    classes = [f"class{i}" for i in range(args.classes)]
    text = F.normalize(torch.randn(args.classes, args.proj_dim), dim=-1)
    totals = dict.fromkeys(("wall", "read", "read_wait", "score", "write", "gen"), 0.0)
    rows_all = []
    try:
        for start in range(0, args.n_files, chunk):
            ids = [f"slide{i:05d}" for i in range(start, min(start + chunk, args.n_files))]
            features_dir = work / "out" / "features"
            totals["gen"] += generate(features_dir, ids, args.n_patches, args.dim, args.seed + start)
            if args.cold:
                os.sync()
                evict(features_dir)
            t0 = time.perf_counter()
            rows, _, timings = score_features(features_dir, MODEL_ID, ids, model, [text], classes, (args.top_k,))
            t1 = time.perf_counter()
            write_predictions(work / "out", f"bench_{start}", classes, rows, {"benchmark": True})
            t2 = time.perf_counter()
            totals["wall"] += t2 - t0
            totals["write"] += t2 - t1
            for k in ("read", "read_wait", "score"):
                totals[k] += timings[k]
            rows_all += rows
            if args.chunk:
                shutil.rmtree(features_dir / MODEL_ID)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    n_ok = sum(r.status == "ok" for r in rows_all)
    if n_ok != args.n_files:
        print(f"only {n_ok} of {args.n_files} slides scored ok", file=sys.stderr)
        return 1
    per_file = totals["wall"] / args.n_files
    print(f"generated in {totals['gen']:.1f} s (not timed)")
    print(f"classified {args.n_files} files ({'cold page cache' if args.cold else 'page cache as generation left it'}) in {totals['wall']:.2f} s "
          f"= {1000 * per_file:.1f} ms/file -> {1000 * per_file:.1f} s per 1,000 files (goal < 60 s)")
    print(f"  reading features  {totals['read']:.2f} s ({100 * totals['read'] / totals['wall']:.0f}% of wall, "
          f"in the prefetch thread); scoring waited {totals['read_wait']:.2f} s for reads "
          f"({100 * totals['read_wait'] / totals['wall']:.0f}%)")
    print(f"  projection + similarity + top-K  {totals['score']:.2f} s "
          f"({100 * totals['score'] / totals['wall']:.0f}%); CSV/JSON {totals['write']:.2f} s")
    compare_paths(model, text, args.n_patches, args.dim, args.seed, torch.device(args.device))
    return 0


def compare_paths(model: LinearProjection, text: torch.Tensor, n: int, dim: int, seed: int, device: torch.device,
                  rounds: int = 4, reps: int = 5) -> None:
    """Time the project() path and the factored path (torch and numpy BLAS) on the same features, alternating.

    Each round runs one path ``reps`` times after one untimed call: torch's and OpenBLAS's
    thread pools spin for a while after their last call and slow each other down when calls
    of the two alternate one by one.
    """
    feats = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32))
    paths = {"project() path (torch)": ProjectSimilarity(model, text, 4096),
             "factored (torch)": FactoredSimilarity(model.projection_matrix(), text, device, "torch")}
    if device.type == "cpu":
        paths["factored (numpy, the pipeline's CPU path)"] = FactoredSimilarity(model.projection_matrix(), text, device)
    times = dict.fromkeys(paths, 0.0)
    results = {}
    for _ in range(rounds):
        for name, fn in paths.items():
            results[name] = fn(feats)
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(feats)
            times[name] += time.perf_counter() - t0
    base = next(iter(paths))
    print(f"similarity of one {n} x {dim} slide, {rounds} alternating rounds of {reps} runs per path:")
    for name in paths:
        ms = 1000 * times[name] / (rounds * reps)
        diff = float(np.abs(results[name] - results[base]).max())
        print(f"  {name:44s} {ms:6.1f} ms  {times[base] / times[name]:.2f}x  max |diff| {diff:.1e}")


if __name__ == "__main__":
    sys.exit(main())
