"""`bench transfer --task segmentation`: FCN on VOC2012 (+ SBD), mean IU on seg11valid.

Writes into the run folder: `checkpoints/last.pt` (the loop's checkpoint), `overlays/*.png`
when `save_overlays` > 0, and `metrics.json` last. `backend: mmseg` hands the same job to
mmsegmentation (`mmseg_backend.py`, which imports mmseg only when it runs). A ResNet
encoder runs FCN on a dilated ResNet-50 instead, mmseg's fcn_r50-d8 VOC12aug protocol
(`fcn_resnet_train.py`, settings under `fcn_resnet:`); a ViT encoder is refused.

The solver follows FCN's released Caffe nets: weights learn at `lr` with weight decay,
biases at 2x `lr` without decay; each update accumulates the gradients of `iter_size`
single-image passes, each scaled by 1/iter_size as Caffe's solver does. The loss is the
softmax cross-entropy over pixels whose label is not 255, divided by the number of such
pixels (`normalize_loss`, PROTOCOL.md) or summed.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmark import loop
from benchmark.datasets.voc import IGNORE_INDEX
from benchmark.errors import ConfigError
from benchmark.input_convention import InputConvention
from benchmark.runs import Run
from transfer import common
from transfer.backbone import describe_transfer
from transfer.encoder_family import family_of, refuse_other_family_keys
from transfer.rescale import format_report, rescale_for_transfer_
from weights.encoder import load_encoder

from .config import SegmentationConfig, SegmentationTrainConfig
from .data import CLASSES, SegTrainSet, prepare_data, rescale_batch, to_input
from .evaluate import OVERLAY_DIR, evaluate, save_overlays, scores_from_hist
from .fcn_resnet_train import check_fcn_resnet, run_fcn_resnet
from .mmseg_backend import run_mmseg
from .mmseg_resnet import run_mmseg_resnet
from .model import FCN

BIAS_LR_MULT = 2.0
STAGE = "transfer/segmentation"


def default_name(cfg: SegmentationConfig) -> str:
    """seg-<method>[-<mask>][-<variant>][-mmseg]-s<seed>, e.g. seg-random-s0."""
    parts = common.name_parts("seg", cfg.weights)
    if cfg.variant != "fcn32s":
        parts.append(cfg.variant)
    if cfg.backend != "native":
        parts.append(cfg.backend)
    return "-".join(parts) + f"-s{cfg.seed}"


# The keys both segmentation models read (the rest are FCN-AlexNet's or under fcn_resnet:).
SHARED_KEYS = {"name", "seed", "data", "sbd", "device", "weights", "arch", "backend",
               "on_bad_data"}  # fmt: skip
VIT_REFUSAL = (
    "segmentation: no reference protocol for ViT encoders is implemented (bench runs FCN on a "
    "dilated ResNet-50 for ResNet and FCN-AlexNet for AlexNet encoders)"
)


def check(cfg: SegmentationConfig) -> None:
    """Every setting no run can use is a one-line error before anything runs."""
    family = family_of(cfg.weights, cfg.arch)
    if family == "vit":
        raise ConfigError(VIT_REFUSAL)
    check_fcn_resnet(cfg.fcn_resnet)
    refuse_other_family_keys(cfg, "fcn_resnet", family == "resnet", SHARED_KEYS)
    if family == "resnet":
        return
    t = cfg.train
    loop.check_loop(t)
    loop.positive("train.lr", t.lr)
    loop.positive("train.weight_decay", t.weight_decay, allow_zero=True)
    valid = {
        "train.batch_size": t.batch_size >= 1, "train.iter_size": t.iter_size >= 1,
        "train.momentum": 0 <= t.momentum < 1, "fc_dim": cfg.fc_dim >= 1, "pad": cfg.pad >= 0,
        "eval_every": cfg.eval_every >= 0, "save_overlays": cfg.save_overlays >= 0,
        "rescale_images": cfg.rescale_images >= 1,
        "max_size": cfg.max_size is None or cfg.max_size >= 1,
        "eval_images": cfg.eval_images is None or cfg.eval_images >= 1,
        "dropout": 0 <= cfg.dropout < 1,
    }  # fmt: skip
    for key, ok in valid.items():
        if not ok:
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            raise ConfigError(f"{key}: invalid value {value!r}")


SKIP_SCORES = ("score_16", "score_8")  # FCN-16s / 8s skip score layers (zero-initialised)


def rescale_(model: FCN, samples: list, pretrained_encoder: bool, seed: int = 0) -> list[dict]:
    """Krähenbühl et al.'s data-dependent init (transfer.rescale, as for every task) of the
    encoder, fc6, fc7 and score_fr. FCN-16s/8s's skip scores keep FCN's zero init (the
    reference's surgery): with them at zero the net is the chain magic_init's calibration
    assumes; re-drawn, the skip branches made it diverge (NaN within a few steps)."""
    x = rescale_batch(samples, next(model.parameters()).device, model.encoder.convention)
    return rescale_for_transfer_(
        model, lambda: model(x), "encoder.", pretrained_encoder, seed, exclude=SKIP_SCORES
    )


def make_optimizer(model: nn.Module, t: SegmentationTrainConfig) -> torch.optim.Optimizer:
    """SGD with FCN-AlexNet's per-layer multipliers: the score layers' biases learn at 2x the
    lr without decay; every other parameter (conv1-fc7 biases included) at 1x with decay,
    Caffe's defaults where the prototxt sets no `param` (voc-fcn-alexnet/train.prototxt
    score_fr L223-230; conv1-fc7 have none)."""
    score_bias, rest = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (score_bias if n.startswith("score_") and n.endswith("bias") else rest).append(p)
    groups = [
        {"params": rest, "lr": t.lr, "weight_decay": t.weight_decay},
        {"params": score_bias, "lr": t.lr * BIAS_LR_MULT, "weight_decay": 0.0},
    ]
    if t.solver == "adam":
        return loop.adam(groups, t.lr, (t.momentum, 0.999))
    return loop.sgd(groups, t.lr, t.momentum)


def pixel_loss(scores: torch.Tensor, label: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Softmax loss over non-ignored pixels: their mean (normalised) or their sum."""
    total = F.cross_entropy(scores.float(), label, ignore_index=IGNORE_INDEX, reduction="sum")
    if not normalize:
        return total
    valid = (label != IGNORE_INDEX).sum()
    return total / valid.clamp(min=1)


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    t: SegmentationTrainConfig,
    normalize: bool,
    precision: loop.Precision,
    device: torch.device,
    convention: InputConvention,
):
    """One update: `iter_size` x `batch_size` images, one forward/backward each (they differ
    in size), gradients accumulated with weight 1/(iter_size x batch_size): Caffe's solver
    divides the accumulated gradient by iter_size. Under DDP the images are shared out and
    gradients synchronised on the last pass only. Images are fed in the encoder's input
    `convention`."""
    distributed = isinstance(model, nn.parallel.DistributedDataParallel)

    def step(batch: list[tuple[np.ndarray, np.ndarray]], iteration: int) -> dict[str, Any]:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        passes = len(batch)
        for i, (image, label) in enumerate(batch):
            sync = not distributed or i == passes - 1
            ctx = contextlib.nullcontext() if sync else model.no_sync()
            with ctx:
                x = loop.nhwc(to_input(image, device, convention), t.channels_last)
                y = torch.from_numpy(label).long().to(device)[None]
                with precision.autocast():
                    scores = model(x, out_size=tuple(label.shape))
                # Each of the iter_size x batch_size images weighs 1/(their number); under DDP
                # the gradients are averaged over processes, so each weighs 1/(its share).
                loss = pixel_loss(scores, y, normalize) / passes
                precision.backward(loss)
            total += float(loss.detach())
        precision.step(optimizer)
        return {"loss": total}

    return step


