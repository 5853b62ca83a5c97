"""Inputs of the ``classify`` stage: expand folders and list files, tell ROI images from slides.

ROI images (PNG/JPEG crops, e.g. exported regions of interest) go through the same tile →
embed → score path as whole slides, with two differences decided here (see
:func:`roi_tiling_config`): an ROI without a physical resolution is taken to be *at the
target resolution already* (tiled 1:1 on its own pixel grid, never resampled), and tissue
segmentation is adapted to a small, mostly-tissue image (finer segmentation resolution,
fixed low saturation threshold, no area filters sized for whole slides).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from ..config import TilingConfig
from ..inputs import collect_inputs, slide_extensions

_logger = logging.getLogger(__name__)

#: Extensions treated as ROI images (a TIFF is treated as a slide: it may be pyramidal).
ROI_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})


def is_roi_image(path: str | os.PathLike[str]) -> bool:
    """``True`` for PNG/JPEG files (ROI images), ``False`` for slide formats."""
    return Path(path).suffix.lower() in ROI_EXTENSIONS


def roi_tiling_config(tiling: TilingConfig) -> TilingConfig:
    """The tiling settings used for ROI images.

    * No mpp in the file and no ``--default-mpp``: the ROI is assumed to be at
      ``target_mpp`` already, so its pixels are tiled 1:1 (each image at its own
      resolution). An ``--mpp-csv`` entry or a real resolution in the file still wins.
    * Segmentation runs at ``2 * target_mpp`` (at most ``seg_level_mpp``): an ROI is a few
      hundred µm wide, which is only a handful of pixels at the whole-slide 8 µm/px.
    * A fixed saturation threshold (``otsu_floor``, CLAM's default 8) instead of Otsu: an ROI
      is mostly tissue, and Otsu would split the tissue itself into two classes.
    * ``min_tissue_area`` and ``min_hole_area`` are 0: an ROI is a curated crop and may be
      smaller than the debris threshold of a whole slide.
    * ``pad_small_images``: an ROI side shorter than one patch (e.g. a 224 px crop with
      256 px patches) gets one patch at 0, padded with white, instead of no patch at all.
    """
    default_mpp = tiling.default_mpp if tiling.default_mpp is not None else tiling.target_mpp
    return dataclasses.replace(
        tiling, default_mpp=default_mpp, seg_level_mpp=min(tiling.seg_level_mpp, 2.0 * tiling.target_mpp),
        threshold=tiling.otsu_floor, min_tissue_area=0.0, min_hole_area=0.0, pad_small_images=True,
    )


__all__ = ["ROI_EXTENSIONS", "collect_inputs", "is_roi_image", "roi_tiling_config", "slide_extensions"]
