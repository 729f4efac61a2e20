"""Unlabelled images for pretraining: crops, masks, and a resumable, shardable loader.

Each sample is drawn with its own seed, derived from (run seed, epoch, position), and the
sampler can start at any position; the batches therefore depend only on the seed and the
iteration, not on the number of DataLoader workers or on where a run was interrupted.

Pixels are normalised like every other stage, (x / 255 - PIXEL_MEAN) / PIXEL_STD. Dropped
pixels are set to the *dataset's* mean colour (Section 4), i.e. `fill_value(mean)`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from benchmark.datasets.folder import load_rgb
from benchmark.distributed import DistEnv
from pretrain.alexnet import PIXEL_MEAN, PIXEL_STD
from pretrain.masks import MaskFn

RESIZE_RATIO = 256 / 227  # shorter side resized to 256 for 227 crops, as Caffe's AlexNet


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 normalised with PIXEL_MEAN / PIXEL_STD."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def denormalise(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) normalised -> pixels in [0, 1] (clamped), for PNG grids."""
    mean = torch.tensor(PIXEL_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=x.device).view(3, 1, 1)
    return (x.float() * std + mean).clamp_(0.0, 1.0)


def fill_value(dataset_mean: Sequence[float]) -> torch.Tensor:
    """The dataset's mean colour (RGB in [0, 1]) in normalised units: (3,)."""
    m = torch.tensor(list(dataset_mean), dtype=torch.float32)
    return (m - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)


def dataset_mean(paths: Sequence[Path], max_images: int = 500, seed: int = 0) -> list[float]:
    """Mean RGB colour in [0, 1] over (a seeded sample of) the images, each shrunk to at most
    64 px so that this takes seconds even for large folders."""
    paths = list(paths)
    if len(paths) > max_images:
        pick = np.random.default_rng(seed).choice(len(paths), max_images, replace=False)
        paths = [paths[i] for i in sorted(pick)]
    total = np.zeros(3)
    for p in paths:
        im = load_rgb(p)
        im.thumbnail((64, 64))
        total += np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    return [float(v) for v in total / (255.0 * len(paths))]


def random_crop(
    im: Image.Image, size: int, rng: np.random.Generator, flip: bool = True
) -> np.ndarray:
    """Shorter side to round(size * 256/227), random size x size crop, random mirror:
    (size, size, 3) uint8."""
    short = round(size * RESIZE_RATIO)
    w, h = im.size
    scale = short / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = int(rng.integers(0, nw - size + 1)), int(rng.integers(0, nh - size + 1))
    arr = np.asarray(im)[top : top + size, left : left + size]
    if flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return arr


class SeededImages(Dataset):
    """An image folder indexed by (index, draw_seed) pairs from `InfiniteSampler`.

    Every random choice for a sample (crop, flip, mask) is drawn from `draw_seed` alone, so
    a resumed run sees the same samples whatever the number of DataLoader workers.
    """

    def __init__(self, paths: Sequence[Path], flip: bool = True) -> None:
        self.paths = list(paths)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, key: tuple[int, int] | int) -> tuple[Image.Image, np.random.Generator]:
        """The image at the key's index and the generator seeded by its draw (index alone:
        draw = index)."""
        index, draw = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(draw)
        return load_rgb(self.paths[index]), rng


class PretrainImages(SeededImages):
    """Image folder -> {"image": (3, S, S) normalised, "mask": (1, S, S) float 0/1}.

    Without `mask_fn` the mask is all ones (the autoencoder reconstructs everything).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        size: int,
        mask_fn: MaskFn | None = None,
        flip: bool = True,
    ) -> None:
        super().__init__(paths, flip)
        self.size = size
        self.mask_fn = mask_fn

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        image, rng = self.load(key)
        pixels = random_crop(image, self.size, rng, self.flip)
        if self.mask_fn is None:
            mask = np.ones((self.size, self.size), dtype=bool)
        else:
            mask = self.mask_fn(rng)
        return {
            "image": normalise(pixels),
            "mask": torch.from_numpy(mask).to(torch.float32).unsqueeze(0),
        }


class InfiniteSampler(Sampler):
    """Endless (index, draw_seed) pairs: epoch after epoch of a DistributedSampler
    permutation (this rank's shard), starting `start` samples in.

    draw_seed is unique per (seed, epoch, position, rank), so per-sample randomness never
    depends on worker processes.
    """

    def __init__(self, dataset: Dataset, seed: int, start: int = 0, env: DistEnv | None = None):
        world = env.world_size if env else 1
        rank = env.rank if env else 0
        n = len(dataset)  # type: ignore[arg-type]
        self.inner = DistributedSampler(
            dataset,
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=n >= world,
        )
        self.seed, self.start, self.rank = seed, start, rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_epoch = len(self.inner)
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            self.inner.set_epoch(epoch)
            order = list(self.inner)
            for pos in range(offset, per_epoch):
                draw = np.random.SeedSequence([self.seed, epoch, pos, self.rank])
                yield order[pos], int(draw.generate_state(1)[0])
            epoch, offset = epoch + 1, 0


def make_batches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    workers: int = 0,
    env: DistEnv | None = None,
) -> functools.partial[Iterator[dict[str, torch.Tensor]]]:
    """For `engine.fit`: start iteration -> iterator of batches (pinned memory on CUDA)."""
    return functools.partial(_iterate, dataset, batch_size, seed, workers, env)


def _iterate(
    dataset: Dataset, batch_size: int, seed: int, workers: int, env: DistEnv | None, start: int
) -> Iterator[Any]:
    sampler = InfiniteSampler(dataset, seed, start=start * batch_size, env=env)
    pin = env is not None and env.device.type == "cuda"
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        drop_last=True,
        persistent_workers=False,
        # Its own generator: creating the iterator must not consume the global torch RNG,
        # or a resumed run would draw different dropout masks than an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if workers > 0 else None,
    )
    return iter(loader)
