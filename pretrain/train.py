"""`bench pretrain`: make encoder weights by one of the Table 2 methods.

- context-encoder: inpaint dropped regions (Section 3), reconstruction loss on the region;
- autoencoder: the same network reconstructing its whole, unmasked input;
- random: the Gaussian initialisation (no training, seconds);
- imagenet: import a user-supplied torchvision AlexNet state-dict file (never downloaded).

Every run ends by writing `encoder.safetensors` (+ card) and then `metrics.json`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmark import loop
from benchmark.datasets.resolve import resolve_data
from benchmark.distributed import DistEnv
from benchmark.errors import BenchError, ConfigError, printable
from benchmark.protocol import is_synthetic
from benchmark.runs import Run
from encoders.alexnet import ARCHS, AlexNetEncoder, gaussian_init_, pool5_size
from pretrain.adversarial import Adversary, DCGANDiscriminator, discriminator_lr
from pretrain.card import card_head, metrics_head
from pretrain.config import PAPER_LR, PretrainConfig
from pretrain.context_encoder import ContextEncoder
from pretrain.data import PretrainImages, dataset_mean
from pretrain.losses import RECONSTRUCTION_LOSSES, joint_loss
from pretrain.masks import PER_BATCH, apply_mask, make_mask_fn
from pretrain.preflight import PretrainData, pretrain_data
from pretrain.samples import sample_batch, save_grid
from weights.encoder import load_state_checked, read_torchvision
from weights.native import NATIVE_FILE, write_native

SAMPLE_IMAGES = 8
STAGE = "pretrain"


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


def check(cfg: PretrainConfig) -> None:
    """Every setting no run can use is a one-line error before anything runs."""
    loop.check_loop(cfg.train)
    tc = cfg.train
    if tc.batch_size < 1:
        raise ConfigError(f"train.batch_size: must be >= 1, got {tc.batch_size}")
    if tc.lr is not None:
        loop.positive("train.lr", tc.lr)
    if not 0 <= tc.beta1 < 1:
        raise ConfigError(f"train.beta1: must be in [0, 1), got {tc.beta1}")
    if tc.sample_every < 0:
        raise ConfigError(f"train.sample_every: must be >= 0, got {tc.sample_every}")
    if cfg.model.arch not in ARCHS:
        raise ConfigError(f"model.arch: {cfg.model.arch!r} is not one of {', '.join(ARCHS)}")
    if cfg.method in ("context-encoder", "autoencoder"):
        try:
            pool5_size(cfg.model.input_size, cfg.model.arch, cfg.model.pool_free)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(f"model.input_size: {exc}") from None
    if cfg.loss.adversarial_weight < 0 or cfg.loss.overlap < 0 or cfg.loss.overlap_weight < 0:
        raise ConfigError("loss: adversarial_weight, overlap and overlap_weight must be >= 0")
    if cfg.method == "imagenet" and cfg.weights is None:
        raise ConfigError("weights: method imagenet needs a torchvision AlexNet state-dict file")
    if (cfg.method == "context-encoder" and cfg.mask == "random-region" and cfg.shapes is None
            and cfg.data is not None):  # fmt: skip
        raise ConfigError(
            "mask: random-region masks are PASCAL VOC 2012 segmentation shapes (Section 3.3); "
            "give them with --set shapes=<VOC2012 folder> (SegmentationObject or "
            "SegmentationClass PNGs), or choose --mask noise-region (the released code's "
            "thresholded-noise masks)"
        )


def _resolve(data: str | None, kind: str) -> Path:
    """The user's folder, or the embedded synthetic dataset's when `data` is None."""
    return Path(resolve_data(data, kind))  # type: ignore[arg-type]


def shapes_source(cfg: PretrainConfig) -> Path | None:
    """The folder of the segmentation shapes a context encoder's random-region masks take
    (the synthetic VOC2012 with the synthetic images); None for other masks and methods.
    Random regions never silently fall back to the released code's noise masks: `check`
    refuses them on a user's image folder without `shapes`."""
    if cfg.method != "context-encoder" or cfg.mask != "random-region":
        return None
    return Path(cfg.shapes) if cfg.shapes is not None else _resolve(None, "voc2012")


