"""`bench run --launcher local|slurm`: the suite's graph run as submitit jobs.

The fast tests check the resources, the SLURM parameters and sbatch script built from them,
the suite lock, `--step` and the live view. The slow ones run real launchers on a tiny suite
(random + context-encoder, classification, 2 iterations): two local workers give the tables
of the sequential run; the SLURM path's jobs run through a LocalExecutor; a launcher killed
with SIGKILL while a step runs is rerun to the same results; a failed step leaves the others
running, is named with its log's tail, blocks its dependents, and the rerun after the fix runs
only what is missing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import yaml

from bench import cli
from bench.launch import (
    SlurmBackend,
    StepState,
    View,
    launch,
    slurm_parameters,
)
from bench.suite import load_suite, step_resources, suite_lock
from benchmark.errors import BenchError, ConfigError

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"iterations": 2, "batch_size": 4, "workers": 0, "threads": 1}
RESOURCES = {
    "default": {"timeout_min": 60},
    "pretrain": {"gpus_per_node": 1, "cpus_per_task": 8, "timeout_min": 1440,
                 "partition": "gpu"},
    "transfer": {"cpus_per_task": 2, "mem_gb": 16},
    "classification-random-s1": {"partition": "debug"},
}  # fmt: skip


def _suite(tmp_path: Path, synth: Path, seeds=(0, 1), ce_data: str | None = None, **top) -> Path:
    suite = {
        "name": "tiny", "device": "cpu", "seeds": list(seeds),
        "pretrain": {
            "random": {},
            "context-encoder": {
                "mask": "central", "data": ce_data or str(synth / "unlabelled"),
                "model": {"input_size": 67}, "train": {**TRAIN, "sample_every": 0},
            },
        },
        "transfer": {
            "classification": {
                "data": str(synth), "hidden": 16, "augment": {"crop": 67},
                "test": {"mode": "center"}, "train": TRAIN,
            },
        },
        **top,
    }  # fmt: skip
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def _bench(args: list[str], out: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("BENCH_FAULT", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU jobs, whatever this machine has
    return subprocess.Popen(
        [sys.executable, "-m", "bench.cli", *args, "--out", str(out)], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip


def _run(args: list[str], out: Path) -> tuple[int, str, str]:
    proc = _bench(args, out)
    stdout, stderr = proc.communicate(timeout=900)
    return proc.returncode, stdout, stderr


def _table(out: Path) -> list[dict]:
    with open(out / "reports" / "tiny" / "table2.csv", newline="") as f:
        return [{k: v for k, v in r.items() if "time" not in k.lower()}
                for r in csv.DictReader(f)]  # fmt: skip


def _metrics(out: Path, name: str) -> dict:
    m = json.loads((out / "runs" / "tiny" / name / "metrics.json").read_text())
    # without wall times, the command line and the weights' path (another results root)
    return {k: v for k, v in m.items()
            if not k.endswith("_seconds") and k not in ("command", "weights")}  # fmt: skip


def _status(out: Path) -> dict:
    return json.loads((out / "runs" / "tiny" / ".launcher" / "status.json").read_text())["steps"]


def _locked(root: Path) -> list[str]:
    """Run folders of `root` whose lock some process holds."""
    import fcntl

    held = []
    for lock in root.glob("*/.lock"):
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                held.append(lock.parent.name)
    return held


def _names(seeds=(0, 1)) -> list[str]:
    return [f"{kind}-{m}-s{s}" for s in seeds for m in ("random", "context-encoder")
            for kind in ("pretrain", "classification")]  # fmt: skip


@pytest.fixture(scope="module")
def sequential(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny suite (seeds 0 and 1) run by the sequential launcher: the reference. It runs
    in a fresh process, as the launchers' workers do: torch's thread count (recorded in every
    metrics.json) is then the machine's default, not what an earlier test in this process set."""
    tmp = tmp_path_factory.mktemp("sequential")
    rc, _, stderr = _run(["run", str(_suite(tmp, synth_root))], tmp / "out")
    assert rc == 0, stderr[-3000:]
    return tmp / "out"


