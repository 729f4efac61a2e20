"""Nothing lost: no run deletes what it did not make, no field read from a file becomes a
path, a size or an index unchecked, no write goes through a symbolic link bench did not
make, and every hostile file is one line on stderr with a non-zero exit.

Every case writes its hostile input itself, then checks that nothing outside the run (or
nothing at all) changed, that no code ran, and that `bench` printed exactly one error line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmark import cli
from benchmark.checkpoint import make_checkpoint
from benchmark.config import to_dict
from benchmark.errors import BenchError
from benchmark.runs import MARKER_FILE, folder_kind, open_run

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Cfg:
    lr: float = 0.1
    device: str = "cpu"


class Payload:
    """Unpickling this creates a file: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bench(*args: str) -> tuple[int, str]:
    """`bench ARGS` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return code, err.getvalue()


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("bench: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def fails(*args: str) -> str:
    """Run bench, expect exit 2 with one error line; return that line."""
    code, err = bench(*args)
    assert code == 2, err
    return one_line(err)


def snapshot(root: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every file, folder and link below `root`, with its bytes or target (links unfollowed)."""
    out: dict[str, tuple[str, bytes | str]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            key = str(p.relative_to(root))
            if p.is_symlink():
                out[key] = ("link", os.readlink(p))
            elif p.is_dir():
                out[key] = ("dir", b"")
            else:
                out[key] = ("file", p.read_bytes())
    return out


def outside(snap: dict, run: str) -> dict:
    """A snapshot without the entries of the run folder `run` (a path relative to its root)."""
    return {k: v for k, v in snap.items() if k != run and not k.startswith(run + os.sep)}


def pretrain(out: Path, name: str, *flags: str) -> tuple[str, ...]:
    """The fastest real run: a random encoder, exported as a pretraining run."""
    return ("pretrain", "--method", "random", "--name", name, "--out", str(out), *flags)


# ======================================================================= 1. deletes only its own


@pytest.mark.parametrize("flag", [(), ("--force",), ("--resume",)])
def test_a_suites_folder_is_never_cleared_by_a_run(tmp_path, flag):
    from benchmark.suite import claim_suite_root

    out = tmp_path / "results"
    suite = claim_suite_root(out / "runs" / "tiny")
    (suite / "suite.yaml").write_text("name: tiny\n")
    (suite / ".launcher.lock").write_text("")
    step = open_run(suite / "pretrain-random-s0", Cfg())
    step.write_metrics({"stage": "pretrain", "method": "random"})
    step.close()
    before = snapshot(tmp_path)
    line = fails(*pretrain(out, "tiny", *flag))
    assert "suite's folder" in line and snapshot(tmp_path) == before


@pytest.mark.parametrize("flag", [(), ("--force",), ("--resume",)])
@pytest.mark.parametrize(
    "content",
    [
        {"notes.txt": b"my notes"},  # a user's folder that has the run's name
        {"suite.yaml": b"name: tiny\n", ".launcher.lock": b""},  # an older bench's suite
        {"config.yaml": b"lr: 0.1\n", "log.txt": b"x"},  # a failed run of an older bench
        {MARKER_FILE: b'{"kind": "run"}', "data.csv": b"1,2"},  # a marker bench did not write
        {"sub/deep/file.bin": b"\0\1"},
    ],
)
def test_a_folder_bench_did_not_make_is_never_cleared(tmp_path, content, flag):
    out = tmp_path / "results"
    folder = out / "runs" / "r"
    for name, data in content.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    before = snapshot(tmp_path)
    line = fails(*pretrain(out, "r", *flag))
    assert "did not make this folder" in line and "remove it by hand" in line
    assert snapshot(tmp_path) == before


def test_an_older_benchs_run_folder_resumes_but_is_never_cleared(tmp_path):
    out = tmp_path / "results"
    assert bench(*pretrain(out, "r"))[0] == 0
    run = out / "runs" / "r"
    (run / MARKER_FILE).unlink()  # as a run folder written before the marker existed
    before = snapshot(tmp_path)
    for flag in ((), ("--force",)):
        assert "remove it by hand" in fails(*pretrain(out, "r", *flag))
        assert snapshot(tmp_path) == before
    code, err = bench(*pretrain(out, "r", "--resume"))  # reusing its results deletes nothing
    assert code == 0, err
    assert (run / "metrics.json").read_bytes() == before["results/runs/r/metrics.json"][1]
    assert folder_kind(run) is None  # resuming does not make it bench's to clear


def test_a_run_folder_holding_another_bench_folder_is_not_cleared(tmp_path):
    out = tmp_path / "results"
    assert bench(*pretrain(out, "r"))[0] == 0
    inner = out / "runs" / "r" / "mine" / "results" / "runs"
    assert bench(*pretrain(inner.parent, "kept"))[0] == 0
    before = snapshot(tmp_path)
    assert "holds another bench folder" in fails(*pretrain(out, "r", "--force"))
    assert snapshot(tmp_path) == before


def test_bench_clears_what_it_made_and_takes_an_empty_folder(tmp_path):
    out = tmp_path / "results"
    (out / "runs" / "r").mkdir(parents=True)  # empty: nothing to lose
    assert bench(*pretrain(out, "r"))[0] == 0
    assert folder_kind(out / "runs" / "r") == "run"
    (out / "runs" / "r" / "junk").write_text("x")
    assert bench(*pretrain(out, "r", "--force"))[0] == 0
    assert not (out / "runs" / "r" / "junk").exists()


def test_a_suite_never_moves_into_a_run_or_a_users_folder(tmp_path, synth_root):
    import yaml

    from benchmark.suite import run_suite

    out = tmp_path / "results"
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({"name": "r", "device": "cpu", "pretrain": {"random": {}},
                                     "report": False}))  # fmt: skip
    assert bench(*pretrain(out, "r"))[0] == 0  # a run folder named like the suite
    before = snapshot(tmp_path)
    with pytest.raises(BenchError, match="is a run folder"):
        run_suite(suite, out=out)
    assert snapshot(tmp_path) == before
    (out / "runs" / "r" / MARKER_FILE).unlink()
    before = snapshot(tmp_path)
    with pytest.raises(BenchError, match="did not make this folder"):
        run_suite(suite, out=out)
    assert snapshot(tmp_path) == before


