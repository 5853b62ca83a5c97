"""The ``tile`` stage: slides in, coords h5 + thumbnail + tissue GeoJSON + status rows out.

>>> results = tile_slides(["a.svs", "b.tif"], "out/", TilingConfig(min_tissue=0.5))  # doctest: +SKIP

Per slide (:class:`TileWorker`, mapped over the slides by the ``local`` or ``ray``
executor): take the slide's lock (``out/locks/tile/<id>.lock``; a live holder → ``skipped``)
→ open → resolve mpp (file, ``--mpp-csv``, ``--default-mpp``; anisotropic pixels are refused)
→ refuse upsampling beyond ``max_upsample`` → skip when the existing outputs validate for the
same settings and the same slide file (its content fingerprint, see
:mod:`~wsi_pipeline.slide.fingerprint`) → refuse a picture no real slide needs → read a
≈8 µm/px picture in chunks → segment tissue → global grid → write thumbnail, GeoJSON and
finally the coords file (the resume marker), each through a temporary file and a rename.
Every per-slide problem becomes a ``failed`` status row and one log line; the batch goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..config import TilingConfig, check_mpp, load_mpp_csv, load_slide_params
from ..errors import ConfigError, MissingMppError, SlideError
from ..progress import NullProgress, Progress
from ..runtime.executor import RuntimeConfig, WorkerSpec, absolute, make_executor
from ..runtime.locks import DEFAULT_LOCK_TIMEOUT_S, SlideLocks
from ..runtime.perslide import SlideStep, worker_died
from ..slide.base import SlideInfo, is_finite_positive
from ..store.atomic import ensure_writable_dir, folds_case, remove_stale_temps

_logger = logging.getLogger(__name__)

STAGE = "tile"
COORDS_DIR, THUMBNAIL_DIR, TISSUE_DIR = "coords", "thumbnails", "tissue"
#: Attributes that must match for an existing coords file to count as done.
VALIDATED_ATTRS = ("target_mpp", "patch_size", "overlap_fraction", "min_tissue", "mpp_level0", "level0_width",
                   "level0_height", "patch_size_level0", "tiling_config", "slide_fingerprint")
_DOUBLE_SUFFIXES = (".ome.tiff", ".ome.tif")
#: Temporary files older than this are leftovers of a crashed run; younger ones may belong
#: to a concurrent run on the same output folder and are left alone.
STALE_TEMP_AGE_S = 600.0
#: Relative difference of mpp_x and mpp_y above which pixels are not square (refused).
ANISOTROPY_TOLERANCE = 0.01
#: Upsampling by at most this much (a 0.2525 µm/px scan tiled at 0.25) is no upsampling.
UPSAMPLE_TOLERANCE = 0.05


@dataclass(frozen=True)
class TileResult:
    """Outcome of one slide: ``status`` is ``ok``, ``failed`` or ``skipped``."""

    slide_id: str
    path: str
    status: str
    reason: str = ""
    n_patches: int | None = None
    seconds: float = 0.0
    coords_path: str | None = None


@dataclass(frozen=True)
class OutputPaths:
    coords: Path
    thumbnail: Path
    tissue: Path

    @classmethod
    def of(cls, out_dir: str | os.PathLike[str], slide_id: str) -> OutputPaths:
        out = Path(out_dir)
        return cls(out / COORDS_DIR / f"{slide_id}.h5", out / THUMBNAIL_DIR / f"{slide_id}.png",
                   out / TISSUE_DIR / f"{slide_id}.geojson")


def slide_id_from_path(path: str | os.PathLike[str]) -> str:
    """The file name without its extension (``.ome.tif(f)`` counts as one extension); a folder
    slide (a DICOM WSI) keeps its whole name, dots included (series UIDs are dotted)."""
    name = unicodedata.normalize("NFC", Path(path).name)
    if os.path.isdir(path):
        return name
    for suffix in _DOUBLE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    stem, _ = os.path.splitext(name)
    return stem or name


def check_unique_ids(paths: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Slide ids of ``paths``; :class:`ConfigError` when two slides share one, or, when the
    file system of ``out_dir`` ignores case (macOS, Windows), when two ids differ only in case:
    their output files would be one file there."""
    fold = out_dir is not None and folds_case(out_dir)
    seen: dict[str, tuple[str, str]] = {}
    ids = []
    for p in paths:
        sid = slide_id_from_path(p)
        key = sid.casefold() if fold else sid
        if key in seen:
            other_id, other_path = seen[key]
            if other_id == sid:
                raise ConfigError(
                    f"two slides have the same id {sid!r}: {other_path} and {os.fspath(p)}; "
                    "rename one or tile them into different output folders"
                )
            raise ConfigError(
                f"slide ids {other_id!r} and {sid!r} differ only in case, and the file system of {out_dir} ignores "
                f"case: their outputs would overwrite each other ({other_path}, {os.fspath(p)}); rename one"
            )
        seen[key] = (sid, os.fspath(p))
        ids.append(sid)
    return ids


