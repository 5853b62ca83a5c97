"""``python -m wsi_pipeline.synthetic --out DIR --slides 6 --rois 50 --seed 0``.

Writes ``DIR/slides/`` (SVS slides, ``labels.csv``, ``truth/``) and ``DIR/rois/``
(``<class>/<i>.png``, ``labels.csv``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ..errors import WsiPipelineError
from .dataset import DEFAULT_SLIDE_SIZE, write_roi_dataset, write_slide_set
from .render import TISSUE_CLASSES, TUMOUR_CLASSES


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 6144x4608, got {text!r}") from None
    return w, h


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsi_pipeline.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--slides", type=int, default=6,
                        help=f"number of slides, a multiple of {len(TUMOUR_CLASSES)} (0 = none)")
    parser.add_argument("--rois", type=int, default=50, help="ROI patches per class (0 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=_size, default=DEFAULT_SLIDE_SIZE, help="slide WIDTHxHEIGHT in px")
    parser.add_argument("--roi-size", type=int, default=256)
    parser.add_argument("--mpp", type=float, default=0.5, help="µm per pixel")
    parser.add_argument("--workers", type=int, default=1, help="slides rendered in parallel")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.slides % len(TUMOUR_CLASSES) or args.slides < 0:
        parser.error(f"--slides must be a non-negative multiple of {len(TUMOUR_CLASSES)}, got {args.slides}")
    if args.rois < 0:
        parser.error(f"--rois must be non-negative, got {args.rois}")
    t0 = time.perf_counter()
    try:
        if args.slides:
            path = write_slide_set(args.out / "slides", TUMOUR_CLASSES, args.slides // len(TUMOUR_CLASSES),
                                   seed=args.seed, size=args.size, mpp=args.mpp, workers=args.workers)
            print(f"slides: {path}")
        if args.rois:
            path = write_roi_dataset(args.out / "rois", TISSUE_CLASSES, args.rois, size=args.roi_size,
                                     seed=args.seed, mpp=args.mpp)
            print(f"rois:   {path}")
    except WsiPipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
