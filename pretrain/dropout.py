"""Dropout with its mask drawn by `torch.rand` on CPU.

torch's CPU dropout draws its mask with `bernoulli_(p)`, one scalar draw per element: 8.7 ms
for FCN's (1, 4096, 12, 16) bf16 fc6 map, fwd + bwd, against 2.2 ms for a uniform draw
compared with p. The same law (each unit kept with probability 1 - p, kept units scaled by
1 / (1 - p), as Caffe's and torch's dropout), another stream of random numbers. Elsewhere
(CUDA's fused kernel), in eval mode and for p in {0, 1}, it is `nn.Dropout` itself.
"""

from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Dropout):
    """`nn.Dropout` (same parameters, state dict and eval behaviour), faster on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.inplace or not 0 < self.p < 1 or x.device.type != "cpu":
            return super().forward(x)
        # float32 uniforms in [0, 1): P(u >= p) = 1 - p to within 2^-24.
        keep = torch.rand_like(x, dtype=torch.float32).ge_(self.p)
        return x * keep.mul_(1.0 / (1.0 - self.p)).to(x.dtype)
