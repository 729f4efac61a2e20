"""Fast R-CNN at test time: per-image scores and regressed boxes, NMS, the detections of a set."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from benchmark import distributed
from benchmark.datasets.voc import VOC_CLASSES
from benchmark.distributed import DistEnv
from benchmark.loop import Precision
from transfer.detection.config import DetectionConfig
from transfer.detection.data import DetRecord, TestSet, collate_one
from transfer.detection.evaluate import Detections
from transfer.detection.model import FastRCNN
from transfer.detection.sampling import clip_boxes, decode_boxes


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
    probs = torch.softmax(scores.float(), 1).cpu().numpy()
    k = model.num_classes
    d = (deltas.float().view(-1, k, 4) * model.bbox_stds + model.bbox_means).view(-1, 4 * k)
    boxes = clip_boxes(decode_boxes(proposals, d.cpu().numpy().astype(np.float64)), height, width)
    return probs, boxes


def detect(
    model: FastRCNN,
    records: Sequence[DetRecord],
    cfg: DetectionConfig,
    env: DistEnv,
    classes: Sequence[str] = VOC_CLASSES,
    precision: Precision | None = None,
) -> Detections:
    """Detections of every test image in devkit (1-based) coordinates. Images are shared
    out over torchrun processes (rank r takes r, r + world, ...) and gathered on all."""
    model.eval()
    mine = list(range(env.rank, len(records), env.world_size))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(TestSet(records, cfg.test_scale, cfg.test_max_size), mine),
        batch_size=1,
        collate_fn=collate_one,
        num_workers=cfg.train.workers,
    )
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    found: list[tuple[str, str, float, tuple[float, float, float, float]]] = []
    bar = dict(desc="detect", unit="img", disable=None if env.is_main else True, leave=False)
    for item in tqdm(loader, **bar):
        rec = records[item["index"]]
        if len(item["proposals"]) == 0:
            continue
        with autocast():
            probs, boxes = im_detect(
                model,
                item["image"],
                item["proposals"],
                item["scale"],
                rec.height,
                rec.width,
                env.device,
            )
        per_class = postprocess(probs, boxes, cfg.score_thresh, cfg.nms, cfg.max_per_image)
        for cls, dets in zip(classes, per_class):
            for x1, y1, x2, y2, s in dets:
                box = (float(x1) + 1, float(y1) + 1, float(x2) + 1, float(y2) + 1)
                found.append((cls, rec.image_id, float(s), box))
    out: Detections = {c: [] for c in classes}
    for part in distributed.gather_objects(found):
        for cls, image_id, score, box in part:
            out[cls].append((image_id, score, box))
    return out
