"""Progress reporting hooks.

Library code reports progress through this small interface and never draws anything
itself; the CLI passes a tqdm-backed implementation (or the silent default).
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, total_slides: int) -> None: ...

    def start_slide(self, slide_id: str, total_items: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def end_slide(self, slide_id: str, status: str) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """Reports nothing."""

    def start(self, total_slides: int) -> None:
        pass

    def start_slide(self, slide_id: str, total_items: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def end_slide(self, slide_id: str, status: str) -> None:
        pass

    def close(self) -> None:
        pass
