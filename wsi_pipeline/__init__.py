"""wsi-pipeline: whole-slide-image tiling, ConVLM feature extraction and zero-shot subtyping."""

__version__ = "0.1.0"

__all__ = ["__version__"]
