"""`bench transfer --task detection`: Fast R-CNN on VOC2007 (Table 2's Detection column).

`main` fine-tunes the pretrained encoder as Fast R-CNN's backbone on trainval with
selective-search proposals and scores test with VOC2007 11-point AP (plus COCO AP).
`backend: detectron2` runs the same protocol through detectron2 (`detectron2_backend.py`,
which imports detectron2 only when it runs). A ResNet encoder runs MoCo's protocol instead,
Faster R-CNN R50-C4 on VOC07+12 (`faster_rcnn_train.py`, settings under `faster_rcnn:`); a
ViT encoder is refused (no reference protocol implemented).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark import loop
from benchmark.datasets.resolve import resolve_data
from benchmark.distributed import DistEnv
from benchmark.errors import ConfigError
from benchmark.runs import Run
from transfer import common
from transfer.backbone import check_frozen_unchanged, describe_transfer
from transfer.detection.config import (
    COCO_SCORE_THRESH,
    MAX_PER_SET,
    DetectionConfig,
    DetectionTrainConfig,
)
from transfer.detection.data import (
    TrainSet,
    bbox_normalisation,
    collate_train,
)
from transfer.detection.detectron2_backend import check_supported, run_detectron2
from transfer.detection.detectron2_r50c4 import run_detectron2_r50c4
from transfer.detection.evaluate import coco_ap, score_fields, voc07_scores, write_results_files
from transfer.detection.faster_rcnn_train import check_faster_rcnn, run_faster_rcnn
from transfer.detection.inference import detect
from transfer.detection.model import (
    FastRCNN,
    fast_rcnn_loss,
    fold_box_normalisation_,
    param_groups,
)
from transfer.detection.records import prepare_records
from transfer.encoder_family import family_of, refuse_other_family_keys
from transfer.rescale import format_report, rescale_for_transfer_
from weights.encoder import load_encoder

STAGE = "transfer/detection"


def default_name(cfg: DetectionConfig) -> str:
    """det-<method>[-<mask>][-<backend>]-s<seed>, e.g. det-random-s0."""
    parts = common.name_parts("det", cfg.weights)
    if cfg.backend != "native":
        parts.append(cfg.backend)
    return "-".join(parts) + f"-s{cfg.seed}"


# The keys both detection models read (the rest are Fast R-CNN's or under faster_rcnn:).
SHARED_KEYS = {"name", "seed", "data", "device", "weights", "arch", "backend", "on_bad_data"}
VIT_REFUSAL = (
    "detection: no reference protocol for ViT encoders is implemented (bench runs MoCo's "
    "Faster R-CNN R50-C4 for ResNet and Fast R-CNN for AlexNet encoders)"
)


def check(cfg: DetectionConfig) -> None:
    """Every setting no run can use is a one-line error before anything runs."""
    family = family_of(cfg.weights, cfg.arch)
    if family == "vit":
        raise ConfigError(VIT_REFUSAL)
    check_faster_rcnn(cfg.faster_rcnn)
    refuse_other_family_keys(cfg, "faster_rcnn", family == "resnet", SHARED_KEYS)
    if family == "resnet":
        return
    t = cfg.train
    loop.check_loop(t)
    if t.ims_per_batch < 1 or t.rois_per_batch < 1 or t.rois_per_batch % t.ims_per_batch:
        raise ConfigError(
            f"train.rois_per_batch: {t.rois_per_batch} must be a positive multiple of "
            f"train.ims_per_batch ({t.ims_per_batch})"
        )
    loop.positive("train.lr", t.lr)
    loop.positive("train.gamma", t.gamma)
    loop.positive("train.weight_decay", t.weight_decay, allow_zero=True)
    loop.positive("train.bias_lr_mult", t.bias_lr_mult, allow_zero=True)
    if not 0 <= t.momentum < 1:
        raise ConfigError(f"train.momentum: must be in [0, 1), got {t.momentum}")
    if not 0 <= cfg.freeze_at <= 5:
        raise ConfigError(f"freeze_at: {cfg.freeze_at} must be between 0 (train all) and 5")
    if not 0 < cfg.fg_fraction <= 1 or not 0 <= cfg.bg_thresh_lo <= cfg.bg_thresh_hi <= 1:
        raise ConfigError(
            "fg_fraction must be in (0, 1] and 0 <= bg_thresh_lo <= bg_thresh_hi <= 1"
        )
    if not cfg.scales or min(cfg.scales) < 1 or cfg.max_size < 1 or cfg.test_scale < 1:
        raise ConfigError("scales, max_size and test_scale must be >= 1")
    if cfg.fc_dim < 1 or not 0 <= cfg.dropout < 1 or cfg.roi_size < 1:
        raise ConfigError("fc_dim and roi_size must be >= 1 and dropout in [0, 1)")
    if min(cfg.bbox_stds) <= 0:
        raise ConfigError(f"bbox_stds: must be > 0, got {list(cfg.bbox_stds)}")
    check_test_postprocess(cfg)
    if cfg.backend == "detectron2":
        check_supported(cfg)  # what detectron2 cannot honour, before any folder is made


def check_test_postprocess(cfg: DetectionConfig) -> None:
    """A key of the other post-processing is an error, never silently unused."""
    if cfg.test_postprocess == "master":
        if cfg.max_per_image < 1 or cfg.max_per_set < 1:
            raise ConfigError("max_per_image and max_per_set must be >= 1")
        if cfg.score_thresh != COCO_SCORE_THRESH:
            raise ConfigError(
                "score_thresh: applies to test_postprocess: coco; Fast R-CNN master's test "
                "keeps every score, capped per class by max_per_image and max_per_set"
            )
    else:
        if cfg.max_per_image < 0:
            raise ConfigError("max_per_image: must be >= 0 (0: no cap)")
        if cfg.max_per_set != MAX_PER_SET:
            raise ConfigError("max_per_set: applies to test_postprocess: master only")


def lr_at(train: DetectionTrainConfig, iteration: int) -> float:
    """Step schedule: lr x gamma at each of lr_steps (Caffe's "multistep")."""
    return train.lr * train.gamma ** sum(iteration >= s for s in train.lr_steps)


def make_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train: DetectionTrainConfig,
    precision: loop.Precision,
    device: torch.device,
):
    """One SGD step of Fast R-CNN on a minibatch of images and their sampled RoIs."""

    def step(batch: dict[str, torch.Tensor], iteration: int) -> dict[str, Any]:
        lr = lr_at(train, iteration)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        b = loop.to_device(batch, device, train.channels_last)
        with precision.autocast():
            scores, deltas = model(b["images"], b["rois"])
        labels = b["labels"]
        loss_cls, loss_box = fast_rcnn_loss(scores.float(), deltas.float(), labels, b["targets"])
        loss = loss_cls + loss_box
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)
        with torch.no_grad():
            pred = scores.argmax(1)
            fg = labels > 0
            acc = (pred == labels).float().mean()
            fg_acc = (pred[fg] == labels[fg]).float().mean() if fg.any() else acc.new_zeros(())
        return {"loss": loss.detach(), "loss_cls": loss_cls.detach(),
                "loss_box": loss_box.detach(), "acc": acc, "fg_acc": fg_acc, "lr": lr}  # fmt: skip

    return step


