"""`bench transfer --task classification`: fine-tune on VOC2007 trainval, test on test.

Writes into the run folder: `checkpoints/last.pt` while training (resumable; removed once
`checkpoints/final.pt`, the fine-tuned weights, is written), `scores.csv` (per test image,
the crop-averaged logit of each class), and `metrics.json` last.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from benchmark.datasets.voc import VOC_CLASSES
from benchmark.distributed import DistEnv, setup
from benchmark.errors import ConfigError
from benchmark.metrics import classification_ap
from benchmark.runs import Run, atomic_write_text
from transfer import common
from transfer.backbone import (
    check_frozen_unchanged,
    describe_transfer,
    freeze,
    load_encoder,
    snapshot_frozen,
)

from .config import ClassificationConfig
from .data import EvalCrops, IterationBatches, TrainCrops, VOCImages, rescale_batch
from .engine import evaluate, fit, make_optimizer, to_input
from .model import FROZEN_PREFIXES, ClassificationNet, data_dependent_init_

SCORES_FILE = "scores.csv"


def default_name(cfg: ClassificationConfig) -> str:
    """cls-<method>[-<mask>][-<train_from>][-rescaled]-s<seed>, e.g. cls-random-s0."""
    parts = common.name_parts("cls", cfg.weights)
    if cfg.train_from != "all":
        parts.append(cfg.train_from)
    if cfg.rescale:
        parts.append("rescaled")
    return "-".join(parts) + f"-s{cfg.seed}"


def check_config(cfg: ClassificationConfig, env: DistEnv) -> None:
    t, a = cfg.train, cfg.augment
    if t.iterations < 0 or t.lr_step < 1 or t.log_every < 1 or t.checkpoint_every < 1:
        raise ConfigError("train: iterations must be >= 0 and lr_step, log_every, "
                          "checkpoint_every >= 1")  # fmt: skip
    if t.batch_size < 1 or t.batch_size % env.world_size:
        raise ConfigError(
            f"train.batch_size: {t.batch_size} must be a positive multiple of the "
            f"{env.world_size} processes"
        )
    if not 0 < a.scale[0] <= a.scale[1]:
        raise ConfigError(f"augment.scale: need 0 < min <= max, got {list(a.scale)}")
    if cfg.hidden < 1 or not 0 <= cfg.dropout < 1:
        raise ConfigError("hidden must be >= 1 and dropout in [0, 1)")
    if cfg.test.crops < 1 or cfg.test.batch_size < 1:
        raise ConfigError("test: crops and batch_size must be >= 1")
    if cfg.rescale and cfg.rescale_images < 2:
        raise ConfigError("rescale_images: need at least 2 images to measure a variance")


def _voc2007(data: str | None) -> Path:
    from benchmark.datasets.resolve import resolve_data

    return Path(resolve_data(data, "voc2007"))


def write_scores(path: Path, ids: list[str], scores: np.ndarray) -> None:
    """scores.csv: image_id then one column per class (crop-averaged logits)."""
    lines = [",".join(("image_id", *VOC_CLASSES))]
    lines += [i + "," + ",".join(f"{v:.6f}" for v in row) for i, row in zip(ids, scores)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _ap_or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def main(cfg: ClassificationConfig, run: Run) -> dict[str, Any]:
    """Fine-tune, test, write metrics.json; returns the metrics."""
    env = setup(cfg.device)
    check_config(cfg, env)
    torch.manual_seed(cfg.seed)  # same initial weights on every process
    voc = _voc2007(cfg.data)
    train_images = VOCImages(voc, cfg.train_split)
    test_images = VOCImages(voc, cfg.test_split)

    encoder, card = load_encoder(cfg.weights, cfg.arch)
    model = ClassificationNet(
        encoder, crop=cfg.augment.crop, dropout=cfg.dropout, hidden=cfg.hidden
    )
    ckpt = None
    if run.resumed:  # a crash during the test resumes from the finished weights
        ckpt = run.load_checkpoint(common.FINAL) or run.load_checkpoint(common.CHECKPOINT)
    state = common.start_state(model, ckpt)
    if ckpt is not None:
        run.logger.info(f"resuming classification at iteration {state['iteration']}")
    model.to(env.device)
    if env.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if ckpt is None and cfg.rescale:
        batch = rescale_batch(train_images, cfg.augment, cfg.seed, cfg.rescale_images)
        scales = data_dependent_init_(
            model, to_input(batch, env.device), pretrained_encoder=card["method"] != "random"
        )
        run.logger.info("data-dependent init: " + ", ".join(f"{n} x{s:.3g}" for n, s in scales))

    prefixes = FROZEN_PREFIXES[cfg.train_from]
    freeze(model, prefixes)
    describe_transfer(model, prefixes, run.logger)
    frozen = snapshot_frozen(model, prefixes)
    optimizer = make_optimizer(model, cfg.train)
    if ckpt is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    net: torch.nn.Module = model
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)

    def save(s: dict[str, Any]) -> None:
        common.save_state(run, common.CHECKPOINT, model, s, cfg, card, optimizer)

    t = cfg.train
    sampler = IterationBatches(len(train_images), t.batch_size, cfg.seed, state["iteration"],
                               t.iterations, env.rank, env.world_size)  # fmt: skip
    loader = DataLoader(
        TrainCrops(train_images, cfg.augment, cfg.seed), batch_sampler=sampler,
        num_workers=t.workers, pin_memory=env.device.type == "cuda",
    )  # fmt: skip
    state = fit(net, loader, optimizer, t, state, seed=cfg.seed, env=env, run=run, save=save)
    check_frozen_unchanged(model, frozen)
    if t.save_final:
        common.save_state(run, common.FINAL, model, state, cfg, card)
    common.drop_resume_checkpoint(run, env.is_main)

    tick = time.perf_counter()
    test_set = EvalCrops(test_images, cfg.augment, cfg.test, cfg.seed)
    scores = evaluate(model, test_set, cfg.test, env, workers=t.workers)
    per_class, mean = classification_ap(scores, test_images.labels, test_images.difficult)
    if env.is_main:
        write_scores(run.file(SCORES_FILE), test_images.ids, scores)
    metrics = {
        **common.metrics_head("classification", "native", cfg, run, card, card.get("arch")),
        "map": _ap_or_none(mean),
        "per_class": {c: _ap_or_none(v) for c, v in zip(VOC_CLASSES, per_class)},
        "test_crops": cfg.test_crops, "test_mode": cfg.test.mode,
        "train_from": cfg.train_from, "rescale": cfg.rescale,
        "iterations": state["iteration"], "train_seconds": state["train_seconds"],
        "test_seconds": time.perf_counter() - tick,
        "initial_loss": state["initial_loss"], "final_loss": state["final_loss"],
        "train_images": len(train_images), "test_images": len(test_images),
        "scores": SCORES_FILE,
    }  # fmt: skip
    mean_ap = float("nan") if metrics["map"] is None else metrics["map"]
    run.log_scalars(state["iteration"], {"map": mean_ap}, prefix="test/")
    run.write_metrics(metrics)
    return metrics