# ------------------------------------------------------------------ fast: no jobs


def test_resources_merge_from_default_to_step_name(tmp_path, synth_root):
    suite, _, steps = load_suite(_suite(tmp_path, synth_root, resources=RESOURCES))
    by = {s.name: s for s in steps}
    assert step_resources(suite, by["pretrain-context-encoder-s0"]) == {
        "timeout_min": 1440,
        "gpus_per_node": 1,
        "cpus_per_task": 8,
        "partition": "gpu",
    }
    assert step_resources(suite, by["classification-random-s0"]) == {
        "timeout_min": 60,
        "cpus_per_task": 2,
        "mem_gb": 16,
    }
    assert step_resources(suite, by["classification-random-s1"])["partition"] == "debug"
    bad = _suite(tmp_path, synth_root, resources={"pretrian": {"timeout_min": 5}})
    with pytest.raises(ConfigError, match="resources.pretrian: not a step kind"):
        load_suite(bad)


def test_slurm_parameters_and_sbatch_script(tmp_path, synth_root, monkeypatch):
    """No cluster here: the SlurmExecutor is built as `--launcher slurm` builds it (srun's
    presence check faked) and its parameters and sbatch script are checked."""
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    suite, _, steps = load_suite(_suite(tmp_path, synth_root, resources=RESOURCES))
    pre = next(s for s in steps if s.name == "pretrain-context-encoder-s0")
    params = slurm_parameters(step_resources(suite, pre), pre.name)
    assert params == {"time": 1440, "gpus_per_node": 1, "cpus_per_task": 8, "partition": "gpu"}
    from bench.launch import slurm_executor

    ex = slurm_executor(tmp_path / "jobs", {"job_name": "bench-tiny", **params})
    assert ex.parameters == {"job_name": "bench-tiny", **params}
    script = ex._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for flag in ("--gpus-per-node=1", "--cpus-per-task=8", "--time=1440", "--partition=gpu",
                 "--job-name=bench-tiny"):  # fmt: skip
        assert f"#SBATCH {flag}" in script, flag
    from submitit.slurm.slurm import _make_sbatch_string

    array = _make_sbatch_string("cmd", tmp_path / "jobs", map_count=4, array_parallelism=2,
                                **params)  # fmt: skip
    assert "#SBATCH --array=0-3%2" in array
    cls = next(s for s in steps if s.name == "classification-random-s0")
    assert slurm_parameters(step_resources(suite, cls), cls.name)["mem"] == "16GB"
    with pytest.raises(BenchError, match="'gpus' is not a SlurmExecutor parameter"):
        slurm_parameters({"gpus": 1, "timeout_min": 5}, "x")
    with pytest.raises(BenchError, match="no timeout_min"):
        slurm_parameters({"partition": "gpu"}, "x")
    with pytest.raises(BenchError, match="one node and one task"):
        slurm_parameters({"timeout_min": 5, "nodes": 2}, "x")


def test_slurm_launcher_refuses_steps_without_a_time_limit_before_any_folder(tmp_path, synth_root):
    path = _suite(tmp_path, synth_root, resources={"pretrain": {"timeout_min": 10}})
    with pytest.raises(BenchError, match="classification-random-s0: no timeout_min"):
        launch(path, out=tmp_path / "out", launcher="slurm", executor_factory=lambda f, p: None)
    assert not (tmp_path / "out").exists()
    if not any((Path(d) / "sbatch").exists() for d in os.environ["PATH"].split(os.pathsep)):
        with pytest.raises(BenchError, match="no sbatch"):
            SlurmBackend(tmp_path / "jobs", None, "tiny")


