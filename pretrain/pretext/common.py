"""What the three pretext methods share: device moves, the encoder's
pool5 shape at a patch size, Caffe-style initialisation and SGD groups, per-patch
normalisation, and captioned PNG grids for `sample_figure`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.input_convention import CAFFE, InputConvention
from benchmark.loop import Precision, nhwc
from benchmark.runs import atomic_write_bytes


def optimise(loss: torch.Tensor, optimizer: torch.optim.Optimizer, precision: Precision) -> None:
    """backward + step through `precision`. Its once-per-iteration `update` (the fp16 loss
    scale) is the loop's to call, after the step function returns."""
    precision.backward(loss)
    precision.step(optimizer)


def images_to(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A (N, C, H, W) batch on `device`, channels_last when asked (`loop.nhwc`)."""
    return nhwc(x.to(device, non_blocking=True), channels_last)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy as a 0-d float tensor (detached)."""
    return (logits.detach().argmax(dim=1) == labels).float().mean()


ForwardBatch = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def cross_entropy_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    forward_batch: ForwardBatch,
    precision: Precision | None = None,
    channels_last: bool = False,
    reduction: str = "mean",
) -> Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]:
    """The step every pretext method trains with: forward under the precision's autocast,
    softmax cross-entropy in fp32 (`reduction` over the samples), backward and update.
    Returns {"loss": mean cross-entropy per sample, "accuracy"} (detached)."""
    prec = precision or Precision("fp32", device)

    def step(batch: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with prec.autocast():
            logits, labels = forward_batch(model, batch, device, channels_last)
        logits = logits.float()
        loss = F.cross_entropy(logits, labels, reduction=reduction)
        optimise(loss, optimizer, prec)
        mean = loss.detach() / labels.numel() if reduction == "sum" else loss.detach()
        return {"loss": mean, "accuracy": accuracy(logits, labels)}

    return step


@torch.no_grad()
def pool5_shape(encoder: nn.Module, size: int) -> tuple[int, int, int]:
    """(C, H, W) of the encoder's output for one size x size input, by a dry run in eval
    mode (so BatchNorm statistics, should the encoder gain any, are left alone)."""
    was_training = encoder.training
    encoder.eval()
    try:
        param = next(encoder.parameters())
        out = encoder(torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device))
    finally:
        encoder.train(was_training)
    if out.dim() != 4 or min(out.shape[2:]) < 1:
        raise ValueError(f"encoder output {tuple(out.shape)} at input {size}: too small")
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])


def caffe_xavier_(module: nn.Module) -> None:
    """Caffe's "xavier" filler (U(-a, a), a = sqrt(3 / fan_in)) on every conv and linear
    weight, zero biases. Not torch's xavier_uniform_, which averages fan-in and fan-out."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()  # in_channels / groups * kernel area
            bound = math.sqrt(3.0 / fan_in)
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def sgd_groups(
    model: nn.Module, weight_decay: float, bias_lr_mult: float = 1.0, bias_decay: bool = True
) -> list[dict[str, Any]]:
    """Parameter groups in Caffe's terms: weights (lr_mult 1, decay_mult 1) and biases
    (lr_mult `bias_lr_mult`, decay_mult 1 or 0). Each group carries its `lr_mult`, which
    `set_learning_rate` applies."""
    weights = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": weights, "weight_decay": weight_decay, "lr_mult": 1.0}]
    if biases:
        decay = weight_decay if bias_decay else 0.0
        groups.append({"params": biases, "weight_decay": decay, "lr_mult": bias_lr_mult})
    return groups


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to lr x its `lr_mult` (1 where a group has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def standardise(x: np.ndarray, axes: tuple[int, ...] | None = None) -> np.ndarray:
    """Zero mean, unit standard deviation over `axes` (all by default); a constant input
    becomes zeros. float32."""
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True)
    return ((x - mean) / np.maximum(std, 1e-6)).astype(np.float32) * (std > 1e-6)


def chw(x: np.ndarray) -> torch.Tensor:
    """(..., H, W, C) float array -> (..., C, H, W) float32 tensor."""
    x = np.ascontiguousarray(np.moveaxis(np.asarray(x, dtype=np.float32), -1, -3))
    return torch.from_numpy(x)


def display(x: torch.Tensor, convention: InputConvention = CAFFE) -> np.ndarray:
    """(3, H, W) tensor of any scale, channels in `convention`'s order -> (H, W, 3) RGB in
    [0, 1], min-max stretched (patches normalised per patch have no fixed pixel scale to
    undo)."""
    x = x.detach().float().cpu()
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo) if hi > lo else torch.full_like(x, 0.5)
    return np.ascontiguousarray(convention.order_channels(x.permute(1, 2, 0).numpy()))


def save_captioned_grid(
    path: Path,
    rows: Sequence[Sequence[np.ndarray]],
    captions: Sequence[Sequence[str]],
    row_labels: Sequence[str] | None = None,
    cell_inches: float = 1.6,
) -> Path:
    """One PNG: rows of images ((H, W, 3) in [0, 1]), each with the caption at the same
    place in `captions` above it (rows of strings; missing ones are left out), optional
    labels left of each row. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows or not rows[0]:
        raise ValueError("save_captioned_grid needs at least one image")
    nrows, ncols = len(rows), max(len(r) for r in rows)
    fig = Figure(figsize=(cell_inches * ncols, (cell_inches + 0.3) * nrows))
    FigureCanvasAgg(fig)
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = fig.add_subplot(nrows, ncols, r * ncols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                ax.imshow(np.clip(row[c], 0.0, 1.0), interpolation="nearest")
            else:
                ax.axis("off")
            if r < len(captions) and c < len(captions[r]):
                ax.set_title(captions[r][c], fontsize=7)
            if c == 0 and row_labels is not None and r < len(row_labels):
                ax.set_ylabel(row_labels[r], fontsize=7)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
