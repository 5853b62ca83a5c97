"""The user-facing :class:`Slide`: backend choice, per-process handles and reopen-once."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideOpenError, SlideReadError, UnsupportedFormatError
from .base import SlideBackend, SlideInfo, get_backend, registered_backends

_logger = logging.getLogger(__name__)


def _probe(path: str, backend: str) -> tuple[str, SlideBackend]:
    """Open ``path`` with ``backend`` (or the first that works when ``auto``)."""
    if os.path.isdir(path):
        raise SlideOpenError(f"{path}: is a folder, not a slide file")
    if not os.path.isfile(path):
        raise SlideOpenError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise SlideOpenError(f"{path}: file is empty (0 bytes)")
    ext = "".join(Path(path).suffixes[-1:]).lower()
    if backend != "auto":
        try:
            spec = get_backend(backend)
        except KeyError:
            names = ", ".join(s.name for s in registered_backends())
            raise UnsupportedFormatError(f"unknown backend {backend!r} (known: {names})") from None
        if not spec.is_available():
            raise SlideOpenError(f"backend {backend!r} is not installed")
        try:
            return spec.name, spec.factory(path)
        except Exception as e:  # backend-specific exception types
            raise SlideOpenError(f"{path}: {backend} cannot open it: {_one_line(e)}") from e
    candidates = [s for s in registered_backends(ext) if ext in s.extensions and s.is_available()]
    if not candidates:
        known = sorted({e for s in registered_backends() for e in s.extensions})
        raise UnsupportedFormatError(
            f"{path}: unsupported extension {ext or '(none)'!r} (supported: {' '.join(known)})"
        )
    errors: list[str] = []
    deferred: tuple[str, SlideBackend] | None = None  # opened, but prefers the next candidate
    for spec in candidates:
        try:
            handle = spec.factory(path)
        except Exception as e:
            errors.append(f"{spec.name}: {_one_line(e)}")
            _logger.debug("backend %s failed on %s: %s", spec.name, path, e)
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
    raise SlideOpenError(f"{path}: not a readable slide ({'; '.join(errors)})")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


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
            except Exception:  # a handle in error state may refuse to close
                pass
        self._handle = None
        self._get_handle()

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
            _logger.warning("%s: read error at %s level %d (%s); reopening once", self.path, location, level, first)
            try:
                self.reopen()
                return self._get_handle().read_region(location, level, size)
            except Exception as second:
                raise SlideReadError(
                    f"{self.path}: cannot read region at {tuple(location)} level {level}: {_one_line(second)}"
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

    ``auto`` reads ``.svs``/``.tif``/``.tiff`` with tiffslide unless the file is another
    vendor's layout or uses a codec other than JPEG/deflate/LZW/none (then OpenSlide
    first); every other slide format with OpenSlide; plain images with the image backend.
    """
    return Slide(path, backend)
