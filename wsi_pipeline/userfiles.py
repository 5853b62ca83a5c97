"""Small files the user supplies (labels, mpp and ROI CSVs, slide lists, YAML presets): one reader each.

Every problem with the file itself (missing, unreadable, not UTF-8, not CSV, no header with the
needed columns) becomes one :class:`~wsi_pipeline.errors.ConfigError` line naming the file;
callers check the values and name the line with :func:`where`.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The whole file as UTF-8 text (a byte-order mark is dropped); ``what`` names it in messages."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {p}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{what} {p} is not UTF-8 text (line {line}); save it as UTF-8") from e


def read_csv_table(path: str | os.PathLike[str], what: str, columns: Sequence[str],
                   optional: Sequence[str] | None = None,
                   also: Sequence[str] = ()) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV whose header has ``columns``: ``(line number, {column: stripped cell})``.

    Header names are matched stripped and case-insensitively (``-`` reads as ``_``), a UTF-8
    byte-order mark is ignored and rows whose cells are all empty are skipped. Other columns
    are ignored, unless ``optional`` is given: then the header may hold only ``columns`` and
    ``optional`` (a typo is an error, not a silently ignored column), and the optional
    columns present are returned too. ``also``: columns returned when the header has them,
    other columns still ignored. A row with more filled cells than the header has
    columns (an unquoted decimal comma) is an error. ``what`` names the file in messages
    (``"labels CSV"``).
    """
    p = Path(path)
    reader = csv.reader(io.StringIO(read_text(p, what), newline=""), strict=True)
    try:
        header = [c.strip().lower().replace("-", "_") for c in next(reader, [])]
        missing = [c for c in columns if c not in header]
        if missing:
            got = ", ".join(header) if header else "no header"
            raise ConfigError(f"{what} {p} needs a header with columns '{', '.join(columns)}', got {got}")
        wanted = list(columns)
        if optional is not None:
            unknown = [c for c in header if c not in columns and c not in optional]
            if unknown:
                raise ConfigError(f"{what} {p}: unknown columns {', '.join(map(repr, unknown))} "
                                  f"(allowed besides {', '.join(columns)}: {', '.join(optional)})")
            wanted += [c for c in optional if c in header]
        wanted += [c for c in also if c in header and c not in wanted]
        index = {c: header.index(c) for c in wanted}
        rows = []
        for cells in reader:
            if any(cell.strip() for cell in cells[len(header):]):  # e.g. an unquoted decimal comma
                raise ConfigError(f"{where(what, p, reader.line_num)}: {len(cells)} cells, but the header has "
                                  f"{len(header)} ({','.join(cells)!r}; quote a cell that holds a comma)")
            if any(cell.strip() for cell in cells):
                values = {c: (cells[i].strip() if i < len(cells) else "") for c, i in index.items()}
                rows.append((reader.line_num, values))
    except csv.Error as e:
        raise ConfigError(f"{where(what, p, reader.line_num)}: not valid CSV ({e})") from e
    return rows


def where(what: str, path: str | os.PathLike[str], line: int) -> str:
    """``"<what> <path> line <n>"``: the prefix of a message about one row."""
    return f"{what} {Path(path)} line {line}"


__all__ = ["read_csv_table", "read_text", "where"]
