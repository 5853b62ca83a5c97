"""Input expansion shared by every verb: files, folders and ``@list.txt`` files.

A slide is a file, or a folder that a backend opens as one slide: a DICOM WSI is a folder
of ``.dcm`` files (one per pyramid level, plus label and overview instances) and is
found, named (by the folder) and counted as one slide wherever it sits.

Nothing that looks like a slide is dropped silently: a broken symbolic link, a link loop or
a FIFO named like a slide is kept, so that the stage records it as a failed slide, with its
reason in one line and a status row. A wsi-pipeline output folder (see
:func:`is_output_folder`) is never searched for slides, so that ``-o`` inside an input
folder does not feed a run its own thumbnails and montages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import ConfigError
from .userfiles import read_text

_logger = logging.getLogger(__name__)

#: A folder holding this file (every run appends to it) is a wsi-pipeline output folder.
OUTPUT_MARKER = "status.csv"
#: ... as is one holding these folders (made by ``tile`` before any slide is done).
OUTPUT_FOLDERS = ("coords", "thumbnails", "tissue")


def slide_extensions() -> frozenset[str]:
    """Every file extension a registered slide backend opens (lower case, with the dot)."""
    from .slide import registered_backends

    return frozenset(e for spec in registered_backends() for e in spec.extensions)


def _folder_slide_extensions() -> frozenset[str]:
    """Extensions of the files that make their folder one slide (``.dcm``)."""
    from .slide.base import folder_member_extensions

    return folder_member_extensions()


def _is_folder_slide(folder: Path) -> bool:
    """A folder that directly holds the member files of a multi-file slide (a DICOM WSI)."""
    from .slide.base import find_folder_members

    return find_folder_members(folder) is not None


def _path_problem(path: Path) -> str | None:
    from .slide.base import path_problem

    return path_problem(path)


def is_output_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a wsi-pipeline output folder (it holds ``status.csv``, or the
    ``coords``, ``thumbnails`` and ``tissue`` folders that ``tile`` makes first)."""
    p = Path(folder)
    return (p / OUTPUT_MARKER).is_file() or all((p / sub).is_dir() for sub in OUTPUT_FOLDERS)


def collect_inputs(paths: Iterable[str | os.PathLike[str]], recursive: bool = False) -> list[Path]:
    """Expand ``paths`` into slide / ROI image files.

    Parameters
    ----------
    paths : iterable of path
        Files (kept as given), folders (expanded to the files whose extension a registered
        slide backend knows, and to the sub-folders that are one slide each, such as a DICOM
        WSI; sorted; hidden files skipped) and ``@list.txt`` files (one path per line, ``#``
        comments and blank lines skipped; relative entries are resolved against the list's
        folder when they exist there). A list entry that is not a file is kept, with a
        warning: the stage records it as a failed slide and goes on; so is (without a
        warning: the stage's line says why) an entry of a folder named like a slide that is
        no regular file (a broken link, a link loop, a FIFO), and such an input given
        directly. A folder that is itself one slide (holds ``.dcm`` files) is that slide,
        plus any other slide files in it; a ``.dcm`` file stands for its folder, so two
        files of one DICOM WSI are one slide.
    recursive : bool
        Descend into sub-folders of folder inputs (the ``.dcm`` files of a DICOM WSI found
        on the way are its folder, never slides of their own). wsi-pipeline output folders
        are never descended into (a folder input that is one gives its own slide files only).

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
            out.append(_as_slide(p))
        elif os.path.lexists(p):  # a broken link, a link loop, a FIFO: the stage fails it in one line
            _logger.debug("input %s: %s", text, _path_problem(p))
            out.append(p)
        else:
            raise ConfigError(f"input {text!r} does not exist; give slide files, folders or @list.txt")
    if not out:
        raise ConfigError("no input slides given; pass slide files, folders or @list.txt")
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.realpath(p)  # never raises (Path.resolve does on a link loop)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _expand_folder(folder: Path, recursive: bool) -> list[Path]:
    exts = slide_extensions() - _folder_slide_extensions()
    found = _folder_slides(folder, exts, recursive, top=True)
    if not found:
        hint = "" if recursive else "; add --recursive to search sub-folders"
        known = " ".join(sorted(exts | _folder_slide_extensions()))
        raise ConfigError(f"no slide files in folder {folder} (slides or ROI images: {known}){hint}")
    return sorted(found)


def _folder_slides(folder: Path, exts: frozenset[str], recursive: bool, top: bool) -> list[Path]:
    """Slides in ``folder``: the folder itself when it is one (DICOM), its slide files, and its
    sub-folders that are one slide each (all of them, at any depth, when ``recursive``)."""
    out = [folder] if _is_folder_slide(folder) else []
    if not top and not recursive:
        return out
    own_outputs = is_output_folder(folder)  # a folder input that is also -o: its own slide files only
    if own_outputs and recursive:
        _logger.warning("%s is also a wsi-pipeline output folder: its sub-folders are not searched for slides",
                        folder)
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():  # a linked folder is looked at, not descended into (no loops)
            if own_outputs or is_output_folder(entry):
                _logger.info("%s: not searched for slides (a wsi-pipeline output folder or part of one)", entry)
                continue
            out.extend(_folder_slides(entry, exts, recursive and not entry.is_symlink(), top=False))
        elif entry.suffix.lower() in exts:
            if not entry.is_file():  # failed by the stage in one line and a status row, never dropped
                _logger.debug("%s: %s", entry, _path_problem(entry))
            out.append(entry)
    return out


def _as_slide(path: Path) -> Path:
    """The slide a file given directly stands for: its folder for a member of a multi-file
    slide (a ``.dcm`` file of a DICOM WSI), else the file itself."""
    return path.parent if path.suffix.lower() in _folder_slide_extensions() else path


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
        if q.is_file():
            q = _as_slide(q)
        elif not (q.is_dir() and _is_folder_slide(q)):  # recorded as a failed slide later; the batch goes on
            _logger.warning("slide list %s line %d: %r: %s", list_file, lineno, entry,
                            _path_problem(q) or "a folder, not a slide")
        out.append(q)
    return out


__all__ = ["collect_inputs", "is_output_folder", "slide_extensions"]
