"""The detectron2 backend: a one-line install hint without detectron2; with it, exported
weights load into the model built from the backend's config, and a tiny run completes.

Run the detectron2-marked tests in an environment where detectron2 is importable."""

from __future__ import annotations

import importlib.util
import pickle
import sys

import numpy as np
import pytest
import torch

from benchmark.errors import BenchError
from benchmark.runs import open_run
from transfer.detection import DetectionConfig, main

HAS_D2 = importlib.util.find_spec("detectron2") is not None
needs_d2 = pytest.mark.skipif(not HAS_D2, reason="detectron2 is not importable")


def test_missing_detectron2_is_one_line_with_install_hint(monkeypatch, synth_root, tmp_path):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # import fails as if not installed
    cfg = DetectionConfig(backend="detectron2", data=str(synth_root), iterations=1)
    with pytest.raises(BenchError) as err:
        main(cfg, open_run(tmp_path / "run", cfg))
    msg = str(err.value)
    assert "\n" not in msg and "pip install" in msg and "detectron2" in msg


def _export_run(tmp_path, arch="caffenet"):
    """A finished pretraining run folder exported with `bench export --format detectron2`."""
    from pretrain.alexnet import AlexNetEncoder
    from pretrain.export import export, write_native
    from transfer.backbone import random_card

    torch.manual_seed(1)
    encoder = AlexNetEncoder(arch)
    card = {**random_card(arch), "method": "context-encoder", "pretrain_seconds": 12.5}
    run_dir = tmp_path / "pretrain"
    write_native(run_dir / "encoder.safetensors", encoder.state_dict(), card)
    return encoder, export(run_dir, "detectron2")


@needs_d2
@pytest.mark.detectron2
def test_exported_weights_load_into_backend_model(tmp_path):
    from transfer.detection.detectron2_backend import build_fast_rcnn, fast_rcnn_config

    encoder, pkl = _export_run(tmp_path)
    with open(pkl, "rb") as f:
        exported = pickle.load(f)["model"]
    d2cfg = fast_rcnn_config(
        DetectionConfig(fc_dim=64),
        arch="caffenet",
        pool_free=False,
        train_dataset="unused_train",
        test_dataset="unused_test",
        proposals_train=tmp_path / "a.pkl",
        proposals_test=tmp_path / "b.pkl",
        weights=pkl,
        output_dir=tmp_path / "d2",
        device="cpu",
    )
    assert d2cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == "ROIPool"
    assert d2cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION == 6
    assert d2cfg.MODEL.PROPOSAL_GENERATOR.NAME == "PrecomputedProposals"
    model = build_fast_rcnn(d2cfg)
    state = model.state_dict()
    backbone = {k for k in state if k.startswith("backbone.")}
    assert backbone == set(exported)  # every exported tensor has its place, and only those
    for key, value in exported.items():
        assert np.array_equal(state[key].numpy(), value), key
    assert torch.equal(state["backbone.features.0.weight"], encoder.features[0].weight)
    assert not model.backbone.features[0].weight.requires_grad  # freeze_at=1: conv1 fixed
    assert model.backbone.output_shape()["conv5"].stride == 16
    head = model.roi_heads.box_head
    assert head.fc6.in_features == 256 * 6 * 6 and head.fc7.out_features == 64


@needs_d2
@pytest.mark.detectron2
def test_tiny_detectron2_run(tmp_path, synth_root, monkeypatch):
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path / "results"))
    _, pkl = _export_run(tmp_path)
    cfg = DetectionConfig(
        backend="detectron2", data=str(synth_root), weights=str(pkl), iterations=4,
        scales=(96,), max_size=160, test_scale=96, test_max_size=160, fc_dim=64,
        rois_per_batch=32, workers=0, ss_min_box=8, log_every=2,
    )  # fmt: skip
    metrics = main(cfg, open_run(tmp_path / "run", cfg))
    assert metrics["backend"] == "detectron2" and metrics["method"] == "context-encoder"
    assert metrics["pretrain_seconds"] == 12.5
    assert 0.0 <= metrics["map"] <= 1.0 and metrics["detectron2_ap50"] is not None
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert (tmp_path / "run" / "detections" / "comp4_det_test_dog.txt").is_file()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
