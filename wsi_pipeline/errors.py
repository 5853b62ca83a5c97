"""Typed exception hierarchy.

Every error a user can cause by their input is a :class:`WsiPipelineError`. The CLI turns
these into one clear line (and a ``status.csv`` row for per-slide errors) instead of a
traceback; anything else is a bug and keeps its traceback.

::

    WsiPipelineError
    ├── ConfigError                 bad option, YAML config or CSV
    │   └── PromptFileError         bad prompt file (names field and position)
    ├── SlideError                  something wrong with one slide (the batch goes on)
    │   ├── SlideOpenError          the file cannot be opened at all
    │   │   └── UnsupportedFormatError
    │   ├── SlideReadError          a region could not be read (after one reopen)
    │   ├── MissingMppError         no physical resolution and no override given
    │   └── TooManyFailedPatchesError
    ├── OutputError                 output folder or file problem
    │   └── CorruptOutputError      an existing output does not validate
    ├── CheckpointError             weights file missing, truncated or of another architecture
    └── SlideLockedError            another live run holds the slide's lock (the slide is skipped)
"""

from __future__ import annotations


class WsiPipelineError(Exception):
    """Base class of every error caused by user input or the environment."""


class ConfigError(WsiPipelineError):
    """An option, preset file or CSV is invalid."""


class PromptFileError(ConfigError):
    """A prompt file is invalid; the message names the field and its position."""


class SlideError(WsiPipelineError):
    """A problem with one slide; the batch records it and goes on."""


class SlideOpenError(SlideError):
    """The slide file cannot be opened by any backend."""


class UnsupportedFormatError(SlideOpenError):
    """No backend recognises the file format (or the extension is not a slide format)."""


class SlideReadError(SlideError):
    """Reading pixels failed, also after reopening the slide once."""


class MissingMppError(SlideError):
    """The slide has no physical resolution and neither --mpp-csv nor --default-mpp covers it."""


class TooManyFailedPatchesError(SlideError):
    """More than the tolerated share of a slide's patches could not be read."""


class OutputError(WsiPipelineError):
    """The output folder is not writable or an output could not be written."""


class CorruptOutputError(OutputError):
    """An existing output file does not validate (partial, truncated or from other settings)."""


class CheckpointError(WsiPipelineError):
    """A weights file is missing, truncated, unsafe or does not match the architecture."""


class SlideLockedError(WsiPipelineError):
    """Another live run holds this slide's lock file; the slide is skipped here, not failed.

    ``holder`` is the :class:`~wsi_pipeline.runtime.locks.LockInfo` of that run (or ``None``).
    """

    def __init__(self, message: str, holder: object = None) -> None:
        super().__init__(message)
        self.holder = holder

    def __reduce__(self) -> tuple[object, ...]:  # keeps ``holder`` across processes (Ray)
        return (type(self), (str(self), self.holder))


def one_line(exc: BaseException, *, sentence: bool = False) -> str:
    """The first line of ``exc``'s message (its type name when the message is empty).

    ``sentence=True`` keeps only the first sentence, without its full stop: for third-party
    messages that go on for a paragraph.
    """
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text.split(". ")[0].rstrip(".") if sentence else text


__all__ = [
    "CheckpointError",
    "ConfigError",
    "CorruptOutputError",
    "MissingMppError",
    "OutputError",
    "PromptFileError",
    "SlideError",
    "SlideLockedError",
    "SlideOpenError",
    "SlideReadError",
    "TooManyFailedPatchesError",
    "UnsupportedFormatError",
    "WsiPipelineError",
    "one_line",
]