def main(cfg: SegmentationConfig, run: Run) -> dict[str, Any]:
    """Train FCN, evaluate mean IU, write metrics.json; returns the metrics."""
    check(cfg)
    if family_of(cfg.weights, cfg.arch) == "resnet":
        if cfg.backend == "mmseg":
            return run_mmseg_resnet(cfg, run)
        return run_fcn_resnet(cfg, run)
    if cfg.backend == "mmseg":
        return run_mmseg(cfg, run)
    t = cfg.train
    env = loop.setup(cfg.device, t)
    torch.manual_seed(cfg.seed)
    data, skipped = prepare_data(cfg, run)

    encoder, card = load_encoder(cfg.weights, cfg.arch)
    model = FCN(encoder, len(CLASSES), cfg.variant, cfg.fc_dim, cfg.dropout, cfg.pad, cfg.upsample)
    model.to(env.device)
    if cfg.rescale and run.checkpoint is None:
        report = rescale_(
            model, data.train[: cfg.rescale_images], card["method"] != "random", cfg.seed
        )
        run.logger.info("data-dependent init: " + format_report(report))
    describe_transfer(model, (), run.logger)
    net = loop.prepare_model(model, env, t)
    optimizer = make_optimizer(model, t)
    precision = loop.Precision(t.precision, env.device)

    def interim(iteration: int) -> None:
        if iteration == t.iterations:
            return  # the final evaluation below covers the last iteration
        hist, _ = evaluate(
            model, data.eval, cfg.max_size, env, precision=precision,
            convention=encoder.convention,
        )  # fmt: skip
        scores = scores_from_hist(hist, CLASSES)
        run.log_scalars(iteration, {k: scores[k] or 0.0 for k in ("mean_iu", "pixel_acc")},
                        prefix="val/")  # fmt: skip
        run.logger.info(f"iteration {iteration}: mean IU {scores['mean_iu']}")
        model.train()

    per_step = t.batch_size * t.iter_size
    result = loop.fit(
        run, env, t, stage=STAGE, config=cfg, seed=cfg.seed,
        step=make_step(
            net, optimizer, t, cfg.normalize_loss, precision, env.device, encoder.convention
        ),
        batches=loop.loader_batches(
            SegTrainSet(data.train, cfg.max_size, cfg.mirror, cfg.seed), per_step, cfg.seed,
            env, t.workers, collate_fn=loop.list_collate,
        ),
        state={"model": net, "optimizer": optimizer}, precision=precision,
        hooks=[loop.Hook(cfg.eval_every, interim, at_end=False)], desc="segmentation",
        input_convention=encoder.convention.name,
    )  # fmt: skip

    tick = time.perf_counter()
    hist, kept = evaluate(
        model, data.eval, cfg.max_size, env, keep=cfg.save_overlays, precision=precision,
        convention=encoder.convention,
    )  # fmt: skip
    scores = scores_from_hist(hist, CLASSES)
    overlays = save_overlays(run.file(OVERLAY_DIR), kept) if run.is_main and kept else []
    metrics = {
        **common.metrics_head("segmentation", "native", cfg, run, card, card.get("arch"),
                            device=env.device, precision=result.precision),
        "variant": cfg.variant,
        "rescale": cfg.rescale,
        **scores,
        "split": data.split, "eval_images": len(data.eval),
        "train_images": len(data.train), "train_sources": data.train_sources,
        **loop.fit_fields(result, env.device), "iter_size": t.iter_size,
        "eval_seconds": time.perf_counter() - tick,
        "skipped": common.skipped_field(skipped),
        "confusion_matrix": hist.tolist(),
        "overlays": [f"{OVERLAY_DIR}/{n}" for n in overlays],
    }  # fmt: skip
    run.log_scalars(result.iterations, {"mean_iu": scores["mean_iu"] or 0.0}, prefix="val/")
    run.logger.info(
        f"segmentation ({data.split}): mean IU {scores['mean_iu']}, pixel acc "
        f"{scores['pixel_acc']}, mean acc {scores['mean_acc']}"
    )
    run.write_metrics(metrics)
    return metrics