def test_a_rerun_follows_slurm_jobs_that_still_run(tmp_path):
    """A SLURM launcher that died left jobs behind: the rerun follows those sacct still calls
    pending or running (status.json has their ids) and submits the rest anew."""
    states = {"123_0": "RUNNING", "124": "PENDING", "125": "COMPLETED", "126": "FAILED"}

    class Job:
        def __init__(self, folder, job_id):
            self.job_id, self.state = job_id, states[job_id]

    backend = SlurmBackend(tmp_path, None, "tiny", executor_factory=object, job_class=Job)
    st = StepState(None, tmp_path, {})  # type: ignore[arg-type]
    for job_id, follows in (("123_0", True), ("124", True), ("125", False), ("126", False)):
        assert backend.adopt(st, {"launcher": "slurm", "job_id": job_id}) is follows, job_id
    assert not backend.adopt(st, {"launcher": "local", "job_id": "124"})
    assert not backend.adopt(st, {})


def test_a_second_launcher_of_the_suite_stops_at_once(tmp_path, synth_root, capsys):
    path = _suite(tmp_path, synth_root)
    root = tmp_path / "out" / "runs" / "tiny"
    with suite_lock(root, "local"):
        for launcher in ("local", "sequential"):
            args = ["run", str(path), "--out", str(tmp_path / "out"), "--launcher", launcher]
            assert cli.main(args) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "being run by another launcher" in err[0], err
            assert f"pid {os.getpid()} launcher local" in err[0]
    assert not (root / "pretrain-random-s0").exists()


def test_step_runs_exactly_one_planned_step(tmp_path, synth_root, capsys):
    path = _suite(tmp_path, synth_root, seeds=[0])
    out = tmp_path / "out"
    assert cli.main(["run", str(path), "--step", "pretrain-random-s0", "--out", str(out)]) == 0
    assert "run folder:" in capsys.readouterr().out
    found = sorted(p.name for p in (out / "runs" / "tiny").iterdir())
    assert found == [".bench.json", "pretrain-random-s0"]  # the suite's marker and one step
    assert cli.main(["run", str(path), "--step", "nope", "--out", str(out)]) == 2
    assert "not a step of this suite" in capsys.readouterr().err
    args = ["run", str(path), "--step", "pretrain-random-s0", "--launcher", "local"]
    assert cli.main(args) == 2
    assert cli.main(["run", str(path), "--max-parallel", "2"]) == 2
    assert "sequential launcher runs one step" in capsys.readouterr().err


def test_live_view_on_a_terminal_is_a_table(tmp_path, synth_root):
    pytest.importorskip("rich")

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    _, _, steps = load_suite(_suite(tmp_path, synth_root, seeds=[0]))
    states = {s.name: StepState(s, tmp_path / s.name, {}) for s in steps}
    states["pretrain-random-s0"].status, states["pretrain-random-s0"].started = "running", 0.0
    stream = Tty()
    view = View(states, stream)
    assert view.live is not None
    states["pretrain-random-s0"].status, states["pretrain-random-s0"].ended = "done", 75.0
    view.refresh()
    view.stop()
    text = stream.getvalue()
    assert "1 done · 0 running · 3 waiting · 0 failed · 0 blocked" in text
    assert "pretrain-random-s0" in text and "1m15s" in text


# ------------------------------------------------------------------ slow: real jobs


@pytest.mark.slow
def test_local_launcher_two_workers_gives_the_sequential_tables(sequential, tmp_path, synth_root):
    path = _suite(tmp_path, synth_root)
    out = tmp_path / "out"
    rc, stdout, stderr = _run(["run", str(path), "--launcher", "local", "--max-parallel", "2"],
                              out)  # fmt: skip
    assert rc == 0, stderr[-3000:]
    assert "8 steps" in stdout and "8 done" in stdout and "Table 2" in stdout
    assert _table(out) == _table(sequential)
    for name in _names():
        assert _metrics(out, name) == _metrics(sequential, name), name
    status = _status(out)
    events = sorted([(s["started"], 1) for s in status.values()]
                    + [(s["ended"], -1) for s in status.values()])  # fmt: skip
    at_once = [sum(d for _, d in events[: i + 1]) for i in range(len(events))]
    assert max(at_once) == 2, events  # two at a time, never more
    assert all(s["job_id"] and s["status"] == "done" for s in status.values())
    # a rerun submits nothing: every step is already complete
    rc, stdout, _ = _run(["run", str(path), "--launcher", "local"], out)
    assert rc == 0 and "(8 already complete)" in stdout
    assert all(s["skipped"] and not s["job_id"] for s in _status(out).values())