# ============================================================= 2. checkpoint fields are checked


def _checkpoint_run(tmp_path: Path, **changes) -> tuple[Path, Path]:
    """A run folder with logs and a checkpoint whose fields `changes` replaces."""
    run = open_run(tmp_path / "runs" / "r", Cfg())
    run.logger.info("line")
    run.log_scalars(1, {"loss": 1.0})
    ckpt = make_checkpoint(stage="t", config=to_dict(Cfg()), iteration=1, seconds=1.0,
                           state={"model": {"w": torch.ones(2)}}, logs=run.log_sizes())  # fmt: skip
    for key, value in changes.items():
        node = ckpt
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    run.save_checkpoint(ckpt)
    run.logger.info("after")
    run.close()
    return tmp_path / "runs" / "r", tmp_path / "runs" / "r" / "checkpoints" / "last.pt"


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"logs": {"VICTIM": 5}}, "logs"),  # an absolute path
        ({"logs": {"../../../victim.txt": 0}}, "logs"),
        ({"logs": {"log.txt": -1}}, "logs.log.txt"),
        ({"logs": {"log.txt": "5"}}, "logs.log.txt"),
        ({"logs": {"scalars.jsonl": 2.5}}, "logs.scalars.jsonl"),
        ({"logs": {"log.txt": True}}, "logs.log.txt"),
        ({"logs": [["log.txt", 0]]}, "logs"),
        ({"iteration": -3}, "iteration"),
        ({"iteration": "3"}, "iteration"),
        ({"seconds": float("nan")}, "seconds"),
        ({"config": ["lr", 0.1]}, "config"),
        ({"stage": 7}, "stage"),
        ({"state": {"model": [1, 2]}}, "state.model"),
        ({"scalars": {"history": [1, 2]}}, "scalars.history"),
        ({"rng.python": torch.zeros(3, dtype=torch.int64)}, "rng.python"),
        ({"rng.numpy": torch.full((624,), -1, dtype=torch.int64)}, "rng.numpy"),
        ({"rng.torch": torch.zeros(7, dtype=torch.uint8)}, "rng.torch"),
        ({"rng.numpy_meta": torch.tensor([9999.0, 0, 0], dtype=torch.float64)}, "rng.numpy"),
        ({"rng": "seed"}, "rng"),
    ],
)
def test_checkpoint_fields_never_name_files_or_break_the_resume(tmp_path, changes, field):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    if changes.get("logs") == {"VICTIM": 5}:
        changes = {"logs": {str(victim): 5}}
    folder, _ = _checkpoint_run(tmp_path / "w", **changes)
    before = snapshot(tmp_path)
    with pytest.raises(BenchError) as err:
        open_run(folder, Cfg(), resume=True)
    message = str(err.value)
    assert "\n" not in message and "last.pt" in message and f"{field}" in message
    assert snapshot(tmp_path) == before


