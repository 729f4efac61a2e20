"""The protocol's image transforms: random-scale crop windows, mirror, the centre crop.

Images stay uint8 HWC numpy arrays here; the encoder's input convention
(`benchmark.input_convention`) turns a batch into its input on the device, so workers ship 4x
fewer bytes. Where a crop pads, it pads with `pad`, the convention's mean pixel
(`InputConvention.mean_rgb8`), which normalises to ~0 (exactly 0 for Caffe's): Caffe pads
mean-subtracted data with zeros, i.e. with the mean. Every random choice comes from a
`numpy.random.Generator` the caller seeds from (run seed, sample number), which makes a crop a
pure function of its seed: workers, resumes and reruns see the same pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def window(image: np.ndarray, x0: int, y0: int, size: int, pad: np.ndarray) -> np.ndarray:
    """The `size` x `size` window at (x0, y0) of an (H, W, 3) image, padded with the RGB
    colour `pad` outside it.

    Offsets may be negative (the image is smaller than the window and sits inside it).
    """
    h, w = image.shape[:2]
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[:] = pad
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


def window_crop(
    image: Image.Image,
    rng: np.random.Generator,
    crop: int,
    scale: tuple[float, float],
    mirror: bool,
    pad: np.ndarray,
) -> np.ndarray:
    """One training (or ten-random test) crop as Krähenbühl et al.'s data layer draws it:
    (crop, crop, 3) uint8. It never pads (`pad` is accepted for CROPS' one signature).

    A square window of side s * crop original pixels, s uniform in [min(lo, hi'), hi'] with
    hi' = min(hi, H / crop, W / crop) so that it always fits in the image, at a uniformly
    random position inside it, bilinearly resampled to crop x crop, then mirrored with
    probability 1/2. philkr/caffe@fb5f6cd (branch future)
    src/caffe/layers/transformation_layer.cpp L96-121, used by philkr/voc-classification
    train_cls.py L31-32 (--min-scale 0.5 --max-scale 2.0), L62 (mirror).
    """
    w, h = image.size
    hi = min(scale[1], h / crop, w / crop)
    lo = min(scale[0], hi)
    side = max(1, min(round(float(rng.uniform(lo, hi)) * crop), w, h))
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    window = image.crop((x0, y0, x0 + side, y0 + side))
    out = np.asarray(window.resize((crop, crop), Image.BILINEAR) if side != crop else window)
    if mirror and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def random_crop(
    image: Image.Image,
    rng: np.random.Generator,
    crop: int,
    scale: tuple[float, float],
    mirror: bool,
    pad: np.ndarray,
) -> np.ndarray:
    """`augment.mode: rescale`, bench's earlier reading of "random scale [0.5, 2]": the whole
    image rescaled by a factor uniform in `scale`, a random crop x crop window of it (padded
    with `pad` where the image is smaller), mirrored with probability 1/2."""
    s = float(rng.uniform(scale[0], scale[1]))
    w, h = image.size
    size = (max(1, round(w * s)), max(1, round(h * s)))
    arr = np.asarray(image.resize(size, Image.BILINEAR) if size != (w, h) else image)
    out = window(arr, _offset(rng, size[0], crop), _offset(rng, size[1], crop), crop, pad)
    if mirror and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def center_crop(image: Image.Image, crop: int, pad: np.ndarray) -> np.ndarray:
    """The single test crop: the image at its own scale, centre window, padded with `pad`."""
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    return window(arr, (w - crop) // 2, (h - crop) // 2, crop, pad)



CROPS = {"window": window_crop, "rescale": random_crop}


def ten_random_crops(
    image: Image.Image,
    rng: np.random.Generator,
    crops: int,
    crop: int,
    scale: tuple[float, float],
    mirror: bool,
    mode: str,
    pad: np.ndarray,
) -> np.ndarray:
    """`crops` independent training-style crops of one image: (crops, crop, crop, 3) uint8
    (the reference tests with the training transform: train_cls.py L124)."""
    fn = CROPS[mode]
    return np.stack([fn(image, rng, crop, scale, mirror, pad) for _ in range(crops)])
