"""Images per second of every training step, in fp32 and bf16, beside the machine's matmul
rate of the same precision measured in the same run.

    python -m benchmarks.steps                                  # every step, fp32 and bf16
    python -m benchmarks.steps --steps inpainting --port        # + the public port's step
    python -m benchmarks.steps --port-model ../context_encoder_pytorch/model.py
    python -m benchmarks.steps --pipeline                       # + the data pipelines
    python -m benchmarks.steps --layouts nhwc,nchw              # channels_last against not
    python -m benchmarks.steps --system-malloc                  # glibc unmapping freed memory

Each step is built exactly as its stage builds it (the same model, `make_step`, optimiser
and `benchmark.loop.Precision`) at the protocol's sizes, on random inputs. A row: ms/step,
img/s, GFLOP per step as torch's counter sees it (convolutions and matrix products, a
multiply-add counted as 2), the achieved GFLOP/s and its share of a 2048^2 matmul of the same
precision timed after each of the row's own repeats (the rate drifts on shared machines), CPU
seconds per step (on a shared machine wall time also counts other people's
work). `--port` adds the public PyTorch port's inpainting step rebuilt on our modules with
its kernels and update (NCHW, plain convolutions for the bottleneck, per-op Adam, sigmoid +
BCELoss, D's weight gradients computed in the G step, the L2 weighted as its train.py does);
`--port-model` runs it from the port's own `model.py` (BoyuanJiang/context_encoder_pytorch:
not part of bench, give its path), twice: in this process, whose freed host memory is kept
for reuse as bench's stages keep it (`benchmark.host_memory`, unless `--system-malloc`), and
in a process of its own with glibc's default malloc, as the port's train.py runs.
`--pipeline` times each stage's data pipeline (the dataset and workers the stage uses) on the
synthetic dataset, to compare with its step.
Benchmarks print numbers; they never assert wall times.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from benchmark import host_memory, loop
from benchmark.distributed import DistEnv, pick_device
from benchmark.loop import Precision, cpu_has_fast_bf16, nhwc, resolve_precision
from benchmarks.common import MatmulRate, count_flops, markdown_table, sync

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- the steps


def _maybe_compile(net: nn.Module, compile: bool) -> nn.Module:
    return torch.compile(net) if compile else net  # type: ignore[return-value]


def context_encoder(
    env: DistEnv,
    prec: Precision,
    batch: int,
    compile: bool = False,
    channels_last: bool = True,
    masked: bool = True,
):
    """Section 3's feature learner at 227 px: Adam on the masked L2."""
    from encoders.alexnet import ARCHS
    from pretrain.context_encoder import ContextEncoder
    from pretrain.train import make_step

    convention = ARCHS["caffenet"].convention
    net = _maybe_compile(ContextEncoder("caffenet", False, 227).to(env.device), compile)
    opt = loop.adam(net.parameters(), 1e-4, (0.9, 0.999))
    fill = convention.colour([0.48, 0.46, 0.41]).to(env.device)
    step = make_step(
        net, opt, prec, env.device, fill=fill if masked else None, channels_last=channels_last,
        scale=convention.unit_scale().to(env.device),
    )  # fmt: skip
    mask = torch.zeros(batch, 1, 227, 227)
    mask[..., 57:170, 57:170] = 1
    pixels = torch.randint(0, 256, (batch, 3, 227, 227), dtype=torch.uint8)
    data = {"image": convention.normalise(pixels), "mask": mask}
    return lambda: step(data, 0), batch


def autoencoder(
    env: DistEnv, prec: Precision, batch: int, compile: bool = False, channels_last: bool = True
):
    return context_encoder(env, prec, batch, compile, channels_last, masked=False)


