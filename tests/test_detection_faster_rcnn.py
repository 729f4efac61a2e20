"""Faster R-CNN R50-C4 for ResNet encoders: detectron2's schedule, resizing and losses, the
network's shapes, a whole run on the synthetic VOC07+12 (its detections file scored by an
independent devkit loop), and a kill -9 resumed bit-identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_detection_eval import devkit_ap

from benchmark.config import from_dict
from benchmark.datasets.voc import VOC_CLASSES
from benchmark.errors import BenchError
from encoders.resnet import ResNetEncoder
from transfer.detection.config import DetectionConfig, FasterRCNNConfig
from transfer.detection.data import load_records
from transfer.detection.evaluate import read_results_files
from transfer.detection.faster_rcnn import (
    FasterRCNNC4,
    FrozenBatchNorm,
    fast_rcnn_losses,
    lr_at,
    param_groups,
)
from transfer.detection.faster_rcnn_train import TrainSet, output_size
from transfer.detection.train import check

REPO = Path(__file__).resolve().parents[1]
# Tiny settings of the same network: few RoIs and proposals, ~128 px images.
SMALL = {
    "min_size_train": [128], "max_size_train": 160, "min_size_test": 128, "max_size_test": 160,
    "precise_bn_iters": 2, "roi_batch_size_per_image": 16, "rpn_pre_nms_topk_train": 200,
    "rpn_post_nms_topk_train": 32, "rpn_pre_nms_topk_test": 200, "rpn_post_nms_topk_test": 16,
    "score_thresh_test": 0.0,  # random heads score about 1/21: keep their boxes to score them
}  # fmt: skip


def tiny_encoder() -> ResNetEncoder:
    torch.manual_seed(0)
    return ResNetEncoder((1, 1, 1, 1), 8)


def test_lr_schedule_is_warmup_multistep():
    """detectron2's WarmupMultiStepLR at MoCo's values: linear from lr / 1000 over 100
    iterations, x0.1 at 18000 and 22000."""
    at = lambda i: lr_at(0.02, (18000, 22000), 0.1, 100, 0.001, i)  # noqa: E731
    assert at(0) == pytest.approx(0.02 * 0.001)
    assert at(50) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert at(100) == at(17999) == pytest.approx(0.02)
    assert at(18000) == pytest.approx(0.002) and at(22000) == pytest.approx(0.0002)


def test_resize_follows_resize_shortest_edge():
    assert output_size(375, 500, 800, 1333) == (800, 1067)  # int(1066.67 + 0.5)
    assert output_size(500, 375, 480, 1333) == (640, 480)
    assert output_size(100, 1000, 800, 1333) == (133, 1333)  # longer side capped


def test_train_item_scales_and_mirrors_boxes(synth_root):
    recs = load_records(synth_root / "VOCdevkit" / "VOC2007", "trainval")
    c = from_dict(FasterRCNNConfig, {"min_size_train": [64], "max_size_train": 1000})
    ds = TrainSet(recs, c, seed=0, convention=ResNetEncoder.input_convention)
    flips = []
    for sample in range(8):
        item = ds[(0, sample)]
        r = recs[0]
        h, w = item["image"].shape[1:]
        assert min(h, w) == 64
        boxes = r.gt_boxes.copy()
        boxes[:, 2:] += 1.0  # detectron2: x1 - 1, y1 - 1, x2, y2 of the XML
        flipped = not np.allclose(item["target"]["boxes"][:, 0].numpy(), boxes[:, 0] * w / r.width)
        if flipped:
            boxes[:, [0, 2]] = r.width - boxes[:, [2, 0]]
        flips.append(flipped)
        expect = boxes * np.array([w / r.width, h / r.height] * 2)
        np.testing.assert_allclose(item["target"]["boxes"].numpy(), expect, rtol=1e-5)
        assert ds[(0, sample)]["image"].equal(item["image"])  # a function of the sample
    assert any(flips) and not all(flips)


def test_network_shapes_losses_and_freezing():
    cfg = from_dict(FasterRCNNConfig, {**SMALL, "freeze_at": 2})
    model = FasterRCNNC4(tiny_encoder(), cfg)
    assert not any(p.requires_grad for p in model.backbone.res2.parameters())
    assert all(p.requires_grad for p in model.backbone.res3.parameters())
    assert isinstance(model.backbone.stem[1], FrozenBatchNorm)
    assert isinstance(model.roi_heads.box_head.norm, torch.nn.BatchNorm2d)  # MoCo's extra BN
    images = torch.randn(2, 3, 128, 160)
    boxes = [[10.0, 20.0, 90.0, 100.0], [0.0, 0.0, 50.0, 60.0]]
    targets = [{"boxes": torch.tensor([b]), "labels": torch.tensor([k])}
               for b, k in zip(boxes, (3, 7))]  # fmt: skip
    model.train()
    losses = model(images, [(128, 160), (120, 150)], targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad is not None
    model.eval()
    out = model(images[:1], [(128, 160)])
    assert set(out[0]) == {"boxes", "scores", "labels"} and len(out[0]["boxes"]) <= 100
    groups = param_groups(model, 1e-4, 0.0)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0] and groups[1]["params"]


def test_fast_rcnn_loss_is_detectron2s():
    logits = torch.zeros(4, 21)
    deltas = torch.zeros(4, 84)
    deltas[0, 4 * 3 : 4 * 3 + 4] = torch.tensor([1.0, -1.0, 0.5, 0.0])
    labels = torch.tensor([3, 0, 0, 0])
    targets = torch.zeros(4, 4)
    loss_cls, loss_box = fast_rcnn_losses(logits, deltas, labels, targets)
    assert loss_cls == pytest.approx(np.log(21))
    assert loss_box == pytest.approx(2.5 / 4)  # L1 over the gt class, / all RoIs


def test_vit_refused_in_one_line(tmp_path):
    pytest.importorskip("timm")
    from encoders import vit_module

    enc = vit_module().from_config({"embed_dim": 48, "depth": 1, "num_heads": 3,
                                    "patch_size": 16, "img_size": 32})  # fmt: skip
    torch.save(enc.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(BenchError, match="no reference protocol for ViT"):
        check(DetectionConfig(weights=str(tmp_path / "vit.pth")))


def bench(args: list[str], out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("BENCH_FAULT", None)
    if fault:
        env["BENCH_FAULT"] = fault
    cmd = [sys.executable, "-m", "bench.cli", *args, "--out", str(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def straight_killed_resumed(args: list[str], out: Path) -> tuple[dict, dict]:
    """`bench` run straight, and run again killed with SIGKILL after step 3 then resumed:
    the two metrics.json."""
    straight = bench([*args, "--name", "straight"], out)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = bench([*args, "--name", "cut"], out, fault="step:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = bench([*args, "--name", "cut", "--resume"], out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    runs = out / "runs"
    a, b = (json.loads((runs / n / "metrics.json").read_text()) for n in ("straight", "cut"))
    return a, b


@pytest.mark.slow
def test_run_scores_as_the_devkit_and_resumes_bit_identically(synth_root, tmp_path):
    torch.save(tiny_encoder().state_dict(), tmp_path / "tiny-r50.pth")
    sets = [f"faster_rcnn.{k}={json.dumps(v)}" for k, v in SMALL.items()] + [
        "faster_rcnn.train.iterations=4", "faster_rcnn.train.ims_per_batch=2",
        "faster_rcnn.train.checkpoint_every=2", "faster_rcnn.train.log_every=1",
        "faster_rcnn.train.workers=0", "faster_rcnn.train.threads=1",
    ]  # fmt: skip
    args = ["transfer", "--task", "detection", "--data", str(synth_root), "--device", "cpu",
            "--weights", str(tmp_path / "tiny-r50.pth")]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    out = tmp_path / "results"
    a, b = straight_killed_resumed(args, out)
    runs = out / "runs"
    assert a["model"] == "faster-rcnn-r50-c4" and a["train_images"] == 24  # VOC07 + VOC12
    skip = {"command", "train_seconds", "test_seconds"}
    assert {k: v for k, v in a.items() if k not in skip} == {
        k: v for k, v in b.items() if k not in skip}  # fmt: skip
    wa, wb = (torch.load(runs / n / "checkpoints" / "last.pt", weights_only=True)["state"]["model"]
              for n in ("straight", "cut"))  # fmt: skip
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # the detections file, read back and scored by VOCevaldet's loop, gives the run's AP50
    voc07 = synth_root / "VOCdevkit" / "VOC2007"
    records = load_records(voc07, "test")
    dets = read_results_files(runs / "straight" / "detections")
    assert sum(map(len, dets.values())) > 0
    ref = [devkit_ap(dets[c], records, c) for c in VOC_CLASSES]
    assert a["map"] == pytest.approx(float(np.nanmean(ref)), abs=1e-4)
    assert a["map"] > 0 and 0 <= a["ap"] <= a["ap50"] and a["ap75"] <= a["ap50"]


def test_settings_of_the_other_model_are_refused_not_ignored():
    from benchmark.errors import ConfigError
    from transfer.segmentation.config import SegmentationConfig
    from transfer.segmentation.train import check as seg_check

    r50 = from_dict(DetectionConfig, {"arch": "resnet50", "train": {"iterations": 5}})
    with pytest.raises(ConfigError, match="train.iterations: applies to AlexNet encoders"):
        check(r50)
    check(from_dict(DetectionConfig, {"arch": "resnet50",
                                      "faster_rcnn": {"train": {"iterations": 5}}}))  # fmt: skip
    alexnet = from_dict(DetectionConfig, {"faster_rcnn": {"min_size_test": 600}})
    with pytest.raises(ConfigError, match="faster_rcnn.min_size_test: applies to ResNet"):
        check(alexnet)
    with pytest.raises(ConfigError, match="variant: applies to AlexNet encoders"):
        seg_check(from_dict(SegmentationConfig, {"arch": "resnet50", "variant": "fcn8s"}))
