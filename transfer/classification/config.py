"""Settings of VOC2007 classification transfer; defaults are the protocol's (PROTOCOL.md).

Krähenbühl et al.'s fine-tuning protocol, which the paper follows: SGD with momentum 0.9,
lr 1e-3 halved every 10k iterations for 80k iterations, batch 16, weight decay 1e-6,
gradients clipped to norm 10; random scale in [0.5, 2], 227 crop, mirror; test on the
average of 10 random crops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from benchmark.loop import LoopConfig

TrainFrom = Literal["all", "pool5", "fc7"]
TestMode = Literal["ten-random", "center"]


@dataclass
class TrainConfig(LoopConfig):
    iterations: int = 80000
    batch_size: int = 16  # global batch: split evenly over processes under torchrun
    lr: float = 1e-3
    lr_step: int = 10000  # multiply lr by lr_gamma every lr_step iterations
    lr_gamma: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 1e-6
    clip_grad: float = 10.0  # max global L2 norm of the gradient (Caffe's clip_gradients)
    # Krähenbühl et al.'s released code trains biases at 2x the lr; the paper says nothing.
    bias_lr_mult: float = 1.0
    workers: int = 4  # loader processes (1 suits a 2-core CPU; more keep a GPU fed)


@dataclass
class AugmentConfig:
    """Training crops: scale the image by a factor drawn uniformly from `scale` (relative to
    its own size, as Krähenbühl et al.'s data layer does), pad with the mean pixel where it
    is smaller than `crop`, take a random `crop` x `crop` window, mirror half of them."""

    crop: int = 227
    scale: tuple[float, float] = (0.5, 2.0)
    mirror: bool = True


@dataclass
class EvalConfig:
    """`ten-random`: average the logits of `crops` crops drawn like training crops, seeded
    per image; `center`: one centre crop of the image at its own scale."""

    mode: TestMode = "ten-random"
    crops: int = 10
    batch_size: int = 8  # images per forward pass (each contributes `crops` crops)


@dataclass
class ClassificationConfig:
    name: str | None = None
    seed: int = 0
    data: str | None = None  # VOCdevkit or VOC2007 folder; None = embedded synthetic data
    device: str = "auto"
    weights: str | None = None  # run folder, .safetensors, torchvision .pth; None = random
    arch: str = "caffenet"  # architecture of the random baseline (files carry their own)
    on_bad_data: Literal["error", "skip"] = "error"  # an image `bench data check` flags
    train_from: TrainFrom = "all"  # all layers / fc6-fc8 (encoder frozen) / fc8 only
    rescale: bool = False  # Krähenbühl et al. 2015 data-dependent init (see model.py)
    rescale_images: int = 64  # training crops used to measure the statistics
    train_split: str = "trainval"
    test_split: str = "test"
    dropout: float = 0.5
    hidden: int = 4096  # fc6/fc7 width; AlexNet's 4096, smaller only to make CPU demos fast
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    test: EvalConfig = field(default_factory=EvalConfig)

    @property
    def test_crops(self) -> int:
        return 1 if self.test.mode == "center" else self.test.crops
