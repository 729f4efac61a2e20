"""Every training stage under torchrun (2 CPU processes, gloo): the loop shards each batch,
averages gradients, and only rank 0 writes the run folder; stages that do not split their
work refuse torchrun in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

STAGES = {
    "pretrain": ["pretrain", "--method", "context-encoder", "--mask", "central", "--data",
                 "{images}", "--set", "model.input_size=67", "--set", "train.batch_size=4"],
    "inpainting": ["pretrain", "--method", "inpainting", "--data", "{images}",
                   "--set", "bottleneck=16", "--set", "train.batch_size=4",
                   "--set", "train.load_size=0", "--set", "train.sample_every=0"],
    "classification": ["transfer", "--task", "classification", "--data", "{voc}",
                       "--set", "hidden=16", "--set", "augment.crop=67",
                       "--set", "train.batch_size=4", "--set", "test.mode=center"],
    "detection": ["transfer", "--task", "detection", "--data", "{voc}", "--set", "fc_dim=16",
                  "--set", "scales=[96]", "--set", "max_size=160", "--set", "test_scale=96",
                  "--set", "test_max_size=160", "--set", "train.rois_per_batch=16"],
    "segmentation": ["transfer", "--task", "segmentation", "--data", "{voc}",
                     "--set", "fc_dim=16", "--set", "pad=0", "--set", "max_size=64",
                     "--set", "train.iter_size=2"],
}  # fmt: skip


def torchrun(args: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENCH_RESULTS": str(out), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), "-m", "bench.cli", *args,
           "--out", str(out), "--device", "cpu"]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_training_stage_runs_under_torchrun(stage, synth_root, tmp_path):
    fill = {"images": str(synth_root / "unlabelled"), "voc": str(synth_root)}
    args = [a.format(**fill) for a in STAGES[stage]]
    args += ["--iterations", "3", "--set", "train.workers=0", "--name", "ddp"]
    done = torchrun(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "ddp" / "metrics.json").read_text())
    assert metrics.get("iterations") == 3
    loss = metrics.get("final_loss")
    assert loss is not None and loss == loss  # finite, averaged over both processes
    log = (tmp_path / "runs" / "ddp" / "log.txt").read_text()
    assert log.count(" it 3/3 ") == 1  # one writer


def test_single_process_stages_refuse_torchrun(synth_root, tmp_path):
    done = torchrun(["transfer", "--task", "knn", "--data", str(synth_root)], tmp_path)
    assert done.returncode != 0
    assert "runs in one process" in done.stderr
