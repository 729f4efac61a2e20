"""Kill -9 at any moment, then `--resume`: the same final weights and metrics as a run that
was never interrupted, for every stage and for a `bench run` suite.

Each stage runs as a real `bench` process three times: straight through; killed by SIGKILL
right after a training step (`BENCH_FAULT=step:3`, the checkpoint is at 2); resumed and
killed again half-way through writing its next checkpoint (`BENCH_FAULT=write:last.pt`);
resumed to the end. The killed runs leave a stale temporary file and log lines past the
checkpoint: the resume must remove the one and rewind the other.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

STAGES: dict[str, list[str]] = {
    "context-encoder": [
        "pretrain", "--method", "context-encoder", "--mask", "central", "--data", "{images}",
        "--set", "model.input_size=67", "--set", "train.batch_size=4",
        "--set", "train.sample_every=3",
    ],
    # noise-region: its holes, one per batch (train_random.lua L330), resume exactly too
    "inpainting": [
        "pretrain", "--method", "inpainting", "--mask", "noise-region", "--data", "{images}",
        "--set", "bottleneck=16", "--set", "train.batch_size=4", "--set", "train.load_size=0",
        "--set", "train.sample_every=0",
    ],
    "classification": [
        "transfer", "--task", "classification", "--data", "{voc}", "--set", "hidden=16",
        "--set", "augment.crop=67", "--set", "train.batch_size=4", "--set", "test.mode=center",
    ],
    "detection": [
        "transfer", "--task", "detection", "--data", "{voc}", "--set", "fc_dim=16",
        "--set", "scales=[96]", "--set", "max_size=160", "--set", "test_scale=96",
        "--set", "test_max_size=160", "--set", "train.rois_per_batch=16",
    ],
    "segmentation": [
        "transfer", "--task", "segmentation", "--data", "{voc}", "--set", "fc_dim=16",
        "--set", "pad=0", "--set", "max_size=64", "--set", "train.iter_size=2",
    ],
}  # fmt: skip
LOOP = ["--iterations", "5", "--set", "train.checkpoint_every=2", "--set", "train.log_every=1",
        "--set", "train.workers=0", "--set", "train.threads=1", "--device", "cpu"]  # fmt: skip


def bench(args: list[str], out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENCH_RESULTS": str(out), "PYTHONUNBUFFERED": "1"}
    env.pop("BENCH_FAULT", None)
    if fault:
        env["BENCH_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "bench.cli", *args, "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _args(stage: str, synth: Path, name: str) -> list[str]:
    fill = {"images": str(synth / "unlabelled"), "voc": str(synth)}
    return [a.format(**fill) for a in STAGES[stage]] + LOOP + ["--name", name]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """The run's final weights: its export (pretraining) or the checkpoint's models."""
    for name in ("encoder.safetensors", "generator.safetensors"):
        if (run / name).is_file():
            return load_file(str(run / name))
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state"]
    return {f"{k}.{p}": v for k, sd in state.items() if k == "model" for p, v in sd.items()}


def _comparable(metrics: dict) -> dict:
    """Metrics without wall times and the command line (which names the run)."""
    return {k: v for k, v in metrics.items() if not k.endswith("_seconds") and k != "command"}


def _scalars(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_9_then_resume_is_bit_identical(stage: str, synth_root: Path, tmp_path: Path):
    out = tmp_path / "results"
    straight = bench(_args(stage, synth_root, "straight"), out)
    assert straight.returncode == 0, straight.stderr[-2000:]

    cut = _args(stage, synth_root, "cut")
    killed = bench(cut, out, fault="step:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = out / "runs" / "cut"
    assert not (run / "metrics.json").exists()
    refused = bench(cut, out)  # a plain rerun must not silently start over or continue
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    killed = bench([*cut, "--resume"], out, fault="write:last.pt")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list((run / "checkpoints").glob(".last.pt.*.tmp")), "the kill left no temporary"

    resumed = bench([*cut, "--resume"], out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(run.rglob("*.tmp"))
    a, b = _weights(out / "runs" / "straight"), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((out / "runs" / "straight" / "metrics.json").read_text())
    mb = json.loads((run / "metrics.json").read_text())
    assert _comparable(ma) == _comparable(mb)
    # logs and scalars were rewound to the checkpoint: each step appears once, as straight
    assert _scalars(run) == _scalars(out / "runs" / "straight")
    log = (run / "log.txt").read_text()
    assert log.count(" it 3/5 ") == 1 and log.count(" it 5/5 ") == 1


SUITE = """\
name: tiny
device: cpu
seeds: [0]
pretrain:
  random: {{}}
  context-encoder:
    mask: central
    data: {images}
    model: {{input_size: 67}}
    train: {{iterations: 4, batch_size: 4, workers: 0, checkpoint_every: 2, sample_every: 0,
             threads: 1}}
transfer:
  classification:
    data: {voc}
    hidden: 16
    augment: {{crop: 67}}
    test: {{mode: center}}
    train: {{iterations: 3, batch_size: 4, workers: 0, checkpoint_every: 2, threads: 1}}
"""


def test_kill_9_inside_a_suite_then_rerun_completes_it(synth_root: Path, tmp_path: Path):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(SUITE.format(images=synth_root / "unlabelled", voc=synth_root))
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    env_args = ["run", str(suite)]
    assert bench(env_args, out_a).returncode == 0
    # the 3rd step (context-encoder pretraining) dies after its 3rd iteration
    killed = bench(env_args, out_b, fault="step:3")
    assert killed.returncode == -signal.SIGKILL
    again = bench(env_args, out_b)
    assert again.returncode == 0, again.stderr[-2000:]
    for name in ("pretrain-context-encoder-s0", "classification-context-encoder-s0"):
        wa = _weights(out_a / "runs" / "tiny" / name)
        wb = _weights(out_b / "runs" / "tiny" / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name

    def table(out: Path) -> list[dict]:
        with open(out / "reports" / "tiny" / "table2.csv", newline="") as f:
            return [{k: v for k, v in r.items() if "time" not in k.lower()}
                    for r in csv.DictReader(f)]  # fmt: skip

    assert table(out_a) == table(out_b)
