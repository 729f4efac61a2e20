"""Export formats, model cards, strict loading and wrong-architecture errors."""

import json
import pickle

import pytest
import torch

import pretrain.train as train
from benchmark.config import config_hash
from benchmark.errors import BenchError
from benchmark.runs import open_run
from pretrain.alexnet import AlexNetEncoder
from pretrain.config import ModelConfig, PretrainConfig
from pretrain.export import (
    CARD_KEYS,
    card_path,
    export,
    key_map,
    load_encoder,
    load_native,
    load_strict,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = PretrainConfig(method="random", seed=1)
    path = tmp_path_factory.mktemp("export") / "run"
    train.main(cfg, open_run(path, cfg))
    return path, cfg


def test_native_round_trip_loads_strictly(run_dir):
    path, cfg = run_dir
    state, card = load_native(path)
    assert set(CARD_KEYS) <= set(card)
    assert card["config_hash"] == config_hash(cfg) and card["pool_free"] is False
    assert json.loads(card_path(path / "encoder.safetensors").read_text()) == card
    fresh = AlexNetEncoder("caffenet")
    fresh.load_state_dict(state, strict=True)
    encoder, card2 = load_encoder(path)
    assert card2 == card
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, state[k])
    out = export(path, "native", path.parent / "copy.safetensors")
    assert torch.equal(load_native(out)[0]["features.0.weight"], state["features.0.weight"])


def test_torchvision_format(run_dir):
    path, _ = run_dir
    out = export(path, "torchvision")
    sd = torch.load(out, weights_only=True)
    AlexNetEncoder("caffenet").load_state_dict(sd, strict=True)
    assert json.loads(card_path(out).read_text())["format"] == "torchvision"


def test_detectron2_format(run_dir):
    path, _ = run_dir
    state, _ = load_native(path)
    out = export(path, "detectron2")
    with open(out, "rb") as f:
        blob = pickle.load(f)
    assert blob["__author__"] == "bench" and blob["matching_heuristics"] is False
    assert set(blob["model"]) == {"backbone." + k for k in state}
    w = blob["model"]["backbone.features.0.weight"]
    assert type(w).__module__ == "numpy" and (w == state["features.0.weight"].numpy()).all()
    assert ("features.0.weight", "backbone.features.0.weight") in key_map(state, "detectron2")


def test_mmseg_format(run_dir):
    path, _ = run_dir
    out = export(path, "mmseg")
    blob = torch.load(out, weights_only=False)
    assert blob["meta"]["method"] == "random"
    sd = {k.removeprefix("backbone."): v for k, v in blob["state_dict"].items()}
    assert all(k.startswith("backbone.features.") for k in blob["state_dict"])
    AlexNetEncoder("caffenet").load_state_dict(sd, strict=True)


def test_torchvision_arch_export_loads_into_torchvision_alexnet(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    cfg = PretrainConfig(method="random", model=ModelConfig(arch="torchvision"))
    train.main(cfg, open_run(tmp_path / "run", cfg))
    sd = torch.load(export(tmp_path / "run", "torchvision"), weights_only=True)
    net = torchvision.models.alexnet(weights=None)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing)


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path):
    cfg = PretrainConfig(method="random", model=ModelConfig(pool_free=True))
    train.main(cfg, open_run(tmp_path / "pf", cfg))
    state, _ = load_native(tmp_path / "pf")
    with pytest.raises(BenchError) as err:
        load_strict(AlexNetEncoder("caffenet", pool_free=False), state, "pf.safetensors")
    msg = str(err.value)
    assert "\n" not in msg and "unexpected keys ['features.12.bias'" in msg
    assert "features.2.weight" in msg and "missing keys []" in msg
    with pytest.raises(BenchError, match="shape mismatch in features.0.weight"):
        load_strict(AlexNetEncoder("torchvision", pool_free=True), state, "pf.safetensors")


def test_bad_inputs_are_one_line_errors(tmp_path, run_dir):
    with pytest.raises(BenchError, match="no encoder.safetensors"):
        export(tmp_path, "native")
    with pytest.raises(BenchError, match="--format"):
        export(run_dir[0], "onnx")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(BenchError, match="junk.safetensors"):
        load_native(junk)
