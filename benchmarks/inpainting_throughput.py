"""Images per second of one training step of the 128-px inpainting context encoder.

    python -m benchmarks.inpainting_throughput                 # ours, batch 64, joint loss
    python -m benchmarks.inpainting_throughput --port          # + the public port's step
    python -m benchmarks.inpainting_throughput --threads 2 --variants default,fused-d

One step is the whole joint-loss iteration (generator forward, discriminator step on real
and fake patches, generator step through the updated discriminator, both Adam updates).
Prints a Markdown table: ms/step, img/s, the FLOPs of the step as torch's counter sees them
(convolutions and matrix products, a multiply-add counted as 2), the achieved GFLOP/s and
its share of this machine's fp32 matmul rate measured in the same run. `--port` adds a
re-creation of the public PyTorch port's step (NCHW, convolution kernels for the
bottleneck, per-op Adam, sigmoid + BCELoss, D weight gradients computed in the G step)
for a same-machine, same-load comparison. CPU time per step is printed beside wall time:
on a shared machine wall time also counts other people's work.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmark.distributed import DistEnv, pick_device
from benchmarks.common import count_flops, markdown_table, matmul_gflops, sync
from pretrain.inpainting import (
    ContextEncoderGenerator,
    PatchDiscriminator,
    central_hole,
    centre_patch,
    mask_context,
)
from pretrain.inpainting_train import InpaintingConfig, build_nets, make_step

VARIANTS: dict[str, dict[str, bool]] = {
    # the default: faithful sequential update, channels_last activations
    "default": {"channels_last": True, "fused_discriminator": False},
    "nchw": {"channels_last": False, "fused_discriminator": False},
    # one D batch for real+fake: BatchNorm statistics change (off by default)
    "fused-d": {"channels_last": True, "fused_discriminator": True},
}


def ours(variant: str, device: torch.device, loss: str) -> Callable[[dict], Any]:
    cfg = InpaintingConfig()
    cfg.loss.kind = loss  # type: ignore[assignment]
    for k, v in VARIANTS[variant].items():
        setattr(cfg.train, k, v)
    env = DistEnv(0, 1, 0, device)
    nets = build_nets(cfg, env)
    step = make_step(
        nets,
        device,
        cfg.loss,
        overlap=cfg.loss.overlap,
        channels_last=cfg.train.channels_last,
        fused_discriminator=cfg.train.fused_discriminator,
    )
    return lambda batch: step(batch, 0)


def port(device: torch.device, overlap: int = 4) -> Callable[[dict], Any]:
    """The public PyTorch port's iteration, rebuilt on our modules with its kernels."""
    g = ContextEncoderGenerator()
    for seq, i, cls in ((g.encoder.net, -1, nn.Conv2d), (g.decoder.net, 2, nn.ConvTranspose2d)):
        old = seq[i]
        plain = cls(old.in_channels, old.out_channels, 4, 1, 0, bias=False)
        plain.weight.data.copy_(old.weight.data)
        seq[i] = plain
    d = nn.Sequential(PatchDiscriminator(), nn.Sigmoid())
    g, d = g.to(device), d.to(device)
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCELoss()
    hole = central_hole(overlap).to(device)
    w = torch.full((1, 3, 64, 64), 0.999 * 10.0, device=device)
    w[..., overlap : 64 - overlap, overlap : 64 - overlap] = 0.999

    def step(batch: dict) -> None:
        image = batch["image"]
        real = centre_patch(image).clone()
        fake = g(mask_context(image, hole))
        ones = torch.ones(len(image), device=device)
        zeros = torch.zeros(len(image), device=device)
        d.zero_grad()
        bce(d(real), ones).backward()
        bce(d(fake.detach()), zeros).backward()
        opt_d.step()
        g.zero_grad()
        err = 0.001 * bce(d(fake), ones) + ((fake - real).pow(2) * w).mean()
        err.backward()
        opt_g.step()

    return step


def measure(
    name: str,
    step: Callable[[dict], Any],
    batch: dict,
    device: torch.device,
    peak: float,
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    flops = count_flops(lambda: step(batch))
    for _ in range(warmup):
        step(batch)
    sync(device)
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        step(batch)
        sync(device)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    wall = sorted(walls)[len(walls) // 2]
    cpu = sorted(cpus)[len(cpus) // 2]
    n = len(batch["image"])
    gflops = flops / wall / 1e9
    return {
        "step": name,
        "ms/step": wall * 1e3,
        "img/s": n / wall,
        "cpu s/step": cpu,
        "GFLOP/step": flops / 1e9,
        "GFLOP/s": gflops,
        "% matmul": 100.0 * gflops / peak,
    }


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--loss", default="joint", choices=["l2", "adversarial", "joint"])
    p.add_argument("--variants", default="default", help=",".join(VARIANTS))
    p.add_argument("--port", action="store_true", help="also time the public port's step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    peak = matmul_gflops(device)
    batch = {"image": torch.rand(args.batch_size, 3, 128, 128, device=device) * 2 - 1}
    rows = []
    for v in args.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r} (choose from {', '.join(VARIANTS)})")
        rows.append(
            measure(v, ours(v, device, args.loss), batch, device, peak, args.repeats, args.warmup)
        )
    if args.port:
        rows.append(
            measure("public port", port(device), batch, device, peak, args.repeats, args.warmup)
        )
    head = (
        f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"128 px, loss {args.loss}; fp32 matmul {peak:.1f} GFLOP/s"
    )
    return head + "\n\n" + markdown_table(rows)


if __name__ == "__main__":
    print(main())
