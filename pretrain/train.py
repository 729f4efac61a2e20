"""`bench pretrain`: make encoder weights by one of the Table 2 methods.

- context-encoder: inpaint dropped regions (Section 3), reconstruction loss on the region;
- autoencoder: the same network reconstructing its whole, unmasked input;
- random: the Gaussian initialisation (no training, seconds);
- imagenet: import a user-supplied torchvision AlexNet state-dict file (never downloaded).

Every run ends by writing `encoder.safetensors` (+ card) and then `metrics.json`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmark.config import config_hash
from benchmark.datasets.folder import list_images
from benchmark.datasets.resolve import resolve_data
from benchmark.distributed import DistEnv, setup
from benchmark.errors import BenchError, ConfigError
from benchmark.runs import Run
from pretrain.alexnet import AlexNetEncoder, gaussian_init_
from pretrain.config import PAPER_LR, PretrainConfig
from pretrain.context_encoder import ContextEncoder, DCGANDiscriminator
from pretrain.data import (
    PretrainImages,
    dataset_mean,
    denormalise,
    fill_value,
)
from pretrain.engine import (
    Precision,
    adam,
    fit_schedule,
    prepare_model,
    seed_everything,
    to_device,
    unwrap,
)
from pretrain.export import NATIVE_FILE, check_keys, write_native
from pretrain.losses import (
    RECONSTRUCTION_LOSSES,
    discriminator_loss,
    discriminator_lr,
    generator_adversarial_loss,
    joint_loss,
)
from pretrain.masks import apply_mask, load_voc_shapes, make_mask_fn
from pretrain.samples import save_grid

SAMPLE_IMAGES = 8


def default_name(cfg: PretrainConfig) -> str:
    """e.g. `pretrain-context-encoder-random-region-s0`, `pretrain-random-s0`."""
    parts = ["pretrain", cfg.method]
    if cfg.method == "context-encoder":
        parts.append(cfg.mask)
    return "-".join(parts) + f"-s{cfg.seed}"


def learning_rate(cfg: PretrainConfig) -> float:
    """train.lr, else the paper's rate for the mask (autoencoder: the central-mask rate)."""
    if cfg.train.lr is not None:
        return cfg.train.lr
    return PAPER_LR["central" if cfg.method == "autoencoder" else cfg.mask]


def _resolve(data: str | None, kind: str) -> Path:
    """The user's folder, or the embedded synthetic dataset's when `data` is None."""
    return Path(resolve_data(data, kind))


def _mask_fn(cfg: PretrainConfig, run: Run) -> tuple[Callable | None, str | None]:
    """(mask function, effective mask name); autoencoders get no mask."""
    if cfg.method == "autoencoder":
        return None, None
    size = (cfg.model.input_size, cfg.model.input_size)
    name = cfg.mask
    shapes = None
    if name == "random-region":
        if cfg.shapes is not None or cfg.data is None:
            root = Path(cfg.shapes) if cfg.shapes is not None else _resolve(None, "voc2012")
            shapes = load_voc_shapes(root, seed=cfg.seed)
            run.logger.info(f"random-region masks from {len(shapes)} segmentation shapes")
        else:
            name = "noise-region"
            run.logger.info("no shapes given (set shapes: VOC2012 path): noise-region masks")
    return make_mask_fn(name, size, shapes=shapes, seed=cfg.seed), name


def _card(
    cfg: PretrainConfig,
    mask: str | None,
    iterations: int,
    data: str | None,
    seconds: float | None,
    arch: str,
) -> dict[str, Any]:
    return {
        "method": cfg.method,
        "mask": mask,
        "iterations": iterations,
        "data": data,
        "config_hash": config_hash(cfg),
        "arch": arch,
        "pool_free": cfg.model.pool_free,
        "pretrain_seconds": seconds,
    }


def _finish(
    cfg: PretrainConfig,
    run: Run,
    encoder: AlexNetEncoder,
    card: dict[str, Any],
    losses: tuple[float | None, float | None],
) -> dict[str, Any]:
    if run.is_main:
        write_native(run.file(NATIVE_FILE), encoder.state_dict(), card)
    command = run.file("command.txt")
    metrics = {
        "stage": "pretrain",
        "seed": cfg.seed,
        "command": command.read_text().strip() if command.is_file() else None,
        "method": cfg.method,
        "mask": card["mask"],
        "iterations": card["iterations"],
        "train_seconds": card["pretrain_seconds"],
        "initial_loss": losses[0],
        "final_loss": losses[1],
        "export": NATIVE_FILE,
    }
    run.write_metrics(metrics)
    return metrics


