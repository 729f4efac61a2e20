"""Fast R-CNN's test post-processing: master's running 40 x N per-class cap (the default)
against a case worked by hand, its exact merge over processes, and the coco branch's."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark.errors import ConfigError
from transfer.detection.config import DetectionConfig
from transfer.detection.inference import (
    RunningCap,
    coco_postprocess,
    master_finish,
    merged_thresholds,
    nms,
)
from transfer.detection.train import check_test_postprocess

# Three images, four RoIs each, background + two classes. Every RoI has its own box, far
# from the others, so NMS keeps all and only the caps decide.
SCORES = {  # class -> per image the scores of RoIs 0-3
    1: [[0.2, 0.9, 0.5, 0.1], [0.6, 0.3, 0.7, 0.05], [0.65, 0.95, 0.55, 0.8]],
    2: [[0.4, 0.1, 0.2, 0.3], [0.05, 0.15, 0.25, 0.35], [0.31, 0.5, 0.29, 0.32]],
}
BOX = np.array([[100 * r, 0, 100 * r + 50, 50] for r in range(4)], np.float32)


def image(i: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.zeros((4, 3), np.float32)
    for j, per_image in SCORES.items():
        scores[:, j] = per_image[i]
    return scores, np.tile(BOX, (1, 3))


def scores_of(dets: list[np.ndarray]) -> list[list[float]]:
    return [d[:, 4].astype(np.float64).round(4).tolist() for d in dets]


def test_master_running_threshold_by_hand():
    """max_per_image 2, max_per_set 1 x 3 images: each class keeps its 3 best scores.

    Class 1. Image 0: top 2 of all (thresh -inf): 0.9, 0.5 -> heap {0.5, 0.9}. Image 1: top 2
    0.7, 0.6 -> heap {0.5, 0.6, 0.7, 0.9}, one too many: pop 0.5, thresh 0.6. Image 2: RoIs
    above 0.6 are 0.65, 0.95, 0.8 (0.55 is out before the top-2 cut), top 2 0.95, 0.8 -> heap
    {0.6, 0.7, 0.8, 0.9, 0.95}: pop 0.6, 0.7, thresh 0.8. At the end only scores > 0.8 stay:
    image 0 keeps 0.9 (0.5 stored while the threshold was -inf is cut), image 1 loses both
    boxes it stored, image 2 keeps 0.95 (0.8, equal to the threshold, goes: strict >).
    Class 2. Image 0: 0.4, 0.3; image 1: 0.35, 0.25 -> pop 0.25, thresh 0.3; image 2: above
    0.3 are 0.31, 0.5, 0.32, top 2 0.5, 0.32 -> pop 0.3, 0.32, thresh 0.35: 0.4 and 0.5 stay.
    """
    cap = RunningCap(num_classes=3, num_images=3, max_per_image=2, max_per_set=1)
    assert cap.limit == 3
    stored, thresholds = [], []
    for i in range(3):
        stored.append(cap.add(*image(i)))
        thresholds.append(cap.thresh[1:].round(4).tolist())
    assert thresholds == [[-np.inf, -np.inf], [0.6, 0.3], [0.8, 0.35]]  # rising mid-way
    assert [scores_of(s) for s in stored] == [
        [[0.9, 0.5], [0.4, 0.3]],
        [[0.7, 0.6], [0.35, 0.25]],
        [[0.95, 0.8], [0.5, 0.32]],
    ]
    assert sorted(cap.heaps[1]) == pytest.approx([0.8, 0.9, 0.95])
    # the boxes travel with their scores: class 1 of image 0 stored RoIs 1 and 2
    np.testing.assert_array_equal(stored[0][0][:, :4], BOX[[1, 2]])
    final = master_finish(stored, cap.thresh, nms_thresh=0.3)
    assert [scores_of(f) for f in final] == [[[0.9], [0.4]], [[], []], [[0.95], [0.5]]]
    # one process: the merged threshold is its own
    np.testing.assert_array_equal(merged_thresholds([cap.thresh], stored, cap.limit), cap.thresh)


def test_master_caps_before_nms_coco_after():
    """Master keeps the top max_per_image per class *before* NMS; the coco branch caps
    after NMS and over all classes."""
    boxes = np.array([[0, 0, 50, 50], [2, 2, 52, 52], [200, 0, 250, 50]], np.float32)
    scores = np.zeros((3, 2), np.float32)
    scores[:, 1] = [0.9, 0.8, 0.7]  # RoI 1 overlaps RoI 0; RoI 2 stands alone
    boxes = np.tile(boxes, (1, 2))
    cap = RunningCap(2, 1, max_per_image=2)
    master = master_finish([cap.add(scores, boxes)], cap.thresh, 0.3)[0]
    assert scores_of(master) == [[0.9]]  # 0.8 suppressed; 0.7 never made the top 2
    assert scores_of(coco_postprocess(scores, boxes, 0.05, 0.3, 2)) == [[0.9, 0.7]]


def _run(parts: list[list[int]], images, num_classes, max_per_image, max_per_set):
    """Each part (a process's images, in order) through its own cap, then the merge."""
    n = sum(len(p) for p in parts)
    caps, stored = [], {}
    for part in parts:
        cap = RunningCap(num_classes, n, max_per_image, max_per_set)
        for i in part:
            stored[i] = cap.add(*images[i])
        caps.append(cap)
    ordered = [stored[i] for i in range(n)]
    thresh = merged_thresholds([c.thresh for c in caps], ordered, caps[0].limit)
    return thresh, master_finish(ordered, thresh, 0.3)


@pytest.mark.parametrize("decimals", [1, 6])  # 1 decimal: many tied scores
def test_master_merged_over_processes_equals_one_pass_and_the_closed_form(decimals):
    rng = np.random.default_rng(decimals)
    images = []
    for _ in range(7):
        r = int(rng.integers(3, 20))
        scores = rng.random((r, 4)).round(decimals).astype(np.float32)
        xy = rng.uniform(0, 200, (r, 2))
        box = np.hstack([xy, xy + rng.uniform(5, 60, (r, 2))]).astype(np.float32)
        images.append((scores, np.tile(box, (1, 4))))
    one = _run([list(range(7))], images, 4, 5, 2)
    for parts in ([[0, 2, 4, 6], [1, 3, 5]], [[0, 3, 6], [1, 4], [2, 5]], [[6], list(range(6))]):
        thresh, final = _run(parts, images, 4, 5, 2)
        np.testing.assert_array_equal(thresh, one[0])
        for a, b in zip(final, one[1]):
            assert [x.tolist() for x in a] == [x.tolist() for x in b]
    # closed form: the 14th best of every image's top-5 per class, once more than 14
    for j in range(1, 4):
        top = np.concatenate([np.sort(s[:, j])[::-1][:5] for s, _ in images])
        expected = np.sort(top)[::-1][13] if len(top) > 14 else -np.inf
        assert one[0][j] == pytest.approx(expected)


def test_nms_suppresses_at_equal_overlap_like_fast_rcnns_cython_nms():
    # IoU of the two boxes with +1 areas: inter 5x10 = 50, union 100 + 100 - 50 = 150 -> 1/3
    dets = np.array([[0, 0, 9, 9, 0.9], [5, 0, 14, 9, 0.8]], np.float32)
    iou = 50 / 150
    assert nms(dets, np.float32(iou)).tolist() == [0]  # nms.pyx: ovr >= thresh suppresses
    assert nms(dets, iou + 1e-6).tolist() == [0, 1]


def test_defaults_are_master_and_each_key_belongs_to_its_post_processing():
    cfg = DetectionConfig()
    assert (cfg.test_postprocess, cfg.max_per_image, cfg.max_per_set, cfg.nms) == (
        "master", 100, 40, 0.3
    )
    check_test_postprocess(cfg)
    check_test_postprocess(DetectionConfig(test_postprocess="coco"))
    with pytest.raises(ConfigError, match="score_thresh: applies to test_postprocess: coco"):
        check_test_postprocess(DetectionConfig(score_thresh=0.01))
    with pytest.raises(ConfigError, match="max_per_set: applies to test_postprocess: master"):
        check_test_postprocess(DetectionConfig(test_postprocess="coco", max_per_set=10))
