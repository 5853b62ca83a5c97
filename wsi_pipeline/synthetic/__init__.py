"""Procedural H&E-like synthetic tissue: ROI patches and whole slides, deterministic by seed.

Four morphologies at physical scale (default 0.5 µm/px): three tumour classes and the
normal tissue they sit in.

- ``glandular`` — glands with open white lumens lined by one layer of columnar cells with
  basal, elongated nuclei, in pink stroma (adenocarcinoma-like);
- ``solid`` — solid sheets of large, pleomorphic, vesicular or hyperchromatic nuclei, little
  stroma, occasional mitoses;
- ``lymphoid`` — dense sheets of small, round, dark, uniform lymphocyte-like nuclei;
- ``stroma`` — pink wavy collagen with sparse spindle nuclei, fat (white round vacuoles) and
  small vessels.

>>> from wsi_pipeline.synthetic import render_roi, render_slide
>>> roi = render_roi("glandular", 256, seed=0)                          # doctest: +SKIP
>>> rgb, tissue, class_map = render_slide("solid", seed=1)              # doctest: +SKIP

Command line: ``python -m wsi_pipeline.synthetic --out DIR --slides 6 --rois 50 --seed 0``.
"""

from .dataset import DEFAULT_SLIDE_SIZE, SlideRecord, write_roi_dataset, write_slide_set
from .render import TISSUE_CLASSES, TUMOUR_CLASSES, render_roi, render_tissue
from .scene import Scene, build_scene, register_kind, registered_kinds
from .slide import GLASS, STROMA, TUMOUR, render_slide
from .stain import StainStyle

__all__ = [
    "DEFAULT_SLIDE_SIZE",
    "GLASS",
    "STROMA",
    "TISSUE_CLASSES",
    "TUMOUR",
    "TUMOUR_CLASSES",
    "Scene",
    "SlideRecord",
    "StainStyle",
    "build_scene",
    "register_kind",
    "registered_kinds",
    "render_roi",
    "render_slide",
    "render_tissue",
    "write_roi_dataset",
    "write_slide_set",
]
