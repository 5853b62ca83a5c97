"""One slide through one stage: the skeleton ``tile``, ``embed`` and ``classify`` share.

A stage supplies only its per-slide work (validate what is there, compute, write its outputs
atomically) and how it spells a result; :class:`SlideStep` does the rest, the same way for
every stage::

    take the slide's lock (optional)  →  remove temporary files a dead holder left
    →  work()  →  one status row  →  release the lock

and maps whatever the work raises to one result:

* :class:`~wsi_pipeline.errors.SlideLockedError` (another live run holds the slide) → ``skipped``;
* a :class:`~wsi_pipeline.errors.WsiPipelineError` → ``failed`` with its first line;
* an error the stage knows how to explain (``explain``, e.g. a truncated feature file) →
  ``failed`` with that explanation;
* anything else (a bug, an unexpected library error) → ``failed``,
  ``unexpected <Type>: <first line> (rerun with -v for details)``, traceback in the debug log.

A worker that dies under an executor (a Ray actor killed by the OOM killer) never reaches
that code: :func:`worker_died` records its status row and result instead.

>>> step = SlideStep("tile", "out/", locks=SlideLocks("out/", "tile"))     # doctest: +SKIP
>>> result = step.run("slide-1", work, failed=fail, skipped=skip, outputs=[coords_path])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..errors import SlideLockedError, WsiPipelineError, one_line
from ..store.status import StatusRow, append_status
from .locks import SlideLocks, remove_temps_of

_logger = logging.getLogger(__name__)


class SlideResult(Protocol):
    """What a stage returns per slide (a dataclass: ``seconds`` is set with ``dataclasses.replace``)."""

    slide_id: str
    status: str
    reason: str
    n_patches: int | None
    seconds: float


R = TypeVar("R", bound=SlideResult)


@dataclass(frozen=True)
class SlideStep:
    """Runs one stage's per-slide work under the shared lock / error / status discipline.

    Parameters
    ----------
    stage : the stage name written into ``status.csv`` (``tile``, ``embed``, ``classify``).
    out_dir : the output folder that holds ``status.csv`` (``None``: no status rows, e.g. a benchmark).
    locks : the stage's per-slide locks; ``None`` for a stage that takes none (``classify``
        writes only per-slide files named by its prompts, each through a rename).
    explain : a stage's one-line explanation of a library error it knows (``None`` when it
        does not know it: the error is then reported as unexpected).
    """

    stage: str
    out_dir: str | os.PathLike[str] | None
    locks: SlideLocks | None = None
    explain: Callable[[Exception], str | None] | None = None

    def run(self, slide_id: str, work: Callable[[], R], *, failed: Callable[[str], R],
            skipped: Callable[[str], R] | None = None, outputs: Iterable[Path] = (),
            seconds_from: float | None = None) -> R:
        """``work()``'s result, or ``failed(reason)`` / ``skipped(reason)``; never raises for a bad slide.

        ``outputs`` are the slide's final output paths: once the lock is held, any temporary
        file beside them belongs to a dead run and is removed. ``seconds_from`` is the
        ``time.perf_counter()`` the slide's time counts from (default: now).
        """
        t0 = time.perf_counter() if seconds_from is None else seconds_from
        lock = None
        try:
            try:
                if self.locks is not None:
                    lock = self.locks.acquire(slide_id)
                for final in outputs:
                    remove_temps_of(final)
                result = work()
            except SlideLockedError as e:
                if skipped is None:
                    raise
                _logger.info("%s: skipped, %s", slide_id, e)
                result = skipped(str(e))
            except WsiPipelineError as e:
                result = failed(one_line(e))
            except Exception as e:
                reason = self.explain(e) if self.explain is not None else None
                if reason is None:  # a bug or an unexpected library error: still one line, the batch goes on
                    _logger.debug("%s: unexpected error", slide_id, exc_info=True)
                    reason = f"unexpected {type(e).__name__}: {one_line(e)} (rerun with -v for details)"
                result = failed(reason)
            result = dataclasses.replace(result, seconds=time.perf_counter() - t0)  # type: ignore[type-var]
            if result.status == "failed":
                _logger.error("%s: %s", slide_id, result.reason)
            self.record(result)
        finally:
            if lock is not None:
                lock.release()
        return result

    def record(self, result: SlideResult) -> None:
        """Append ``result``'s row to ``status.csv``."""
        if self.out_dir is not None:
            append_status(self.out_dir, StatusRow(result.slide_id, self.stage, result.status, result.reason,
                                                  result.n_patches, result.seconds))


def worker_died(stage: str, out_dir: str | os.PathLike[str], failed: Callable[[Any, str], Any], item: Any,
                reason: str) -> Any:
    """``WorkerSpec.on_error`` of every stage, bound as ``functools.partial(worker_died, stage,
    out_dir, failed)``: the result of an item whose worker died (a Ray actor killed by the OOM
    killer) or raised past :meth:`SlideStep.run`, ``failed(item, reason)``, with its status row."""
    result = failed(item, reason)
    SlideStep(stage, out_dir).record(result)
    return result


__all__ = ["SlideResult", "SlideStep", "worker_died"]
