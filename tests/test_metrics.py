"""Metrics against hand-computed cases and independent, differently written implementations."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio
from sklearn.metrics import average_precision_score

from benchmark.metrics import (
    box_iou_voc,
    classification_ap,
    confusion_matrix,
    inpainting_errors,
    mean_ap,
    mean_inpainting_errors,
    psnr,
    segmentation_scores,
    voc07_ap,
    voc_ap_area,
    voc_detection_eval,
)

# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def test_classification_ap_hand_case() -> None:
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    per_class, mean = classification_ap(scores, labels, np.zeros_like(labels, dtype=bool))
    # ranks 1 and 3 are positive: AP = (1/1 + 2/3) / 2; class 1 has no positive -> NaN
    assert per_class[0] == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(per_class[1])
    assert mean == pytest.approx(per_class[0])  # the NaN class is left out of the mean


def test_classification_ap_scores_as_the_reference_with_its_tie_break() -> None:
    """philkr/voc-classification scores `scr - 1e-5 * gts`: a positive less than 1e-5 above
    a negative ranks below it (exact ties are already pessimistic in scikit-learn's AP)."""
    from sklearn.metrics import average_precision_score

    scores = np.array([[0.5 + 4e-6], [0.5], [0.1]])
    labels = np.array([[1], [0], [0]])
    per_class, _ = classification_ap(scores, labels)
    assert average_precision_score(labels[:, 0], scores[:, 0]) == pytest.approx(1.0)
    assert per_class[0] == pytest.approx(0.5)  # the positive now ranks second


def test_voc07_classification_ap_hand_case() -> None:
    """VOCevalcls: 11-point interpolated precision over the ranked list."""
    scores = np.array([[0.9], [0.8], [0.7], [0.6]])
    labels = np.array([[1], [0], [1], [0]])
    per_class, _ = classification_ap(scores, labels, method="voc07")
    # recall 0.5 at precision 1 (rank 1), recall 1 at precision 2/3 (rank 3)
    assert per_class[0] == pytest.approx((6 * 1.0 + 5 * (2 / 3)) / 11)
    sk, _ = classification_ap(scores, labels)
    assert per_class[0] > sk[0]  # 11-point interpolation reads higher here


def test_classification_ap_excludes_difficult_images() -> None:
    scores = np.array([[0.9], [0.8], [0.7], [0.6]])
    labels = np.array([[1], [0], [1], [0]])
    difficult = np.array([[False], [True], [False], [False]])
    per_class, _ = classification_ap(scores, labels, difficult)
    assert per_class[0] == pytest.approx(1.0)  # the negative at rank 2 is gone
    # a class whose only positives are difficult has no AP
    per_class, mean = classification_ap(
        scores, labels, np.array([[True], [False], [True], [False]])
    )
    assert math.isnan(per_class[0]) and math.isnan(mean)


def _ap_by_ranks(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP as the mean precision at the rank of each positive (no ties)."""
    order = np.argsort(-scores)
    hits, precisions = 0, []
    for rank, i in enumerate(order, start=1):
        if labels[i]:
            hits += 1
            precisions.append(hits / rank)
    return float(np.mean(precisions))


def test_classification_ap_matches_sklearn_and_rank_definition() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        n, c = 60, 6
        scores = rng.normal(size=(n, c))
        labels = (rng.random((n, c)) < 0.3).astype(int)
        difficult = rng.random((n, c)) < 0.15
        labels[:, 5] = 0  # one class without positives
        per_class, mean = classification_ap(scores, labels, difficult)
        expected = []
        for k in range(c):
            keep = [i for i in range(n) if not difficult[i, k]]
            y, s = labels[keep, k], scores[keep, k]
            if y.sum() == 0:
                assert math.isnan(per_class[k])
                continue
            assert per_class[k] == pytest.approx(average_precision_score(y, s))
            assert per_class[k] == pytest.approx(_ap_by_ranks(s, y))
            expected.append(average_precision_score(y, s))
        assert mean == pytest.approx(np.mean(expected))


def test_classification_ap_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        classification_ap(np.zeros((3, 2)), np.zeros((3, 3)), None)
    with pytest.raises(ValueError):
        classification_ap(np.zeros((2, 1)), np.array([[-1], [1]]), None)


# ---------------------------------------------------------------------------------------------
# VOC AP from recall/precision
# ---------------------------------------------------------------------------------------------


def test_voc07_ap_hand_case() -> None:
    recall = np.array([0.5, 0.5, 0.5, 1.0])
    precision = np.array([1.0, 0.5, 1 / 3, 0.5])
    # t = 0 .. 0.5 (6 thresholds) -> max precision 1; t = 0.6 .. 1 (5) -> 0.5
    assert voc07_ap(recall, precision) == pytest.approx((6 * 1.0 + 5 * 0.5) / 11)
    # recall 0.25 reaches only t = 0, 0.1, 0.2
    assert voc07_ap(np.array([0.25]), np.array([0.8])) == pytest.approx(3 * 0.8 / 11)
    assert voc07_ap(np.array([]), np.array([])) == 0.0


def test_voc_ap_area_hand_case() -> None:
    recall = np.array([0.5, 0.5, 0.5, 1.0])
    precision = np.array([1.0, 0.5, 1 / 3, 0.5])
    assert voc_ap_area(recall, precision) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    # the envelope lifts an early low precision to a later higher one
    assert voc_ap_area(np.array([0.5, 1.0]), np.array([0.4, 0.8])) == pytest.approx(0.8)


def test_box_iou_uses_inclusive_pixels() -> None:
    iou = box_iou_voc(
        np.array([[0, 0, 9, 9], [5, 0, 14, 9], [20, 20, 25, 25]]), np.array([[0, 0, 9, 9]])
    )
    np.testing.assert_allclose(iou[:, 0], [1.0, 50 / 150, 0.0])


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


def test_detection_duplicates_difficult_and_images_without_gt() -> None:
    gt = {
        "a": [("cat", (0, 0, 9, 9), False), ("cat", (20, 20, 29, 29), False)],
        "b": [("cat", (0, 0, 9, 9), True)],
        "c": [("dog", (0, 0, 9, 9), False)],
        "d": [],  # a test image without objects
    }
    dets = {
        "cat": [
            ("a", 0.9, (0, 0, 9, 9)),  # TP
            ("a", 0.8, (0, 0, 9, 9)),  # duplicate -> FP
            ("b", 0.7, (0, 0, 9, 9)),  # on a difficult box -> ignored
            ("c", 0.6, (0, 0, 9, 9)),  # image without a cat -> FP
            ("a", 0.5, (20, 20, 29, 29)),  # TP
            ("d", 0.4, (0, 0, 5, 5)),  # test image without objects -> FP
        ]
    }
    # without the difficult rule the sequence would be TP FP FP FP TP
    ap = voc_detection_eval(dets, gt, ["cat", "dog", "bird"])
    assert ap["cat"] == pytest.approx((6 * 1.0 + 5 * 0.5) / 11)
    ap_area = voc_detection_eval(dets, gt, ["cat"], use_07_metric=False)
    assert ap_area["cat"] == pytest.approx(0.75)
    assert ap["dog"] == 0.0  # ground truth but no detection
    assert math.isnan(ap["bird"])  # no ground truth at all
    assert mean_ap(list(ap.values())) == pytest.approx((ap["cat"] + 0.0) / 2)
    # an image that is not in the test list: the devkit's "unrecognized image" error
    dets["cat"].append(("zzz", 0.3, (0, 0, 5, 5)))
    with pytest.raises(ValueError, match="unrecognized image 'zzz'"):
        voc_detection_eval(dets, gt, ["cat"])


def test_detection_only_difficult_gt_is_nan() -> None:
    gt = {"a": [("cat", (0, 0, 9, 9), True)]}
    ap = voc_detection_eval({"cat": [("a", 1.0, (0, 0, 9, 9))]}, gt, ["cat"])
    assert math.isnan(ap["cat"])


def test_detection_iou_threshold_is_inclusive_with_plus_one_areas() -> None:
    gt = {"a": [("cat", (0, 0, 9, 9), False)]}
    # 10x5 px inside 10x10 px: IoU exactly 0.5 with +1 areas (0.444 without) -> TP
    assert voc_detection_eval({"cat": [("a", 1.0, (0, 0, 9, 4))]}, gt, ["cat"])["cat"] == 1.0
    assert voc_detection_eval({"cat": [("a", 1.0, (0, 0, 9, 3))]}, gt, ["cat"])["cat"] == 0.0


def test_detection_best_overlap_already_taken_is_fp() -> None:
    # the devkit assigns each detection to its best box even if that one is already matched
    gt = {"a": [("cat", (0, 0, 9, 9), False), ("cat", (0, 0, 9, 11), False)]}
    dets = {"cat": [("a", 0.9, (0, 0, 9, 9)), ("a", 0.8, (0, 0, 9, 9))]}
    # TP then FP: recall 0.5 with precision 1, never reaches 1
    assert voc_detection_eval(dets, gt, ["cat"])["cat"] == pytest.approx(6 / 11)


def _devkit_loop(dets, gt, classes, thr=0.5, use_07=True):
    """A line-by-line transcription of VOCevaldet.m, loops and scalars only."""
    out = {}
    for cls in classes:
        recs, npos = {}, 0
        for img, objs in gt.items():
            boxes = [list(map(float, o[1])) for o in objs if o[0] == cls]
            diff = [bool(o[2]) for o in objs if o[0] == cls]
            recs[img] = {"bb": boxes, "diff": diff, "det": [False] * len(boxes)}
            npos += sum(1 for d in diff if not d)
        if npos == 0:
            out[cls] = float("nan")
            continue
        cd = list(dets.get(cls, []))
        order = sorted(range(len(cd)), key=lambda i: -cd[i][1])
        tp, fp = [0] * len(cd), [0] * len(cd)
        for d, i in enumerate(order):
            img, _, bb = cd[i]
            r = recs.get(img, {"bb": [], "diff": [], "det": []})
            ovmax, jmax = -math.inf, -1
            for j, g in enumerate(r["bb"]):
                bi = [max(bb[0], g[0]), max(bb[1], g[1]), min(bb[2], g[2]), min(bb[3], g[3])]
                iw, ih = bi[2] - bi[0] + 1, bi[3] - bi[1] + 1
                if iw > 0 and ih > 0:
                    ua = (
                        (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                        + (g[2] - g[0] + 1) * (g[3] - g[1] + 1)
                        - iw * ih
                    )
                    ov = iw * ih / ua
                    if ov > ovmax:
                        ovmax, jmax = ov, j
            if ovmax >= thr:
                if r["diff"][jmax]:
                    pass
                elif not r["det"][jmax]:
                    tp[d] = 1
                    r["det"][jmax] = True
                else:
                    fp[d] = 1
            else:
                fp[d] = 1
        ctp = cfp = 0
        rec, prec = [], []
        for d in range(len(cd)):
            ctp += tp[d]
            cfp += fp[d]
            rec.append(ctp / npos)
            prec.append(ctp / (ctp + cfp) if ctp + cfp else float("nan"))
        if use_07:
            ap = 0.0
            for t in np.arange(0.0, 1.1, 0.1):
                ps = [p for r_, p in zip(rec, prec) if r_ >= t and not math.isnan(p)]
                ap += (max(ps) if ps else 0.0) / 11
        else:
            mrec = [0.0] + rec + [1.0]
            mpre = [0.0] + [0.0 if math.isnan(p) else p for p in prec] + [0.0]
            for i in range(len(mpre) - 2, -1, -1):
                mpre[i] = max(mpre[i], mpre[i + 1])
            ap = sum(
                (mrec[i] - mrec[i - 1]) * mpre[i]
                for i in range(1, len(mrec))
                if mrec[i] != mrec[i - 1]
            )
        out[cls] = ap
    return out


def _random_detections(rng, gt, classes, n_random=30):
    dets = {c: [] for c in classes}
    for img, objs in gt.items():
        for cls, box, _ in objs:
            for _ in range(rng.integers(0, 3)):  # 0-2 jittered copies: misses and duplicates
                jit = rng.normal(scale=0.15 * (box[2] - box[0] + 1), size=4)
                dets[cls].append((img, float(rng.random()), tuple(np.asarray(box) + jit)))
    gt.setdefault("no-gt-image", [])  # a test image without objects
    images = list(gt)
    for _ in range(n_random):
        cls = classes[rng.integers(len(classes))]
        x, y = rng.uniform(0, 300, size=2)
        w, h = rng.uniform(5, 150, size=2)
        dets[cls].append(
            (images[rng.integers(len(images))], float(rng.random()), (x, y, x + w, y + h))
        )
    return dets


def _random_gt(rng, classes, n_images=12):
    gt = {}
    for i in range(n_images):
        objs = []
        for _ in range(rng.integers(0, 5)):
            x, y = rng.uniform(0, 200, size=2)
            w, h = rng.uniform(10, 120, size=2)
            objs.append(
                (classes[rng.integers(len(classes))], (x, y, x + w, y + h), rng.random() < 0.2)
            )
        gt[f"img{i}"] = objs
    return gt


@pytest.mark.parametrize("use_07", [True, False])
def test_detection_matches_devkit_loop_on_random_cases(use_07: bool) -> None:
    rng = np.random.default_rng(1)
    classes = ["a", "b", "c", "d"]
    for _ in range(15):
        gt = _random_gt(rng, classes)
        dets = _random_detections(rng, gt, classes)
        ours = voc_detection_eval(dets, gt, classes, use_07_metric=use_07)
        ref = _devkit_loop(dets, gt, classes, use_07=use_07)
        for c in classes:
            if math.isnan(ref[c]):
                assert math.isnan(ours[c])
            else:
                assert ours[c] == pytest.approx(ref[c], abs=1e-12), c


def _read_voc_xml(path: Path) -> list[tuple[str, tuple[float, ...], bool]]:
    objs = []
    for obj in ET.parse(path).getroot().iter("object"):
        bb = obj.find("bndbox")
        box = tuple(float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        diff = obj.find("difficult")
        objs.append(
            (obj.find("name").text.strip(), box, diff is not None and diff.text.strip() == "1")
        )
    return objs


def test_detection_matches_devkit_loop_on_real_voc_annotations(shared_data: Path) -> None:
    voc2007 = shared_data / "VOCdevkit" / "VOC2007"
    files = sorted((voc2007 / "Annotations").glob("*.xml"))[:150]
    gt = {f.stem: _read_voc_xml(f) for f in files}
    classes = sorted({o[0] for objs in gt.values() for o in objs})
    assert any(o[2] for objs in gt.values() for o in objs), "sample should hold difficult objects"
    rng = np.random.default_rng(2)
    dets = _random_detections(rng, gt, classes, n_random=200)
    ours = voc_detection_eval(dets, gt, classes)
    ref = _devkit_loop(dets, gt, classes)
    for c in classes:
        assert ours[c] == pytest.approx(ref[c], abs=1e-12) or (
            math.isnan(ours[c]) and math.isnan(ref[c])
        )
    # a perfect detector scores 1 on every class with non-difficult objects
    perfect = {c: [] for c in classes}
    for img, objs in gt.items():
        for cls, box, _ in objs:
            perfect[cls].append((img, 1.0, box))
    ap = voc_detection_eval(perfect, gt, classes)
    assert all(v == 1.0 or math.isnan(v) for v in ap.values())


# ---------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------


def test_confusion_matrix_and_scores_hand_case() -> None:
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 0]])
    hist = confusion_matrix(pred, target, 3)
    np.testing.assert_array_equal(hist, [[1, 1, 0], [0, 2, 0], [0, 1, 0]])
    assert hist.dtype == np.int64
    s = segmentation_scores(hist)
    assert s["pixel_acc"] == pytest.approx(3 / 5)
    assert s["mean_acc"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    # IU: class 0: 1/(2+1-1); class 1: 2/(2+4-2); class 2: 0/(1+0-0)
    np.testing.assert_allclose(s["per_class_iu"], [0.5, 0.5, 0.0])
    assert s["mean_iu"] == pytest.approx(1 / 3)
    assert s["fw_iu"] == pytest.approx(2 / 5 * 0.5 + 2 / 5 * 0.5 + 1 / 5 * 0.0)


def test_segmentation_absent_class_is_left_out() -> None:
    hist = confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 1]), 4)
    s = segmentation_scores(hist)
    assert math.isnan(s["per_class_iu"][2]) and math.isnan(s["per_class_iu"][3])
    assert s["mean_iu"] == 1.0


def test_confusion_matrix_rejects_out_of_range_predictions() -> None:
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 3)


def test_mean_iu_matches_independent_per_class_computation() -> None:
    rng = np.random.default_rng(3)
    n = 6
    hist = np.zeros((n, n), dtype=np.int64)
    preds, targets = [], []
    for _ in range(4):  # accumulate over images of different sizes
        h, w = rng.integers(5, 30, size=2)
        target = rng.integers(0, n - 1, size=(h, w))  # class n-1 never in the ground truth
        target[rng.random((h, w)) < 0.1] = 255
        pred = np.where(rng.random((h, w)) < 0.6, target % n, rng.integers(0, n, size=(h, w)))
        pred[target == 255] = rng.integers(0, n, size=int((target == 255).sum()))
        hist += confusion_matrix(pred, target, n)
        preds.append(pred.ravel())
        targets.append(target.ravel())
    pred, target = np.concatenate(preds), np.concatenate(targets)
    valid = target != 255
    ious, accs, freqs = [], [], []
    for c in range(n):
        inter = np.sum((pred == c) & (target == c) & valid)
        union = np.sum(((pred == c) | (target == c)) & valid)
        ious.append(inter / union if union else np.nan)
        gt_c = np.sum((target == c) & valid)
        accs.append(inter / gt_c if gt_c else np.nan)
        freqs.append(gt_c / valid.sum())
    s = segmentation_scores(hist)
    np.testing.assert_allclose(s["per_class_iu"], ious)
    assert s["mean_iu"] == pytest.approx(np.nanmean(ious))
    assert s["mean_acc"] == pytest.approx(np.nanmean(accs))
    assert s["pixel_acc"] == pytest.approx(np.mean(pred[valid] == target[valid]))
    fw = sum(f * i for f, i in zip(freqs, ious) if f > 0)
    assert s["fw_iu"] == pytest.approx(fw)
    assert s["per_class_iu"][n - 1] == 0.0  # predicted but absent: counts as 0, as in FCN


# ---------------------------------------------------------------------------------------------
# Inpainting
# ---------------------------------------------------------------------------------------------


def test_inpainting_errors_hand_case() -> None:
    target = np.full((2, 3, 4, 4), 0.5)
    pred = np.zeros((2, 3, 4, 4))
    pred[1] = 0.5  # perfect second image
    e = inpainting_errors(pred, target)
    np.testing.assert_allclose(e["l1"], [0.5, 0.0])
    np.testing.assert_allclose(e["l2"], [0.25, 0.0])
    # 0.5 on [-1, 1] is 63.75 on 0..255: 20 log10(255 / 63.75) = 20 log10(4)
    assert e["psnr"][0] == pytest.approx(20 * math.log10(4))
    assert e["psnr"][1] == 100.0  # the reference port's value for identical patches
    m = mean_inpainting_errors(e)
    assert m == pytest.approx(
        {"mean_l1": 0.25, "mean_l2": 0.125, "psnr": (20 * math.log10(4) + 100) / 2, "images": 2}
    )


def test_inpainting_errors_match_skimage_and_loops() -> None:
    rng = np.random.default_rng(4)
    target = rng.uniform(-1, 1, size=(5, 3, 16, 16))
    pred = np.clip(target + rng.normal(scale=0.2, size=target.shape), -1, 1)
    e = inpainting_errors(pred, target)
    for i in range(5):
        t255, p255 = (target[i] + 1) * 127.5, (pred[i] + 1) * 127.5
        assert e["psnr"][i] == pytest.approx(peak_signal_noise_ratio(t255, p255, data_range=255))
        assert e["psnr"][i] == pytest.approx(psnr(p255, t255))
        total_abs = total_sq = 0.0
        for v in (pred[i] - target[i]).ravel():
            total_abs += abs(v)
            total_sq += v * v
        assert e["l1"][i] == pytest.approx(total_abs / pred[i].size)
        assert e["l2"][i] == pytest.approx(total_sq / pred[i].size)


def test_inpainting_errors_reject_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        inpainting_errors(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 5)))
