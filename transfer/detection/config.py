"""Fast R-CNN transfer settings: defaults are the protocol's (PROTOCOL.md, "Detection").

Values taken from the released Fast R-CNN code rather than the paper are named options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from benchmark.loop import LoopConfig

COCO_SCORE_THRESH = 0.05  # the coco branch's test_net(..., thresh=0.05)
MAX_PER_SET = 40  # master's test_net: max_per_set = 40 * num_images


@dataclass
class DetectionTrainConfig(LoopConfig):
    """Fast R-CNN's solver for CaffeNet on VOC2007 (solver.prototxt, lib/fast_rcnn/config.py)."""

    iterations: int = 40000
    ims_per_batch: int = 2  # images per SGD step (split over torchrun processes)
    rois_per_batch: int = 128  # RoIs of the whole minibatch (64 per image)
    lr: float = 1e-3
    lr_steps: tuple[int, ...] = (30000,)
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bias_lr_mult: float = 2.0  # Caffe's lr_mult 2, decay_mult 0 on biases
    workers: int = 2
    checkpoint_every: int = 5000


D2_MIN_SIZES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)


@dataclass
class FasterRCNNTrainConfig(LoopConfig):
    """detectron2's solver as MoCo's VOC config sets it (pascal_voc_R_50_C4_24k.yaml,
    Base-RCNN-C4-BN.yaml) over detectron2's defaults (config/defaults.py); sources in
    benchmark/reference/protocol.yaml."""

    iterations: int = 24000  # SOLVER.MAX_ITER
    ims_per_batch: int = 16  # SOLVER.IMS_PER_BATCH (split over torchrun processes)
    lr: float = 0.02  # SOLVER.BASE_LR
    lr_steps: tuple[int, ...] = (18000, 22000)  # SOLVER.STEPS
    gamma: float = 0.1
    warmup_iters: int = 100  # SOLVER.WARMUP_ITERS (linear, WARMUP_FACTOR 1/1000)
    warmup_factor: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # SOLVER.WEIGHT_DECAY_NORM: none on BN scales and shifts
    checkpoint_every: int = 5000  # SOLVER.CHECKPOINT_PERIOD


@dataclass
class FasterRCNNConfig:
    """Faster R-CNN R50-C4 for ResNet encoders (MoCo's VOC detection protocol): RPN on res4,
    RoIAlign 14x14, res5 (+ MoCo's extra BN) as the box head; `transfer.detection.faster_rcnn`."""

    # "<year>:<split>" of the VOCdevkit given as `data`: VOC07+12 trainval, VOC07 test
    train_sets: tuple[str, ...] = ("2007:trainval", "2012:trainval")
    test_set: str = "2007:test"
    min_size_train: tuple[int, ...] = D2_MIN_SIZES  # shorter side, one drawn per image
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    flip: bool = True  # INPUT.RANDOM_FLIP horizontal, p 0.5
    train_difficult: bool = True  # detectron2's VOC loader keeps difficult objects
    # "batch": every BN normalises with the statistics of the whole minibatch and learns
    # (naiveSyncBN; SyncBatchNorm under torchrun); "frozen": detectron2's FrozenBN
    norm: Literal["batch", "frozen"] = "batch"
    extra_norm: bool = True  # MoCo's Res5ROIHeadsExtraNorm: BN after res5
    freeze_at: int = 0  # BACKBONE.FREEZE_AT: stages kept fixed (0: none, 1: stem, 2: +res2 ...)
    precise_bn_iters: int = 200  # TEST.PRECISE_BN (0: off)
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_iou_thresholds: tuple[float, float] = (0.3, 0.7)
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_topk_train: int = 12000
    rpn_post_nms_topk_train: int = 2000
    rpn_pre_nms_topk_test: int = 6000
    rpn_post_nms_topk_test: int = 1000
    rpn_nms_thresh: float = 0.7
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    roi_iou_threshold: float = 0.5
    pooler_resolution: int = 14
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    score_thresh_test: float = 0.05
    nms_thresh_test: float = 0.5
    detections_per_image: int = 100
    train: FasterRCNNTrainConfig = field(default_factory=FasterRCNNTrainConfig)


