"""The AlexNet/CaffeNet encoder up to pool5: the representation every transfer task judges.

Layer indices follow torchvision's `AlexNet.features` (0 conv1, 3 conv2, 6 conv3, 8 conv4,
10 conv5, pools at 2, 5, 12) in every architecture, so state dicts always use the keys
`features.{0,3,6,8,10}.{weight,bias}`. Architectures (`ARCHS`):

- `caffenet`: the paper's encoder as Caffe ran it (BVLC reference CaffeNet): conv1 96@11 s4,
  ReLU, max-pool 3/2, LRN; conv2 256@5 pad 2 in 2 groups, ReLU, pool, LRN; conv3 384@3;
  conv4 384@3 in 2 groups; conv5 256@3 in 2 groups; ReLU; pool5. Pooling rounds up (Caffe).
- `bvlc-alexnet`: the same with LRN before pooling (BVLC's reference AlexNet).
- `alexnet-plain`: CaffeNet's widths without groups or LRN, floor pooling: the network this
  project trained before the encoder followed Caffe (old cards call it "caffenet").
- `torchvision`: torchvision's widths (64-192-384-256-256), needed to import its ImageNet file.

Each arch takes one input convention (`ArchSpec.convention`, `benchmark.input_convention`):
`caffenet` and `bvlc-alexnet` Caffe's (BGR, 0-255, minus (104, 117, 123)), at whose scale
their LRN layers act and N(0, 0.01) weights give Caffe's activations; `torchvision`
torchvision's, which its ImageNet file was trained with; `alexnet-plain` torchvision's too: it
has no LRN for the scale to matter to, and every file of it was made with that convention.

Where an arch has LRN, indices 2 and 5 hold a parameter-free `PoolNorm` applying pool and
LRN in the arch's order, so the indices above stay put. Code that walks `features` should
use `conv_layers()`, `pool_layers()`, `layer_geometry()` and `layer_output_size()` rather
than `isinstance(m, nn.MaxPool2d)`. With `pool_free=True` each max-pool is replaced by a
learned convolution of the same kernel and stride (the paper's finer-inpainting variant);
inside a `PoolNorm` its keys are `features.{2,5}.pool.*`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.input_convention import CAFFE, TORCHVISION, InputConvention, fold_conv1

Arch = Literal["caffenet", "bvlc-alexnet", "alexnet-plain", "torchvision"]


@dataclass(frozen=True)
class LRNSpec:
    """Caffe's ACROSS_CHANNELS LRN: x / (k + alpha / n * sum_window x^2) ** beta."""

    local_size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0


@dataclass(frozen=True)
class ArchSpec:
    """Everything that distinguishes one encoder architecture from another."""

    widths: tuple[int, int, int, int, int]
    conv1_pad: int
    groups: tuple[int, int, int, int, int]
    lrn: LRNSpec | None  # after conv1 and conv2 (none after conv5, as in Caffe's nets)
    lrn_first: bool  # LRN before pooling (BVLC AlexNet) rather than after (CaffeNet)
    ceil_mode: bool  # Caffe rounds pooled sizes up; torchvision and the old network down
    convention: InputConvention  # the input every stage feeds this arch (module docstring)


CAFFE_LRN = LRNSpec()
_CAFFE_WIDTHS = (96, 256, 384, 384, 256)
_CAFFE_GROUPS = (1, 2, 1, 2, 2)
ARCHS: dict[str, ArchSpec] = {
    "caffenet": ArchSpec(_CAFFE_WIDTHS, 0, _CAFFE_GROUPS, CAFFE_LRN, False, True, CAFFE),
    "bvlc-alexnet": ArchSpec(_CAFFE_WIDTHS, 0, _CAFFE_GROUPS, CAFFE_LRN, True, True, CAFFE),
    "alexnet-plain": ArchSpec(
        _CAFFE_WIDTHS, 0, (1, 1, 1, 1, 1), None, False, False, TORCHVISION
    ),
    "torchvision": ArchSpec(
        (64, 192, 384, 256, 256), 2, (1, 1, 1, 1, 1), None, False, False, TORCHVISION
    ),
}
WIDTHS: dict[str, tuple[int, int, int, int, int]] = {a: s.widths for a, s in ARCHS.items()}
CONV_INDICES = (0, 3, 6, 8, 10)
POOL_INDICES = (2, 5, 12)
CONV5_END = 12  # features[:12] ends with conv5's ReLU (stride 16, before pool5)
INPUT_SIZE = 227
POOL5_SIZE = 6


