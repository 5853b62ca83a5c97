"""Content fingerprint of a slide file: tells a replaced slide from the one that was tiled.

Resume (``tile`` and ``embed`` skip a slide whose outputs validate) must notice when the
file behind a slide id is another scan with the same name, size and resolution. The
fingerprint is a SHA-256 over the file's size and content:

* files up to :data:`WHOLE_FILE_MAX_BYTES` (8 MiB: ROI images, small slides) are hashed whole;
* larger files are sampled: the first and the last :data:`EDGE_BYTES` (1 MiB each: the TIFF
  header and usually its first directory, and at the end the label and macro images or the
  last directories, which name the physical slide) and :data:`N_SAMPLES` blocks of
  :data:`SAMPLE_BYTES` spread evenly over the rest (compressed tile data, different in any
  two scans). That is 4 MiB read per slide, whatever its size: a few milliseconds from a
  local disk, well under a second from a network share, against minutes of tiling.

A slide that is a folder (a DICOM WSI) is fingerprinted over the names and contents of the
regular files directly in it. Only content counts (never the path or the modification
time), so a copied or moved slide keeps its fingerprint and repeated runs record the same
value. A file edited in place within one unsampled block is not noticed; a re-scan or
another slide always is.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..errors import SlideOpenError

#: Bumped when the hashed bytes change; part of the value, so old and new never compare equal.
FINGERPRINT_VERSION = 1
WHOLE_FILE_MAX_BYTES = 8 * 2**20
EDGE_BYTES = 2**20
N_SAMPLES = 32
SAMPLE_BYTES = 64 * 2**10
_READ = 2**20


def slide_fingerprint(path: str | os.PathLike[str]) -> str:
    """``"v1:sha256:<hex>"`` over the content of the slide file (or slide folder) at ``path``.

    Raises :class:`~wsi_pipeline.errors.SlideOpenError` when it cannot be read.
    """
    h = hashlib.sha256()
    p = Path(path)
    try:
        if p.is_dir():
            for member in sorted(e for e in p.iterdir() if not e.name.startswith(".") and e.is_file()):
                h.update(member.name.encode("utf-8") + b"\0")
                _hash_file(h, member)
        else:
            _hash_file(h, p)
    except OSError as e:
        raise SlideOpenError(f"{p}: cannot read it to fingerprint its content: {e.strerror or e}") from e
    return f"v{FINGERPRINT_VERSION}:sha256:{h.hexdigest()}"


def _hash_file(h: Any, path: Path) -> None:
    """Feed the size and the whole content (small files) or the sampled blocks (large ones) to ``h``."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        if size <= WHOLE_FILE_MAX_BYTES:
            while chunk := fh.read(_READ):
                h.update(chunk)
            return
        for offset, length in sample_ranges(size):
            fh.seek(offset)
            h.update(fh.read(length))


def sample_ranges(size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the blocks hashed from a file of ``size`` bytes (above the whole-file limit)."""
    inner = size - 2 * EDGE_BYTES - SAMPLE_BYTES
    samples = [(EDGE_BYTES + inner * i // (N_SAMPLES - 1), SAMPLE_BYTES) for i in range(N_SAMPLES)]
    return [(0, EDGE_BYTES), *samples, (size - EDGE_BYTES, EDGE_BYTES)]


__all__ = ["FINGERPRINT_VERSION", "sample_ranges", "slide_fingerprint"]
