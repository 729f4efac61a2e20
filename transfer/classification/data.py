"""VOC2007 image-level labels as training crops and test crop stacks.

Randomness is keyed, not streamed: training sample number k (k = iteration * batch + slot)
draws its image from a per-epoch permutation seeded by (seed, epoch) and its crop from a
generator seeded by (seed, k); test image i draws its crops from (seed, i). A resumed run
therefore sees exactly the batches the uninterrupted run would have seen, whatever the
number of workers or processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from benchmark.datasets.folder import load_rgb
from benchmark.datasets.voc import classification_targets, parse_voc_xml, read_split
from benchmark.errors import DatasetError
from benchmark.input_convention import InputConvention

from .config import AugmentConfig, EvalConfig
from .presets import CROPS, center_crop, ten_random_crops

# Stream tags that keep the generators of different purposes apart.
_TRAIN, _TEST, _RESCALE = 2, 3, 4


class VOCImages:
    """Image paths, ids, labels (N, 20) float {0,1} and difficult (N, 20) bool of a split."""

    def __init__(self, voc_root: Path, split: str, ids: Sequence[str] | None = None) -> None:
        voc_root = Path(voc_root)
        ids = read_split(voc_root, split, "Main") if ids is None else list(ids)
        annotations = [parse_voc_xml(voc_root / "Annotations" / f"{i}.xml") for i in ids]
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
    """Item (image index, sample number) -> (crop (3, S, S) uint8, labels (20,), keep (20,)).
    Crops pad with the mean pixel of the encoder's input `convention`."""

    def __init__(
        self,
        images: VOCImages,
        augment: AugmentConfig,
        seed: int,
        convention: InputConvention,
        stream: int = _TRAIN,
    ) -> None:
        self.images, self.augment, self.seed, self.stream = images, augment, seed, stream
        self.pad = convention.mean_rgb8()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, sample = item
        rng = np.random.default_rng([self.seed, self.stream, sample])
        a = self.augment
        image = load_rgb(self.images.paths[index])
        crop = CROPS[a.mode](image, rng, a.crop, a.scale, a.mirror, self.pad)
        labels = torch.from_numpy(self.images.labels[index])
        keep = torch.from_numpy(~self.images.difficult[index])
        return _chw(crop), labels, keep


class EvalCrops(Dataset):
    """Item i -> (crops (K, 3, S, S) uint8, i): K random crops seeded by (seed, i), or the
    centre crop; padded with the mean pixel of the encoder's input `convention`."""

    def __init__(
        self,
        images: VOCImages,
        augment: AugmentConfig,
        test: EvalConfig,
        seed: int,
        convention: InputConvention,
    ) -> None:
        self.images, self.augment, self.test, self.seed = images, augment, test, seed
        self.pad = convention.mean_rgb8()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_rgb(self.images.paths[index])
        a = self.augment
        if self.test.mode == "center":
            crops = center_crop(image, a.crop, self.pad)[None]
        else:
            rng = np.random.default_rng([self.seed, _TEST, index])
            crops = ten_random_crops(
                image, rng, self.test.crops, a.crop, a.scale, a.mirror, a.mode, self.pad
            )
        return _chw(crops), index


def rescale_batch(
    images: VOCImages, augment: AugmentConfig, seed: int, count: int, convention: InputConvention
) -> torch.Tensor:
    """`count` training-style crops (count, 3, S, S) uint8 for the data-dependent init."""
    order = np.random.default_rng([seed, _RESCALE]).permutation(len(images))
    dataset = TrainCrops(images, augment, seed, convention, stream=_RESCALE)
    items = [(int(order[j % len(images)]), j) for j in range(count)]
    return torch.stack([dataset[item][0] for item in items])