def inpainting(
    env: DistEnv, prec: Precision, batch: int, compile: bool = False, channels_last: bool = True
):
    """Section 5.1's joint-loss iteration: a D step, then G through the updated D."""
    from pretrain.inpainting.config import InpaintingConfig
    from pretrain.inpainting.train import build_nets, make_step

    cfg = InpaintingConfig()
    cfg.train.compile = compile  # the stage's own switch: loop.prepare_model compiles G and D
    cfg.train.channels_last = channels_last
    g, opt_g, adversary = build_nets(cfg, env, prec)
    step = make_step(
        g,
        opt_g,
        adversary,
        prec,
        env.device,
        cfg.loss,
        channels_last=cfg.train.channels_last,
        geometry=cfg.geometry(),
    )
    data = {"image": torch.rand(batch, 3, 128, 128) * 2 - 1}
    return lambda: step(data, 0), batch


def classification(
    env: DistEnv, prec: Precision, batch: int, compile: bool = False, channels_last: bool = True
):
    from encoders.alexnet import AlexNetEncoder
    from transfer.classification.config import TrainConfig
    from transfer.classification.model import ClassificationNet
    from transfer.classification.train import make_optimizer, make_step

    encoder = AlexNetEncoder("caffenet")
    model = _maybe_compile(ClassificationNet(encoder).to(env.device), compile)
    t = TrainConfig(channels_last=channels_last)
    step = make_step(model, make_optimizer(model, t), t, prec, env.device, encoder.convention)
    data = (
        torch.randint(0, 256, (batch, 3, 227, 227), dtype=torch.uint8),
        (torch.rand(batch, 20) < 0.2).float(),
        torch.ones(batch, 20, dtype=torch.bool),
    )
    return lambda: step(data, 0), batch


def detection(
    env: DistEnv, prec: Precision, batch: int, compile: bool = False, channels_last: bool = True
):
    """Fast R-CNN: 2 images of 600 x 800 with 64 RoIs each."""
    from encoders.alexnet import AlexNetEncoder
    from transfer.detection.config import DetectionTrainConfig
    from transfer.detection.model import FastRCNN, param_groups
    from transfer.detection.train import make_step

    model = FastRCNN(AlexNetEncoder("caffenet"), freeze_at=1).to(env.device)
    model = _maybe_compile(model, compile)
    t = DetectionTrainConfig(channels_last=channels_last)
    opt = loop.sgd(param_groups(model, t.lr, t.weight_decay, t.bias_lr_mult), t.lr, t.momentum)
    step = make_step(model, opt, t, prec, env.device)
    n = t.rois_per_batch
    xy = torch.rand(n, 2) * torch.tensor([600.0, 400.0])
    wh = torch.rand(n, 2) * 180 + 20
    rois = torch.cat([torch.arange(n)[:, None].float() % 2, xy, xy + wh], dim=1)
    data = {
        "images": torch.randn(2, 3, 600, 800),
        "rois": rois,
        "labels": torch.randint(0, 21, (n,)),
        "targets": torch.randn(n, 4) * 0.1,
    }
    return lambda: step(data, 0), 2


