"""Mean IU of the segmentation pipeline against hand-made cases and an independent count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from benchmark.datasets.voc import VOC_PALETTE, SegSample
from benchmark.metrics import confusion_matrix
from transfer.segmentation.engine import NUM_CLASSES, evaluate, pixel_loss, scores_from_hist
from transfer.segmentation.main import CLASSES


def independent_scores(preds: list[np.ndarray], labels: list[np.ndarray], n: int) -> dict:
    """IU per class from boolean masks over all images at once (no confusion matrix)."""
    p = np.concatenate([x.ravel() for x in preds]).astype(int)
    t = np.concatenate([x.ravel() for x in labels]).astype(int)
    valid = t != 255
    p, t = p[valid], t[valid]
    ius, accs = [], []
    for c in range(n):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        if union:
            ius.append(inter / union)
        if np.sum(t == c):
            accs.append(inter / np.sum(t == c))
    return {"mean_iu": np.mean(ius), "mean_acc": np.mean(accs), "pixel_acc": np.mean(p == t)}


def test_hand_made_case() -> None:
    label = np.array([[0, 0, 1], [1, 255, 2]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [1, 2, 0]], dtype=np.uint8)
    s = scores_from_hist(confusion_matrix(pred, label, 3), ("bg", "a", "b"))
    # class 0: inter 1, union {0,0},(0,1),(1,2) = 3; class 1: inter 2, union 3; class 2: 0/1.
    assert s["per_class"] == pytest.approx({"bg": 1 / 3, "a": 2 / 3, "b": 0.0})
    assert s["mean_iu"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert s["pixel_acc"] == pytest.approx(3 / 5)  # the 255 pixel's prediction is ignored
    assert s["mean_acc"] == pytest.approx((1 / 2 + 2 / 2 + 0) / 3)


def test_random_maps_with_ignore_match_independent_count() -> None:
    rng = np.random.default_rng(0)
    preds, labels = [], []
    hist = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for _ in range(6):
        h, w = rng.integers(5, 40, size=2)
        label = rng.integers(0, 15, size=(h, w)).astype(np.uint8)  # classes 15-20 absent...
        label[rng.random((h, w)) < 0.2] = 255
        pred = np.where(rng.random((h, w)) < 0.6, label, rng.integers(0, 18, size=(h, w)))
        pred = np.where(pred == 255, 0, pred).astype(np.uint8)  # ...but 15-17 predicted
        preds.append(pred)
        labels.append(label)
        hist += confusion_matrix(pred, label, NUM_CLASSES)
    ours = scores_from_hist(hist, CLASSES)
    ref = independent_scores(preds, labels, NUM_CLASSES)
    for key in ("mean_iu", "mean_acc", "pixel_acc"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12)
    # classes never predicted nor present are left out (None), predicted-only count as 0
    assert ours["per_class"][CLASSES[20]] is None
    assert ours["per_class"][CLASSES[16]] == 0.0


class FixedPredictions(nn.Module):
    """Returns one-hot scores of pre-set prediction maps, one per call."""

    def __init__(self, preds: list[np.ndarray]) -> None:
        super().__init__()
        self.preds = list(preds)

    def forward(self, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        pred = torch.from_numpy(self.preds.pop(0)).long()
        assert tuple(pred.shape) == tuple(out_size)
        return nn.functional.one_hot(pred, NUM_CLASSES).permute(2, 0, 1)[None].float()


def test_evaluate_pipeline_on_files(tmp_path) -> None:
    """evaluate(): PNG masks read from disk, argmax, accumulation over images."""
    rng = np.random.default_rng(1)
    samples, preds, labels = [], [], []
    for k in range(4):
        h, w = 17 + k, 23 - k
        label = rng.integers(0, NUM_CLASSES, size=(h, w)).astype(np.uint8)
        label[rng.random((h, w)) < 0.3] = 255
        pred = rng.integers(0, NUM_CLASSES, size=(h, w)).astype(np.uint8)
        mask = Image.fromarray(label, mode="P")
        mask.putpalette(VOC_PALETTE.flatten().tolist())
        mask.save(tmp_path / f"{k}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{k}.jpg")
        samples.append(SegSample(str(k), tmp_path / f"{k}.jpg", tmp_path / f"{k}.png"))
        preds.append(pred)
        labels.append(label)
    hist, kept = evaluate(FixedPredictions(preds), samples, None, torch.device("cpu"), keep=2)
    ours = scores_from_hist(hist, CLASSES)
    ref = independent_scores(preds, labels, NUM_CLASSES)
    assert ours["mean_iu"] == pytest.approx(ref["mean_iu"], abs=1e-12)
    assert ours["pixel_acc"] == pytest.approx(ref["pixel_acc"], abs=1e-12)
    assert len(kept) == 2 and np.array_equal(kept[1][3], preds[1])


def test_loss_ignores_255_and_normalises() -> None:
    scores = torch.randn(1, NUM_CLASSES, 4, 5)
    label = torch.randint(0, NUM_CLASSES, (1, 4, 5))
    label[0, :2] = 255
    per_pixel = -torch.log_softmax(scores, 1).gather(1, label.clamp(max=20)[:, None])[:, 0]
    keep = label != 255
    assert pixel_loss(scores, label, True) == pytest.approx(float(per_pixel[keep].mean()))
    assert pixel_loss(scores, label, False) == pytest.approx(float(per_pixel[keep].sum()))
