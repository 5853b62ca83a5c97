"""``status.csv``: one row per slide and stage, appended as work finishes.

Columns: ``slide_id, stage, status, reason, n_patches, seconds`` (+ ``timestamp``).
``status`` is ``ok``, ``failed``, ``skipped`` or ``no_tissue``. Rows are appended under
an exclusive lock so that concurrent runs on the same output folder interleave whole
lines. The latest row of a (slide, stage) pair is its current state.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("slide_id", "stage", "status", "reason", "n_patches", "seconds", "timestamp")
STATUS_FILE = "status.csv"


@dataclass(frozen=True)
class StatusRow:
    slide_id: str
    stage: str
    status: str
    reason: str = ""
    n_patches: int | None = None
    seconds: float | None = None


def append_status(out_dir: str | os.PathLike[str], row: StatusRow) -> None:
    path = Path(out_dir) / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            row.slide_id,
            row.stage,
            row.status,
            " ".join(row.reason.split()),  # one line, always
            "" if row.n_patches is None else int(row.n_patches),
            "" if row.seconds is None else f"{row.seconds:.3f}",
            time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        ]
    )
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            end = f.seek(0, os.SEEK_END)
            if end == 0:
                f.write((",".join(COLUMNS) + "\n").encode())
            else:  # a file saved without its last newline (an editor, a cut copy) must not glue two rows
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(buf.getvalue().encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_status(out_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    path = Path(out_dir) / STATUS_FILE
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def latest_status(out_dir: str | os.PathLike[str], stage: str) -> dict[str, dict[str, str]]:
    """slide_id → its latest row for ``stage``."""
    return {r["slide_id"]: r for r in read_status(out_dir) if r["stage"] == stage}
