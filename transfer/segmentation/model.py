"""FCN-32s/16s/8s on the AlexNet encoder, with outputs aligned to the input pixels.

FCN pads conv1 by 100 pixels, upsamples the stride-32 scores with a fixed bilinear
deconvolution and crops the result at the offset that lines each score up with the centre of
its receptive field. We keep the 100-pixel pad (more for inputs under ~27 px, which would
leave pool5 smaller than fc6's 6x6 window) and do the same alignment explicitly: the
image coordinate of every feature cell (`offset + stride * index`) is derived from the
layers' kernels, strides and pads, and scores are linearly interpolated at each output
pixel's coordinate. Inside the map that is exactly what a bilinear deconvolution plus crop
computes; at the borders the edge score is held instead of fading to zero. Because the
coordinates come from the layer geometry, outputs align at any (odd) input size and for
either encoder architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from encoders.alexnet import AlexNetEncoder, features_output_size, layer_geometry
from pretrain.dropout import Dropout

Variant = Literal["fcn32s", "fcn16s", "fcn8s"]
VARIANTS: tuple[str, ...] = ("fcn32s", "fcn16s", "fcn8s")
FCN_PAD = 100
# Skip sources inside `features` (torchvision layout): conv2's ReLU output (stride 8) and
# conv5's ReLU output (stride 16), AlexNet's counterparts of VGG's pool3 and pool4.
SKIP_STRIDE8 = 4
SKIP_STRIDE16 = 11


@dataclass(frozen=True)
class Grid:
    """Image coordinate of feature cell i along one axis: offset + stride * i."""

    offset: float
    stride: float

    def after(self, kernel: int, stride: int, padding: int) -> Grid:
        """The grid of a conv/pool output whose input lies on this grid."""
        return Grid(self.offset + self.stride * ((kernel - 1) / 2 - padding), self.stride * stride)

    def shifted(self, delta: float) -> Grid:
        return Grid(self.offset + delta, self.stride)


def smallest_pad(size: int, pad: int, layers: Sequence[nn.Module], cells: int) -> int:
    """The least padding >= `pad` for which an input of `size` px still leaves `cells` output
    cells after `layers` (rounding as each layer does, Caffe's ceil pooling included): FCN's
    pad 100 covers normal images, tiny ones need more."""
    while features_output_size(layers, size + 2 * pad) < cells:  # type: ignore[arg-type]
        pad += 1
    return pad


def feature_grids(features: nn.Sequential, pad: int) -> list[Grid]:
    """Grid of the output of every layer in `features`, for an input padded by `pad`."""
    grid = Grid(-float(pad), 1.0)
    grids = []
    for layer in features:
        geom = layer_geometry(layer)
        if geom is not None:
            grid = grid.after(*geom)
        grids.append(grid)
    return grids


def _axis_weights(
    coords: torch.Tensor, grid: Grid, size: int, edge: str = "hold"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbouring cell indices (i0, i1) and their weights (w0, w1) for each coordinate.

    edge "hold": past the outermost cells their value is held (clamped coordinates);
    "zero": a tent of half-width `stride` around each cell centre and nothing beyond, i.e.
    exactly what a fixed bilinear up-convolution (kernel 2 stride - 1) and crop computes, so
    the scores fade to zero past the outermost centres as in FCN.
    """
    t = (coords - grid.offset) / grid.stride
    if edge == "hold":
        t = t.clamp(0, size - 1)
    f = t.floor()
    w1 = t - f
    i0 = f.long()
    i1 = i0 + 1
    w0 = 1 - w1
    if edge == "zero":
        w0 = torch.where((i0 >= 0) & (i0 < size), w0, torch.zeros_like(w0))
        w1 = torch.where((i1 >= 0) & (i1 < size), w1, torch.zeros_like(w1))
    return i0.clamp(0, size - 1), i1.clamp(0, size - 1), w0, w1


def _axis_matrix(
    coords: torch.Tensor, grid: Grid, size: int, edge: str, dtype: torch.dtype
) -> torch.Tensor:
    """(len(coords), size) matrix whose row k holds coordinate k's two weights."""
    i0, i1, w0, w1 = _axis_weights(coords, grid, size, edge)
    w0, w1 = w0.to(dtype), w1.to(dtype)
    m = torch.zeros(len(coords), size, device=coords.device, dtype=dtype)
    return m.scatter_add_(1, i0[:, None], w0[:, None]).scatter_add_(1, i1[:, None], w1[:, None])


def resample(
    x: torch.Tensor, grid: Grid, ys: torch.Tensor, xs: torch.Tensor, edge: str = "hold"
) -> torch.Tensor:
    """Bilinear interpolation of map `x` (B, C, h, w) on `grid` at image coords ys x xs
    (edges as `_axis_weights` says), in float32 (or x's dtype if wider).

    Separable, as two matrix products with the (rows, h) and (w, columns) weight matrices:
    each output is w0 * x[i0] + w1 * x[i1] as gathering would compute it (the other terms
    are exact zeros), but the backward is two more matrix products instead of a
    scatter-add over the full-resolution map (~13 ms of a 260 ms FCN step)."""
    h, w = x.shape[-2:]
    # coordinates in float32 even under bf16 autocast, which would snap pixels above 256
    # to steps of 2; the scores too, as the loss takes them
    dtype = torch.promote_types(x.dtype, torch.float32)
    my = _axis_matrix(ys.float(), grid, h, edge, dtype)
    mx = _axis_matrix(xs.float(), grid, w, edge, dtype)
    with torch.autocast(x.device.type, enabled=False):
        return torch.matmul(torch.matmul(my, x.to(dtype)), mx.T)


def pixel_coords(n_out: int, n_in: int, device: torch.device) -> torch.Tensor:
    """Input-image coordinates of the centres of n_out output pixels spanning n_in pixels."""
    idx = torch.arange(n_out, device=device, dtype=torch.float32)
    if n_out == n_in:
        return idx
    return (idx + 0.5) * (n_in / n_out) - 0.5


class DenseConv2d(nn.Conv2d):
    """A stride-1, unpadded convolution (FCN's convolutionalised fc6 and fc7)
    computed as one matrix product over its unfolded windows: the same values and
    parameters, but oneDNN's backward of a 4096-channel convolution over a small map runs
    at about a third of a matmul's rate (measured: fc6's backward 342 ms in bf16, 3x a
    matmul of its FLOPs). The output comes out channels_last, as the layers after expect."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        oh, ow = h - kh + 1, w - kw + 1
        if (kh, kw) == (1, 1):
            cols = x.permute(0, 2, 3, 1)  # (B, h, w, C): free for a channels_last input
        else:  # (B, C * kh * kw, L) in the order of weight.flatten(1)
            cols = F.unfold(x, (kh, kw)).transpose(1, 2).reshape(b, oh, ow, -1)
        return F.linear(cols, self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


class FCN(nn.Module):
    """Encoder + fc6/fc7 as convolutions + score layer (+ skips), scores at input pixels."""

    def __init__(
        self,
        encoder: AlexNetEncoder,
        num_classes: int = 21,
        variant: Variant = "fcn32s",
        fc_dim: int = 4096,
        dropout: float = 0.5,
        pad: int = FCN_PAD,
        upsample: str = "deconv",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown FCN variant {variant!r}; choose from {VARIANTS}")
        self.encoder = encoder
        self.variant = variant
        self.pad = pad
        if upsample not in ("deconv", "interpolate"):
            raise ValueError(f"upsample {upsample!r} is not deconv or interpolate")
        self.edge = "zero" if upsample == "deconv" else "hold"
        self.num_classes = num_classes
        feats = encoder.features
        self.fc6 = DenseConv2d(encoder.out_channels, fc_dim, kernel_size=6)
        self.fc7 = DenseConv2d(fc_dim, fc_dim, kernel_size=1)
        self.drop = Dropout(dropout) if dropout > 0 else nn.Identity()  # Caffe-style
        self.score_fr = nn.Conv2d(fc_dim, num_classes, kernel_size=1)
        self.score_16: nn.Conv2d | None = None
        self.score_8: nn.Conv2d | None = None
        if variant in ("fcn16s", "fcn8s"):
            self.score_16 = nn.Conv2d(feats[SKIP_STRIDE16 - 1].out_channels, num_classes, 1)
        if variant == "fcn8s":
            self.score_8 = nn.Conv2d(feats[SKIP_STRIDE8 - 1].out_channels, num_classes, 1)
        self._init_head()
        # Grids for an unpadded input; forward() shifts them by the pad it applies.
        grids = feature_grids(feats, 0)
        self.grid_32 = grids[-1].after(6, 1, 0)  # fc6 (6x6, no pad); fc7/score are 1x1
        self.grid_16 = grids[SKIP_STRIDE16]
        self.grid_8 = grids[SKIP_STRIDE8]

    def _init_head(self) -> None:
        # fc6/fc7 are not part of the exported encoder: He init keeps their activations at
        # the scale of pool5. Score layers start at zero as in FCN, so skips begin as no-ops.
        for m in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
        for m in (self.score_fr, self.score_16, self.score_8):
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def pad_for(self, size: int) -> int:
        """FCN's pad, or more for inputs so small that pool5 would be under fc6's 6x6."""
        return smallest_pad(size, self.pad, self.encoder.features, 6)

    def forward(self, x: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Normalised images (B, 3, h, w) -> class scores (B, C, *out_size) (default h, w).

        With an `out_size` other than (h, w), output pixel centres are mapped onto the input
        (half-pixel convention), so a resized input still scores the full-size label map.
        """
        h, w = x.shape[-2:]
        out_h, out_w = out_size or (h, w)
        taps: dict[int, torch.Tensor] = {}
        pad = self.pad_for(min(h, w))
        y = F.pad(x, (pad,) * 4)
        for i, layer in enumerate(self.encoder.features):
            y = layer(y)
            if i in (SKIP_STRIDE8, SKIP_STRIDE16):
                taps[i] = y
        y = self.drop(F.relu(self.fc6(y), inplace=True))
        y = self.drop(F.relu(self.fc7(y), inplace=True))
        score, grid = self.score_fr(y), self.grid_32.shifted(-pad)
        for conv, tap, tgrid in (
            (self.score_16, SKIP_STRIDE16, self.grid_16.shifted(-pad)),
            (self.score_8, SKIP_STRIDE8, self.grid_8.shifted(-pad)),
        ):
            if conv is None:
                continue
            skip = conv(taps[tap])
            sh, sw = skip.shape[-2:]
            ys = tgrid.offset + tgrid.stride * torch.arange(sh, device=x.device)
            xs = tgrid.offset + tgrid.stride * torch.arange(sw, device=x.device)
            score, grid = resample(score, grid, ys, xs, self.edge) + skip, tgrid
        ys = pixel_coords(out_h, h, x.device)
        xs = pixel_coords(out_w, w, x.device)
        return resample(score, grid, ys, xs, self.edge)
