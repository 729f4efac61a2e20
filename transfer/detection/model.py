"""Fast R-CNN on the AlexNet encoder: conv1-conv5 (stride 16) -> RoI max pool 6x6 -> fc6, fc7
(re-initialised, dropout) -> 21-way classifier and class-specific box regressor (84)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import RoIPool

from encoders.alexnet import CONV_INDICES, AlexNetEncoder
from pretrain.dropout import Dropout

NUM_CLASSES = 21  # 20 VOC classes + background
STRIDE = 16


class FastRCNN(nn.Module):
    """(B, 3, H, W) images and (R, 5) RoIs [batch index, x1, y1, x2, y2] in input pixels ->
    class scores (R, 21) and normalised box deltas (R, 84)."""

    def __init__(
        self,
        encoder: AlexNetEncoder,
        num_classes: int = NUM_CLASSES,
        fc_dim: int = 4096,
        dropout: float = 0.5,
        roi_size: int = 6,
        freeze_at: int = 0,
        bbox_means: np.ndarray | None = None,
        bbox_stds: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.features = encoder.features[:12]  # up to relu5: conv5 features before pool5
        self.convention = encoder.convention  # the input its images are fed in
        self.roi_pool = RoIPool((roi_size, roi_size), 1.0 / STRIDE)
        c5 = encoder.out_channels
        self.fc6 = nn.Linear(c5 * roi_size * roi_size, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.dropout = Dropout(dropout)
        self.cls_score = nn.Linear(fc_dim, num_classes)
        self.bbox_pred = nn.Linear(fc_dim, 4 * num_classes)
        self.num_classes = num_classes
        # Caffe's fillers of the re-initialised layers (CaffeNet fc6/fc7, Fast R-CNN heads).
        for fc in (self.fc6, self.fc7):
            nn.init.normal_(fc.weight, 0.0, 0.005)
            nn.init.constant_(fc.bias, 0.1)
        nn.init.normal_(self.cls_score.weight, 0.0, 0.01)
        nn.init.normal_(self.bbox_pred.weight, 0.0, 0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        means = np.zeros((num_classes, 4), np.float32) if bbox_means is None else bbox_means
        stds = np.ones((num_classes, 4), np.float32) if bbox_stds is None else bbox_stds
        self.register_buffer("bbox_means", torch.as_tensor(means, dtype=torch.float32))
        self.register_buffer("bbox_stds", torch.as_tensor(stds, dtype=torch.float32))
        self.freeze_at = freeze_at
        for idx in CONV_INDICES[:freeze_at]:
            for p in self.features[idx].parameters():
                p.requires_grad_(False)

    def head(self, images: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """fc7 of every RoI: the input of both output layers."""
        conv5 = self.features(images)
        # torchvision's CPU roi_pool has no autocast rule: pool in the RoIs' dtype (fp32)
        x = self.roi_pool(conv5.to(rois.dtype), rois).flatten(1)
        x = self.dropout(F.relu(self.fc6(x)))
        return self.dropout(F.relu(self.fc7(x)))

    def forward(
        self, images: torch.Tensor, rois: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.head(images, rois)
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_loss(
    scores: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax log loss plus smooth-L1 (sigma 1) on the gt class's 4 deltas of fg RoIs.

    As Fast R-CNN's SmoothL1Loss layer, the box loss is summed over coordinates and divided
    by the number of RoIs in the batch (not of foreground RoIs).
    """
    loss_cls = F.cross_entropy(scores, labels)
    fg = torch.nonzero(labels > 0).squeeze(1)
    if fg.numel() == 0:
        return loss_cls, deltas.sum() * 0.0
    d = deltas.view(len(deltas), -1, 4)[fg, labels[fg]]
    loss_box = F.smooth_l1_loss(d, targets[fg], beta=1.0, reduction="sum") / len(labels)
    return loss_cls, loss_box


@torch.no_grad()
def fold_box_normalisation_(model: FastRCNN) -> None:
    """Fold the target normalisation into the regression layer, as Fast R-CNN does for testing
    (rbgirshick/fast-rcnn@e107cae lib/fast_rcnn/train.py `snapshot`): weights x stds, bias x
    stds + means, so the layer predicts raw targets; the model's stats become the identity."""
    stds = model.bbox_stds.reshape(-1)  # (4 x classes,)
    means = model.bbox_means.reshape(-1)
    model.bbox_pred.weight.mul_(stds[:, None])
    model.bbox_pred.bias.mul_(stds).add_(means)
    model.bbox_means.zero_()
    model.bbox_stds.fill_(1.0)


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, bias_lr_mult: float
) -> list[dict]:
    """Caffe's per-blob settings: weights (lr, wd), biases (lr x bias_lr_mult, no wd)."""
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    return [
        {"params": weights, "lr": lr, "weight_decay": weight_decay, "lr_mult": 1.0},
        {"params": biases, "lr": lr * bias_lr_mult, "weight_decay": 0.0, "lr_mult": bias_lr_mult},
    ]
