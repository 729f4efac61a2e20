"""`bench transfer --task segmentation`: FCN on VOC2012 (+ SBD), mean IU on seg11valid.

Writes into the run folder: `checkpoints/last.pt` while training (resumable),
`checkpoints/final.pt` (fine-tuned weights), `overlays/*.png` when `save_overlays` > 0, and
`metrics.json` last. `backend: mmseg` hands the same job to mmsegmentation
(`mmseg_backend.py`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmark.datasets.voc import VOC_CLASSES
from benchmark.distributed import setup
from benchmark.errors import ConfigError
from benchmark.runs import Run
from transfer import common
from transfer.backbone import describe_transfer, load_encoder

from .config import SegmentationConfig
from .data import SegmentationData, build_data, find_sbd, to_input
from .engine import evaluate, make_optimizer, save_overlays, scores_from_hist, train
from .model import FCN

CLASSES: tuple[str, ...] = ("background", *VOC_CLASSES)
OVERLAY_DIR = "overlays"


def default_name(cfg: SegmentationConfig) -> str:
    """seg-<method>[-<mask>][-<variant>][-mmseg]-s<seed>, e.g. seg-random-s0."""
    parts = common.name_parts("seg", cfg.weights)
    if cfg.variant != "fcn32s":
        parts.append(cfg.variant)
    if cfg.backend != "native":
        parts.append(cfg.backend)
    return "-".join(parts) + f"-s{cfg.seed}"


def check_config(cfg: SegmentationConfig) -> None:
    positive = {
        "iterations": cfg.iterations >= 0, "batch_size": cfg.batch_size >= 1,
        "lr": cfg.lr > 0, "fc_dim": cfg.fc_dim >= 1, "pad": cfg.pad >= 0,
        "log_every": cfg.log_every >= 1, "checkpoint_every": cfg.checkpoint_every >= 1,
        "eval_every": cfg.eval_every >= 0, "save_overlays": cfg.save_overlays >= 0,
        "rescale_images": cfg.rescale_images >= 1,
        "max_size": cfg.max_size is None or cfg.max_size >= 1,
        "eval_images": cfg.eval_images is None or cfg.eval_images >= 1,
        "dropout": 0 <= cfg.dropout < 1, "momentum": 0 <= cfg.momentum < 1,
        "weight_decay": cfg.weight_decay >= 0,
    }  # fmt: skip
    for key, ok in positive.items():
        if not ok:
            raise ConfigError(f"{key}: invalid value {getattr(cfg, key)!r}")


def prepare_data(cfg: SegmentationConfig, run: Run) -> SegmentationData:
    """Resolve VOC2012 and SBD folders and build the train / evaluation lists (logged)."""
    from benchmark.datasets.resolve import resolve_data

    voc = Path(resolve_data(cfg.data, "voc2012"))
    sbd = find_sbd(cfg.data, cfg.sbd, voc, cfg.use_sbd)
    data = build_data(voc, sbd, cfg.train_split, cfg.split)
    if cfg.eval_images is not None:
        data.eval = data.eval[: cfg.eval_images]
    for note in data.notes:
        run.logger.info(note)
    src = data.train_sources
    run.logger.info(
        f"segmentation data: train {len(data.train)} images ({src['voc']} VOC2012 "
        f"{cfg.train_split}, {src['sbd']} SBD) from {voc}"
        + (f" + {sbd}" if sbd else "")
        + f"; evaluation on {data.split} ({len(data.eval)} images)"
    )
    return data


def rescale_(model: FCN, samples: list, pretrained_encoder: bool) -> list[tuple[str, float]]:
    """Krähenbühl et al.'s data-dependent init (shared with classification) measured on
    training images resized to the encoder's 227x227 input."""
    import numpy as np

    from benchmark.datasets.folder import load_rgb
    from pretrain.alexnet import INPUT_SIZE
    from transfer.classification.model import data_dependent_init_

    size = (INPUT_SIZE, INPUT_SIZE)
    batch = torch.cat(
        [to_input(np.asarray(load_rgb(s.image_path).resize(size)), torch.device("cpu"))
         for s in samples]
    )  # fmt: skip
    return data_dependent_init_(model, batch, pretrained_encoder)  # type: ignore[arg-type]


