"""The real ResNet-50 and ViT-S/16 end to end through the command line: a MoCo v2 checkpoint
of torchvision's ResNet-50 and a DINO checkpoint of timm's ViT-S/16 (random weights, written
here as those tools save them) run the SVM (one layer, small low-shot), the k-NN and 2
iterations of classification fine-tuning on the synthetic VOC2007, and appear in the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from bench.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_SVM = ["--set", "costs=[0.1,1.0]", "--set", "folds=2", "--set", "low_shot_sizes=[1]",
             "--set", "low_shot_draws=1", "--set", "low_shot_negatives=2", "--set",
             "on_bad_data=skip", "--set", "workers=0", "--set", "batch_size=12"]  # fmt: skip
SHORT_CLS = ["--iterations", "2", "--set", "train.batch_size=2", "--set", "train.workers=0",
             "--set", "test.mode=center", "--set", "test.batch_size=12"]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from timm.models.vision_transformer import VisionTransformer

    root = tmp_path_factory.mktemp("real")
    torch.manual_seed(0)
    r50 = torchvision.models.resnet50(weights=None)
    r50.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))  # MoCo v2
    state = {f"module.encoder_q.{k}": v for k, v in r50.state_dict().items()}
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state}, root / "moco_v2.pth.tar")
    vit = VisionTransformer(embed_dim=384, depth=12, num_heads=6, num_classes=0)  # ViT-S/16
    teacher = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    teacher["head.last_layer.weight_g"] = torch.ones(65536, 1)
    student = {f"module.{k}": v for k, v in teacher.items()}  # DDP-wrapped, as main_dino saves
    torch.save({"student": student, "teacher": teacher, "epoch": 100}, root / "dino_vits16.pth")
    return {"resnet": root / "moco_v2.pth.tar", "vit": root / "dino_vits16.pth"}


def _run(argv: list[str], capsys) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    folder = capsys.readouterr().out.split("run folder: ")[1].split("\n")[0]
    return json.loads((Path(folder) / "metrics.json").read_text())


def test_resnet50_and_vit_s16_svm_lowshot_knn_classification_and_report(
    checkpoints, synth_root, tmp_path, capsys
):
    data = str(synth_root / "VOCdevkit" / "VOC2007")
    common = ["--data", data, "--out", str(tmp_path), "--device", "cpu"]
    cache = ["--set", f"cache_dir={tmp_path / 'cache'}"]
    r50, vits = str(checkpoints["resnet"]), str(checkpoints["vit"])

    svm = _run(["transfer", "--task", "svm", "--weights", r50, "--weights-format", "moco",
                *common, *cache, *SMALL_SVM, "--set", "layers=[res5]"], capsys)  # fmt: skip
    assert (svm["family"], svm["arch"], svm["input_size"]) == ("resnet", "resnet50", 224)
    assert svm["per_layer"]["res5"]["feature"]["dim"] == 8192 and "res5" in svm["low_shot"]
    knn = _run(["transfer", "--task", "knn", "--weights", r50, *common, *cache,
                "--set", "workers=0", "--set", "k=5"], capsys)  # fmt: skip
    assert knn["layer"] == "res5avg" and knn["feature"]["dim"] == 2048
    cls = _run(["transfer", "--task", "classification", "--weights", r50, *common, *SHORT_CLS,
                "--set", "augment.crop=64"], capsys)  # fmt: skip
    assert cls["family"] == "resnet" and cls["iterations"] == 2 and cls["crop"] == 64

    svm = _run(["transfer", "--task", "svm", "--weights", vits, *common, *cache, *SMALL_SVM,
                "--set", "layers=[cls4]"], capsys)  # fmt: skip
    assert (svm["family"], svm["arch"]) == ("vit", "vit_small_patch16_224")
    assert svm["per_layer"]["cls4"]["feature"]["dim"] == 4 * 384
    knn = _run(["transfer", "--task", "knn", "--weights", vits, *common, *cache,
                "--set", "workers=0", "--set", "k=5"], capsys)  # fmt: skip
    assert knn["layer"] == "cls" and knn["feature"]["dim"] == 384
    cls = _run(["transfer", "--task", "classification", "--weights", vits, *common, *SHORT_CLS],
               capsys)  # fmt: skip
    assert cls["family"] == "vit" and cls["crop"] == 224 and cls["map"] is not None

    report = tmp_path / "report"
    assert main(["report", str(tmp_path / "runs"), "--out", str(report)]) == 0
    capsys.readouterr()
    text = (report / "families.md").read_text()
    assert "ResNet-50" in text and "ViT" in text
    assert "moco_v2" in text and "dino_vits16" in text
