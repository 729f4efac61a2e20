"""The inpainting context encoder of Section 5.1 (Table 1, Figures 4 and 6).

A DCGAN-style encoder-decoder that sees a 128x128 image whose centre is filled with the
dataset mean and predicts the 64x64 centre patch; the discriminator that judges 64x64
patches alone (not conditioned on the context) is `pretrain.adversarial.DCGANDiscriminator`.
Layer widths, kernel sizes and the N(0, 0.02) initialisation follow PROTOCOL.md
"Inpainting context encoder"; like the released code, the 4000-d bottleneck is followed by
BatchNorm and LeakyReLU before the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.adversarial import dcgan_init_

IMAGE_SIZE = 128
PATCH_SIZE = 64
PATCH_START = (IMAGE_SIZE - PATCH_SIZE) // 2  # 32: the centre patch is [32, 96) x [32, 96)
BOTTLENECK = 4000
# The released code fills dropped pixels with the training mean (117, 104, 123) in [-1, 1].
FILL_RGB = (117.0, 104.0, 123.0)
FILL = tuple(2.0 * v / 255.0 - 1.0 for v in FILL_RGB)


class BottleneckConv(nn.Conv2d):
    """The 4x4 conv from (B, 512, 4, 4) to the (B, 4000, 1, 1) bottleneck.

    Its kernel covers the whole input, so it is one fully connected layer; it is computed
    as a matrix product on the same `weight` (state dict unchanged), which CPU BLAS runs
    several times faster than the convolution kernels do for this shape (1x1 output).
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 4, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != self.weight.shape[-2:]:
            return super().forward(x)
        # reshape (not view): a channels_last input is read back in (C, H, W) order.
        return F.linear(x.reshape(len(x), -1), self.weight.flatten(1))[..., None, None]


class BottleneckUpConv(nn.ConvTranspose2d):
    """The up-convolution from the (B, 4000, 1, 1) bottleneck to (B, 512, 4, 4): a matrix
    product on the same `weight` (see `BottleneckConv`)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 4, 1, 0, bias=False)

    def forward(self, z: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if z.shape[-2:] != (1, 1) or output_size is not None:
            return super().forward(z, output_size)
        k = self.weight.shape[-2:]
        out = z.reshape(len(z), -1) @ self.weight.flatten(1)
        return out.view(len(z), self.out_channels, *k)


def _down(cin: int, cout: int, bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, 2, 1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def _up(cin: int, cout: int, stride: int, padding: int) -> list[nn.Module]:
    if stride == 1:
        conv: nn.Module = BottleneckUpConv(cin, cout)
    else:
        conv = nn.ConvTranspose2d(cin, cout, 4, stride, padding, bias=False)
    return [
        conv,
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class InpaintingEncoder(nn.Module):
    """(B, 3, 128, 128) context -> (B, 4000, 1, 1) bottleneck (before its BatchNorm)."""

    def __init__(self, bottleneck: int = BOTTLENECK) -> None:
        super().__init__()
        widths = (64, 64, 128, 256, 512)
        layers: list[nn.Module] = _down(3, widths[0], bn=False)
        for cin, cout in zip(widths, widths[1:]):
            layers += _down(cin, cout, bn=True)
        layers.append(BottleneckConv(widths[-1], bottleneck))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class InpaintingDecoder(nn.Module):
    """(B, 4000, 1, 1) -> (B, 3, 64, 64) patch in [-1, 1]."""

    def __init__(self, bottleneck: int = BOTTLENECK) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm2d(bottleneck),
            nn.LeakyReLU(0.2, inplace=True),
            *_up(bottleneck, 512, 1, 0),  # 4x4
            *_up(512, 256, 2, 1),  # 8x8
            *_up(256, 128, 2, 1),  # 16x16
            *_up(128, 64, 2, 1),  # 32x32
            nn.ConvTranspose2d(64, 3, 4, 2, 1, bias=False),  # 64x64
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ContextEncoderGenerator(nn.Module):
    """Context (B, 3, 128, 128), hole filled, -> predicted centre patch (B, 3, 64, 64)."""

    def __init__(self, bottleneck: int = BOTTLENECK) -> None:
        super().__init__()
        self.encoder = InpaintingEncoder(bottleneck)
        self.decoder = InpaintingDecoder(bottleneck)
        dcgan_init_(self)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(context))

    @torch.no_grad()
    def features(self, context: torch.Tensor) -> torch.Tensor:
        """The 4000-d bottleneck code (B, 4000): the 'context encoder features' of NN-CE."""
        return self.encoder(context).flatten(1)


def centre_patch(images: torch.Tensor) -> torch.Tensor:
    """(B, C, 128, 128) -> the (B, C, 64, 64) centre patch the generator predicts (a view)."""
    s, e = PATCH_START, PATCH_START + PATCH_SIZE
    return images[..., s:e, s:e]


def fill_value(device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 3, 1, 1) mean colour in [-1, 1] written into dropped pixels."""
    return torch.tensor(FILL, device=device).view(1, 3, 1, 1)


def central_hole(overlap: int = 0, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(1, 1, size, size) bool, True on the dropped centre: the 64x64 patch shrunk by
    `overlap` px on each side, so that the predicted patch overlaps the context by `overlap`.
    """
    hole = torch.zeros(1, 1, size, size, dtype=torch.bool)
    s, e = PATCH_START + overlap, PATCH_START + PATCH_SIZE - overlap
    hole[..., s:e, s:e] = True
    return hole


def place_hole(region: torch.Tensor, overlap: int = 0, size: int = IMAGE_SIZE) -> torch.Tensor:
    """A (w, w) hole shape, w = 64 - 2 * overlap, placed where the central hole would be:
    (1, size, size) float 0/1. Random-region holes stay inside the predicted patch, with
    `overlap` px of context around them that the network also predicts."""
    w = PATCH_SIZE - 2 * overlap
    if tuple(region.shape) != (w, w):
        raise ValueError(f"hole region must be {w}x{w}, got {tuple(region.shape)}")
    hole = torch.zeros(1, size, size)
    s = PATCH_START + overlap
    hole[0, s : s + w, s : s + w] = region.float()
    return hole


def mask_context(images: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Context input: `images` (B, 3, H, W) with pixels where `hole` (B|1, 1, H, W) is true
    replaced by the mean colour. Returns a new tensor; `images` is left unchanged."""
    fill = fill_value(images.device).to(images.dtype)
    return torch.where(hole, fill, images)