@pytest.mark.slow
def test_slurm_path_runs_its_jobs_through_a_local_executor(
    sequential, tmp_path, synth_root, monkeypatch
):
    """The SLURM launcher end to end, with its executor factory swapped: each group's
    SlurmExecutor is built from the resources (and its sbatch script kept), the jobs run
    through a LocalExecutor; steps that are ready together with the same resources go as one
    batch (a job array on a cluster); a report is written while steps still run."""
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    made: list[tuple[dict, str]] = []
    batches: list[int] = []
    out = tmp_path / "out"
    report = out / "reports" / "tiny" / "table2.csv"
    partial: list[str] = []
    deadline = time.time() + 300

    class Gated(submitit.local.local.LocalJob):
        """The context encoder's pretraining, seen as running until a report exists: by
        then the random classification has ended, so the report written is a partial one."""

        def done(self, force_check: bool = False) -> bool:
            if not partial and report.is_file():
                partial.append(report.read_text())
            if not partial and time.time() < deadline:
                return False
            return super().done(force_check)

    class Local(submitit.LocalExecutor):
        def _internal_process_submissions(self, delayed):
            batches.append(len(delayed))
            jobs = super()._internal_process_submissions(delayed)
            for job, submission in zip(jobs, delayed):
                if submission.function.step == "pretrain-context-encoder-s0":
                    job.__class__ = Gated
            return jobs

    def factory(folder, params):
        slurm = submitit.SlurmExecutor(folder=folder)
        slurm.update_parameters(**params)
        made.append((dict(slurm.parameters), slurm._make_submission_file_text("cmd", "u")))
        local = Local(folder=folder)
        local.update_parameters(timeout_min=params["time"], gpus_per_node=0)
        return local

    resources = {"pretrain": {"timeout_min": 30, "cpus_per_task": 2},
                 "transfer": {"timeout_min": 20, "partition": "short"}}  # fmt: skip
    path = _suite(tmp_path, synth_root, seeds=[0], resources=resources)
    view = io.StringIO()
    text, ok = launch(path, out=out, launcher="slurm", max_parallel=2, executor_factory=factory,
                      report_every=0, stream=view)  # fmt: skip
    assert ok, text
    assert batches[0] == 2  # both pretrainings in one array
    assert made[0][0] == {"job_name": "bench-tiny", "time": 30, "cpus_per_task": 2,
                          "array_parallelism": 2}  # fmt: skip
    assert "#SBATCH --cpus-per-task=2" in made[0][1] and "#SBATCH --time=30" in made[0][1]
    transfers = [p for p, _ in made if p.get("partition") == "short"]
    assert transfers and all(p["time"] == 20 for p in transfers)
    assert sum(batches) == 4
    for name in _names([0]):
        assert _metrics(out, name) == _metrics(sequential, name), name
    # the partial report, written while the context encoder still ran, has the random row only
    assert partial, "no report was written while a step still ran"
    assert "partial report written to" in view.getvalue()
    def ours(text: str) -> list[str]:
        rows = csv.DictReader(io.StringIO(text))
        return [r["Pretraining"].lower() for r in rows if r["Source"] != "paper"]

    early, final = ours(partial[0]), ours(report.read_text())
    assert early and not any("context" in name for name in early), early
    assert any("context" in name for name in final) and len(final) > len(early), final


