"""Reader protocol, normalised slide metadata and the backend registry.

A *backend* (openslide, tiffslide, plain image, ...) is a class implementing
:class:`SlideBackend`; it registers itself with :func:`register_backend`. Users never
touch backends directly: :func:`wsi_pipeline.slide.open_slide` returns a :class:`Slide`,
which picks a backend, keeps one handle per process (safe to pickle into DataLoader
workers under fork and spawn) and reopens once after a read error, because OpenSlide
errors are sticky.

``auto`` tries the backends that list the file's extension, in order of their priority
for that extension (:meth:`BackendSpec.priority_for`), and takes the first that opens
it. A backend may also *defer* on a file it opened (:attr:`BackendSpec.defer` gives a
reason): the next candidate is then tried first, and the deferred handle is used only
if that one cannot open the file.

A backend may open a *folder* as one slide (:attr:`BackendSpec.folder_members`: a DICOM
WSI is a folder of ``.dcm`` files, one per pyramid level); its factory then gets the
folder. Each backend also says which exceptions mean "this file is damaged or not
supported" (:attr:`BackendSpec.is_file_error`): only those become
:class:`~wsi_pipeline.errors.SlideOpenError` / :class:`~wsi_pipeline.errors.SlideReadError`;
anything else (a ``TypeError``, an ``ImportError``...) is a bug and propagates as it is.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from ..errors import MissingMppError, SlideError

_logger = logging.getLogger(__name__)

#: Relative tolerance when deciding whether a pyramid level is fine enough for a target mpp.
MPP_TOLERANCE = 0.01


@dataclass(frozen=True)
class SlideInfo:
    """Normalised metadata of one slide, whatever the backend.

    ``level_dimensions`` are (width, height) per level; ``level_downsamples`` are relative
    to level 0. ``mpp_x``/``mpp_y`` are µm per level-0 pixel, or ``None`` when the file
    does not say; ``mpp_source`` names where they came from (a property key such as
    ``openslide.mpp-x`` or ``aperio.MPP``, ``tiff.XResolution``, ``csv``, ``default`` or
    ``none``). ``identifiers`` name the slide inside its container format (DICOM:
    ``dicom.SeriesInstanceUID``, ``dicom.ContainerIdentifier``...), for provenance.
    """

    path: str
    backend: str
    backend_version: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None = None
    mpp_y: float | None = None
    mpp_source: str = "none"
    objective_power: float | None = None
    vendor: str | None = None
    properties: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    identifiers: dict[str, str] = field(default_factory=dict)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float:
        """Mean level-0 µm/px; raises :class:`MissingMppError` when unknown."""
        if self.mpp_x is None or self.mpp_y is None:
            raise MissingMppError(
                f"{self.path}: slide has no physical resolution (mpp); "
                "give --mpp-csv (slide,mpp) or --default-mpp"
            )
        return (self.mpp_x + self.mpp_y) / 2.0

    def with_mpp(self, mpp: float, source: str) -> SlideInfo:
        """A copy with the resolution set from an override (``csv``/``default``)."""
        return dataclasses.replace(self, mpp_x=float(mpp), mpp_y=float(mpp), mpp_source=source)

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level_for_mpp(self, target_mpp: float, tolerance: float = MPP_TOLERANCE) -> int:
        """The level with the largest mpp that is still ≤ ``target_mpp`` (relative tolerance).

        Falls back to level 0 when even level 0 is coarser than the target (upsampling).
        """
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= target_mpp * (1.0 + tolerance):
                if self.level_mpp(level) >= self.level_mpp(best):
                    best = level
        return best

    def exact_downsample(self, level: int) -> int | None:
        """The integer ``n`` when ``level`` is level 0 subsampled exactly ``n`` times in both axes
        (its width and height times ``n`` are level 0's), else ``None``."""
        (w0, h0), (w, h) = self.level_dimensions[0], self.level_dimensions[level]
        n = w0 // w if w else 0
        return n if n >= 1 and w * n == w0 and h * n == h0 else None

    def read_level_for_mpp(self, target_mpp: float, tolerance: float = MPP_TOLERANCE) -> int:
        """The level to read patches from: :meth:`best_level_for_mpp`, skipping levels whose
        downsample is not an exact integer (see :meth:`exact_downsample`).

        On such a level (real Aperio pyramids: 99,999 px over 24,999 px is 4.00004) a level-0
        location falls between level pixels: OpenSlide resamples the region by a sub-pixel
        shift that depends on the location, tiffslide takes the pixel below, and no level-0
        location makes the two agree. Skipping those levels (down to level 0, which every
        backend reads alike) keeps the patch pixels independent of the backend.
        """
        best = 0
        for level in range(self.level_count):
            if self.exact_downsample(level) is None:
                continue
            mpp = self.level_mpp(level)
            if mpp <= target_mpp * (1.0 + tolerance) and mpp >= self.level_mpp(best):
                best = level
        nearest = self.best_level_for_mpp(target_mpp, tolerance)
        if nearest != best:
            _logger.info("%s: level %d (downsample %.6g) is no exact subsampling of level 0; patches are read "
                         "at level %d instead, alike in every backend", self.path, nearest,
                         self.level_downsamples[nearest], best)
        return best

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly summary (used by ``wsi-pipeline info``)."""
        d = dataclasses.asdict(self)
        d.pop("properties")
        d["level_dimensions"] = [list(x) for x in self.level_dimensions]
        d["level_downsamples"] = list(self.level_downsamples)
        return d


def is_io_error(e: BaseException) -> bool:
    """The default file-error test: our own :class:`SlideError` or an ``OSError``."""
    return isinstance(e, (SlideError, OSError))


@runtime_checkable
class SlideBackend(Protocol):
    """What one backend must provide. Instances own a native handle for one process."""

    name: ClassVar[str]

    def __init__(self, path: str) -> None: ...

    @property
    def info(self) -> SlideInfo: ...

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array (h, w, 3); ``location`` is the level-0 top-left (x, y),
        ``size`` is (w, h) at ``level``. Alpha is composited on white; out-of-bounds
        pixels are white."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BackendSpec:
    """Registry entry: lower priority is tried first by ``auto``.

    ``ext_priority`` overrides ``priority`` for some extensions (lower-case, with the
    dot). ``defer``, given a handle this backend opened under ``auto``, returns why the
    next candidate should read the file instead, or ``None``. ``folder_members``: extensions
    of files that together make one slide when they share a folder (the factory is then
    given the folder). ``is_file_error`` tells an exception that means "damaged or
    unsupported file" from a bug (:class:`SlideError` and ``OSError`` by default).
    ``parallel_reads``: opening one more handle is cheap and handles read concurrently
    (``False`` for a backend that decodes the whole image on open).
    """

    name: str
    factory: Callable[[str], SlideBackend]
    priority: int
    extensions: frozenset[str]
    is_available: Callable[[], bool]
    version: Callable[[], str]
    ext_priority: Mapping[str, int] = field(default_factory=dict, hash=False)
    defer: Callable[[SlideBackend], str | None] | None = None
    folder_members: frozenset[str] = frozenset()
    is_file_error: Callable[[BaseException], bool] = field(default=is_io_error, hash=False)
    parallel_reads: bool = True

    def priority_for(self, ext: str | None) -> int:
        """Probing priority for files with extension ``ext`` (``None``: the default)."""
        return self.ext_priority.get(ext.lower(), self.priority) if ext else self.priority


_BACKENDS: dict[str, BackendSpec] = {}


def register_backend(
    name: str,
    factory: Callable[[str], SlideBackend],
    *,
    priority: int,
    extensions: set[str] | frozenset[str],
    is_available: Callable[[], bool],
    version: Callable[[], str],
    ext_priority: Mapping[str, int] | None = None,
    defer: Callable[[SlideBackend], str | None] | None = None,
    folder_members: set[str] | frozenset[str] = frozenset(),
    is_file_error: Callable[[BaseException], bool] | None = None,
    parallel_reads: bool = True,
) -> None:
    """Add a backend to the registry (idempotent for the same name)."""
    _BACKENDS[name] = BackendSpec(
        name, factory, priority, frozenset(e.lower() for e in extensions), is_available, version,
        {e.lower(): int(p) for e, p in (ext_priority or {}).items()}, defer,
        frozenset(e.lower() for e in folder_members), is_file_error or is_io_error, parallel_reads,
    )


def registered_backends(ext: str | None = None) -> list[BackendSpec]:
    """All registered backends, in ``auto`` probing order for files with extension ``ext``."""
    return sorted(_BACKENDS.values(), key=lambda s: (s.priority_for(ext), s.name))


def get_backend(name: str) -> BackendSpec:
    return _BACKENDS[name]


def folder_member_extensions() -> frozenset[str]:
    """Extensions of files that make a folder one slide (a DICOM WSI's ``.dcm``), over all backends."""
    return frozenset(e for spec in _BACKENDS.values() for e in spec.folder_members)


def find_folder_members(folder: str | os.PathLike[str]) -> tuple[str, list[str]] | None:
    """``(extension, member files sorted)`` when ``folder`` directly holds files that make it one
    slide for some backend, else ``None``. Hidden files are skipped."""
    exts = folder_member_extensions()
    found: dict[str, list[str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            ext = os.path.splitext(entry.name)[1].lower()
            if ext in exts and not entry.name.startswith(".") and entry.is_file():
                found.setdefault(ext, []).append(entry.path)
    if not found:
        return None
    ext = min(found)  # one format per folder in practice; deterministic otherwise
    return ext, sorted(found[ext])


#: Exception types a format library raises on malformed data (a bad tag value, a short or
#: absurd size, a feature it does not implement): a file error when the library raised it.
#: ``TypeError``, ``AttributeError`` and ``ImportError`` are not among them: raised by our
#: code or deep in a library, they mean a bug or a library version we do not support.
LIBRARY_DATA_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, ArithmeticError, NotImplementedError, MemoryError, LookupError, EOFError, struct.error,
    RuntimeError,  # tifffile: "shape does not match page shape" (NotImplementedError is one too)
)


def raised_in(e: BaseException, packages: tuple[str, ...]) -> bool:
    """True when ``e`` was raised while one of ``packages`` (top-level names such as
    ``tifffile``) was running: a frame of its traceback is theirs. A data error raised by
    our own code after the library returned has no such frame."""
    tb = e.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).partition(".")[0] in packages:
            return True
        tb = tb.tb_next
    return False


#: What ``stat`` calls the kinds of file that hold no slide, by their test.
_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as a slide file or folder, or ``None`` when it can be:
    ``"no such file"``, a symbolic link that is broken or loops, or a special file (a FIFO,
    a socket, a device: reading one could block forever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if not os.path.islink(path):
            return "no such file"
        if e.errno == errno.ELOOP:
            return "symbolic link loop (following it never reaches a file)"
        return f"broken symbolic link (its target {os.readlink(path)!r} does not exist)"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")
    return f"not a regular file but {kind}"


def is_finite_positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0
