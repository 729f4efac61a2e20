"""Faster R-CNN R50-C4 on a ResNet encoder, as detectron2 builds it for MoCo's VOC protocol.

Built from torchvision's detection parts (AnchorGenerator, RPNHead, RegionProposalNetwork,
RoIHeads' sampling and post-processing), with the pieces where detectron2 differs written
to match it (facebookresearch/detectron2@02b5c4e):

- backbone: the encoder's stem, res2, res3 and res4 (stride 16, 1024 channels);
  `freeze_at` k keeps the first k stages fixed (0: none, MoCo's FREEZE_AT 0);
- RPN on res4: one 3x3 conv, objectness and deltas per anchor (sizes 32..512, ratios
  0.5/1/2); its loss is detectron2's (modeling/proposal_generator/rpn.py `losses`): L1 on
  the deltas (SMOOTH_L1_BETA 0) and binary cross-entropy, both summed and divided by
  BATCH_SIZE_PER_IMAGE x images, not by the anchors actually sampled;
- RoIAlignV2 (aligned, sampling ratio 0 = adaptive) of 14x14 on res4, then res5 (its first
  block strides 2: 7x7), MoCo's extra BN after res5 (detection/train_net.py L23-34,
  `Res5ROIHeadsExtraNorm`) and the mean over space: detectron2's Res5ROIHeads;
- 21-way scores and class-specific deltas (weights 10, 10, 5, 5), N(0, 0.01) and
  N(0, 0.001) initialised (modeling/roi_heads/fast_rcnn.py), cross-entropy plus L1 summed
  over the foreground RoIs and divided by all sampled RoIs (`box_reg_loss`);
- test: softmax, per-class boxes above 0.05, NMS 0.5 per class, the best 100 per image
  (torchvision's `postprocess_detections`, the same rules as `fast_rcnn_inference`).

Every BatchNorm of the network trains and normalises with its minibatch's statistics
(`norm: batch`, naiveSyncBN's statistic; SyncBatchNorm across torchrun processes) or is
frozen to its loaded statistics (`norm: frozen`, detectron2's FrozenBN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import roi_align

from encoders.resnet import ResNetEncoder
from transfer.detection.config import FasterRCNNConfig

NUM_CLASSES = 21  # 20 VOC classes + background (index 0)
RES4_STRIDE = 16


class C4Backbone(nn.Module):
    """stem + res2..res4 of a torchvision ResNet: (B, 3, H, W) -> (B, 1024, H/16, W/16)."""

    def __init__(self, encoder: ResNetEncoder) -> None:
        super().__init__()
        self.stem = nn.Sequential(encoder.conv1, encoder.bn1, encoder.relu, encoder.maxpool)
        self.res2, self.res3, self.res4 = encoder.layer1, encoder.layer2, encoder.layer3
        self.out_channels = encoder.layer3[-1].conv3.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))


class RoIAlignV2(nn.Module):
    """detectron2's ROIAlignV2 on one map: half-pixel aligned, adaptive sampling (ratio 0)."""

    def __init__(self, resolution: int, scale: float) -> None:
        super().__init__()
        self.resolution, self.scale = resolution, scale

    def forward(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:  # fmt: skip
        x = next(iter(features.values()))
        boxes = [b.to(x.dtype) for b in boxes]
        return roi_align(x, boxes, self.resolution, self.scale, 0, aligned=True)


class Res5Head(nn.Module):
    """res5 (+ MoCo's extra BN) on pooled RoIs, averaged over space: (R, 2048)."""

    def __init__(self, encoder: ResNetEncoder, extra_norm: bool) -> None:
        super().__init__()
        self.res5 = encoder.layer4
        channels = encoder.layer4[-1].conv3.out_channels
        self.norm = nn.BatchNorm2d(channels) if extra_norm else nn.Identity()
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.res5(x)).mean(dim=(2, 3))


