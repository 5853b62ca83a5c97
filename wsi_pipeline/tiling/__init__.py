"""Tissue segmentation, the patch grid and the ``tile`` stage.

>>> from wsi_pipeline.tiling import tile_slides                       # doctest: +SKIP
>>> results = tile_slides(["a.svs"], "out/", TilingConfig())          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__all__ = ["TileResult", "tile_slide", "tile_slides"]


def __getattr__(name: str) -> Any:  # lazy: keep `import wsi_pipeline.tiling.tissue` light
    if name in __all__:
        from . import stage

        return getattr(stage, name)
    raise AttributeError(name)
