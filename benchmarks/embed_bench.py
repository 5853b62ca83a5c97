"""End-to-end embed throughput, with token refinement on and off, and how long the model waits for data.

Writes a tissue-covered SVS-layout slide, tiles it (256 px at 0.5 µm/px), then runs the
embed stage for each model and refinement setting (``--refine on off``: the model's keep
rate, or 1.0) and prints patches/s end to end, patches/s of the model alone (its compute
time: transfer, forward pass, copy back and the stored projection) and the share of wall time the main process
waited for the reader (DataLoader) instead of computing. Each timed run follows an untimed
warm-up on a small slide (CUDA kernels, allocator); with ``--repeats`` the order of the
settings alternates and the median is shown.

    python benchmarks/embed_bench.py [--models convlm_test convlm_vit_s16] [--workers 1]
    python benchmarks/embed_bench.py --device cuda --precision bf16 --models convlm_vit_b16 conch_v1 \
        --refine off on --size 32768 32768 --mpp 0.5 --workers 14 --batch-size 256
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _texture import Repeating

from wsi_pipeline.config import TilingConfig
from wsi_pipeline.embed.stage import EmbedConfig, EmbedSummary, embed_slides
from wsi_pipeline.slide.write import TileSource, write_slide
from wsi_pipeline.tiling.stage import tile_slides


def tissue_texture(period: int = 480) -> np.ndarray:
    """Pink/purple texture (all tissue), one period; the slide repeats it (see ``_texture``)."""
    yy, xx = np.mgrid[0:period, 0:period].astype(np.float32)
    v = np.sin(xx / 5.0) * np.cos(yy / 9.0) + 0.5 * np.sin((xx - yy) / 17.0)
    rgb = np.stack([205 + 25 * v, 120 + 45 * v, 175 + 25 * v], axis=-1)
    return rgb.clip(0, 255).astype(np.uint8)


def write_and_tile(folder: Path, size: tuple[int, int], mpp: float) -> tuple[Path, int, float]:
    """A tissue-covered SVS in ``folder/slides``, tiled into ``folder/out``: (out, patches, seconds)."""
    w, h = size
    slide = folder / "slides" / "bench.svs"
    slide.parent.mkdir(parents=True)
    t0 = time.perf_counter()
    write_slide(slide, TileSource(Repeating(tissue_texture(), w).read, w, h), mpp=mpp, layout="svs", tile_size=240)
    [res] = tile_slides([slide], folder / "out", TilingConfig(patch_size=256, target_mpp=0.5))
    return folder / "out", res.n_patches or 0, time.perf_counter() - t0


def keep_first(out: Path, n: int) -> None:
    """Keep the first ``n`` rows of the coords file (a few regions)."""
    import h5py

    with h5py.File(out / "coords" / "bench.h5", "a") as f:
        keep = f["coords"][:n]
        attrs = dict(f["coords"].attrs)
        del f["coords"]
        f.create_dataset("coords", data=keep)
        f["coords"].attrs.update(attrs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["convlm_test", "convlm_vit_s16"])
    ap.add_argument("--refine", nargs="+", choices=("on", "off"), default=["on"],
                    help="token refinement settings, side by side (default: on, the models' own keep rate)")
    ap.add_argument("--size", type=int, nargs=2, default=(8192, 8192), metavar=("W", "H"))
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per setting; the median is shown")
    ap.add_argument("--max-patches", type=int, default=0, help="cap patches per model (0: all)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        out, n_patches, seconds = write_and_tile(Path(tmp) / "bench", tuple(args.size), args.mpp)
        print(f"slide {args.size[0]}x{args.size[1]} px at {args.mpp} µm/px: {n_patches} patches, "
              f"written and tiled in {seconds:.1f} s")
        if args.max_patches and n_patches > args.max_patches:
            keep_first(out, args.max_patches)
        warm, _, _ = write_and_tile(Path(tmp) / "warm", (2048, 2048), args.mpp)
        dev = "cuda" if "cuda" in args.device or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
        print(f"{'model':<16} {'refine':<6} {'device':<6} {'prec':<5} {'patches':>8} {'patches/s':>10} "
              f"{'model only/s':>12} {'wait for data':>14}")
        prec = args.precision if args.precision != "auto" else ("bf16" if dev == "cuda" else "fp32")
        for name in args.models:
            runs: dict[str, list[EmbedSummary]] = {mode: [] for mode in args.refine}
            for rep in range(args.repeats):
                for mode in args.refine if rep % 2 == 0 else reversed(args.refine):
                    cfg = EmbedConfig(model=name, batch_size=args.batch_size, workers=args.workers, device=args.device,
                                      precision=args.precision, keep_rate=None if mode == "on" else 1.0,
                                      overwrite=True, random_init=True)  # speed does not depend on weights
                    embed_slides(warm, cfg)  # untimed warm-up
                    runs[mode].append(embed_slides(out, cfg))
            rates: dict[str, tuple[float, float]] = {}
            for mode, summaries in runs.items():
                r = [s.results[0] for s in summaries]
                if any(x.status != "ok" for x in r):
                    print(f"{name:<16} {mode:<6} failed: {next(x.reason for x in r if x.status != 'ok')}")
                    continue
                e2e = statistics.median(x.n_patches / x.seconds for x in r)
                model_only = statistics.median(x.n_patches / x.compute_seconds for x in r)
                share = statistics.median(x.data_wait_seconds / x.seconds for x in r)
                rates[mode] = (e2e, model_only)
                print(f"{name:<16} {mode:<6} {dev:<6} {prec:<5} {r[0].n_patches:>8} {e2e:>10.1f} {model_only:>12.1f} "
                      f"{share:>13.1%}")
            if len(rates) == 2:
                print(f"{name:<16} refinement on vs off: {rates['on'][0] / rates['off'][0]:.2f}x end to end, "
                      f"{rates['on'][1] / rates['off'][1]:.2f}x model only")


if __name__ == "__main__":
    main()
