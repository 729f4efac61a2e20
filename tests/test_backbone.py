"""transfer.backbone: every weights source loads, every wrong one fails naming its keys."""

import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from benchmark.errors import BenchError
from benchmark.input_convention import CAFFE
from encoders.alexnet import AlexNetEncoder
from transfer.backbone import check_frozen_unchanged, describe_transfer, freeze, snapshot_frozen
from weights.encoder import load_encoder, peek_card
from weights.native import write_native

CARD = {
    "method": "context-encoder", "mask": "random-region", "iterations": 10, "data": "synth",
    "config_hash": "abc", "arch": "caffenet", "pool_free": False, "pretrain_seconds": 12.5,
}  # fmt: skip


def _same_weights(a: nn.Module, b_state: dict) -> bool:
    return all(torch.equal(v, b_state[k]) for k, v in a.state_dict().items())


def test_random_init_is_gaussian():
    torch.manual_seed(0)
    enc, card = load_encoder(None)
    assert card["method"] == "random" and card["arch"] == "caffenet"
    w = enc.features[0].weight
    assert w.shape == (96, 3, 11, 11)
    assert abs(w.std().item() - 0.01) < 1e-3 and enc.features[0].bias.abs().max() == 0
    assert load_encoder(None, arch="torchvision")[0].features[0].weight.shape[0] == 64
    # CaffeNet's conv2, conv4, conv5 run in two groups; the old ungrouped network is
    # "alexnet-plain"
    assert enc.features[3].weight.shape == (256, 48, 5, 5)
    assert [enc.features[i].groups for i in (0, 3, 6, 8, 10)] == [1, 2, 1, 2, 2]
    plain, card = load_encoder(None, arch="alexnet-plain")
    assert card["arch"] == "alexnet-plain" and plain.features[3].weight.shape == (256, 96, 5, 5)


@pytest.mark.parametrize("pool_free", [False, True])
def test_native_export_and_run_folder_load(tmp_path, pool_free):
    torch.manual_seed(1)
    src = AlexNetEncoder("caffenet", pool_free=pool_free)
    card = {**CARD, "pool_free": pool_free, "input_convention": CAFFE.as_dict()}
    path = write_native(tmp_path / "encoder.safetensors", src.state_dict(), card)
    for weights in (path, tmp_path, str(path)):  # file, run folder, string
        enc, got = load_encoder(weights)
        assert got["method"] == "context-encoder" and got["pretrain_seconds"] == 12.5
        assert enc.pool_free is pool_free
        assert _same_weights(enc, src.state_dict())
    assert peek_card(tmp_path)["mask"] == "random-region"


def test_native_without_metadata_uses_sidecar_card(tmp_path):
    src = AlexNetEncoder("torchvision")
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "w.card.json").write_text(json.dumps({**CARD, "arch": "torchvision"}))
    enc, card = load_encoder(tmp_path / "w.safetensors")
    assert card["method"] == "context-encoder" and enc.arch == "torchvision"
    (tmp_path / "w.card.json").unlink()
    enc, card = load_encoder(tmp_path / "w.safetensors")  # arch inferred from conv1's width
    assert card["method"] == "unknown" and enc.arch == "torchvision"


def test_torchvision_state_dict_loads_and_matches_torchvision(tmp_path):
    torch.manual_seed(2)
    tv = torchvision.models.alexnet(weights=None)
    torch.save(tv.state_dict(), tmp_path / "alexnet.pth")
    enc, card = load_encoder(tmp_path / "alexnet.pth")
    assert card["method"] == "imagenet" and card["arch"] == "torchvision"
    x = torch.randn(2, 3, 227, 227)
    with torch.no_grad():
        assert torch.allclose(enc(x), tv.features(x), atol=1e-6)  # same layout, same function
    # DDP-style "module." prefixes and a {"state_dict": ...} wrapper are accepted too
    wrapped = {"state_dict": {"module." + k: v for k, v in tv.state_dict().items()}}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    assert _same_weights(load_encoder(tmp_path / "wrapped.pt")[0], enc.state_dict())


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path):
    state = AlexNetEncoder("torchvision").state_dict()
    del state["features.10.bias"]
    state["features.11.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "alexnet.pth")
    with pytest.raises(BenchError) as err:
        load_encoder(tmp_path / "alexnet.pth")
    msg = str(err.value)
    assert str(tmp_path / "alexnet.pth") in msg and "\n" not in msg
    assert "missing" in msg and "features.10.bias" in msg
    assert "unexpected" in msg and "features.11.weight" in msg
    # a network of no family bench knows: one line naming the file
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(BenchError, match="a ResNet of basic blocks") as err:
        load_encoder(tmp_path / "resnet.pth")
    assert str(tmp_path / "resnet.pth") in str(err.value) and "\n" not in str(err.value)


def test_pool_free_tensors_in_a_pooled_card_are_unexpected(tmp_path):
    src = AlexNetEncoder("caffenet", pool_free=True)
    path = write_native(tmp_path / "encoder.safetensors", src.state_dict(), CARD)  # says pooled
    unexpected = r"unexpected \[features\.12\.bias, features\.12\.weight"
    with pytest.raises(BenchError, match=unexpected) as err:
        load_encoder(path)
    # CaffeNet's pool1/pool2 sit with their LRN in one layer: keys features.{2,5}.pool.*
    assert "features.2.pool.weight" in str(err.value) and "features.5.pool.bias" in str(err.value)


def test_card_arch_disagreeing_with_shapes_names_the_tensor(tmp_path):
    src = AlexNetEncoder("torchvision")
    path = write_native(tmp_path / "encoder.safetensors", src.state_dict(), CARD)  # caffenet
    with pytest.raises(BenchError, match=r"features\.0\.weight has shape \(64, 3, 11, 11\)"):
        load_encoder(path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(BenchError, match="weights file not found"):
        load_encoder(tmp_path / "nope.pth")
    with pytest.raises(BenchError, match="no encoder.safetensors"):
        load_encoder(tmp_path)
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    with pytest.raises(BenchError, match="bad.pth: unreadable"):
        load_encoder(tmp_path / "bad.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(BenchError, match="bad.safetensors"):
        load_encoder(tmp_path / "bad.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(BenchError, match="unknown weights format"):
        load_encoder(tmp_path / "w.npz")
    assert peek_card(tmp_path / "bad.pth") == {"method": "bad"}  # names never fail


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)


def test_freeze_describe_and_frozen_check(caplog):
    model = Two()
    freeze(model, ["encoder."])
    assert describe_transfer(model, ["encoder."]) == (10, 26)
    snap = snapshot_frozen(model, ["encoder."])
    assert set(snap) == {"encoder.weight", "encoder.bias"}
    with torch.no_grad():
        model.head.weight.add_(1.0)  # trainable layers may change
    check_frozen_unchanged(model, snap)
    with torch.no_grad():
        model.encoder.bias.add_(1e-3)
    with pytest.raises(RuntimeError, match="encoder.bias changed"):
        check_frozen_unchanged(model, snap)
    model.encoder.weight.requires_grad_(True)  # a leak through the freeze is caught
    with pytest.raises(RuntimeError, match="encoder.weight"):
        describe_transfer(model, ["encoder."])