def tile_slides(
    inputs: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    config: TilingConfig | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    runtime: RuntimeConfig | None = None,
) -> list[TileResult]:
    """Tile every slide in ``inputs`` into ``out_dir``; one :class:`TileResult` per slide.

    ``runtime`` picks the executor (``local`` or ``ray``), the ``--shard`` (only the
    slides of that shard are tiled and returned) and the lock timeout. A slide whose lock
    a live run holds is ``skipped`` (reason ``locked by host:pid …``).

    Raises before any work (:class:`ConfigError`) when two slides share an id (or, on a
    file system that ignores case, ids that differ only in case) or the mpp
    CSV is invalid, and (:class:`~wsi_pipeline.errors.OutputError`) when ``out_dir`` is
    not writable. Per-slide problems never raise: they are results with status ``failed``.
    """
    config = config or TilingConfig()
    runtime = runtime or RuntimeConfig()
    executor = make_executor(runtime)  # e.g. Ray not installed: a usage error before any output
    paths = [os.fspath(p) for p in inputs]
    ids = check_unique_ids(paths, out_dir)  # over the whole list, so every shard agrees
    check_backend(config.backend)
    overrides = load_mpp_csv(config.mpp_csv) if config.mpp_csv else {}
    per_slide = load_slide_params(config.slide_params, config) if config.slide_params else {}
    for what, source, table in (("mpp CSV", config.mpp_csv, overrides),
                                ("slide params CSV", config.slide_params, per_slide)):
        for p, sid in zip(paths, ids, strict=True):  # `a` and `a.svs` are one slide: one value
            name = Path(p).name
            if sid != name and sid in table and name in table and table[sid] != table[name]:
                raise ConfigError(f"{what} {source}: slide {sid!r} is listed twice with different values, "
                                  f"as {sid!r} and {name!r}")
    out = ensure_writable_dir(out_dir)
    for sub in (COORDS_DIR, THUMBNAIL_DIR, TISSUE_DIR):
        n = remove_stale_temps(ensure_writable_dir(out / sub), min_age_s=STALE_TEMP_AGE_S)
        if n:
            _logger.info("removed %d temporary files left by an interrupted run in %s", n, out / sub)
    names = set(ids) | {Path(p).name for p in paths}
    for what, table in (("mpp CSV", overrides), ("slide params CSV", per_slide)):
        unused = set(table) - names
        if unused:
            _logger.warning("%s lists %d slides that are not in this batch (e.g. %s)", what, len(unused),
                            sorted(unused)[0])
    items = list(zip(paths, ids, strict=True))
    if runtime.shard is not None:
        items = runtime.shard.select(items, key=lambda item: item[1])
        _logger.info("shard %s: %d of %d slides", runtime.shard, len(items), len(paths))
    SlideLocks(out, STAGE, timeout_s=runtime.lock_timeout_s).clear_stale()
    progress = progress or NullProgress()
    try:
        with executor as ex:
            if ex.remote:  # workers may run in another folder or on another machine
                out = Path(absolute(out) or out)
                items = [(absolute(p) or p, sid) for p, sid in items]
            spec = WorkerSpec(
                functools.partial(TileWorker, str(out), config, overwrite, dict(overrides), runtime.lock_timeout_s,
                                  per_slide),
                on_error=functools.partial(worker_died, STAGE, str(out), _failed_item), label=lambda item: item[1],
            )
            return ex.map(spec, items, progress)
    finally:
        progress.close()


@dataclass(frozen=True)
class TileWorker:
    """Tiles one ``(path, slide_id)`` item (the per-slide work an executor maps over slides)."""

    out_dir: str
    config: TilingConfig
    overwrite: bool = False
    mpp_overrides: Mapping[str, float] = dataclasses.field(default_factory=dict)
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
    slide_params: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __call__(self, item: tuple[str, str], progress: Progress) -> TileResult:
        path, sid = item
        progress.start_slide(sid, 1)
        key = slide_key(self.slide_params, sid, path)
        config = self.config.merge(self.slide_params[key]) if key is not None else self.config
        r = tile_slide(path, self.out_dir, config, slide_id=sid, overwrite=self.overwrite,
                       mpp_overrides=self.mpp_overrides, lock_timeout_s=self.lock_timeout_s)
        progress.advance(1)
        progress.end_slide(sid, r.status)
        return r


