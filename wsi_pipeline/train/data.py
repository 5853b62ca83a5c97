"""Training data: labelled ROI patches, a class-balanced sampler and seeded augmentation.

ROI sources are either an *ImageFolder* layout (``ROI_DIR/<class>/<image>``) or a CSV with
columns ``path,label`` (relative paths are taken relative to the CSV's folder) and, optionally,
``slide``: patches of one slide then go to training or validation together (never both: patches
cut from one slide, often overlapping, would make validation a test on training tissue). Images are
read once, resized with :func:`wsi_pipeline.embed.dataset.resize_patches` (the resize the
embed stage uses) and kept in memory as ``uint8`` ``(N, 3, S, S)``. Augmentation works on
those ``uint8`` batches, so train and inference images go through the same
:func:`~wsi_pipeline.embed.dataset.normalize`.

Every random choice is drawn from a ``torch.Generator`` passed in by the caller, so a
training run on the CPU is reproducible for a given seed.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..embed.dataset import resize_patches
from ..errors import ConfigError
from ..userfiles import read_csv_table, where

_logger = logging.getLogger(__name__)

#: Image extensions read from an ImageFolder layout.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


@dataclass(frozen=True)
class RoiTable:
    """Image paths with their class labels, in a fixed (sorted) order."""

    paths: tuple[Path, ...]
    labels: tuple[str, ...]
    source: str
    slides: tuple[str, ...] | None = None  # the slide each ROI was cut from (CSV column ``slide``)

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        """Images per label, labels sorted."""
        out: dict[str, int] = {}
        for lab in self.labels:
            out[lab] = out.get(lab, 0) + 1
        return dict(sorted(out.items()))


def load_roi_table(source: str | os.PathLike[str]) -> RoiTable:
    """Read an ImageFolder directory or a ``path,label`` CSV into a :class:`RoiTable`.

    Raises
    ------
    ConfigError
        Missing source, no images, a CSV without ``path``/``label`` columns, or a listed file
        that does not exist.
    """
    src = Path(source)
    if src.is_dir():
        return _image_folder(src)
    if src.is_file():
        return _csv_table(src)
    raise ConfigError(f"ROI data {src} does not exist; give an ImageFolder directory or a path,label CSV")


def _image_folder(root: Path) -> RoiTable:
    rows: list[tuple[Path, str]] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))
        rows += [(f, sub.name) for f in files]
    if not rows:
        raise ConfigError(
            f"{root} holds no class folders with images; use ROI_DIR/<class>/<image>.png or a path,label CSV"
        )
    return RoiTable(tuple(p for p, _ in rows), tuple(lab for _, lab in rows), str(root))


def _csv_table(path: Path) -> RoiTable:
    rows = read_csv_table(path, "ROI CSV", ("path", "label"), also=("slide",))
    if not rows:
        raise ConfigError(f"ROI CSV {path} has no rows")
    slides = _slide_column(path, rows)
    paths, labels = [], []
    for line, row in rows:
        p, lab = row["path"], row["label"]
        if not p or not lab:
            raise ConfigError(f"{where('ROI CSV', path, line)}: empty path or label")
        full = Path(p) if Path(p).is_absolute() else path.parent / p
        if not full.is_file():
            raise ConfigError(
                f"{where('ROI CSV', path, line)}: image {p} not found (relative paths are relative to the CSV)"
            )
        paths.append(full)
        labels.append(lab)
    return RoiTable(tuple(paths), tuple(labels), str(path), slides)


def _slide_column(path: Path, rows: Sequence[tuple[int, dict[str, str]]]) -> tuple[str, ...] | None:
    """The optional ``slide`` column of a ROI CSV's rows (every cell filled), or ``None`` without one
    (images are then split one by one)."""
    if not rows or "slide" not in rows[0][1]:
        return None
    empty = [line for line, row in rows if not row["slide"]]
    if empty:
        raise ConfigError(f"{where('ROI CSV', path, empty[0])}: empty slide (give every row its slide, or none)")
    return tuple(row["slide"] for _, row in rows)


def read_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Read RGB images and resize each to ``size × size``: ``uint8 (N, 3, size, size)``."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                rgb = np.array(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise ConfigError(f"cannot read ROI image {p} ({e}); remove or replace it") from e
        out[i] = resize_patches(rgb[None], size)[0]
    return out


def stratified_split(labels: Sequence[int], fraction: float, seed: int,
                     slides: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)``: ``round(fraction * n_c)`` of each class go to validation.

    A class with one image stays in training. ``fraction == 0`` gives an empty validation set.
    With ``slides``, whole slides go to validation (see :func:`slide_split`).
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"validation fraction must be in [0, 1), got {fraction}")
    if slides is not None:
        return slide_split(labels, fraction, seed, slides)
    y = np.asarray(labels)
    rng = np.random.default_rng([int(seed), 7])
    val: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n_val = min(int(round(fraction * len(idx))), len(idx) - 1)
        if n_val > 0:
            val += rng.permutation(idx)[:n_val].tolist()
    val_idx = np.array(sorted(val), dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    return train_idx, val_idx


def slide_split(labels: Sequence[int], fraction: float, seed: int,
                slides: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` with every slide's images on one side: slides in a seeded
    order go to validation while they keep it within ``round(fraction * n)`` images and leave
    every class at least one training image. No slide is in both."""
    y, g = np.asarray(labels), np.asarray(slides)
    if len(g) != len(y):
        raise ConfigError(f"{len(g)} slides for {len(y)} images")
    target = int(round(fraction * len(y)))
    rng = np.random.default_rng([int(seed), 11])
    left = {c: int((y == c).sum()) for c in np.unique(y)}
    val: list[int] = []
    for slide in rng.permutation(np.unique(g)):
        idx = np.flatnonzero(g == slide)
        taken = {c: int((y[idx] == c).sum()) for c in np.unique(y[idx])}
        if len(val) + len(idx) > target or any(left[c] - k < 1 for c, k in taken.items()):
            continue
        val += idx.tolist()
        for c, k in taken.items():
            left[c] -= k
    val_idx = np.array(sorted(val), dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    return train_idx, val_idx


def epoch_order(labels: torch.Tensor, n: int, generator: torch.Generator, balanced: bool) -> torch.Tensor:
    """``n`` training indices for one epoch.

    ``balanced``: every class is drawn equally often (a uniformly random class, then a random
    image of it: sampling with replacement, as a class-balanced sampler does); otherwise a
    random permutation, repeated as needed.
    """
    m = labels.numel()
    if not balanced:
        reps = math.ceil(n / m)
        return torch.cat([torch.randperm(m, generator=generator) for _ in range(reps)])[:n]
    classes = torch.unique(labels)
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    cls = torch.randint(len(members), (n,), generator=generator)
    out = torch.empty(n, dtype=torch.long)
    for j, idx in enumerate(members):
        sel = cls == j
        k = int(sel.sum())
        if k:
            out[sel] = idx[torch.randint(len(idx), (k,), generator=generator)]
    return out


@dataclass(frozen=True)
class Augment:
    """Seeded augmentation of ``uint8 (B, 3, H, W)`` batches.

    Attributes
    ----------
    flips
        Random horizontal and vertical flips.
    rot90
        Random multiples of 90° (square images).
    brightness, contrast, saturation
        Colour jitter: factors drawn from ``[1 - s, 1 + s]`` per image (0 disables).
    stain
        Per-channel gain drawn from ``[1 - s, 1 + s]`` (stain colour variation; 0 disables).
    """

    flips: bool = True
    rot90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    stain: float = 0.05

    @classmethod
    def off(cls) -> Augment:
        """No augmentation at all."""
        return cls(False, False, 0.0, 0.0, 0.0, 0.0)

    @property
    def enabled(self) -> bool:
        return self.flips or self.rot90 or any((self.brightness, self.contrast, self.saturation, self.stain))

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augmented copy of ``x`` (same dtype and shape); ``x`` is not modified."""
        if not self.enabled:
            return x
        b = x.shape[0]
        # draw every random number up front, in a fixed order, so results depend only on the seed
        r = torch.rand((b, 8), generator=generator)
        rot = torch.randint(4, (b,), generator=generator)
        out = x.clone()
        if self.flips or self.rot90:
            for i in range(b):
                img = out[i]
                if self.flips and r[i, 0] < 0.5:
                    img = img.flip(-1)
                if self.flips and r[i, 1] < 0.5:
                    img = img.flip(-2)
                if self.rot90 and int(rot[i]) and img.shape[-1] == img.shape[-2]:
                    img = torch.rot90(img, int(rot[i]), dims=(-2, -1))
                out[i] = img
        if not any((self.brightness, self.contrast, self.saturation, self.stain)):
            return out
        f = out.float()

        def factor(col: int, s: float) -> torch.Tensor:
            return (1.0 + s * (2.0 * r[:, col] - 1.0)).view(b, 1, 1, 1)

        if self.brightness:
            f = f * factor(2, self.brightness)
        if self.contrast:
            mean = f.mean(dim=(1, 2, 3), keepdim=True)
            f = (f - mean) * factor(3, self.contrast) + mean
        if self.saturation:
            grey = f.mean(dim=1, keepdim=True)
            f = (f - grey) * factor(4, self.saturation) + grey
        if self.stain:
            gains = torch.stack([factor(5 + c, self.stain).view(b) for c in range(3)], dim=1)
            f = f * gains.view(b, 3, 1, 1)
        return f.round_().clamp_(0, 255).to(torch.uint8)


__all__ = [
    "IMAGE_EXTENSIONS",
    "Augment",
    "RoiTable",
    "epoch_order",
    "load_roi_table",
    "read_images",
    "slide_split",
    "stratified_split",
]
