"""The pretext methods as `bench pretrain` stages: a short run of each on real images trains
through the one loop (rotation's and jigsaw's loss falls), writes its figures and an encoder
that transfers and probes like every other."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import cli
from bench.stages import PRETRAIN_METHODS
from weights.native import load_native

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # one thread each

TINY = {
    "rotation": ["--set", "pretext.crop_size=64", "--set", "pretext.fc=64",
                 "--set", "pretext.lr_schedule=[[50,0.003]]"],
    "jigsaw": ["--set", "pretext.fc6=64", "--set", "pretext.fc7=64", "--set", "pretext.dropout=0",
               "--set", "pretext.permutations=10", "--set", "pretext.lr=0.003"],
    "relative-position": ["--set", "pretext.fc6=64", "--set", "pretext.fc7=64",
                          "--set", "pretext.fc8=64", "--set", "pretext.lr=0.0001"],
}  # fmt: skip
# Twelve steps of 8 pairs show relative position no learning signal: the mean loss of the
# first and last 6 steps stays within ~0.1 of ln 8 either way (measured over 4 seeds, before
# and after CaffeNet took Caffe's input), so its run is checked to train with finite losses
# rather than to lower the loss.
LEARNS_IN_12_STEPS = {"rotation", "jigsaw"}


def test_the_pretext_methods_are_pretraining_stages():
    for name in TINY:
        assert name in PRETRAIN_METHODS
        assert PRETRAIN_METHODS[name].config_cls().method == name


@pytest.mark.parametrize("method", list(TINY))
def test_a_short_run_on_real_images_lowers_the_loss(method, shared_data, tmp_path):
    args = ["pretrain", "--method", method, "--data", str(shared_data / "ImageNet-sample"),
            "--iterations", "12", "--set", "train.workers=0", "--set", "pretext.batch_size=8",
            "--set", "train.log_every=6", "--set", "train.sample_every=12", *TINY[method],
            "--name", "run", "--out", str(tmp_path), "--device", "cpu"]  # fmt: skip
    assert cli.main(args) == 0
    run = tmp_path / "runs" / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["iterations"] == 12
    rows = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    if method in LEARNS_IN_12_STEPS:
        assert losses[-1] < losses[0], losses  # the mean of the last 6 steps below the first 6
    assert (run / "samples" / "iter_0000012.png").is_file()
    state, card = load_native(run)
    assert card["method"] == method and card["arch"] == "caffenet"
    assert card["input_convention"]["name"] == "caffe" and metrics["input_convention"] == "caffe"
    assert set(state) == {f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")}


def test_a_pretext_encoder_transfers_and_probes(synth_root, tmp_path):
    out = str(tmp_path)
    pre = ["pretrain", "--method", "rotation", "--data", str(synth_root / "unlabelled"),
           "--iterations", "2", "--set", "train.workers=0", "--set", "pretext.batch_size=4",
           "--set", "train.sample_every=0", *TINY["rotation"],
           "--name", "rot", "--out", out]  # fmt: skip
    assert cli.main(pre) == 0
    weights = str(Path(out) / "runs" / "rot")
    cls = ["transfer", "--task", "classification", "--data", str(synth_root), "--weights",
           weights, "--iterations", "2", "--set", "hidden=16", "--set", "augment.crop=67",
           "--set", "train.batch_size=4", "--set", "train.workers=0", "--set",
           "test.mode=center", "--name", "cls", "--out", out]  # fmt: skip
    assert cli.main(cls) == 0
    knn = ["transfer", "--task", "knn", "--data", str(synth_root), "--weights", weights,
           "--set", "workers=0", "--name", "knn", "--out", out]  # fmt: skip
    assert cli.main(knn) == 0
    for name in ("cls", "knn"):
        m = json.loads((Path(out) / "runs" / name / "metrics.json").read_text())
        assert m["method"] == "rotation" and m["map"] is not None
