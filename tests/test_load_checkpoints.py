"""`--weights` reads ResNet / ViT checkpoints of other tools on the fly, and `bench import`
writes them once as native encoders: both give the original network's features.

The checkpoints are written here as MoCo v2 (facebookresearch/moco main_moco.py) and DINO
(facebookresearch/dino main_dino.py) save them, from width-reduced torchvision / timm
networks (tests/test_weights_formats.py covers every other layout).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from bench.cli import main as cli_main
from benchmark.errors import BenchError
from encoders import ResNetEncoder
from weights.encoder import load_encoder, peek_card

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, WIDTH = (1, 1, 1, 1), 8
VIT = {"img_size": 32, "patch_size": 16, "embed_dim": 128, "depth": 4, "num_heads": 2}


@pytest.fixture(scope="module")
def moco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A MoCo v2 checkpoint of a width-reduced ResNet: encoder_q with its MLP fc, encoder_k,
    the queue, the optimiser; and the torchvision network it holds."""
    torch.manual_seed(0)
    net = ResNet(Bottleneck, list(LAYERS), width_per_group=WIDTH, num_classes=16).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    net.fc = nn.Sequential(nn.Linear(2048, 32), nn.ReLU(), nn.Linear(32, 16))
    q = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    k = {f"module.encoder_k.{n}": v + 0.5 if v.is_floating_point() else v
         for n, v in net.state_dict().items()}  # fmt: skip
    state = {**q, **k, "module.queue": torch.randn(16, 64), "module.queue_ptr": torch.zeros(1)}
    path = tmp_path_factory.mktemp("moco") / "moco_v2_tiny_200ep.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": []}}, path)  # fmt: skip
    return path, net


@pytest.fixture(scope="module")
def dino(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    net = VisionTransformer(**VIT, num_classes=0).eval()
    teacher = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    teacher["head.last_layer.weight_v"] = torch.randn(64, 16)
    student = {f"module.{k}": v + 1.0 for k, v in teacher.items()}
    path = tmp_path_factory.mktemp("dino") / "checkpoint.pth"
    torch.save({"student": student, "teacher": teacher, "epoch": 100}, path)
    return path, net


def _features(encoder: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return encoder.eval().extract(x, list(encoder.taps))


def _reference(net: nn.Module, side: int) -> ResNetEncoder:
    ref = ResNetEncoder(LAYERS, WIDTH, side)
    ref.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")})
    return ref.eval()


def test_moco_checkpoint_on_the_fly_and_imported_give_the_original_features(moco, tmp_path):
    path, net = moco
    x = torch.randn(2, 3, 64, 64)
    want = _features(_reference(net, 64), x)
    encoder, card = load_encoder(path, families=("resnet",), input_size=64)
    assert card["family"] == "resnet" and card["format"] == "moco" and card["imported"]
    assert card["method"] == "moco_v2_tiny_200ep" and card["input_convention"]["name"]
    got = _features(encoder, x)
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name

    out = tmp_path / "mocov2"
    assert cli_main(["import", "--format", "moco", str(path), "--out", str(out),
                     "--method", "mocov2"]) == 0  # fmt: skip
    native, ncard = load_encoder(out, families=("resnet",), input_size=64)
    assert ncard["method"] == "mocov2" and ncard["format"] == "moco"
    assert ncard["arch"] == card["arch"] and ncard["taps"]["res5"]["dim"] == 2048 * 2 * 2
    got = _features(native, x)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert peek_card(out)["method"] == "mocov2"
    assert peek_card(path)["method"] == "moco_v2_tiny_200ep"
    # nothing is replaced without --force
    assert cli_main(["import", str(path), "--out", str(out)]) == 2


def test_dino_teacher_vit_on_the_fly(dino):
    path, net = dino
    encoder, card = load_encoder(path, families=("vit",))
    assert card["format"] == "dino" and card["branch"] == "teacher"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net.forward_features(x)[:, 0]
        assert torch.allclose(encoder.eval().extract(x, ["cls"])["cls"], want, atol=1e-6)
    with pytest.raises(BenchError, match="takes 32 x 32 images"):
        load_encoder(path, families=("vit",), input_size=224)


def test_wrong_family_truncated_and_format_errors_are_one_line(moco, dino, tmp_path):
    with pytest.raises(BenchError, match=r"a ResNet encoder .*detection takes AlexNet"):
        load_encoder(moco[0], task="detection")
    with pytest.raises(BenchError, match=r"a ViT encoder .*; svm takes ResNet encoders"):
        load_encoder(dino[0], families=("resnet",), task="svm")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(moco[0].read_bytes()[:4000])
    with pytest.raises(BenchError, match="unreadable or truncated") as err:
        load_encoder(cut, families=("resnet",))
    assert "\n" not in str(err.value)
    with pytest.raises(BenchError, match="no ResNet or ViT encoder found under the mae"):
        load_encoder(moco[0], fmt="mae", families=("resnet",))


def test_import_show_keys_and_cli_errors(moco, capsys):
    assert cli_main(["import", "--show-keys", str(moco[0])]) == 0
    text = capsys.readouterr().out
    assert "moco format, ResNet encoder" in text
    assert "module.encoder_q.conv1.weight" in text and "-> conv1.weight" in text
    assert "module.queue" in text and "[dropped: not the encoder]" in text
    assert cli_main(["import", "--show-keys", "--format", "detectron2"]) == 0
    assert "res2. -> layer1." in capsys.readouterr().out.replace("^", "").replace("\\", "")
    assert cli_main(["import", "--show-keys"]) == 0
    assert "solo-learn" in capsys.readouterr().out
    assert cli_main(["import", "--format", "nosuch", str(moco[0]), "--out", "x"]) == 2
    assert "unknown checkpoint format 'nosuch'" in capsys.readouterr().err


def test_bench_import_caffe_still_parses():
    out = subprocess.run([sys.executable, "-m", "bench.cli", "import", "caffe", "--help"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert "--prototxt" in out.stdout