def _window_sum(x: torch.Tensor, size: int, before: int) -> torch.Tensor:
    """Sum over `size` neighbouring channels, window [c - before, c - before + size), zeros
    outside: one cumulative sum and one difference instead of `size` shifted adds.

    A channels_last input is summed as the (N, H, W, C) tensor it is in memory, so that the
    result stays channels_last: `cumsum(1)` returns NCHW, and every elementwise op of the
    LRN after it then mixed layouts (~10x slower each; NHWC LRN fwd + bwd 9.0 -> 4.7 ms)."""
    padded = F.pad(x, (0, 0, 0, 0, before + 1, size - 1 - before))
    if (
        padded.dim() == 4
        and not padded.is_contiguous()
        and padded.is_contiguous(memory_format=torch.channels_last)
    ):
        total = padded.permute(0, 2, 3, 1).cumsum(-1).permute(0, 3, 1, 2)
    else:
        total = padded.cumsum(1)
    return total[:, size:] - total[:, :-size]


class _LRNFunction(torch.autograd.Function):
    """Caffe's ACROSS_CHANNELS LRN in float32 with Caffe's own backward
    (lrn_layer.cpp: dx = dy * scale^-beta - 2 alpha beta / n * x * sum_window(dy * y / scale)).

    torch's F.local_response_norm goes through avg_pool3d and autograd's generic pow/div
    backward: ~2-3x slower on CPU and the largest non-convolution cost of a CaffeNet step.
    """

    @staticmethod
    def forward(ctx, x, size: int, alpha: float, beta: float, k: float):  # type: ignore[override]
        xf = x.float()
        scale = _window_sum(xf * xf, size, size // 2).mul_(alpha / size).add_(k)
        inv = scale.pow(-beta)
        ctx.save_for_backward(xf, scale, inv)
        ctx.lrn = (size, alpha, beta)
        return xf * inv

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xf, scale, inv = ctx.saved_tensors
        size, alpha, beta = ctx.lrn
        grad = grad.float()
        ratio = grad * xf * inv / scale  # dy * y / scale
        # y_c depends on x_j for j in c's window, so x_j collects from the mirrored window.
        back = _window_sum(ratio, size, (size - 1) // 2)
        return grad * inv - (2.0 * alpha * beta / size) * xf * back, None, None, None, None


class CaffeLRN(nn.LocalResponseNorm):
    """Caffe's LRN, x / (k + alpha / n * sum_window x^2) ** beta, computed in float32
    whatever the input dtype.

    The window is centred (size // 2 channels before, (size - 1) // 2 after, zeros beyond
    the ends), as F.local_response_norm and Caffe do for the odd sizes Caffe accepts; it
    equals F.local_response_norm to float rounding (tests/test_caffenet.py). Float32
    because squared activations at Caffe's 0-255 input scale overflow fp16.
    """

    def __init__(self, spec: LRNSpec) -> None:
        if spec.local_size % 2 != 1:
            raise ValueError(f"LRN local_size must be odd as in Caffe, got {spec.local_size}")
        super().__init__(spec.local_size, spec.alpha, spec.beta, spec.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _LRNFunction.apply(x, self.size, self.alpha, self.beta, self.k)
        return y.to(x.dtype)


class PoolNorm(nn.Module):
    """Pooling and LRN as one parameter-free (unless pool-free) layer, in the arch's order."""

    def __init__(self, pool: nn.Module, norm: nn.Module, lrn_first: bool) -> None:
        super().__init__()
        self.pool = pool
        self.norm = norm
        self.lrn_first = lrn_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lrn_first:
            return self.pool(self.norm(x))
        return self.norm(self.pool(x))

    def extra_repr(self) -> str:
        return f"lrn_first={self.lrn_first}"


def _pool(channels: int, pool_free: bool, ceil_mode: bool) -> nn.Module:
    if pool_free:
        return nn.Conv2d(channels, channels, kernel_size=3, stride=2)
    # Caffe: pooled = ceil((H + 2p - k) / s) + 1, minus 1 if p > 0 and the last window
    # would start in the padding ((pooled - 1) * s >= H + p). torch's ceil_mode computes
    # (H + 2p - k + s - 1) // s + 1 (the same ceiling) and applies that correction for any
    # p. With p = 0 and k >= s it never fires ((pooled - 1) * s <= H - k + s - 1 < H), so
    # for these 3/2 pools without padding both rules agree at every input size; the last
    # window may hang over the edge, and both take the max of its in-image part.
    return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=ceil_mode)


def _pool_stage(channels: int, spec: ArchSpec, pool_free: bool) -> nn.Module:
    pool = _pool(channels, pool_free, spec.ceil_mode)
    if spec.lrn is None:
        return pool
    return PoolNorm(pool, CaffeLRN(spec.lrn), spec.lrn_first)


class AlexNetEncoder(nn.Module):
    """conv1-conv5 + pool5: (B, 3, 227, 227) -> (B, 256, 6, 6)."""

    def __init__(self, arch: Arch = "caffenet", pool_free: bool = False) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown encoder arch {arch!r}; choose from {sorted(ARCHS)}")
        spec = ARCHS[arch]
        c1, c2, c3, c4, c5 = spec.widths
        g = spec.groups
        self.arch = arch
        self.spec = spec
        self.pool_free = pool_free
        self.convention = spec.convention  # what every stage feeds it
        self.out_channels = c5
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=spec.conv1_pad, groups=g[0]),
            nn.ReLU(inplace=True),
            _pool_stage(c1, spec, pool_free),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2, groups=g[1]),
            nn.ReLU(inplace=True),
            _pool_stage(c2, spec, pool_free),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1, groups=g[2]),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1, groups=g[3]),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1, groups=g[4]),
            nn.ReLU(inplace=True),
            _pool(c5, pool_free, spec.ceil_mode),
        )
        gaussian_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def conv5(self, x: torch.Tensor) -> torch.Tensor:
        """Features before pool5 (stride 16), as Fast R-CNN and FCN use them."""
        return self.features[:CONV5_END](x)

    def conv_layers(self) -> list[nn.Conv2d]:
        """conv1..conv5 in order (not the pool-free convolutions)."""
        return [self.features[i] for i in CONV_INDICES]  # type: ignore[misc]

    def pool_layers(self) -> list[nn.Module]:
        """The three pooling layers (MaxPool2d, or Conv2d when pool-free), LRN left out."""
        layers = [self.features[i] for i in POOL_INDICES]
        return [m.pool if isinstance(m, PoolNorm) else m for m in layers]

    def output_size(self, size: int) -> int:
        """Spatial side of pool5 for a size x size input (6 at 227)."""
        return features_output_size(self.features, size)


