"""`bench pretrain --method inpainting`: the 128-px inpainting context encoder (Section 5.1).

Losses (`loss.kind`): `l2` (masked reconstruction only, no discriminator), `adversarial`
(the generator is trained by the discriminator alone) and `joint` (0.999 L2 + 0.001 adv).
The predicted 64x64 patch overlaps the context by `loss.overlap` px (paper 7, released code
4) whose errors weigh 10x. Adam, generator 2e-3 and discriminator 2e-4 (the 10x ratio),
beta1 0.5, batch 64, N(0, 0.02) weights.

Speed without changing the update: the bottleneck's 4x4 conv and up-conv run as matrix
products (`pretrain.inpainting`), Adam is the fused kernel, the discriminator's weight
gradients are not computed in the generator step (they were zeroed before use), the central
hole's loss weights are computed once, and activations are channels_last.

One iteration is the sequential update of the released code and its PyTorch port: a
discriminator step on the real centre patches and on the (detached) predictions, each in
its own batch (so its BatchNorm statistics are per batch, as there); then a generator step
whose adversarial term evaluates the *updated* discriminator on the same predictions.
`train.fused_discriminator` runs the discriminator's real and fake batches as one
concatenated batch instead: faster, but its BatchNorm then normalises real and fake
together, so it is an option, off by default.

The run writes `generator.safetensors` (generator state dict; card in its metadata and
beside it) which `bench inpaint evaluate --weights RUN` reads.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from benchmark.config import config_hash
from benchmark.datasets.folder import list_images
from benchmark.datasets.resolve import resolve_data
from benchmark.distributed import DistEnv, setup
from benchmark.errors import BenchError, ConfigError
from benchmark.runs import Run, atomic_write_bytes, atomic_write_json
from pretrain.engine import adam, fit_schedule, prepare_model, seed_everything, to_device, unwrap
from pretrain.inpainting import (
    BOTTLENECK,
    PATCH_SIZE,
    ContextEncoderGenerator,
    PatchDiscriminator,
    central_hole,
    centre_patch,
    mask_context,
    place_hole,
)
from pretrain.inpainting_data import LOAD_SIZE, InpaintingImages, to_pixels
from pretrain.losses import (
    ADV_WEIGHT,
    OVERLAP_PAPER,
    OVERLAP_WEIGHT,
    REC_WEIGHT,
    discriminator_loss,
    generator_adversarial_loss,
    loss_weights,
    masked_l2,
)
from pretrain.masks import load_voc_shapes, make_mask_fn, random_region_mask
from pretrain.samples import save_grid

LossKind = Literal["l2", "adversarial", "joint"]
HoleName = Literal["central", "random-region", "noise-region"]
GENERATOR_FILE = "generator.safetensors"
BOTTLENECK_KEY = "encoder.net.14.weight"  # (bottleneck, 512, 4, 4)
SAMPLE_IMAGES = 8


@dataclass
class InpaintLossConfig:
    kind: LossKind = "joint"  # Table 1's context encoder row
    overlap: int = OVERLAP_PAPER  # px of context also predicted (released code: 4)
    overlap_weight: float = OVERLAP_WEIGHT
    rec_weight: float = REC_WEIGHT  # joint: 0.999 L2 + 0.001 adversarial
    adv_weight: float = ADV_WEIGHT


@dataclass
class InpaintTrainConfig:
    # Not stated for the inpainting model; the paper's "about 100K iterations" of Section 5.2.
    iterations: int = 100_000
    batch_size: int = 64
    lr_g: float = 2e-3  # 10x the discriminator's (Section 5.1)
    lr_d: float = 2e-4
    beta1: float = 0.5
    load_size: int = LOAD_SIZE  # shorter side before the random 128 crop (0: no resize)
    workers: int = 2
    log_every: int = 20
    sample_every: int = 1000
    checkpoint_every: int = 1000
    # Speed options (see module docstring and benchmarks/inpainting_throughput.py).
    # NHWC activations (oneDNN / cuDNN): same operations, ~10% faster on this CPU; its CPU
    # BatchNorm backward sums in another order (gradients ~3e-3 relative from float64,
    # NCHW ~2e-4). False gives the reference's gradients to float32 rounding.
    channels_last: bool = True
    fused_discriminator: bool = False  # one D batch for real+fake: changes BatchNorm stats


@dataclass
class InpaintingConfig:
    name: str | None = None
    seed: int = 0
    data: str | None = None  # image folder; None = the embedded synthetic unlabelled pool
    device: str = "auto"
    method: Literal["inpainting"] = "inpainting"
    mask: HoleName = "central"  # random-region / noise-region: random holes in the patch
    shapes: str | None = None  # VOC2012 folder for random-region (None: synthetic VOC2012)
    bottleneck: int = BOTTLENECK  # the paper's 4000-d code; smaller only for quick tests
    loss: InpaintLossConfig = field(default_factory=InpaintLossConfig)
    train: InpaintTrainConfig = field(default_factory=InpaintTrainConfig)


def default_name(cfg: InpaintingConfig) -> str:
    """e.g. `inpainting-joint-central-s0`."""
    return f"inpainting-{cfg.loss.kind}-{cfg.mask}-s{cfg.seed}"


# ---------------------------------------------------------------- holes


def make_hole_fn(
    cfg: InpaintingConfig, run: Run | None = None
) -> Callable[[np.random.Generator], torch.Tensor] | None:
    """None for the fixed central hole; else rng -> (1, 128, 128) hole inside the patch.

    Random holes are drawn in the (64 - 2 overlap)^2 square the central hole would fill,
    covering up to 1/4 of the 128x128 image like Section 3.3's masks (so up to all of that
    square); noise-region uses the released code's thresholded-noise windows (20-30%).
    """
    if cfg.mask == "central":
        return None
    w = PATCH_SIZE - 2 * cfg.loss.overlap
    if cfg.mask == "random-region":
        shapes = load_voc_shapes(Path(resolve_data(cfg.shapes, "voc2012")), seed=cfg.seed)
        if run is not None:
            run.logger.info(f"random-region holes from {len(shapes)} segmentation shapes")
        coverage = min(1.0, 0.25 * 128 * 128 / (w * w))
        region = functools.partial(random_region_mask, (w, w), shapes=shapes, max_coverage=coverage)
    else:
        region = make_mask_fn("noise-region", (w, w), seed=cfg.seed)
    return functools.partial(_hole, region, cfg.loss.overlap)


def _hole(region: Callable[..., np.ndarray], overlap: int, rng: np.random.Generator):
    return place_hole(torch.from_numpy(np.ascontiguousarray(region(rng))), overlap)


# ---------------------------------------------------------------- one iteration


@dataclass
class Nets:
    """The generator / discriminator pair and their optimisers (D is None for loss l2)."""

    generator: nn.Module
    opt_g: torch.optim.Optimizer
    discriminator: nn.Module | None = None
    opt_d: torch.optim.Optimizer | None = None


def build_nets(cfg: InpaintingConfig, env: DistEnv) -> Nets:
    """Models on the device (channels_last if asked), Adam with beta1 0.5 for both."""
    tc = cfg.train
    # Fused Adam: the same update in one pass over the 71M generator parameters (measured
    # ~9x faster than the per-op loop on CPU). On CPU the weights stay NCHW even with
    # channels_last inputs (prepare_model): fused Adam is ~5x slower on NHWC weights.
    betas = (tc.beta1, 0.999)
    g = prepare_model(ContextEncoderGenerator(cfg.bottleneck), env, tc.channels_last)
    opt_g = adam(g.parameters(), tc.lr_g, betas, env.device)
    if cfg.loss.kind == "l2":
        return Nets(g, opt_g)
    d = prepare_model(PatchDiscriminator(), env, tc.channels_last)
    opt_d = adam(d.parameters(), tc.lr_d, betas, env.device)
    return Nets(g, opt_g, d, opt_d)


def make_step(
    nets: Nets,
    device: torch.device,
    loss: InpaintLossConfig,
    *,
    overlap: int,
    channels_last: bool = True,
    fused_discriminator: bool = False,
) -> Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]:
    """One iteration on a batch {"image": (B, 3, 128, 128) in [-1, 1], optional "hole"}.

    Returns scalars: "loss" (the masked L2 of the prediction, also for adversarial-only
    training, so every run logs the same quantity), "d_loss", "adv_loss", "loss_g".
    """
    g, d = nets.generator, nets.discriminator
    fixed_hole = central_hole(overlap).to(device)
    adversarial = loss.kind in ("adversarial", "joint")
    if adversarial and d is None:
        raise ValueError(f"loss {loss.kind} needs a discriminator")
    # Under DDP a parameter must not change requires_grad between iterations, so there the
    # discriminator's weight gradients of the generator step are computed and discarded.
    skip_d_grads = d is not None and not isinstance(d, nn.parallel.DistributedDataParallel)
    d_params = list(d.parameters()) if skip_d_grads else []
    # The central hole's per-pixel loss weights never change: computed once, not dilated
    # again every step; the weighted mean is masked_l2's (tests check they agree).
    fixed_weights = loss_weights(centre_patch(fixed_hole), overlap, loss.overlap_weight)
    fixed_count = int((fixed_weights > 0).sum()) * 3

    def reconstruction(fake: torch.Tensor, real: torch.Tensor, hole: torch.Tensor):
        if hole is fixed_hole:
            d2 = (fake - real).square()
            return (d2 * fixed_weights).sum() / (fixed_count * len(fake))
        hole_patch = centre_patch(hole.float())
        return masked_l2(fake, real, hole_patch, overlap, loss.overlap_weight)

    def step(batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        image = to_device(batch["image"], device)
        hole = batch["hole"].to(device).bool() if "hole" in batch else fixed_hole
        context = mask_context(image, hole)
        real = centre_patch(image)
        if channels_last:
            context = context.contiguous(memory_format=torch.channels_last)
            real = real.contiguous(memory_format=torch.channels_last)
        fake = g(context)
        out: dict[str, torch.Tensor] = {}
        if adversarial:
            # Discriminator step on real patches and detached predictions.
            nets.opt_d.zero_grad(set_to_none=True)
            if fused_discriminator:
                logits = d(torch.cat([real, fake.detach()]))
                real_logits, fake_logits = logits[: len(real)], logits[len(real) :]
            else:
                real_logits, fake_logits = d(real), d(fake.detach())
            d_loss = discriminator_loss(real_logits, fake_logits)
            d_loss.backward()
            nets.opt_d.step()
            out["d_loss"] = d_loss.detach()
            # Generator step through the updated D. D's own weight gradients would be
            # thrown away (zeroed before its next step), so they are not computed.
            for p in d_params:
                p.requires_grad_(False)
            adv = generator_adversarial_loss(d(fake))
            for p in d_params:
                p.requires_grad_(True)
            out["adv_loss"] = adv.detach()
        if loss.kind == "adversarial":
            with torch.no_grad():
                rec = reconstruction(fake, real, hole)
            total = adv
        else:
            rec = reconstruction(fake, real, hole)
            total = rec if loss.kind == "l2" else loss.rec_weight * rec + loss.adv_weight * adv
        nets.opt_g.zero_grad(set_to_none=True)
        total.backward()
        nets.opt_g.step()
        out["loss"] = rec.detach()
        out["loss_g"] = total.detach()
        return out

    return step


# ---------------------------------------------------------------- weights files


def write_generator(path: Path, generator: nn.Module, card: dict[str, Any]) -> Path:
    """Generator state dict (BatchNorm buffers included) + card, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    data = save(tensors, metadata={"card": json.dumps(card, sort_keys=True, default=str)})
    atomic_write_bytes(Path(path), data)
    atomic_write_json(Path(path).with_name("generator.card.json"), card)
    return Path(path)