def init_batch(dataset: TrainSet, cfg: DetectionConfig) -> dict[str, torch.Tensor]:
    """A few training images with their sampled RoIs, drawn apart from the training stream."""
    n = min(cfg.rescale_images, dataset.num_entries)
    order = np.random.default_rng([cfg.seed, 7]).permutation(dataset.num_entries)[:n]
    return collate_train([dataset[(int(e), 10**12 + i)] for i, e in enumerate(order)])


def main(cfg: DetectionConfig, run: Run) -> dict[str, Any]:
    """Train Fast R-CNN on train_split, detect on test_split, write detections and metrics."""
    check(cfg)
    if family_of(cfg.weights, cfg.arch) == "resnet":
        if cfg.backend == "detectron2":
            return run_detectron2_r50c4(cfg, run)
        return run_faster_rcnn(cfg, run, loop.setup(cfg.device, cfg.faster_rcnn.train))
    voc_root = Path(resolve_data(cfg.data, "voc2007"))
    if cfg.backend == "detectron2":
        return run_detectron2(cfg, run, voc_root)
    env = loop.setup(cfg.device, cfg.train)
    return run_native(cfg, run, voc_root, env)


def run_native(cfg: DetectionConfig, run: Run, voc_root: Path, env: DistEnv) -> dict[str, Any]:
    t = cfg.train
    torch.manual_seed(cfg.seed)
    encoder, card = load_encoder(cfg.weights, cfg.arch)
    train_records, test_records, skip_train, skip_test = prepare_records(cfg, run, voc_root)
    skipped = [*skip_train, *skip_test]
    means, stds = bbox_normalisation(
        train_records, cfg.bbox_normalize, cfg.bbox_stds, cfg.flip, cfg.train_difficult,
        cfg.fg_thresh,
    )  # fmt: skip
    model = FastRCNN(
        encoder, fc_dim=cfg.fc_dim, dropout=cfg.dropout, roi_size=cfg.roi_size,
        freeze_at=cfg.freeze_at, bbox_means=means, bbox_stds=stds,
    ).to(env.device)  # fmt: skip
    dataset = TrainSet(
        train_records, flip=cfg.flip, scales=cfg.scales, max_size=cfg.max_size,
        rois_per_image=t.rois_per_batch // t.ims_per_batch, fg_fraction=cfg.fg_fraction,
        fg_thresh=cfg.fg_thresh, bg_thresh_hi=cfg.bg_thresh_hi, bg_thresh_lo=cfg.bg_thresh_lo,
        use_difficult=cfg.train_difficult, bbox_means=means, bbox_stds=stds, seed=cfg.seed,
        convention=encoder.convention,
    )  # fmt: skip
    if cfg.rescale and run.checkpoint is None:
        batch = init_batch(dataset, cfg)
        images, rois = batch["images"].to(env.device), batch["rois"].to(env.device)
        # Fast R-CNN's output layers keep their own initialisation (N(0, 0.01), N(0, 0.001)),
        # so the calibration's top is fc7, the last layer it scales: calibrated against the
        # logits, it would grow fc7 until N(0, 0.01) scores had unit std, ~100x too large
        # (the fine-tuning then diverges at Fast R-CNN's learning rate).
        report = rescale_for_transfer_(
            model, lambda: model.head(images, rois), "features.", card["method"] != "random",
            cfg.seed,
        )  # fmt: skip
        run.logger.info("data-dependent init: " + format_report(report))
    frozen = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
              if not p.requires_grad}  # fmt: skip
    describe_transfer(model, (), run.logger)
    run.logger.info(f"fast r-cnn: {len(train_records)} train images, {len(test_records)} test")
    net = loop.prepare_model(model, env, t)
    optimizer = loop.sgd(
        param_groups(model, t.lr, t.weight_decay, t.bias_lr_mult), t.lr, t.momentum
    )
    precision = loop.Precision(t.precision, env.device)
    result = loop.fit(
        run, env, t, stage=STAGE, config=cfg, seed=cfg.seed,
        step=make_step(net, optimizer, t, precision, env.device),
        batches=loop.loader_batches(dataset, t.ims_per_batch, cfg.seed, env, t.workers,
                                    collate_fn=collate_train),
        state={"model": net, "optimizer": optimizer}, precision=precision, desc="fast r-cnn",
        input_convention=encoder.convention.name,
    )  # fmt: skip
    check_frozen_unchanged(model, frozen)
    fold_box_normalisation_(model)  # the test-time network predicts raw targets
    tick = time.perf_counter()
    detections = detect(model, test_records, cfg, env, precision=precision)
    if run.is_main:
        write_results_files(run.file("detections"), detections)
    per_class, mean = voc07_scores(detections, test_records)
    coco = coco_ap(detections, test_records)
    metrics = {
        **common.metrics_head("detection", "native", cfg, run, card, card.get("arch"),
                            device=env.device, precision=result.precision),
        **score_fields(mean, coco, per_class),
        "bbox_normalize": cfg.bbox_normalize,
        "rescale": cfg.rescale,
        "test_postprocess": cfg.test_postprocess,
        **loop.fit_fields(result, env.device),
        "test_seconds": round(time.perf_counter() - tick, 3),
        "train_images": len(train_records),
        "test_images": len(test_records),
        "skipped": common.skipped_field(skipped),
        "mean_proposals": float(np.mean([len(r.proposals) for r in test_records])),
    }
    run.logger.info(f"detection mAP {metrics['map']}  COCO AP {metrics['coco_ap']}")
    run.write_metrics(metrics)
    return metrics
