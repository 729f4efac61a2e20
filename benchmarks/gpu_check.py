"""The GPU check: on one GPU, in a few minutes, every stage trains for a few iterations with
mixed precision and channels_last, its loss is finite and falls, and the paper's full
schedules are projected from the measured rates.

    python -m benchmarks.gpu_check                 # on cuda:0 (exit 1 if any check fails)
    python -m benchmarks.gpu_check --plan          # print what it would run, run nothing
    python -m benchmarks.gpu_check --device cpu --small   # a smoke run of the script itself

Part 1, steps: each training step exactly as its stage builds it (`benchmarks.steps`: the
stage's model, `make_step`, optimiser and `Precision`, at the protocol's sizes and batch),
with `precision: auto` (bf16 autocast on a GPU with bf16, else fp16 with loss scaling) and
channels_last. One fixed random batch is trained on for `--iterations` steps: every loss must
be finite and the mean of the last three below the first (a fixed batch is memorised, so a
step that does not lower it is broken). The steps after the first few are timed; the table
gives img/s and the projected wall time of the paper's schedule (PROTOCOL.md: 100k
pretraining iterations, classification 80k, detection 40k, FCN 100k updates of 20 images).
The projection is compute only: one GPU, data loading assumed hidden behind the step.

Part 2, stages: every stage's real command (`bench pretrain` for each method, then
`bench transfer` for every task from the context encoder's weights) on the embedded
synthetic dataset for a few iterations with `--device`: the whole path (data pipeline,
pinned memory, evaluation, checkpoints, metrics.json) on the GPU. A stage passes when it
exits 0 and its metrics.json records a finite loss.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmark.distributed import DistEnv, pick_device
from benchmark.loop import Precision, resolve_precision
from benchmarks.common import markdown_table, sync
from benchmarks.steps import STEPS


@dataclass(frozen=True)
class Schedule:
    """The paper's schedule of one step: `iterations` updates of `passes` step calls."""

    iterations: int
    passes: int = 1


SCHEDULES = {
    "context-encoder": Schedule(100_000),
    "autoencoder": Schedule(100_000),
    "inpainting": Schedule(100_000),
    "classification": Schedule(80_000),
    "detection": Schedule(40_000),
    "segmentation": Schedule(100_000, passes=20),  # iter_size 20: one image per pass
}

