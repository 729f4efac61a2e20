"""`bench pretrain --method relative-position|rotation|jigsaw`: train a pretext task on the
shared AlexNet encoder through the one loop, then export the encoder like every method.

The method's parts (dataset, model, step, optimiser, lr schedule, figure) come from
`pretrain.pretext.PRETEXT_METHODS`; this module only wires them to the loop, the run folder
and the export. The exported encoder is the plain `AlexNetEncoder` state dict (conv1's
pretraining-only padding or stride changes, jigsaw's and relative position's, do not change
its keys or shapes), so it transfers and probes as any other.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from benchmark import loop
from benchmark.errors import ConfigError
from benchmark.runs import Run
from encoders.alexnet import ARCHS
from pretrain.card import card_head, metrics_head
from pretrain.preflight import ImageFolder, image_folder
from pretrain.pretext import PRETEXT_METHODS, set_learning_rate
from pretrain.pretext.config import _PretextStage
from pretrain.samples import sample_batch
from weights.native import NATIVE_FILE, write_native

SAMPLE_ITEMS = 6


def default_name(cfg: _PretextStage) -> str:
    """e.g. `pretrain-rotation-s0`."""
    return f"pretrain-{cfg.method}-s{cfg.seed}"


def check(cfg: _PretextStage) -> None:
    """Every setting no run can use is a one-line error before anything runs."""
    t = cfg.train
    loop.check_loop(dataclasses.replace(t, iterations=t.iterations or 0))
    if cfg.model.arch not in ARCHS:
        raise ConfigError(f"model.arch: {cfg.model.arch!r} is not one of {', '.join(ARCHS)}")
    if t.sample_every < 0:
        raise ConfigError(f"train.sample_every: must be >= 0, got {t.sample_every}")
    batch = getattr(cfg.pretext, "batch_size", 1)
    if batch < 1:
        raise ConfigError(f"pretext.batch_size: must be >= 1, got {batch}")


def preflight(cfg: _PretextStage) -> ImageFolder:
    """The run's images, listed and decoded before its run folder exists (`bench.stages`)."""
    return image_folder(cfg.data, cfg.on_bad_data)


def main(cfg: _PretextStage, run: Run, images: ImageFolder | None = None) -> dict[str, Any]:
    """Train the pretext task into `run`; writes encoder.safetensors (+ card), metrics.json.
    `images`: what `preflight` read (read here without it)."""
    check(cfg)
    images = images or preflight(cfg)
    parts = PRETEXT_METHODS[cfg.method]
    env = loop.setup(cfg.device, cfg.train)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    root = images.root
    paths, skipped = images.usable(cfg.on_bad_data, run.logger)
    convention = ARCHS[cfg.model.arch].convention
    dataset = parts.dataset(paths, cfg.pretext, seed=cfg.seed, convention=convention)
    batch_size = cfg.pretext.batch_size
    iterations = cfg.train.iterations or parts.total_iterations(cfg.pretext, len(paths))
    per_epoch = max(1, math.ceil(len(paths) / batch_size))
    tc = dataclasses.replace(cfg.train, iterations=iterations)
    run.logger.info(
        f"{cfg.method}: {len(paths)} images from {root}; {iterations} iterations of "
        f"{batch_size} ({per_epoch} per epoch); {convention.name} input convention"
    )
    net = parts.model(cfg.model.arch, cfg.model.pool_free, cfg.pretext)  # type: ignore[call-arg]
    model = loop.prepare_model(net, env, tc)
    optimizer = parts.make_optimizer(net, cfg.pretext)
    precision = loop.Precision(tc.precision, env.device)
    inner = parts.make_step(
        model, optimizer, env.device, precision=precision, channels_last=tc.channels_last
    )

    def step(batch: Any, iteration: int) -> dict[str, torch.Tensor]:
        set_learning_rate(optimizer, parts.learning_rate(cfg.pretext, iteration, per_epoch))
        return inner(batch, iteration)

    figure_batch = sample_batch(dataset, SAMPLE_ITEMS)

    def on_sample(iteration: int) -> None:
        if not run.is_main:
            return
        net.eval()
        with torch.no_grad(), precision.autocast():
            logits, _ = parts.forward_batch(net, figure_batch, env.device)
        net.train()
        path = run.file(f"samples/iter_{iteration:07d}.png")
        parts.sample_figure(
            figure_batch, logits.float(), path, cfg=cfg.pretext, convention=convention
        )

    result = loop.fit(
        run, env, tc, stage=f"pretrain/{cfg.method}", config=cfg, seed=cfg.seed, step=step,
        batches=loop.loader_batches(dataset, batch_size, cfg.seed, env, tc.workers),
        state={"model": model, "optimizer": optimizer}, precision=precision,
        hooks=[loop.Hook(tc.sample_every, on_sample)], desc=f"pretrain {cfg.method}",
        input_convention=convention.name,
    )  # fmt: skip
    card = {
        **card_head(cfg, result, env.device),
        "mask": None, "data": str(root), "arch": cfg.model.arch, "pool_free": cfg.model.pool_free,
        "input_convention": convention.as_dict(),
    }  # fmt: skip
    if run.is_main:
        write_native(run.file(NATIVE_FILE), net.encoder.state_dict(), card)
    first, last = result.first, result.last
    metrics = {
        **metrics_head(cfg, run, card, NATIVE_FILE, skipped),
        "mask": None, "arch": cfg.model.arch, "input_convention": convention.name,
        **loop.fit_fields(result),
        "initial_accuracy": first.get("accuracy"), "final_accuracy": last.get("accuracy"),
    }  # fmt: skip
    run.write_metrics(metrics)
    return metrics
