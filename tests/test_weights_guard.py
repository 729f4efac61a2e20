"""Hostile and broken checkpoints: refused or rejected in one line naming the file."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from benchmark.errors import BenchError
from weights import import_checkpoint, key_map, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


class RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=4, num_classes=10).eval()


@pytest.fixture(scope="module")
def vit_state() -> dict[str, torch.Tensor]:
    from encoders import vit_module

    vm = vit_module()
    return vm.VisionTransformer(img_size=32, embed_dim=64, depth=1, num_heads=1).state_dict()


def _one_line_error(path: Path, **options) -> str:
    with pytest.raises(BenchError) as err:
        import_checkpoint(path, **options)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_a_pickle_that_runs_code_is_refused(net, tmp_path):
    marker = tmp_path / "ran"
    evil = {"state_dict": net.state_dict(), "hook": RunsCode(marker)}
    torch.save(evil, tmp_path / "evil.pth")
    legacy = tmp_path / "evil_legacy.pth.tar"
    torch.save(evil, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"model": {}, "x": RunsCode(marker)}))
    for name in ("evil.pth", "evil_legacy.pth.tar"):
        assert "refused to load" in _one_line_error(tmp_path / name)
        assert "system" in _one_line_error(tmp_path / name)
    assert "refused to unpickle" in _one_line_error(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_wrong_family_is_one_line(net, vit_state, tmp_path):
    torch.save(vit_state, tmp_path / "vit.pth")
    torch.save({"state_dict": net.state_dict()}, tmp_path / "r50.pth")
    message = _one_line_error(tmp_path / "vit.pth", family="resnet")
    assert "a ViT checkpoint (timm format), not a ResNet" in message
    assert "a ResNet checkpoint (torchvision format), not a ViT" in _one_line_error(
        tmp_path / "r50.pth", family="vit"
    )
    dino = {"teacher": {"backbone." + k: v for k, v in vit_state.items()}, "student": {}}
    torch.save(dino, tmp_path / "dino.pth")
    assert "(dino format), not a ResNet" in _one_line_error(tmp_path / "dino.pth", family="resnet")
    basic = ResNet(BasicBlock, [2, 2, 2, 2]).state_dict()
    torch.save(basic, tmp_path / "r18.pth")
    assert "basic blocks (ResNet-18/34)" in _one_line_error(tmp_path / "r18.pth")


def test_truncated_files_are_one_line(net, tmp_path):
    sd = net.state_dict()
    torch.save(sd, tmp_path / "zip.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    model = {k: v.numpy() for k, v in sd.items()}
    (tmp_path / "d2.pkl").write_bytes(pickle.dumps({"model": model}))
    for name in ("zip.pth", "legacy.pth", "w.safetensors", "d2.pkl"):
        path = tmp_path / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        assert re.search("unreadable|truncated", _one_line_error(path)), name
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "unreadable or truncated" in _one_line_error(tmp_path / "empty.pth")
    assert "file not found" in _one_line_error(tmp_path / "absent.pth")


def _moco(net: nn.Module, **extra: torch.Tensor) -> dict:
    sd = {"module.encoder_q." + k: v for k, v in net.state_dict().items()}
    sd.update({"module.encoder_k." + k: v for k, v in net.state_dict().items()})
    return {"epoch": 1, "state_dict": {**sd, "module.queue": torch.zeros(4, 8), **extra}}


def test_keys_that_are_no_heads_are_named(net, tmp_path):
    extra = torch.zeros(3)
    cases = {
        "stray_prefix": (
            _moco(net, **{"module.mystery.weight": extra}),
            "nor a known head's under the moco key map: module.mystery.weight",
        ),
        "stray_layer": (
            _moco(net, **{"module.encoder_q.layer1.0.extra.weight": extra}),
            "left over (not a head) layer1.0.extra.weight",
        ),
    }
    missing = _moco(net)
    del missing["state_dict"]["module.encoder_q.layer4.0.conv2.weight"]
    cases["missing"] = (missing, "missing layer4.0.conv2.weight")
    wrong_shape = _moco(net)
    wrong_shape["state_dict"]["module.encoder_q.layer2.0.conv1.weight"] = torch.zeros(9, 256, 1, 1)
    cases["shape"] = (wrong_shape, "layer2.0.conv1.weight has shape (9, 256, 1, 1)")
    nan = _moco(net)
    nan["state_dict"]["module.encoder_q.bn1.weight"] = torch.full((64,), float("nan"))
    cases["nan"] = (nan, "bn1.weight has 64 NaN or infinite value")
    for name, (tree, expected) in cases.items():
        path = tmp_path / f"{name}.pth.tar"
        torch.save(tree, path)
        assert expected in _one_line_error(path), name


def test_unusable_files_and_options_are_one_line(net, tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    assert "not a mapping of names to tensors" in _one_line_error(tmp_path / "tensor.pth")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "meta.pth")
    assert "no ResNet or ViT encoder found" in _one_line_error(tmp_path / "meta.pth")
    torch.save(net.state_dict(), tmp_path / "r50.pth")
    assert "no ResNet or ViT encoder found under the mae" in _one_line_error(
        tmp_path / "r50.pth", fmt="mae"
    )
    assert "holds one network" in _one_line_error(tmp_path / "r50.pth", branch="student")
    with pytest.raises(BenchError, match="unknown checkpoint format 'caffe2'"):
        key_map(tmp_path / "r50.pth", fmt="caffe2")
    with pytest.raises(BenchError, match="is a folder"):
        read_checkpoint(tmp_path)


def test_batchnorm_counters_may_be_absent(net, tmp_path):
    """Conversions often drop `num_batches_tracked`; it is read by nothing at inference."""
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "converted.pth")
    imported = import_checkpoint(tmp_path / "converted.pth")
    assert int(imported.encoder.bn1.num_batches_tracked) == 0
    assert torch.equal(imported.encoder.bn1.running_var, net.bn1.running_var)
