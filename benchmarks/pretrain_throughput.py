"""Images per second of a context-encoder training step and of the data pipeline.

    python -m benchmarks.pretrain_throughput --batch-size 16 --image-size 227 --device cpu

Prints a Markdown table: step time and img/s with and without channels_last (on CPU some
kernels are slower in channels_last, so both are measured), the FLOPs of one step as
torch's counter sees them, the achieved GFLOP/s and its share of the machine's fp32 matmul
peak; then the data pipeline's img/s (decode, crop, mask) for the given worker counts.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmark.distributed import DistEnv, pick_device
from benchmarks.common import count_flops, markdown_table, matmul_gflops, sync, time_per_call
from pretrain.context_encoder import ContextEncoder
from pretrain.data import PretrainImages, make_batches
from pretrain.engine import Precision, adam
from pretrain.masks import make_mask_fn
from pretrain.train import make_step


def _fake_batch(batch_size: int, size: int, mask: str, device: torch.device) -> dict:
    import numpy as np

    fn = make_mask_fn(mask, (size, size))
    rng = np.random.default_rng(0)
    masks = torch.stack([torch.from_numpy(fn(rng)).float()[None] for _ in range(batch_size)])
    return {
        "image": torch.randn(batch_size, 3, size, size, device=device),
        "mask": masks.to(device),
    }


def measure_step(
    batch_size: int,
    size: int,
    device: torch.device,
    amp: bool,
    repeats: int,
    channels_last: bool,
    peak: float,
) -> dict[str, Any]:
    """A full optimisation step (forward, masked loss, backward, fused Adam) as one row."""
    torch.manual_seed(0)
    model = ContextEncoder(input_size=size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = adam(model.parameters(), 1e-4, (0.9, 0.999), device)
    prec = Precision(device, amp)
    batch = _fake_batch(batch_size, size, "central", device)
    if channels_last:  # to_device only converts on CUDA; force it here to measure CPU too
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    step = make_step(
        model, opt, prec, device, fill=torch.zeros(3, device=device), channels_last=channels_last
    )
    flops = count_flops(lambda: step(batch, 0))
    seconds = time_per_call(lambda: step(batch, 0), device, warmup=2, repeats=repeats)
    gflops = flops / seconds / 1e9
    return {
        "what": "train step",
        "device": str(device),
        "batch": batch_size,
        "size": size,
        "channels_last": channels_last,
        "amp": prec.enabled,
        "ms/step": seconds * 1e3,
        "img/s": batch_size / seconds,
        "GFLOP/step": flops / 1e9,
        "GFLOP/s": gflops,
        "% matmul peak": 100.0 * gflops / peak,
    }


def data_rows(
    root: Path,
    batch_size: int,
    size: int,
    mask: str,
    workers: Sequence[int],
    batches: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """img/s of decoding + resizing + cropping + masking, per DataLoader worker count."""
    from benchmark.datasets.folder import list_images

    paths = list_images(root)
    fn = make_mask_fn(mask, (size, size))
    dataset = PretrainImages(paths, size, fn)
    env = DistEnv(0, 1, 0, device)
    rows = []
    for w in workers:
        it = make_batches(dataset, batch_size, seed=0, workers=w, env=env)(0)
        next(it)  # start-up of the worker processes is not throughput
        tic = time.perf_counter()
        for b in itertools.islice(it, batches):
            b["image"].to(device, non_blocking=True)
        sync(device)
        seconds = time.perf_counter() - tic
        rows.append(
            {
                "what": "data",
                "workers": w,
                "batch": batch_size,
                "size": size,
                "mask": mask,
                "img/s": batches * batch_size / seconds,
            }
        )
        del it
    return rows


def main(
    batch_size: int = 16,
    image_size: int = 227,
    device: str = "auto",
    data: str | None = None,
    mask: str = "noise-region",
    workers: Sequence[int] = (0, 2),
    repeats: int = 5,
    data_batches: int = 10,
    threads: int | None = None,
    amp: bool = True,
) -> list[dict[str, Any]]:
    """Measure and print; returns the rows."""
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    peak = matmul_gflops(dev)
    print(f"fp32 matmul peak on {dev} ({torch.get_num_threads()} threads): {peak:.1f} GFLOP/s\n")
    layouts = (False, True)
    rows = [measure_step(batch_size, image_size, dev, amp, repeats, cl, peak) for cl in layouts]
    print(markdown_table(rows))
    if data is None:
        from benchmark.datasets.resolve import resolve_data

        data = str(resolve_data(None, "images"))
    drows = data_rows(Path(data), batch_size, image_size, mask, workers, data_batches, dev)
    print()
    print(markdown_table(drows))
    return rows + drows


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=227)
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default=None, help="image folder (default: synthetic dataset)")
    p.add_argument("--mask", default="noise-region")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data-batches", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-amp", action="store_true")
    return p.parse_args()


if __name__ == "__main__":
    a = _args()
    main(
        a.batch_size,
        a.image_size,
        a.device,
        a.data,
        a.mask,
        a.workers,
        a.repeats,
        a.data_batches,
        a.threads,
        not a.no_amp,
    )
