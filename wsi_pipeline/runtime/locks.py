"""Per-slide lock files: a slide in progress is never processed twice at once.

>>> locks = SlideLocks("out/", "tile")                          # doctest: +SKIP
>>> with locks.acquire("slide-1"):                              # doctest: +SKIP
...     ...  # tile slide-1; a concurrent run gets SlideLockedError and skips it

A lock is ``out/locks/<stage>[/<scope>]/<slide_id>.lock``, created with
``O_CREAT | O_EXCL`` (atomic, also on NFS v3+) and holding JSON
``{pid, host, started, stage, slide_id, token, pid_start}``. A lock is *stale* when its
process is gone (same host: the pid no longer exists, or it was reused by another
process) or when it is older than ``timeout_s`` (any host; default 6 h). Stale locks are
cleared with a log line. Breaking a stale lock and releasing one happen under an
``flock`` on ``<folder>/.mutex`` and only remove the very file that was judged (same
inode, same bytes), so two runs that find the same stale lock never remove each other's
fresh one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from ..errors import ConfigError, OutputError, SlideLockedError
from ..store.atomic import TMP_SUFFIX

_logger = logging.getLogger(__name__)

LOCKS_DIR = "locks"
LOCK_SUFFIX = ".lock"
DEFAULT_LOCK_TIMEOUT_S = 6 * 3600.0
#: How the reason of a slide skipped because of a live lock starts (``locked by host:pid since …``).
LOCKED_REASON_PREFIX = "locked by"
#: A lock file that cannot be parsed is being written right now, unless it is older than this.
UNREADABLE_GRACE_S = 60.0
_MUTEX = ".mutex"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def this_host() -> str:
    return socket.gethostname()


def _pid_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """``True`` when a process with this id exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def parse_duration(text: str | float) -> float:
    """Seconds of ``6h``, ``90m``, ``3600s``, ``1d`` (a bare number is hours); :class:`ConfigError` if invalid."""
    if isinstance(text, (int, float)):
        value, unit = float(text), "h"
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*", str(text).lower())
        if not m:
            raise ConfigError(f"--lock-timeout {text!r}: give a duration like 6h, 90m or 3600s")
        value, unit = float(m.group(1)), m.group(2) or "h"
    seconds = value * _UNITS[unit]
    if seconds <= 0:
        raise ConfigError(f"--lock-timeout {text!r}: must be longer than 0")
    return seconds


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about the run that holds it."""

    pid: int
    host: str
    started: float
    stage: str
    slide_id: str
    token: str
    pid_start: str | None = None

    @property
    def owner(self) -> str:
        return f"{self.host}:{self.pid}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes) -> LockInfo | None:
        """The parsed lock, or ``None`` for an empty or garbled file."""
        try:
            d = json.loads(raw.decode("utf-8"))
            return cls(int(d["pid"]), str(d["host"]), float(d["started"]), str(d["stage"]), str(d["slide_id"]),
                       str(d["token"]), d.get("pid_start"))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None


@dataclass(frozen=True)
class _Seen:
    """One observation of a lock file: enough to recognise the same file later."""

    raw: bytes
    inode: int
    mtime: float

    @property
    def info(self) -> LockInfo | None:
        return LockInfo.from_json(self.raw)


class SlideLock:
    """A lock this process holds; :meth:`release` (or leaving the ``with`` block) removes it."""

    def __init__(self, locks: SlideLocks, path: Path, info: LockInfo) -> None:
        self.locks, self.path, self.info = locks, path, info
        self.released = False

    def release(self) -> None:
        """Remove the lock file if it is still ours (idempotent)."""
        if self.released:
            return
        self.released = True
        with self.locks.mutex():
            seen = _observe(self.path)
            if seen is not None and seen.info is not None and seen.info.token == self.info.token:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            else:
                _logger.warning("%s: lock %s was taken over by another run before release", self.info.slide_id,
                                self.path)

    def __enter__(self) -> SlideLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class SlideLocks:
    """The lock folder of one stage (and scope, e.g. a model id) in an output folder.

    Parameters
    ----------
    out_dir : output folder shared by every run.
    stage : stage name (``tile``, ``embed``).
    scope : optional sub-folder (the embed stage uses the model id: different models may run at once).
    timeout_s : locks older than this are stale whatever their host.
    """

    def __init__(self, out_dir: str | os.PathLike[str], stage: str, *, scope: str | None = None,
                 timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"lock timeout must be > 0 seconds, got {timeout_s!r}")
        self.stage = stage
        self.folder = Path(out_dir) / LOCKS_DIR / stage / (scope or "")
        self.timeout_s = float(timeout_s)

    def path(self, slide_id: str) -> Path:
        return self.folder / f"{slide_id}{LOCK_SUFFIX}"

    @contextlib.contextmanager
    def mutex(self) -> Iterator[None]:
        """Exclusive ``flock`` on the folder's mutex file (short critical sections only)."""
        self._mkdir()
        with open(self.folder / _MUTEX, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def acquire(self, slide_id: str) -> SlideLock:
        """Take the slide's lock, clearing a stale one first.

        Raises
        ------
        SlideLockedError
            A live run holds the lock (message: ``locked by host:pid since …``).
        OutputError
            The lock folder is not writable.
        """
        path = self.path(slide_id)
        self._mkdir()
        for _ in range(5):
            info = LockInfo(os.getpid(), this_host(), time.time(), self.stage, slide_id, uuid.uuid4().hex,
                            _pid_start(os.getpid()))
            if self._create(path, info):
                return SlideLock(self, path, info)
            seen = _observe(path)
            if seen is None:  # released between our create and our look: try again
                continue
            why = self.stale_reason(seen)
            if why is None:
                holder = seen.info
                owner = holder.owner if holder else "a run that is writing its lock"
                since = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder.started)) if holder else "now"
                raise SlideLockedError(f"{LOCKED_REASON_PREFIX} {owner} since {since}", holder)
            self._break(path, seen, why)
        raise SlideLockedError(f"{LOCKED_REASON_PREFIX} another run (lock {path.name} keeps changing hands)")

    def holder(self, slide_id: str) -> LockInfo | None:
        """The current lock of ``slide_id`` (stale or not), or ``None``."""
        seen = _observe(self.path(slide_id))
        return seen.info if seen is not None else None

    def stale_reason(self, seen: _Seen) -> str | None:
        """Why an observed lock is stale, or ``None`` while its run may still be working."""
        age = time.time() - seen.mtime
        info = seen.info
        if info is None:
            return f"unreadable lock file, {age:.0f} s old" if age > UNREADABLE_GRACE_S else None
        if age > self.timeout_s:
            return f"older than the lock timeout ({age / 3600:.2f} h > {self.timeout_s / 3600:.2f} h)"
        if info.host == this_host():
            if not pid_alive(info.pid):
                return f"process {info.pid} on this host is gone"
            if info.pid_start is not None and _pid_start(info.pid) not in (None, info.pid_start):
                return f"process {info.pid} on this host is gone (pid reused)"
        return None

    def clear_stale(self) -> int:
        """Remove every stale lock in the folder (one log line each); returns how many."""
        if not self.folder.is_dir():
            return 0
        n = 0
        for path in sorted(self.folder.glob(f"*{LOCK_SUFFIX}")):
            seen = _observe(path)
            if seen is not None:
                why = self.stale_reason(seen)
                if why is not None and self._break(path, seen, why):
                    n += 1
        return n

    # -- internals --------------------------------------------------------------------
    def _mkdir(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"lock folder {self.folder} cannot be created: {e.strerror or e}") from e

    def _create(self, path: Path, info: LockInfo) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise OutputError(f"cannot create lock {path}: {e.strerror or e}") from e
        try:
            os.write(fd, info.to_json().encode("utf-8"))
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise OutputError(f"cannot write lock {path}: {e.strerror or e}") from e
        os.close(fd)
        return True

    def _break(self, path: Path, seen: _Seen, why: str) -> bool:
        """Remove ``path`` if it is still the file observed as ``seen``; ``True`` when removed."""
        with self.mutex():
            now = _observe(path)
            if now != seen:  # released, or already replaced by a fresh lock
                return False
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        owner = seen.info.owner if seen.info else "unknown"
        _logger.info("cleared stale %s lock of %s held by %s (%s)", self.stage, path.stem, owner, why)
        return True


def remove_temps_of(final: str | os.PathLike[str]) -> int:
    """Delete the temporary files (or folders) of one output, ``.<name>.<8 chars>.tmp`` beside it.

    Call it only while holding the slide's lock: then no live run can be writing them, so
    they are leftovers of a killed one, whatever their age. Returns how many were removed.
    """
    final = Path(final)
    pattern = re.compile(re.escape(f".{final.name}.") + r"[A-Za-z0-9_]{8}" + re.escape(TMP_SUFFIX))
    n = 0
    if final.parent.is_dir():
        for p in final.parent.iterdir():
            if pattern.fullmatch(p.name):
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                    n += 1
    if n:
        _logger.info("removed %d temporary file(s) of %s left by an interrupted run", n, final.name)
    return n


def _observe(path: Path) -> _Seen | None:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read(1 << 16)
    except FileNotFoundError:
        return None
    return _Seen(raw, st.st_ino, st.st_mtime)


__all__ = [
    "DEFAULT_LOCK_TIMEOUT_S",
    "LOCKED_REASON_PREFIX",
    "LOCKS_DIR",
    "LockInfo",
    "SlideLock",
    "SlideLocks",
    "parse_duration",
    "pid_alive",
    "remove_temps_of",
    "this_host",
]
