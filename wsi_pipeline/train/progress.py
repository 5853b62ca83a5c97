"""Training progress hooks: the library reports, a caller-supplied object draws.

:class:`NullTrainProgress` reports nothing (the default); :class:`TqdmTrainProgress`
draws one tqdm bar per epoch on stderr and is meant to be passed in by the CLI.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol


class TrainProgress(Protocol):
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, loss: float) -> None: ...

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullTrainProgress:
    """Reports nothing."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self, loss: float) -> None:
        pass

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmTrainProgress:
    """One bar per epoch (steps, running loss); the epoch's validation accuracy in the postfix."""

    def __init__(self, file: Any = None) -> None:
        self.file = file or sys.stderr
        self.bar: Any = None
        self._sum = 0.0
        self._n = 0

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        from tqdm import tqdm

        self.close()
        self._sum, self._n = 0.0, 0
        self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="step", file=self.file,
                        dynamic_ncols=True)

    def step(self, loss: float) -> None:
        self._sum += loss
        self._n += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {self._sum / self._n:.4f}", refresh=False)

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        if self.bar is not None:
            extra = f", val bacc {record['val_bacc']:.3f}" if "val_bacc" in record else ""
            self.bar.set_postfix_str(f"loss {record.get('loss', float('nan')):.4f}{extra}")
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = ["NullTrainProgress", "TqdmTrainProgress", "TrainProgress"]
