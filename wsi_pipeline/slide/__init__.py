"""Slide I/O: one reader protocol, a registry of backends, normalised metadata.

>>> from wsi_pipeline.slide import open_slide
>>> with open_slide("slide.svs") as s:                      # doctest: +SKIP
...     tile = s.read_region((0, 0), 0, (256, 256))         # RGB uint8 (256, 256, 3)
"""

from . import _image, _openslide, _tiffslide  # noqa: F401  (register the backends)
from .base import SlideBackend, SlideInfo, register_backend, registered_backends
from .slide import Slide, open_slide

__all__ = ["Slide", "SlideBackend", "SlideInfo", "open_slide", "register_backend", "registered_backends"]
