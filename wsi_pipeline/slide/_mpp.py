"""Normalise physical resolution, objective power and vendor from slide properties.

One pure function, :func:`normalise_metadata`, shared by every backend. The lookup is
table-driven: each entry is ``(source name, parser)``; the first parser that returns a
valid value wins and its name is recorded as ``mpp_source``. Invalid, zero, NaN and
implausible values count as missing, as do the placeholder resolutions scanners and image
libraries write when they know nothing (unit "none", 72 or 96 dpi).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .base import SlideInfo

_logger = logging.getLogger(__name__)

#: Accepted µm/px range; outside it a value is treated as a placeholder or a unit error.
MPP_RANGE = (0.01, 100.0)
#: Pixels-per-inch values written by software that has no real resolution.
PLACEHOLDER_DPI = frozenset({72.0, 96.0})
#: µm per resolution unit, keyed by the TIFF ResolutionUnit value or its lower-case name.
_UM_PER_UNIT: dict[str, float] = {"2": 25400.0, "inch": 25400.0, "3": 1e4, "centimeter": 1e4, "centimetre": 1e4}

Properties = Mapping[str, str]
MppPair = tuple[float, float]


@dataclass(frozen=True)
class TiffResolution:
    """TIFF XResolution/YResolution (pixels per unit) and ResolutionUnit (1 none, 2 inch, 3 cm,
    or the names ``"none"``, ``"inch"``, ``"centimeter"``)."""

    x: float
    y: float
    unit: int | str


@dataclass(frozen=True)
class SlideMetadata:
    """The normalised fields of :class:`~wsi_pipeline.slide.base.SlideInfo`."""

    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str
    objective_power: float | None
    vendor: str | None


def parse_float(text: object) -> float | None:
    """A finite positive float, or ``None`` for anything else (garbage, 0, NaN, inf)."""
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _plausible(pair: MppPair | None) -> MppPair | None:
    if pair is None:
        return None
    lo, hi = MPP_RANGE
    return pair if all(lo <= v <= hi for v in pair) else None


def resolution_to_mpp(x: object, y: object, unit: object) -> MppPair | None:
    """µm/px from TIFF-style resolution values; ``None`` for unit "none" or placeholders."""
    um = _UM_PER_UNIT.get(str(unit).strip().lower())
    rx, ry = parse_float(x), parse_float(y)
    if um is None or rx is None or ry is None:
        return None
    if um == _UM_PER_UNIT["inch"] and (rx in PLACEHOLDER_DPI or ry in PLACEHOLDER_DPI):
        return None
    return _plausible((um / rx, um / ry))


# -- parsers: properties -> (mpp_x, mpp_y) | None ------------------------------------------
def _pair(key_x: str, key_y: str) -> Callable[[Properties], MppPair | None]:
    def parse(props: Properties) -> MppPair | None:
        x, y = parse_float(props.get(key_x)), parse_float(props.get(key_y, props.get(key_x)))
        return _plausible((x, y)) if x is not None and y is not None else None

    return parse


def _single(key: str) -> Callable[[Properties], MppPair | None]:
    def parse(props: Properties) -> MppPair | None:
        v = parse_float(props.get(key))
        return _plausible((v, v)) if v is not None else None

    return parse


def _resolution_props(prefix: str, default_unit: str | None) -> Callable[[Properties], MppPair | None]:
    """``<prefix>XResolution``/``YResolution``/``ResolutionUnit`` property triples."""

    def parse(props: Properties) -> MppPair | None:
        x = props.get(f"{prefix}XResolution")
        if x is None:
            return None
        unit = props.get(f"{prefix}ResolutionUnit", default_unit)
        return resolution_to_mpp(x, props.get(f"{prefix}YResolution", x), unit)

    return parse


#: Where µm/px may come from, most trusted first.
MPP_PARSERS: list[tuple[str, Callable[[Properties], MppPair | None]]] = [
    ("openslide.mpp-x", _pair("openslide.mpp-x", "openslide.mpp-y")),
    ("tiffslide.mpp-x", _pair("tiffslide.mpp-x", "tiffslide.mpp-y")),
    ("aperio.MPP", _single("aperio.MPP")),
    ("openslide.mirax.MPP", _single("openslide.mirax.MPP")),
    # NDPI stores its resolution as pixels per centimetre
    ("hamamatsu.XResolution", _resolution_props("hamamatsu.", "centimeter")),
    ("tiff.XResolution", _resolution_props("tiff.", None)),
]

#: Where the objective power may come from, most trusted first.
OBJECTIVE_KEYS: list[tuple[str, Callable[[object], float | None]]] = [
    ("openslide.objective-power", parse_float),
    ("aperio.AppMag", parse_float),
    ("tiffslide.objective-power", parse_float),
    ("hamamatsu.SourceLens", parse_float),
]

VENDOR_KEYS = ("openslide.vendor", "tiffslide.vendor")

#: Properties that name a slide inside its container format, kept as ``SlideInfo.identifiers``
#: (DICOM: the series, the physical slide's barcode, the study).
IDENTIFIER_KEYS = ("dicom.SeriesInstanceUID", "dicom.ContainerIdentifier", "dicom.StudyInstanceUID")


def normalise_metadata(properties: Properties, resolution: TiffResolution | None = None) -> SlideMetadata:
    """Resolution, objective power and vendor from a properties dict (+ optional TIFF tags).

    Parameters
    ----------
    properties : backend properties (``openslide.*``, ``aperio.*``, ``tiffslide.*``...).
    resolution : TIFF resolution tags of level 0, used when no property gives the mpp.
    """
    mpp: MppPair | None = None
    source = "none"
    for name, parser in MPP_PARSERS:
        mpp = parser(properties)
        if mpp is not None:
            source = name
            break
    if mpp is None and resolution is not None:
        mpp = resolution_to_mpp(resolution.x, resolution.y, resolution.unit)
        source = "tiff.XResolution" if mpp is not None else "none"
    objective = next(
        (v for key, parse in OBJECTIVE_KEYS if (v := parse(properties.get(key))) is not None), None
    )
    vendor = next((str(properties[k]) for k in VENDOR_KEYS if properties.get(k)), None)
    if mpp is None:
        _logger.debug("no physical resolution in %d properties", len(properties))
    return SlideMetadata(
        mpp_x=mpp[0] if mpp else None,
        mpp_y=mpp[1] if mpp else None,
        mpp_source=source,
        objective_power=objective,
        vendor=vendor,
    )


def build_slide_info(
    path: str,
    backend: str,
    backend_version: str,
    level_dimensions: Sequence[tuple[int, int]],
    level_downsamples: Sequence[float],
    properties: Mapping[str, object],
    resolution: TiffResolution | None = None,
) -> SlideInfo:
    """The :class:`SlideInfo` of a backend handle: levels as given, the rest normalised."""
    props = {str(k): str(v) for k, v in properties.items() if v is not None}
    meta = normalise_metadata(props, resolution)
    return SlideInfo(
        path=path,
        backend=backend,
        backend_version=backend_version,
        level_dimensions=tuple((int(w), int(h)) for w, h in level_dimensions),
        level_downsamples=tuple(float(d) for d in level_downsamples),
        mpp_x=meta.mpp_x,
        mpp_y=meta.mpp_y,
        mpp_source=meta.mpp_source,
        objective_power=meta.objective_power,
        vendor=meta.vendor,
        properties=props,
        identifiers={k: props[k] for k in IDENTIFIER_KEYS if props.get(k)},
    )


__all__ = ["IDENTIFIER_KEYS", "MPP_PARSERS", "SlideMetadata", "TiffResolution", "build_slide_info", "normalise_metadata",
           "parse_float", "resolution_to_mpp"]
