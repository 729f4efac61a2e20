"""Fast R-CNN training loop (SGD, step schedule, checkpoints) and test-time detection."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from benchmark.config import to_dict
from benchmark.datasets.voc import VOC_CLASSES
from benchmark.errors import BenchError
from benchmark.runs import Run
from transfer.detection.config import DetectionConfig
from transfer.detection.data import DetRecord, TestSet, collate_one
from transfer.detection.evaluate import Detections
from transfer.detection.model import FastRCNN, fast_rcnn_loss, param_groups
from transfer.detection.sampling import clip_boxes, decode_boxes


def lr_at(cfg: DetectionConfig, iteration: int) -> float:
    """Step schedule: lr x gamma at each of lr_steps (Caffe's "multistep")."""
    return cfg.lr * cfg.gamma ** sum(iteration >= s for s in cfg.lr_steps)


def make_optimizer(model: nn.Module, cfg: DetectionConfig) -> torch.optim.SGD:
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.bias_lr_mult)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def train(
    model: FastRCNN,
    batches: Iterator[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    cfg: DetectionConfig,
    run: Run,
    device: torch.device,
    start: int = 0,
) -> dict[str, float]:
    """Iterations start..cfg.iterations; checkpoints every cfg.checkpoint_every and at the end.

    Stops with a BenchError on a non-finite loss instead of training on NaNs.
    """
    model.train()
    sums = {"loss_cls": 0.0, "loss_box": 0.0, "fg_acc": 0.0, "acc": 0.0}
    n, t0, last = 0, time.time(), {}
    bar = tqdm(
        range(start, cfg.iterations),
        desc="fast r-cnn",
        unit="it",
        disable=None,
        initial=start,
        total=cfg.iterations,
    )
    for it in bar:
        batch = next(batches)
        lr = lr_at(cfg, it)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        torch.manual_seed(cfg.seed * 1_000_003 + it)  # dropout masks reproducible on resume
        scores, deltas = model(batch["images"].to(device), batch["rois"].to(device))
        labels, targets = batch["labels"].to(device), batch["targets"].to(device)
        loss_cls, loss_box = fast_rcnn_loss(scores, deltas, labels, targets)
        loss = loss_cls + loss_box
        if not torch.isfinite(loss):
            raise BenchError(
                f"training diverged: loss is {loss.item()} at iteration {it} (lower lr, "
                f"now {cfg.lr})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            pred = scores.argmax(1)
            fg = labels > 0
            sums["loss_cls"] += loss_cls.item()
            sums["loss_box"] += loss_box.item()
            sums["acc"] += (pred == labels).float().mean().item()
            sums["fg_acc"] += (pred[fg] == labels[fg]).float().mean().item() if fg.any() else 0.0
        n += 1
        done = it + 1
        if done % cfg.log_every == 0 or done == cfg.iterations:
            last = {k: v / n for k, v in sums.items()}
            last["lr"] = lr
            run.log_scalars(done, last, prefix="train/")
            bar.set_postfix(loss=f"{last['loss_cls'] + last['loss_box']:.3f}", lr=f"{lr:g}")
            run.logger.info(
                f"it {done}/{cfg.iterations} loss_cls {last['loss_cls']:.4f} "
                f"loss_box {last['loss_box']:.4f} acc {last['acc']:.3f} lr {lr:g} "
                f"({(time.time() - t0) / n:.2f}s/it)"
            )
            sums = dict.fromkeys(sums, 0.0)
            n, t0 = 0, time.time()
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            save_checkpoint(run, model, optimizer, cfg, done)
    bar.close()
    return last


def save_checkpoint(
    run: Run,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: DetectionConfig,
    iteration: int,
) -> None:
    run.save_checkpoint(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": iteration,
            "config": to_dict(cfg),
        }
    )


def resume(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Iteration to continue from (0 when there is no checkpoint)."""
    state = run.load_checkpoint()
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["iteration"])


def nms(dets: np.ndarray, thresh: float) -> np.ndarray:
    """Greedy NMS on (N, 5) [x1, y1, x2, y2, score] with +1 pixel areas (Fast R-CNN's nms)."""
    x1, y1, x2, y2, s = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = s.argsort(kind="stable")[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.clip(xx2 - xx1 + 1, 0, None) * np.clip(yy2 - yy1 + 1, 0, None)
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= thresh]
    return np.array(keep, dtype=np.int64)


def postprocess(
    scores: np.ndarray,
    boxes: np.ndarray,
    score_thresh: float,
    nms_thresh: float,
    max_per_image: int,
) -> list[np.ndarray]:
    """Fast R-CNN's test_net for one image: per class j >= 1, scores above the threshold,
    NMS, then the best `max_per_image` over all classes. Returns (N_j, 5) per class j-1."""
    out = []
    for j in range(1, scores.shape[1]):
        inds = np.flatnonzero(scores[:, j] > score_thresh)
        dets = np.hstack([boxes[inds, 4 * j : 4 * j + 4], scores[inds, j : j + 1]]).astype(
            np.float32
        )
        out.append(dets[nms(dets, nms_thresh)] if len(dets) else dets.reshape(0, 5))
    if max_per_image > 0:
        all_scores = np.concatenate([d[:, 4] for d in out])
        if len(all_scores) > max_per_image:
            cut = np.sort(all_scores)[-max_per_image]
            out = [d[d[:, 4] >= cut] for d in out]
    return out


@torch.no_grad()
def im_detect(
    model: FastRCNN,
    image: torch.Tensor,
    proposals: np.ndarray,
    scale: float,
    height: int,
    width: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (R, 21) and regressed, clipped boxes (R, 84) for one image."""
    rois = torch.from_numpy(
        np.hstack([np.zeros((len(proposals), 1), np.float32), proposals * scale])
    ).float()
    scores, deltas = model(image[None].to(device), rois.to(device))
    probs = torch.softmax(scores, 1).cpu().numpy()
    k = model.num_classes
    d = (deltas.view(-1, k, 4) * model.bbox_stds + model.bbox_means).view(-1, 4 * k)
    boxes = clip_boxes(decode_boxes(proposals, d.cpu().numpy().astype(np.float64)), height, width)
    return probs, boxes


def detect(
    model: FastRCNN,
    records: Sequence[DetRecord],
    cfg: DetectionConfig,
    device: torch.device,
    classes: Sequence[str] = VOC_CLASSES,
) -> Detections:
    """Detections of every test image in devkit (1-based) coordinates."""
    model.eval()
    loader = torch.utils.data.DataLoader(
        TestSet(records, cfg.test_scale, cfg.test_max_size),
        batch_size=1,
        collate_fn=collate_one,
        num_workers=cfg.workers,
    )
    out: Detections = {c: [] for c in classes}
    for item in tqdm(loader, desc="detect", unit="img", disable=None):
        rec = records[item["index"]]
        if len(item["proposals"]) == 0:
            continue
        probs, boxes = im_detect(
            model, item["image"], item["proposals"], item["scale"], rec.height, rec.width, device
        )
        per_class = postprocess(probs, boxes, cfg.score_thresh, cfg.nms, cfg.max_per_image)
        for cls, dets in zip(classes, per_class):
            for x1, y1, x2, y2, s in dets:
                out[cls].append(
                    (
                        rec.image_id,
                        float(s),
                        (float(x1) + 1, float(y1) + 1, float(x2) + 1, float(y2) + 1),
                    )
                )
    return out


def trainable_summary(model: nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable, "frozen": total - trainable}


def finite_or_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)