def generator_file(weights: str | Path) -> Path:
    """A run folder or a `generator.safetensors` file -> the file (checked)."""
    path = Path(weights)
    if path.is_dir():
        path = path / GENERATOR_FILE
    if not path.is_file():
        raise BenchError(
            f"{path}: inpainting generator weights not found (give an inpainting run folder "
            f"or its {GENERATOR_FILE})"
        )
    return path


def load_generator(weights: str | Path) -> tuple[ContextEncoderGenerator, dict[str, Any]]:
    """(generator in eval mode on CPU, card) from a run folder or generator file."""
    path = generator_file(weights)
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            card = json.loads((f.metadata() or {}).get("card", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path}: unreadable generator weights ({exc})") from None
    code = state.get(BOTTLENECK_KEY)
    if code is None:
        raise BenchError(f"{path}: not an inpainting generator (no {BOTTLENECK_KEY})")
    net = ContextEncoderGenerator(code.shape[0])
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys or result.unexpected_keys)[0]
        raise BenchError(f"{path}: not an inpainting generator (key {bad!r} does not match)")
    return net.eval(), card


# ---------------------------------------------------------------- the stage


def main(cfg: InpaintingConfig, run: Run) -> dict[str, Any]:
    """Train the inpainting context encoder into `run`; writes generator weights, then
    metrics.json (stage pretrain, method inpainting)."""
    _check(cfg)
    env = setup(cfg.device)
    seed_everything(cfg.seed, env.rank)
    tc, lc = cfg.train, cfg.loss
    root = Path(resolve_data(cfg.data, "images"))
    paths = list_images(root)
    hole_fn = make_hole_fn(cfg, run)
    dataset = InpaintingImages(paths, tc.load_size, hole_fn)
    run.logger.info(
        f"{len(paths)} images from {root}; loss {lc.kind}; mask {cfg.mask}; overlap {lc.overlap}px"
    )
    nets = build_nets(cfg, env)
    state: dict[str, Any] = {"generator": nets.generator, "opt_g": nets.opt_g}
    if nets.discriminator is not None:
        state.update(discriminator=nets.discriminator, opt_d=nets.opt_d)
    step = make_step(
        nets,
        env.device,
        lc,
        overlap=lc.overlap,
        channels_last=tc.channels_last,
        fused_discriminator=tc.fused_discriminator,
    )
    generator = unwrap(nets.generator)

    samples = [dataset[(i % len(dataset), cfg.seed * 7919 + i)] for i in range(SAMPLE_IMAGES)]
    sample_batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

    def on_sample(iteration: int) -> None:
        if not run.is_main:
            return
        image = sample_batch["image"].to(env.device)
        hole = sample_batch.get("hole")
        hole = hole.bool().to(env.device) if hole is not None else central_hole(lc.overlap)
        context = mask_context(image, hole.to(env.device))
        generator.eval()
        with torch.no_grad():
            pred = generator(context)
        generator.train()
        pasted = paste(context, pred, hole.to(env.device))
        rows = [to_pixels(context), to_pixels(pasted), to_pixels(image)]
        save_grid(run.file(f"samples/iter_{iteration:07d}.png"), rows)

    result = fit_schedule(
        step, dataset, cfg, env, run, state, on_sample=on_sample, desc=f"inpainting {lc.kind}"
    )
    card = {
        "method": "inpainting",
        "loss": lc.kind,
        "mask": cfg.mask,
        "overlap": lc.overlap,
        "bottleneck": cfg.bottleneck,
        "iterations": result.iterations,
        "data": cfg.data,
        "load_size": tc.load_size,
        "config_hash": config_hash(cfg),
        "pretrain_seconds": result.seconds,
    }
    if run.is_main:
        write_generator(run.file(GENERATOR_FILE), generator, card)
    first, last = result.first.get("loss"), result.last.get("loss")
    run.logger.info(f"masked L2 {first:.4f} -> {last:.4f} in {result.seconds:.0f}s")
    command = run.file("command.txt")
    metrics = {
        "stage": "pretrain",
        "seed": cfg.seed,
        "command": command.read_text().strip() if command.is_file() else None,
        "method": "inpainting",
        "loss": lc.kind,
        "mask": cfg.mask,
        "iterations": result.iterations,
        "train_seconds": result.seconds,
        "initial_loss": first,
        "final_loss": last,
        "export": GENERATOR_FILE,
    }
    run.write_metrics(metrics)
    return metrics


def paste(context: torch.Tensor, pred: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The prediction (B, 3, 64, 64) written into the dropped pixels of the context
    (B, 3, 128, 128); the overlap band keeps the real context, as in the paper's figures."""
    full = context.clone()
    centre_patch(full).copy_(pred)
    return torch.where(hole, full, context)


def _check(cfg: InpaintingConfig) -> None:
    lc, tc = cfg.loss, cfg.train
    if not 0 <= lc.overlap < PATCH_SIZE // 2:
        raise ConfigError(f"loss.overlap: must be in [0, {PATCH_SIZE // 2 - 1}], got {lc.overlap}")
    if lc.overlap_weight < 0 or lc.rec_weight < 0 or lc.adv_weight < 0:
        raise ConfigError("loss: overlap_weight, rec_weight and adv_weight must be >= 0")
    if tc.iterations < 1 or tc.batch_size < 2:
        raise ConfigError("train: iterations must be >= 1 and batch_size >= 2 (BatchNorm)")
    if cfg.bottleneck < 1:
        raise ConfigError(f"bottleneck: must be >= 1, got {cfg.bottleneck}")
    if tc.lr_g <= 0 or tc.lr_d <= 0:
        raise ConfigError("train: lr_g and lr_d must be > 0")