def _first(v: int | tuple[int, ...] | str) -> int:
    if isinstance(v, str):
        raise ValueError(f"string padding {v!r} is not supported")
    return v[0] if isinstance(v, tuple) else int(v)


def layer_geometry(layer: nn.Module) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) of a square conv/pool layer (a PoolNorm counts as its
    pool); None for point-wise layers (ReLU, LRN)."""
    if isinstance(layer, PoolNorm):
        return layer_geometry(layer.pool)
    if isinstance(layer, nn.Conv2d):
        if _first(layer.dilation) != 1:
            raise ValueError("dilated convolutions are not supported")
        return _first(layer.kernel_size), _first(layer.stride), _first(layer.padding)
    if isinstance(layer, nn.MaxPool2d):
        if _first(layer.dilation) != 1:
            raise ValueError("dilated pooling is not supported")
        return _first(layer.kernel_size), _first(layer.stride), _first(layer.padding)
    return None


def _out_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    if ceil_mode:  # Caffe's / torch's rule, see _pool
        out = -(-(size + 2 * p - k) // s) + 1
        return out - 1 if (out - 1) * s >= size + p else out
    return (size + 2 * p - k) // s + 1


def layer_output_size(layer: nn.Module, size: int) -> int:
    """Output side of `layer` for an input side `size`, rounding as the layer does."""
    geom = layer_geometry(layer)
    if geom is None:
        return size
    pool = layer.pool if isinstance(layer, PoolNorm) else layer
    return _out_size(size, *geom, isinstance(pool, nn.MaxPool2d) and bool(pool.ceil_mode))


def features_output_size(layers: nn.Sequential, size: int) -> int:
    """Output side of a run of layers (e.g. `features` or `features[:12]`)."""
    for layer in layers:
        size = layer_output_size(layer, size)
    return size


def pool5_size(input_size: int, arch: Arch = "caffenet", pool_free: bool = False) -> int:
    """Spatial side of pool5 for an S x S input (6 at 227 for every arch)."""
    spec = ARCHS[arch]
    ceil_mode = spec.ceil_mode and not pool_free
    size = _out_size(input_size, 11, 4, spec.conv1_pad, False)
    for _ in range(3):  # pool1, pool2, pool5 (conv2-conv5 keep the size)
        size = _out_size(size, 3, 2, 0, ceil_mode)
    if size < 1:
        raise ValueError(f"input size {input_size} is too small for AlexNet")
    return size


def gaussian_init_(module: nn.Module, std: float = 0.01) -> None:
    """The 'random Gaussian' baseline's init: N(0, std) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def refold_conv1(
    state: Mapping[str, torch.Tensor],
    arch: str,
    source: InputConvention,
    target: InputConvention,
) -> dict[str, torch.Tensor]:
    """An encoder state dict made for `source` input, with conv1 folded (in float64) to give
    the same outputs on `target` input; a plain copy when the two are the same.

    ValueError for an arch whose conv1 pads with zeros (torchvision's): a padded zero is
    each convention's own mean colour, so no fold is exact there."""
    out = dict(state)
    if source == target:
        return out
    if ARCHS[arch].conv1_pad:
        raise ValueError(
            f"arch {arch!r} pads conv1 by {ARCHS[arch].conv1_pad}, so weights made for "
            f"{source.name} input cannot be folded exactly to take {target.name} input"
        )
    w, b = out["features.0.weight"], out["features.0.bias"]
    new_w, new_b = fold_conv1(w.detach().cpu(), b.detach().cpu(), source, target)
    out["features.0.weight"] = torch.from_numpy(new_w).to(w.dtype)
    out["features.0.bias"] = torch.from_numpy(new_b).to(b.dtype)
    return out
