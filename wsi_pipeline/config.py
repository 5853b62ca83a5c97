"""Tiling options: one frozen dataclass, loadable from a YAML preset and merged with CLI flags.

A preset (shipped in ``wsi_pipeline/resources/tiling/``, linked from ``configs/tiling/``) is a
flat mapping whose keys are the field names of :class:`TilingConfig` (``-`` and ``_`` are
interchangeable; ``mag: 20`` is accepted as an alias of ``target_mpp: 0.5``): a run config
(:mod:`wsi_pipeline.runconfig`) with tiling keys only. Flags given on the command line win
over the preset, the preset wins over the defaults::

    cfg = TilingConfig.from_yaml("configs/tiling/20x_256.yaml").merge({"min_tissue": 0.5})

Units: ``target_mpp`` and ``seg_level_mpp`` in µm/px; ``min_tissue_area`` and
``min_hole_area`` in µm² (physical, so the same preset works for 20× and 40× slides);
``median_size`` and ``close_size`` in pixels of the segmentation image (≈ ``seg_level_mpp``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .userfiles import read_csv_table, read_text, where

_logger = logging.getLogger(__name__)


def mag_to_mpp(mag: float) -> float:
    """Objective magnification → µm/px by the convention 10× ≙ 1 µm/px (20× → 0.5)."""
    if not _positive(mag) or not MPP_RANGE[0] <= 10.0 / float(mag) <= MPP_RANGE[1]:
        raise ConfigError(f"magnification must be a number in {10 / MPP_RANGE[1]:g}..{10 / MPP_RANGE[0]:g}, "
                          f"got {mag!r}")
    return 10.0 / float(mag)


@dataclass(frozen=True)
class SegmentationParams:
    """Tissue-segmentation settings (see :func:`wsi_pipeline.tiling.tissue.segment_tissue`).

    Defaults and why:

    - ``threshold="otsu"``: the saturation threshold adapts to stain intensity (Otsu on
      log(1 + S), see :mod:`wsi_pipeline.tiling.tissue`); it never goes below
      ``otsu_floor`` = 8 (CLAM's fixed default), so that on a blank slide Otsu cannot split
      JPEG noise into "tissue". Relative to the glass, glass sits at 0, and on the demo and
      hard test slides Otsu lands below the floor: 8 (an OD spread of 0.03) decides there.
    - ``median_size=7`` px (≈ 56 µm at 8 µm/px): removes dust and JPEG speckle (CLAM, wsinfer).
    - ``close_size=5`` px (≈ 40 µm): bridges thin gaps inside one fragment (CLAM uses 4).
    - ``min_tissue_area=40000`` µm² (a 200 µm square, as in wsinfer): smaller specks are
      debris, and hold fewer than three 128 µm patches anyway.
    - ``min_hole_area=16000`` µm² (≈ one 20×/256 px patch, 128 µm square): smaller holes
      cannot empty a patch, so they are filled (glands and vessels larger than that stay).
    - ``black_value=40`` / ``grey_spread=8``: pixels darker than V=40 (scanner borders,
      black ink) or with max−min ≤ 8 (grey shadows, debris, slide edges) are never
      tissue: dark pixels have a high HSV saturation from noise alone. Both apply to the
      picture white-balanced to the glass, where glass has max−min ≤ 6 (99.9th percentile
      at 8 µm/px on the demo slides and the hard test slides; 10 in the dimmed corners of
      the fall-off one); 12, the value before white balancing, had to absorb the glass's
      own tint and drops a tenth of the pixels of 60 %-faded eosin.
    - ``background="auto"``: the glass colour is estimated per slide (median colour of the
      brightest 2 % of the pixels, see :func:`wsi_pipeline.tiling.tissue.estimate_glass`)
      and saturation is measured relative to it, so tinted glass and a neutral
      illumination fall-off are not tissue.
      ``"white"`` assumes white glass (the plain saturation of earlier versions);
      ``"#rrggbb"`` (quoted in YAML) fixes the glass colour, e.g. per slide in a
      ``--slide-params`` CSV when a slide has no glass to estimate it from.
    - ``reject_ink=True``: green, cyan and blue marker ink (hue 75°–225°, which H&E never
      is) and black ink (dark and nearly neutral) are not tissue. Set it to false for
      stains other than H&E whose colours fall in that band.
    """

    threshold: str | int = "otsu"
    otsu_floor: int = 8
    median_size: int = 7
    close_size: int = 5
    min_tissue_area: float = 40_000.0
    min_hole_area: float = 16_000.0
    black_value: int = 40
    grey_spread: int = 8
    background: str = "auto"
    reject_ink: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "background", _check_background(self.background))
        if not isinstance(self.reject_ink, bool):
            raise ConfigError(f"reject_ink must be true or false, got {self.reject_ink!r}")
        t = self.threshold
        if isinstance(t, str):
            if t.strip().lower() == "otsu":
                object.__setattr__(self, "threshold", "otsu")
            elif t.strip().isdigit():
                object.__setattr__(self, "threshold", int(t.strip()))
            else:
                raise ConfigError(f"threshold must be 'otsu' or an integer 0..255, got {t!r}")
        if isinstance(self.threshold, bool) or (
            isinstance(self.threshold, int) and not 0 <= self.threshold <= 255
        ):
            raise ConfigError(f"threshold must be 'otsu' or an integer 0..255, got {t!r}")
        for name in ("otsu_floor", "black_value", "grey_spread"):
            _check_int(name, getattr(self, name), 0, 255)
        for name in ("median_size", "close_size"):
            _check_int(name, getattr(self, name), 1, 255)
        if self.median_size % 2 == 0:
            raise ConfigError(f"median_size must be odd, got {self.median_size}")
        for name in ("min_tissue_area", "min_hole_area"):
            v = getattr(self, name)
            if not _number(v) or v < 0:
                raise ConfigError(f"{name} must be a number ≥ 0 (µm²), got {v!r}")


@dataclass(frozen=True)
class TilingConfig:
    """Everything that decides a slide's patch grid.

    ``target_mpp`` 0.5 (≈20×) and ``patch_size`` 256 are the conventions of the public
    pathology encoders; ``overlap`` is a fraction of the patch (0 = adjacent patches);
    ``min_tissue`` is the tissue fraction a patch needs (0.25: a quarter of the patch,
    so that tissue borders are covered without keeping mostly-glass patches; 0 keeps
    every patch that touches tissue). ``mpp_csv``/``default_mpp`` supply the resolution
    of slides that lack it (the CSV also overrides a wrong value in the file).
    ``pad_small_images`` (set for ROI images by ``classify``): an image side shorter than one
    patch gets one patch at 0, padded with white, instead of no patch. ``slide_params`` is a
    CSV of per-slide segmentation settings (:func:`load_slide_params`). ``max_upsample``: a
    slide scanned coarser than ``target_mpp`` has its patches upsampled by ``mpp / target_mpp``
    (a 20× scan tiled at 40×: 2); ``None`` allows any factor with a warning per slide, a number
    ≥ 1 refuses slides above it (1: never upsample). Within 5 % nothing counts as upsampling.
    """

    target_mpp: float = 0.5
    patch_size: int = 256
    overlap: float = 0.0
    min_tissue: float = 0.25
    seg_level_mpp: float = 8.0
    threshold: str | int = "otsu"
    otsu_floor: int = 8
    median_size: int = 7
    close_size: int = 5
    min_tissue_area: float = 40_000.0
    min_hole_area: float = 16_000.0
    black_value: int = 40
    grey_spread: int = 8
    background: str = "auto"
    reject_ink: bool = True
    backend: str = "auto"
    mpp_csv: str | None = None
    default_mpp: float | None = None
    thumbnail_max_side: int = 1024
    pad_small_images: bool = False
    slide_params: str | None = None
    max_upsample: float | None = None

    def __post_init__(self) -> None:
        check_mpp("target_mpp", self.target_mpp)
        _check_int("patch_size", self.patch_size, 8, 16384)
        if not _number(self.overlap) or not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap must be a fraction in [0, 1), got {self.overlap!r}")
        if not _number(self.min_tissue) or not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"min_tissue must be a fraction in [0, 1], got {self.min_tissue!r}")
        check_mpp("seg_level_mpp", self.seg_level_mpp)
        if self.default_mpp is not None:
            check_mpp("default_mpp", self.default_mpp)
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError(f"backend must be a name such as 'auto', got {self.backend!r}")
        _check_int("thumbnail_max_side", self.thumbnail_max_side, 64, 16384)
        if self.max_upsample is not None and not (_number(self.max_upsample) and self.max_upsample >= 1.0):
            raise ConfigError(f"max_upsample must be a number ≥ 1 (1: never upsample), got {self.max_upsample!r}")
        if not isinstance(self.pad_small_images, bool):
            raise ConfigError(f"pad_small_images must be true or false, got {self.pad_small_images!r}")
        seg = self.segmentation  # validates the segmentation fields
        object.__setattr__(self, "threshold", seg.threshold)
        object.__setattr__(self, "background", seg.background)
        for name in _FLOAT_FIELDS:  # 40000 and 40000.0 are the same setting
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def segmentation(self) -> SegmentationParams:
        names = {f.name for f in fields(SegmentationParams)}
        return SegmentationParams(**{n: getattr(self, n) for n in names})

    @property
    def target_magnification(self) -> float:
        return 10.0 / self.target_mpp

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> TilingConfig:
        """Defaults overridden by a YAML preset; unknown keys raise :class:`ConfigError`."""
        return cls().merge(load_yaml_options(path))

    def merge(self, overrides: Mapping[str, Any]) -> TilingConfig:
        """A copy with ``overrides`` applied (``mag`` is turned into ``target_mpp``)."""
        values = normalise_keys(overrides, source="options")
        if "mag" in values:
            mag = values.pop("mag")
            if "target_mpp" in values:
                raise ConfigError("give either target_mpp or mag, not both")
            values["target_mpp"] = mag_to_mpp(mag)
        return dataclasses.replace(self, **values)

    def signature(self) -> dict[str, Any]:
        """The settings that decide the output (used to tell whether a rerun must redo a slide)."""
        d = dataclasses.asdict(self)
        for k in ("backend", "mpp_csv", "default_mpp", "thumbnail_max_side", "slide_params", "max_upsample"):
            d.pop(k)
        return d


_FLOAT_FIELDS = ("target_mpp", "overlap", "min_tissue", "seg_level_mpp", "min_tissue_area", "min_hole_area",
                 "default_mpp", "max_upsample")


def option_key(name: Any) -> str:
    """``"min-tissue"`` → ``"min_tissue"``: the form option keys of config files are compared in."""
    return str(name).strip().replace("-", "_")


def normalise_keys(options: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """``min-tissue`` → ``min_tissue``; unknown keys raise :class:`ConfigError` naming them."""
    known = {f.name for f in fields(TilingConfig)} | {"mag"}
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = option_key(key)
        if name not in known:
            raise ConfigError(
                f"{source}: unknown tiling option {key!r} (known: {', '.join(sorted(known))})"
            )
        out[name] = value
    return out


def read_yaml_mapping(path: str | os.PathLike[str]) -> dict[Any, Any]:
    """A config file's flat YAML mapping ``option: value`` as read (keys not checked; empty file: ``{}``)."""
    import yaml

    p = Path(path)
    text = read_text(p, "config")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config {p} is not valid YAML{where}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must be a mapping of option: value, got {type(data).__name__}")
    return data


def load_yaml_options(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a flat YAML mapping of tiling options (a tiling preset), checking every key."""
    return normalise_keys(read_yaml_mapping(path), source=f"config {Path(path)}")


def load_mpp_csv(path: str | os.PathLike[str]) -> dict[str, float]:
    """Read a ``slide,mpp`` CSV (header required) → slide key → µm/px.

    The ``slide`` column may hold a slide id (file name without extension) or a file
    name; both are accepted as keys when looking a slide up.
    """
    p = Path(path)
    out: dict[str, float] = {}
    for lineno, row in read_csv_table(p, "mpp CSV", ("slide", "mpp")):
        key, raw, at = row["slide"], row["mpp"], where("mpp CSV", p, lineno)
        if not key:
            raise ConfigError(f"{at}: empty slide name")
        try:
            mpp = float(raw)
        except ValueError:
            raise ConfigError(f"{at}: mpp {raw!r} is not a number") from None
        try:
            check_mpp("mpp", mpp)
        except ConfigError as e:
            raise ConfigError(f"{at}: {e}") from None
        if key in out and not math.isclose(out[key], mpp):
            raise ConfigError(f"{at}: slide {key!r} is listed twice")
        out[key] = mpp
    _logger.debug("read %d mpp overrides from %s", len(out), p)
    return out


#: Settings a ``--slide-params`` CSV may change per slide: segmentation and the tissue rule.
#: (Patch geometry stays the same for the whole cohort, so features stay comparable.)
PER_SLIDE_OPTIONS = ("min_tissue", "seg_level_mpp", "threshold", "otsu_floor", "median_size", "close_size",
                     "min_tissue_area", "min_hole_area", "black_value", "grey_spread", "background", "reject_ink")


def load_slide_params(path: str | os.PathLike[str], base: TilingConfig) -> dict[str, dict[str, Any]]:
    """Read a ``slide,<option>,…`` CSV of per-slide settings → slide key → overrides.

    Columns are ``slide`` (an id or a file name, as in the mpp CSV) and any of
    :data:`PER_SLIDE_OPTIONS`; an empty cell keeps the run's value. Every row is checked by
    applying it to ``base``, so a bad value fails here, with its line, before any work.
    """
    p = Path(path)
    out: dict[str, dict[str, Any]] = {}
    types = {f.name: type(getattr(base, f.name)) for f in fields(TilingConfig)}
    for lineno, row in read_csv_table(p, "slide params CSV", ("slide",), optional=PER_SLIDE_OPTIONS):
        at = where("slide params CSV", p, lineno)
        key = row.pop("slide")
        if not key:
            raise ConfigError(f"{at}: empty slide name")
        if key in out:
            raise ConfigError(f"{at}: slide {key!r} is listed twice")
        values: dict[str, Any] = {}
        for name, text in row.items():
            if not text:
                continue
            if name in ("threshold", "background"):  # text, checked by SegmentationParams
                values[name] = text
                continue
            if name == "reject_ink":
                values[name] = _BOOLS.get(text.strip().lower(), text)  # anything else fails the check below
                continue
            try:
                values[name] = int(text) if types[name] is int else float(text)
            except ValueError:
                kind = "an integer" if types[name] is int else "a number"
                raise ConfigError(f"{at}: {name} {text!r} is not {kind}") from None
        try:
            base.merge(values)
        except ConfigError as e:
            raise ConfigError(f"{at}: {e}") from None
        out[key] = values
    _logger.debug("read per-slide settings of %d slides from %s", len(out), p)
    return out


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _check_background(v: Any) -> str:
    """``auto``, ``white`` or ``#rrggbb`` (normalised to lower case); :class:`ConfigError` otherwise."""
    text = v.strip().lower() if isinstance(v, str) else ""
    if text in ("auto", "white") or re.fullmatch(r"#[0-9a-f]{6}", text):
        return text
    raise ConfigError(f"background must be auto, white or a '#rrggbb' colour (quoted in YAML), got {v!r}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


#: Resolutions (µm/px) a setting or a slide may have: 1 nm to 1 mm per pixel, far beyond any
#: scanner either way, but inside what the geometry can hold (a patch's level-0 size in int64).
MPP_RANGE = (1e-3, 1e3)


def check_mpp(name: str, v: Any) -> None:
    """:class:`ConfigError` unless ``v`` is a resolution in :data:`MPP_RANGE` (µm/px)."""
    if not _number(v) or not MPP_RANGE[0] <= v <= MPP_RANGE[1]:
        raise ConfigError(f"{name} must be a resolution in {MPP_RANGE[0]:g}..{MPP_RANGE[1]:g} µm/px, got {v!r}")


def _check_int(name: str, v: Any, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{name} must be an integer in {lo}..{hi}, got {v!r}")


__all__ = [
    "MPP_RANGE",
    "check_mpp",
    "SegmentationParams",
    "TilingConfig",
    "load_mpp_csv",
    "load_yaml_options",
    "mag_to_mpp",
    "normalise_keys",
    "option_key",
    "read_yaml_mapping",
]
