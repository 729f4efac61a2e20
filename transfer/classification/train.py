"""`bench transfer --task classification`: fine-tune on VOC2007 trainval, test on test.

Writes into the run folder: `checkpoints/last.pt` (the loop's checkpoint; after the run, the
fine-tuned weights), `scores.csv` (per test image, the crop-averaged logit of each class),
and `metrics.json` last.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark import loop
from benchmark.datasets.resolve import resolve_data
from benchmark.datasets.voc import VOC_CLASSES
from benchmark.errors import ConfigError
from benchmark.input_convention import InputConvention
from benchmark.metrics import classification_ap
from benchmark.runs import Run, atomic_write_text
from transfer import common
from transfer.backbone import check_frozen_unchanged, describe_transfer, freeze, snapshot_frozen
from transfer.rescale import format_report, rescale_for_transfer_
from weights.encoder import ALEXNET, FAMILIES, convention_of, family_of, load_encoder

from .config import ClassificationConfig, TrainConfig
from .data import EvalCrops, TrainCrops, VOCImages, rescale_batch
from .evaluate import evaluate, to_input
from .model import FROZEN_PREFIXES, ClassificationNet, EncoderClassifier, sigmoid_cross_entropy

SCORES_FILE = "scores.csv"
STAGE = "transfer/classification"


def default_name(cfg: ClassificationConfig) -> str:
    """cls-<method>[-<mask>][-<train_from>][-rescaled]-s<seed>, e.g. cls-random-s0."""
    parts = common.name_parts("cls", cfg.weights)
    if cfg.train_from != "all":
        parts.append(cfg.train_from)
    if cfg.rescale:
        parts.append("rescaled")
    return "-".join(parts) + f"-s{cfg.seed}"


def check(cfg: ClassificationConfig) -> None:
    """Every setting no run can use is a one-line error before anything runs."""
    t, a = cfg.train, cfg.augment
    loop.check_loop(t)
    if t.batch_size < 1:
        raise ConfigError(f"train.batch_size: must be >= 1, got {t.batch_size}")
    if t.lr_step < 1:
        raise ConfigError(f"train.lr_step: must be >= 1, got {t.lr_step}")
    loop.positive("train.lr", t.lr)
    loop.positive("train.lr_gamma", t.lr_gamma)
    loop.positive("train.weight_decay", t.weight_decay, allow_zero=True)
    loop.positive("train.clip_grad", t.clip_grad)
    loop.positive("train.bias_lr_mult", t.bias_lr_mult, allow_zero=True)
    loop.positive("train.bias_decay_mult", t.bias_decay_mult, allow_zero=True)
    if not 0 <= t.momentum < 1:
        raise ConfigError(f"train.momentum: must be in [0, 1), got {t.momentum}")
    if not 0 < a.scale[0] <= a.scale[1]:
        raise ConfigError(f"augment.scale: need 0 < min <= max, got {list(a.scale)}")
    if a.crop is not None and a.crop < 1:
        raise ConfigError(f"augment.crop: must be >= 1, got {a.crop}")
    if cfg.hidden < 1 or not 0 <= cfg.dropout < 1:
        raise ConfigError("hidden must be >= 1 and dropout in [0, 1)")
    if cfg.test.crops < 1 or cfg.test.batch_size < 1:
        raise ConfigError("test: crops and batch_size must be >= 1")
    if cfg.rescale and cfg.rescale_images < 2:
        raise ConfigError("rescale_images: need at least 2 images to measure a variance")


def build_model(
    cfg: ClassificationConfig, encoder: Any
) -> tuple[ClassificationConfig, ClassificationNet | EncoderClassifier]:
    """(cfg with its crop resolved, the network to fine-tune). AlexNet: fc6-fc8 on pool5 at
    the configured crop (227 by default). A ResNet / ViT: one linear layer on its head input
    at its input size (a ViT at no other: its position embedding); train_from "pool5"
    freezes the encoder, "fc7" and rescale are AlexNet's only."""
    contract = family_of(encoder) != ALEXNET
    crop = cfg.augment.crop
    if crop is None:
        crop = encoder.input_size if contract else 227
    cfg = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, crop=crop))
    if not contract:
        return cfg, ClassificationNet(encoder, crop=crop, dropout=cfg.dropout, hidden=cfg.hidden)
    if cfg.train_from == "fc7":
        raise ConfigError(f"train_from: fc7 is AlexNet's fc7; a {encoder.arch} has one new "
                          "linear layer (all, or pool5 = the encoder frozen)")  # fmt: skip
    if cfg.rescale:
        raise ConfigError(f"rescale: Krähenbühl et al.'s rescaling is AlexNet's; not for a "
                          f"{encoder.arch}")  # fmt: skip
    if family_of(encoder) == "vit" and crop != encoder.input_size:
        raise ConfigError(f"augment.crop: {crop}, but the {encoder.arch} encoder takes "
                          f"{encoder.input_size} x {encoder.input_size} images")  # fmt: skip
    return cfg, EncoderClassifier(encoder, frozen_encoder=cfg.train_from == "pool5")