def segmentation(
    env: DistEnv, prec: Precision, batch: int, compile: bool = False, channels_last: bool = True
):
    """FCN-32s: one 500 x 375 VOC-sized image per pass (an update accumulates 20 of them)."""
    import numpy as np

    from encoders.alexnet import AlexNetEncoder
    from transfer.segmentation.config import SegmentationTrainConfig
    from transfer.segmentation.model import FCN
    from transfer.segmentation.train import make_optimizer, make_step

    encoder = AlexNetEncoder("caffenet")
    model = _maybe_compile(FCN(encoder).to(env.device), compile)
    t = SegmentationTrainConfig(iter_size=1, channels_last=channels_last)
    step = make_step(model, make_optimizer(model, t), t, True, prec, env.device, encoder.convention)
    # Labels in blocks and each class its own colour (plus noise), so that the loss of a
    # fixed batch can fall (uniform random labels have a zero expected gradient).
    rng = np.random.default_rng(0)
    label = ((np.arange(375)[:, None] // 75) * 5 + np.arange(500)[None, :] // 100) % 21
    colours = rng.integers(0, 256, (21, 3))
    noise = rng.integers(-20, 21, (375, 500, 3))
    image = np.clip(colours[label] + noise, 0, 255).astype(np.uint8)
    data = [(image, label.astype(np.uint8))]
    return lambda: step(data, 0), 1


def probe_features(
    env: DistEnv, prec: Precision, batch: int, compile: bool = False, channels_last: bool = True
):
    """The probes' feature extraction: the frozen encoder, forward only, at 227 px."""
    from encoders.alexnet import AlexNetEncoder

    enc = _maybe_compile(AlexNetEncoder("caffenet").to(env.device).eval(), compile)
    x = nhwc(torch.randn(batch, 3, 227, 227, device=env.device), channels_last)

    def step() -> torch.Tensor:
        with torch.no_grad(), prec.autocast():
            return enc(x)

    return step, batch


STEPS: dict[str, tuple[Callable[..., Any], int]] = {
    "context-encoder": (context_encoder, 32),
    "autoencoder": (autoencoder, 32),
    "inpainting": (inpainting, 64),
    "classification": (classification, 16),
    "detection": (detection, 2),
    "segmentation": (segmentation, 1),
    "probe-features": (probe_features, 64),
}


# ---------------------------------------------------------------- the public port


def port_step(device: torch.device, batch: int, model_file: Path | None = None):
    """The public PyTorch port's iteration (BoyuanJiang/context_encoder_pytorch train.py):
    its nets from its own model.py when given, else rebuilt on our modules with its kernels."""
    from pretrain.adversarial import DCGANDiscriminator
    from pretrain.inpainting.model import ContextEncoderGenerator, mask_context

    if model_file is not None:
        spec = importlib.util.spec_from_file_location("port_model", model_file)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        opt = SimpleNamespace(ngpu=1, nc=3, nef=64, ngf=64, ndf=64, nBottleneck=4000)
        g, d = module._netG(opt), module._netlocalD(opt)
    else:
        g = ContextEncoderGenerator()
        for seq, i, cls in ((g.encoder.net, -1, nn.Conv2d), (g.decoder.net, 2, nn.ConvTranspose2d)):
            old = seq[i]
            plain = cls(old.in_channels, old.out_channels, 4, 1, 0, bias=False)
            plain.weight.data.copy_(old.weight.data)
            seq[i] = plain
        d = nn.Sequential(DCGANDiscriminator(64), nn.Sigmoid())
    g, d = g.to(device), d.to(device)
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))  # the port's lr
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCELoss()
    overlap, wtl2 = 4, 0.998  # the port's defaults (train.py)
    hole = torch.zeros(1, 1, 128, 128, dtype=torch.bool, device=device)
    hole[..., 32 + overlap : 96 - overlap, 32 + overlap : 96 - overlap] = True
    w = torch.full((1, 3, 64, 64), wtl2 * 10.0, device=device)
    w[..., overlap : 64 - overlap, overlap : 64 - overlap] = wtl2
    image = torch.rand(batch, 3, 128, 128, device=device) * 2 - 1

    def step() -> None:
        real = image[..., 32:96, 32:96].clone()
        fake = g(mask_context(image, hole))
        ones = torch.ones(batch, device=device)
        zeros = torch.zeros(batch, device=device)
        d.zero_grad()
        bce(d(real).view(-1), ones).backward()
        bce(d(fake.detach()).view(-1), zeros).backward()
        opt_d.step()
        g.zero_grad()
        l2 = ((fake - real).pow(2) * w).mean()
        err = (1 - wtl2) * bce(d(fake).view(-1), ones) + wtl2 * l2
        err.backward()
        opt_g.step()

    return step, batch


