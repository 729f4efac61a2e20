"""Fast R-CNN at test time: per-image scores and regressed boxes, NMS, the detections of a set.

Two post-processings of rbgirshick/fast-rcnn's `lib/fast_rcnn/test.py` `test_net`
(`test_postprocess`):

- "master" (the default; the branch the paper's Fast R-CNN results come from, b612190):
  no score threshold; per class and image the top `max_per_image` (100) scores; a running
  per-class threshold that keeps about `max_per_set` (40) x N_images boxes per class over the
  whole test set, applied again at the end; then NMS 0.3 per class and image (`RunningCap`,
  `master_finish`).
- "coco" (the `coco` branch, e107cae, that added COCO): per image, scores above 0.05, NMS
  per class, then the best 100 detections over all classes (`coco_postprocess`).
"""

from __future__ import annotations

import contextlib
import heapq
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
    """Greedy NMS on (N, 5) [x1, y1, x2, y2, score] with +1 pixel areas, as the Cython nms
    `test.py` imports (lib/utils/nms.pyx): a box overlapping a kept one by IoU >= thresh is
    suppressed."""
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
        order = order[1:][iou < thresh]  # nms.pyx: `if ovr >= thresh: suppressed[j] = 1`
    return np.array(keep, dtype=np.int64)


def _class_dets(scores: np.ndarray, boxes: np.ndarray, j: int, inds: np.ndarray) -> np.ndarray:
    """(len(inds), 5) float32 [x1, y1, x2, y2, score] of class j for the given RoIs."""
    dets = np.hstack([boxes[inds, 4 * j : 4 * j + 4], scores[inds, j : j + 1]])
    return dets.astype(np.float32, copy=False)


def coco_postprocess(
    scores: np.ndarray,
    boxes: np.ndarray,
    score_thresh: float,
    nms_thresh: float,
    max_per_image: int,
) -> list[np.ndarray]:
    """The `coco` branch's test_net for one image (fast-rcnn@e107cae lib/fast_rcnn/test.py
    test_net L247-300): per class j >= 1, scores above `score_thresh` (0.05), NMS, then the
    best `max_per_image` (100) over all classes (0: no cap). Returns (N_j, 5) per class j-1."""
    out = []
    for j in range(1, scores.shape[1]):
        dets = _class_dets(scores, boxes, j, np.flatnonzero(scores[:, j] > score_thresh))
        out.append(dets[nms(dets, nms_thresh)] if len(dets) else dets.reshape(0, 5))
    if max_per_image > 0:
        all_scores = np.concatenate([d[:, 4] for d in out])
        if len(all_scores) > max_per_image:
            cut = np.sort(all_scores)[-max_per_image]
            out = [d[d[:, 4] >= cut] for d in out]
    return out


