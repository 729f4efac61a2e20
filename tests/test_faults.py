"""Faults a new user meets: hostile files, path-escaping names, bad flags, broken disks.

Each must give one line on stderr naming the file or key, a non-zero exit, nothing
half-written, and never run code from a file.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench import cli
from benchmark.errors import BenchError
from benchmark.runs import atomic_write_text, check_run_name, open_run
from benchmark.safe_pickle import safe_load, safe_loads

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Cfg:
    lr: float = 0.1
    device: str = "cpu"


class Payload:
    """Unpickling this creates a marker file: proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bench(*args: str, env: dict | None = None) -> tuple[int, str]:
    """Run `bench` in-process; (exit code, stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as exc:  # argparse
                code = int(exc.code or 0)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return code, err.getvalue()


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("bench: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


# ------------------------------------------------------------------ names and folders


@pytest.mark.parametrize("name", ["..", ".", "../escape", "a/b", "/abs", "", ".hidden", "-x"])
def test_run_names_are_single_path_components(name, tmp_path):
    with pytest.raises(BenchError, match="not a valid run name"):
        check_run_name(name)
    if not name:
        return  # `--name ""` means the default name
    code, err = _bench("pretrain", "--method", "random", f"--name={name}", "--force",
                       "--out", str(tmp_path / "results"))  # fmt: skip
    assert code == 2 and "not a valid run name" in _one_line(err)
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "results"])  # nothing removed/made


def test_force_with_dotdot_never_removes_the_results_folder(tmp_path):
    results = tmp_path / "results"
    keep = results / "precious.txt"
    keep.parent.mkdir()
    keep.write_text("keep me")
    code, err = _bench("pretrain", "--method", "random", "--name", "..", "--force",
                       "--out", str(results))  # fmt: skip
    assert code == 2 and keep.read_text() == "keep me"


def test_a_symlinked_run_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.txt").write_text("x")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "r").symlink_to(outside)
    with pytest.raises(BenchError, match="symbolic link"):
        open_run(runs / "r", Cfg(), force=True)
    assert (outside / "data.txt").exists()


def test_two_processes_cannot_open_one_run(tmp_path):
    run = open_run(tmp_path / "r", Cfg())
    code = (
        "import sys; from dataclasses import dataclass; from benchmark.runs import open_run\n"
        "@dataclass\nclass Cfg:\n    lr: float = 0.1\n    device: str = 'cpu'\n"
        f"open_run(__import__('pathlib').Path({str(tmp_path / 'r')!r}), Cfg(), force=True)\n"
    )
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                           text=True)  # fmt: skip
    assert other.returncode != 0 and "in use by another bench process" in other.stderr
    run.close()
    again = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True)
    assert again.returncode == 0  # the lock goes with the process that held it


def test_failed_run_without_checkpoint_is_rerun_with_corrected_flags(tmp_path):
    run = open_run(tmp_path / "r", Cfg(lr=-1.0))
    run.close()  # it failed before saving any checkpoint
    run = open_run(tmp_path / "r", Cfg(lr=0.1))  # a plain rerun starts over
    assert not run.resumed
    run.close()
    run = open_run(tmp_path / "r", Cfg(lr=0.2), resume=True)  # so does --resume
    assert not run.resumed and run.checkpoint is None
    run.close()


def test_resume_accepts_runtime_keys_and_refuses_changed_ones(tmp_path):
    run = open_run(tmp_path / "r", Cfg())
    from benchmark.checkpoint import make_checkpoint

    run.save_checkpoint(make_checkpoint(stage="t", config={"lr": 0.1, "device": "cpu"},
                                        iteration=2, seconds=1.0, state={}))  # fmt: skip
    run.close()
    with pytest.raises(BenchError, match="--resume"):
        open_run(tmp_path / "r", Cfg())
    run = open_run(tmp_path / "r", Cfg(device="cuda"), resume=True)  # runtime key: fine
    assert run.resumed and run.checkpoint["iteration"] == 2
    run.close()
    with pytest.raises(BenchError, match="config differs at 'lr'"):
        open_run(tmp_path / "r", Cfg(lr=0.2), resume=True)


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


# ------------------------------------------------------------------ hostile files


def test_a_hostile_checkpoint_never_runs_on_resume(tmp_path):
    marker = tmp_path / "pwned"
    run = open_run(tmp_path / "r", Cfg())
    run.close()
    (tmp_path / "r" / "checkpoints").mkdir()
    torch.save({"x": Payload(marker)}, tmp_path / "r" / "checkpoints" / "last.pt")
    with pytest.raises(BenchError, match="unreadable checkpoint"):
        open_run(tmp_path / "r", Cfg(), resume=True)
    assert not marker.exists()


def test_a_hostile_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "proposals.pkl"
    evil.write_bytes(pickle.dumps({"ids": ["a"], "boxes": [Payload(marker)]}))
    with pytest.raises(BenchError, match="not allowed") as err:
        safe_load(evil)
    assert "proposals.pkl" in str(err.value) and not marker.exists()
    for payload in (b"cos\nsystem\n(S'touch x'\ntR.", b"\x80\x04\x95garbage", b""):
        with pytest.raises(BenchError):
            safe_loads(payload, "f.pkl")
    import numpy as np

    good = {"ids": ["a"], "boxes": [np.ones((2, 4), np.float32)], "bbox_mode": 0}
    assert safe_loads(pickle.dumps(good))["boxes"][0].shape == (2, 4)


def test_weights_with_nan_are_a_one_line_error(tmp_path):
    from encoders.alexnet import AlexNetEncoder
    from weights.encoder import load_encoder
    from weights.native import write_native

    state = AlexNetEncoder().state_dict()
    state["features.3.weight"][0, 0, 0, 0] = float("nan")
    card = {"method": "x", "mask": None, "iterations": 0, "data": None, "config_hash": None,
            "arch": "caffenet", "pool_free": False, "pretrain_seconds": None}  # fmt: skip
    path = write_native(tmp_path / "w.safetensors", state, card)
    with pytest.raises(BenchError, match="features.3.weight"):
        load_encoder(path)


# ------------------------------------------------------------------ flags


@pytest.mark.parametrize(
    "args, key",
    [
        (["--set", "train.batch_size=-4"], "train.batch_size"),
        (["--set", "train.lr=-0.1"], "train.lr"),
        (["--device", "tpu"], "device"),
        (["--set", "train.workers=-1"], "train.workers"),
    ],
)
def test_bad_flags_are_one_line_errors(args, key, tmp_path):
    code, err = _bench("transfer", "--task", "classification", *args,
                       "--out", str(tmp_path))  # fmt: skip
    assert code == 2 and key in _one_line(err)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("metrics.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_an_error_not_a_silent_cpu_run(tmp_path):
    code, err = _bench("pretrain", "--method", "random", "--device", "cuda",
                       "--out", str(tmp_path))  # fmt: skip
    assert code == 2 and "no usable CUDA" in _one_line(err)


def test_export_never_overwrites_without_force(tmp_path):
    out = tmp_path / "results"
    assert _bench("pretrain", "--method", "random", "--name", "r", "--out", str(out))[0] == 0
    target = tmp_path / "mine.pth"
    target.write_text("my file")
    code, err = _bench("export", str(out / "runs" / "r"), "--format", "torchvision",
                       "--out", str(target))  # fmt: skip
    assert code == 2 and "--force" in _one_line(err) and target.read_text() == "my file"
    code, _ = _bench("export", str(out / "runs" / "r"), "--format", "torchvision",
                     "--out", str(target), "--force")  # fmt: skip
    assert code == 0 and target.read_bytes() != b"my file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_output_disk_is_one_line(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, err = _bench("pretrain", "--method", "random", "--out", str(out))
    finally:
        out.chmod(0o700)
    assert code == 2 and "cannot write" in _one_line(err)


def test_a_read_only_file_system_is_one_line(tmp_path, monkeypatch):
    import errno

    import benchmark.runs as runs

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(runs.tempfile, "mkstemp", read_only)
    code, err = _bench("pretrain", "--method", "random", "--out", str(tmp_path))
    assert code == 2 and "Read-only file system" in _one_line(err)


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    import errno

    import benchmark.runs as runs

    out = tmp_path / "results"
    real = runs.os.replace

    def full(src, dst):
        if str(dst).endswith("metrics.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(runs.os, "replace", full)
    code, err = _bench("pretrain", "--method", "random", "--name", "r", "--out", str(out))
    assert code == 2 and "No space left" in _one_line(err) and "metrics.json" in err
    run = out / "runs" / "r"
    assert not (run / "metrics.json").exists() and not list(run.rglob("*.tmp"))


def test_cli_json_outputs_are_valid_after_a_run(tmp_path):
    out = tmp_path / "results"
    assert _bench("pretrain", "--method", "random", "--name", "r", "--out", str(out))[0] == 0
    metrics = json.loads((out / "runs" / "r" / "metrics.json").read_text())
    assert metrics["method"] == "random" and metrics["stage"] == "pretrain"
