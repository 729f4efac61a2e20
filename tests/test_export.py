"""Export formats, model cards, strict loading and wrong-architecture errors."""

import json
import math

import pytest
import torch

from bench.stages import pretrain_stage
from benchmark.config import config_hash
from benchmark.errors import BenchError
from benchmark.input_convention import CAFFE, TORCHVISION
from benchmark.runs import open_run
from benchmark.safe_pickle import safe_load
from encoders.alexnet import AlexNetEncoder
from pretrain.config import ModelConfig, PretrainConfig
from weights.encoder import load_encoder, load_state_checked
from weights.native import CARD_KEYS, card_path, export, key_map, load_native


def pretrain_run(path, cfg):
    run = open_run(path, cfg)
    try:
        pretrain_stage(cfg.method).main(cfg, run)
    finally:
        run.close()
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = PretrainConfig(method="random", seed=1)
    path = tmp_path_factory.mktemp("export") / "run"
    return pretrain_run(path, cfg), cfg


def test_native_round_trip_loads_strictly(run_dir):
    path, cfg = run_dir
    state, card = load_native(path)
    assert set(CARD_KEYS) <= set(card)
    assert card["config_hash"] == config_hash(cfg) and card["pool_free"] is False
    assert json.loads(card_path(path / "encoder.safetensors").read_text()) == card
    fresh = AlexNetEncoder("caffenet")
    fresh.load_state_dict(state, strict=True)
    encoder, card2 = load_encoder(path)
    assert card["input_convention"] == CAFFE.as_dict()  # a CaffeNet takes Caffe's input
    source = str(path / "encoder.safetensors")
    assert card2 == {**card, "source": source, "input_convention_loaded": "caffe"}
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, state[k])
    out = export(path, "native", path.parent / "copy.safetensors")
    assert torch.equal(load_native(out)[0]["features.0.weight"], state["features.0.weight"])
    # Exporting the native file onto itself is a no-op, not an overwrite.
    assert export(path, "native") == path / "encoder.safetensors"


def test_export_refuses_to_overwrite_without_force(run_dir, tmp_path):
    path, _ = run_dir
    out = tmp_path / "enc.pth"
    out.write_bytes(b"someone else's file")
    with pytest.raises(BenchError, match="--force") as err:
        export(path, "torchvision", out)
    assert "\n" not in str(err.value)
    assert out.read_bytes() == b"someone else's file"
    assert export(path, "torchvision", out, force=True) == out
    sd = torch.load(out, weights_only=True)
    assert torch.equal(sd["features.3.weight"], load_native(path)[0]["features.3.weight"])


def test_torchvision_format(run_dir):
    path, _ = run_dir
    out = export(path, "torchvision")
    sd = torch.load(out, weights_only=True)
    AlexNetEncoder("caffenet").load_state_dict(sd, strict=True)
    card = json.loads(card_path(out).read_text())
    assert card["format"] == "torchvision" and card["input_convention"] == TORCHVISION.as_dict()
    assert card["folded_from_convention"] == "caffe"  # checked numerically in test_input_convention


