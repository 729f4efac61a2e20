"""The detectron2 adapter of R50-C4: its config holds MoCo's values (checked without
detectron2), the encoder's keys are renamed as MoCo's converter renames them, and, where
detectron2 is importable, a short run trains, resumes bit-identically and scores."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from test_detection_faster_rcnn import SMALL, bench

from encoders.resnet import ResNetEncoder
from transfer.detection.config import FasterRCNNConfig
from transfer.detection.detectron2_r50c4 import d2_settings, d2_state

# facebookresearch/moco@3402035 detection/configs: pascal_voc_R_50_C4_24k_moco.yaml,
# pascal_voc_R_50_C4_24k.yaml, Base-RCNN-C4-BN.yaml, as written there
MOCO = {
    "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
    "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "INPUT.FORMAT": "RGB",
    "MODEL.MASK_ON": False,
    "MODEL.ROI_HEADS.NUM_CLASSES": 20,
    "INPUT.MIN_SIZE_TRAIN": [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
    "INPUT.MIN_SIZE_TEST": 800,
    "SOLVER.STEPS": [18000, 22000],
    "SOLVER.MAX_ITER": 24000,
    "SOLVER.WARMUP_ITERS": 100,
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.RESNETS.NORM": "naiveSyncBN",
    "TEST.PRECISE_BN.ENABLED": True,
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.BASE_LR": 0.02,
}


def test_settings_hold_mocos_config_values():
    settings = d2_settings(FasterRCNNConfig(), ResNetEncoder.input_convention)
    for key, value in MOCO.items():
        got = settings[key]
        if isinstance(value, list) and value and isinstance(value[0], float):
            assert got == pytest.approx(value), key
        else:
            assert got == value, key


def moco_converter(key: str) -> str:
    """MoCo's convert-pretrain-to-detectron2.py (L26-33) on a key without its prefix."""
    if "layer" not in key:
        key = "stem." + key
    for t in [1, 2, 3, 4]:
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in [1, 2, 3]:
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def test_encoder_keys_are_renamed_as_mocos_converter_does():
    state = ResNetEncoder((1, 1, 1, 1), 8).state_dict()
    renamed = d2_state(state)
    assert len(renamed) == len(state)
    for key, value in state.items():
        expect = moco_converter(key)
        where = "roi_heads." if expect.startswith("res5") else "backbone."
        assert renamed[where + expect] is value
    assert "backbone.stem.conv1.norm.running_var" in renamed
    assert "roi_heads.res5.0.shortcut.norm.weight" in renamed


@pytest.mark.slow
def test_detectron2_run_resumes_bit_identically(synth_root, tmp_path):
    pytest.importorskip("detectron2")
    torch.manual_seed(0)
    torch.save(ResNetEncoder((1, 1, 1, 1), 64).state_dict(), tmp_path / "r.pth")
    sets = [f"faster_rcnn.{k}={json.dumps(v)}" for k, v in SMALL.items()] + [
        "faster_rcnn.train.iterations=4", "faster_rcnn.train.ims_per_batch=2",
        "faster_rcnn.train.checkpoint_every=2", "faster_rcnn.train.workers=0",
        "faster_rcnn.train.threads=1", "backend=detectron2",
    ]  # fmt: skip
    args = ["transfer", "--task", "detection", "--data", str(synth_root), "--device", "cpu",
            "--weights", str(tmp_path / "r.pth")]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    out = tmp_path / "results"
    assert bench([*args, "--name", "a"], out).returncode == 0
    killed = bench([*args, "--name", "b"], out, fault="step:3")
    assert killed.returncode == -signal.SIGKILL
    assert bench([*args, "--name", "b", "--resume"], out).returncode == 0
    a, b = (json.loads((out / "runs" / n / "metrics.json").read_text()) for n in "ab")
    skip = {"command", "train_seconds", "test_seconds", "seconds"}
    assert {k: v for k, v in a.items() if k not in skip} == {
        k: v for k, v in b.items() if k not in skip}  # fmt: skip
    assert a["backend"] == "detectron2" and a["model"] == "faster-rcnn-r50-c4"