class RunningCap:
    """Fast R-CNN master's test-time caps, image by image (rbgirshick/fast-rcnn@b612190
    lib/fast_rcnn/test.py test_net L248-324).

    Per class j >= 1 a threshold thresh[j], first -inf, and a min-heap of kept scores. For
    each image, in test-set order: the RoIs scoring above thresh[j]; of those the top
    `max_per_image` by score (L283-290); each of their scores pushed on the class's heap;
    once the heap holds more than `max_per_set` x N_images, its smallest are popped down to
    that many and thresh[j] becomes the heap's minimum (L291-299); the image's boxes are
    stored. Boxes stored while the threshold was lower are cut at the end (`master_finish`).
    Ties at the `max_per_image` cut keep the lower RoI index (test.py's np.argsort does not
    say which).
    """

    def __init__(
        self, num_classes: int, num_images: int, max_per_image: int = 100, max_per_set: int = 40
    ) -> None:
        self.max_per_image = max_per_image
        self.limit = max_per_set * num_images  # L253: max_per_set = 40 * num_images
        self.thresh = np.full(num_classes, -np.inf)  # indexed by class, 0 = background
        self.heaps: list[list[float]] = [[] for _ in range(num_classes)]

    def add(self, scores: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
        """One image: scores (R, K) and boxes (R, 4K) -> its stored (N_j, 5) per class j-1,
        best first."""
        out = []
        for j in range(1, scores.shape[1]):
            inds = np.flatnonzero(scores[:, j] > self.thresh[j])
            top = inds[np.argsort(-scores[inds, j], kind="stable")[: self.max_per_image]]
            heap = self.heaps[j]
            for value in scores[top, j].tolist():
                heapq.heappush(heap, value)
            if len(heap) > self.limit:
                while len(heap) > self.limit:
                    heapq.heappop(heap)
                self.thresh[j] = heap[0]
            out.append(_class_dets(scores, boxes, j, top))
        return out


def merged_thresholds(caps: Sequence[np.ndarray], stored: Sequence[list[np.ndarray]],
                      limit: int) -> np.ndarray:  # fmt: skip
    """The final per-class thresholds of one `RunningCap` run over the whole test set, from
    processes that each ran one over their share of the images (`caps`: their thresholds;
    `stored`: every image's stored boxes, all processes together; `limit`: max_per_set x
    N_images). The threshold the whole set ends with is the `limit`-th largest of every
    image's top-`max_per_image` scores, once more than `limit` were pushed; a process drops
    only scores at or below its own threshold, which is at most that, so the value is the
    larger of the processes' thresholds and the `limit`-th largest stored score (for one
    process, its own threshold)."""
    thresh = np.max(np.stack(caps), axis=0)
    for j in range(1, len(thresh)):
        kept = [image[j - 1][:, 4] for image in stored]
        values = np.concatenate(kept) if kept else np.empty(0, np.float32)
        if len(values) > limit:
            kth = np.partition(values, len(values) - limit)[len(values) - limit]
            thresh[j] = max(thresh[j], float(kth))
    return thresh


def master_finish(
    stored: Sequence[list[np.ndarray]], thresh: np.ndarray, nms_thresh: float
) -> list[list[np.ndarray]]:
    """After the last image: per class and image, the stored boxes scoring strictly above
    the class's final threshold (test.py L314-317), then NMS per class and image (apply_nms,
    L229-246, at L324 with TEST.NMS 0.3). stored[i][j-1] -> the same layout."""
    out = []
    for image in stored:
        per_class = []
        for j, dets in enumerate(image, start=1):
            dets = dets[dets[:, 4] > thresh[j]]
            per_class.append(dets[nms(dets, nms_thresh)] if len(dets) else dets.reshape(0, 5))
        out.append(per_class)
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
    """Detections of every test image in devkit (1-based) coordinates, post-processed as
    `cfg.test_postprocess` says. Images are shared out over torchrun processes (rank r takes
    r, r + world, ...) and gathered on all; master's running caps are merged exactly
    (`merged_thresholds`)."""
    model.eval()
    mine = list(range(env.rank, len(records), env.world_size))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(
            TestSet(records, cfg.test_scale, cfg.test_max_size, model.convention), mine
        ),
        batch_size=1,
        collate_fn=collate_one,
        num_workers=cfg.train.workers,
    )
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    master = cfg.test_postprocess == "master"
    cap = RunningCap(len(classes) + 1, len(records), cfg.max_per_image, cfg.max_per_set)
    stored: list[tuple[int, list[np.ndarray]]] = []  # master: (image index, per class)
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
        if master:
            stored.append((item["index"], cap.add(probs, boxes)))
        else:
            per_class = coco_postprocess(
                probs, boxes, cfg.score_thresh, cfg.nms, cfg.max_per_image
            )
            found += _devkit(classes, rec.image_id, per_class)
    if master:
        parts = distributed.gather_objects((cap.thresh, stored))
        images = sorted((pair for _, part in parts for pair in part), key=lambda p: p[0])
        thresh = merged_thresholds([t for t, _ in parts], [d for _, d in images], cap.limit)
        kept = master_finish([d for _, d in images], thresh, cfg.nms)
        found = [f for (i, _), dets in zip(images, kept)
                 for f in _devkit(classes, records[i].image_id, dets)]  # fmt: skip
        parts_found = [found]
    else:
        parts_found = distributed.gather_objects(found)
    out: Detections = {c: [] for c in classes}
    for part in parts_found:
        for cls, image_id, score, box in part:
            out[cls].append((image_id, score, box))
    return out


def _devkit(classes: Sequence[str], image_id: str, per_class: list[np.ndarray]) -> list[tuple]:
    """(class, image, score, 1-based box) of one image's (N_j, 5) detections per class."""
    out = []
    for cls, dets in zip(classes, per_class):
        for x1, y1, x2, y2, s in dets:
            out.append((cls, image_id, float(s), (float(x1) + 1, float(y1) + 1,
                                                   float(x2) + 1, float(y2) + 1)))  # fmt: skip
    return out