PRETRAIN = [
    "context-encoder",
    "autoencoder",
    "inpainting",
    "relative-position",
    "rotation",
    "jigsaw",
]
TRANSFER = ["classification", "detection", "segmentation", "svm", "knn"]


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def check_step(
    name: str, env: DistEnv, prec: Precision, batch: int, iterations: int, warmup: int
) -> dict[str, Any]:
    """Train `name`'s step on one fixed batch; time the steps after `warmup`."""
    torch.manual_seed(0)
    build, default_batch = STEPS[name]
    step, images = build(env, prec, batch or default_batch)
    losses, times = [], []
    for i in range(iterations):
        sync(env.device)
        tic = time.perf_counter()
        out = step()
        sync(env.device)
        if i >= warmup:
            times.append(time.perf_counter() - tic)
        if isinstance(out, dict) and "loss" in out:
            losses.append(float(out["loss"]))
    per_step = sorted(times)[len(times) // 2] if times else float("nan")
    row: dict[str, Any] = {
        "step": name,
        "batch": images,
        "ms/step": per_step * 1e3,
        "img/s": images / per_step,
    }
    if losses:
        finite = all(math.isfinite(v) for v in losses)
        tail = losses[-max(1, len(losses) // 3) :]  # the last third of the steps
        falls = finite and sum(tail) / len(tail) < losses[0]
        row.update(
            {
                "loss first": losses[0],
                "loss last": losses[-1],
                "ok": "yes"
                if finite and falls
                else ("NOT FINITE" if not finite else "DOES NOT FALL"),
            }
        )
    else:  # the probes' forward pass has no loss
        row.update({"loss first": None, "loss last": None, "ok": "yes (no loss)"})
    sched = SCHEDULES.get(name)
    if sched is not None:
        row["paper schedule"] = f"{sched.iterations // 1000}k x {sched.passes}"
        row["projected"] = _hours(sched.iterations * sched.passes * per_step)
    return row


def stage_commands(out: Path, device: str, iterations: int) -> list[tuple[str, list[str]]]:
    """(label, argv) of every stage's real command, the transfers from the context encoder."""
    common = ["--device", device, "--out", str(out)]
    its = ["--iterations", str(iterations)]
    cmds = []
    for method in PRETRAIN:
        extra = ["--mask", "random-region"] if method == "context-encoder" else []
        cmds.append(
            (
                f"pretrain {method}",
                ["pretrain", "--method", method, "--name", f"pre-{method}", *extra, *common, *its],
            )
        )
    weights = str(out / "runs" / "pre-context-encoder")
    for task in TRANSFER:
        probe = task in ("svm", "knn")  # no training loop: nothing to shorten
        argv = ["transfer", "--task", task, "--weights", weights, "--name", f"tr-{task}"]
        if task == "svm":  # the path, not the numbers: three costs, no low-shot draws (CPU-bound)
            argv += ["--set", "low_shot=false", "--set", "costs=[0.1,1.0,10.0]"]
        cmds.append((f"transfer {task}", [*argv, *common, *([] if probe else its)]))
    return cmds


def check_stage(label: str, argv: list[str], out: Path) -> dict[str, Any]:
    tic = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cli", *argv], capture_output=True, text=True
    )
    seconds = time.perf_counter() - tic
    row: dict[str, Any] = {"stage": label, "seconds": seconds}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**row, "ok": f"exit {proc.returncode}: {tail[:120]}"}
    name = argv[argv.index("--name") + 1]
    metrics = json.loads((out / "runs" / name / "metrics.json").read_text())
    loss = metrics.get("final_loss")
    row.update({"precision": metrics.get("precision"), "loss": loss})
    needs_loss = not label.endswith(("svm", "knn"))
    ok = not needs_loss or (loss is not None and math.isfinite(loss))
    return {**row, "ok": "yes" if ok else "NO FINITE LOSS"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--iterations", type=int, default=15, help="steps per training step check")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (cudnn autotune)")
    p.add_argument("--stage-iterations", type=int, default=10, help="iterations per stage run")
    p.add_argument("--small", action="store_true", help="batch 2: a smoke run on a CPU")
    p.add_argument("--plan", action="store_true", help="print what would run and exit")
    p.add_argument("--skip-stages", action="store_true", help="only part 1 (the steps)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    precision = resolve_precision("auto", device)
    batch = 2 if args.small else 0
    out = Path(tempfile.mkdtemp(prefix="bench-gpu-check-"))
    commands = [] if args.skip_stages else stage_commands(out, str(device), args.stage_iterations)
    if args.plan:
        print(f"device {device}, precision {precision}, channels_last")
        for name, (_, default_batch) in STEPS.items():
            print(f"step {name}: batch {batch or default_batch}, {args.iterations} iterations")
        for label, cmd in commands:
            print(f"stage {label}: bench {' '.join(cmd)}")
        return 0
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{time.strftime('%Y-%m-%d')}: {gpu}, torch {torch.__version__}, precision {precision}")
    env = DistEnv(0, 1, 0, device)
    prec = Precision(precision, device)
    tic = time.perf_counter()
    steps = [check_step(n, env, prec, batch, args.iterations, args.warmup) for n in STEPS]
    print("\n" + markdown_table(steps))
    stages = [check_stage(label, cmd, out) for label, cmd in commands]
    if stages:
        print("\n" + markdown_table(stages))
    print(f"\n{time.perf_counter() - tic:.0f} s in all; stage runs under {out}")
    failed = [r for r in steps + stages if not str(r["ok"]).startswith("yes")]
    for r in failed:
        print(f"FAILED {r.get('step') or r.get('stage')}: {r['ok']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
