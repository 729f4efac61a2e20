"""The feature-learning context encoder of Section 3.1 (Figure 2), and its autoencoder baseline
(the discriminator of the optional joint loss is `pretrain.adversarial.DCGANDiscriminator`).

    image (B, 3, S, S) -> AlexNet conv1-pool5 (B, 256, n, n)
      -> channel-wise FC (256 * n^4 weights) -> ReLU -> dropout 0.5
      -> stride-1 1x1 convolution across channels -> ReLU
      -> five up-convolutions (ReLU after all but the last) -> (B, 3, S, S)

The pool5 size n is 6 for the paper's 227 px input; smaller inputs (demos, tests) give
smaller n and the channel-wise layer adapts. Five stride-2 up-convolutions reach 32 n px
("roughly the original size", 192 for 227); a final bilinear resize, without parameters,
makes the prediction exactly S x S so that it can be compared with the input pixel by pixel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from encoders.alexnet import AlexNetEncoder, Arch, pool5_size
from pretrain.dropout import Dropout

DECODER_WIDTHS = (128, 64, 64, 32)  # the fifth up-convolution outputs the 3 colour channels
DROPOUT = 0.5


class ChannelWiseFC(nn.Module):
    """A fully-connected layer within each feature map, none across maps.

    (B, m, n, n) -> (B, m, n, n) with m * n^4 weights (256 * 6^4 = 331,776) and m * n^2
    biases, against m^2 * n^4 for a full layer. Equivalent to the released Caffe model's
    grouped convolution (kernel n, m * n^2 outputs, m groups), done here as one batched
    matrix product.
    """

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.channels, self.size = channels, size
        area = size * size
        self.weight = nn.Parameter(torch.empty(channels, area, area))
        self.bias = nn.Parameter(torch.zeros(channels, area))
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / area))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, m, h, w = x.shape
        flat = x.reshape(b, m, h * w).transpose(0, 1)  # (m, B, n^2)
        out = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight)  # (m, B, n^2)
        return out.transpose(0, 1).reshape(b, m, h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, size={self.size}"


class Decoder(nn.Module):
    """Five 4x4 stride-2 up-convolutions from (B, C, n, n) to (B, 3, S, S).

    ReLU after each but the last: outputs are normalised pixels, which are negative too.
    """

    def __init__(self, in_channels: int, output_size: int, widths=DECODER_WIDTHS) -> None:
        super().__init__()
        self.output_size = output_size
        chans = [in_channels, *widths, 3]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            layers.append(nn.ConvTranspose2d(cin, cout, kernel_size=4, stride=2, padding=1))
            if i < len(chans) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.upconvs = nn.Sequential(*layers)
        for m in self.upconvs:
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.upconvs(x)
        if y.shape[-1] != self.output_size or y.shape[-2] != self.output_size:
            y = F.interpolate(
                y,
                size=(self.output_size, self.output_size),
                mode="bilinear",
                align_corners=False,
            )
        return y


class ContextEncoder(nn.Module):
    """Encoder, channel-wise FC bottleneck and decoder: (B, 3, S, S) -> (B, 3, S, S)."""

    def __init__(
        self, arch: Arch = "caffenet", pool_free: bool = False, input_size: int = 227
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.encoder = AlexNetEncoder(arch, pool_free)
        # The encoder trains from scratch here. Its N(0, 0.01) baseline init shrinks the signal
        # ~10x per layer, and Adam's normalised steps then kill most conv2-conv5 units within
        # a few hundred iterations; He init keeps activations alive through depth.
        for m in self.encoder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        c, n = self.encoder.out_channels, pool5_size(input_size, arch, pool_free)
        self.channel_fc = ChannelWiseFC(c, n)
        self.dropout = Dropout(DROPOUT)
        self.mix = nn.Conv2d(c, c, kernel_size=1, stride=1)  # across channels, stride 1
        nn.init.kaiming_normal_(self.mix.weight, nonlinearity="relu")
        nn.init.zeros_(self.mix.bias)
        self.decoder = Decoder(c, input_size)

    def bottleneck(self, features: torch.Tensor) -> torch.Tensor:
        """pool5 (B, 256, n, n) -> decoder input (B, 256, n, n)."""
        x = self.dropout(F.relu(self.channel_fc(features)))
        return F.relu(self.mix(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.bottleneck(self.encoder(x)))


class Autoencoder(ContextEncoder):
    """The Table 2 autoencoder baseline: the same network, trained to reconstruct its
    whole, unmasked input (the method decides the input and the loss, not the layers)."""
