"""Benchmark: classify stored features end to end (h5 files on disk -> predictions CSV), per shape.

For each ``--shapes DxP`` (pre-projection width x joint-space width; defaults: 512x512 as
open_clip ViT-B-16's text width would suggest, 768x512 the registered ViT-B ConVLM / CONCH
trunk / open_clip ViT-B-16, 1024x768 ViT-L), generates ``--n-files`` feature files of
``--n-patches`` rows through the real feature store, *with* the projected fp16 embeddings
that ``embed`` stores, then classifies them twice, side by side in one run:

* ``features``: the path for files without stored embeddings: read the float32 features,
  project them (exact factored similarity) and pool;
* ``embeddings``: the path ``classify`` takes for files ``embed`` writes now: read only the
  fp16 embeddings (and 4 feature rows to check them), one ``N x P x C`` product, pool.

The two paths alternate which goes first per chunk, and ``--cold`` evicts the files from the
page cache before each timed pass (``posix_fadvise(DONTNEED)``), so reads come from the disk.
Prints, per shape and path, seconds per 1,000 files and the share of the run spent reading
(in the prefetch thread) and scoring. ``--chunk N`` keeps at most N files on disk at a time.
Then, on one slide in memory, the similarity paths of :mod:`wsi_pipeline.classify.similarity`.

    python benchmarks/classify_bench.py --n-files 1000 --chunk 250            # ~100 GB written in all
    python benchmarks/classify_bench.py --n-files 100 --shapes 768x512 --cold
"""

from __future__ import annotations

import argparse
import hashlib
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
from wsi_pipeline.store.features import Embeddings, get_store

MODEL_ID = "bench"
PATHS = ("features", "embeddings")


class LinearProjection(nn.Module):
    """``project(x) = normalize(x @ W)``; random init; the learned-scale default of CLIP."""

    def __init__(self, dim: int, proj_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, proj_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.name = "bench-linear"
        self.weights_sha256 = None
        self.proj_dim = proj_dim
        self.use_embeddings = True

    def projection_matrix(self) -> torch.Tensor:
        return self.proj.weight.T

    def projection_sha256(self) -> str | None:
        """The digest stored embeddings are matched against; ``None`` forces the features path."""
        if not self.use_embeddings:
            return None
        w = self.projection_matrix().detach().float().cpu().contiguous().numpy()
        return hashlib.sha256(w.tobytes()).hexdigest()

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(features), dim=-1)


def generate(folder: Path, ids: list[str], n_patches: int, model: LinearProjection, seed: int) -> float:
    """Feature files as ``embed`` writes them (features + fp16 embeddings); returns the seconds taken."""
    store = get_store("h5")
    dim = model.proj.in_features
    attrs = {"projected": False, "normalized": False, "weights_sha256": "none (random init)", "embed_dim": dim,
             "model_id": MODEL_ID, "features_schema_version": 2}
    coords_attrs = {"patch_size_level0": 256, "level0_width": 100_000, "level0_height": 100_000}
    side = math.ceil(math.sqrt(n_patches))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_patches] * 256
    digest = model.projection_sha256()
    t0 = time.perf_counter()
    for i, sid in enumerate(ids):
        rng = np.random.default_rng(seed + i)
        feats = rng.standard_normal((n_patches, dim), dtype=np.float32)
        with torch.inference_mode():
            emb = model.project(torch.from_numpy(feats)).numpy().astype(np.float16)
        store.write(folder, MODEL_ID, sid, feats, grid, attrs, coords_attrs,
                    embeddings=Embeddings(emb, digest, MODEL_ID))
    return time.perf_counter() - t0