def lr_at(train: TrainConfig, iteration: int) -> float:
    """Caffe's 'step' policy: lr * gamma ** floor(iteration / step)."""
    return train.lr * train.lr_gamma ** (iteration // train.lr_step)


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.SGD:
    """SGD over the trainable parameters only (frozen ones must not even see weight decay)."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.endswith("bias") else weights).append(p)
    groups = [
        {"params": weights, "lr_mult": 1.0, "weight_decay": train.weight_decay},
        {"params": biases, "lr_mult": train.bias_lr_mult,
         "weight_decay": train.weight_decay * train.bias_decay_mult},
    ]  # fmt: skip
    return loop.sgd([g for g in groups if g["params"]], train.lr, train.momentum)


def make_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train: TrainConfig,
    precision: loop.Precision,
    device: torch.device,
    convention: InputConvention,
):
    """One SGD step on a batch (images uint8 (B,3,S,S), labels (B,20), keep (B,20)); the
    images are fed in the encoder's input `convention`."""

    def step(batch: tuple[torch.Tensor, ...], iteration: int) -> dict[str, Any]:
        images, labels, keep = batch
        lr = lr_at(train, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        with precision.autocast():
            logits = model(loop.nhwc(to_input(images, device, convention), train.channels_last))
        loss = sigmoid_cross_entropy(logits, labels.to(device), keep.to(device))
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer, clip=train.clip_grad)
        return {"loss": loss.detach(), "lr": lr}

    return step


def write_scores(path: Path, ids: list[str], scores: np.ndarray) -> None:
    """scores.csv: image_id then one column per class (crop-averaged logits)."""
    lines = [",".join(("image_id", *VOC_CLASSES))]
    lines += [i + "," + ",".join(f"{v:.6f}" for v in row) for i, row in zip(ids, scores)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _ap_or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def main(cfg: ClassificationConfig, run: Run) -> dict[str, Any]:
    """Fine-tune, test, write metrics.json; returns the metrics."""
    check(cfg)
    t = cfg.train
    env = loop.setup(cfg.device, t)
    torch.manual_seed(cfg.seed)  # same initial weights on every process
    voc = Path(resolve_data(cfg.data, "voc2007"))
    train_ids, skip_train = common.checked_voc_ids(
        voc, cfg.train_split, cfg.on_bad_data, run.logger
    )
    test_ids, skip_test = common.checked_voc_ids(
        voc, cfg.test_split, cfg.on_bad_data, run.logger
    )
    train_images = VOCImages(voc, cfg.train_split, train_ids)
    test_images = VOCImages(voc, cfg.test_split, test_ids)

    encoder, card = load_encoder(cfg.weights, cfg.arch, fmt=cfg.weights_format,
                                 families=FAMILIES, task="--task classification")  # fmt: skip
    cfg, model = build_model(cfg, encoder)
    model = model.to(env.device)
    convention = convention_of(encoder)
    rescaled = None
    if run.checkpoint is None and cfg.rescale:  # a resumed run has its rescaled weights
        crops = rescale_batch(
            train_images, cfg.augment, cfg.seed, cfg.rescale_images, convention
        )
        x = to_input(crops, env.device, convention)
        rescaled = rescale_for_transfer_(
            model, lambda: model(x), "encoder.", card["method"] != "random", cfg.seed
        )
        run.logger.info("data-dependent init: " + format_report(rescaled))

    prefixes = FROZEN_PREFIXES[cfg.train_from]
    freeze(model, prefixes)
    describe_transfer(model, prefixes, run.logger)
    frozen = snapshot_frozen(model, prefixes)
    net = loop.prepare_model(model, env, t)
    optimizer = make_optimizer(model, t)
    precision = loop.Precision(t.precision, env.device)
    dataset = TrainCrops(train_images, cfg.augment, cfg.seed, convention)
    result = loop.fit(
        run, env, t, stage=STAGE, config=cfg, seed=cfg.seed,
        step=make_step(net, optimizer, t, precision, env.device, convention),
        batches=loop.loader_batches(dataset, t.batch_size, cfg.seed, env, t.workers),
        state={"model": net, "optimizer": optimizer}, precision=precision,
        desc="classification", input_convention=convention.name,
    )  # fmt: skip
    check_frozen_unchanged(model, frozen)

    tick = time.perf_counter()
    test_set = EvalCrops(test_images, cfg.augment, cfg.test, cfg.seed, convention)
    scores = evaluate(model, test_set, cfg.test, env, workers=t.workers, precision=precision)
    per_class, mean = classification_ap(
        scores, test_images.labels, test_images.difficult, method=cfg.ap
    )
    if env.is_main:
        write_scores(run.file(SCORES_FILE), test_images.ids, scores)
    metrics = {
        **common.metrics_head("classification", "native", cfg, run, card, card.get("arch"),
                            device=env.device, precision=result.precision),
        "map": _ap_or_none(mean),
        "ap": cfg.ap,
        "augment": cfg.augment.mode,
        "crop": cfg.augment.crop,
        "head": "fc6-fc8" if isinstance(model, ClassificationNet) else
                f"linear on {encoder.head_input.reads} ({encoder.head_input.dim})",
        "per_class": {c: _ap_or_none(v) for c, v in zip(VOC_CLASSES, per_class)},
        "test_crops": cfg.test_crops, "test_mode": cfg.test.mode,
        "train_from": cfg.train_from, "rescale": cfg.rescale,
        **loop.fit_fields(result, env.device),
        "test_seconds": time.perf_counter() - tick,
        "train_images": len(train_images), "test_images": len(test_images),
        "skipped": common.skipped_field(skip_train, skip_test),
        "scores": SCORES_FILE,
    }  # fmt: skip
    mean_ap = float("nan") if metrics["map"] is None else metrics["map"]
    run.log_scalars(result.iterations, {"map": mean_ap}, prefix="test/")
    run.write_metrics(metrics)
    return metrics
