"""FCN training (SGD at batch 1 with whole images) and confusion-matrix evaluation.

The solver follows FCN's released Caffe nets: weights learn at `lr` with weight decay, biases
at 2x `lr` without decay. The loss is the softmax cross-entropy over pixels whose label is not
255, summed and (by default, as PROTOCOL.md says) divided by the number of such pixels.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from benchmark.datasets.voc import IGNORE_INDEX, VOC_PALETTE, SegSample
from benchmark.metrics import confusion_matrix, segmentation_scores
from benchmark.runs import Run, atomic_write_bytes

from .config import SegmentationConfig
from .data import load_pair, to_input, train_order

NUM_CLASSES = 21
BIAS_LR_MULT = 2.0


def make_optimizer(model: nn.Module, cfg: SegmentationConfig) -> torch.optim.Optimizer:
    """SGD with FCN's parameter groups: weights (lr, decay), biases (2 lr, no decay)."""
    weights = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    groups = [
        {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": biases, "lr": cfg.lr * BIAS_LR_MULT, "weight_decay": 0.0},
    ]
    if cfg.solver == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def pixel_loss(scores: torch.Tensor, label: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Softmax loss over non-ignored pixels: their mean (normalised) or their sum."""
    total = F.cross_entropy(scores, label, ignore_index=IGNORE_INDEX, reduction="sum")
    if not normalize:
        return total
    valid = (label != IGNORE_INDEX).sum()
    return total / valid.clamp(min=1)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: Sequence[SegSample],
    cfg: SegmentationConfig,
    state: dict[str, Any],
    device: torch.device,
    run: Run,
    save: Callable[[dict[str, Any]], None],
    on_eval: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run iterations state['iteration'] .. cfg.iterations; returns the updated state."""
    model.train()
    start = state["iteration"]
    bar = tqdm(
        total=cfg.iterations, initial=start, desc="segmentation", unit="it",
        disable=None, dynamic_ncols=True,
    )  # fmt: skip
    t0, losses = time.perf_counter(), []
    for it in range(start, cfg.iterations):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for b in range(cfg.batch_size):
            k = train_order(len(samples), cfg.seed, it * cfg.batch_size + b)
            image, label = load_pair(samples[k], cfg.max_size)
            if cfg.mirror and np.random.default_rng([cfg.seed, it, b, 7]).random() < 0.5:
                image, label = image[:, ::-1], label[:, ::-1]
            x = to_input(image, device)
            y = torch.from_numpy(np.ascontiguousarray(label)).long().to(device)[None]
            scores = model(x, out_size=tuple(label.shape))
            loss = pixel_loss(scores, y, cfg.normalize_loss) / cfg.batch_size
            loss.backward()
            step_loss += float(loss.detach())
        optimizer.step()
        if not np.isfinite(step_loss):
            raise RuntimeError(f"segmentation loss is {step_loss} at iteration {it + 1}")
        if state["initial_loss"] is None:
            state["initial_loss"] = step_loss
        losses.append(step_loss)
        state["iteration"] = it + 1
        bar.update(1)
        if state["iteration"] % cfg.log_every == 0 or state["iteration"] == cfg.iterations:
            mean = float(np.mean(losses))
            state["final_loss"] = mean
            bar.set_postfix(loss=f"{mean:.4f}")
            run.log_scalars(state["iteration"], {"loss": mean, "lr": cfg.lr}, prefix="train/")
            losses = []
        if state["iteration"] % cfg.checkpoint_every == 0:
            state["train_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            save(state)
        if on_eval and cfg.eval_every and state["iteration"] % cfg.eval_every == 0:
            on_eval(state["iteration"])
            model.train()
    bar.close()
    if losses:
        state["final_loss"] = float(np.mean(losses))
    state["train_seconds"] += time.perf_counter() - t0
    return state


@torch.no_grad()
def predict(
    model: nn.Module, image: np.ndarray, out_size: tuple[int, int], device: torch.device
) -> np.ndarray:
    """Arg-max class map (H, W) uint8 at `out_size` (the label's resolution)."""
    scores = model(to_input(image, device), out_size=out_size)
    return scores.argmax(1)[0].to(torch.uint8).cpu().numpy()


def evaluate(
    model: nn.Module,
    samples: Sequence[SegSample],
    max_size: int | None,
    device: torch.device,
    keep: int = 0,
) -> tuple[np.ndarray, list[tuple[SegSample, np.ndarray, np.ndarray, np.ndarray]]]:
    """Accumulated (21, 21) confusion matrix over `samples`, and (sample, image, label,
    prediction) of the first `keep` images for overlays."""
    model.eval()
    hist = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    kept = []
    for n, sample in enumerate(tqdm(samples, desc="evaluate", unit="img", disable=None)):
        image, label = load_pair(sample, max_size)
        pred = predict(model, image, label.shape, device)
        hist += confusion_matrix(pred, label, NUM_CLASSES, ignore_index=IGNORE_INDEX)
        if n < keep:
            kept.append((sample, image, label, pred))
    return hist, kept


def scores_from_hist(hist: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """metrics.json's segmentation keys from a confusion matrix (FCN's definitions)."""
    s = segmentation_scores(hist)

    def num(v: float) -> float | None:
        return None if np.isnan(v) else float(v)

    return {
        "mean_iu": num(s["mean_iu"]),
        "pixel_acc": num(s["pixel_acc"]),
        "mean_acc": num(s["mean_acc"]),
        "fw_iu": num(s["fw_iu"]),
        "per_class": {c: num(v) for c, v in zip(classes, s["per_class_iu"])},
    }


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) class map -> (H, W, 3) uint8 in the VOC palette (255 = void's cream colour)."""
    return VOC_PALETTE[label]


def overlay_png(image: np.ndarray, label: np.ndarray, pred: np.ndarray) -> bytes:
    """One PNG: image | ground truth | prediction, classes blended over the image."""
    h, w = label.shape
    base = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), dtype=np.float32)

    def blend(m: np.ndarray) -> np.ndarray:
        colour = colorize(m).astype(np.float32)
        alpha = np.where((m > 0)[..., None], 0.65, 0.25)
        return (base * (1 - alpha) + colour * alpha).astype(np.uint8)

    gap = np.full((h, 4, 3), 255, dtype=np.uint8)
    panel = np.concatenate([base.astype(np.uint8), gap, blend(label), gap, blend(pred)], axis=1)
    buf = io.BytesIO()
    Image.fromarray(panel).save(buf, format="PNG")
    return buf.getvalue()


def save_overlays(
    folder: Path, kept: Sequence[tuple[SegSample, np.ndarray, np.ndarray, np.ndarray]]
) -> list[str]:
    """Write <folder>/<image_id>.png for each kept image; returns the file names."""
    names = []
    for sample, image, label, pred in kept:
        name = f"{sample.image_id}.png"
        atomic_write_bytes(Path(folder) / name, overlay_png(image, label, pred))
        names.append(name)
    return names
