"""``--shard i/n``: a deterministic split of the slides for schedulers without Ray (Slurm arrays).

A slide belongs to shard ``sha1(slide_id) mod n``, so the ``n`` jobs ``0/n … (n-1)/n``
cover every slide exactly once, whatever order or machine they run on, and a slide keeps
its shard when other slides are added or removed. ``i`` is 0-based, like
``$SLURM_ARRAY_TASK_ID`` with ``--array=0-(n-1)``.

>>> shard = parse_shard("1/4")
>>> [s for s in ["a", "b", "c", "d", "e"] if shard.contains(s)]
['b']
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import ConfigError

T = TypeVar("T")


def shard_index(slide_id: str, count: int) -> int:
    """The shard (``0 … count-1``) of ``slide_id``: the first 8 bytes of its sha1 (NFC UTF-8), mod ``count``."""
    key = unicodedata.normalize("NFC", slide_id).encode("utf-8")
    return int.from_bytes(hashlib.sha1(key).digest()[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"--shard: n must be an integer >= 1, got {self.count!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise ConfigError(
                f"--shard {self.index}/{self.count}: i must be 0..{self.count - 1} (0-based, e.g. "
                f"$SLURM_ARRAY_TASK_ID/{self.count} with --array=0-{self.count - 1})"
            )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """File-name-safe form, ``shard-<i>-of-<n>``."""
        return f"shard-{self.index}-of-{self.count}"

    def contains(self, slide_id: str) -> bool:
        return shard_index(slide_id, self.count) == self.index

    def select(self, items: Iterable[T], key: Callable[[T], str] = str) -> list[T]:
        """The items whose ``key`` (slide id) falls in this shard, in their input order."""
        return [x for x in items if self.contains(key(x))]


def parse_shard(text: str | None) -> Shard | None:
    """``"i/n"`` → :class:`Shard`; ``None`` or ``""`` → ``None``; anything else → :class:`ConfigError`."""
    if text is None or str(text).strip() == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ConfigError(f"--shard {text!r}: give i/n with 0 <= i < n, e.g. 0/4")
    return Shard(int(m.group(1)), int(m.group(2)))


__all__ = ["Shard", "parse_shard", "shard_index"]
