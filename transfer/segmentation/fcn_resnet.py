"""FCN on a dilated ResNet (output stride 8), as mmsegmentation builds fcn_r50-d8.

The encoder's tensors go into torchvision's ResNet built with
`replace_stride_with_dilation=[False, True, True]`: res4 and res5 keep stride 8 with
dilations 2 and 4, their first blocks at the previous dilation (mmseg's ResNet with
strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation, style pytorch: the same
network, torchvision's keys). Heads (mmseg's FCNHead, decode_heads/fcn_head.py):

- decode: two 3x3 conv-BN-ReLU of 512 on res5, the concatenation with res5 through a third
  (concat_input), Dropout2d 0.1, a 1x1 classifier;
- auxiliary: one 3x3 conv-BN-ReLU of 256 on res4, Dropout2d 0.1, a 1x1 classifier, its
  loss weighted 0.4.

Convolutions are initialised as mmcv's ConvModule does (Kaiming normal, fan_out, ReLU; no
bias before a BN), classifiers N(0, 0.01) (BaseDecodeHead.init_weights). Logits are
bilinearly resized (align_corners False) to the label's size before the loss and the
arg-max. The loss is mmseg's CrossEntropyLoss (avg_non_ignore False): the sum over
non-ignored pixels divided by all pixels of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from benchmark.datasets.voc import IGNORE_INDEX
from encoders.resnet import ResNetEncoder
from transfer.detection.faster_rcnn import freeze_batch_norm

NUM_CLASSES = 21


def dilated_resnet(encoder: ResNetEncoder) -> ResNet:
    """torchvision's ResNet at output stride 8 holding the encoder's tensors (no `fc`)."""
    net = ResNet(Bottleneck, list(encoder.layers), width_per_group=encoder.width_per_group,
                 replace_stride_with_dilation=[False, True, True])  # fmt: skip
    del net.fc
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pools.")}
    net.load_state_dict(state)
    return net


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FCNHead(nn.Module):
    """mmseg's FCNHead: `num_convs` conv-BN-ReLU, optional concat with the input, dropout,
    1x1 classifier."""

    def __init__(self, cin: int, channels: int, num_convs: int, concat_input: bool,
                 dropout: float, num_classes: int = NUM_CLASSES) -> None:  # fmt: skip
        super().__init__()
        self.convs = nn.Sequential(*[conv_bn_relu(cin if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)])  # fmt: skip
        self.conv_cat = conv_bn_relu(cin + channels, channels, 3) if concat_input else None
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.conv_seg(self.dropout(out))


class FCNResNet(nn.Module):
    """(B, 3, H, W) -> logits at stride 8 (decode, and auxiliary while training), or with
    `out_size` the decode logits resized to it."""

    def __init__(
        self,
        encoder: ResNetEncoder,
        channels: int = 512,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        dropout: float = 0.1,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.convention = encoder.input_convention
        self.backbone = dilated_resnet(encoder)
        c4 = encoder.layer3[-1].conv3.out_channels
        c5 = encoder.layer4[-1].conv3.out_channels
        self.decode_head = FCNHead(c5, channels, 2, True, dropout)
        self.aux_weight = aux_weight
        self.auxiliary_head = FCNHead(c4, aux_channels, 1, False, dropout) if aux_weight else None
        if norm == "frozen":
            freeze_batch_norm(self.backbone)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        res4 = b.layer3(b.layer2(b.layer1(x)))
        return res4, b.layer4(res4)

    def forward(self, x: torch.Tensor, out_size: tuple[int, int] | None = None):
        res4, res5 = self.features(x)
        logits = self.decode_head(res5)
        if out_size is not None:
            return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        aux = self.auxiliary_head(res4) if self.training and self.auxiliary_head else None
        return logits, aux


def seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mmseg's CrossEntropyLoss (ignore 255, avg_non_ignore False) on logits resized to the
    labels: summed over labelled pixels, divided by every pixel."""
    up = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear",
                       align_corners=False)  # fmt: skip
    return F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX, reduction="sum") / labels.numel()


def poly_lr(lr: float, min_lr: float, power: float, iterations: int, iteration: int) -> float:
    """mmengine's PolyLR (eta_min `min_lr`, by iteration) at `iteration` (0-based)."""
    return (lr - min_lr) * (1 - iteration / iterations) ** power + min_lr
