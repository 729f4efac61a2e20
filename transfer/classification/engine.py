"""The fine-tuning loop (iteration-based, resumable) and the multi-crop test."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from benchmark import distributed
from benchmark.distributed import DistEnv
from benchmark.errors import BenchError
from benchmark.runs import Run

from .config import EvalConfig, TrainConfig
from .data import EvalCrops
from .model import normalize, sigmoid_cross_entropy


def lr_at(train: TrainConfig, iteration: int) -> float:
    """Caffe's 'step' policy: lr * gamma ** floor(iteration / step)."""
    return train.lr * train.lr_gamma ** (iteration // train.lr_step)


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.SGD:
    """SGD over the trainable parameters only (frozen ones must not even see weight decay)."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.endswith("bias") else weights).append(p)
    groups = [
        {"params": weights, "lr_mult": 1.0},
        {"params": biases, "lr_mult": train.bias_lr_mult},
    ]
    return torch.optim.SGD(
        [g for g in groups if g["params"]],
        lr=train.lr,
        momentum=train.momentum,
        weight_decay=train.weight_decay,
    )


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on GPU (no loss scaling needed); exact float32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = normalize(images.to(device, non_blocking=True))
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def seed_dropout(seed: int, rank: int, iteration: int) -> None:
    """Key dropout's randomness to (seed, rank, iteration) so a resumed run draws the same
    masks as an uninterrupted one, with no generator state in the checkpoint."""
    torch.manual_seed(int(np.random.SeedSequence([seed, 5, rank, iteration]).generate_state(1)[0]))


def train_one_step(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    clip_grad: float,
    device: torch.device,
) -> torch.Tensor:
    """One SGD step on a batch (images uint8 (B,3,S,S), labels (B,20), keep (B,20))."""
    images, labels, keep = batch
    x = to_input(images, device)
    with autocast(device):
        logits = model(x)
    loss = sigmoid_cross_entropy(logits, labels.to(device), keep.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, clip_grad)
    optimizer.step()
    return loss.detach()


def fit(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    train: TrainConfig,
    state: dict[str, Any],
    *,
    seed: int,
    env: DistEnv,
    run: Run,
    save: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Train from `state['iteration']` to `train.iterations`; returns the updated state.

    `state` holds iteration, initial_loss, final_loss and train_seconds; `save(state)` is
    called every `checkpoint_every` iterations (checkpoint writing is the caller's).
    """
    model.train()
    start = state["iteration"]
    window: list[torch.Tensor] = []
    tick = time.perf_counter()
    bar = tqdm(
        total=train.iterations, initial=start, desc="classification", unit="it",
        disable=None if env.is_main else True, leave=False,
    )  # fmt: skip
    for it, batch in zip(range(start, train.iterations), loader):
        lr = lr_at(train, it)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        seed_dropout(seed, env.rank, it)
        loss = train_one_step(model, batch, optimizer, train.clip_grad, env.device)
        window.append(loss)
        if state["initial_loss"] is None:
            state["initial_loss"] = float(distributed.all_reduce_mean(loss))
        done = it + 1
        if done % train.log_every == 0 or done == train.iterations:
            mean = float(distributed.all_reduce_mean(torch.stack(window).mean()))
            if not math.isfinite(mean):
                raise BenchError(
                    f"train.lr: loss became {mean} by iteration {done}; lower the learning rate"
                )
            state["final_loss"] = mean
            run.log_scalars(done, {"loss": mean, "lr": lr}, prefix="train/")
            bar.set_postfix(loss=f"{mean:.3f}", lr=f"{lr:.1e}")
            window = []
        bar.update(1)
        state["iteration"] = done
        if done % train.checkpoint_every == 0 and done < train.iterations:
            now = time.perf_counter()
            state["train_seconds"] += now - tick
            tick = now
            save(state)
    bar.close()
    state["train_seconds"] += time.perf_counter() - tick
    return state


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: EvalCrops,
    test: EvalConfig,
    env: DistEnv,
    workers: int = 0,
) -> np.ndarray:
    """Scores (N, 20): per image, the mean over its crops of the logits (every rank gets
    all rows). Images are shared out over processes, rank r taking i = r, r + world, ..."""
    model.eval()
    mine = list(range(env.rank, len(dataset), env.world_size))
    loader = DataLoader(
        Subset(dataset, mine), batch_size=test.batch_size, num_workers=workers,
        pin_memory=env.device.type == "cuda",
    )  # fmt: skip
    rows: list[np.ndarray] = []
    indices: list[np.ndarray] = []
    for crops, index in tqdm(loader, desc="test crops", unit="batch",
                             disable=None if env.is_main else True, leave=False):  # fmt: skip
        b, k = crops.shape[:2]
        x = to_input(crops.flatten(0, 1), env.device)
        with autocast(env.device):
            logits = model(x)
        rows.append(logits.float().view(b, k, -1).mean(1).cpu().numpy())
        indices.append(index.numpy())
    scores = np.concatenate(rows) if rows else np.zeros((0, 20))
    order = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    if env.distributed:
        parts: list[Any] = [None] * env.world_size
        torch.distributed.all_gather_object(parts, (order, scores))
        order = np.concatenate([p[0] for p in parts])
        scores = np.concatenate([p[1] for p in parts])
    out = np.zeros((len(dataset), scores.shape[1]), dtype=np.float64)
    out[order] = scores
    return out
