"""torchvision's bottleneck ResNet (ResNet-50) as an encoder, tapped as Goyal et al. tap it.

The network is `torchvision.models.ResNet` itself without its `fc`, so its state dict has
exactly torchvision's keys (`conv1.weight`, `bn1.*`, `layerN.M.convK.weight`,
`layerN.M.bnK.*`, `layerN.0.downsample.{0,1}.*`) minus `fc.*`, and `forward` returns the
2048-d global average that torchvision's `fc` reads: the head input of classification.

Probe taps (`conv1`, `res2`..`res5`) are Goyal et al.'s (fair_self_supervision_benchmark,
self_supervision_benchmark/modeling/supervised/resnet_supervised_finetune_linear.py, the
`*_resize` AveragePool blobs that configs/benchmark_tasks/image_classification/voc07/
resnet50_supervised_extract_features.yaml lists in EXTRACT_BLOBS): each stage's output (after
the block's residual sum and ReLU; conv1 after its BN and ReLU) average-pooled to about 9k
values. At their 224 x 224 input:

    conv1 64x112x112   avg k10 s10 pad 4 -> 64x12x12  = 9216   (res_conv1_bn_resize)
    res2  256x56x56    avg k16 s8        -> 256x6x6   = 9216   (res2_2_branch2c_bn_s8k16_resize)
    res3  512x28x28    avg k13 s5        -> 512x4x4   = 8192   (res3_3_branch2c_bn_s5k13_resize)
    res4  1024x14x14   avg k8  s3        -> 1024x3x3  = 9216   (res4_5_branch2c_bn_s3k8_resize)
    res5  2048x7x7     avg k6  s1        -> 2048x2x2  = 8192   (res5_2_branch2c_bn_s1k6_resize)

The benchmark builds its nets with CNNModelHelper (cuDNN engine, modeling/model_builder.py);
Caffe2's CuDNNPoolOp runs AveragePool in CUDNN_POOLING_AVERAGE_COUNT_EXCLUDE_PADDING mode
(and its own CUDA kernels leave padding out unless `count_include_pad` is set), so conv1's
padded border cells average only the pixels inside the map: `count_include_pad=False`
here. VISSL's LINEAR_EVAL_FEAT_POOL_OPS_MAP (its feature-extraction docs) uses the same
kernels through torch's AvgPool2d, whose default counts the padding; the two differ only in
conv1's border cells. `res5avg` is VISSL's name for the 2048-d global average (DINO's
eval_knn.py feature for a ResNet, whose fc it replaces by Identity).
Flattening is (C, h, w), the reference's reshape. At another input size a stage map is
adaptively average-pooled to the reference grid instead (12, 6, 4, 3, 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from .contract import TORCHVISION_INPUT, HeadInput, Tap, check_input, check_tap_names

REFERENCE_INPUT = 224
GOYAL = (
    "Goyal et al. 2019, fair_self_supervision_benchmark modeling/supervised/"
    "resnet_supervised_finetune_linear.py"
)
VISSL_RES5AVG = "VISSL LINEAR_EVAL_FEAT_POOL_OPS_MAP 'res5avg'; DINO eval_knn.py (fc = Identity)"


@dataclass(frozen=True)
class StagePool:
    """Goyal et al.'s pooling of one stage: AvgPool2d(kernel, stride, padding) at 224."""

    tap: str
    reads: str
    channels: int
    downsampling: int  # how many stride-2 steps lie between the input and this map
    kernel: int
    stride: int
    padding: int
    grid: int  # side of the pooled map at the reference input


STAGES: tuple[StagePool, ...] = (
    StagePool("conv1", "conv1 after bn1 and ReLU", 64, 1, 10, 10, 4, 12),
    StagePool("res2", "layer1 output (res2, after the last block's ReLU)", 256, 2, 16, 8, 0, 6),
    StagePool("res3", "layer2 output (res3)", 512, 3, 13, 5, 0, 4),
    StagePool("res4", "layer3 output (res4)", 1024, 4, 8, 3, 0, 3),
    StagePool("res5", "layer4 output (res5)", 2048, 5, 6, 1, 0, 2),
)
# torchvision's names for the depths it ships; any other bottleneck ResNet gets a
# descriptive name (width-reduced networks in tests).
NAMED: dict[tuple[tuple[int, ...], int], str] = {
    ((3, 4, 6, 3), 64): "resnet50",
    ((3, 4, 23, 3), 64): "resnet101",
    ((3, 8, 36, 3), 64): "resnet152",
    ((3, 4, 6, 3), 128): "wide_resnet50_2",
    ((3, 4, 23, 3), 128): "wide_resnet101_2",
}


