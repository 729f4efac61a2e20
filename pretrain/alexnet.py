"""The AlexNet/CaffeNet encoder up to pool5: the representation every transfer task judges.

Layer indices follow torchvision's `AlexNet.features` (0 conv1, 3 conv2, 6 conv3, 8 conv4,
10 conv5, pools at 2, 5, 12) so that state dicts use torchvision's key names in every
architecture. `arch="caffenet"` has the widths of the paper's CaffeNet (96-256-384-384-256);
`arch="torchvision"` has torchvision's (64-192-384-256-256), needed to import a
torchvision ImageNet state dict. With `pool_free=True` each max-pool is replaced by a
learned convolution of the same kernel and stride (the paper's finer-inpainting variant).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Arch = Literal["caffenet", "torchvision"]

WIDTHS: dict[str, tuple[int, int, int, int, int]] = {
    "caffenet": (96, 256, 384, 384, 256),
    "torchvision": (64, 192, 384, 256, 256),
}
CONV_INDICES = (0, 3, 6, 8, 10)
POOL_INDICES = (2, 5, 12)
INPUT_SIZE = 227
POOL5_SIZE = 6
# Every stage feeds the encoder (x / 255 - PIXEL_MEAN) / PIXEL_STD (torchvision's ImageNet
# statistics), so weights move between pretraining, transfer and torchvision unchanged.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


def _pool(channels: int, pool_free: bool) -> nn.Module:
    if pool_free:
        return nn.Conv2d(channels, channels, kernel_size=3, stride=2)
    return nn.MaxPool2d(kernel_size=3, stride=2)


class AlexNetEncoder(nn.Module):
    """conv1-conv5 + pool5: (B, 3, 227, 227) -> (B, 256, 6, 6)."""

    def __init__(self, arch: Arch = "caffenet", pool_free: bool = False) -> None:
        super().__init__()
        if arch not in WIDTHS:
            raise ValueError(f"unknown encoder arch {arch!r}; choose from {sorted(WIDTHS)}")
        c1, c2, c3, c4, c5 = WIDTHS[arch]
        pad1 = 0 if arch == "caffenet" else 2
        self.arch = arch
        self.pool_free = pool_free
        self.out_channels = c5
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=pad1),
            nn.ReLU(inplace=True),
            _pool(c1, pool_free),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            _pool(c2, pool_free),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            _pool(c5, pool_free),
        )
        gaussian_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def conv5(self, x: torch.Tensor) -> torch.Tensor:
        """Features before pool5 (stride 16), as Fast R-CNN and FCN use them."""
        return self.features[:12](x)


def gaussian_init_(module: nn.Module, std: float = 0.01) -> None:
    """The 'random Gaussian' baseline's init: N(0, std) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