def test_detectron2_format(run_dir):
    path, _ = run_dir
    state, _ = load_native(path)
    out = export(path, "detectron2")
    blob = safe_load(out)  # plain containers and numpy arrays only
    assert blob["__author__"] == "bench" and blob["matching_heuristics"] is False
    assert set(blob["model"]) == {"backbone." + k for k in state}
    w = blob["model"]["backbone.features.0.weight"]
    assert type(w).__module__ == "numpy" and (w == state["features.0.weight"].numpy()).all()
    assert ("features.0.weight", "backbone.features.0.weight") in key_map(state, "detectron2")
    card = json.loads(card_path(out).read_text())  # the encoder's convention, in d2's keys
    assert card["input_convention"] == CAFFE.as_dict() and card["framework_input"] == {
        "INPUT.FORMAT": "BGR", "MODEL.PIXEL_MEAN": [104.0, 117.0, 123.0],
        "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    }  # fmt: skip


def test_mmseg_format(run_dir):
    path, _ = run_dir
    out = export(path, "mmseg")
    blob = torch.load(out, weights_only=True)
    assert blob["meta"]["method"] == "random"
    assert blob["meta"]["framework_input"] == {
        "mean": [104.0, 117.0, 123.0], "std": [1.0, 1.0, 1.0], "bgr_to_rgb": False
    }  # fmt: skip
    state, _ = load_native(path)
    assert torch.equal(blob["state_dict"]["backbone.features.0.weight"], state["features.0.weight"])
    sd = {k.removeprefix("backbone."): v for k, v in blob["state_dict"].items()}
    assert all(k.startswith("backbone.features.") for k in blob["state_dict"])
    AlexNetEncoder("caffenet").load_state_dict(sd, strict=True)


def test_torchvision_arch_export_loads_into_torchvision_alexnet(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    cfg = PretrainConfig(method="random", model=ModelConfig(arch="torchvision"))
    pretrain_run(tmp_path / "run", cfg)
    sd = torch.load(export(tmp_path / "run", "torchvision"), weights_only=True)
    net = torchvision.models.alexnet(weights=None)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing)


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path, run_dir):
    cfg = PretrainConfig(method="random", model=ModelConfig(pool_free=True))
    pretrain_run(tmp_path / "pf", cfg)
    state, _ = load_native(tmp_path / "pf")
    with pytest.raises(BenchError) as err:
        load_state_checked(AlexNetEncoder("caffenet", pool_free=False), state, "pf.safetensors")
    msg = str(err.value)
    # caffenet's learned pools sit inside its pool + LRN layers: features.{2,5}.pool.*
    assert "\n" not in msg and "unexpected [features.12.bias, features.12.weight" in msg
    assert "features.2.pool.weight" in msg and "missing [none]" in msg
    # The same key names with other shapes: torchvision's 64-wide conv1, alexnet-plain's
    # ungrouped conv2.
    plain, _ = load_native(run_dir[0])
    with pytest.raises(BenchError, match=r"features\.0\.weight has shape \(96, 3, 11, 11\)"):
        load_state_checked(AlexNetEncoder("torchvision"), plain, "run.safetensors")
    with pytest.raises(BenchError, match=r"features\.3\.weight has shape \(256, 48, 5, 5\)"):
        load_state_checked(AlexNetEncoder("alexnet-plain"), plain, "run.safetensors")
    encoder, card = load_encoder(tmp_path / "pf")
    assert card["pool_free"] is True and encoder.pool_free and encoder.arch == "caffenet"


def test_non_finite_weights_are_refused(run_dir):
    state, _ = load_native(run_dir[0])
    state = dict(state)
    state["features.8.weight"] = state["features.8.weight"].clone()
    state["features.8.weight"][0, 0, 0, 0] = math.nan
    encoder = AlexNetEncoder("caffenet")
    before = encoder.features[8].weight.detach().clone()
    with pytest.raises(BenchError, match="features.8.weight has 1 NaN or infinite"):
        load_state_checked(encoder, state, "nan.safetensors")
    assert torch.equal(encoder.features[8].weight, before)  # nothing was loaded


def test_bad_inputs_are_one_line_errors(tmp_path, run_dir):
    with pytest.raises(BenchError, match="no encoder.safetensors"):
        export(tmp_path, "native")
    with pytest.raises(BenchError, match="--format"):
        export(run_dir[0], "onnx")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(BenchError, match="junk.safetensors"):
        load_native(junk)


@pytest.mark.parametrize("fmt", ["native", "torchvision", "detectron2", "mmseg"])
def test_show_keys_prints_what_export_writes_and_writes_nothing(run_dir, fmt, capsys):
    from bench import cli

    path, _ = run_dir
    before = sorted(p.name for p in path.iterdir())
    assert cli.main(["export", str(path), "--format", fmt, "--show-keys"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in path.iterdir()) == before
    state, _ = load_native(path)
    rows = [line.split() for line in printed.splitlines()[1:] if "->" in line and "[" in line]
    prefix = "backbone." if fmt in ("detectron2", "mmseg") else ""
    assert {(r[0], r[2]) for r in rows} == {(k, prefix + k) for k in state}
    w = state["features.0.weight"]
    assert f"[{'x'.join(map(str, w.shape))}]" in printed
    if fmt == "torchvision":  # the random encoder is CaffeNet's: conv1 refolds for torchvision
        assert "refolded" in printed
