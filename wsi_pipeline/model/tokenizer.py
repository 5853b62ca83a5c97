"""Hugging Face ``tokenizer.json`` files as fixed-length token batches (CONCH, HF CLIP folders).

A ``tokenizer.json`` holds the whole fast tokenizer (normaliser, pre-tokeniser, BPE model,
the post-processor that adds the start/end tokens). The ``tokenizers`` library runs it
exactly as ``transformers``' ``PreTrainedTokenizerFast`` does with ``truncation=True,
padding="max_length"``: the text is truncated so that, with its special tokens, it fits
``length``, then padded with ``pad_id``. Nothing is downloaded; the file comes from the
user's model folder or an installed package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import CheckpointError, one_line


class JsonTokenizer:
    """Texts → ``LongTensor (B, length)`` with the tokenizer in ``path``.

    Parameters
    ----------
    path
        A ``tokenizer.json`` file.
    length
        Output length (truncation keeps the end token; shorter texts are padded).
    pad_token
        Name of the padding token; its id pads (``pad_id`` if the name is unknown).
    pad_id
        Padding id used when ``pad_token`` is ``None`` or not in the vocabulary.
    """

    def __init__(self, path: str | os.PathLike[str], length: int, pad_token: str | None = None, pad_id: int = 0) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # a core dependency; only a broken install lands here
            raise CheckpointError("the 'tokenizers' package is missing; pip install tokenizers") from e
        self.path = Path(path)
        try:
            tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust library raises a bare Exception for unreadable files
            raise CheckpointError(f"tokenizer file {self.path} cannot be read ({one_line(e)})") from e
        self.length = int(length)
        found = tok.token_to_id(pad_token) if pad_token else None
        self.pad_id = int(pad_id if found is None else found)
        self.pad_token = pad_token if found is not None else tok.id_to_token(self.pad_id)
        tok.enable_truncation(max_length=self.length)
        tok.enable_padding(length=self.length, pad_id=self.pad_id, pad_token=self.pad_token or "")
        self._tok = tok

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        encodings = self._tok.encode_batch(texts, add_special_tokens=True)
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def token_id(self, token: str) -> int | None:
        """The id of ``token``, or ``None``."""
        return self._tok.token_to_id(token)


__all__ = ["JsonTokenizer"]