def main(cfg: SegmentationConfig, run: Run) -> dict[str, Any]:
    """Train FCN, evaluate mean IU, write metrics.json; returns the metrics."""
    check_config(cfg)
    if cfg.backend == "mmseg":
        from .mmseg_backend import run_mmseg

        return run_mmseg(cfg, run)
    env = setup(cfg.device)
    device = env.device
    torch.manual_seed(cfg.seed)
    data = prepare_data(cfg, run)

    encoder, card = load_encoder(cfg.weights, cfg.arch)
    model = FCN(encoder, len(CLASSES), cfg.variant, cfg.fc_dim, cfg.dropout, cfg.pad)
    ckpt = run.load_checkpoint(common.CHECKPOINT) if run.resumed else None
    state = common.start_state(model, ckpt)
    if ckpt is not None:
        run.logger.info(f"resuming segmentation at iteration {state['iteration']}")
    elif run.resumed and (final := run.load_checkpoint(common.FINAL)) is not None:
        state = common.start_state(model, final)
        run.logger.info("training already finished: evaluating the final weights")
    elif cfg.rescale:
        scales = rescale_(model, data.train[: cfg.rescale_images], card["method"] != "random")
        run.logger.info("data-dependent init: " + ", ".join(f"{n} x{s:.3g}" for n, s in scales))
    describe_transfer(model, (), run.logger)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])

    def save(s: dict[str, Any]) -> None:
        common.save_state(run, common.CHECKPOINT, model, s, cfg, card, optimizer)

    def interim(iteration: int) -> None:
        hist, _ = evaluate(model, data.eval, cfg.max_size, device)
        scores = scores_from_hist(hist, CLASSES)
        run.log_scalars(iteration, {k: scores[k] or 0.0 for k in ("mean_iu", "pixel_acc")},
                        prefix="val/")  # fmt: skip
        run.logger.info(f"iteration {iteration}: mean IU {scores['mean_iu']:.4f}")

    if state["iteration"] < cfg.iterations:
        state = train(model, optimizer, data.train, cfg, state, device, run, save, interim)
        common.save_state(run, common.FINAL, model, state, cfg, card)
        common.drop_resume_checkpoint(run, run.is_main)

    tick = time.perf_counter()
    hist, kept = evaluate(model, data.eval, cfg.max_size, device, keep=cfg.save_overlays)
    scores = scores_from_hist(hist, CLASSES)
    overlays = save_overlays(run.file(OVERLAY_DIR), kept) if run.is_main and kept else []
    metrics = {
        **common.metrics_head("segmentation", "native", cfg, run, card, card.get("arch")),
        "variant": cfg.variant,
        "rescale": cfg.rescale,
        **scores,
        "split": data.split, "eval_images": len(data.eval),
        "train_images": len(data.train), "train_sources": data.train_sources,
        "iterations": state["iteration"], "train_seconds": state["train_seconds"],
        "eval_seconds": time.perf_counter() - tick,
        "initial_loss": state["initial_loss"], "final_loss": state["final_loss"],
        "confusion_matrix": hist.tolist(),
        "overlays": [f"{OVERLAY_DIR}/{n}" for n in overlays],
    }  # fmt: skip
    run.log_scalars(state["iteration"], {"mean_iu": scores["mean_iu"] or 0.0}, prefix="val/")
    run.logger.info(
        f"segmentation ({data.split}): mean IU {scores['mean_iu']}, pixel acc "
        f"{scores['pixel_acc']}, mean acc {scores['mean_acc']}"
    )
    run.write_metrics(metrics)
    return metrics
