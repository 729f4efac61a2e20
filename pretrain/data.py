"""Unlabelled images for pretraining: crops, masks, keyed per sample.

Each sample is drawn from a generator keyed by (run seed, sample number), and the loop's
sampler (`benchmark.loop.IterationSampler`) can start at any iteration; the batches therefore
depend only on the seed and the iteration, not on the number of DataLoader workers or on
where a run was interrupted.

Pixels are fed in the encoder's input convention (`benchmark.input_convention`; Caffe's for
the default CaffeNet), like every other stage. Dropped pixels are set to the *dataset's* mean
colour (Section 4) in those units, `convention.colour(dataset_mean(...))`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from benchmark.datasets.folder import load_rgb
from benchmark.input_convention import InputConvention
from pretrain.masks import MaskFn

RESIZE_RATIO = 256 / 227  # shorter side resized to 256 for 227 crops, as Caffe's AlexNet


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
    """An image folder indexed by (index, sample number) keys from the loop's sampler.

    Every random choice for a sample (crop, flip, mask) is drawn from a generator keyed by
    (seed, sample number) alone, so a resumed run sees the same samples whatever the
    number of DataLoader workers or processes.
    """

    def __init__(
        self, paths: Sequence[Path], seed: int = 0, flip: bool = True, mask_batch: int = 0
    ) -> None:
        self.paths = list(paths)
        self.seed = seed
        self.flip = flip
        self.mask_batch = mask_batch

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, key: tuple[int, int]) -> tuple[Image.Image, np.random.Generator]:
        """The image at the key's index and the generator of its sample number."""
        index, sample = key
        return load_rgb(self.paths[index]), np.random.default_rng([self.seed, 2, sample])

    def mask_rng(self, key: tuple[int, int], rng: np.random.Generator) -> np.random.Generator:
        """The generator a sample's mask is drawn from: the sample's own `rng`, or with
        `mask_batch` B > 0 the one of its global batch (batch t holds sample numbers
        t*B .. t*B+B-1, `benchmark.loop.IterationSampler`), so that every image of a batch
        gets the same mask, on every process, as the released train_random.lua draws its
        noise masks: one window per batch, `torch.repeatTensor(mask_global, mask,
        opt.batchSize, 1, 1)` (pathak22/context-encoder@68abd11 train_random.lua L316-330).
        """
        if self.mask_batch <= 0:
            return rng
        return np.random.default_rng([self.seed, 3, key[1] // self.mask_batch])


class PretrainImages(SeededImages):
    """Image folder -> {"image": (3, S, S) in `convention`, "mask": (1, S, S) float 0/1}.

    Without `mask_fn` the mask is all ones (the autoencoder reconstructs everything).
    mask_batch: 0 draws a mask per image; B > 0 one per global batch of B (`mask_rng`).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        size: int,
        convention: InputConvention,
        mask_fn: MaskFn | None = None,
        flip: bool = True,
        seed: int = 0,
        mask_batch: int = 0,
    ) -> None:
        super().__init__(paths, seed, flip, mask_batch)
        self.size = size
        self.convention = convention
        self.mask_fn = mask_fn

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        image, rng = self.load(key)
        pixels = random_crop(image, self.size, rng, self.flip)
        if self.mask_fn is None:
            mask = np.ones((self.size, self.size), dtype=bool)
        else:
            mask = self.mask_fn(self.mask_rng(key, rng))
        return {
            "image": self.convention.normalise_hwc(pixels),
            "mask": torch.from_numpy(mask).to(torch.float32).unsqueeze(0),
        }
