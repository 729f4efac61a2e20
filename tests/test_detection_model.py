"""Fast R-CNN pieces: RoI geometry and sampling, the network, the loss, test-time NMS."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.input_convention import CAFFE
from benchmark.loop import IterationSampler
from encoders.alexnet import AlexNetEncoder
from transfer.detection.config import DetectionConfig, DetectionTrainConfig
from transfer.detection.data import (
    DetRecord,
    TrainSet,
    bbox_normalisation,
    flip_boxes,
    image_scale,
    usable_for_training,
)
from transfer.detection.inference import coco_postprocess, nms
from transfer.detection.model import FastRCNN, fast_rcnn_loss, param_groups
from transfer.detection.sampling import (
    box_iou,
    decode_boxes,
    encode_boxes,
    label_rois,
    sample_rois,
    target_stats,
)
from transfer.detection.train import lr_at


def test_box_iou_uses_inclusive_pixels():
    a = np.array([[0, 0, 9, 9]])  # 10 x 10 pixels
    b = np.array([[5, 0, 14, 9], [10, 10, 19, 19]])
    assert box_iou(a, b)[0] == pytest.approx([50 / 150, 0.0])


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    rois = np.sort(rng.uniform(0, 200, (50, 4)).reshape(50, 2, 2), axis=1).transpose(0, 2, 1)
    rois = rois.reshape(50, 4)[:, [0, 2, 1, 3]]
    gt = rois + rng.normal(0, 5, rois.shape)
    gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 1)
    back = decode_boxes(rois, encode_boxes(rois, gt).astype(np.float64))
    assert back == pytest.approx(gt, abs=1e-3)


def test_sampling_follows_fast_rcnn_bands():
    rng = np.random.default_rng(0)
    gt = np.array([[20, 20, 80, 80], [100, 30, 160, 120]], np.float32)
    props = rng.uniform(0, 150, (2000, 2))
    props = np.hstack([props, props + rng.uniform(5, 90, (2000, 2))]).astype(np.float32)
    rois = label_rois(props, gt, np.array([3, 7]))
    assert len(rois.boxes) == 2002 and (rois.max_overlap[:2] == 1).all()  # gt boxes added
    idx = sample_rois(rois, 64, 0.25, 0.5, 0.5, 0.1, rng)
    ov = rois.max_overlap[idx]
    fg = ov >= 0.5
    assert len(idx) == 64 and fg.sum() == 16 and len(set(idx.tolist())) == 64
    assert ((ov[~fg] >= 0.1) & (ov[~fg] < 0.5)).all()
    assert set(rois.labels[idx][fg].tolist()) <= {3, 7}
    few = label_rois(props[:0], gt, np.array([3, 7]))
    assert len(sample_rois(few, 64, 0.25, 0.5, 0.5, 0.1, rng)) == 2  # only the gt boxes


def test_target_stats_per_class():
    gt = np.array([[0, 0, 99, 99]], np.float32)
    props = np.array([[10, 0, 109, 99], [0, 0, 89, 99]], np.float32)
    stats_means, stats_stds = target_stats([label_rois(props, gt, np.array([5]))], 20)
    t = encode_boxes(np.vstack([gt, props]), np.repeat(gt, 3, 0))
    assert stats_means[5] == pytest.approx(t.mean(0), abs=1e-6)
    assert stats_stds[5] == pytest.approx(np.where(t.std(0) > 1e-6, t.std(0), 1.0), abs=1e-6)
    assert (stats_stds[1] == 1).all() and (stats_means[0] == 0).all()


def test_flip_and_scale():
    boxes = np.array([[0, 5, 9, 20]], np.float32)
    assert flip_boxes(boxes, 100).tolist() == [[90, 5, 99, 20]]
    assert np.array_equal(flip_boxes(flip_boxes(boxes, 100), 100), boxes)
    assert image_scale(375, 500, 600, 1000) == pytest.approx(1.6)
    assert image_scale(300, 1000, 600, 1000) == pytest.approx(1.0)  # longer side capped


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_training_order_is_resumable_and_each_epoch_visits_every_entry():
    """Fast R-CNN's minibatches (2 images) come from the loop's IterationSampler over the
    entries (images and their mirror images): a resumed stream repeats the tail exactly."""
    full = _take(IterationSampler(10, 2, seed=3), 25)
    tail = _take(IterationSampler(10, 2, seed=3, start=13), 12)
    assert full[13:] == tail
    items = [x for batch in full for x in batch]
    assert [k for _, k in items] == list(range(50))  # sample numbers run on across batches
    for epoch in range(5):  # each epoch visits every entry once
        assert sorted(e for e, k in items if k // 10 == epoch) == list(range(10))
    assert [e for e, _ in items[:10]] != [e for e, _ in items[10:20]]  # reshuffled per epoch
    assert _take(IterationSampler(10, 2, seed=4), 5) != full[:5]


def _record(tmp_path: Path) -> DetRecord:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "1.png")
    props = rng.uniform(0, 40, (200, 2))
    props = np.hstack([props, props + rng.uniform(5, 35, (200, 2))]).astype(np.float32)
    return DetRecord(
        "1", tmp_path / "1.png", 80, 60, np.array([[10, 10, 49, 39]], np.float32),
        np.array([4]), np.array([False]), props,
    )  # fmt: skip


def test_train_set_items_are_a_function_of_entry_and_sample_number(tmp_path):
    rec = _record(tmp_path)
    ds = TrainSet(
        [rec], flip=True, scales=(60, 90), max_size=200, rois_per_image=16, fg_fraction=0.25,
        fg_thresh=0.5, bg_thresh_hi=0.5, bg_thresh_lo=0.1, use_difficult=False,
        bbox_means=np.zeros((21, 4), np.float32), bbox_stds=np.ones((21, 4), np.float32), seed=0,
        convention=CAFFE,
    )  # fmt: skip
    assert len(ds) == ds.num_entries == 2  # the image and its mirror image
    a, b = ds[(0, 5)], ds[(0, 5)]
    assert all(torch.equal(a[k], b[k]) for k in a)  # a resumed run gets the same minibatch
    assert len(a["rois"]) == 16 and (a["labels"] > 0).sum() <= 4
    draws = [ds[(0, k)] for k in range(6)]
    assert len({d["image"].shape for d in draws}) == 2  # the scale is drawn per sample number
    assert any(not torch.equal(d["rois"], draws[0]["rois"]) for d in draws[1:])
    same = next(d for d in draws if d["image"].shape == a["image"].shape)
    mirrored = next(ds[(1, k)] for k in range(20) if ds[(1, k)]["image"].shape == a["image"].shape)
    # entry 1 is the mirror image (flipped before resizing: equal up to float rounding of
    # 0-255 pixels)
    assert torch.allclose(mirrored["image"], same["image"].flip(-1), atol=1e-3)


def test_network_shapes_gradients_and_frozen_conv1():
    torch.manual_seed(0)
    model = FastRCNN(AlexNetEncoder(), fc_dim=64, freeze_at=1)
    images = torch.randn(2, 3, 96, 128)
    rois = torch.tensor(
        [[0, 0, 0, 50, 40], [1, 10, 10, 120, 90], [1, 5, 5, 20, 20]], dtype=torch.float
    )
    scores, deltas = model(images, rois)
    assert scores.shape == (3, 21) and deltas.shape == (3, 84)
    labels = torch.tensor([4, 0, 20])
    loss_cls, loss_box = fast_rcnn_loss(scores, deltas, labels, torch.randn(3, 4))
    (loss_cls + loss_box).backward()
    for name, p in model.named_parameters():
        if name.startswith("features.0."):
            assert not p.requires_grad and p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert loss_cls.item() == pytest.approx(np.log(21), rel=0.05)  # N(0, 0.01) classifier


def test_box_loss_uses_only_the_gt_class_deltas():
    deltas = torch.zeros(2, 84)
    deltas[0, 4 * 3 : 4 * 3 + 4] = torch.tensor([1.0, 0.0, 0.0, 3.0])  # class 3 of RoI 0
    deltas[0, 4 * 5 : 4 * 5 + 4] = 100.0  # another class: must not count
    _, loss_box = fast_rcnn_loss(
        torch.zeros(2, 21), deltas, torch.tensor([3, 0]), torch.zeros(2, 4)
    )
    assert loss_box.item() == pytest.approx((0.5 + 2.5) / 2)  # smooth L1 summed, / RoIs


def test_bias_groups_follow_caffe():
    model = FastRCNN(AlexNetEncoder(), fc_dim=32, freeze_at=2)
    weights, biases = param_groups(model, 1e-3, 5e-4, 2.0)
    assert biases["lr"] == 2e-3 and biases["weight_decay"] == 0.0
    assert weights["weight_decay"] == 5e-4
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in (weights, biases) for p in g["params"]) == n_trainable


def test_lr_schedule():
    train = DetectionConfig().train
    assert lr_at(train, 0) == 1e-3 and lr_at(train, 29999) == 1e-3
    assert lr_at(train, 30000) == pytest.approx(1e-4)
    two = DetectionTrainConfig(lr=0.01, lr_steps=(5, 8), gamma=0.5)
    assert [lr_at(two, i) for i in (4, 5, 7, 8, 100)] == pytest.approx(
        [0.01, 0.005, 0.005, 0.0025, 0.0025]
    )


def test_nms_and_per_image_cap():
    dets = np.array([[0, 0, 9, 9, 0.9], [1, 1, 10, 10, 0.8], [50, 50, 60, 60, 0.7]], np.float32)
    assert nms(dets, 0.3).tolist() == [0, 2]
    assert nms(dets, 0.9).tolist() == [0, 1, 2]
    scores = np.zeros((3, 21), np.float32)
    scores[:, 1] = [0.9, 0.04, 0.5]
    scores[:, 2] = [0.3, 0.2, 0.1]
    boxes = np.tile(dets[:, :4], (1, 21))
    out = coco_postprocess(scores, boxes, score_thresh=0.05, nms_thresh=0.3, max_per_image=100)
    assert out[0][:, 4].tolist() == pytest.approx([0.9, 0.5])  # 0.04 is under the threshold
    assert out[1][:, 4].tolist() == pytest.approx([0.3, 0.1])  # 0.2 suppressed by 0.3
    capped = coco_postprocess(scores, boxes, 0.05, 0.3, max_per_image=2)
    assert sorted(np.concatenate([d[:, 4] for d in capped]).tolist()) == pytest.approx([0.5, 0.9])


def test_rescale_keeps_fast_rcnns_output_layers_and_frozen_conv1():
    from transfer.rescale import rescale_for_transfer_

    torch.manual_seed(0)
    images = torch.randn(2, 3, 128, 128)
    rois = torch.tensor([[0, 0, 0, 100, 90], [0, 30, 20, 127, 127], [1, 5, 5, 60, 60]] * 8).float()
    model = FastRCNN(AlexNetEncoder(), fc_dim=32, freeze_at=1)
    kept = ("cls", "bbox", "features.0.")
    heads = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(kept)}
    # Calibrated against fc7 (the output layers keep N(0, 0.01), N(0, 0.001)): fc7 ends with
    # unit std, so the scores stay small; calibrated against the scores, fc7 grew ~100x and
    # Fast R-CNN's fine-tuning diverged.
    model.eval()
    report = rescale_for_transfer_(model, lambda: model.head(images, rois), "features.", True, 0)
    names = {e["name"] for e in report}
    assert {"features.3", "fc6", "fc7"} <= names and not names & {"features.0", "cls_score"}
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in heads.items())
    with torch.no_grad():
        fc7 = model.head(images, rois)
        scores, _ = model(images, rois)
    assert 0.5 < fc7.std(0).mean() < 2.0
    assert scores.std() < 0.5


def test_bbox_normalisation_fixed_and_data():
    rec = DetRecord(
        "1", Path("1.jpg"), 200, 100,
        np.array([[10, 10, 59, 59]], np.float32), np.array([2]), np.array([False]),
        np.array([[12, 10, 61, 59], [10, 10, 69, 59], [100, 50, 150, 90]], np.float32),
    )  # fmt: skip
    cfg = DetectionConfig()

    def normalisation(mode, flip):
        return bbox_normalisation(
            [rec], mode, cfg.bbox_stds, flip, cfg.train_difficult, cfg.fg_thresh
        )

    assert cfg.bbox_normalize == "data"  # Fast R-CNN's; "fixed" is py-faster-rcnn's
    means, stds = normalisation("fixed", cfg.flip)
    assert means.shape == stds.shape == (21, 4) and (means == 0).all()
    assert stds[5].tolist() == pytest.approx([0.1, 0.1, 0.2, 0.2])
    means, stds = normalisation("data", True)
    assert means[2, 0] == pytest.approx(0.0, abs=1e-6)  # mirrored copies cancel dx
    assert means[2, 2] < 0 and stds[2, 2] > 0  # proposals wider than the gt: log(w) < 0
    assert (stds[1] == 1).all()


def test_images_without_a_usable_roi_are_left_out_of_training():
    only_difficult = DetRecord(
        "2", Path("2.jpg"), 100, 100, np.array([[10, 10, 59, 59]], np.float32),
        np.array([3]), np.array([True]), np.zeros((0, 4), np.float32),
    )  # fmt: skip
    assert not usable_for_training(only_difficult, False, 0.5, 0.5, 0.1)
    assert usable_for_training(only_difficult, True, 0.5, 0.5, 0.1)  # its gt box is fg


def test_folding_the_target_normalisation_keeps_the_predicted_boxes():
    """A regression layer trained on normalised targets predicts the same boxes once its
    means and stds are folded into its weights (Fast R-CNN's test-time network)."""
    from transfer.detection.inference import im_detect
    from transfer.detection.model import fold_box_normalisation_

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    means = rng.normal(0, 0.1, (21, 4)).astype(np.float32)
    stds = rng.uniform(0.05, 0.3, (21, 4)).astype(np.float32)
    means[0], stds[0] = 0, 1
    model = FastRCNN(AlexNetEncoder("caffenet"), fc_dim=16, bbox_means=means, bbox_stds=stds)
    torch.nn.init.normal_(model.bbox_pred.weight, 0, 0.5)  # a layer that has learned something
    torch.nn.init.normal_(model.bbox_pred.bias, 0, 0.5)
    model.eval()
    image = torch.randn(3, 160, 200)
    props = np.array([[10, 12, 90, 100], [40, 30, 150, 120], [0, 0, 199, 159]], np.float32)
    before = im_detect(model, image, props, 1.0, 160, 200, torch.device("cpu"))
    fold_box_normalisation_(model)
    assert torch.equal(model.bbox_stds, torch.ones(21, 4)) and not model.bbox_means.any()
    after = im_detect(model, image, props, 1.0, 160, 200, torch.device("cpu"))
    np.testing.assert_allclose(after[1], before[1], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(after[0], before[0])


def test_box_coding_is_fast_rcnns():
    """Widths x2 - x1 + EPS, no +1 (fast-rcnn@e107cae roidb.py _compute_targets, test.py
    _bbox_pred): a RoI equal to its gt box has zero targets, and decoding inverts encoding."""
    roi = np.array([[10.0, 20.0, 50.0, 80.0]])
    gt = np.array([[14.0, 18.0, 60.0, 70.0]])
    t = encode_boxes(roi, gt)
    np.testing.assert_allclose(t[0], [(37 - 30) / 40, (44 - 50) / 60, np.log(46 / 40),
                                      np.log(52 / 60)], rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(decode_boxes(roi, t.astype(np.float64)), gt, atol=1e-4)
    assert np.abs(encode_boxes(roi, roi)).max() < 1e-6
