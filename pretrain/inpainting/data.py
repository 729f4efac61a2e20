"""Images for the 128-px inpainting context encoder, as the released code loads them.

Training (the released `donkey_folder.lua`): shorter side resized to 350 (aspect kept), a
random 128x128 crop, a random horizontal flip, pixels mapped to [-1, 1]. Evaluation: the
centre 128x128 crop of each held-out image at its own resolution (Paris StreetView's
evaluation images are 227x227; the public evaluation crops their centre 128 px), upsampled
first only when the shorter side is below 128 (`eval_crop: centre`); by default the public
evaluation's resize to 128 then centre crop (`resized_centre_crop`).

Samples are indexed by (index, sample number) keys from the loop's sampler, so the crop,
flip and hole depend only on the seed and the iteration (resume gives the same
batches; the number of DataLoader workers does not matter).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmark.datasets.folder import load_rgb
from pretrain.data import SeededImages
from pretrain.inpainting.model import IMAGE_SIZE

LOAD_SIZE = 350  # released code: shorter side resized to 350 before the random 128 crop

HoleFn = Callable[[np.random.Generator], np.ndarray]


def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).float()
    return x.div_(127.5).sub_(1.0)


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) in [-1, 1] -> [0, 1] (clamped), for PNGs."""
    return ((x.detach().float() + 1.0) / 2.0).clamp_(0.0, 1.0)


def resize_shorter(im: Image.Image, side: int) -> Image.Image:
    """Scale so that the shorter side is `side` (aspect kept); side <= 0 leaves it as is."""
    if side <= 0:
        return im
    w, h = im.size
    scale = side / min(w, h)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    return im if size == (w, h) else im.resize(size, Image.BILINEAR)


def train_crop(
    im: Image.Image,
    rng: np.random.Generator,
    load_size: int = LOAD_SIZE,
    size: int = IMAGE_SIZE,
    flip: bool = True,
) -> np.ndarray:
    """Released pipeline: shorter side to `load_size`, random size^2 crop, random flip:
    (size, size, 3) uint8."""
    im = resize_shorter(im, load_size)
    if min(im.size) < size:  # load_size 0 (or < size) on a small image: grow it to fit
        im = resize_shorter(im, size)
    w, h = im.size
    left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    arr = np.asarray(im)[top : top + size, left : left + size]
    if flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return arr


def centre_crop(im: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """Evaluation: the centre size^2 crop at the image's own resolution: (size, size, 3)."""
    if min(im.size) < size:
        im = resize_shorter(im, size)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im)[top : top + size, left : left + size]


def resized_centre_crop(im: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """The public evaluation's loading: shorter side resized to `size`, then the centre
    size^2 crop (BoyuanJiang/context_encoder_pytorch@01cbf96 test.py L52-55:
    transforms.Scale(128) + CenterCrop(128)); a 227x227 Paris image becomes all of it at 128."""
    return centre_crop(resize_shorter(im, size), size)


EVAL_LOADERS = {"resize": resized_centre_crop, "centre": centre_crop}


def load_eval_images(
    paths: Sequence[Path], size: int = IMAGE_SIZE, mode: str = "resize"
) -> torch.Tensor:
    """Held-out images in [-1, 1]: (N, 3, size, size). mode "resize": the public evaluation's
    resize + centre crop; "centre": the centre crop at native resolution."""
    load = EVAL_LOADERS[mode]
    return torch.stack([to_unit_range(load(load_rgb(p), size)) for p in paths])


class InpaintingImages(SeededImages):
    """Image folder -> {"image": (3, 128, 128) in [-1, 1]} (+ "hole": (1, 128, 128) float 0/1
    when `hole_fn` draws random holes; the central hole is fixed and not stored).
    hole_batch: 0 draws a hole per image; B > 0 one per global batch of B, as the released
    train_random.lua does for its noise masks (`SeededImages.mask_rng`).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        load_size: int = LOAD_SIZE,
        hole_fn: Callable[[np.random.Generator], torch.Tensor] | None = None,
        flip: bool = True,
        seed: int = 0,
        hole_batch: int = 0,
    ) -> None:
        super().__init__(paths, seed, flip, hole_batch)
        self.load_size = load_size
        self.hole_fn = hole_fn

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        image, rng = self.load(key)
        pixels = train_crop(image, rng, self.load_size, flip=self.flip)
        sample = {"image": to_unit_range(pixels)}
        if self.hole_fn is not None:
            sample["hole"] = self.hole_fn(self.mask_rng(key, rng))
        return sample
