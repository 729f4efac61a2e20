"""FCN evaluation: whole-image predictions, the accumulated confusion matrix, overlays."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from benchmark import distributed
from benchmark.datasets.voc import IGNORE_INDEX, VOC_PALETTE, SegSample, id_problem
from benchmark.distributed import DistEnv
from benchmark.errors import DatasetError
from benchmark.input_convention import InputConvention
from benchmark.loop import Precision
from benchmark.metrics import confusion_matrix, segmentation_scores
from benchmark.runs import atomic_write_bytes

from .data import load_pair, to_input

NUM_CLASSES = 21
OVERLAY_DIR = "overlays"


@torch.no_grad()
def predict(
    model: nn.Module,
    image: np.ndarray,
    out_size: tuple[int, int],
    device: torch.device,
    convention: InputConvention,
) -> np.ndarray:
    """Arg-max class map (H, W) uint8 at `out_size` (the label's resolution); the image fed
    in the encoder's input `convention`."""
    scores = model(to_input(image, device, convention), out_size=out_size)
    return scores.argmax(1)[0].to(torch.uint8).cpu().numpy()


def evaluate(
    model: nn.Module,
    samples: Sequence[SegSample],
    max_size: int | None,
    env: DistEnv,
    keep: int = 0,
    precision: Precision | None = None,
    *,
    convention: InputConvention,
) -> tuple[np.ndarray, list[tuple[SegSample, np.ndarray, np.ndarray, np.ndarray]]]:
    """Accumulated (21, 21) confusion matrix over `samples`, and (sample, image, label,
    prediction) of the first `keep` images for overlays; images fed in the encoder's input
    `convention`. Images are shared out over torchrun processes (rank r takes r, r + world,
    ...) and the matrices summed."""
    model.eval()
    hist = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    kept = []
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    mine = range(env.rank, len(samples), env.world_size)
    bar = dict(desc="evaluate", unit="img", disable=None if env.is_main else True, leave=False)
    for n in tqdm(mine, **bar):
        sample = samples[n]
        image, label = load_pair(sample, max_size)
        with autocast():
            pred = predict(model, image, label.shape, env.device, convention)
        hist += confusion_matrix(pred, label, NUM_CLASSES, ignore_index=IGNORE_INDEX)
        if n < keep:
            kept.append((sample, image, label, pred))
    hist = distributed.all_reduce_sum(torch.from_numpy(hist).to(env.device)).cpu().numpy()
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
        bad = id_problem(sample.image_id)
        if bad:  # the split readers refuse such ids; an id never becomes a path outside
            raise DatasetError(f"overlay for image id {bad}")
        name = f"{sample.image_id}.png"
        atomic_write_bytes(Path(folder) / name, overlay_png(image, label, pred))
        names.append(name)
    return names
