"""Throughput of the ConVLM ViT with and without EViT token refinement, measured side by side.

Both modes run the same model on the same batch. Repeats are interleaved (the order
alternates every repeat) after a warm-up, and the median is reported. The analytic FLOPs
ratio (counted as multiply-accumulates, as papers do) comes from the token schedule.

    python benchmarks/refinement_bench.py                      # ViT-S/16 @224, CPU, 2 threads
    python benchmarks/refinement_bench.py --arch b16           # ViT-B/16
    python benchmarks/refinement_bench.py --device cuda --precision bf16 --batch 128
    python benchmarks/refinement_bench.py --model conch_v1 --batch 4   # a registered model (CONCH: 448 px, 785 tokens)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from wsi_pipeline.model import create_model  # noqa: E402
from wsi_pipeline.model.config import get_config  # noqa: E402
from wsi_pipeline.model.convlm import ViTConVLM  # noqa: E402
from wsi_pipeline.model.refine import token_schedule  # noqa: E402

ARCHS = {  # vision towers at 224 px, patch 16
    "s16": {"width": 384, "layers": 12, "heads": 6, "label": "ViT-S/16"},
    "b16": {"width": 768, "layers": 12, "heads": 12, "label": "ViT-B/16"},
    "l16": {"width": 1024, "layers": 24, "heads": 16, "label": "ViT-L/16"},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(arch: str, image_size: int, layers: tuple[int, ...]) -> ViTConVLM:
    """A randomly initialised ConVLM with the chosen vision tower and a minimal text tower."""
    a = ARCHS[arch]
    cfg = get_config("convlm_vit_b16")
    cfg["vision_cfg"].update(width=a["width"], layers=a["layers"], heads=a["heads"], image_size=image_size)
    cfg["preprocess"]["input_size"] = image_size
    cfg["text_cfg"].update(width=64, heads=1, layers=1, vocab_size=1000)
    cfg["refine"].update(layers=list(layers), context_hidden=a["width"])
    torch.manual_seed(0)
    return ViTConVLM(f"bench_{arch}", cfg).eval()


def block_macs(n_attn: int, n_mlp: int, d: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-accumulates of one block: qkv, QKᵀ, AV and proj on ``n_attn`` tokens, MLP on ``n_mlp``."""
    attn = 3 * n_attn * d * d + 2 * n_attn * n_attn * d + n_attn * d * d
    mlp = 2 * n_mlp * d * int(d * mlp_ratio)
    return float(attn + mlp)


def vit_macs(num_patches: int, depth: int, d: int, patch: int, keep: float, layers: tuple[int, ...]) -> float:
    """Analytic MACs per image (patch embedding plus blocks; norms, softmax and GELU ignored).

    Papers quote these as "FLOPs": DeiT-S 4.6 G, DeiT-B 17.6 G, EViT-B/0.7 11.6 G.
    """
    embed = float(num_patches * 3 * patch * patch * d)
    return embed + sum(block_macs(a, m, d) for a, m in token_schedule(num_patches, depth, keep, layers))


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call (CUDA work is synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - w0, time.process_time() - c0


def run(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    layers = tuple(args.layers)
    if args.model:  # a registered model at its own input size (random init: speed does not depend on weights)
        torch.manual_seed(0)
        model = create_model(args.model, device=str(device))
        a = {"width": model.width, "layers": model.depth, "label": f"{args.model} (ViT width {model.width})"}
        args.image_size, patch = model.input_size, model.patch_size
    else:
        model = build(args.arch, args.image_size, layers).to(device)
        a, patch = ARCHS[args.arch], 16
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=DTYPES[args.precision])
        if args.precision != "fp32"
        else torch.autocast(device_type=device.type, enabled=False)
    )
    modes = {
        "unrefined": lambda: model.encode_image(x, keep_rate=1.0),
        "refined": lambda: model.encode_image(x, keep_rate=args.keep, refine_layers=layers),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    with torch.inference_mode(), autocast:
        for _ in range(args.warmup):
            for fn in modes.values():
                fn()
        for r in range(args.repeats):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            for m in order:
                wall, proc = timed(modes[m], device)
                times[m].append(wall)
                cpu[m].append(proc)

    grid = args.image_size // patch
    sched = token_schedule(grid * grid, a["layers"], args.keep, layers)
    macs = {
        "unrefined": vit_macs(grid * grid, a["layers"], a["width"], patch, 1.0, ()),
        "refined": vit_macs(grid * grid, a["layers"], a["width"], patch, args.keep, layers),
    }
    med = {m: statistics.median(t) for m, t in times.items()}
    med_cpu = {m: statistics.median(t) for m, t in cpu.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{a['label']} @{args.image_size}px, batch {args.batch}, {device.type} {args.precision}, "
        f"threads {torch.get_num_threads()}, keep {args.keep:g} at blocks {layers}, "
        f"{args.warmup} warm-up + {args.repeats} interleaved repeats, load average {load:.1f}"
    )
    print("tokens after each block: " + " ".join(str(s[1]) for s in sched))
    print(
        f"{'mode':<10} {'img/s (median)':>15} {'min..max img/s':>16} {'ms/batch':>9} "
        f"{'CPU-s/batch':>12} {'GMACs/img':>10}"
    )
    for m in modes:
        ips = [args.batch / t for t in times[m]]
        print(
            f"{m:<10} {args.batch / med[m]:>15.1f} {min(ips):>7.1f}..{max(ips):<7.1f} "
            f"{1000 * med[m]:>9.1f} {med_cpu[m]:>12.2f} {macs[m] / 1e9:>10.2f}"
        )
    speedup = med["unrefined"] / med["refined"]
    cpu_speedup = med_cpu["unrefined"] / med_cpu["refined"]
    ratio = macs["refined"] / macs["unrefined"]
    print(
        f"speed-up: wall {speedup:.2f}x, CPU time {cpu_speedup:.2f}x; analytic FLOPs (MACs) ratio {ratio:.3f} "
        f"(ideal {1 / ratio:.2f}x); goal >= {args.goal:.2f}x (wall): {'met' if speedup >= args.goal else 'NOT met'}"
    )
    if device.type == "cpu" and load > os.cpu_count():
        print(
            f"note: load average {load:.1f} > {os.cpu_count()} cores; wall times are contended, CPU time is steadier"
        )
    return {"speedup": speedup, "cpu_speedup": cpu_speedup, "flops_ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="s16")
    p.add_argument("--model", default=None, help="A registered model instead of --arch (e.g. conch_v1)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--goal", type=float, default=1.45)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