def port_as_it_runs(args: argparse.Namespace) -> dict[str, Any]:
    """The port's own step in a fresh process with glibc's default malloc, as its train.py
    runs (host memory kept for reuse is this project's setting, and speeds the port up too:
    the in-process row shows by how much)."""
    cmd = [sys.executable, "-m", "benchmarks.steps", "--steps", "none", "--precisions", "fp32",
           "--device", args.device, "--port-model", str(args.port_model), "--system-malloc",
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--port-json"]  # fmt: skip
    cmd += ["--threads", str(args.threads)] if args.threads else []
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root).stdout
    (row,) = json.loads(out.strip().splitlines()[-1])
    row["step"] = "inpainting: public port (its model.py, own process, glibc malloc)"
    return row


# ---------------------------------------------------------------- measuring


def measure(
    name: str,
    precision: str,
    step: Callable[[], Any],
    images: int,
    device: torch.device,
    rate: MatmulRate,
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    """Median wall and CPU time of `repeats` steps, each followed by a matmul of the same
    precision: the row's share is of the matmul rate measured between its own steps."""
    tic = time.perf_counter()
    step()  # first call: torch.compile compiles here; eager kernels warm up
    sync(device)
    first = time.perf_counter() - tic
    flops = count_flops(step)
    for _ in range(warmup):
        step()
    sync(device)
    walls, cpus, peaks = [], [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        step()
        sync(device)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        peaks.append(rate.once())
    wall = sorted(walls)[len(walls) // 2]
    peak = sorted(peaks)[len(peaks) // 2]
    gflops = flops / wall / 1e9
    return {
        "step": name,
        "precision": precision,
        "ms/step": wall * 1e3,
        "img/s": images / wall,
        "cpu s/step": sorted(cpus)[len(cpus) // 2],
        "GFLOP/step": flops / 1e9,
        "GFLOP/s": gflops,
        "matmul GFLOP/s": peak,
        "% of matmul": 100.0 * gflops / peak,
        "first step s": first,
    }


def pipelines(workers: int, seconds: float = 10.0) -> list[dict[str, Any]]:
    """img/s of each stage's training data pipeline on the synthetic dataset."""
    from benchmark.datasets.folder import list_images
    from benchmark.datasets.resolve import resolve_data
    from benchmark.loop import list_collate, loader_batches
    from encoders.alexnet import ARCHS
    from pretrain.data import PretrainImages
    from pretrain.inpainting.data import InpaintingImages
    from pretrain.masks import load_voc_shapes, make_mask_fn
    from transfer.classification.config import AugmentConfig
    from transfer.classification.data import TrainCrops, VOCImages
    from transfer.segmentation.data import SegTrainSet, build_data, find_sbd

    env = DistEnv(0, 1, 0, torch.device("cpu"))
    images = list_images(resolve_data(None, "images"))
    voc07, voc12 = resolve_data(None, "voc2007"), resolve_data(None, "voc2012")
    shapes = load_voc_shapes(voc12)
    mask = make_mask_fn("random-region", (227, 227), shapes=shapes)
    seg = build_data(voc12, find_sbd(None, None, voc12, True), "train", "seg11valid")
    conv = ARCHS["caffenet"].convention
    cls_set = TrainCrops(VOCImages(voc07, "trainval"), AugmentConfig(crop=227), 0, conv)  # CaffeNet
    sets = {
        "context-encoder": (PretrainImages(images, 227, conv, mask), 32, None),
        "inpainting": (InpaintingImages(images, 350), 64, None),
        "classification": (cls_set, 16, None),
        "segmentation": (SegTrainSet(seg.train, None, False, 0), 1, list_collate),
    }
    rows = []
    for name, (ds, batch, collate) in sets.items():
        it = loader_batches(ds, batch, 0, env, workers, collate)(0)
        next(it)  # workers started
        n, tic = 0, time.perf_counter()
        while time.perf_counter() - tic < seconds:
            next(it)
            n += batch
        rows.append(
            {"pipeline": name, "workers": workers, "img/s": n / (time.perf_counter() - tic)}
        )
    return rows


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", default=",".join(STEPS), help=",".join(STEPS))
    p.add_argument(
        "--precisions",
        default="auto",
        help="comma list of fp32,bf16,fp16; auto: fp32 and, where the device runs "
        "it natively, the low precision `train.precision: auto` picks",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--batch", type=int, default=0, help="override every step's batch size")
    p.add_argument("--port", action="store_true", help="the port's inpainting step, rebuilt")
    p.add_argument("--port-model", type=Path, help="the port's own model.py (runs it)")
    p.add_argument("--pipeline", action="store_true", help="also time the data pipelines")
    p.add_argument(
        "--layouts",
        default="nhwc",
        help="comma list of nhwc (train.channels_last: true, the default), nchw",
    )
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (train.keep_host_memory: false); by default "
        "freed memory is kept for reuse, as the stages do, for the port's step too",
    )
    p.add_argument("--port-json", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--compile",
        action="store_true",
        help="also each step with torch.compile (train.compile: true); 'first step s' "
        "is then its compile time",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.system_malloc:
        host_memory.keep_freed_memory()
    device = pick_device(args.device)
    env = DistEnv(0, 1, 0, device)
    torch.manual_seed(0)
    rows, peaks = [], {}
    precisions = args.precisions.split(",")
    layouts = args.layouts.split(",")
    if not set(layouts) <= {"nhwc", "nchw"}:
        p.error(f"--layouts: {args.layouts!r} is not a comma list of nhwc, nchw")
    if precisions == ["auto"]:
        precisions = sorted({"fp32", resolve_precision("auto", device)}, key="fp32".__ne__)
    native = device.type == "cuda" or cpu_has_fast_bf16()
    for precision in precisions:
        # Emulated bf16 (no AMX / AVX-512 BF16) runs a 2048^2 matmul in minutes: a smaller one.
        size = 2048 if precision == "fp32" or native else 1024
        rate = MatmulRate(device, size, DTYPES[precision])
        peaks[precision] = rate
        prec = Precision(precision, device)
        for name in [n for n in args.steps.split(",") if n not in ("", "none")]:
            build, default_batch = STEPS[name]
            variants = [(c, lay) for lay in layouts for c in (False, True)[: 1 + args.compile]]
            for compiled, layout in variants:
                batch = args.batch or default_batch
                step, images = build(env, prec, batch, compiled, layout == "nhwc")
                label = name + (" (compiled)" if compiled else "")
                label += f" ({layout})" if len(layouts) > 1 else ""
                rows.append(
                    measure(
                        label,
                        precision,
                        step,
                        images,
                        device,
                        rate,
                        args.repeats,
                        args.warmup,
                    )
                )
        if precision == "fp32" and (args.port or args.port_model):
            ports = [("rebuilt", None)] if args.port else []
            ports += [("its model.py", args.port_model)] if args.port_model else []
            if args.port_model and host_memory.applied() and not args.port_json:
                rows.append(port_as_it_runs(args))
            for label, model_file in ports:
                step, n = port_step(device, args.batch or 64, model_file)
                rows.append(
                    measure(
                        f"inpainting: public port ({label})",
                        "fp32",
                        step,
                        n,
                        device,
                        peaks["fp32"],
                        args.repeats,
                        args.warmup,
                    )
                )
    if args.port_json:
        return json.dumps(rows)
    cpu = "" if device.type == "cuda" else f" (native bf16: {cpu_has_fast_bf16()})"
    kept = "kept" if host_memory.applied() else "returned (glibc default)"
    head = f"device {device}{cpu}, {torch.get_num_threads()} threads, freed host memory {kept}; "
    head += "matmul (median of all "
    head += "interleaved): " + ", ".join(f"{k} {v.gflops:.1f} GFLOP/s" for k, v in peaks.items())
    out = head + "\n\n" + markdown_table(rows)
    if args.pipeline:
        out += "\n\n" + markdown_table(pipelines(args.workers))
    return out


if __name__ == "__main__":
    print(main())
