"""Write-to-temp, fsync, rename: a reader never sees a half-written output."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputError

TMP_SUFFIX = ".tmp"


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success fsync it and rename it into place.

    The temporary name starts with ``.`` and ends in ``.tmp`` so that globbing for outputs
    never picks it up. On an exception the temporary file is removed and ``final`` is
    left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def fsync_path(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows fsync on a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temps(folder: str | os.PathLike[str], min_age_s: float = 0.0) -> int:
    """Delete temporary files left by a crashed run; returns how many were removed.

    ``min_age_s`` spares files modified more recently than that (another run on the same
    folder may be writing them right now).
    """
    n = 0
    folder = Path(folder)
    if folder.is_dir():
        now = time.time()
        for p in folder.glob(f".*{TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                if min_age_s > 0 and now - p.stat().st_mtime < min_age_s:
                    continue
                p.unlink()
                n += 1
    return n


def folds_case(path: str | os.PathLike[str]) -> bool:
    """Whether the file system that holds ``path`` (or its nearest existing ancestor) takes names
    that differ only in case for one name (the default on macOS and Windows).

    Nothing is written: the nearest existing folder with a cased letter in its name is looked
    up under its case-swapped name.
    """
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    for q in (p, *p.parents):
        other = q.with_name(q.name.swapcase()) if q.name else q
        if other.name != q.name:
            try:
                return os.path.samefile(q, other)
            except OSError:  # no such name: case matters here
                return False
    return False


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and prove it is writable, or raise :class:`OutputError` at once."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TMP_SUFFIX, dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"output folder {path} is not writable: {e.strerror or e}") from e
    return path