def random_init(cfg: PretrainConfig, run: Run, env: DistEnv) -> dict[str, Any]:
    """The 'Random Gaussian' row: N(0, 0.01) weights, zero biases."""
    tic = time.perf_counter()
    encoder = AlexNetEncoder(cfg.model.arch, cfg.model.pool_free)
    gaussian_init_(encoder)
    card = _card(cfg, None, 0, None, time.perf_counter() - tic, cfg.model.arch)
    return _finish(cfg, run, encoder, card, (None, None))


def load_torchvision_alexnet(path: Path) -> dict[str, torch.Tensor]:
    """The `features.*` tensors of a torchvision AlexNet state-dict file; classifier keys
    are expected and dropped, anything else is reported."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(
            f"{path}: ImageNet weights file not found (weights: a torchvision "
            "AlexNet state dict, e.g. alexnet-owt-7be5be79.pth)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise BenchError(f"{path}: not a readable torch state dict ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BenchError(f"{path}: expected a state dict (name -> tensor)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("classifier.")}


def imagenet_import(cfg: PretrainConfig, run: Run, env: DistEnv) -> dict[str, Any]:
    """The 'ImageNet' row: import a supervised torchvision AlexNet (arch torchvision)."""
    if cfg.weights is None:
        raise ConfigError("weights: method imagenet needs a torchvision AlexNet state-dict file")
    if cfg.model.arch != "torchvision" or cfg.model.pool_free:
        raise ConfigError(
            "model.arch: method imagenet needs arch 'torchvision' and pool_free false "
            "(torchvision's AlexNet widths)"
        )
    tic = time.perf_counter()
    state = load_torchvision_alexnet(Path(cfg.weights))
    encoder = AlexNetEncoder("torchvision", False)
    check_keys(encoder, state, cfg.weights)
    encoder.load_state_dict(state, strict=True)
    card = _card(cfg, None, 0, str(cfg.weights), None, "torchvision")
    run.logger.info(
        f"imported ImageNet AlexNet from {cfg.weights} ({time.perf_counter() - tic:.1f}s)"
    )
    return _finish(cfg, run, encoder, card, (None, None))


def make_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    prec: Precision,
    device: torch.device,
    *,
    fill: torch.Tensor | None,
    loss: str = "l2",
    overlap: int = 0,
    overlap_weight: float = 10.0,
    channels_last: bool = False,
    discriminator: torch.nn.Module | None = None,
    optimizer_d: torch.optim.Optimizer | None = None,
    adversarial_weight: float = 0.0,
) -> Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]:
    """One optimisation step on a batch {"image", "mask"} for `engine.fit`.

    fill: the dataset mean (normalised, (3,)) put into dropped pixels; None feeds the image
    unmasked (the autoencoder, whose mask covers everything). With a discriminator, it
    first takes a discriminator step on real vs predicted images, then a generator step on
    the joint loss. Returns the reconstruction loss as "loss" (plus "d_loss", "adv_loss").
    """
    rec_loss = RECONSTRUCTION_LOSSES[loss]
    adversarial = discriminator is not None and optimizer_d is not None

    def step(batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        b = to_device(batch, device, channels_last)
        image, mask = b["image"], b["mask"]
        inp = apply_mask(image, mask, fill) if fill is not None else image
        scalars: dict[str, torch.Tensor] = {}
        with prec.autocast():
            pred = model(inp)
        if adversarial:
            optimizer_d.zero_grad(set_to_none=True)
            with prec.autocast():
                d_loss = discriminator_loss(discriminator(image), discriminator(pred.detach()))
            prec.backward(d_loss)
            prec.step(optimizer_d)
            scalars["d_loss"] = d_loss.detach()
        optimizer.zero_grad(set_to_none=True)
        rec = rec_loss(pred, image, mask, overlap, overlap_weight)
        adv = None
        if adversarial:
            with prec.autocast():
                adv = generator_adversarial_loss(discriminator(pred))
            scalars["adv_loss"] = adv.detach()
        total = joint_loss(rec, adv, adv_weight=adversarial_weight)
        prec.backward(total)
        prec.step(optimizer)
        prec.update()
        scalars["loss"] = rec.detach()
        return scalars

    return step


def train_inpainting(cfg: PretrainConfig, run: Run, env: DistEnv) -> dict[str, Any]:
    """context-encoder and autoencoder: train the network, export its encoder."""
    if cfg.method == "context-encoder" and cfg.loss.adversarial_weight < 0:
        raise ConfigError("loss.adversarial_weight: must be >= 0")
    images_root = _resolve(cfg.data, "images")
    paths = list_images(images_root)
    mean = dataset_mean(paths, seed=cfg.seed)
    fill = fill_value(mean).to(env.device)
    mask_fn, mask_name = _mask_fn(cfg, run)
    dataset = PretrainImages(paths, cfg.model.input_size, mask_fn)
    run.logger.info(
        f"{len(paths)} images from {images_root}; mean colour {[round(m, 3) for m in mean]}; "
        f"mask {mask_name}"
    )

    tc, lc = cfg.train, cfg.loss
    net = ContextEncoder(cfg.model.arch, cfg.model.pool_free, cfg.model.input_size)
    model = prepare_model(net, env, tc.channels_last)
    lr = learning_rate(cfg)
    opt = adam(model.parameters(), lr, (tc.beta1, 0.999), env.device)
    prec = Precision(env.device, tc.amp)
    state: dict[str, Any] = {"model": model, "optimizer": opt, "precision": prec}
    adversarial = cfg.method == "context-encoder" and lc.adversarial_weight > 0
    if adversarial:
        disc = prepare_model(DCGANDiscriminator(cfg.model.input_size), env, tc.channels_last)
        opt_d = adam(disc.parameters(), discriminator_lr(lr), (tc.beta1, 0.999), env.device)
        state.update(discriminator=disc, optimizer_d=opt_d)
    masked = cfg.method == "context-encoder"
    cl = tc.channels_last
    step = make_step(
        model,
        opt,
        prec,
        env.device,
        fill=fill if masked else None,
        loss=lc.kind,
        overlap=lc.overlap,
        overlap_weight=lc.overlap_weight,
        channels_last=cl,
        discriminator=state.get("discriminator"),
        optimizer_d=state.get("optimizer_d"),
        adversarial_weight=lc.adversarial_weight,
    )

    samples = [dataset[(i % len(dataset), cfg.seed * 7919 + i)] for i in range(SAMPLE_IMAGES)]
    sample_batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

    def on_sample(iteration: int) -> None:
        if not run.is_main:
            return
        b = to_device(sample_batch, env.device, cl)
        image, mask = b["image"], b["mask"]
        inp = apply_mask(image, mask, fill) if masked else image
        net.eval()
        with torch.no_grad(), prec.autocast():
            pred = net(inp).float()
        net.train()
        rows = [denormalise(image), denormalise(inp), denormalise(pred)]
        if masked:
            rows.append(denormalise(torch.where(mask.bool(), pred, image)))
        save_grid(run.file(f"samples/iter_{iteration:07d}.png"), rows)

    result = fit_schedule(
        step, dataset, cfg, env, run, state, on_sample=on_sample, desc=f"pretrain {cfg.method}"
    )
    encoder = unwrap(model).encoder
    card = _card(
        cfg, mask_name, result.iterations, str(images_root), result.seconds, cfg.model.arch
    )
    card["input_size"] = cfg.model.input_size
    card["dataset_mean"] = mean
    run.logger.info(
        f"loss {result.first.get('loss', float('nan')):.4f} -> "
        f"{result.last.get('loss', float('nan')):.4f} in {result.seconds:.0f}s"
    )
    return _finish(
        cfg, run, encoder.cpu(), card, (result.first.get("loss"), result.last.get("loss"))
    )


METHODS: dict[str, Callable[[PretrainConfig, Run, DistEnv], dict[str, Any]]] = {
    "context-encoder": train_inpainting,
    "autoencoder": train_inpainting,
    "random": random_init,
    "imagenet": imagenet_import,
}


def main(cfg: PretrainConfig, run: Run) -> dict[str, Any]:
    """Run one pretraining method into `run`; returns (and writes) metrics.json."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method: {cfg.method!r} is not one of {', '.join(METHODS)}")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    env = setup(cfg.device)
    seed_everything(cfg.seed, env.rank)
    return METHODS[cfg.method](cfg, run, env)