def slide_key(table: Mapping[str, Any], slide_id: str, path: str | os.PathLike[str]) -> str | None:
    """The key under which a per-slide CSV lists a slide: its id, else its file name, else ``None``."""
    name = Path(path).name
    return slide_id if slide_id in table else name if name in table else None


def _failed_item(item: tuple[str, str], reason: str) -> TileResult:
    path, sid = item
    return _failed(sid, path, reason)


def check_backend(name: str) -> None:
    """:class:`ConfigError` unless ``name`` is ``auto`` or a registered backend."""
    from ..slide import registered_backends

    known = [s.name for s in registered_backends()]
    if name != "auto" and name not in known:
        raise ConfigError(f"unknown backend {name!r}; use auto or one of {', '.join(known)}")


def tile_slide(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: TilingConfig | None = None,
    *,
    slide_id: str | None = None,
    overwrite: bool = False,
    mpp_overrides: Mapping[str, float] | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> TileResult:
    """Tile one slide under its lock, append its ``status.csv`` row and return the result
    (never raises for a bad slide; ``skipped`` when another live run holds the lock)."""
    config = config or TilingConfig()
    path = os.fspath(path)
    sid = slide_id or slide_id_from_path(path)
    outputs = OutputPaths.of(out_dir, sid)
    step = SlideStep(STAGE, out_dir, locks=SlideLocks(out_dir, STAGE, timeout_s=lock_timeout_s))
    return step.run(
        sid, lambda: _tile(path, Path(out_dir), config, sid, overwrite, mpp_overrides or {}),
        failed=lambda reason: _failed(sid, path, reason), skipped=lambda reason: TileResult(sid, path, "skipped", reason),
        outputs=(outputs.coords, outputs.thumbnail, outputs.tissue),  # temp files of a dead holder
    )


def _failed(sid: str, path: str, reason: str) -> TileResult:
    return TileResult(sid, path, "failed", reason)


def _tile(path: str, out: Path, config: TilingConfig, sid: str, overwrite: bool,
          overrides: Mapping[str, float]) -> TileResult:
    from ..report.geojson import write_geojson
    from ..report.png import write_png
    from ..report.thumbnail import render_thumbnail
    from ..slide import open_slide
    from ..slide.fingerprint import slide_fingerprint
    from ..store.coords import read_coords, write_coords
    from ..store.provenance import slide_provenance
    from .grid import grid_spec, select_patches
    from .lowres import check_seg_cost, choose_seg_level, read_lowres
    from .tissue import mask_to_polygons, segment_tissue

    if sid.startswith("."):  # its outputs would be hidden: embed, classify and export skip dot files
        raise SlideError(f"slide id {sid!r} starts with '.', which wsi-pipeline keeps for its temporary files; "
                         "rename the file")
    paths = OutputPaths.of(out, sid)
    with open_slide(path, config.backend) as slide:
        info = resolve_mpp(slide.info, sid, config, overrides)
        upsample = check_upsample(info.mpp, config)
        spec = grid_spec(config.patch_size, config.target_mpp, info.mpp, config.overlap)
        attrs = coords_attrs(info, sid, config, spec.patch_size_level0, slide.backend)
        attrs.update(slide_fingerprint=slide_fingerprint(path), upsample_factor=upsample)
        if not overwrite:
            valid = outputs_valid(paths, {k: attrs[k] for k in VALIDATED_ATTRS})
            if valid is True:
                _logger.info("%s: outputs exist and validate; skipped (use --overwrite to redo)", sid)
                n = len(read_coords(paths.coords)[0])
                return TileResult(sid, path, "skipped", "outputs exist and validate", n, 0.0, str(paths.coords))
            if paths.coords.exists():
                _logger.info("%s: existing outputs are redone (%s)", sid, valid)
        if upsample > 1.0 + UPSAMPLE_TOLERANCE:
            _logger.warning("%s: target %.3g µm/px is finer than the scan (%.3g µm/px): patches are upsampled "
                            "%.2gx (--max-upsample refuses that)", sid, config.target_mpp, info.mpp, upsample)
        level, factor = choose_seg_level(info, config.seg_level_mpp)
        check_seg_cost(info, level, factor)
        low = read_lowres(slide, info, level, factor)
    tissue = segment_tissue(low.rgb, low.mpp, config.segmentation)
    coords, frac = select_patches(tissue.mask, low.scale, info.dimensions, spec, config.min_tissue,
                                  config.pad_small_images)
    polygons = mask_to_polygons(tissue.mask, low.scale)
    attrs.update(
        seg_level=low.level, seg_factor=low.factor, seg_mpp=low.mpp, seg_threshold=tissue.threshold,
        seg_glass_rgb=list(tissue.glass), tissue_area_um2=tissue.area_um2, unreadable_fraction=low.unreadable_fraction,
        step_level0=spec.step_level0, n_patches=len(coords),
    )
    thumb = render_thumbnail(low.rgb, low.scale, polygons, coords, spec.patch_size_level0,
                             max_side=config.thumbnail_max_side)
    provenance = slide_provenance(attrs)
    write_png(paths.thumbnail, thumb, provenance, compress_level=1)
    write_geojson(paths.tissue, polygons, {"slide_id": sid}, provenance={
        **provenance, "seg_mpp": low.mpp, "seg_threshold": tissue.threshold, "seg_glass_rgb": list(tissue.glass),
        "tiling_config": json.loads(attrs["tiling_config"])})
    write_coords(paths.coords, coords, attrs, tissue_fraction=frac)  # last: it marks the slide done
    reason = ""
    if len(coords) == 0:
        w, h = info.dimensions
        if min(w, h) < spec.patch_size_level0 and not config.pad_small_images:
            reason = (f"image is {w}x{h} px, smaller than one {config.patch_size}-px patch at "
                      f"{config.target_mpp:g} µm/px ({spec.patch_size_level0} px here); lower --patch-size")
        else:
            reason = "no tissue found" if not tissue.mask.any() else "no patch reaches min_tissue"
            if not tissue.mask.any() and _grey_with_content(low.rgb):
                reason += " (the image is grey: tissue is found by its colour, so grey has none)"
        _logger.warning("%s: %s; empty coords written", sid, reason)
    else:
        _logger.info("%s: %d patches of %d px at %.3g µm/px", sid, len(coords), config.patch_size, config.target_mpp)
    return TileResult(sid, path, "ok", reason, len(coords), 0.0, str(paths.coords))


def _grey_with_content(rgb: np.ndarray) -> bool:
    """A grey picture (R = G = B everywhere) with something darker than glass on 1 % of it: a
    greyscale scan, whose tissue segmentation cannot see (blank glass stays plain "no tissue")."""
    if rgb.ndim != 3 or rgb.shape[2] < 3 or not rgb.size:
        return False
    grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return grey and float((rgb[..., 0] < 200).mean()) > 0.01


def resolve_mpp(info: SlideInfo, slide_id: str, config: TilingConfig, overrides: Mapping[str, float]) -> SlideInfo:
    """Apply ``--mpp-csv`` (wins: it is explicit and per slide), else keep the file's mpp, else
    ``--default-mpp`` (with a warning), else raise :class:`MissingMppError`."""
    key = slide_key(overrides, slide_id, info.path)
    has_mpp = is_finite_positive(info.mpp_x) and is_finite_positive(info.mpp_y)
    if key is not None:
        mpp = overrides[key]
        if has_mpp and abs(info.mpp - mpp) > 0.01 * mpp:
            _logger.warning("%s: mpp CSV says %.4g µm/px, the file says %.4g; using the CSV", slide_id, mpp, info.mpp)
        return info.with_mpp(mpp, "csv")
    if has_mpp:
        check_square_pixels(info)
        try:
            check_mpp("the file's mpp", info.mpp)
        except ConfigError as e:
            raise SlideError(f"{e}: a damaged header; give the slide's mpp with --mpp-csv") from None
        return info
    if config.default_mpp is not None:
        if config.pad_small_images:  # an ROI image (classify): expected to carry no mpp, so no warning each
            _logger.info("%s: ROI image without mpp; taken to be at %.4g µm/px (--default-mpp, else the target)",
                         slide_id, config.default_mpp)
        else:
            _logger.warning("%s: slide has no mpp; assuming --default-mpp %.4g µm/px (recorded as "
                            "mpp_source=default)", slide_id, config.default_mpp)
        return info.with_mpp(config.default_mpp, "default")
    raise MissingMppError(
        f"slide has no physical resolution (mpp); give --mpp-csv (slide,mpp) or --default-mpp"
        f" (file {Path(info.path).name})"
    )


def check_square_pixels(info: SlideInfo) -> None:
    """Raise :class:`SlideError` when the file's pixels are not square (``mpp_x`` and ``mpp_y``
    differ by more than :data:`ANISOTROPY_TOLERANCE`): a square patch would cover a
    non-square area. An ``--mpp-csv`` entry (one value for both axes) overrides the file."""
    x, y = float(info.mpp_x or 0.0), float(info.mpp_y or 0.0)
    if abs(x - y) > ANISOTROPY_TOLERANCE * max(x, y):
        raise SlideError(
            f"pixels are not square: {x:.4g} µm/px wide but {y:.4g} µm/px tall ({info.mpp_source}); wsi-pipeline "
            f"tiles square pixels only (a square patch would cover {max(x, y) / min(x, y):.2g}x more one way); "
            "give --mpp-csv if the file is wrong"
        )


def check_upsample(mpp: float, config: TilingConfig) -> float:
    """The factor by which patches are upsampled (``mpp / target_mpp``, at least 1); raise
    :class:`SlideError` when it exceeds ``config.max_upsample`` (beyond :data:`UPSAMPLE_TOLERANCE`)."""
    factor = max(1.0, float(mpp) / config.target_mpp)
    limit = config.max_upsample
    if limit is not None and factor > limit * (1.0 + UPSAMPLE_TOLERANCE):
        raise SlideError(
            f"target {config.target_mpp:g} µm/px is finer than the scan ({mpp:.3g} µm/px): patches would be "
            f"upsampled {factor:.2g}x, above max_upsample {limit:g}; tile at a coarser target or raise max_upsample"
        )
    return factor


def coords_attrs(info: SlideInfo, slide_id: str, config: TilingConfig, patch_size_level0: int,
                 backend: str) -> dict[str, Any]:
    """TRIDENT + CLAM + provenance attributes of a coords file."""
    w0, h0 = info.dimensions
    patch_level = info.read_level_for_mpp(config.target_mpp)  # exact-downsample levels only
    lw, lh = info.level_dimensions[patch_level]
    return {
        # TRIDENT
        "patch_size": int(config.patch_size),
        "patch_size_level0": int(patch_size_level0),
        "level0_magnification": 10.0 / info.mpp,
        "target_magnification": 10.0 / config.target_mpp,
        "overlap": int(round(config.overlap * config.patch_size)),
        "level0_width": int(w0),
        "level0_height": int(h0),
        "name": slide_id,
        # CLAM
        "patch_level": int(patch_level),
        "downsample": [float(w0 / lw), float(h0 / lh)],
        "level_dim": [int(lw), int(lh)],
        "downsampled_level_dim": [int(lw), int(lh)],
        # ours
        "mpp_level0": float(info.mpp),
        "target_mpp": float(config.target_mpp),
        "mpp_source": info.mpp_source,
        "min_tissue": float(config.min_tissue),
        "overlap_fraction": float(config.overlap),
        "slide_path": os.path.abspath(info.path),
        "slide_identifiers": json.dumps(info.identifiers, sort_keys=True),  # e.g. the DICOM series UID
        "backend": backend,
        "backend_version": info.backend_version,
        "wsi_pipeline_version": __version__,
        "tiling_config": json.dumps(config.signature(), sort_keys=True),
    }


def outputs_valid(paths: OutputPaths, expected: Mapping[str, Any]) -> bool | str:
    """``True`` when all three outputs exist and validate for ``expected``, else the reason."""
    from ..errors import CorruptOutputError
    from ..report.geojson import read_geojson
    from ..report.thumbnail import validate_png
    from ..store.coords import validate_coords

    ok = validate_coords(paths.coords, expected)
    if ok is not True:
        return f"coords: {ok}"
    png = validate_png(paths.thumbnail) if paths.thumbnail.exists() else "missing"
    if png is not True:
        return f"thumbnail: {png}"
    try:
        read_geojson(paths.tissue)
    except CorruptOutputError as e:
        return f"tissue GeoJSON: {e}"
    return True



__all__ = [
    "OutputPaths",
    "TileResult",
    "TileWorker",
    "check_backend",
    "check_square_pixels",
    "check_unique_ids",
    "check_upsample",
    "coords_attrs",
    "outputs_valid",
    "resolve_mpp",
    "slide_id_from_path",
    "tile_slide",
    "tile_slides",
]
