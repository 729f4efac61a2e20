"""Scoring detections: VOC2007 11-point AP (devkit rules), detectron2's VOC AP / AP75
(mean of 11-point APs over IoU 0.50:0.95), COCO AP@[.5:.95] and the VOC results files that
other tools read.

Detections are held as {class: [(image_id, score, (x1, y1, x2, y2))]} in the devkit's
1-based inclusive pixel coordinates (those of the XML files), the input of
`benchmark.metrics.voc_detection_eval`.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.datasets.voc import VOC_CLASSES
from benchmark.errors import BenchError, printable
from benchmark.metrics import voc_detection_eval
from benchmark.runs import atomic_write_text
from transfer.detection.data import DetRecord

Detections = dict[str, list[tuple[str, float, tuple[float, float, float, float]]]]


def ground_truth(records: Sequence[DetRecord]) -> dict[str, list[tuple[str, tuple, bool]]]:
    """{image_id: [(class, 1-based box, difficult)]}, every object including difficult ones."""
    return {
        r.image_id: [
            (VOC_CLASSES[c - 1], tuple(float(v) + 1.0 for v in b), bool(d))
            for b, c, d in zip(r.gt_boxes, r.gt_classes, r.gt_difficult)
        ]
        for r in records
    }


def voc07_scores(
    detections: Detections, records: Sequence[DetRecord], classes: Sequence[str] = VOC_CLASSES
) -> tuple[dict[str, float], float]:
    """Per-class 11-point AP at IoU 0.5 (difficult objects ignored) and their mean.

    A class without any non-difficult object in the test set has no AP (NaN in per_class)
    and is left out of the mean; the real VOC2007 test set has objects of every class.
    """
    try:
        per_class = voc_detection_eval(detections, ground_truth(records), classes, 0.5, True)
    except ValueError as exc:
        raise BenchError(f"detections: {exc}") from None
    valid = [v for v in per_class.values() if not math.isnan(v)]
    return per_class, float(np.mean(valid)) if valid else float("nan")


# detectron2's PascalVOCDetectionEvaluator: IoU thresholds 50, 55, ..., 95 (percent)
D2_IOU_THRESHOLDS = tuple(range(50, 100, 5))


def detectron2_voc_ap(
    detections: Detections, records: Sequence[DetRecord], classes: Sequence[str] = VOC_CLASSES
) -> dict[str, Any]:
    """AP, AP50 and AP75 as detectron2's PascalVOCDetectionEvaluator computes them, the
    numbers MoCo reports for VOC (facebookresearch/detectron2@02b5c4e:detectron2/evaluation/
    pascal_voc_evaluation.py L94-114): for each IoU threshold t/100, t = 50, 55, ..., 95, the
    mean over classes of the 11-point AP (its metric for year 2007) with py-faster-rcnn's
    matching (`rule="py-faster-rcnn"`); AP is the mean of the ten. Detections are rounded
    as its results files hold them (L64-68: score to 3 decimals, corners to 1).

    Fractions in [0, 1] (detectron2 reports percent). A class without a non-difficult
    object has no AP and is left out of each mean (detectron2's np.mean would be NaN).
    """
    rounded = {
        cls: [(img, float(f"{score:.3f}"), tuple(float(f"{v:.1f}") for v in box))
              for img, score, box in dets]
        for cls, dets in detections.items()
    }  # fmt: skip
    gt = ground_truth(records)
    maps: dict[int, float] = {}
    for t in D2_IOU_THRESHOLDS:
        try:
            per_class = voc_detection_eval(rounded, gt, classes, t / 100.0, True,
                                           rule="py-faster-rcnn")  # fmt: skip
        except ValueError as exc:
            raise BenchError(f"detections: {exc}") from None
        valid = [v for v in per_class.values() if not math.isnan(v)]
        maps[t] = float(np.mean(valid)) if valid else float("nan")
    return {
        "ap": float(np.mean(list(maps.values()))),
        "ap50": maps[50],
        "ap75": maps[75],
        "per_threshold": {f"{t / 100:.2f}": v for t, v in maps.items()},
    }


def coco_ap(
    detections: Detections, records: Sequence[DetRecord], classes: Sequence[str] = VOC_CLASSES
) -> float:
    """COCO-style AP averaged over IoU 0.50:0.05:0.95 (pycocotools, 100 detections per image).

    Difficult VOC objects become iscrowd=1 regions, which COCOeval ignores: a detection on
    one is neither a true nor a false positive, the nearest COCO analogue of the devkit rule.
    Boxes go to COCO's continuous (x, y, w, h) with x = xmin - 1, w = xmax - xmin + 1.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    img_ids = {r.image_id: i + 1 for i, r in enumerate(records)}
    cat_ids = {c: k + 1 for k, c in enumerate(classes)}
    anns = []
    for rec in records:
        for b, c, d in zip(rec.gt_boxes, rec.gt_classes, rec.gt_difficult):
            w, h = float(b[2] - b[0] + 1), float(b[3] - b[1] + 1)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_ids[rec.image_id],
                    "category_id": int(c),
                    "bbox": [float(b[0]), float(b[1]), w, h],
                    "area": w * h,
                    "iscrowd": int(bool(d)),
                }
            )
    if not any(a["iscrowd"] == 0 for a in anns):
        return float("nan")
    results = []
    for cls, dets in detections.items():
        for image_id, score, (x1, y1, x2, y2) in dets:
            if image_id in img_ids:
                results.append(
                    {
                        "image_id": img_ids[image_id],
                        "category_id": cat_ids[cls],
                        "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1],
                        "score": float(score),
                    }
                )
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": [
                {"id": i, "width": r.width, "height": r.height}
                for r, i in zip(records, img_ids.values())
            ],
            "categories": [{"id": i, "name": c} for c, i in cat_ids.items()],
            "annotations": anns,
        }
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(max(ev.stats[0], 0.0))  # -1 means "no gt in any class": reported as 0


