"""The user-facing :class:`Slide`: backend choice, per-process handles and reopen-once."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError, SlideOpenError, SlideReadError, UnsupportedFormatError, one_line
from .base import (
    BackendSpec,
    SlideBackend,
    SlideInfo,
    find_folder_members,
    folder_member_extensions,
    get_backend,
    path_problem,
    registered_backends,
)

_logger = logging.getLogger(__name__)


def _probe(path: str, backend: str) -> tuple[str, SlideBackend]:
    """Open ``path`` with ``backend`` (or the first that works when ``auto``).

    Only what a backend calls a file error (:attr:`BackendSpec.is_file_error`) becomes a
    :class:`SlideOpenError`; anything else is a bug or an unsupported library release and
    propagates unchanged. Under ``auto`` such an error is logged as a warning and the next
    backend is tried; it is raised as it is when no backend opens the file.
    """
    ext = _format_of(path)
    if backend != "auto":
        try:
            spec = get_backend(backend)
        except KeyError:
            names = ", ".join(s.name for s in registered_backends())
            raise UnsupportedFormatError(f"unknown backend {backend!r} (known: {names})") from None
        if not spec.is_available():
            raise SlideOpenError(f"backend {backend!r} is not installed")
        if os.path.isdir(path) and ext not in spec.folder_members:
            raise SlideOpenError(f"{path}: {backend} cannot open a folder of {ext} files")
        try:
            return spec.name, spec.factory(path)
        except Exception as e:
            if not _is_file_error(spec, e):
                raise
            raise SlideOpenError(f"{path}: {backend} cannot open it: {one_line(e)}") from e
    candidates = [s for s in registered_backends(ext) if _opens(s, path, ext) and s.is_available()]
    if not candidates:
        known = sorted({e for s in registered_backends() for e in s.extensions})
        raise UnsupportedFormatError(
            f"{path}: unsupported extension {ext or '(none)'!r} (supported: {' '.join(known)})"
        )
    errors: dict[str, list[str]] = {}  # message -> the backends that gave it
    bug: Exception | None = None  # the first error that is no file error, raised if nothing opens
    deferred: tuple[str, SlideBackend] | None = None  # opened, but prefers the next candidate
    for spec in candidates:
        try:
            handle = spec.factory(path)
        except Exception as e:
            if _is_file_error(spec, e):
                errors.setdefault(one_line(e), []).append(spec.name)
                _logger.debug("backend %s failed on %s: %s", spec.name, path, e)
            else:  # a reader bug or an unsupported library release; another reader may still work
                _logger.warning("%s: backend %s raised %s: %s (a bug or an unsupported library version, "
                                "not a damaged file)", path, spec.name, type(e).__name__, one_line(e))
                bug = bug or e
            if deferred is not None:
                return deferred
            continue
        reason = spec.defer(handle) if spec.defer is not None and deferred is None else None
        if reason:
            _logger.debug("backend %s defers on %s: %s", spec.name, path, reason)
            deferred = (spec.name, handle)
            continue
        if deferred is not None:
            deferred[1].close()
        return spec.name, handle
    if deferred is not None:
        return deferred
    if bug is not None:
        raise bug
    said = "; ".join(f"{', '.join(names)}: {message}" for message, names in errors.items())
    raise SlideOpenError(f"{path}: not a readable slide ({said})")


def _format_of(path: str) -> str:
    """The lower-case extension that picks the backends: the file's own, or for a folder that
    a backend opens as one slide (a DICOM WSI), its members'. Raises for what is no slide."""
    if os.path.isdir(path):
        found = find_folder_members(path)
        if found is None:
            exts = " ".join(sorted(folder_member_extensions())) or "none"
            raise SlideOpenError(f"{path}: is a folder, not a slide file (a folder is one slide only when it "
                                 f"holds the files of one multi-file slide: {exts})")
        return found[0]
    if not os.path.isfile(path):
        raise SlideOpenError(f"{path}: {path_problem(path) or 'no such file'}")
    if os.path.getsize(path) == 0:
        raise SlideOpenError(f"{path}: file is empty (0 bytes)")
    return "".join(Path(path).suffixes[-1:]).lower()


