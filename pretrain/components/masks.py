"""Patch masks: iBOT / DINOv2 block masks of the student's global crops, MAE random masking.

Masks are rectangles of patches (BEiT-style blocks) rather than scattered patches: a scattered
patch is trivially in-painted from its neighbours, a block has to be understood. As in DINOv2's
collate, only a fraction of the global crops is masked (mask_probability, 0.5) and the masked
crops get mask ratios spread evenly over [min, max] (0.1-0.5): crop i of n draws its ratio
uniformly in the i-th of n equal bins, so one batch always covers the whole range.

Randomness comes from the `random` module (or a given random.Random): DataLoader workers reseed
it per worker, so workers do not repeat each other's masks.

They are built in the loader's collate (DINOv2's collate_data_and_cast), i.e. in the DataLoader
workers, so the training step never waits for them.

Example:
    >>> import random
    >>> masks = sample_crop_masks(4, BlockMaskGenerator(4, rng=random.Random(0)), rng=random.Random(0))
    >>> masks.shape, int((masks.sum(dim=1) > 0).sum())  # 4 crops of 16 patches, half masked
    (torch.Size([4, 16]), 2)
"""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import torch
from torch.utils.data import default_collate

logger = logging.getLogger(__name__)


class BlockMaskGenerator:
    """Masks of a (height, width) patch grid built from random rectangles (DINOv2 MaskingGenerator).

    __call__(n) returns a bool array with about n masked patches (never more; fewer when no
    rectangle fits what is left of the budget within 10 tries).
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        # DINOv2: one rectangle covers at most half of the grid.
        self.max_num_patches = (
            0.5 * self.num_patches if max_num_patches is None else max_num_patches
        )
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = rng if rng is not None else random

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator({self.height}x{self.width}, blocks of {self.min_num_patches}-"
            f"{self.max_num_patches:g} patches)"
        )

    def _add_block(self, mask: np.ndarray, max_mask_patches: float) -> int:
        """Try (up to 10 times) to add one rectangle; return how many new patches it masked."""
        delta = 0
        for _ in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    delta = new
            if delta > 0:
                break
        return delta

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, budget)
            if delta == 0:
                break
            count += delta
        return mask


def sample_crop_masks(
    n_crops: int,
    generator: BlockMaskGenerator,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """(n_crops, n_patches) bool masks: int(n_crops * p) crops masked with spread ratios, rest empty,
    in random order (DINOv2 collate_data_and_cast)."""
    rng = rng if rng is not None else random
    n_patches = generator.num_patches
    n_masked_crops = int(n_crops * mask_probability)
    bins = np.linspace(mask_ratio_min_max[0], mask_ratio_min_max[1], n_masked_crops + 1)
    masks = []
    for i in range(n_masked_crops):
        ratio = rng.uniform(float(bins[i]), float(bins[i + 1]))
        masks.append(generator(int(n_patches * ratio)))
    masks += [np.zeros((generator.height, generator.width), dtype=bool)] * (
        n_crops - n_masked_crops
    )
    rng.shuffle(masks)
    if not masks:
        return torch.zeros(0, n_patches, dtype=torch.bool)
    return torch.from_numpy(np.stack(masks).reshape(n_crops, n_patches))


def random_masking(
    batch: int, n_patches: int, mask_ratio: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample shuffle: (ids_keep (B, K), mask (B, N) 1 = removed, ids_restore (B, N)).

    Each image keeps a random int(N * (1 - mask_ratio)) of its patches (argsort of uniform noise).
    """
    n_keep = int(n_patches * (1 - mask_ratio))
    if n_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch out of {n_patches}")
    noise = torch.rand(batch, n_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(batch, n_patches, device=device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


class MultiCropCollate:
    """Per-sample multi-crop views -> one crop-major batch with iBOT masks, in the loader workers
    (DINOv2's collate_data_and_cast).

    A sample is (views, label...) with views = {"global_crops": [C x H x W, ...], "local_crops":
    [...]} as a multi-crop transform makes them. The batch is ({"global_crops": (n_global*B, C, H,
    W) crop-major [crop 0 of every image, crop 1 of every image], "local_crops": (n_local*B, ...)
    or None, "masks": (n_global*B, n_patches) bool or None, "mask_indices": flat indices of the
    masked patches or None}, labels). No mask generator: no masks.
    """

    def __init__(
        self,
        mask_generator: BlockMaskGenerator | None = None,
        mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
    ) -> None:
        self.mask_generator = mask_generator
        self.mask_ratio_min_max = tuple(mask_ratio_min_max)
        self.mask_probability = mask_probability

    def crops(self, views: dict) -> dict[str, torch.Tensor | None]:
        """Views collated per crop ({"global_crops": [B x ...] per crop, ...}) -> the batch dict."""
        global_crops = torch.cat(list(views["global_crops"]))
        local = list(views.get("local_crops") or [])
        masks = mask_indices = None
        if self.mask_generator is not None:
            masks = sample_crop_masks(
                global_crops.shape[0],
                self.mask_generator,
                self.mask_ratio_min_max,
                self.mask_probability,
            )
            mask_indices = masks.flatten().nonzero().flatten()
        return {
            "global_crops": global_crops,
            "local_crops": torch.cat(local) if local else None,
            "masks": masks,
            "mask_indices": mask_indices,
        }

    def __call__(self, samples: list) -> tuple:
        """[(views, label[, key]), ...] -> (batch dict, labels[, keys])."""
        views = default_collate([s[0] for s in samples])
        rest = [default_collate(list(column)) for column in zip(*(s[1:] for s in samples))]
        return (self.crops(views), *rest)