def preflight(cfg: PretrainConfig) -> PretrainData | None:
    """What the run reads, checked before its run folder exists (`bench.stages`): the
    image folder, every image decoded, and the random-region shapes; for method imagenet,
    that the weights file is there. None for methods that read nothing."""
    if cfg.method == "imagenet":
        _imagenet_file(cfg)
        return None
    if cfg.method == "random":
        return None
    return pretrain_data(cfg.data, cfg.on_bad_data, shapes_source(cfg), cfg.seed)


def _imagenet_file(cfg: PretrainConfig) -> Path:
    path = Path(str(cfg.weights))
    if not path.is_file():
        raise BenchError(
            f"{printable(path)}: ImageNet weights file not found (weights: a torchvision "
            "AlexNet state dict, e.g. alexnet-owt-7be5be79.pth)"
        )
    return path


def _mask_fn(
    cfg: PretrainConfig, run: Run, data: PretrainData
) -> tuple[Callable | None, str | None, str | None]:
    """(mask function, mask name, shape source); autoencoders get no mask."""
    if cfg.method == "autoencoder":
        return None, None, None
    size = (cfg.model.input_size, cfg.model.input_size)
    root = data.shapes_root
    if data.shapes is not None:
        run.logger.info(f"random-region masks from {len(data.shapes)} segmentation shapes "
                        f"in {root}")  # fmt: skip
    fn = make_mask_fn(cfg.mask, size, shapes=data.shapes, seed=cfg.seed)
    return fn, cfg.mask, str(root) if root is not None else None


def _card(
    cfg: PretrainConfig, result: loop.FitResult | None = None, device: Any = None,
    **fields: Any,
) -> dict[str, Any]:  # fmt: skip
    """The model card of an encoder made by this stage (docs/design.md)."""
    synthetic = cfg.method in ("context-encoder", "autoencoder") and is_synthetic(cfg.data)
    card = {
        **card_head(cfg, result, device, synthetic=synthetic),
        "mask": None,
        "shapes": None,
        "data": None,
        "arch": cfg.model.arch,
        "pool_free": cfg.model.pool_free,
    }
    card.update(fields)
    # what conv1 takes (the arch's convention; benchmark.input_convention)
    card["input_convention"] = ARCHS[card["arch"]].convention.as_dict()
    return card


def _finish(
    cfg: PretrainConfig,
    run: Run,
    encoder: torch.nn.Module,
    card: dict[str, Any],
    result: loop.FitResult | None = None,
    skipped: Sequence[str] = (),
) -> dict[str, Any]:
    if run.is_main:
        write_native(run.file(NATIVE_FILE), encoder.state_dict(), card)
    metrics = {
        **metrics_head(cfg, run, card, NATIVE_FILE, skipped),
        "mask": card["mask"],
        "shapes": card.get("shapes"),
        "arch": card["arch"],
        "input_convention": card["input_convention"]["name"],
        **loop.fit_fields(result),
        "train_seconds": card["pretrain_seconds"],
    }
    run.write_metrics(metrics)
    return metrics


def random_init(
    cfg: PretrainConfig, run: Run, env: DistEnv, data: PretrainData | None
) -> dict[str, Any]:
    """The 'Random Gaussian' row: N(0, 0.01) weights, zero biases."""
    tic = time.perf_counter()
    encoder = AlexNetEncoder(cfg.model.arch, cfg.model.pool_free)  # type: ignore[arg-type]
    gaussian_init_(encoder)
    seconds = time.perf_counter() - tic
    card = _card(cfg, device=env.device, pretrain_seconds=seconds)
    return _finish(cfg, run, encoder, card)