@pytest.mark.slow
def test_sigkill_the_launcher_while_a_step_runs_then_rerun(sequential, tmp_path, synth_root):
    path = _suite(tmp_path, synth_root, seeds=[0])
    out = tmp_path / "out"
    root = out / "runs" / "tiny"
    proc = _bench(["run", str(path), "--launcher", "local", "--max-parallel", "2"], out)
    deadline = time.time() + 600
    running = []
    while not running and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        running = [n for n in _names([0]) if (root / n / "log.txt").is_file()
                   and not (root / n / "metrics.json").is_file()]  # fmt: skip
    assert running, "no step was seen running"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not all((root / n / "metrics.json").is_file() for n in _names([0]))
    # its jobs die with it (within a second): no run folder stays locked
    deadline = time.time() + 20
    while _locked(root) and time.time() < deadline:
        time.sleep(0.2)
    assert not _locked(root), "a job outlived its launcher"
    rc, stdout, stderr = _run(["run", str(path), "--launcher", "local", "--max-parallel", "2"],
                              out)  # fmt: skip
    assert rc == 0, stderr[-3000:]
    assert "4 done" in stdout
    for name in _names([0]):
        assert _metrics(out, name) == _metrics(sequential, name), name


@pytest.mark.slow
def test_a_failed_step_blocks_only_its_dependents_and_the_fix_reruns_only_them(
    tmp_path, synth_root
):
    out = tmp_path / "out"
    bad = _suite(tmp_path, synth_root, seeds=[0], ce_data=str(tmp_path / "missing"))
    rc, stdout, stderr = _run(["run", str(bad), "--launcher", "local", "--max-parallel", "2"],
                              out)  # fmt: skip
    assert rc == 1, stderr[-3000:]
    assert "2 done, 1 failed, 1 blocked" in stdout
    assert "failed: pretrain-context-encoder-s0" in stdout
    assert "missing: dataset folder not found" in stdout
    assert "  | " in stdout and "full log: " in stdout  # the log's tail and where it is
    assert (
        "blocked: classification-context-encoder-s0 (needs pretrain-context-encoder-s0, "
        "which failed)" in stdout
    )
    status = _status(out)
    assert status["classification-random-s0"]["status"] == "done"  # the others went on
    assert status["pretrain-context-encoder-s0"]["status"] == "failed"
    assert (out / "reports" / "tiny" / "table2.csv").is_file()  # a report of what finished
    mtime = (out / "runs" / "tiny" / "classification-random-s0" / "metrics.json").stat().st_mtime

    fixed = _suite(tmp_path, synth_root, seeds=[0])
    rc, stdout, stderr = _run(["run", str(fixed), "--launcher", "local", "--max-parallel", "2"],
                              out)  # fmt: skip
    assert rc == 0, stderr[-3000:]
    status = _status(out)
    ran = sorted(n for n, s in status.items() if s["job_id"])
    assert ran == ["classification-context-encoder-s0", "pretrain-context-encoder-s0"]
    assert all(s["status"] == "done" for s in status.values())
    assert (out / "runs" / "tiny" / "classification-random-s0" / "metrics.json").stat(
    ).st_mtime == mtime  # fmt: skip


@pytest.mark.slow
def test_a_step_given_two_gpus_runs_under_torchrun(tmp_path, synth_root, monkeypatch):
    """The job of a step with gpus_per_node 2 runs `torchrun --nproc_per_node 2 -m
    bench.cli run SUITE --step NAME` (here on CPU: two gloo processes, one writer)."""
    from bench.launch import StepJob
    from bench.suite import run_step

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = _suite(tmp_path, synth_root, seeds=[0])
    out = tmp_path / "out"
    run_step(path, "pretrain-random-s0", out)
    result = StepJob(suite=str(path), step="classification-random-s0", out=str(out), gpus=2)()
    assert result["step"] == "classification-random-s0"
    run = out / "runs" / "tiny" / "classification-random-s0"
    assert json.loads((run / "metrics.json").read_text())["iterations"] == 2
    assert (run / "log.txt").read_text().count(" it 2/2 ") == 1
