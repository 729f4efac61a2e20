"""`bench pretrain --method inpainting`: the 128-px inpainting context encoder (Section 5.1).

Losses (`loss.kind`): `l2` (masked reconstruction only, no discriminator), `adversarial`
(the generator is trained by the discriminator alone) and `joint` (0.999 L2 + 0.001 adv).
The predicted patch overlaps the context by a ring whose errors weigh 10x; `hole` says where
(`model.HoleGeometry`): "paper" (default), a 64x64 hole inside a 78x78 prediction (overlap
7), which the discriminator then judges, or "code", the released code's 64x64 prediction
around a 56x56 hole (overlap 4). Adam, beta1 0.5, batch 64, N(0, 0.02) weights, no conv
biases; the discriminator at 2e-4 and the generator at 10x that for the joint loss only, at
2e-4 for l2 and adversarial runs (train.lua L213-221). Noise-region holes are drawn once
per batch, as train_random.lua L330 does.

One iteration is the sequential update of the released code and its PyTorch port
(`pretrain.adversarial.Adversary`): a discriminator step on the real patches (the
prediction box) and on the (detached) predictions, each in its own batch (so its BatchNorm
statistics are per batch, as there); then a generator step whose adversarial term
evaluates the *updated* discriminator on the same predictions.

Speed without changing the update: the bottleneck's 4x4 conv and up-conv run as matrix
products (`model.py`), Adam is the fused kernel, the discriminator's weight gradients are
not computed in the generator step, the central hole's loss weights are computed once, and
activations are channels_last.

The run writes `generator.safetensors` (generator state dict; card in its metadata and
beside it) which `bench inpaint evaluate --weights RUN` reads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmark import loop
from benchmark.datasets.resolve import resolve_data
from benchmark.distributed import DistEnv
from benchmark.errors import ConfigError
from benchmark.runs import Run
from pretrain.adversarial import Adversary, DCGANDiscriminator
from pretrain.card import card_head, metrics_head
from pretrain.inpainting.config import G_LR_RATIO, InpaintingConfig, InpaintLossConfig
from pretrain.inpainting.data import InpaintingImages, to_pixels
from pretrain.inpainting.model import (
    HOLE_MODES,
    PATCH_SIZE,
    ContextEncoderGenerator,
    HoleGeometry,
    mask_context,
)
from pretrain.losses import masked_l2
from pretrain.masks import PER_BATCH, load_voc_shapes, make_mask_fn, random_region_mask
from pretrain.preflight import PretrainData, pretrain_data
from pretrain.samples import sample_batch, save_grid
from weights.generator import GENERATOR_FILE, write_generator

SAMPLE_IMAGES = 8
STAGE = "pretrain/inpainting"


def default_name(cfg: InpaintingConfig) -> str:
    """e.g. `inpainting-joint-central-s0`."""
    return f"inpainting-{cfg.loss.kind}-{cfg.mask}-s{cfg.seed}"


def check(cfg: InpaintingConfig) -> None:
    """Every setting no run can use is a one-line error before anything runs."""
    lc, tc = cfg.loss, cfg.train
    loop.check_loop(tc)
    if lc.overlap is not None and not 0 <= lc.overlap < PATCH_SIZE // 2:
        raise ConfigError(f"loss.overlap: must be in [0, {PATCH_SIZE // 2 - 1}], got {lc.overlap}")
    if cfg.hole not in HOLE_MODES:
        raise ConfigError(f"hole: must be one of {', '.join(HOLE_MODES)}, got {cfg.hole!r}")
    if lc.overlap_weight < 0 or lc.rec_weight < 0 or lc.adv_weight < 0:
        raise ConfigError("loss: overlap_weight, rec_weight and adv_weight must be >= 0")
    if tc.batch_size < 2:
        raise ConfigError(f"train.batch_size: must be >= 2 (BatchNorm), got {tc.batch_size}")
    if cfg.bottleneck < 1:
        raise ConfigError(f"bottleneck: must be >= 1, got {cfg.bottleneck}")
    loop.positive("train.lr", tc.lr)
    loop.positive("train.g_lr_ratio", tc.g_lr_ratio)
    if lc.kind != "joint" and tc.g_lr_ratio != G_LR_RATIO:
        raise ConfigError(
            f"train.g_lr_ratio: applies to the joint loss only; a {lc.kind} run trains the "
            "generator at train.lr, as the released train.lua L213-221 does (set train.lr)"
        )
    if not 0 <= tc.beta1 < 1:
        raise ConfigError(f"train.beta1: must be in [0, 1), got {tc.beta1}")
    if tc.load_size < 0 or tc.sample_every < 0:
        raise ConfigError("train: load_size and sample_every must be >= 0")
    if cfg.mask == "random-region" and cfg.shapes is None and cfg.data is not None:
        raise ConfigError(
            "mask: random-region holes are PASCAL VOC 2012 segmentation shapes; give them "
            "with --set shapes=<VOC2012 folder>, or choose --mask noise-region or central"
        )


def preflight(cfg: InpaintingConfig) -> PretrainData:
    """The run's images (decoded) and random-region shapes, read before its run folder
    exists (`bench.stages`)."""
    shapes = resolve_data(cfg.shapes, "voc2012") if cfg.mask == "random-region" else None
    return pretrain_data(cfg.data, cfg.on_bad_data, shapes, cfg.seed)


# ---------------------------------------------------------------- holes


def make_hole_fn(
    cfg: InpaintingConfig, run: Run | None = None, shapes: list[np.ndarray] | None = None
) -> Callable[[np.random.Generator], torch.Tensor] | None:
    """None for the fixed central hole; else rng -> (1, 128, 128) hole in the hole box.

    Random holes are drawn in the square the central hole would fill (the geometry's hole
    box: 64^2 for hole "paper", 56^2 for "code"), covering up to 1/4 of the 128x128 image
    like Section 3.3's masks (so up to all of that square); noise-region uses the released
    code's thresholded-noise windows (20-30%), one per batch (`hole_batch`).
    """
    if cfg.mask == "central":
        return None
    geometry = cfg.geometry()
    w = geometry.hole.size
    if cfg.mask == "random-region":
        if shapes is None:
            check(cfg)
            shapes = load_voc_shapes(Path(resolve_data(cfg.shapes, "voc2012")), seed=cfg.seed)
        if run is not None:
            run.logger.info(f"random-region holes from {len(shapes)} segmentation shapes")
        coverage = min(1.0, 0.25 * 128 * 128 / (w * w))
        region = functools.partial(random_region_mask, (w, w), shapes=shapes, max_coverage=coverage)
    else:
        region = make_mask_fn("noise-region", (w, w), seed=cfg.seed)
    return functools.partial(_hole, region, geometry)


def training_images(
    cfg: InpaintingConfig,
    paths: list[Path],
    run: Run | None = None,
    shapes: list[np.ndarray] | None = None,
) -> InpaintingImages:
    """The training set: random holes per image, except noise-region's, drawn once per
    batch of `train.batch_size` as the released train_random.lua L316-330 draws them.
    `shapes`: the random-region shapes `preflight` read (read here without them)."""
    per_batch = cfg.train.batch_size if cfg.mask in PER_BATCH else 0
    hole_fn = make_hole_fn(cfg, run, shapes)
    return InpaintingImages(
        paths, cfg.train.load_size, hole_fn, seed=cfg.seed, hole_batch=per_batch
    )


def _hole(region: Callable[..., np.ndarray], geometry: HoleGeometry, rng: np.random.Generator):
    return geometry.place(torch.from_numpy(np.ascontiguousarray(region(rng))))


# ---------------------------------------------------------------- one iteration


def build_nets(
    cfg: InpaintingConfig, env: DistEnv, precision: loop.Precision
) -> tuple[nn.Module, torch.optim.Optimizer, Adversary | None]:
    """Generator and its Adam on the device, and the adversary (None for loss l2).

    On CPU the weights stay NCHW even with channels_last inputs: fused Adam is ~5x slower
    on NHWC weights."""
    tc, size = cfg.train, cfg.geometry().prediction.size
    g = loop.prepare_model(ContextEncoderGenerator(cfg.bottleneck, size), env, tc)
    opt_g = loop.adam(g.parameters(), cfg.generator_lr(), (tc.beta1, 0.999))
    if cfg.loss.kind == "l2":
        return g, opt_g, None
    d = loop.prepare_model(DCGANDiscriminator(size), env, tc)
    opt_d = loop.adam(d.parameters(), tc.lr, (tc.beta1, 0.999))
    return g, opt_g, Adversary(d, opt_d, precision, fused=tc.fused_discriminator)


def make_step(
    generator: nn.Module,
    optimizer: torch.optim.Optimizer,
    adversary: Adversary | None,
    precision: loop.Precision,
    device: torch.device,
    loss: InpaintLossConfig,
    *,
    channels_last: bool = True,
    geometry: HoleGeometry | None = None,
) -> Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]:
    """One iteration on a batch {"image": (B, 3, 128, 128) in [-1, 1], optional "hole"}.

    geometry: the hole and prediction boxes (default: hole "paper" at `loss.overlap`).
    Returns scalars: "loss" (the masked L2 of the prediction, also for adversarial-only
    training, so every run logs the same quantity), "d_loss", "adv_loss", "loss_g".
    """
    geometry = geometry or HoleGeometry("paper", loss.overlap)
    if loss.overlap is not None and geometry.overlap != loss.overlap:
        raise ValueError(f"geometry overlap {geometry.overlap} != loss.overlap {loss.overlap}")
    overlap = geometry.overlap
    fixed_hole = geometry.hole_mask(device)
    if loss.kind in ("adversarial", "joint") and adversary is None:
        raise ValueError(f"loss {loss.kind} needs a discriminator")
    # The central hole's per-pixel loss weights never change: computed once, not dilated
    # again every step; the weighted mean is masked_l2's (tests check they agree).
    fixed_weights = geometry.predicted(geometry.loss_weights(None, loss.overlap_weight))
    fixed_weights = fixed_weights.to(device)
    fixed_count = int((fixed_weights > 0).sum()) * 3

    def reconstruction(fake: torch.Tensor, real: torch.Tensor, hole: torch.Tensor):
        if hole is fixed_hole:
            d2 = (fake.float() - real.float()).square()
            return (d2 * fixed_weights).sum() / (fixed_count * len(fake))
        dropped = geometry.predicted(hole.float())
        return masked_l2(fake, real, dropped, overlap, loss.overlap_weight)

    def step(batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        image = loop.to_device(batch["image"], device)
        hole = batch["hole"].to(device).bool() if "hole" in batch else fixed_hole
        context = mask_context(image, hole)
        real = geometry.predicted(image)
        context, real = loop.nhwc(context, channels_last), loop.nhwc(real, channels_last)
        with precision.autocast():
            fake = generator(context)
        out: dict[str, torch.Tensor] = {}
        adv = None
        if adversary is not None:
            out["d_loss"] = adversary.update(real, fake)
            adv = adversary.generator_loss(fake)
            out["adv_loss"] = adv.detach()
        if loss.kind == "adversarial":
            with torch.no_grad():
                rec = reconstruction(fake, real, hole)
            total = adv
        else:
            rec = reconstruction(fake, real, hole)
            total = rec if adv is None else loss.rec_weight * rec + loss.adv_weight * adv
        optimizer.zero_grad(set_to_none=True)
        precision.backward(total, "generator loss")
        precision.step(optimizer)
        out["loss"] = rec.detach()
        out["loss_g"] = total.detach()
        return out

    return step


# ---------------------------------------------------------------- the stage


def main(cfg: InpaintingConfig, run: Run, data: PretrainData | None = None) -> dict[str, Any]:
    """Train the inpainting context encoder into `run`; writes generator weights, then
    metrics.json (stage pretrain, method inpainting). `data`: what `preflight` read (read
    here without it)."""
    check(cfg)
    data = data or preflight(cfg)
    env = loop.setup(cfg.device, cfg.train)
    torch.manual_seed(cfg.seed)
    tc, lc = cfg.train, cfg.loss
    root = data.images.root
    paths, skipped = data.images.usable(cfg.on_bad_data, run.logger)
    dataset = training_images(cfg, paths, run, data.shapes)
    geometry = cfg.geometry()
    run.logger.info(
        f"{len(paths)} images from {root}; loss {lc.kind}; mask {cfg.mask}"
        f"{' (one per batch)' if dataset.mask_batch else ''}; {geometry.describe()}; Adam lr G "
        f"{cfg.generator_lr():g}" + (f", D {tc.lr:g}" if lc.kind != "l2" else "")
    )
    precision = loop.Precision(tc.precision, env.device)
    g, opt_g, adversary = build_nets(cfg, env, precision)
    state: dict[str, Any] = {"generator": g, "opt_g": opt_g}
    if adversary is not None:
        state.update(discriminator=adversary.discriminator, opt_d=adversary.optimizer)
    step = make_step(
        g, opt_g, adversary, precision, env.device, lc, channels_last=tc.channels_last,
        geometry=geometry,
    )  # fmt: skip
    generator = loop.unwrap(g)

    figure_batch = sample_batch(dataset, SAMPLE_IMAGES)

    def on_sample(iteration: int) -> None:
        if not run.is_main:
            return
        image = figure_batch["image"].to(env.device)
        hole = figure_batch.get("hole")
        hole = hole.bool() if hole is not None else geometry.hole_mask()
        hole = hole.to(env.device)
        context = mask_context(image, hole)
        generator.eval()
        with torch.no_grad(), precision.autocast():
            pred = generator(context).float()
        generator.train()
        pasted = geometry.paste(context, pred, hole)
        rows = [to_pixels(context), to_pixels(pasted), to_pixels(image)]
        save_grid(run.file(f"samples/iter_{iteration:07d}.png"), rows)

    result = loop.fit(
        run, env, tc, stage=STAGE, config=cfg, seed=cfg.seed, step=step,
        batches=loop.loader_batches(dataset, tc.batch_size, cfg.seed, env, tc.workers),
        state=state, precision=precision, hooks=[loop.Hook(tc.sample_every, on_sample)],
        desc=f"inpainting {lc.kind}",
    )  # fmt: skip
    card = {
        **card_head(cfg, result, env.device),
        "method": "inpainting",
        "loss": lc.kind,
        "mask": cfg.mask,
        "hole": cfg.hole,
        "overlap": geometry.overlap,
        "prediction_size": geometry.prediction.size,
        "bottleneck": cfg.bottleneck,
        "load_size": tc.load_size,
    }
    if run.is_main:
        write_generator(run.file(GENERATOR_FILE), generator.state_dict(), card)
    first, last = result.first.get("loss"), result.last.get("loss")
    run.logger.info(f"masked L2 {first} -> {last} in {result.seconds:.0f}s")
    metrics = {
        **metrics_head(cfg, run, card, GENERATOR_FILE, skipped),
        "loss": lc.kind,
        "mask": cfg.mask,
        "hole": cfg.hole,
        "overlap": geometry.overlap,
        **loop.fit_fields(result),
    }
    run.write_metrics(metrics)
    return metrics