def imagenet_import(
    cfg: PretrainConfig, run: Run, env: DistEnv, data: PretrainData | None
) -> dict[str, Any]:
    """The 'ImageNet' row: import a supervised torchvision AlexNet (arch torchvision)."""
    if cfg.model.arch != "torchvision" or cfg.model.pool_free:
        raise ConfigError(
            "model.arch: method imagenet needs arch 'torchvision' and pool_free false "
            "(torchvision's AlexNet widths)"
        )
    tic = time.perf_counter()
    path = _imagenet_file(cfg)
    state, _ = read_torchvision(path)
    encoder = AlexNetEncoder("torchvision", False)
    load_state_checked(encoder, state, path)
    card = _card(cfg, device=env.device, data=str(cfg.weights), arch="torchvision")
    run.logger.info(
        f"imported ImageNet AlexNet from {cfg.weights} ({time.perf_counter() - tic:.1f}s)"
    )
    return _finish(cfg, run, encoder, card)


def make_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: loop.Precision,
    device: torch.device,
    *,
    fill: torch.Tensor | None,
    loss: str = "l2",
    overlap: int = 0,
    overlap_weight: float = 10.0,
    adversary: Adversary | None = None,
    adversarial_weight: float = 0.0,
    channels_last: bool = False,
    scale: torch.Tensor | None = None,
) -> Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]:
    """One optimisation step on a batch {"image", "mask"} for `benchmark.loop.fit`.

    The network reads and predicts pixels in the encoder's input convention. fill: the
    dataset mean in those units ((3,)) put into dropped pixels; None feeds the image
    unmasked (the autoencoder, whose mask covers everything). scale: the convention's
    `unit_scale()`, so the reconstruction loss is measured on [-1, 1] pixels. With an
    adversary, first a discriminator step on real vs predicted images, then a generator
    step on the joint loss. Returns the reconstruction loss as "loss" (plus "d_loss",
    "adv_loss"). channels_last: the batch in NHWC memory (`loop.nhwc`).
    """
    rec_loss = RECONSTRUCTION_LOSSES[loss]

    def step(batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        b = loop.to_device(batch, device, channels_last)
        image, mask = b["image"], b["mask"]
        inp = apply_mask(image, mask, fill) if fill is not None else image
        scalars: dict[str, torch.Tensor] = {}
        with precision.autocast():
            pred = model(inp)
        adv = None
        if adversary is not None:
            scalars["d_loss"] = adversary.update(image, pred)
            adv = adversary.generator_loss(pred)
            scalars["adv_loss"] = adv.detach()
        rec = rec_loss(pred, image, mask, overlap, overlap_weight, scale)
        total = joint_loss(rec, adv, adv_weight=adversarial_weight)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(total)
        precision.step(optimizer)
        scalars["loss"] = rec.detach()
        return scalars

    return step


def train_inpainting(
    cfg: PretrainConfig, run: Run, env: DistEnv, data: PretrainData | None
) -> dict[str, Any]:
    """context-encoder and autoencoder: train the network, export its encoder."""
    assert data is not None  # preflight reads the images of these two methods
    images_root = data.images.root
    paths, skipped = data.images.usable(cfg.on_bad_data, run.logger)
    mean = dataset_mean(paths, seed=cfg.seed)
    convention = ARCHS[cfg.model.arch].convention
    fill = convention.colour(mean).to(env.device)
    mask_fn, mask_name, shapes = _mask_fn(cfg, run, data)
    per_batch = cfg.train.batch_size if mask_name in PER_BATCH else 0  # one noise mask a batch
    dataset = PretrainImages(paths, cfg.model.input_size, convention, mask_fn, seed=cfg.seed,
                             mask_batch=per_batch)  # fmt: skip
    run.logger.info(
        f"{len(paths)} images from {images_root}; mean colour {[round(m, 3) for m in mean]}; "
        f"mask {mask_name}; {convention.name} input convention"
    )

    tc, lc = cfg.train, cfg.loss
    net = ContextEncoder(cfg.model.arch, cfg.model.pool_free, cfg.model.input_size)  # type: ignore[arg-type]
    model = loop.prepare_model(net, env, tc)
    lr = learning_rate(cfg)
    opt = loop.adam(model.parameters(), lr, (tc.beta1, 0.999))
    precision = loop.Precision(tc.precision, env.device)
    state: dict[str, Any] = {"model": model, "optimizer": opt}
    adversary = None
    if cfg.method == "context-encoder" and lc.adversarial_weight > 0:
        disc = loop.prepare_model(DCGANDiscriminator(cfg.model.input_size), env, tc)
        opt_d = loop.adam(disc.parameters(), discriminator_lr(lr), (tc.beta1, 0.999))
        adversary = Adversary(disc, opt_d, precision)
        state.update(discriminator=disc, optimizer_d=opt_d)
    masked = cfg.method == "context-encoder"
    step = make_step(
        model, opt, precision, env.device,
        fill=fill if masked else None, loss=lc.kind, overlap=lc.overlap,
        overlap_weight=lc.overlap_weight, adversary=adversary,
        adversarial_weight=lc.adversarial_weight, channels_last=tc.channels_last,
        scale=convention.unit_scale().to(env.device),
    )  # fmt: skip

    figure_batch = sample_batch(dataset, SAMPLE_IMAGES)

    def on_sample(iteration: int) -> None:
        if not run.is_main:
            return
        b = loop.to_device(figure_batch, env.device)
        image, mask = b["image"], b["mask"]
        inp = apply_mask(image, mask, fill) if masked else image
        net.eval()
        with torch.no_grad(), precision.autocast():
            pred = net(inp).float()
        net.train()
        shown = convention.denormalise
        rows = [shown(image), shown(inp), shown(pred)]
        if masked:
            rows.append(shown(torch.where(mask.bool(), pred, image)))
        save_grid(run.file(f"samples/iter_{iteration:07d}.png"), rows)

    result = loop.fit(
        run, env, tc, stage=f"{STAGE}/{cfg.method}", config=cfg, seed=cfg.seed, step=step,
        batches=loop.loader_batches(dataset, tc.batch_size, cfg.seed, env, tc.workers),
        state=state, precision=precision, hooks=[loop.Hook(tc.sample_every, on_sample)],
        desc=f"pretrain {cfg.method}", input_convention=convention.name,
    )  # fmt: skip
    encoder = loop.unwrap(model).encoder
    card = _card(
        cfg, result, env.device, mask=mask_name, shapes=shapes, data=str(images_root),
        input_size=cfg.model.input_size, dataset_mean=mean,
    )  # fmt: skip
    first, last = result.first.get("loss"), result.last.get("loss")
    run.logger.info(f"loss {first} -> {last} in {result.seconds:.0f}s ({result.precision})")
    metrics = _finish(cfg, run, encoder.cpu(), card, result, skipped)
    return metrics


Method = Callable[[PretrainConfig, Run, DistEnv, PretrainData | None], dict[str, Any]]
StageMain = Callable[..., dict[str, Any]]


def _stage_main(method: Method, names: tuple[str, ...]) -> StageMain:
    """The stage table's `main` of the methods `names` (the stage table is the one place
    that dispatches on --method): check, read the data unless `preflight` already did
    (run_stage calls it before the run folder exists), set up the device, run `method`;
    returns (and writes) metrics.json."""

    def main(cfg: PretrainConfig, run: Run, data: PretrainData | None = None) -> dict[str, Any]:
        if cfg.method not in names:  # a caller that bypassed the stage table
            raise ConfigError(f"method: {cfg.method!r} is not one of {', '.join(names)}")
        check(cfg)
        if data is None:
            data = preflight(cfg)
        env = loop.setup(cfg.device, cfg.train)
        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        return method(cfg, run, env, data)

    return main


main_context_encoder = _stage_main(train_inpainting, ("context-encoder", "autoencoder"))
main_random = _stage_main(random_init, ("random",))
main_imagenet = _stage_main(imagenet_import, ("imagenet",))