def _halve(side: int) -> int:
    """Side after a stride-2 layer with "same" padding (conv1 7/2 p3, maxpool 3/2 p1, 3x3/2
    p1): floor((side - 1) / 2) + 1."""
    return (side - 1) // 2 + 1


def stage_side(stage: StagePool, input_size: int) -> int:
    side = input_size
    for _ in range(stage.downsampling):
        side = _halve(side)
    return side


def _pooling(stage: StagePool, side: int) -> tuple[nn.Module, int, str]:
    """(module, pooled side, description): the reference window at the reference side, an
    adaptive average to the reference grid at any other."""
    if side == stage_side(stage, REFERENCE_INPUT):
        k, s, p = stage.kernel, stage.stride, stage.padding
        pooled = (side + 2 * p - k) // s + 1
        module = nn.AvgPool2d(k, s, padding=p, count_include_pad=False)
        how = f"avg k{k} s{s}" + (f" pad {p} (padding not counted)" if p else "")
        return module, pooled, how
    grid = min(stage.grid, side)
    return nn.AdaptiveAvgPool2d(grid), grid, f"adaptive avg to {grid}x{grid}"


def resnet_arch(layers: Sequence[int], width_per_group: int) -> str:
    key = (tuple(layers), width_per_group)
    return NAMED.get(key, "resnet-" + "-".join(map(str, layers)) + f"-w{width_per_group}")


class ResNetEncoder(ResNet):
    """torchvision's bottleneck ResNet without `fc`; see the module docstring."""

    family = "resnet"
    input_convention = TORCHVISION_INPUT
    default_taps = tuple(s.tap for s in STAGES)  # Goyal et al.'s EXTRACT_BLOBS
    knn_tap = "res5avg"

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        width_per_group: int = 64,
        input_size: int = REFERENCE_INPUT,
    ) -> None:
        super().__init__(Bottleneck, list(layers), width_per_group=width_per_group)
        del self.fc  # the classifier is not the encoder: no `fc.*` keys
        self.layers = tuple(int(n) for n in layers)
        self.width_per_group = int(width_per_group)
        self.input_size = int(input_size)
        self.arch = resnet_arch(self.layers, self.width_per_group)
        pools: dict[str, nn.Module] = {}
        taps: dict[str, Tap] = {}
        for stage in STAGES:
            side = stage_side(stage, self.input_size)
            pools[stage.tap], pooled, how = _pooling(stage, side)
            dim = stage.channels * pooled * pooled
            taps[stage.tap] = Tap(
                stage.tap,
                stage.reads,
                (stage.channels, side, side),
                f"{how} -> {stage.channels}x{pooled}x{pooled}",
                dim,
                GOYAL,
            )
        last = STAGES[-1]
        side = stage_side(last, self.input_size)
        taps["res5avg"] = Tap("res5avg", "layer4 output averaged over space (the fc's input)",
                              (last.channels, side, side), "global average", last.channels,
                              VISSL_RES5AVG)  # fmt: skip
        self.pools = nn.ModuleDict(pools)
        self.taps = taps
        self.head_input = HeadInput("layer4 output averaged over space (torchvision's fc input)",
                                    (last.channels,))  # fmt: skip

    def config(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "width_per_group": self.width_per_group,
                "input_size": self.input_size}  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, 2048): torchvision's forward up to `fc`'s input."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def extract(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """{tap: (N, dim)} in network order; stops after the deepest requested stage."""
        names = check_tap_names(self, names)
        check_input(self, x)
        order = list(self.taps)
        deepest = max(order.index(n) for n in names)
        out: dict[str, torch.Tensor] = {}
        x = self.relu(self.bn1(self.conv1(x)))
        if "conv1" in names:
            out["conv1"] = self.pools["conv1"](x).flatten(1)
        x = self.maxpool(x)
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        for stage, layer in zip(STAGES[1:], layers):
            if order.index(stage.tap) > deepest:
                break
            x = layer(x)
            if stage.tap in names:
                out[stage.tap] = self.pools[stage.tap](x).flatten(1)
        if "res5avg" in names:
            out["res5avg"] = torch.flatten(self.avgpool(x), 1)
        return {n: out[n] for n in names}


def resnet50(input_size: int = REFERENCE_INPUT) -> ResNetEncoder:
    """torchvision's ResNet-50 (randomly initialised as torchvision initialises it)."""
    return ResNetEncoder((3, 4, 6, 3), 64, input_size)