class BoxPredictor(nn.Module):
    """Scores and class-specific deltas, initialised as detectron2's FastRCNNOutputLayers."""

    def __init__(self, channels: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.cls_score = nn.Linear(channels, num_classes)
        self.bbox_pred = nn.Linear(channels, 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class D2RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with detectron2's loss (module docstring)."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):  # type: ignore[override]
        pos, neg = self.fg_bg_sampler(labels)
        pos_i = torch.where(torch.cat(pos, dim=0))[0]
        sampled = torch.cat([pos_i, torch.where(torch.cat(neg, dim=0))[0]])
        normalizer = float(self.fg_bg_sampler.batch_size_per_image * len(labels))
        targets = torch.cat(regression_targets, dim=0)
        box_loss = F.l1_loss(pred_bbox_deltas[pos_i].float(), targets[pos_i], reduction="sum")
        obj = objectness.flatten().float()
        obj_loss = F.binary_cross_entropy_with_logits(
            obj[sampled], torch.cat(labels, dim=0)[sampled], reduction="sum"
        )
        return obj_loss / normalizer, box_loss / normalizer


def fast_rcnn_losses(
    logits: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """detectron2's FastRCNNOutputLayers.losses: mean cross-entropy; L1 (beta 0) of the gt
    class's deltas summed over foreground RoIs, divided by all sampled RoIs."""
    loss_cls = F.cross_entropy(logits.float(), labels)
    fg = torch.where(labels > 0)[0]
    d = deltas.float().reshape(len(deltas), -1, 4)[fg, labels[fg]]
    loss_box = F.l1_loss(d, targets[fg], reduction="sum") / max(labels.numel(), 1)
    return loss_cls, loss_box


class Res5RoIHeads(RoIHeads):
    """torchvision's RoIHeads (matching, sampling, post-processing), box branch only, with
    detectron2's losses."""

    def forward(self, features, proposals, image_shapes, targets=None):  # type: ignore[override]
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(
                proposals, targets
            )
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        logits, deltas = self.box_predictor(x)
        if self.training:
            loss_cls, loss_box = fast_rcnn_losses(
                logits, deltas, torch.cat(labels), torch.cat(regression_targets)
            )
            return [], {"loss_cls": loss_cls, "loss_box_reg": loss_box}
        boxes, scores, classes = self.postprocess_detections(
            logits.float(), deltas.float(), proposals, image_shapes
        )
        return [{"boxes": b, "scores": s, "labels": c}
                for b, s, c in zip(boxes, scores, classes)], {}  # fmt: skip


class FasterRCNNC4(nn.Module):
    """(B, 3, H, W) padded images + their unpadded sizes (+ targets when training) ->
    losses (training) or per-image {"boxes", "scores", "labels"} (eval), boxes in input
    pixels (continuous coordinates, x2 = x1 + width)."""

    def __init__(self, encoder: ResNetEncoder, cfg: FasterRCNNConfig,
                 num_classes: int = NUM_CLASSES) -> None:  # fmt: skip
        super().__init__()
        self.convention = encoder.input_convention
        self.backbone = C4Backbone(encoder)
        anchors = AnchorGenerator((tuple(cfg.anchor_sizes),), (tuple(cfg.aspect_ratios),))
        head = RPNHead(self.backbone.out_channels, anchors.num_anchors_per_location()[0])
        bg, fg = cfg.rpn_iou_thresholds
        self.rpn = D2RegionProposalNetwork(
            anchors, head, fg, bg, cfg.rpn_batch_size_per_image, cfg.rpn_positive_fraction,
            {"training": cfg.rpn_pre_nms_topk_train, "testing": cfg.rpn_pre_nms_topk_test},
            {"training": cfg.rpn_post_nms_topk_train, "testing": cfg.rpn_post_nms_topk_test},
            cfg.rpn_nms_thresh,
        )  # fmt: skip
        box_head = Res5Head(encoder, cfg.extra_norm)
        self.roi_heads = Res5RoIHeads(
            RoIAlignV2(cfg.pooler_resolution, 1.0 / RES4_STRIDE), box_head,
            BoxPredictor(box_head.out_channels, num_classes), cfg.roi_iou_threshold,
            cfg.roi_iou_threshold, cfg.roi_batch_size_per_image, cfg.roi_positive_fraction,
            tuple(cfg.bbox_reg_weights), cfg.score_thresh_test, cfg.nms_thresh_test,
            cfg.detections_per_image,
        )  # fmt: skip
        freeze_stages(self, cfg.freeze_at)
        if cfg.norm == "frozen":
            freeze_batch_norm(self)

    def forward(self, images: torch.Tensor, sizes: Sequence[tuple[int, int]],
                targets: list[dict[str, torch.Tensor]] | None = None):  # fmt: skip
        features = {"res4": self.backbone(images)}
        image_list = ImageList(images, [tuple(s) for s in sizes])
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes,
                                                targets)  # fmt: skip
        if self.training:
            return {"loss_rpn_cls": rpn_losses["loss_objectness"],
                    "loss_rpn_loc": rpn_losses["loss_rpn_box_reg"], **roi_losses}  # fmt: skip
        return detections


def freeze_stages(model: FasterRCNNC4, freeze_at: int) -> None:
    """detectron2's FREEZE_AT: 1 fixes the stem, 2 also res2, ... (0: nothing)."""
    b = model.backbone
    for stage in (b.stem, b.res2, b.res3, b.res4)[:freeze_at]:
        for p in stage.parameters():
            p.requires_grad_(False)
        freeze_batch_norm(stage)


class FrozenBatchNorm(nn.Module):
    """A BatchNorm2d's affine map with fixed statistics (detectron2's FrozenBatchNorm2d);
    keeps the BatchNorm's state-dict keys."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, getattr(bn, name).detach().clone())
        self.eps = bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


def freeze_batch_norm(module: nn.Module) -> None:
    """Replace every BatchNorm2d under `module` by its FrozenBatchNorm."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm(child))
        else:
            freeze_batch_norm(child)


def param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float) -> list[dict]:
    """detectron2's get_default_optimizer_params: norm layers' parameters take
    WEIGHT_DECAY_NORM, every other parameter WEIGHT_DECAY (biases too: BIAS_LR_FACTOR 1)."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in norm_ids], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in norm_ids], "weight_decay": weight_decay_norm},
    ]


def lr_at(base_lr: float, steps: Sequence[int], gamma: float, warmup_iters: int,
          warmup_factor: float, iteration: int) -> float:  # fmt: skip
    """detectron2's WarmupMultiStepLR at `iteration` (0-based): linear warmup from
    base x warmup_factor over warmup_iters, times gamma at each step passed."""
    lr = base_lr * gamma ** sum(iteration >= s for s in steps)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr

