"""Prompt sampling and text augmentation for training the text tower.

Every step draws, for every class, ``n`` prompts as random *template × synonym*
combinations of the training prompt file and tokenises them with the model's BPE tokenizer.
Two augmentations make the text tower robust to phrasing it never saw:

* **template word dropout**: each word of the template (never of the synonym) is dropped
  with probability ``word_dropout``;
* **random token insertion**: ``0..max_insert`` token ids drawn uniformly from the whole
  vocabulary (special tokens excluded) are inserted at random positions outside the
  synonym, so unseen words in held-out templates look like the noise the model learned
  to ignore.

All draws come from one ``random.Random``, so the token batches depend only on its seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..classify.prompts import PromptSet
from ..errors import ConfigError


@dataclass(frozen=True)
class TextAugment:
    """Text augmentation settings (see module docstring); all zero disables augmentation."""

    word_dropout: float = 0.2
    max_insert: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.word_dropout < 1.0:
            raise ConfigError(f"word dropout must be in [0, 1), got {self.word_dropout}")
        if isinstance(self.max_insert, bool) or not isinstance(self.max_insert, int) or self.max_insert < 0:
            raise ConfigError(f"max inserted tokens must be an integer >= 0, got {self.max_insert!r}")


class PromptSampler:
    """Draws tokenised prompts per class (see module docstring).

    Parameters
    ----------
    prompts
        Training prompt set; its class order is the label order.
    tokenizer
        open_clip ``SimpleTokenizer`` (``encode``, ``sot_token_id``, ``eot_token_id``).
    context_length
        Token sequence length of the text tower.
    vocab_size
        Size of the token embedding (upper bound of inserted ids).
    augment
        :class:`TextAugment`; ``None`` disables augmentation.
    seed
        Seed of the sampler's ``random.Random``.
    """

    def __init__(self, prompts: PromptSet, tokenizer: object, context_length: int, vocab_size: int,
                 augment: TextAugment | None, seed: int) -> None:
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.sot = int(tokenizer.sot_token_id)  # type: ignore[attr-defined]
        self.eot = int(tokenizer.eot_token_id)  # type: ignore[attr-defined]
        self.vocab_size = int(vocab_size)
        self.augment = augment or TextAugment(0.0, 0)
        self.rng = random.Random(int(seed))
        self._encode = tokenizer.encode  # type: ignore[attr-defined]
        self._parts = [self._split(t) for t in prompts.templates]

    def _split(self, template: str) -> tuple[list[str], list[str]]:
        before, _, after = template.partition(self.prompts.placeholder)
        return before.split(), after.split()

    def text(self, class_index: int) -> tuple[str, str, str]:
        """A random ``(before, synonym, after)`` of one class, template words dropped."""
        cls = self.prompts.class_names[class_index]
        syn = self.rng.choice(self.prompts.classes[cls])
        before, after = self.rng.choice(self._parts)
        p = self.augment.word_dropout
        if p > 0:
            before = [w for w in before if self.rng.random() >= p]
            after = [w for w in after if self.rng.random() >= p]
        return " ".join(before), syn, " ".join(after)

    def tokens(self, before: str, synonym: str, after: str) -> list[int]:
        """Token ids (no SOT/EOT) of one prompt, with random tokens inserted."""
        head = self._encode(before) if before else []
        syn = self._encode(synonym)
        tail = self._encode(after) if after else []
        k = self.rng.randint(0, self.augment.max_insert) if self.augment.max_insert else 0
        for _ in range(k):
            tok = self.rng.randrange(0, self.vocab_size)
            while tok in (self.sot, self.eot):
                tok = self.rng.randrange(0, self.vocab_size)
            pos = self.rng.randint(0, len(head) + len(tail) + 1)  # never inside the synonym
            if pos <= len(head):
                head.insert(pos, tok)
            else:
                tail.insert(pos - len(head) - 1, tok)
        return head + syn + tail

    def pad(self, ids: list[int]) -> list[int]:
        """SOT + ids + EOT, truncated (EOT kept last) and zero-padded to the context length."""
        seq = [self.sot, *ids, self.eot]
        if len(seq) > self.context_length:
            seq = seq[: self.context_length]
            seq[-1] = self.eot
        return seq + [0] * (self.context_length - len(seq))

    def sample(self, n_per_class: int) -> torch.Tensor:
        """``LongTensor (C * n, context_length)``, class-major: rows ``c*n .. c*n+n-1`` are class ``c``."""
        rows = []
        for c in range(len(self.prompts.class_names)):
            for _ in range(n_per_class):
                rows.append(self.pad(self.tokens(*self.text(c))))
        return torch.tensor(rows, dtype=torch.long)


class PromptBank:
    """Prompt embeddings of a *frozen* text tower, encoded once, sampled per step.

    With the text tower frozen (adapter training) the token-level augmentation above cannot
    change anything the tower learns, so every template × synonym prompt of each class is
    encoded once with the model's own tokenizer (any backbone: CONCH, HF CLIP, open_clip) and
    each step draws ``n`` of them per class, with replacement, from a seeded generator.
    """

    def __init__(self, model: object, prompts: PromptSet, seed: int, batch_size: int = 64) -> None:
        self.class_names = prompts.class_names
        expanded = prompts.expand()
        self.embeddings: list[torch.Tensor] = []
        for cls in self.class_names:
            texts = expanded[cls]
            parts = [model.encode_prompts(texts[i : i + batch_size])  # type: ignore[attr-defined]
                     for i in range(0, len(texts), batch_size)]
            self.embeddings.append(torch.cat(parts).float().cpu())
        self.generator = torch.Generator().manual_seed(int(seed))

    def sample(self, n_per_class: int) -> torch.Tensor:
        """``(C * n, D)`` prompt embeddings, class-major like :meth:`PromptSampler.sample`."""
        rows = []
        for emb in self.embeddings:
            rows.append(emb[torch.randint(len(emb), (n_per_class,), generator=self.generator)])
        return torch.cat(rows)


__all__ = ["PromptBank", "PromptSampler", "TextAugment"]
