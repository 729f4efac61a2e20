"""`rotation`: Gidaris, Singh and Komodakis, ICLR 2018, "Unsupervised Representation Learning
by Predicting Image Rotations" (RotNet).

Every image of a batch is shown at all four rotations (0, 90, 180, 270 degrees) and the
network classifies which one it sees (4-way cross-entropy). Settings are those of the
authors' released code for AlexNet on ImageNet, gidariss/FeatureLearningRotNet:
`config/ImageNet_RotNet_AlexNet.py` (batch, optimiser, schedule, epochs),
`architectures/AlexNet.py` (the fc head), `dataloader.py` (rotate_img, RandomSizedCrop(224),
mirror, the four rotations of each image collated image by image), `algorithms/Algorithm.py`
(adjust_learning_rates: the LUT's rate applies from epoch 0, so 'lr': 0.1 is never used).

Difference forced by the shared encoder: RotNet's AlexNet has BatchNorm after every conv
layer; the shared AlexNetEncoder has none (the fc head keeps its BatchNorm).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from benchmark.input_convention import CAFFE, InputConvention
from benchmark.loop import Precision, sgd
from encoders.alexnet import AlexNetEncoder, Arch
from pretrain.data import SeededImages
from pretrain.pretext.common import (
    cross_entropy_step,
    images_to,
    pool5_shape,
    save_captioned_grid,
    sgd_groups,
)

ROTATIONS = (0, 90, 180, 270)  # label k: k x 90 degrees counter-clockwise (rotate_img)
NUM_CLASSES = len(ROTATIONS)


def _lut() -> list[tuple[int, float]]:
    # ImageNet_RotNet_AlexNet.py: 'LUT_lr': [(15, 0.01), (30, 0.001), (45, 0.0001), (50, 0.00001)]
    return [(15, 0.01), (30, 0.001), (45, 0.0001), (50, 0.00001)]


@dataclass
class RotationConfig:
    # --- data (dataloader.py, ImageNet train split with random_sized_crop=True)
    crop_size: int = 224  # RandomSizedCrop(224); pool5 is 6x6 for torchvision's and Caffe's AlexNet
    random_sized_crop: bool = True  # area U(0.08, 1), aspect [3/4, 4/3], resized to crop_size
    resize: int = 256  # without random_sized_crop: Scale(256) then RandomCrop(crop_size)
    flip: bool = True  # RandomHorizontalFlip
    # --- head (AlexNet.py fc_block + classifier): Linear(256*6*6, 4096, bias=False), BN,
    # ReLU, Linear(4096, 4096, bias=False), BN, ReLU, Linear(4096, 4)
    fc: int = 4096
    batch_norm: bool = True
    # --- optimisation (ImageNet_RotNet_AlexNet.py)
    batch_size: int = 192  # images; each is shown 4 times, so 768 inputs per step
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    # (end epoch, rate) pairs: rate applies while epoch < end; epochs 0-14 at 0.01, x0.1
    # at 15, 30 and 45 (Algorithm.py adjust_learning_rates).
    lr_schedule: list[tuple[int, float]] = field(default_factory=_lut)
    epochs: int = 50  # max_num_epochs


# ---------------------------------------------------------------- rotations


def rotate(images: torch.Tensor, k: int) -> torch.Tensor:
    """Rotate (..., H, W) by k x 90 degrees counter-clockwise, as RotNet's rotate_img
    (90: flipud(transpose(img)), 180: fliplr(flipud(img)), 270: transpose(flipud(img)))."""
    return torch.rot90(images, k, dims=(-2, -1))


def all_rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, S, S) -> ((4B, C, S, S), labels (4B,)), image by image: rows 4i..4i+3 are
    image i at 0, 90, 180 and 270 degrees (RotNet's _collate_fun order)."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotations need square images, got {tuple(images.shape[-2:])}")
    rotated = torch.stack([rotate(images, k) for k in range(NUM_CLASSES)], dim=1)
    labels = torch.arange(NUM_CLASSES, device=images.device).repeat(images.shape[0])
    return rotated.flatten(0, 1), labels


# ---------------------------------------------------------------- data


def random_sized_crop(
    im: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """torchvision's RandomSizedCrop / RandomResizedCrop rule with the key's generator: up to
    ten tries of an area fraction U(scale) and a log-uniform aspect ratio, else the centre
    crop at the nearest allowed ratio; resized to size x size (bilinear)."""
    w, h = im.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return im.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return im.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))


def scale_and_crop(
    im: Image.Image, resize: int, size: int, rng: np.random.Generator
) -> Image.Image:
    """Shorter side to `resize`, then a random size x size crop."""
    w, h = im.size
    s = resize / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BILINEAR)
    top, left = int(rng.integers(0, nh - size + 1)), int(rng.integers(0, nw - size + 1))
    return im.crop((left, top, left + size, top + size))


class RotationImages(SeededImages):
    """Image folder -> {"image": (3, S, S) float32}, in the encoder's input `convention` (the
    default arch's by default) like every other stage. The four rotations are made on the
    device by the step (`all_rotations`), which moves a quarter of the data RotNet's loader
    moved."""

    def __init__(
        self,
        paths: Sequence[Path],
        cfg: RotationConfig | None = None,
        seed: int = 0,
        convention: InputConvention = CAFFE,
    ) -> None:
        cfg = cfg or RotationConfig()
        super().__init__(paths, flip=cfg.flip)
        self.seed = seed  # the run seed SeededImages.load keys samples with
        self.cfg = cfg
        self.convention = convention

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        image, rng = self.load(key)
        if cfg.random_sized_crop:
            image = random_sized_crop(image, cfg.crop_size, rng)
        else:
            image = scale_and_crop(image, cfg.resize, cfg.crop_size, rng)
        pixels = np.array(image)  # writable: torch.from_numpy warns on read-only
        if self.flip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        return {"image": self.convention.normalise_hwc(pixels)}


# ---------------------------------------------------------------- model


class RotationNet(nn.Module):
    """AlexNet conv1..pool5 -> fc (BN, ReLU) -> fc (BN, ReLU) -> 4 rotation logits.
    (N, 3, S, S) -> (N, 4)."""

    def __init__(
        self, arch: Arch = "caffenet", pool_free: bool = False, cfg: RotationConfig | None = None
    ) -> None:
        super().__init__()
        cfg = cfg or RotationConfig()
        self.cfg = cfg
        self.encoder = AlexNetEncoder(arch, pool_free)
        # RotNet's AlexNet.py sets no initialiser: torch's defaults for every layer.
        for m in self.encoder.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        c, h, w = pool5_shape(self.encoder, cfg.crop_size)
        self.pool5_shape = (c, h, w)
        bn = cfg.batch_norm

        def block(n_in: int, n_out: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Linear(n_in, n_out, bias=not bn)]
            if bn:
                layers.append(nn.BatchNorm1d(n_out))
            return [*layers, nn.ReLU(inplace=True)]

        self.fc_block = nn.Sequential(
            nn.Flatten(), *block(c * h * w, cfg.fc), *block(cfg.fc, cfg.fc)
        )
        self.classifier = nn.Linear(cfg.fc, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc_block(self.encoder(images)))


# ---------------------------------------------------------------- training


def forward_batch(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (4B, 4), labels (4B,)): the batch's images at all four rotations."""
    images = batch["image"].to(device, non_blocking=True)
    x, labels = all_rotations(images)
    return model(images_to(x, device, channels_last)), labels


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    precision: Precision | None = None,
    channels_last: bool = False,
) -> Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]:
    """One step on all four rotations of every image: mean cross-entropy (RotNet's
    CrossEntropyLoss). Returns {"loss", "accuracy"} (detached)."""
    return cross_entropy_step(model, optimizer, device, forward_batch, precision, channels_last)


