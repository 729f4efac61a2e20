"""The benchmark's metrics as pure functions on numpy arrays.

Every number in Table 1 and Table 2 comes from here, so each function follows one published
reference exactly and says which:

- classification: scikit-learn average precision per class, difficult images excluded
  (the Krähenbühl et al. fine-tuning protocol's evaluation), or the devkit's VOCevalcls;
- detection: the PASCAL VOC2007 devkit (`VOCevaldet.m`), 11-point interpolated AP at IoU 0.5;
- segmentation: FCN's `score.py` (confusion matrix, pixel/mean accuracy, mean IU, fwIU);
- inpainting: the public PyTorch context-encoder port's `test.py` / `psnr.py`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from sklearn.metrics import average_precision_score

# ---------------------------------------------------------------------------------------------
# Classification (VOC2007, multi-label)
# ---------------------------------------------------------------------------------------------


def classification_ap(
    scores: np.ndarray,
    labels: np.ndarray,
    difficult: np.ndarray | None = None,
    method: str = "sklearn",
) -> tuple[np.ndarray, float]:
    """Per-class average precision and its mean (mAP).

    scores: (N, C) real-valued, higher = more confident. labels: (N, C) in {0, 1}.
    difficult: (N, C) bool; an image marked difficult for class c (it holds only difficult
    objects of c) is left out of class c's AP entirely, as the VOC protocol does.
    method "sklearn": scikit-learn's average_precision_score on `scores - 1e-5 * labels`, the
    tie-break against positives of philkr/voc-classification@c209779 train_cls.py L151-157
    (Krähenbühl et al.'s protocol, which the paper's classification column follows);
    "voc07": the VOC2007 devkit's VOCevalcls, 11-point interpolated (`voc07_cls_ap`).

    Returns (per_class (C,), mean). A class with no positive image left after exclusion has no
    defined AP: its entry is NaN and it is excluded from the mean (NaN if no class has any).
    """
    if method not in ("sklearn", "voc07"):
        raise ValueError(f"classification AP method {method!r} is not sklearn or voc07")
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be (N, C)")
    if difficult is None:
        difficult = np.zeros(labels.shape, dtype=bool)
    difficult = np.asarray(difficult, dtype=bool)
    if difficult.shape != labels.shape:
        raise ValueError(f"difficult {difficult.shape} must match labels {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (mark difficult images with `difficult`)")
    per_class = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        keep = ~difficult[:, c]
        y = labels[keep, c]
        if y.sum() == 0:
            continue
        if method == "voc07":
            per_class[c] = voc07_cls_ap(scores[keep, c], y)
        else:
            per_class[c] = average_precision_score(y, scores[keep, c] - 1e-5 * y)
    return per_class, mean_ap(per_class)


def voc07_cls_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """The VOC2007 devkit's VOCevalcls for one class: images sorted by decreasing score
    (MATLAB's stable `sort(-out)`), cumulative precision and recall, 11-point interpolated
    AP (`voc07_ap`). labels (N,) in {0, 1}; difficult images already removed."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    y = np.asarray(labels)[order] > 0
    tp, fp = np.cumsum(y), np.cumsum(~y)
    return voc07_ap(tp / max(int(y.sum()), 1), tp / np.maximum(tp + fp, 1))


def mean_ap(per_class: np.ndarray | Sequence[float]) -> float:
    """Mean over the classes whose AP is defined (not NaN); NaN when none is."""
    values = np.asarray(per_class, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


# ---------------------------------------------------------------------------------------------
# Detection (VOC2007 devkit)
# ---------------------------------------------------------------------------------------------

# The devkit's recall thresholds `0:0.1:1`. Written as np.arange like the Python transcriptions
# (py-faster-rcnn's voc_eval.py, detectron2's PascalVOCDetectionEvaluator) so that our numbers
# equal theirs to the last bit; e.g. the 4th threshold is 0.30000000000000004.
VOC07_RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point interpolated AP.

    recall, precision: (D,) cumulative values over detections sorted by score. For each
    t in 0, 0.1, ..., 1 take the highest precision at any recall >= t (0 when recall never
    reaches t) and average the 11 values.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    reached = recall[None, :] >= VOC07_RECALL_THRESHOLDS[:, None]  # (11, D)
    best = np.where(reached, precision[None, :], -np.inf).max(axis=1, initial=-np.inf)
    return float(np.where(np.isfinite(best), best, 0.0).sum() / 11.0)


def voc_ap_area(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ AP: area under the monotone (interpolated) precision-recall curve.

    Uses every recall point rather than 11, so it is less coarse than `voc07_ap`.
    """
    mrec = np.concatenate(([0.0], np.asarray(recall, dtype=np.float64), [1.0]))
    mpre = np.concatenate(([0.0], np.asarray(precision, dtype=np.float64), [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope from the right
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def box_iou_voc(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of (D, 4) boxes against (G, 4) boxes, x1 y1 x2 y2 in inclusive pixel coordinates.

    The devkit counts pixels, so a box from x1 to x2 is x2 - x1 + 1 wide; the same +1 applies
    to the intersection. Returns (D, G).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(boxes[:, None, 2], gt[None, :, 2]) - np.maximum(
        boxes[:, None, 0], gt[None, :, 0]
    )
    ih = np.minimum(boxes[:, None, 3], gt[None, :, 3]) - np.maximum(
        boxes[:, None, 1], gt[None, :, 1]
    )
    iw, ih = iw + 1.0, ih + 1.0
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    area_d = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
    area_g = (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0)
    return inter / (area_d[:, None] + area_g[None, :] - inter)


Detection = tuple[Hashable, float, Sequence[float]]
GroundTruth = tuple[str, Sequence[float], bool]


MatchRule = Literal["devkit", "py-faster-rcnn"]


def _class_tp_fp(
    dets: Sequence[Detection],
    gt_of_class: Mapping[Hashable, tuple[np.ndarray, np.ndarray]],
    iou_threshold: float,
    rule: MatchRule = "devkit",
) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp) flags of one class's detections in score order, difficult matches dropped.

    The devkit's sequential loop, vectorised: each detection goes to its highest-IoU ground
    truth (matched or not, difficult or not); if that IoU reaches the threshold it is a TP
    the first time that box is taken in score order and an FP afterwards, and it is dropped
    (neither) when the box is difficult. Below the threshold it is an FP. Rule "devkit"
    (VOCevaldet.m): a stable sort, ties in input order, and `ovmax >= threshold`; rule
    "py-faster-rcnn" (its voc_eval.py, which detectron2's PascalVOCDetectionEvaluator runs,
    facebookresearch/detectron2@02b5c4e:detectron2/evaluation/pascal_voc_evaluation.py
    L245, L281): numpy's default argsort and `ovmax > threshold`.
    """
    if not dets:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    scores = np.array([float(d[1]) for d in dets])
    if rule == "devkit":
        order = np.argsort(-scores, kind="stable")  # ties keep input order
    else:
        order = np.argsort(-scores)  # voc_eval.py: np.argsort(-confidence), quicksort
    n = len(dets)
    ovmax = np.full(n, -np.inf)
    jmax = np.full(n, -1, dtype=np.int64)
    gt_index = np.full(n, -1, dtype=np.int64)  # which image's gt list, for the (image, box) key
    difficult_hit = np.zeros(n, dtype=bool)
    by_image: dict[Hashable, list[int]] = {}
    for rank, i in enumerate(order):
        by_image.setdefault(dets[i][0], []).append(rank)
    image_ids = {img: k for k, img in enumerate(gt_of_class)}
    for img, ranks in by_image.items():
        if img not in gt_of_class:
            continue  # no object of this class in the image: every detection is an FP
        gboxes, gdiff = gt_of_class[img]
        idx = np.asarray(ranks)
        boxes = np.array([dets[order[r]][2] for r in ranks], dtype=np.float64)
        iou = box_iou_voc(boxes, gboxes)
        j = iou.argmax(axis=1)  # first maximum, like the devkit's strict `>` scan
        ovmax[idx] = iou[np.arange(len(idx)), j]
        jmax[idx] = j
        gt_index[idx] = image_ids[img]
        difficult_hit[idx] = gdiff[j]
    # VOCevaldet.m: `ovmax >= minoverlap`; voc_eval.py: `ovmax > ovthresh`
    matched = ovmax >= iou_threshold if rule == "devkit" else ovmax > iou_threshold
    counted = ~(matched & difficult_hit)
    tp = np.zeros(n, dtype=bool)
    cand = np.flatnonzero(matched & ~difficult_hit)
    if cand.size:
        keys = gt_index[cand] * (1 << 32) + jmax[cand]
        _, first = np.unique(keys, return_index=True)  # earliest rank taking each box
        tp[cand[first]] = True
    fp = ~tp
    return tp[counted], fp[counted]


def voc_detection_eval(
    detections: Mapping[str, Sequence[Detection]],
    ground_truth: Mapping[Hashable, Sequence[GroundTruth]],
    classes: Sequence[str],
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
    rule: MatchRule = "devkit",
) -> dict[str, float]:
    """Per-class detection AP with the PASCAL VOC devkit's rules (or, with rule
    "py-faster-rcnn", its Python transcription's: see `_class_tp_fp`).

    detections: {class: [(image_id, score, (x1, y1, x2, y2)), ...]}.
    ground_truth: {image_id: [(class, (x1, y1, x2, y2), difficult), ...]}, every test image
    (an image without objects maps to []).
    Rules (VOCevaldet.m): detections in descending score order (ties in input order); IoU with
    +1 pixel areas; a detection is a TP when its best-overlapping box (IoU >= threshold) is a
    not-yet-matched non-difficult box, ignored (neither TP nor FP) when that box is difficult,
    and an FP otherwise (duplicates included). Recall divides by the number of non-difficult
    boxes. use_07_metric picks the 11-point AP (`voc07_ap`), else the area (`voc_ap_area`).

    Returns {class: ap}. A class with no non-difficult box has no defined AP: NaN, left out of
    `mean_ap` (the devkit would divide by zero there). A detection on an image that is not in
    `ground_truth` is a ValueError, as the devkit's `error('unrecognized image ...')`, never a
    silent false positive.
    """
    for cls, dets in detections.items():
        for det in dets:
            if det[0] not in ground_truth:  # VOCevaldet.m: error('unrecognized image ...')
                raise ValueError(
                    f"unrecognized image {det[0]!r} (class {cls}): not in the test list"
                )
    ap_fn = voc07_ap if use_07_metric else voc_ap_area
    out: dict[str, float] = {}
    for cls in classes:
        gt_of_class: dict[Hashable, tuple[np.ndarray, np.ndarray]] = {}
        npos = 0
        for img, objects in ground_truth.items():
            objs = [o for o in objects if o[0] == cls]
            if not objs:
                continue
            boxes = np.array([o[1] for o in objs], dtype=np.float64).reshape(-1, 4)
            diff = np.array([bool(o[2]) for o in objs], dtype=bool)
            gt_of_class[img] = (boxes, diff)
            npos += int((~diff).sum())
        if npos == 0:
            out[cls] = float("nan")
            continue
        tp, fp = _class_tp_fp(list(detections.get(cls, ())), gt_of_class, iou_threshold, rule)
        tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
        recall = tp_c / npos
        precision = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
        out[cls] = ap_fn(recall, precision)
    return out


# ---------------------------------------------------------------------------------------------
# Segmentation (FCN score.py)
# ---------------------------------------------------------------------------------------------


def confusion_matrix(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """(num_classes, num_classes) int64 pixel counts, rows = ground truth, columns = prediction.

    pred, target: integer label maps of any equal shape. Pixels whose target is ignore_index
    (or outside [0, num_classes)) are skipped. Matrices of several images add up, so
    accumulate with `+=` and score once at the end, as FCN does.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    p = pred[keep].astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predicted labels must lie in [0, {num_classes})")
    t = target[keep].astype(np.int64)
    counts = np.bincount(num_classes * t + p, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def segmentation_scores(hist: np.ndarray) -> dict[str, Any]:
    """Pixel accuracy, mean accuracy, mean IU, frequency-weighted IU, per-class IU.

    hist: (n, n) confusion matrix, rows = ground truth. Definitions of FCN's score.py:
    IU_c = hist[c, c] / (row_c + col_c - hist[c, c]); means are nanmeans over classes, so a
    class absent from both ground truth and predictions (0/0) is left out, while a class that
    is predicted but never present counts with IU 0.
    """
    hist = np.asarray(hist, dtype=np.float64)
    diag = np.diag(hist)
    rows, cols, total = hist.sum(axis=1), hist.sum(axis=0), hist.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        pixel_acc = diag.sum() / total if total else float("nan")
        acc_cls = diag / rows
        iu = diag / (rows + cols - diag)
        freq = rows / total if total else np.zeros_like(rows)
    present = freq > 0
    return {
        "pixel_acc": float(pixel_acc),
        "mean_acc": _nanmean(acc_cls),
        "mean_iu": _nanmean(iu),
        "fw_iu": float((freq[present] * iu[present]).sum()),
        "per_class_iu": iu,
    }


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


# ---------------------------------------------------------------------------------------------
# Inpainting (Table 1)
# ---------------------------------------------------------------------------------------------

# psnr.py of the PyTorch port returns 100 dB for a perfect reconstruction instead of infinity.
PSNR_IDENTICAL = 100.0


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 255.0) -> float:
    """PSNR in dB of one image pair on a 0..data_range scale: 20 log10(range / sqrt(mse)).

    Identical images give PSNR_IDENTICAL (100 dB), as the reference port does.
    """
    diff = np.asarray(pred, dtype=np.float64) - np.asarray(target, dtype=np.float64)
    mse = float(np.mean(diff**2))
    if mse == 0.0:
        return PSNR_IDENTICAL
    return float(20.0 * np.log10(data_range / np.sqrt(mse)))


def inpainting_errors(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Table 1's per-image errors of predicted patches.

    pred, target: (N, ...) patches (e.g. (N, 3, 64, 64)), pixels in [-1, 1]. With d = pred -
    target: l1 = mean |d| and l2 = mean d^2 over each image's patch on the [-1, 1] scale (the
    paper reports them in percent); psnr is computed per image after mapping both to 0..255
    with (x + 1) * 127.5. Average each array over images for the table (`mean_inpainting_errors`).
    Returns {"l1": (N,), "l2": (N,), "psnr": (N,)}.
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim < 2:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must be equal (N, ...)")
    d = (pred - target).reshape(len(pred), -1)
    mse_255 = np.mean((d * 127.5) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        p = np.where(mse_255 > 0, 20.0 * np.log10(255.0 / np.sqrt(mse_255)), PSNR_IDENTICAL)
    return {"l1": np.abs(d).mean(axis=1), "l2": (d**2).mean(axis=1), "psnr": p}


def mean_inpainting_errors(errors: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Averages over images of `inpainting_errors`: the keys metrics.json uses."""
    return {
        "mean_l1": float(np.mean(errors["l1"])),
        "mean_l2": float(np.mean(errors["l2"])),
        "psnr": float(np.mean(errors["psnr"])),
        "images": int(len(errors["l1"])),
    }
