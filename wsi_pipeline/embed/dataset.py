"""A torch Dataset over the read regions of one slide.

Each item is one region: the patches cut from it that could be read, already resized to the
model input (uint8, so that host→device copies are 4× smaller than float), their indices
into the coords array, and the indices of the patches that could not be read (left out:
they are never resized nor embedded). Normalisation (mean/std) happens on the device. The
:class:`~wsi_pipeline.slide.Slide` reopens its handle in each worker process,
so the dataset works with fork and spawn start methods alike.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..slide import Slide
from .regions import ReadPlan, read_region_patches


def resize_patches(patches: np.ndarray, size: int) -> torch.Tensor:
    """(k, p, p, 3) uint8 → (k, 3, size, size) uint8, bilinear with antialiasing.

    The one resize used everywhere (embedding, tests, training), so features computed by
    the pipeline and by hand from the same pixels agree. It runs on uint8 in channels-last
    layout (torch's fast path: ~15× faster than a float resize, within one grey level of it).
    """
    t = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2)  # a channels-last view
    if t.shape[-1] == size and t.shape[-2] == size:
        return t
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def normalize(batch_u8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device → normalised float tensor of ``dtype``."""
    m = torch.tensor(mean, device=batch_u8.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=batch_u8.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return ((batch_u8.float() - m) / s).to(dtype)


class RegionDataset(Dataset):
    """Items per region: ``(indices (j,), patches uint8 (j, 3, S, S), failed_indices (m,))``.

    ``indices`` and ``patches`` are the region's readable patches, ``failed_indices`` its
    unreadable ones (indices into the coords array, int64; ``j + m`` = the region's patches).
    """

    def __init__(self, slide: Slide, coords: np.ndarray, plan: ReadPlan, input_size: int) -> None:
        self.slide = slide
        self.coords = np.asarray(coords, dtype=np.int64)
        self.plan = plan
        self.input_size = int(input_size)

    def __len__(self) -> int:
        return len(self.plan.regions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        region = self.plan.regions[i]
        patches, failed = read_region_patches(self.slide, self.plan, region, self.coords)
        read = ~failed
        if read.all():
            resized = resize_patches(patches, self.input_size)
        elif read.any():
            resized = resize_patches(patches[read], self.input_size)
        else:
            resized = torch.zeros((0, 3, self.input_size, self.input_size), dtype=torch.uint8)
        return torch.from_numpy(region.indices[read]), resized, torch.from_numpy(region.indices[failed])


def make_loader(
    dataset: RegionDataset,
    *,
    workers: int,
    pin_memory: bool,
    mp_context: str | None = None,
    prefetch_factor: int = 4,
) -> DataLoader:
    """One region per item, in plan order (DataLoader keeps order with workers too)."""
    kwargs: dict[str, object] = {}
    if workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor
        if mp_context:
            kwargs["multiprocessing_context"] = mp_context
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory, **kwargs)
