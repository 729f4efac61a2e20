"""The probes (SVM per layer and low-shot, k-NN) and classification fine-tuning on ResNet and
ViT checkpoints read on the fly, end to end on the synthetic VOC2007: width-reduced
networks here; tests/test_real_shapes.py runs the real ResNet-50 and ViT-S/16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from benchmark.config import from_dict
from benchmark.errors import BenchError, ConfigError
from benchmark.runs import open_run
from encoders import ResNetEncoder
from transfer.classification.config import ClassificationConfig
from transfer.classification.train import main as main_cls
from transfer.knn.config import KNNConfig
from transfer.knn.train import main as main_knn
from transfer.probes.features import preprocess
from transfer.svm.config import SVMConfig
from transfer.svm.train import main as main_svm

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, WIDTH, SIDE = (1, 1, 1, 1), 8, 64
VIT = {"img_size": 32, "patch_size": 16, "embed_dim": 64, "depth": 4, "num_heads": 1}


@pytest.fixture(scope="module")
def moco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A MoCo v2 checkpoint (module.encoder_q.* with its MLP fc, encoder_k, queue)."""
    torch.manual_seed(0)
    net = ResNet(Bottleneck, list(LAYERS), width_per_group=WIDTH).eval()
    net.fc = nn.Sequential(nn.Linear(2048, 16), nn.ReLU(), nn.Linear(16, 8))
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    state.update({f"module.encoder_k.{k}": v for k, v in net.state_dict().items()})
    state["module.queue"] = torch.randn(8, 32)
    path = tmp_path_factory.mktemp("moco") / "mocov2_tiny.pth.tar"
    torch.save({"epoch": 1, "state_dict": state}, path)
    return path, net


