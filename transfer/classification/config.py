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
    # Biases learn at 2x the lr with weight decay x1, as Krähenbühl et al.'s classification
    # code sets every trained layer: philkr/voc-classification@c209779 train_cls.py L80-81.
    bias_lr_mult: float = 2.0
    bias_decay_mult: float = 1.0
    workers: int = 4  # loader processes (1 suits a 2-core CPU; more keep a GPU fed)


@dataclass
class AugmentConfig:
    """Training crops. `window` (the reference's data layer, presets.window_crop): a square
    window of side s x crop original pixels, s uniform in `scale` (clamped to fit), resampled
    to crop x crop; `rescale`: the whole image rescaled by s, a random crop x crop window,
    mean-padded where the image is smaller (bench's earlier reading). Both mirror half."""

    mode: Literal["window", "rescale"] = "window"
    # None = the encoder's input size: AlexNet 227, the deploy prototxt's input_dim
    # (train_cls.py L62); ResNet-50 and ViT 224
    crop: int | None = None
    scale: tuple[float, float] = (0.5, 2.0)  # --min-scale / --max-scale (train_cls.py L31-32)
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
    weights: str | None = None  # run folder, .safetensors, a ResNet/ViT checkpoint; None = random
    weights_format: str | None = None  # a checkpoint's layout (weights/formats.py); None = detect
    arch: str = "caffenet"  # architecture of the random baseline (files carry their own)
    on_bad_data: Literal["error", "skip"] = "error"  # an image `bench data check` flags
    # all layers / fc6-fc8 (encoder frozen) / fc8 only; a ResNet or ViT has one new linear
    # layer: all, or pool5 = the encoder frozen (fc7 is AlexNet's only)
    train_from: TrainFrom = "all"
    # sklearn: scikit-learn's AP, as philkr/voc-classification computes it (train_cls.py
    # L151-157); voc07: the VOC2007 devkit's 11-point VOCevalcls.
    ap: Literal["sklearn", "voc07"] = "sklearn"
    # Krähenbühl et al.'s data-dependent init as philkr/magic_init does it (transfer/rescale.py:
    # within-layer for new layers, between-layer calibration of all); not in the paper's runs.
    rescale: bool = False
    rescale_images: int = 64  # training crops used to measure the statistics
    train_split: str = "trainval"
    test_split: str = "test"
    dropout: float = 0.5
    hidden: int = 4096  # fc6/fc7 width; AlexNet's 4096, smaller only to make CPU demos fast
    # (dropout and hidden shape AlexNet's fc6-fc7; a ResNet / ViT has one linear layer)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    test: EvalConfig = field(default_factory=EvalConfig)

    @property
    def test_crops(self) -> int:
        return 1 if self.test.mode == "center" else self.test.crops