def test_a_checkpoint_of_the_wrong_shape_is_one_line_on_resume(tmp_path, synth_root):
    out = tmp_path / "results"
    args = ("pretrain", "--method", "context-encoder", "--mask", "central", "--name", "r",
            "--out", str(out),
            "--data", str(synth_root / "unlabelled"), "--set", "model.input_size=67",
            "--set", "train.batch_size=2", "--set", "train.sample_every=0",
            "--set", "train.workers=0", "--iterations", "2", "--device", "cpu",
            "--set", "train.checkpoint_every=1")  # fmt: skip
    code, err = bench(*args)
    assert code == 0, err
    (out / "runs" / "r" / "metrics.json").unlink()  # as if killed after its checkpoint
    ckpt_path = out / "runs" / "r" / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    key = next(iter(ckpt["state"]["model"]))
    ckpt["state"]["model"][key] = torch.zeros(1, 2, 3)
    torch.save(ckpt, ckpt_path)
    line = fails(*args, "--resume")
    assert "last.pt" in line and "state.model" in line


# ============================================================== 3. no write through a link


@pytest.mark.parametrize("which", ["log.txt", "scalars.jsonl", "checkpoints", "command.txt",
                                   "tensorboard", ".lock", "encoder.safetensors"])  # fmt: skip
@pytest.mark.parametrize("flag", ["--resume", "--force"])
def test_a_symbolic_link_in_a_run_folder_is_never_followed(tmp_path, which, flag):
    import shutil

    out = tmp_path / "results"
    assert bench(*pretrain(out, "r"))[0] == 0
    run = out / "runs" / "r"
    victim = tmp_path / "victim"
    if which in ("checkpoints", "tensorboard"):
        victim.mkdir()
        (victim / "last.pt").write_text("precious")
    else:
        victim.write_text("precious data\n" * 10)
    target = run / which
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    target.symlink_to(victim)
    before = outside(snapshot(tmp_path), "results/runs/r")
    code, err = bench(*pretrain(out, "r", flag))
    # --force clears the link itself (bench made the folder); reusing the run refuses it.
    if flag == "--resume" or which == ".lock":
        assert code == 2 and "symbolic link" in one_line(err)
    assert outside(snapshot(tmp_path), "results/runs/r") == before


@pytest.mark.parametrize("which", ["log.txt", "scalars.jsonl", "checkpoints"])
def test_resume_refuses_links_to_logs_and_checkpoints(tmp_path, which):
    folder, _ = _checkpoint_run(tmp_path / "w")
    victim = tmp_path / "victim"
    if which == "checkpoints":
        (folder / which).rename(victim)
    else:
        victim.write_text("precious data\n" * 50)
        (folder / which).unlink()
    (folder / which).symlink_to(victim)
    before = outside(snapshot(tmp_path), "w/runs/r")
    with pytest.raises(BenchError, match="symbolic link"):
        open_run(folder, Cfg(), resume=True)
    assert outside(snapshot(tmp_path), "w/runs/r") == before


# ======================================================================= no code ever runs


def test_a_pickled_payload_in_a_checkpoint_never_runs(tmp_path):
    folder, ckpt_path = _checkpoint_run(tmp_path / "w")
    marker = tmp_path / "pwned"
    torch.save({"format": "bench-checkpoint/1", "logs": Payload(marker)}, ckpt_path)
    with pytest.raises(BenchError, match="unreadable checkpoint"):
        open_run(folder, Cfg(), resume=True)
    assert not marker.exists()
    ckpt_path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(BenchError):
        open_run(folder, Cfg(), resume=True)
    assert not marker.exists()


def test_bench_marks_the_run_folders_it_makes(tmp_path):
    out = tmp_path / "results"
    assert bench(*pretrain(out, "r"))[0] == 0
    marker = json.loads((out / "runs" / "r" / MARKER_FILE).read_text())
    assert marker["kind"] == "run" and marker["format"] == "bench-folder/1"