@dataclass
class DetectionConfig:
    name: str | None = None
    seed: int = 0
    data: str | None = None  # VOCdevkit root or VOC2007 folder; None = embedded synthetic
    device: str = "auto"
    weights: str | None = None  # run folder / native export / torchvision state dict; None = random
    arch: str = "caffenet"  # architecture of the random baseline (weights carry their own)
    backend: Literal["native", "detectron2"] = "native"
    on_bad_data: Literal["error", "skip"] = "error"  # a file `bench data check` flags
    train_split: str = "trainval"
    test_split: str = "test"

    # Proposals: None = selective search (cached under <results>/cache/proposals); otherwise a
    # Fast R-CNN selective-search .mat file or a detectron2 proposal pickle for that split.
    proposals_train: str | None = None
    proposals_test: str | None = None
    ss_mode: Literal["fast", "quality"] = "fast"
    ss_max_boxes: int = 2000
    ss_image_width: int = 500  # R-CNN runs selective search on images resized to this width
    ss_min_box: int = 20  # R-CNN's minimum box side (pixels of that resized image)
    ss_workers: int = 1

    # Network
    freeze_at: int = 1  # conv layers kept fixed: Fast R-CNN fine-tunes conv2 and up for CaffeNet
    fc_dim: int = 4096
    dropout: float = 0.5
    roi_size: int = 6
    # Krähenbühl et al. 2015 within-layer data-dependent init of the encoder, fc6 and fc7
    # (the rescaling the paper discusses); off in the paper's Fast R-CNN protocol.
    rescale: bool = False
    rescale_images: int = 4

    # RoI sampling and scales (Fast R-CNN lib/fast_rcnn/config.py)
    scales: tuple[int, ...] = (600,)
    max_size: int = 1000
    flip: bool = True
    fg_fraction: float = 0.25
    fg_thresh: float = 0.5
    bg_thresh_hi: float = 0.5
    bg_thresh_lo: float = 0.1
    # Fast R-CNN trains on difficult objects like any other ground truth: its VOC loader has
    # no difficult filter (rbgirshick/fast-rcnn@e107cae lib/datasets/pascal_voc.py
    # _load_pascal_annotation); py-faster-rcnn later left them out (false here).
    train_difficult: bool = True
    # "data": box-regression targets normalised by per-class means and stds of every training
    # RoI with IoU >= 0.5 (flipped copies and gt boxes included), folded back into the
    # regression layer for testing (fast-rcnn@e107cae lib/roi_data_layer/roidb.py
    # add_bbox_regression_targets, lib/fast_rcnn/train.py snapshot); "fixed": py-faster-rcnn's
    # means 0 and stds `bbox_stds`.
    bbox_normalize: Literal["fixed", "data"] = "data"
    bbox_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    train: DetectionTrainConfig = field(default_factory=DetectionTrainConfig)

    # Test (Fast R-CNN lib/fast_rcnn/test.py test_net; `transfer.detection.inference`).
    test_scale: int = 600
    test_max_size: int = 1000
    nms: float = 0.3  # TEST.NMS (lib/fast_rcnn/config.py)
    # "master" (rbgirshick/fast-rcnn@b612190 test.py L248-324): no score threshold, the top
    # `max_per_image` per class and image, a running per-class cap of `max_per_set` x N test
    # images, then NMS; "coco" (the coco branch, @e107cae test.py L247-300): scores above
    # `score_thresh`, NMS per class, then the best `max_per_image` over all classes.
    test_postprocess: Literal["master", "coco"] = "master"
    max_per_image: int = 100  # master: per class, before NMS (L255); coco: all classes, after
    max_per_set: int = MAX_PER_SET  # master only: 40 * num_images per class (L253)
    score_thresh: float = COCO_SCORE_THRESH  # coco only: test_net(thresh=0.05)
    # The protocol of ResNet encoders (the keys above are AlexNet's Fast R-CNN): which one
    # runs is the encoder's family (transfer.detection.train.main).
    faster_rcnn: FasterRCNNConfig = field(default_factory=FasterRCNNConfig)
