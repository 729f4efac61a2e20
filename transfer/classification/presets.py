"""The protocol's image transforms: random scale, mean-padded crop, mirror.

Images stay uint8 HWC numpy arrays here; `model.normalize` turns a batch into the encoder's
input on the device, so workers ship 4x fewer bytes. Every random choice comes from a
`numpy.random.Generator` the caller seeds from (run seed, sample number), which makes a crop a
pure function of its seed: workers, resumes and reruns see the same pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pretrain.alexnet import PIXEL_MEAN

# Padding colour: the mean pixel, which `normalize` maps to ~0 (Caffe pads mean-subtracted
# data with zeros, i.e. with the mean).
MEAN_PIXEL = np.array([round(255 * m) for m in PIXEL_MEAN], dtype=np.uint8)


def window(image: np.ndarray, x0: int, y0: int, size: int) -> np.ndarray:
    """The `size` x `size` window at (x0, y0) of an (H, W, 3) image, mean-padded outside it.

    Offsets may be negative (the image is smaller than the window and sits inside it).
    """
    h, w = image.shape[:2]
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[:] = MEAN_PIXEL
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + size, w), min(y0 + size, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def _offset(rng: np.random.Generator, length: int, size: int) -> int:
    """Uniform window start so the window covers as much image as it can: inside the image
    when it is larger than the window, the image inside the window when it is smaller."""
    lo, hi = min(0, length - size), max(0, length - size)
    return int(rng.integers(lo, hi + 1))


def random_crop(
    image: Image.Image,
    rng: np.random.Generator,
    crop: int,
    scale: tuple[float, float],
    mirror: bool,
) -> np.ndarray:
    """One training (or ten-random test) crop: (crop, crop, 3) uint8.

    Scale factor uniform in `scale` relative to the image's own size, bilinear resize.
    """
    s = float(rng.uniform(scale[0], scale[1]))
    w, h = image.size
    size = (max(1, round(w * s)), max(1, round(h * s)))
    arr = np.asarray(image.resize(size, Image.BILINEAR) if size != (w, h) else image)
    out = window(arr, _offset(rng, size[0], crop), _offset(rng, size[1], crop), crop)
    if mirror and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def center_crop(image: Image.Image, crop: int) -> np.ndarray:
    """The single test crop: the image at its own scale, centre window, mean-padded."""
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    return window(arr, (w - crop) // 2, (h - crop) // 2, crop)


def ten_random_crops(
    image: Image.Image,
    rng: np.random.Generator,
    crops: int,
    crop: int,
    scale: tuple[float, float],
    mirror: bool,
) -> np.ndarray:
    """`crops` independent training-style crops of one image: (crops, crop, crop, 3) uint8."""
    return np.stack([random_crop(image, rng, crop, scale, mirror) for _ in range(crops)])