@pytest.fixture(scope="module")
def dino(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    net = VisionTransformer(**VIT, num_classes=0)
    teacher = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.randn(16, 64)
    path = tmp_path_factory.mktemp("dino") / "dino_tiny.pth"
    torch.save({"teacher": teacher, "student": teacher, "epoch": 1}, path)
    return path


def _voc(synth_root: Path) -> str:
    return str(synth_root / "VOCdevkit" / "VOC2007")


def small_svm(synth_root, tmp_path, **over) -> SVMConfig:
    base = dict(
        data=_voc(synth_root), device="cpu", costs=(0.01, 1.0), folds=2, n_jobs=1,
        low_shot_sizes=(1,), low_shot_draws=2, low_shot_negatives=2, batch_size=8, workers=0,
        cache_dir=str(tmp_path / "cache"), on_bad_data="skip",
    )  # fmt: skip
    base.update(over)
    return SVMConfig(**base)


def test_resnet_checkpoint_svm_lowshot_knn(moco, synth_root, tmp_path):
    path, net = moco
    cfg = small_svm(synth_root, tmp_path, weights=str(path), input_size=SIDE,
                    layers=("conv1", "res5", "res5avg"), low_shot_layers=("res5avg",))  # fmt: skip
    metrics = main_svm(cfg, open_run(tmp_path / "svm", cfg))
    assert metrics["family"] == "resnet" and metrics["arch"] == "resnet-1-1-1-1-w8"
    assert metrics["method"] == "mocov2_tiny" and metrics["imported"]
    assert metrics["layers"] == ["conv1", "res5", "res5avg"] and metrics["input_size"] == SIDE
    feats = metrics["per_layer"]
    assert feats["res5avg"]["feature"]["dim"] == 2048 and feats["res5"]["feature"]["dim"] == 8192
    assert "Goyal" in feats["res5"]["feature"]["source"]
    assert all(0.0 <= feats[n]["map"] <= 1.0 for n in feats)
    assert set(metrics["low_shot"]) == {"res5avg"}
    # the features are the checkpoint's network's: the cached res5avg rows are its averages
    cache = metrics["feature_cache"]["test"]["path"]
    ref = ResNetEncoder(LAYERS, WIDTH, SIDE)
    ref.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")})
    with np.load(cache) as data:
        assert data["feat_res5avg"].shape == (metrics["test_images"], 2048)
        first, row = str(data["ids"][0]), data["feat_res5avg"][0]
    image = Path(_voc(synth_root)) / "JPEGImages" / f"{first}.jpg"
    x = preprocess(image, SIDE, 256, ref.input_convention)[None]
    with torch.no_grad():
        want = ref.eval().extract(x, ["res5avg"])["res5avg"][0].numpy()
    np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6)

    knn = KNNConfig(data=_voc(synth_root), device="cpu", k=5, weights=str(path),
                    input_size=SIDE, workers=0, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    km = main_knn(knn, open_run(tmp_path / "knn", knn))
    assert km["layer"] == "res5avg" and km["family"] == "resnet" and 0.0 < km["map"] <= 1.0


def test_vit_checkpoint_svm_and_knn_default_layers(dino, synth_root, tmp_path):
    cfg = small_svm(synth_root, tmp_path, weights=str(dino), low_shot=False)
    metrics = main_svm(cfg, open_run(tmp_path / "svm", cfg))
    assert metrics["family"] == "vit" and metrics["layers"] == ["cls", "cls4", "cls+avg"]
    assert metrics["input_size"] == 32
    dims = {n: v["feature"]["dim"] for n, v in metrics["per_layer"].items()}
    assert dims == {"cls": 64, "cls4": 256, "cls+avg": 128}
    knn = KNNConfig(data=_voc(synth_root), device="cpu", k=5, weights=str(dino), workers=0,
                    cache_dir=str(tmp_path / "cache"))  # fmt: skip
    km = main_knn(knn, open_run(tmp_path / "knn", knn))
    assert km["layer"] == "cls" and km["feature"]["dim"] == 64


def test_layers_the_encoder_lacks_are_one_line_errors(moco, dino, synth_root, tmp_path):
    cfg = small_svm(synth_root, tmp_path, weights=str(moco[0]), input_size=SIDE,
                    layers=("pool5",))  # fmt: skip
    with pytest.raises(ConfigError, match=r"no resnet-1-1-1-1-w8 layer 'pool5'"):
        main_svm(cfg, open_run(tmp_path / "a", cfg))
    knn = KNNConfig(data=_voc(synth_root), weights=str(dino), layer="res5", input_size=48)
    with pytest.raises(BenchError, match="takes 32 x 32 images"):
        main_knn(knn, open_run(tmp_path / "b", knn))
    with pytest.raises(ConfigError, match="unknown layer 'fc9'"):
        cfg = small_svm(synth_root, tmp_path, layers=("fc9",))
        main_svm(cfg, open_run(tmp_path / "c", cfg))


def _cls_cfg(synth_root, weights, **over) -> ClassificationConfig:
    base = {
        "data": _voc(synth_root), "weights": str(weights), "device": "cpu",
        "augment": {"scale": [0.5, 0.7]},
        "train": {"iterations": 2, "batch_size": 2, "workers": 0, "log_every": 1, "lr": 0.01},
        "test": {"mode": "center", "batch_size": 8},
    }  # fmt: skip
    for key, value in over.items():
        node = base
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return from_dict(ClassificationConfig, base)


def test_classification_fine_tunes_resnet_and_vit_with_a_linear_head(
    moco, dino, synth_root, tmp_path
):
    cfg = _cls_cfg(synth_root, moco[0], **{"augment.crop": SIDE})
    m = main_cls(cfg, open_run(tmp_path / "r", cfg))
    assert m["family"] == "resnet" and m["crop"] == SIDE and m["iterations"] == 2
    assert m["head"].startswith("linear on layer4 output") and 0.0 <= m["map"] <= 1.0
    # the encoder frozen: its BatchNorm statistics stay too (check_frozen_unchanged holds)
    cfg = _cls_cfg(synth_root, dino, train_from="pool5")
    m = main_cls(cfg, open_run(tmp_path / "v", cfg))
    assert m["family"] == "vit" and m["crop"] == 32 and m["train_from"] == "pool5"
    for bad, match in (({"train_from": "fc7"}, "fc7 is AlexNet's"),
                       ({"augment.crop": 48}, "takes 32 x 32")):  # fmt: skip
        cfg = _cls_cfg(synth_root, dino, **bad)
        with pytest.raises(ConfigError, match=match):
            main_cls(cfg, open_run(tmp_path / f"bad{len(match)}", cfg))
