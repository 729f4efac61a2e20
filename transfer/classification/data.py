"""VOC2007 image-level labels as training crops and test crop stacks.

Randomness is keyed, not streamed: training sample number k (k = iteration * batch + slot)
draws its image from a per-epoch permutation seeded by (seed, epoch) and its crop from a
generator seeded by (seed, k); test image i draws its crops from (seed, i). A resumed run
therefore sees exactly the batches the uninterrupted run would have seen, whatever the
number of workers or processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from benchmark.datasets.folder import load_rgb
from benchmark.datasets.voc import classification_targets, load_detection
from benchmark.errors import DatasetError

from .config import AugmentConfig, EvalConfig
from .presets import center_crop, random_crop, ten_random_crops

# Stream tags that keep the generators of different purposes apart.
_ORDER, _TRAIN, _TEST, _RESCALE = 1, 2, 3, 4


class VOCImages:
    """Image paths, ids, labels (N, 20) float {0,1} and difficult (N, 20) bool of a split."""

    def __init__(self, voc_root: Path, split: str) -> None:
        voc_root = Path(voc_root)
        annotations = load_detection(voc_root, split)
        self.ids = [a.image_id for a in annotations]
        self.paths = [voc_root / "JPEGImages" / a.filename for a in annotations]
        # Check up front: an error raised inside a loader worker arrives as a traceback.
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise DatasetError(
                f"{missing[0]}: image file not found ({len(missing)} of split '{split}' missing)"
            )
        self.labels, self.difficult = classification_targets(annotations)

    def __len__(self) -> int:
        return len(self.ids)


def _chw(crops: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(crops, -1, -3)))


class TrainCrops(Dataset):
    """Item (image index, sample number) -> (crop (3, S, S) uint8, labels (20,), keep (20,))."""

    def __init__(self, images: VOCImages, augment: AugmentConfig, seed: int, stream: int = _TRAIN):
        self.images, self.augment, self.seed, self.stream = images, augment, seed, stream

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, sample = item
        rng = np.random.default_rng([self.seed, self.stream, sample])
        a = self.augment
        crop = random_crop(load_rgb(self.images.paths[index]), rng, a.crop, a.scale, a.mirror)
        labels = torch.from_numpy(self.images.labels[index])
        keep = torch.from_numpy(~self.images.difficult[index])
        return _chw(crop), labels, keep


class EvalCrops(Dataset):
    """Item i -> (crops (K, 3, S, S) uint8, i): K random crops seeded by (seed, i), or the
    centre crop."""

    def __init__(self, images: VOCImages, augment: AugmentConfig, test: EvalConfig, seed: int):
        self.images, self.augment, self.test, self.seed = images, augment, test, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_rgb(self.images.paths[index])
        a = self.augment
        if self.test.mode == "center":
            crops = center_crop(image, a.crop)[None]
        else:
            rng = np.random.default_rng([self.seed, _TEST, index])
            crops = ten_random_crops(image, rng, self.test.crops, a.crop, a.scale, a.mirror)
        return _chw(crops), index


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, _ORDER, epoch]).permutation(n)


class IterationBatches(Sampler[list[tuple[int, int]]]):
    """Batches for iterations [start, stop): lists of (image index, sample number).

    The global batch of iteration t holds sample numbers t*B .. t*B+B-1; sample k is image
    `epoch_order(k // n)[k % n]`, so epochs are full passes in a fresh order. Process `rank`
    of `world` takes its contiguous B / world share.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, start: int, stop: int,
        rank: int = 0, world: int = 1,
    ) -> None:  # fmt: skip
        super().__init__()
        self.n, self.batch, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self.local = batch_size // world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))
        for it in range(self.start, self.stop):
            first = it * self.batch + self.rank * self.local
            batch = []
            for k in range(first, first + self.local):
                epoch = k // self.n
                if cached[0] != epoch:
                    cached = (epoch, epoch_order(self.n, self.seed, epoch))
                batch.append((int(cached[1][k % self.n]), k))
            yield batch


def rescale_batch(images: VOCImages, augment: AugmentConfig, seed: int, count: int) -> torch.Tensor:
    """`count` training-style crops (count, 3, S, S) uint8 for the data-dependent init."""
    order = np.random.default_rng([seed, _RESCALE]).permutation(len(images))
    dataset = TrainCrops(images, augment, seed, stream=_RESCALE)
    items = [(int(order[j % len(images)]), j) for j in range(count)]
    return torch.stack([dataset[item][0] for item in items])
