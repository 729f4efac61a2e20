"""Mean IU of the segmentation pipeline against hand-made cases and an independent count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from benchmark.datasets.voc import VOC_PALETTE, SegSample
from benchmark.distributed import DistEnv
from benchmark.input_convention import CAFFE
from benchmark.loop import Precision
from benchmark.metrics import confusion_matrix
from transfer.segmentation.config import SegmentationTrainConfig
from transfer.segmentation.data import CLASSES
from transfer.segmentation.evaluate import NUM_CLASSES, evaluate, scores_from_hist
from transfer.segmentation.train import make_step, pixel_loss

CPU = DistEnv(0, 1, 0, torch.device("cpu"))


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
    hist, kept = evaluate(FixedPredictions(preds), samples, None, CPU, keep=2, convention=CAFFE)
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


class PixelScores(nn.Module):
    """A 1x1 convolution scoring each pixel, resized to the label's size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return nn.functional.interpolate(self.conv(x), size=out_size, mode="bilinear")


def test_update_accumulates_iter_size_images_each_weighted_by_their_number() -> None:
    """One update = iter_size x batch_size single-image passes; the accumulated gradient is
    that of the mean of their (pixel-normalised) losses, as Caffe's iter_size divides it."""
    from transfer.segmentation.data import to_input

    rng = np.random.default_rng(0)
    batch = []
    for h, w in ((9, 13), (11, 7), (8, 8), (12, 10)):  # different sizes: one pass each
        label = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
        label[0] = 255
        batch.append((rng.integers(0, 256, (h, w, 3), dtype=np.uint8), label))
    torch.manual_seed(0)
    model = PixelScores()
    reference = PixelScores()
    reference.load_state_dict(model.state_dict())
    train = SegmentationTrainConfig(iter_size=2, batch_size=2, lr=1.0, momentum=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    precision = Precision("fp32", CPU.device)
    step = make_step(model, optimizer, train, True, precision, CPU.device, CAFFE)
    out = step(batch, 0)

    losses = [
        pixel_loss(reference(to_input(im, CPU.device, CAFFE), tuple(lab.shape)),
                   torch.from_numpy(lab).long()[None], True)
        for im, lab in batch
    ]  # fmt: skip
    mean = torch.stack(losses).mean()
    mean.backward()
    assert out["loss"] == pytest.approx(float(mean.detach()), rel=1e-5)  # the mean, not the sum
    # SGD at lr 1 moves by the gradient of the mean: each image weighs 1/4 (a weight of
    # 1/iter_size or 1 per image would move twice or four times as far)
    for p, r in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.detach(), r.detach() - r.grad, atol=1e-5)
