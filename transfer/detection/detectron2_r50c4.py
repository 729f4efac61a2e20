"""`backend: detectron2` for a ResNet encoder: MoCo's VOC detection run through detectron2
itself, with the anchor's own config values (facebookresearch/moco detection/configs/
pascal_voc_R_50_C4_24k_moco.yaml over Base-RCNN-C4-BN.yaml over detectron2's defaults).

detectron2's parts: GeneralizedRCNN with its ResNet backbone (res4 out, STRIDE_IN_1X1 False,
naiveSyncBN, FREEZE_AT from `faster_rcnn.freeze_at`), RPN, Res5ROIHeads plus MoCo's extra BN
(`Res5ROIHeadsExtraNorm`, registered here as MoCo's train_net.py does), DatasetMapper
(ResizeShortestEdge, RandomFlip), fvcore's update_bn_stats (TEST.PRECISE_BN) and
PascalVOCDetectionEvaluator. Every value comes from `faster_rcnn:` (`d2_settings`), the
native backend's keys, so both backends run one recorded protocol.

Ours, as in the AlexNet adapter (`detectron2_backend.py`): the loop (`benchmark.loop.fit`:
keyed sampler, checkpoints, resume, NaN guard; no detectron2 checkpoint is read or written),
the weights (`weights.encoder.load_encoder`, any format bench imports; the torchvision keys
renamed as MoCo's convert-pretrain-to-detectron2.py renames them, `d2_state`, and loaded
with only the new heads' tensors allowed missing), the image lists and checks, the lr as a
function of the iteration (WarmupMultiStepLR), and the scores (devkit AP50 plus detectron2's
AP / AP75, computed by `detectron2_voc_ap` and by detectron2's own evaluator).

detectron2 is imported only inside functions; without it the backend fails in one line.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from benchmark import loop
from benchmark.datasets.voc import VOC_CLASSES
from benchmark.errors import BenchError
from benchmark.runs import Run, atomic_write_text
from transfer import common
from transfer.detection.config import DetectionConfig, FasterRCNNConfig
from transfer.detection.data import DetRecord
from transfer.detection.evaluate import (
    detectron2_voc_ap,
    finite_or_none,
    score_fields,
    voc07_scores,
    write_results_files,
)
from transfer.detection.faster_rcnn import lr_at, param_groups
from weights.native import framework_input

STAGE = "transfer/detection/detectron2"
EXTRA_NORM_HEADS = "Res5ROIHeadsExtraNorm"


def d2_settings(c: FasterRCNNConfig, convention: Any, depth: int = 50) -> dict[str, Any]:
    """detectron2 config keys -> values for the R50-C4 protocol (a plain dict, so that it is
    checked without detectron2); `apply_settings` writes them into a CfgNode."""
    t = c.train
    pixels = framework_input("detectron2", convention)
    bg, fg = c.rpn_iou_thresholds
    return {
        "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
        "MODEL.WEIGHTS": "",  # weights are loaded by bench, never by DetectionCheckpointer
        "MODEL.MASK_ON": False,
        "MODEL.PIXEL_MEAN": pixels["MODEL.PIXEL_MEAN"],
        "MODEL.PIXEL_STD": pixels["MODEL.PIXEL_STD"],
        "INPUT.FORMAT": pixels["INPUT.FORMAT"],
        "MODEL.BACKBONE.NAME": "build_resnet_backbone",
        "MODEL.BACKBONE.FREEZE_AT": c.freeze_at,
        "MODEL.RESNETS.DEPTH": depth,
        "MODEL.RESNETS.OUT_FEATURES": ["res4"],
        "MODEL.RESNETS.STRIDE_IN_1X1": False,  # torchvision's layout (MoCo's config)
        "MODEL.RESNETS.NORM": "naiveSyncBN" if c.norm == "batch" else "FrozenBN",
        "MODEL.ANCHOR_GENERATOR.SIZES": [list(c.anchor_sizes)],
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [list(c.aspect_ratios)],
        "MODEL.RPN.IN_FEATURES": ["res4"],
        "MODEL.RPN.IOU_THRESHOLDS": [bg, fg],
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE": c.rpn_batch_size_per_image,
        "MODEL.RPN.POSITIVE_FRACTION": c.rpn_positive_fraction,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": c.rpn_pre_nms_topk_train,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": c.rpn_post_nms_topk_train,
        "MODEL.RPN.PRE_NMS_TOPK_TEST": c.rpn_pre_nms_topk_test,
        "MODEL.RPN.POST_NMS_TOPK_TEST": c.rpn_post_nms_topk_test,
        "MODEL.RPN.NMS_THRESH": c.rpn_nms_thresh,
        "MODEL.ROI_HEADS.NAME": EXTRA_NORM_HEADS if c.extra_norm else "Res5ROIHeads",
        "MODEL.ROI_HEADS.NUM_CLASSES": len(VOC_CLASSES),
        "MODEL.ROI_HEADS.IN_FEATURES": ["res4"],
        "MODEL.ROI_HEADS.IOU_THRESHOLDS": [c.roi_iou_threshold],
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": c.roi_batch_size_per_image,
        "MODEL.ROI_HEADS.POSITIVE_FRACTION": c.roi_positive_fraction,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": c.score_thresh_test,
        "MODEL.ROI_HEADS.NMS_THRESH_TEST": c.nms_thresh_test,
        "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": c.pooler_resolution,
        "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 0,
        "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": list(c.bbox_reg_weights),
        "TEST.DETECTIONS_PER_IMAGE": c.detections_per_image,
        "INPUT.MIN_SIZE_TRAIN": list(c.min_size_train),
        "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",
        "INPUT.MAX_SIZE_TRAIN": c.max_size_train,
        "INPUT.MIN_SIZE_TEST": c.min_size_test,
        "INPUT.MAX_SIZE_TEST": c.max_size_test,
        "INPUT.RANDOM_FLIP": "horizontal" if c.flip else "none",
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS": True,
        "SOLVER.IMS_PER_BATCH": t.ims_per_batch,
        "SOLVER.BASE_LR": t.lr,
        "SOLVER.STEPS": list(t.lr_steps),
        "SOLVER.MAX_ITER": t.iterations,
        "SOLVER.WARMUP_ITERS": t.warmup_iters,
        "SOLVER.WARMUP_FACTOR": t.warmup_factor,
        "SOLVER.GAMMA": t.gamma,
        "SOLVER.MOMENTUM": t.momentum,
        "SOLVER.WEIGHT_DECAY": t.weight_decay,
        "SOLVER.WEIGHT_DECAY_NORM": t.weight_decay_norm,
        "TEST.PRECISE_BN.ENABLED": c.precise_bn_iters > 0,
        "TEST.PRECISE_BN.NUM_ITER": c.precise_bn_iters,
    }


def apply_settings(node: Any, settings: dict[str, Any]) -> Any:
    """Write dotted `settings` into a detectron2 CfgNode (lists as tuples where it keeps
    tuples), then freeze it."""
    for key, value in settings.items():
        *path, leaf = key.split(".")
        target = node
        for part in path:
            target = getattr(target, part)
        old = getattr(target, leaf)
        setattr(target, leaf, tuple(value) if isinstance(old, tuple) else value)
    node.freeze()
    return node


def d2_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet keys -> detectron2 R50-C4 model keys, as MoCo's
    convert-pretrain-to-detectron2.py renames them (L26-33: stem., layerN -> res(N+1),
    bnK -> convK.norm, downsample -> shortcut), placed where GeneralizedRCNN holds them:
    stem and res2-res4 under `backbone.`, res5 under `roi_heads.` (Res5ROIHeads)."""
    out = {}
    for key, value in state.items():
        if key.startswith("pools."):  # the encoder's probe pooling: no tensors, no keys
            continue
        k = key if "layer" in key else "stem." + key
        for n in (1, 2, 3, 4):
            k = k.replace(f"layer{n}", f"res{n + 1}")
        for n in (1, 2, 3):
            k = k.replace(f"bn{n}", f"conv{n}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[("roi_heads." if k.startswith("res5") else "backbone.") + k] = value
    return out


NEW_HEAD_PREFIXES = ("proposal_generator.", "roi_heads.box_predictor.", "roi_heads.res5.norm.")


def load_encoder_into(model: nn.Module, state: dict[str, torch.Tensor], where: object) -> None:
    """The renamed encoder into the detectron2 model: every tensor must land, and only the
    new heads' tensors (RPN, box predictor, MoCo's extra BN) may stay at their init."""
    missing, unexpected = model.load_state_dict(d2_state(state), strict=False)
    missing = [k for k in missing if not k.startswith(NEW_HEAD_PREFIXES)]
    if missing or unexpected:
        raise BenchError(f"{where}: does not fit detectron2's R50-C4 (missing {missing[:4]}, "
                         f"unexpected {list(unexpected)[:4]})")  # fmt: skip


def register_extra_norm_heads() -> None:
    """MoCo's Res5ROIHeadsExtraNorm (detection/train_net.py L23-34): a norm layer of
    RESNETS.NORM after res5."""
    from detectron2.layers import get_norm
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

    if EXTRA_NORM_HEADS in ROI_HEADS_REGISTRY:
        return

    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        def __init__(self, cfg: Any, input_shape: Any) -> None:
            super().__init__(cfg, input_shape)
            norm = get_norm(cfg.MODEL.RESNETS.NORM, self.res5[-1].out_channels)
            self.res5.add_module("norm", norm)

    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


def dataset_dict(rec: DetRecord, use_difficult: bool) -> dict[str, Any]:
    """detectron2's VOC dict of one image: boxes x1 - 1, y1 - 1, x2, y2 of the XML (ours
    hold every coordinate minus 1), difficult objects kept unless `use_difficult` is off."""
    from detectron2.structures import BoxMode

    return {
        "file_name": str(rec.path), "image_id": rec.image_id,
        "height": int(rec.height), "width": int(rec.width),
        "annotations": [
            {"bbox": [float(b[0]), float(b[1]), float(b[2]) + 1.0, float(b[3]) + 1.0],
             "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(k) - 1, "iscrowd": 0}
            for b, k, d in zip(rec.gt_boxes, rec.gt_classes, rec.gt_difficult)
            if use_difficult or not d
        ],
    }  # fmt: skip


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, c: FasterRCNNConfig,
              precision: loop.Precision) -> loop.StepFn:  # fmt: skip
    from detectron2.utils.events import EventStorage

    t = c.train

    def step(batch: list[dict[str, Any]], iteration: int) -> dict[str, Any]:
        lr = lr_at(t.lr, t.lr_steps, t.gamma, t.warmup_iters, t.warmup_factor, iteration)
        for g in optimizer.param_groups:
            g["lr"] = lr
        with EventStorage(iteration), precision.autocast():
            losses = model(batch)
        loss = sum(v.float() for v in losses.values())
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)
        return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}, "lr": lr}

    return step


