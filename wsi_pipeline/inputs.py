"""Input expansion shared by every verb: files, folders and ``@list.txt`` files."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import ConfigError
from .userfiles import read_text

_logger = logging.getLogger(__name__)


def slide_extensions() -> frozenset[str]:
    """Every file extension a registered slide backend opens (lower case, with the dot)."""
    from .slide import registered_backends

    return frozenset(e for spec in registered_backends() for e in spec.extensions)


def collect_inputs(paths: Iterable[str | os.PathLike[str]], recursive: bool = False) -> list[Path]:
    """Expand ``paths`` into slide / ROI image files.

    Parameters
    ----------
    paths : iterable of path
        Files (kept as given), folders (expanded to the files whose extension a registered
        slide backend knows; sorted; hidden files skipped) and ``@list.txt`` files (one path
        per line, ``#`` comments and blank lines skipped; relative entries are resolved
        against the list's folder when they exist there). A list entry that is not a file is
        kept, with a warning: the stage records it as a failed slide and goes on.
    recursive : bool
        Descend into sub-folders of folder inputs.

    Returns
    -------
    list of Path
        In input order, duplicates (same resolved file) removed.

    Raises
    ------
    ConfigError
        An input given directly does not exist, a folder holds no slide files, a list
        cannot be read, or nothing was given at all.
    """
    out: list[Path] = []
    for item in paths:
        text = os.fspath(item)
        if text.startswith("@") and len(text) > 1:
            out.extend(_read_list(Path(text[1:])))
            continue
        p = Path(text)
        if p.is_dir():
            out.extend(_expand_folder(p, recursive))
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"input {text!r} does not exist; give slide files, folders or @list.txt")
    if not out:
        raise ConfigError("no input slides given; pass slide files, folders or @list.txt")
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _expand_folder(folder: Path, recursive: bool) -> list[Path]:
    exts = slide_extensions()
    found = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(
        f for f in found
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in exts
    )
    if not files:
        hint = "" if recursive else "; add --recursive to search sub-folders"
        raise ConfigError(f"no slide files in folder {folder} (slides or ROI images: {' '.join(sorted(exts))}){hint}")
    return files


def _read_list(list_file: Path) -> list[Path]:
    lines = read_text(list_file, "slide list").splitlines()
    out = []
    for lineno, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        q = Path(entry)
        if not q.is_absolute() and (list_file.parent / q).exists():
            q = list_file.parent / q
        if not q.is_file():  # recorded as a failed slide later; the rest of the batch goes on
            _logger.warning("slide list %s line %d: %r is not a file", list_file, lineno, entry)
        out.append(q)
    return out


__all__ = ["collect_inputs", "slide_extensions"]