def evict(folder: Path) -> None:
    for p in (folder / MODEL_ID).glob("*.h5"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def parse_shape(text: str) -> tuple[int, int]:
    d, _, p = text.lower().partition("x")
    return int(d), int(p)


def classify_pass(features_dir: Path, out: Path, ids: list[str], model: LinearProjection, text: torch.Tensor,
                  classes: list[str], top_k: int, path: str, cold: bool) -> dict[str, float]:
    if cold:
        evict(features_dir)
    model.use_embeddings = path == "embeddings"
    t0 = time.perf_counter()
    rows, _, timings = score_features(features_dir, MODEL_ID, ids, model, [text], classes, (top_k,))
    t1 = time.perf_counter()
    write_predictions(out, f"bench_{path}_{ids[0]}", classes, rows, {"benchmark": True})
    t2 = time.perf_counter()
    if sum(r.status == "ok" for r in rows) != len(ids):
        raise SystemExit(f"{path}: only {sum(r.status == 'ok' for r in rows)} of {len(ids)} slides scored ok")
    return {"wall": t2 - t0, "write": t2 - t1, **{k: timings[k] for k in ("read", "read_wait", "score")}}


def run_shape(work: Path, dim: int, proj_dim: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    torch.manual_seed(args.seed)
    model = LinearProjection(dim, proj_dim).eval()  # generation runs on the CPU; scoring where --device says
    classes = [f"class{i}" for i in range(args.classes)]
    text = F.normalize(torch.randn(args.classes, proj_dim), dim=-1)
    totals = {p: dict.fromkeys(("wall", "read", "read_wait", "score", "write"), 0.0) for p in PATHS}
    gen = 0.0
    chunk = args.chunk or args.n_files
    features_dir = work / "out" / "features"
    for n, start in enumerate(range(0, args.n_files, chunk)):
        ids = [f"slide{i:05d}" for i in range(start, min(start + chunk, args.n_files))]
        model.use_embeddings = True
        gen += generate(features_dir, ids, args.n_patches, model.cpu(), args.seed + start)
        model.to(args.device)
        if args.cold:
            os.sync()
        for path in (PATHS if n % 2 == 0 else PATHS[::-1]):  # alternate which path meets a warm cache first
            for k, v in classify_pass(features_dir, work / "out", ids, model, text, classes, args.top_k, path,
                                      args.cold).items():
                totals[path][k] += v
        shutil.rmtree(features_dir / MODEL_ID)
    print(f"  {dim}x{proj_dim}: generated {args.n_files} files in {gen:.0f} s (not timed)")
    return totals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-files", type=int, default=1000)
    ap.add_argument("--n-patches", type=int, default=10_000)
    ap.add_argument("--shapes", nargs="+", default=["512x512", "768x512", "1024x768"], help="DxP pairs")
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=0, help="at most this many files on disk at once (0: all)")
    ap.add_argument("--cold", action="store_true", help="evict the files from the page cache before each pass")
    ap.add_argument("--dir", default=None, help="work folder (default: a new temporary folder, deleted after)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--goal", type=float, default=30.0, help="seconds per 1,000 files")
    ap.add_argument("--device", default="cpu", help="where the projection model (the features path) runs")
    args = ap.parse_args(argv)
    shapes = [parse_shape(s) for s in args.shapes]
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="classify_bench_"))
    chunk = args.chunk or args.n_files
    free_gb = shutil.disk_usage(work).free / 1e9
    need_gb = max(chunk * args.n_patches * (4 * d + 2 * p) for d, p in shapes) / 1e9
    print(f"{args.n_files} files x {args.n_patches} patches per shape, chunks of {chunk} files (up to "
          f"{need_gb:.1f} GB on disk at once, {free_gb:.0f} GB free in {work}); {args.classes} classes, top-{args.top_k}; "
          f"{'cold page cache' if args.cold else 'page cache as generation left it'}; torch threads "
          f"{torch.get_num_threads()}")
    if need_gb > 0.8 * free_gb:
        print("not enough disk space for one chunk; use --chunk or fewer files", file=sys.stderr)
        return 2
    results = {}
    try:
        for d, p in shapes:
            results[(d, p)] = run_shape(work, d, p, args)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    scale = 1000 / args.n_files
    print(f"{'shape':>9}  {'path':<11} {'s/1,000 files':>13} {'ms/file':>8} {'reading':>8} {'waited':>7} "
          f"{'scoring':>8} {'CSV/JSON':>8}  goal < {args.goal:g} s")
    for (d, p), totals in results.items():
        for path in PATHS:
            t = totals[path]
            per1000 = t["wall"] * scale
            print(f"{d:>4}x{p:<4}  {path:<11} {per1000:>13.1f} {1000 * t['wall'] / args.n_files:>8.1f} "
                  f"{100 * t['read'] / t['wall']:>7.0f}% {100 * t['read_wait'] / t['wall']:>6.0f}% "
                  f"{100 * t['score'] / t['wall']:>7.0f}% {100 * t['write'] / t['wall']:>7.0f}%  "
                  f"{'met' if per1000 < args.goal else 'NOT met'}")
        speed = totals["features"]["wall"] / totals["embeddings"]["wall"]
        print(f"{'':>9}  stored embeddings {speed:.2f}x faster than the features path")
    print("reading: seconds in the prefetch thread (overlaps scoring); waited: scoring idle for a read")
    d, p = shapes[0]
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    compare_paths(LinearProjection(d, p).eval().to(device), F.normalize(torch.randn(args.classes, p), dim=-1).to(device),
                  args.n_patches, d, args.seed, device)
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