def run_detectron2_r50c4(cfg: DetectionConfig, run: Run) -> dict[str, Any]:
    """Train and evaluate R50-C4 through detectron2; metrics as the native backend's plus
    detectron2's own evaluator numbers."""
    from transfer.detection.detectron2_backend import (
        KeyedMapper,
        _collector,
        collector_and,
        dataset_name,
        register_split,
        require_detectron2,
    )
    from transfer.detection.faster_rcnn_train import prepare, voc_folder
    from transfer.encoder_family import load_resnet

    d2 = require_detectron2()
    from detectron2.config import get_cfg
    from detectron2.data import DatasetMapper, build_detection_test_loader
    from detectron2.evaluation import PascalVOCDetectionEvaluator, inference_on_dataset
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from fvcore.nn.precise_bn import update_bn_stats

    c, t = cfg.faster_rcnn, cfg.faster_rcnn.train
    env = loop.setup(cfg.device, t)
    torch.manual_seed(cfg.seed)
    encoder, card = load_resnet(cfg.weights, cfg.arch, "Faster R-CNN R50-C4 (detectron2)")
    if encoder.width_per_group != 64:
        raise BenchError(f"detectron2's ResNet has torchvision's widths only; {encoder.arch}")
    train_records, test_records, skipped = prepare(cfg, run)
    year, _, split = c.test_set.partition(":")
    test_root = voc_folder(cfg.data, year)
    test_name = dataset_name(test_root, split)
    register_split(test_name, test_root, split)
    register_extra_norm_heads()
    settings = d2_settings(c, encoder.input_convention, depth=sum(encoder.layers) * 3 + 2)
    settings |= {"MODEL.DEVICE": str(env.device), "DATASETS.TEST": [test_name],
                 "OUTPUT_DIR": str(run.path / "detectron2"), "SEED": cfg.seed}  # fmt: skip
    d2cfg = apply_settings(get_cfg(), settings)
    if run.is_main:
        atomic_write_text(run.path / "detectron2" / "config.yaml", d2cfg.dump())
    model = build_model(d2cfg)
    load_encoder_into(model, encoder.state_dict(), card.get("source") or "random init")
    convention = encoder.input_convention
    del encoder
    model.to(env.device).train()
    net = loop.prepare_model(model, env, t, ddp=False)
    optimizer = loop.sgd(param_groups(model, t.weight_decay, t.weight_decay_norm), t.lr,
                         t.momentum)  # fmt: skip
    precision = loop.Precision(t.precision, env.device)
    dicts = [dataset_dict(r, c.train_difficult) for r in train_records]
    dataset = KeyedMapper(dicts, DatasetMapper(d2cfg, is_train=True), cfg.seed)
    batches = loop.loader_batches(dataset, t.ims_per_batch, cfg.seed, env, t.workers,
                                  collate_fn=loop.list_collate)  # fmt: skip
    result = loop.fit(
        run, env, t, stage=STAGE, config=cfg, seed=cfg.seed,
        step=make_step(net, optimizer, c, precision), batches=batches,
        state={"model": net, "optimizer": optimizer}, precision=precision,
        desc="faster r-cnn (detectron2)", input_convention=convention.name,
    )  # fmt: skip
    tick = time.perf_counter()
    if c.precise_bn_iters:
        torch.manual_seed(loop.keyed_seed(cfg.seed, 12, env.rank, t.iterations))
        with EventStorage(t.iterations), torch.no_grad():
            update_bn_stats(model, batches(t.iterations), c.precise_bn_iters)
    collector = _collector()
    voc = PascalVOCDetectionEvaluator(test_name)
    loader = build_detection_test_loader([dataset_dict(r, True) for r in test_records],
                                         mapper=DatasetMapper(d2cfg, is_train=False))  # fmt: skip
    model.eval()
    with precision.autocast():
        inference_on_dataset(model, loader, collector_and(voc, collector))
    try:
        bbox = {k: float(v) for k, v in voc.evaluate()["bbox"].items()}
    except Exception as exc:  # noqa: BLE001 - detectron2's own numbers must not sink the run
        run.logger.warning(f"PascalVOCDetectionEvaluator failed: {type(exc).__name__}: {exc}")
        bbox = {}
    detections = collector.dets
    if run.is_main:
        write_results_files(run.file("detections"), detections)
    per_class, mean = voc07_scores(detections, test_records)
    ours = detectron2_voc_ap(detections, test_records)

    def percent(key: str) -> float | None:
        value = bbox.get(key)
        return None if value is None or not math.isfinite(value) else value / 100

    metrics = {
        **common.metrics_head("detection", "detectron2", cfg, run, card, card.get("arch"),
                              device=env.device, precision=result.precision),
        "model": "faster-rcnn-r50-c4",
        **score_fields(mean, float("nan"), per_class),
        "ap": ours["ap"], "ap50": ours["ap50"], "ap75": ours["ap75"],
        "detectron2_ap50": finite_or_none(percent("AP50")),
        "detectron2_ap75": finite_or_none(percent("AP75")),
        "detectron2_ap": finite_or_none(percent("AP")),
        "detectron2_version": d2.__version__,
        **loop.fit_fields(result, env.device),
        "test_seconds": round(time.perf_counter() - tick, 3),
        "train_images": len(train_records), "test_images": len(test_records),
        "skipped": common.skipped_field(skipped),
    }  # fmt: skip
    metrics.pop("coco_ap")
    run.logger.info(f"detectron2 R50-C4: AP50 (devkit) {metrics['map']}  AP {ours['ap']}  "
                    f"detectron2 AP {metrics['detectron2_ap']}")  # fmt: skip
    run.write_metrics(metrics)
    return metrics