def _opens(spec: BackendSpec, path: str, ext: str) -> bool:
    """Whether ``spec`` is a candidate for ``path`` (a folder: by its members' extension)."""
    return ext in (spec.folder_members if os.path.isdir(path) else spec.extensions)


def _is_file_error(spec: BackendSpec, e: BaseException) -> bool:
    """Our own slide errors always; otherwise what the backend declares (see :class:`BackendSpec`)."""
    return isinstance(e, SlideError) or spec.is_file_error(e)



class Slide:
    """One whole-slide image, opened through a registered backend.

    The native handle belongs to the process that opened it: after a fork (DataLoader
    workers) or unpickling (spawn) the slide reopens itself lazily, so a ``Slide`` can be
    handed to workers freely. A failed read reopens the handle once and retries; a second
    failure raises :class:`SlideReadError`.
    """

    def __init__(self, path: str | os.PathLike[str], backend: str = "auto") -> None:
        self.path = os.fspath(path)
        self.requested_backend = backend
        name, handle = _probe(self.path, backend)
        self.backend = name  # resolved backend: reopen with the same one
        self._handle: SlideBackend | None = handle
        self._pid = os.getpid()
        self.info: SlideInfo = handle.info

    # -- per-process handle -------------------------------------------------------------
    def _get_handle(self) -> SlideBackend:
        if self._handle is None or self._pid != os.getpid():
            self._handle = get_backend(self.backend).factory(self.path)
            self._pid = os.getpid()
        return self._handle

    def reopen(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            try:
                self._handle.close()
            except Exception as e:  # a handle in error state may refuse to close
                if not _is_file_error(self._spec, e):
                    raise
                _logger.debug("%s: closing a failed handle: %s", self.path, e)
        self._handle = None
        self._get_handle()

    @property
    def _spec(self) -> BackendSpec:
        return get_backend(self.backend)

    @property
    def parallel_reads(self) -> bool:
        """Whether more handles of this slide may be opened cheaply and read at once (see
        :class:`~.base.BackendSpec`)."""
        return self._spec.parallel_reads

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- reading ------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) at ``level``; ``location`` in level-0 pixels."""
        if not 0 <= level < self.info.level_count:
            raise SlideReadError(
                f"{self.path}: level {level} out of range (the slide has {self.info.level_count} levels)"
            )
        try:
            return self._get_handle().read_region(location, level, size)
        except Exception as first:
            if not _is_file_error(self._spec, first):
                raise  # a bug or a changed library API: not the file's fault
            # debug: a damaged slide gives one such line per bad read; its stage reports the outcome once
            _logger.debug("%s: read error at %s level %d (%s); reopening once", self.path, location, level, first)
        try:
            self.reopen()
            return self._get_handle().read_region(location, level, size)
        except Exception as second:
            if not _is_file_error(self._spec, second):
                raise
            raise SlideReadError(
                f"{self.path}: cannot read region at {tuple(location)} level {level}: {one_line(second)}"
            ) from second

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.info.dimensions
        return f"Slide({self.path!r}, backend={self.backend!r}, {w}x{h}, levels={self.info.level_count})"


def open_slide(path: str | os.PathLike[str], backend: str = "auto") -> Slide:
    """Open a slide: ``backend`` is ``auto`` (probe by priority, fall back) or a registered name.

    ``path`` is a slide file, or a folder that a backend opens as one slide (a DICOM WSI:
    the ``.dcm`` files of one series). ``auto`` reads ``.svs``/``.tif``/``.tiff`` with
    tiffslide unless the file is another vendor's layout or uses a codec other than
    JPEG/deflate/LZW/none (then OpenSlide first); every other slide format (DICOM
    included) with OpenSlide; plain images with the image backend.
    """
    return Slide(path, backend)
