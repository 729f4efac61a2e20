import json
from dataclasses import dataclass

import pytest
import torch

from benchmark.errors import BenchError
from benchmark.runs import atomic_write_text, open_run


@dataclass
class Cfg:
    lr: float = 0.1


def test_run_folder_contents(tmp_path):
    run = open_run(tmp_path / "r", Cfg(), command="bench x")
    run.logger.info("hello")
    run.log_scalars(3, {"loss": 1.5})
    run.save_checkpoint({"w": torch.ones(2)})
    run.write_metrics({"map": 0.5})
    run.close()
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"config.yaml", "metrics.json", "log.txt", "scalars.jsonl", "checkpoints"} <= files
    assert "hello" in (tmp_path / "r" / "log.txt").read_text()
    row = json.loads((tmp_path / "r" / "scalars.jsonl").read_text())
    assert row["step"] == 3 and row["loss"] == 1.5
    assert torch.equal(run.load_checkpoint()["w"], torch.ones(2))


def test_no_overwrite_without_force_and_resume_checks_config(tmp_path):
    open_run(tmp_path / "r", Cfg()).close()
    with pytest.raises(BenchError, match="--force"):
        open_run(tmp_path / "r", Cfg())
    run = open_run(tmp_path / "r", Cfg(), resume=True)
    assert run.resumed
    run.close()
    with pytest.raises(BenchError, match="lr"):
        open_run(tmp_path / "r", Cfg(lr=0.2), resume=True)
    (tmp_path / "r" / "junk").write_text("x")
    open_run(tmp_path / "r", Cfg(lr=0.2), force=True).close()
    assert not (tmp_path / "r" / "junk").exists()


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
