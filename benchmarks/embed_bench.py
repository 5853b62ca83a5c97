"""End-to-end embed throughput and how long the model waits for data.

Writes a tissue-covered SVS-layout slide, tiles it (256 px at 0.5 µm/px), then runs the
embed stage for each model and prints patches/s and the share of wall time the main
process spent waiting for the reader (DataLoader) instead of computing.

    python benchmarks/embed_bench.py [--models convlm_test convlm_vit_s16] [--workers 1]
    python benchmarks/embed_bench.py --device cuda --precision bf16 --models convlm_vit_b16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_pipeline.config import TilingConfig
from wsi_pipeline.embed.runner import EmbedConfig, embed_slides
from wsi_pipeline.slide.write import TileSource, write_slide
from wsi_pipeline.tiling.stage import tile_slides


def tissue(x: int, y: int, w: int, h: int) -> np.ndarray:
    """Pink/purple texture everywhere (all tissue), cheap to compute."""
    yy, xx = np.mgrid[y : y + h, x : x + w].astype(np.float32)
    v = np.sin(xx / 5.0) * np.cos(yy / 9.0) + 0.5 * np.sin((xx - yy) / 17.0)
    rgb = np.stack([205 + 25 * v, 120 + 45 * v, 175 + 25 * v], axis=-1)
    return rgb.clip(0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["convlm_test", "convlm_vit_s16"])
    ap.add_argument("--size", type=int, nargs=2, default=(8192, 8192), metavar=("W", "H"))
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--max-patches", type=int, default=0, help="cap patches per model (0: all)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slide = tmp / "slides" / "bench.svs"
        slide.parent.mkdir()
        w, h = args.size
        write_slide(slide, TileSource(tissue, w, h), mpp=args.mpp, layout="svs", tile_size=240)
        out = tmp / "out"
        t0 = time.perf_counter()
        [res] = tile_slides([slide], out, TilingConfig(patch_size=256, target_mpp=0.5))
        print(f"slide {w}x{h} px at {args.mpp} µm/px: {res.n_patches} patches, tiled in {time.perf_counter() - t0:.1f} s")
        if args.max_patches and res.n_patches > args.max_patches:
            import h5py

            with h5py.File(out / "coords" / "bench.h5", "a") as f:  # keep the first rows (a few regions)
                keep = f["coords"][: args.max_patches]
                attrs = dict(f["coords"].attrs)
                del f["coords"]
                f.create_dataset("coords", data=keep)
                f["coords"].attrs.update(attrs)
        print(f"{'model':<18} {'device':<7} {'prec':<5} {'patches':>8} {'patches/s':>10} {'wait for data':>14}")
        for name in args.models:
            cfg = EmbedConfig(model=name, batch_size=args.batch_size, workers=args.workers, device=args.device,
                              precision=args.precision, overwrite=True)
            summary = embed_slides(out, cfg)
            r = summary.results[0]
            if r.status != "ok":
                print(f"{name:<18} failed: {r.reason}")
                continue
            rate = r.n_patches / r.seconds
            share = summary.data_wait_seconds / r.seconds
            dev = "cuda" if "cuda" in args.device or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
            prec = cfg.precision if cfg.precision != "auto" else ("bf16" if dev == "cuda" else "fp32")
            print(f"{name:<18} {dev:<7} {prec:<5} {r.n_patches:>8} {rate:>10.1f} {share:>13.1%}")


if __name__ == "__main__":
    main()
