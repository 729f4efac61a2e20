import json
from dataclasses import dataclass

import pytest
import torch

from benchmark import runs
from benchmark.checkpoint import make_checkpoint
from benchmark.config import to_dict
from benchmark.errors import BenchError, ConfigError
from benchmark.runs import atomic_write_text, check_run_name, open_run


@dataclass
class Cfg:
    lr: float = 0.1
    device: str = "cpu"  # a runtime key: ignored when a resume compares configs


def _checkpoint(run, cfg, iteration=3):
    return make_checkpoint(
        stage="test",
        config=to_dict(cfg),
        iteration=iteration,
        seconds=1.0,
        state={"model": {"w": torch.ones(2)}},
        logs=run.log_sizes(),
    )


def test_run_folder_contents(tmp_path):
    run = open_run(tmp_path / "r", Cfg(), command="bench x")
    run.logger.info("hello")
    run.log_scalars(3, {"loss": 1.5})
    run.save_checkpoint(_checkpoint(run, Cfg()))
    run.write_metrics({"map": 0.5})
    run.close()
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"config.yaml", "metrics.json", "log.txt", "scalars.jsonl", "checkpoints"} <= files
    assert ".lock" in files and "command.txt" in files
    assert "hello" in (tmp_path / "r" / "log.txt").read_text()
    row = json.loads((tmp_path / "r" / "scalars.jsonl").read_text())
    assert row["step"] == 3 and row["loss"] == 1.5
    assert torch.equal(run.load_checkpoint()["state"]["model"]["w"], torch.ones(2))
    # Atomic writes get the permissions the umask gives, not mkstemp's 0600.
    mode = (tmp_path / "r" / "metrics.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~runs._UMASK


def test_finished_run_refuses_plain_rerun_and_resume_checks_config(tmp_path):
    run = open_run(tmp_path / "r", Cfg())
    run.write_metrics({"map": 0.5})
    run.close()
    with pytest.raises(BenchError, match="--force"):
        open_run(tmp_path / "r", Cfg())
    run = open_run(tmp_path / "r", Cfg(), resume=True)
    assert run.resumed and run.complete
    run.close()
    with pytest.raises(BenchError, match="lr"):
        open_run(tmp_path / "r", Cfg(lr=0.2), resume=True)
    (tmp_path / "r" / "junk").write_text("x")
    run = open_run(tmp_path / "r", Cfg(lr=0.2), force=True)
    assert not run.resumed and not run.complete
    run.close()
    assert not (tmp_path / "r" / "junk").exists()


def test_unfinished_run_with_checkpoint_resumes_only_when_asked(tmp_path):
    path = tmp_path / "r"
    run = open_run(path, Cfg())
    run.logger.info("before the checkpoint")
    run.save_checkpoint(_checkpoint(run, Cfg()))
    run.logger.info("after the checkpoint")
    run.close()
    with pytest.raises(BenchError, match="--resume"):
        open_run(path, Cfg())
    with pytest.raises(BenchError, match="lr"):
        open_run(path, Cfg(lr=0.2), resume=True)
    # Runtime keys (device, workers, ...) may change between sessions.
    run = open_run(path, Cfg(device="cuda"), resume=True)
    try:
        assert run.resumed
        assert run.checkpoint is not None and run.checkpoint["iteration"] == 3
        assert torch.equal(run.checkpoint["state"]["model"]["w"], torch.ones(2))
        assert run.take_checkpoint() is not None and run.checkpoint is None
    finally:
        run.close()
    log = (path / "log.txt").read_text()
    assert "before the checkpoint" in log and "after the checkpoint" not in log


def test_unfinished_run_without_checkpoint_starts_over(tmp_path):
    path = tmp_path / "r"
    run = open_run(path, Cfg())
    run.log_scalars(1, {"loss": 2.0})
    run.close()
    (path / "junk").write_text("x")
    for resume in (False, True):
        run = open_run(path, Cfg(lr=0.2), resume=resume)
        assert not run.resumed and run.checkpoint is None
        run.close()
        assert not (path / "junk").exists() and not (path / "scalars.jsonl").exists()
        assert "lr: 0.2" in (path / "config.yaml").read_text()


def test_run_folder_is_locked_while_open(tmp_path):
    run = open_run(tmp_path / "r", Cfg())
    try:
        with pytest.raises(BenchError, match="in use"):
            open_run(tmp_path / "r", Cfg(), force=True)
    finally:
        run.close()
    open_run(tmp_path / "r", Cfg(), force=True).close()


@pytest.mark.parametrize("name", ["a/b", "..", ".hidden", "-x", "a b", ""])
def test_run_names_are_one_folder_name(tmp_path, name):
    with pytest.raises(ConfigError, match="run name"):
        check_run_name(name)
    assert check_run_name("ce-central_seed=1.2") == "ce-central_seed=1.2"


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    atomic_write_text(path, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
