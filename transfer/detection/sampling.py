"""Fast R-CNN's RoI geometry: overlaps, box-regression targets and minibatch sampling.

Boxes are 0-based inclusive pixel coordinates (x1, y1, x2, y2), so a box is
x2 - x1 + 1 pixels wide, as in Fast R-CNN and the VOC devkit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) -> (N, M) IoU with +1 pixel areas."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, 1e-12)


# Fast R-CNN's cfg.EPS: box widths are x2 - x1 + EPS in its regression targets and decoding
# (rbgirshick/fast-rcnn@e107cae lib/roi_data_layer/roidb.py _compute_targets,
# lib/fast_rcnn/test.py _bbox_pred), not the +1 of its overlaps or of py-faster-rcnn.
EPS = 1e-14


def encode_boxes(rois: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Regression targets (dx, dy, dw, dh) that move each RoI onto its gt box, as Fast R-CNN's
    `_compute_targets`: widths x2 - x1 + EPS, centres x1 + w / 2."""
    rois = rois.astype(np.float64)
    gt = gt.astype(np.float64)
    rw = rois[:, 2] - rois[:, 0] + EPS
    rh = rois[:, 3] - rois[:, 1] + EPS
    gw = gt[:, 2] - gt[:, 0] + EPS
    gh = gt[:, 3] - gt[:, 1] + EPS
    return np.stack(
        [
            (gt[:, 0] + 0.5 * gw - rois[:, 0] - 0.5 * rw) / rw,
            (gt[:, 1] + 0.5 * gh - rois[:, 1] - 0.5 * rh) / rh,
            np.log(gw / rw),
            np.log(gh / rh),
        ],
        axis=1,
    ).astype(np.float32)


def decode_boxes(rois: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Inverse of `encode_boxes`, as Fast R-CNN's test-time `_bbox_pred`; deltas (R, 4k) give
    (R, 4k) boxes (one box per class). An overflowing width gives an infinite box, which
    `clip_boxes` brings back to the image, as in the reference."""
    rois = rois.astype(np.float64)
    w = rois[:, 2] - rois[:, 0] + EPS
    h = rois[:, 3] - rois[:, 1] + EPS
    cx = rois[:, 0] + 0.5 * w
    cy = rois[:, 1] + 0.5 * h
    dx, dy, dw, dh = (deltas[:, i::4].astype(np.float64) for i in range(4))
    with np.errstate(over="ignore"):
        pw = np.exp(dw) * w[:, None]
        ph = np.exp(dh) * h[:, None]
    pcx = dx * w[:, None] + cx[:, None]
    pcy = dy * h[:, None] + cy[:, None]
    out = np.zeros(deltas.shape, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out[:, 0::4] = pcx - 0.5 * pw
        out[:, 1::4] = pcy - 0.5 * ph
        out[:, 2::4] = pcx + 0.5 * pw
        out[:, 3::4] = pcy + 0.5 * ph
    return out


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    boxes[:, 0::4] = np.clip(boxes[:, 0::4], 0, width - 1)
    boxes[:, 1::4] = np.clip(boxes[:, 1::4], 0, height - 1)
    boxes[:, 2::4] = np.clip(boxes[:, 2::4], 0, width - 1)
    boxes[:, 3::4] = np.clip(boxes[:, 3::4], 0, height - 1)
    return boxes


@dataclass
class RoiLabels:
    """Every candidate RoI of one image (proposals plus gt boxes) with its best gt match."""

    boxes: np.ndarray  # (R, 4) float32
    max_overlap: np.ndarray  # (R,) IoU with the best-matching gt box
    labels: np.ndarray  # (R,) class index 1..C of that gt box, 0 when no overlap
    targets: np.ndarray  # (R, 4) raw (unnormalised) regression targets, zero for non-fg


def label_rois(
    proposals: np.ndarray, gt_boxes: np.ndarray, gt_classes: np.ndarray, bbox_thresh: float = 0.5
) -> RoiLabels:
    """Fast R-CNN's roidb: gt boxes are added to the proposals, each RoI takes its best gt."""
    boxes = np.concatenate([gt_boxes.reshape(-1, 4), proposals.reshape(-1, 4)]).astype(np.float32)
    n = len(boxes)
    if len(gt_boxes) == 0:
        z = np.zeros(n)
        return RoiLabels(boxes, z, z.astype(np.int64), np.zeros((n, 4), np.float32))
    iou = box_iou(boxes, gt_boxes)
    best = iou.argmax(axis=1)
    max_overlap = iou[np.arange(n), best]
    labels = np.where(max_overlap > 0, gt_classes[best], 0).astype(np.int64)
    targets = np.zeros((n, 4), np.float32)
    reg = max_overlap >= bbox_thresh
    if reg.any():
        targets[reg] = encode_boxes(boxes[reg], gt_boxes[best[reg]])
    return RoiLabels(boxes, max_overlap, labels, targets)


def sample_rois(
    rois: RoiLabels,
    rois_per_image: int,
    fg_fraction: float,
    fg_thresh: float,
    bg_thresh_hi: float,
    bg_thresh_lo: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Indices of one image's minibatch RoIs: up to fg_fraction foreground (IoU >= fg_thresh),
    the rest background (IoU in [bg_thresh_lo, bg_thresh_hi)), without replacement."""
    fg = np.flatnonzero(rois.max_overlap >= fg_thresh)
    n_fg = min(int(round(fg_fraction * rois_per_image)), len(fg))
    if n_fg < len(fg):
        fg = rng.choice(fg, size=n_fg, replace=False)
    bg = np.flatnonzero((rois.max_overlap < bg_thresh_hi) & (rois.max_overlap >= bg_thresh_lo))
    n_bg = min(rois_per_image - n_fg, len(bg))
    if n_bg < len(bg):
        bg = rng.choice(bg, size=n_bg, replace=False)
    return np.concatenate([fg, bg]).astype(np.int64)


def target_stats(
    all_rois: list[RoiLabels], num_classes: int, bbox_thresh: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means and stds (C+1, 4) of the regression targets over the training set, as
    Fast R-CNN's add_bbox_regression_targets computes them (bbox_normalize = "data")."""
    counts = np.full((num_classes + 1, 1), 1e-14)
    sums = np.zeros((num_classes + 1, 4))
    sq = np.zeros((num_classes + 1, 4))
    for r in all_rois:
        reg = r.max_overlap >= bbox_thresh
        for c in np.unique(r.labels[reg]):
            if c == 0:
                continue
            sel = reg & (r.labels == c)
            counts[c] += sel.sum()
            sums[c] += r.targets[sel].sum(axis=0)
            sq[c] += (r.targets[sel].astype(np.float64) ** 2).sum(axis=0)
    means = sums / counts
    stds = np.sqrt(np.maximum(sq / counts - means**2, 0.0))
    stds[stds < 1e-6] = 1.0  # a class never seen keeps unit scale
    means[0], stds[0] = 0.0, 1.0
    return means.astype(np.float32), stds.astype(np.float32)
