"""VOC2007 detection scoring: our use of voc_detection_eval against an independent
implementation of the devkit rules, COCO AP through pycocotools, and results files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmark.datasets.voc import VOC_CLASSES
from transfer.detection.data import DetRecord, load_records
from transfer.detection.evaluate import (
    coco_ap,
    finite_or_none,
    read_results_files,
    score_fields,
    voc07_scores,
    write_results_files,
)


def devkit_ap(dets, records, cls):
    """VOCevaldet.m written out independently: loops, +1 areas, 11-point interpolation."""
    gt = {}
    npos = 0
    for r in records:
        rows = [
            (b + 1.0, bool(d))
            for b, c, d in zip(r.gt_boxes, r.gt_classes, r.gt_difficult)
            if VOC_CLASSES[c - 1] == cls
        ]
        gt[r.image_id] = {
            "boxes": [b for b, _ in rows],
            "diff": [d for _, d in rows],
            "det": [False] * len(rows),
        }
        npos += sum(not d for _, d in rows)
    if npos == 0:
        return float("nan")
    order = sorted(range(len(dets)), key=lambda i: -dets[i][1])
    tp, fp = [], []
    for i in order:
        img, _, bb = dets[i]
        g = gt.get(img, {"boxes": [], "diff": [], "det": []})
        ovmax, jmax = -math.inf, -1
        for j, bbgt in enumerate(g["boxes"]):
            iw = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0]) + 1
            ih = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1]) + 1
            if iw > 0 and ih > 0:
                ua = (
                    (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                    + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
                    - iw * ih
                )
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= 0.5:
            if g["diff"][jmax]:
                continue
            if not g["det"][jmax]:
                g["det"][jmax] = True
                tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        else:
            tp.append(0), fp.append(1)
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    rec = ctp / npos
    prec = ctp / np.maximum(ctp + cfp, 1e-12)
    ap = 0.0
    for t in np.arange(0, 1.1, 0.1):
        p = prec[rec >= t].max() if (rec >= t).any() else 0.0
        ap += p / 11
    return ap


def rec(image_id, objs):
    """objs: [(class, (xmin, ymin, xmax, ymax) 1-based, difficult)]."""
    return DetRecord(
        image_id,
        Path(f"{image_id}.jpg"),
        500,
        400,
        np.array([o[1] for o in objs], np.float32).reshape(-1, 4) - 1,
        np.array([VOC_CLASSES.index(o[0]) + 1 for o in objs], np.int64),
        np.array([o[2] for o in objs], bool),
    )


def test_hand_computed_ap_with_duplicate_and_difficult():
    records = [
        rec("a", [("dog", (10, 10, 50, 50), False), ("dog", (100, 100, 150, 150), True)]),
        rec("b", [("dog", (20, 20, 80, 80), False), ("cat", (1, 1, 30, 30), False)]),
    ]
    dets = {
        "dog": [
            ("a", 0.9, (10, 10, 50, 50)),  # TP
            ("a", 0.85, (101, 101, 150, 150)),  # on the difficult dog: ignored
            ("a", 0.8, (11, 11, 50, 50)),  # duplicate of the first: FP
            ("b", 0.7, (20, 22, 80, 80)),  # TP
        ],
        "cat": [],
    }
    per_class, mean = voc07_scores(dets, records)
    # ranked TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    assert per_class["dog"] == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)
    assert per_class["cat"] == 0.0
    assert math.isnan(per_class["person"])  # no object of the class: left out of the mean
    assert mean == pytest.approx((per_class["dog"] + 0.0) / 2)
    assert per_class["dog"] == pytest.approx(devkit_ap(dets["dog"], records, "dog"))


def test_detection_on_image_without_gt_is_false_positive():
    records = [rec("a", [("car", (1, 1, 20, 20), False)]), rec("b", [])]
    dets = {"car": [("b", 0.99, (1, 1, 20, 20)), ("a", 0.5, (1, 1, 20, 20))]}
    per_class, _ = voc07_scores(dets, records)
    # ranked FP, TP: precision 0, 1/2 at recall 0, 1 -> 0.5 at every recall point
    assert per_class["car"] == pytest.approx(0.5)


def jittered_detections(records, rng):
    dets = {c: [] for c in VOC_CLASSES}
    for r in records:
        for b, c in zip(r.gt_boxes + 1, r.gt_classes):
            w, h = b[2] - b[0] + 1, b[3] - b[1] + 1
            for _ in range(int(rng.integers(0, 3))):  # misses, hits and duplicates
                j = b + rng.normal(0, 0.12, 4) * np.array([w, h, w, h])
                dets[VOC_CLASSES[c - 1]].append((r.image_id, float(rng.random()), tuple(j)))
        for _ in range(3):  # false positives of random classes at random places
            x, y = rng.uniform(1, r.width - 40), rng.uniform(1, r.height - 40)
            cls = VOC_CLASSES[int(rng.integers(20))]
            dets[cls].append((r.image_id, float(rng.random() * 0.8), (x, y, x + 40, y + 40)))
    return dets


def test_matches_devkit_rules_on_real_voc(shared_data):
    voc = shared_data / "VOCdevkit" / "VOC2007"
    records = load_records(voc, "train")
    rng = np.random.default_rng(0)
    dets = jittered_detections(records, rng)
    per_class, mean = voc07_scores(dets, records)
    ref = {c: devkit_ap(dets[c], records, c) for c in VOC_CLASSES}
    for c in VOC_CLASSES:
        assert per_class[c] == pytest.approx(ref[c], abs=1e-9), c
    assert mean == pytest.approx(np.nanmean(list(ref.values())))
    assert 0.1 < mean < 0.95  # neither trivial nor perfect
    assert sum(r.gt_difficult.sum() for r in records) > 0  # the case is exercised


def test_coco_ap_perfect_and_difficult_ignored():
    records = [rec("a", [("dog", (10, 10, 60, 60), False), ("dog", (100, 100, 160, 160), True)])]
    perfect = {"dog": [("a", 0.9, (10, 10, 60, 60))]}
    assert coco_ap(perfect, records) == pytest.approx(1.0)
    # a confident detection on the difficult (iscrowd) dog costs nothing
    with_difficult = {"dog": [("a", 0.95, (100, 100, 160, 160)), ("a", 0.9, (10, 10, 60, 60))]}
    assert coco_ap(with_difficult, records) == pytest.approx(1.0)
    # a confident miss elsewhere does cost
    with_fp = {"dog": [("a", 0.95, (300, 300, 360, 360)), ("a", 0.9, (10, 10, 60, 60))]}
    assert coco_ap(with_fp, records) < 0.75
    assert coco_ap({"dog": []}, records) == 0.0


def test_coco_ap_is_stricter_than_ap50():
    records = [rec("a", [("cat", (10, 10, 109, 109), False)])]
    loose = {"cat": [("a", 0.9, (10, 10, 109, 140))]}  # IoU 100/131 ~ 0.76
    per_class, _ = voc07_scores(loose, records)
    assert per_class["cat"] == pytest.approx(1.0)
    # recall 1 for IoU thresholds 0.50..0.75 (6 of 10), 0 above
    assert coco_ap(loose, records) == pytest.approx(0.6, abs=1e-6)


def test_results_files_round_trip(tmp_path):
    dets = {c: [] for c in VOC_CLASSES}
    dets["bus"] = [("000005", 0.5, (1.0, 2.0, 30.0, 40.0)), ("000007", 0.25, (3.0, 4.0, 5.0, 6.0))]
    paths = write_results_files(tmp_path, dets)
    assert len(paths) == 20
    assert (tmp_path / "comp4_det_test_bus.txt").read_text().splitlines()[0] == (
        "000005 0.500000 1.0 2.0 30.0 40.0"
    )
    assert read_results_files(tmp_path)["bus"] == dets["bus"]


def test_score_fields_report_nan_as_null_for_both_backends():
    import json

    records = [rec("a", [("dog", (10, 10, 60, 60), False)])]
    dets = {c: [] for c in VOC_CLASSES}
    dets["dog"] = [("a", 0.9, (10, 10, 60, 60))]
    per_class, mean = voc07_scores(dets, records)
    fields = score_fields(mean, coco_ap(dets, records), per_class)
    assert fields["map"] == pytest.approx(1.0) and fields["coco_ap"] == pytest.approx(1.0)
    assert fields["per_class"]["dog"] == pytest.approx(1.0)
    assert fields["per_class"]["cat"] is None  # no cat in the test set: NaN AP, not 0
    assert list(fields["per_class"]) == list(VOC_CLASSES)
    json.dumps(fields, allow_nan=False)  # valid JSON: no NaN anywhere
    nothing = score_fields(float("nan"), float("nan"), {"dog": float("nan")})
    assert nothing == {"map": None, "coco_ap": None, "per_class": {"dog": None}}
    assert finite_or_none(None) is None and finite_or_none(0.0) == 0.0
    assert isinstance(finite_or_none(np.float32(0.25)), float)


def test_results_file_with_an_unknown_image_is_an_error(tmp_path):
    from benchmark.errors import BenchError

    dets = {c: [] for c in VOC_CLASSES}
    dets["cat"] = [("000001", 0.9, (1.0, 1.0, 10.0, 10.0)), ("999999", 0.5, (1.0, 1.0, 5.0, 5.0))]
    write_results_files(tmp_path, dets)
    with pytest.raises(BenchError, match="comp4_det_test_cat.txt: line 2: unrecognized image"):
        read_results_files(tmp_path, image_ids=["000001", "000002"])
    (tmp_path / "comp4_det_test_dog.txt").write_text("000001 0.5 1 2 3\n")
    with pytest.raises(BenchError, match="dog.txt: line 1 must be"):
        read_results_files(tmp_path)


def py_faster_rcnn_voc_eval(lines, records, cls, ovthresh):
    """py-faster-rcnn's voc_eval.py written out independently (the loop detectron2's
    PascalVOCDetectionEvaluator runs): results-file lines read back as floats, numpy's
    default argsort, strict `ovmax > ovthresh`, 11-point AP."""
    recs = {}
    npos = 0
    for r in records:
        rows = [(b + 1.0, bool(d)) for b, c, d in zip(r.gt_boxes, r.gt_classes, r.gt_difficult)
                if VOC_CLASSES[c - 1] == cls]  # fmt: skip
        recs[r.image_id] = {"bbox": np.array([b for b, _ in rows]).reshape(-1, 4),
                            "difficult": np.array([d for _, d in rows], bool),
                            "det": [False] * len(rows)}  # fmt: skip
        npos += sum(not d for _, d in rows)
    split = [x.strip().split(" ") for x in lines]
    ids = [x[0] for x in split]
    conf = np.array([float(x[1]) for x in split])
    bb_all = np.array([[float(z) for z in x[2:]] for x in split]).reshape(-1, 4)
    order = np.argsort(-conf)
    bb_all, ids = bb_all[order, :], [ids[x] for x in order]
    tp, fp = np.zeros(len(ids)), np.zeros(len(ids))
    for d, img in enumerate(ids):
        r, bb, ovmax = recs[img], bb_all[d], -np.inf
        gt = r["bbox"]
        if gt.size > 0:
            iw = np.maximum(np.minimum(gt[:, 2], bb[2]) - np.maximum(gt[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(gt[:, 3], bb[3]) - np.maximum(gt[:, 1], bb[1]) + 1.0, 0.0)
            inters = iw * ih
            area_gt = (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0)
            uni = (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0) + area_gt - inters
            ov = inters / uni
            ovmax, jmax = np.max(ov), np.argmax(ov)
        if ovmax > ovthresh:
            if not r["difficult"][jmax]:
                if not r["det"][jmax]:
                    tp[d], r["det"][jmax] = 1.0, True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec_, prec = tp / float(npos), tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return sum((np.max(prec[rec_ >= t]) if np.sum(rec_ >= t) else 0) / 11.0
               for t in np.arange(0.0, 1.1, 0.1))  # fmt: skip


def test_detectron2_voc_ap_matches_its_evaluator_loop(shared_data):
    """AP / AP50 / AP75 as detectron2's PascalVOCDetectionEvaluator: results lines written as
    it writes them (score %.3f, boxes %.1f), ten thresholds, 11-point AP per class."""
    from transfer.detection.evaluate import detectron2_voc_ap

    records = load_records(shared_data / "VOCdevkit" / "VOC2007", "train")[:150]
    dets = jittered_detections(records, np.random.default_rng(3))
    ours = detectron2_voc_ap(dets, records)
    maps = {}
    for t in range(50, 100, 5):
        aps = []
        for cls in VOC_CLASSES:
            if not any(VOC_CLASSES[c - 1] == cls and not d for r in records
                       for c, d in zip(r.gt_classes, r.gt_difficult)):  # fmt: skip
                continue
            lines = [f"{i} {s:.3f} {b[0]:.1f} {b[1]:.1f} {b[2]:.1f} {b[3]:.1f}"
                     for i, s, b in dets[cls]]  # fmt: skip
            aps.append(py_faster_rcnn_voc_eval(lines, records, cls, t / 100.0))
        maps[t] = np.mean(aps)
    assert ours["ap50"] == pytest.approx(maps[50], abs=1e-12)
    assert ours["ap75"] == pytest.approx(maps[75], abs=1e-12)
    assert ours["ap"] == pytest.approx(np.mean(list(maps.values())), abs=1e-12)
    assert ours["ap75"] < ours["ap50"] and ours["ap"] < ours["ap50"]
    # the devkit's AP50 differs only in ties and boxes at exactly 0.5 IoU
    _, devkit = voc07_scores(dets, records)
    assert devkit == pytest.approx(ours["ap50"], abs=0.02)


def test_py_faster_rcnn_rule_is_strict_at_the_threshold():
    from benchmark.metrics import voc_detection_eval

    gt = {"a": [("cat", (1.0, 1.0, 10.0, 10.0), False)]}
    half = {"cat": [("a", 0.9, (1.0, 1.0, 10.0, 5.0))]}  # IoU exactly 50 / 100
    assert voc_detection_eval(half, gt, ["cat"])["cat"] == 1.0
    assert voc_detection_eval(half, gt, ["cat"], rule="py-faster-rcnn")["cat"] == 0.0
