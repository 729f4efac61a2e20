"""The multi-crop test of VOC2007 classification: per image, the mean of its crops' logits."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from benchmark import distributed, loop
from benchmark.distributed import DistEnv
from benchmark.input_convention import InputConvention
from weights.encoder import convention_of

from .config import EvalConfig
from .data import EvalCrops


def to_input(
    images: torch.Tensor, device: torch.device, convention: InputConvention
) -> torch.Tensor:
    """uint8 (B, 3, H, W) RGB -> the encoder's float input (its `convention`) on `device`."""
    x = convention.normalise(images.to(device, non_blocking=True))
    return loop.to_device(x, device, True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: EvalCrops,
    test: EvalConfig,
    env: DistEnv,
    workers: int = 0,
    precision: loop.Precision | None = None,
) -> np.ndarray:
    """Scores (N, 20): per image, the mean over its crops of the logits (every rank gets
    all rows), crops fed in the model's encoder's input convention. Images are shared out
    over processes, rank r taking i = r, r + world, ..."""
    model.eval()
    convention = convention_of(loop.unwrap(model).encoder)
    autocast = precision.autocast if precision is not None else torch.no_grad
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
        with autocast():
            logits = model(to_input(crops.flatten(0, 1), env.device, convention))
        rows.append(logits.float().view(b, k, -1).mean(1).cpu().numpy())
        indices.append(index.numpy())
    scores = np.concatenate(rows) if rows else np.zeros((0, 20))
    order = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    parts = distributed.gather_objects((order, scores))
    order = np.concatenate([p[0] for p in parts])
    scores = np.concatenate([p[1] for p in parts])
    out = np.zeros((len(dataset), scores.shape[1]), dtype=np.float64)
    out[order] = scores
    return out