def write_results_files(
    folder: Path,
    detections: Detections,
    classes: Sequence[str] = VOC_CLASSES,
    prefix: str = "comp4_det_test_",
) -> list[Path]:
    """One `<prefix><class>.txt` per class: `image_id score x1 y1 x2 y2` (1-based), the
    devkit's results format, so the official VOCevaldet (or any VOC tool) can score them."""
    paths = []
    for cls in classes:
        lines = [
            f"{img} {score:.6f} {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}\n"
            for img, score, (x1, y1, x2, y2) in detections.get(cls, [])
        ]
        path = Path(folder) / f"{prefix}{cls}.txt"
        atomic_write_text(path, "".join(lines))
        paths.append(path)
    return paths


def read_results_files(
    folder: Path,
    classes: Sequence[str] = VOC_CLASSES,
    prefix: str = "comp4_det_test_",
    image_ids: Sequence[str] | None = None,
) -> Detections:
    """The devkit results files of a folder; a malformed line, or (given `image_ids`, the test
    list) an image id not in the list, is a one-line BenchError naming the file and line."""
    known = set(image_ids) if image_ids is not None else None
    out: Detections = {}
    for cls in classes:
        path = Path(folder) / f"{prefix}{cls}.txt"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise BenchError(f"{printable(path)}: unreadable results file ({exc})") from None
        dets = []
        for n, line in enumerate(lines, start=1):
            r = line.split()
            if not r:
                continue
            try:
                if len(r) != 6:
                    raise ValueError
                det = (r[0], float(r[1]), tuple(float(v) for v in r[2:6]))
            except ValueError:
                raise BenchError(
                    f"{printable(path)}: line {n} must be 'image_id score x1 y1 x2 y2'"
                ) from None
            if known is not None and r[0] not in known:
                raise BenchError(
                    f"{printable(path)}: line {n}: unrecognized image {printable(r[0])!r} "
                    "(not in the test list)"
                )
            dets.append(det)
        out[cls] = dets  # type: ignore[assignment]
    return out


def summarize(per_class: Mapping[str, float]) -> str:
    return " ".join(f"{c}={100 * v:.1f}" for c, v in per_class.items() if not math.isnan(v))


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN: a score that could not be computed becomes null."""
    return None if x is None or x != x else float(x)


def score_fields(mean: float, coco: float, per_class: Mapping[str, float]) -> dict[str, Any]:
    """The scores both backends report the same way (NaN as null)."""
    return {
        "map": finite_or_none(mean),
        "coco_ap": finite_or_none(coco),
        "per_class": {c: finite_or_none(v) for c, v in per_class.items()},
    }