def make_optimizer(model: nn.Module, cfg: RotationConfig) -> torch.optim.SGD:
    """SGD with Nesterov momentum, weight decay on every parameter (Algorithm.py)."""
    lr = cfg.lr_schedule[0][1]
    return sgd(sgd_groups(model, cfg.weight_decay), lr, cfg.momentum, nesterov=cfg.nesterov)


def learning_rate(
    cfg: RotationConfig, iteration: int, iterations_per_epoch: int | None = None
) -> float:
    """The LUT's rate for the epoch holding `iteration` (the last rate past its end)."""
    if not iterations_per_epoch:
        raise ValueError("rotation's schedule is in epochs: give iterations_per_epoch")
    epoch = iteration // iterations_per_epoch
    return next((lr for end, lr in cfg.lr_schedule if end > epoch), cfg.lr_schedule[-1][1])


def iterations_per_epoch(cfg: RotationConfig, num_images: int) -> int:
    return max(1, math.ceil(num_images / cfg.batch_size))


def total_iterations(cfg: RotationConfig, num_images: int) -> int:
    return cfg.epochs * iterations_per_epoch(cfg, num_images)


# ---------------------------------------------------------------- figures


def sample_figure(
    batch: dict[str, torch.Tensor],
    logits: torch.Tensor,
    path: Path,
    *,
    cfg: RotationConfig | None = None,
    max_items: int = 6,
    convention: InputConvention = CAFFE,
) -> Path:
    """PNG: one row per image, its four rotations as columns, each captioned with the true
    and the predicted rotation. `logits` are (4B, 4) in `all_rotations` order; images in
    `convention`. (`cfg` is accepted for a uniform signature; unused.)"""
    n = min(max_items, batch["image"].shape[0])
    rotated, labels = all_rotations(batch["image"][:n].cpu())
    pred = logits.detach()[: 4 * n].argmax(dim=1).cpu()
    shown = convention.denormalise(rotated).permute(0, 2, 3, 1).numpy()
    rows = [[shown[4 * i + k] for k in range(NUM_CLASSES)] for i in range(n)]
    captions = [
        [
            f"true {ROTATIONS[k]}°  pred {ROTATIONS[int(pred[4 * i + k])]}°"
            for k in range(NUM_CLASSES)
        ]
        for i in range(n)
    ]
    return save_captioned_grid(path, rows, captions)
