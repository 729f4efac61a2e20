"""`bench run SUITE --launcher local|slurm`: a suite's steps side by side, as submitit jobs.

Who does what (no scheduler of our own):

- **Order**: the standard library's `graphlib.TopologicalSorter` holds the suite as a graph
  (a transfer step needs its pretraining, an nn-ce evaluation its joint-loss run, the report
  every step). `get_ready()` hands out the steps whose needs are all done; each one is
  `done()` once it finished, failed, was blocked or was found finished on disk.
- **Running**: submitit. `--launcher local` uses `submitit.LocalExecutor`: one process per
  step, at most `--max-parallel` at a time, each GPU step given its own GPUs
  (`visible_gpus`, so its CUDA_VISIBLE_DEVICES names them). `--launcher slurm` uses
  `submitit.SlurmExecutor`: one sbatch job per step, with the step's `resources` from the
  suite YAML; steps that become ready together with the same resources go as one job array
  (`executor.batch()`). A step with `gpus_per_node > 1` runs `torchrun --standalone
  --nproc_per_node G -m bench.cli run SUITE --step NAME` inside its job.
- **Truth**: the run folders. A step whose folder holds its finished run is done, and no job
  is submitted for it; every job opens its folder with `resume` (as the sequential launcher
  does), so an interrupted step continues from its checkpoint; a folder that another process
  holds (its `.lock`) waits until it is free. A failed step is reported with its log's tail
  and its dependents are blocked; independent steps go on. Rerunning the suite runs only what
  is missing.

A launcher holds `<out>/runs/<suite>/.launcher.lock` (`bench.suite.suite_lock`), so a
second launcher of the same suite stops at once. It keeps its bookkeeping in
`<out>/runs/<suite>/.launcher/`: `jobs/` (submitit's pickles and each job's stdout/stderr)
and `status.json` (every step's state, job id, times and error, rewritten as they change).

Local jobs live as long as their launcher: a job whose launcher died (even by SIGKILL) kills
itself within a second, and the rerun resumes the step. SLURM jobs outlive their launcher (a
login node may drop it): a rerun finds the jobs recorded in status.json that are still pending
or running and follows them instead of submitting the steps again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any, TextIO

import submitit
from submitit.core.utils import DelayedSubmission

from bench.stages import run_name
from bench.suite import (
    Step,
    SuiteConfig,
    load_suite,
    prepare_root,
    step_resources,
    suite_lock,
    write_report,
)
from benchmark.config import to_dict
from benchmark.errors import BenchError, printable
from benchmark.runs import CONFIG_FILE, LOCK_FILE, METRICS_FILE, atomic_write_json

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LAUNCHERS = ("sequential", "local", "slurm")
REPORT = "(report)"  # the graph's last node: it needs every step
WAITING, RUNNING, DONE, FAILED, BLOCKED = "waiting", "running", "done", "failed", "blocked"
STATUSES = (DONE, RUNNING, WAITING, FAILED, BLOCKED)
LOCAL_TIMEOUT_MIN = 30 * 24 * 60  # LocalExecutor's own default (2 minutes) would kill steps
TAIL_LINES = 8
# sacct states of a SLURM job that will still run (a rerun follows such a job)
SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING",
                "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}  # fmt: skip


def _log(msg: str) -> None:
    print(f"[bench run] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the job


@dataclass
class StepJob(submitit.helpers.Checkpointable):
    """What a launcher submits: run one planned step (`bench run SUITE --step NAME`).

    `suite` is the resolved `<root>/suite.yaml` the launcher wrote, so every job plans the
    suite the launcher planned. On a SLURM timeout or preemption submitit calls `checkpoint`
    and requeues the job, which then resumes the step's run folder (never `force` again).
    """

    suite: str
    step: str
    out: str
    force: bool = False
    gpus: int = 0  # > 1 (and a stage that runs under torchrun): torchrun over the GPUs
    distributed: bool = True
    cuda_devices: str | None = None  # set here when the pool's names are not indices
    watch_pid: int | None = None  # the local launcher: the job dies with it
    watch_start: str | None = None

    def __call__(self) -> dict[str, Any]:
        if self.cuda_devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.cuda_devices
        if self.watch_pid is not None:
            threading.Thread(target=_watch_launcher, args=(self.watch_pid, self.watch_start),
                             daemon=True).start()  # fmt: skip
        start = time.time()
        if self.gpus > 1 and self.distributed:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={self.gpus}", "-m", "bench.cli", "run", self.suite,
                   "--step", self.step, "--out", self.out]  # fmt: skip
            cmd += ["--force"] if self.force else []
            print("[bench run] " + shlex.join(cmd), file=sys.stderr, flush=True)
            global _CHILD
            _CHILD = subprocess.Popen(cmd, start_new_session=True)
            rc = _CHILD.wait()
            _CHILD = None
            if rc != 0:
                raise BenchError(f"step {self.step}: torchrun exited with code {rc}")
            path = None  # rank 0 wrote the run folder; the launcher reads it
        else:
            from bench.suite import run_step

            path, _ = run_step(Path(self.suite), self.step, Path(self.out), force=self.force)
        return {"step": self.step, "run": path and str(path), "seconds": time.time() - start}

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        _kill_child()
        return DelayedSubmission(replace(self, force=False), *args, **kwargs)


_CHILD: subprocess.Popen | None = None


def _kill_child() -> None:
    if _CHILD is not None and _CHILD.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(_CHILD.pid, signal.SIGKILL)


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from /proc, None where it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return fields[0], fields[19]


def _launcher_identity() -> tuple[int, str | None]:
    stat = _proc_stat(os.getpid())
    return os.getpid(), stat[1] if stat else None


def _alive(pid: int, start: str | None) -> bool:
    if not Path("/proc/self/stat").exists():  # no /proc: the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and (start is None or stat[1] == start)


def _watch_launcher(pid: int, start: str | None) -> None:
    """A local job's guard: when its launcher is gone, stop at once, as kill -9 would (the
    run folder is safe to resume from any moment)."""
    while True:
        time.sleep(0.5)
        if not _alive(pid, start):
            _kill_child()
            os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------ state of one step


@dataclass
class StepState:
    step: Step
    path: Path
    resources: dict[str, Any]
    status: str = WAITING
    note: str = ""
    skipped: bool = False  # done before this launcher started
    gpus: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # the executor's, for this step
    devices: tuple[str, ...] = ()
    job: Any = None
    job_id: str = ""
    started: float | None = None
    ended: float | None = None
    error: str = ""
    tail: list[str] = field(default_factory=list)
    log: str = ""

    @property
    def name(self) -> str:
        return self.step.name

    def seconds(self, now: float | None = None) -> float | None:
        if self.started is None:
            return None
        return (self.ended or now or time.time()) - self.started


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# ------------------------------------------------------------------ executors


def visible_gpus() -> list[str]:
    """The GPUs this launcher may hand out: CUDA_VISIBLE_DEVICES's entries, else every CUDA
    device torch sees (none on a CPU machine)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [t.strip() for t in env.split(",") if t.strip() and t.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


class LocalBackend:
    """submitit.LocalExecutor: N processes at a time on this machine, GPUs shared out."""

    name = "local"
    poll_s = 0.25
    result_wait_s = 1.0

    def __init__(self, folder: Path, max_parallel: int | None, gpus: list[str] | None = None):
        self.pool = visible_gpus() if gpus is None else list(gpus)
        self.free = list(self.pool)
        cpus = max(1, (os.cpu_count() or 1) // 4)
        self.slots = max_parallel or (len(self.pool) or cpus)
        self.used = 0
        self.folder = folder
        self.executor: Any = None  # made at the first submission
        self.watch = _launcher_identity()

    def configure(self, st: StepState) -> None:
        r = st.resources
        gpus = r.get("gpus_per_node")
        if gpus is None:
            gpus = 1 if self.pool and getattr(st.step.cfg, "device", "auto") != "cpu" else 0
        if not isinstance(gpus, int) or gpus < 0:
            raise BenchError(f"resources of step {st.name}: gpus_per_node must be an integer >= 0")
        if gpus > len(self.pool):
            raise BenchError(
                f"step {st.name} asks for {gpus} GPUs (resources gpus_per_node), but this "
                f"machine shows {len(self.pool)} (CUDA_VISIBLE_DEVICES)"
            )
        st.gpus = gpus
        st.params = {"timeout_min": r.get("timeout_min", LOCAL_TIMEOUT_MIN), "gpus_per_node": gpus}

    def describe(self) -> str:
        gpus = f"GPUs {','.join(self.pool)}" if self.pool else "no GPU"
        return f"{self.slots} at a time, {gpus}"

    def reserve(self, st: StepState) -> bool:
        if self.used >= self.slots or len(self.free) < st.gpus:
            return False
        self.used += 1
        st.devices, self.free = tuple(self.free[: st.gpus]), self.free[st.gpus :]
        return True

    def release(self, st: StepState) -> None:
        self.used -= 1
        self.free = [g for g in self.pool if g in set(self.free) | set(st.devices)]
        st.devices = ()

    def submit(self, group: list[StepState], make_job: Any) -> None:
        if self.executor is None:
            self.executor = submitit.LocalExecutor(folder=self.folder)
        for st in group:
            try:
                indices = [int(d) for d in st.devices]
            except ValueError:  # GPU UUIDs or MIG names: the job sets them itself
                indices = None
            params = dict(st.params)
            if indices is not None:
                params["visible_gpus"] = indices
            else:
                params["gpus_per_node"] = 0
            self.executor.update_parameters(**params)
            pid, start = self.watch
            job = make_job(st, cuda_devices=None if indices is not None else ",".join(st.devices),
                           watch_pid=pid, watch_start=start)  # fmt: skip
            st.job = self.executor.submit(job)

    def adopt(self, st: StepState, record: dict[str, Any]) -> bool:
        return False  # local jobs die with their launcher: nothing to follow

    def interrupt(self, running: list[StepState]) -> str:
        for st in running:
            with contextlib.suppress(Exception):
                st.job.cancel(check=False)
        return f"stopped {len(running)} running local jobs" if running else ""


def slurm_parameters(resources: dict[str, Any], step: str) -> dict[str, Any]:
    """A step's `resources` as SlurmExecutor parameters: its own names (partition, time,
    gpus_per_node, cpus_per_task, mem, constraint, account, qos, setup, ...) or the generic
    ones (timeout_min, mem_gb, tasks_per_node, name); an unknown key, a missing time limit, or
    more than one node or task is a one-line error."""
    ex = submitit.SlurmExecutor
    equivalents = ex._equivalence_dict() or {}
    valid = ex._valid_parameters()
    out: dict[str, Any] = {}
    for key, value in resources.items():
        native = equivalents.get(key, key)
        if native not in valid:
            raise BenchError(
                f"resources of step {step}: '{key}' is not a SlurmExecutor parameter "
                f"(e.g. partition, timeout_min, gpus_per_node, cpus_per_task, mem_gb, "
                f"constraint, account, qos, setup, additional_parameters)"
            )
        out[native] = f"{value}GB" if key == "mem_gb" else value
    if "time" not in out:
        raise BenchError(
            f"resources of step {step}: no timeout_min (submitit's default is 5 minutes); set "
            "it, e.g. resources: {default: {timeout_min: 1440}}"
        )
    if int(out.get("nodes", 1)) != 1 or int(out.get("ntasks_per_node") or 1) != 1:
        raise BenchError(
            f"resources of step {step}: one node and one task per step (a step uses torchrun "
            "over its gpus_per_node GPUs)"
        )
    return out


def slurm_executor(folder: Path, params: dict[str, Any]) -> submitit.Executor:
    """The SlurmExecutor of one group of steps (what `--launcher slurm` submits with)."""
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
    executor.update_parameters(**params)
    return executor


class SlurmBackend:
    """submitit.SlurmExecutor: one job per step, arrays of steps ready together."""

    name = "slurm"
    poll_s = 5.0
    result_wait_s = 15.0  # a shared file system may show the result late

    def __init__(
        self,
        folder: Path,
        max_parallel: int | None,
        suite_name: str,
        executor_factory: Any = None,
        job_class: Any = None,
    ):
        self.folder = folder
        self.max_parallel = max_parallel or 0  # 0: as many as the cluster takes
        self.suite_name = suite_name
        if executor_factory is None and shutil.which("sbatch") is None:
            raise BenchError(
                "--launcher slurm: no sbatch on this machine's PATH; run the launcher on a "
                "SLURM login node (or use --launcher local)"
            )
        self.factory = executor_factory or slurm_executor
        self.job_class = job_class or submitit.SlurmJob
        self.used = 0

    def configure(self, st: StepState) -> None:
        st.params = slurm_parameters(st.resources, st.name)
        st.gpus = int(st.params.get("gpus_per_node") or 0)

    def describe(self) -> str:
        return f"{self.max_parallel or 'unlimited'} jobs at a time"

    def reserve(self, st: StepState) -> bool:
        if self.max_parallel and self.used >= self.max_parallel:
            return False
        self.used += 1
        return True

    def release(self, st: StepState) -> None:
        self.used -= 1

    def submit(self, group: list[StepState], make_job: Any) -> None:
        """Steps with the same parameters go as one array job (one sbatch)."""
        by_params: dict[str, list[StepState]] = {}
        for st in group:
            by_params.setdefault(json.dumps(st.params, sort_keys=True, default=str), []).append(st)
        for members in by_params.values():
            params = {"job_name": f"bench-{self.suite_name}", **members[0].params}
            if len(members) > 1 and self.max_parallel:
                params["array_parallelism"] = self.max_parallel
            executor = self.factory(self.folder, params)
            jobs = [make_job(st) for st in members]
            if len(members) == 1:
                members[0].job = executor.submit(jobs[0])
                continue
            with executor.batch():
                submitted = [executor.submit(j) for j in jobs]
            for st, job in zip(members, submitted):
                st.job = job

    def adopt(self, st: StepState, record: dict[str, Any]) -> bool:
        """Follow the job an earlier launcher submitted for this step, if it will still run."""
        job_id = record.get("job_id")
        if not job_id or record.get("launcher") != self.name:
            return False
        try:
            job = self.job_class(folder=self.folder, job_id=str(job_id))
            state = str(job.state).split()[0].upper()
        except Exception:  # noqa: BLE001 - no sacct, unknown job: submit anew
            return False
        if state not in SLURM_ACTIVE:
            return False
        st.job, st.note = job, f"following job {job_id} ({state.lower()})"
        return True

    def interrupt(self, running: list[StepState]) -> str:
        if not running:
            return ""
        ids = " ".join(st.job_id for st in running)
        return (
            f"{len(running)} SLURM jobs keep running ({ids}): rerun the same command to follow "
            f"them, or scancel {ids}"
        )


# ------------------------------------------------------------------ the live view


class View:
    """A table that refreshes (rich Live, on a terminal) or one log line per change."""

    def __init__(self, states: dict[str, StepState], stream: TextIO | None = None):
        self.states = states
        self.stream = stream or sys.stderr
        self.live: Any = None
        if self.stream.isatty() and os.environ.get("TERM") != "dumb":
            try:
                from rich.console import Console
                from rich.live import Live
            except ImportError:
                pass
            else:
                console = Console(file=self.stream)
                self.live = Live(self._table(), console=console, refresh_per_second=2,
                                 transient=False, vertical_overflow="visible")  # fmt: skip
                self.live.start()

    def event(self, st: StepState, text: str) -> None:
        line = f"[bench run] {time.strftime('%H:%M:%S')} {st.name}: {text}"
        if self.live is not None:
            if st.status in (FAILED, BLOCKED):
                self.live.console.print(line, markup=False, highlight=False)
            return
        print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(f"[bench run] {text}", markup=False, highlight=False)
        else:
            print(f"[bench run] {text}", file=self.stream, flush=True)

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._table())

    def stop(self) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()
            self.live = None

    def _table(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        colour = {DONE: "green", RUNNING: "cyan", WAITING: "white", FAILED: "red",
                  BLOCKED: "yellow"}  # fmt: skip
        table = Table(box=None, pad_edge=False)
        for col in ("step", "status", "time", ""):
            table.add_column(col, no_wrap=True)
        now = time.time()
        for st in self.states.values():
            c = colour[st.status]
            table.add_row(st.name, f"[{c}]{st.status}[/{c}]", _duration(st.seconds(now)),
                          (st.error or st.note)[:80])  # fmt: skip
        return Group(Text(counts(self.states), style="bold"), table)


def counts(states: dict[str, StepState]) -> str:
    n = {s: 0 for s in STATUSES}
    for st in states.values():
        n[st.status] += 1
    return " · ".join(f"{n[s]} {s}" for s in STATUSES)


# ------------------------------------------------------------------ the launcher


class Launcher:
    """Walk the suite's graph (TopologicalSorter) and run its steps through a backend."""

    def __init__(
        self,
        suite: SuiteConfig,
        results: Path,
        steps: list[Step],
        backend: Any,
        *,
        force: bool = False,
        report_every: float = 60.0,
        stream: TextIO | None = None,
    ):
        self.suite, self.results, self.backend, self.force = suite, results, backend, force
        self.root = results / "runs" / suite.name
        self.folder = self.root / ".launcher"
        self.report_every = report_every
        self.stream = stream
        self.states = {
            s.name: StepState(s, self.root / run_name(s.stage, s.cfg), step_resources(suite, s))
            for s in steps
        }
        for st in self.states.values():
            backend.configure(st)  # every step's resources checked before the first runs
        self.records = self._read_records()
        self.report_text: str | None = None
        self.report_note = ""
        self._last_report = 0.0
        self._new_results = False
        self._pending_done: list[str] = []
        self.started = time.time()

    # ---- bookkeeping

    def _read_records(self) -> dict[str, Any]:
        path = self.folder / "status.json"
        try:
            steps = json.loads(path.read_bytes()).get("steps", {})
        except (OSError, ValueError, AttributeError, RecursionError):
            return {}  # only a record of job ids to follow: a damaged one is dropped
        if not isinstance(steps, dict):
            return {}
        return {k: v for k, v in steps.items() if isinstance(v, dict)}

    def _write_status(self) -> None:
        steps = {}
        for st in self.states.values():
            job_id, launcher = st.job_id, self.backend.name
            old = self.records.get(st.name) or {}
            if st.status == WAITING and not job_id and old.get("job_id"):
                job_id, launcher = old["job_id"], old.get("launcher", "")  # still to follow
            steps[st.name] = {
                "status": st.status, "note": st.note, "launcher": launcher,
                "job_id": job_id, "gpus": list(st.devices) or st.gpus,
                "started": st.started, "ended": st.ended,
                "seconds": st.seconds(), "error": st.error,
                "log": st.log, "skipped": st.skipped,
            }  # fmt: skip
        atomic_write_json(self.folder / "status.json", {
            "suite": self.suite.name, "launcher": self.backend.name, "pid": os.getpid(),
            "started": self.started, "updated": time.time(), "steps": steps,
        })  # fmt: skip

    def _make_job(self, st: StepState, **extra: Any) -> StepJob:
        return StepJob(suite=str(self.root / "suite.yaml"), step=st.name, out=str(self.results),
                       force=self.force, gpus=st.gpus, distributed=st.step.stage.distributed,
                       **extra)  # fmt: skip

    # ---- the loop

    def run(self) -> bool:
        self.view = View(self.states, self.stream)
        graph: dict[str, set[str]] = {n: set(st.step.needs) for n, st in self.states.items()}
        if self.suite.report:
            graph[REPORT] = set(self.states)
        sorter = TopologicalSorter(graph)
        sorter.prepare()
        queue: list[str] = []
        self.view.message(
            f"suite {self.suite.name}: {len(self.states)} steps, every config checked; "
            f"{self.backend.name} launcher, {self.backend.describe()}"
        )
        try:
            while sorter.is_active():
                changed = False
                for name in sorter.get_ready():
                    changed = True
                    if name == REPORT:
                        self._report(final=True)
                        sorter.done(name)
                    else:
                        self._ready(self.states[name], sorter, queue)
                changed |= self._start(queue)
                changed |= self._poll(sorter)
                if (self._new_results and time.time() - self._last_report >= self.report_every
                        and any(st.status in (RUNNING, WAITING) for st in self.states.values())):
                    self._report(final=False)  # the final one follows the last step anyway
                if changed:
                    self._write_status()
                self.view.refresh()
                if not changed:
                    time.sleep(self.backend.poll_s)
        except BaseException:
            running = [st for st in self.states.values() if st.status == RUNNING]
            note = self.backend.interrupt(running)
            self.view.stop()
            with contextlib.suppress(Exception):
                self._write_status()
            if note:
                _log(note)
            raise
        self._write_status()
        self.view.stop()
        return not any(st.status == FAILED for st in self.states.values())

    def _ready(self, st: StepState, sorter: TopologicalSorter, queue: list[str]) -> None:
        bad = [n for n in st.step.needs if self.states[n].status in (FAILED, BLOCKED)]
        if bad:
            st.status = BLOCKED
            which = "failed" if self.states[bad[0]].status == FAILED else "is blocked"
            st.note = f"needs {bad[0]}, which {which}"
            self.view.event(st, f"blocked ({st.note})")
            sorter.done(st.name)
            return
        if not self.force:
            try:
                finished = self._finished(st)
            except BenchError as exc:
                self._fail(st, str(exc), sorter)
                return
            if finished:
                st.status, st.skipped, st.note = DONE, True, "already complete"
                self.view.event(st, "already complete, skipped")
                sorter.done(st.name)
                return
            if self.backend.adopt(st, self.records.get(st.name, {})):
                self.backend.used += 1  # it runs: it takes a slot, even past --max-parallel
                st.status, st.started = RUNNING, time.time()
                st.job_id = str(st.job.job_id)
                self.view.event(st, st.note)
                return
        st.note = "queued"
        queue.append(st.name)

    def _finished(self, st: StepState) -> bool:
        """Whether the step's run folder holds its finished run (made with this config)."""
        if not (st.path / METRICS_FILE).is_file():
            return False
        from benchmark.config import read_yaml
        from benchmark.runs import first_difference

        try:
            old = read_yaml(st.path / CONFIG_FILE, "run config", BenchError) or {}
        except BenchError:
            return True  # judged by its metrics, as `open_run` does
        key = first_difference(old, to_dict(st.step.cfg))
        if key is not None:
            raise BenchError(
                f"{printable(st.path / CONFIG_FILE)}: the finished run was made with another "
                f"config (differs at '{key}'); use --force to redo it or another --name"
            )
        return True

    def _start(self, queue: list[str]) -> bool:
        group = []
        for name in list(queue):
            st = self.states[name]
            if _in_use(st.path):
                if st.note != "run folder in use by another process":
                    st.note = "run folder in use by another process"
                    self.view.event(st, "waiting: its run folder is in use by another process")
                continue
            if not self.backend.reserve(st):
                continue
            queue.remove(name)
            group.append(st)
        if not group:
            return False
        try:
            self.backend.submit(group, self._make_job)
        except Exception as exc:  # noqa: BLE001 - a refused submission fails these steps only
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            for st in group:
                self.backend.release(st)
                st.status, st.ended, st.error = FAILED, time.time(), f"not submitted: {reason}"
                st.started = st.ended
                self.view.event(st, f"failed: {st.error}")
                self._pending_done.append(st.name)
            return True
        now = time.time()
        for st in group:
            st.status, st.started = RUNNING, now
            st.job_id = str(st.job.job_id)
            where = f" on GPU {','.join(st.devices)}" if st.devices else ""
            st.note = f"job {st.job_id}{where}"
            self.view.event(st, f"running (job {st.job_id}{where})")
        return True

    def _poll(self, sorter: TopologicalSorter) -> bool:
        changed = bool(self._pending_done)
        for name in self._pending_done:  # steps whose submission was refused
            sorter.done(name)
        self._pending_done = []
        for st in self.states.values():
            if st.status != RUNNING:
                continue
            try:
                finished = st.job.done()
            except Exception:  # noqa: BLE001 - a state query that failed: ask again later
                continue
            if not finished:
                continue
            ok, error = _outcome(st.job, self.backend.result_wait_s)
            st.ended = time.time()
            self.backend.release(st)
            if ok and (st.path / METRICS_FILE).is_file():
                st.status, st.note = DONE, ""
                self._new_results |= st.step.kind != "pretrain"
                self.view.event(st, f"done in {_duration(st.seconds())}")
                sorter.done(st.name)
            else:
                self._fail(st, error or "the job ended but its run folder has no metrics.json",
                           sorter)  # fmt: skip
            changed = True
        return changed

    def _fail(self, st: StepState, error: str, sorter: TopologicalSorter) -> None:
        st.status, st.error = FAILED, " ".join(error.split())[:500]
        if st.started is None:
            st.started = st.ended = time.time()
        st.tail, st.log = _tail(st)
        self.view.event(st, f"failed after {_duration(st.seconds())}: {st.error}")
        sorter.done(st.name)

    def _report(self, final: bool) -> None:
        self._new_results = False
        self._last_report = time.time()
        try:
            report_dir, text = write_report(self.suite, self.results)
        except BenchError as exc:
            if final:
                self.report_note = f"no report: {exc}"
            return
        except Exception as exc:  # noqa: BLE001 - a partial report must not stop the suite
            if final:
                raise
            self.view.message(f"partial report failed ({type(exc).__name__}: {exc})")
            return
        self.report_text = f"{text}\nreport files in {report_dir}"
        if not final:
            self.view.message(f"partial report written to {report_dir}")

    # ---- the end

    def summary(self) -> str:
        states = list(self.states.values())
        n = {s: sum(st.status == s for st in states) for s in STATUSES}
        skipped = sum(st.skipped for st in states)
        head = (
            f"suite {self.suite.name} ({self.backend.name} launcher): {len(states)} steps in "
            f"{_duration(time.time() - self.started)}: {n[DONE]} done"
            + (f" ({skipped} already complete)" if skipped else "")
            + "".join(f", {n[s]} {s}" for s in (FAILED, BLOCKED) if n[s])
        )
        width = max((len(st.name) for st in states), default=4)
        lines = [head, f"  {'step':<{width}}  {'status':<7}  {'time':>6}  job"]
        for st in states:
            job = st.job_id or ("-" if not st.skipped else "(already complete)")
            lines.append(
                f"  {st.name:<{width}}  {st.status:<7}  {_duration(st.seconds()):>6}  {job}"
            )
        for st in states:
            if st.status == FAILED:
                lines.append(f"failed: {st.name} after {_duration(st.seconds())}: {st.error}")
                lines += [f"  | {line}" for line in st.tail]
                if st.log:
                    lines.append(f"  full log: {st.log}")
        for st in states:
            if st.status == BLOCKED:
                lines.append(f"blocked: {st.name} ({st.note})")
        if n[FAILED] or n[BLOCKED]:
            lines.append("fix the failed steps and rerun the same command: only what is "
                         "missing runs")  # fmt: skip
        return "\n".join(lines)


def _in_use(path: Path) -> bool:
    """Whether another process holds the run folder's lock (it is running that step)."""
    lock = path / LOCK_FILE
    if fcntl is None or not lock.is_file():
        return False
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
    return False


def _outcome(job: Any, wait_s: float) -> tuple[bool, str]:
    """(succeeded, the error's last line) of a finished job, from its result pickle."""
    from submitit.core.utils import pickle_load

    path = job.paths.result_pickle
    deadline = time.time() + wait_s
    while not path.exists() and time.time() < deadline:
        time.sleep(0.25)
    if not path.exists():
        state = getattr(job, "state", "unknown")
        return False, f"the job ended without a result (state {state}; killed, out of memory?)"
    try:
        outcome, payload = pickle_load(path)
    except Exception as exc:  # noqa: BLE001
        return False, f"unreadable job result ({type(exc).__name__})"
    if outcome == "success":
        return True, ""
    lines = [line for line in str(payload).strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "unknown error"
    # bench's own errors are one-line messages: show them as `bench` prints them
    return False, re.sub(r"^benchmark\.errors\.\w+: ", "", last)


def _tail(st: StepState) -> tuple[list[str], str]:
    """The last lines of the step's log and where its full log is: the run folder's log.txt,
    else what the job printed before its traceback, else the traceback's last lines."""
    stderr = None
    if st.job is not None:
        with contextlib.suppress(Exception):
            stderr = Path(st.job.paths.stderr)
    full = str(stderr or st.path / "log.txt")

    def lines(path: Path | None) -> list[str]:
        try:
            text = path.read_text(errors="replace") if path else ""
        except OSError:
            return []
        return [printable(line.rstrip())[:200] for line in text.splitlines() if line.strip()]

    log = lines(st.path / "log.txt")
    if log:
        return log[-TAIL_LINES:], full
    err = lines(stderr)
    cut = max((i for i, line in enumerate(err) if line.startswith("Traceback (")), default=None)
    before = [line for line in err[:cut] if not line.startswith("submitit ")]
    if before:
        return before[-TAIL_LINES:], full
    return (err[cut:] if cut is not None else err)[-4:], full


def launch(
    suite_path: Path,
    out: Path | None = None,
    force: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
    launcher: str = "local",
    max_parallel: int | None = None,
    *,
    gpus: list[str] | None = None,
    executor_factory: Any = None,
    report_every: float = 60.0,
    stream: TextIO | None = None,
) -> tuple[str, bool]:
    """Run a suite through the local or SLURM launcher: (text to print, no step failed).

    `gpus` replaces the local launcher's GPU pool (default: CUDA_VISIBLE_DEVICES, else every
    device); `executor_factory(folder, params)` replaces `slurm_executor` (tests run the SLURM
    path's jobs through a LocalExecutor)."""
    if launcher not in ("local", "slurm"):
        raise BenchError(f"--launcher {launcher}: choose local or slurm (or sequential)")
    if max_parallel is not None and max_parallel < 1:
        raise BenchError(f"--max-parallel: must be >= 1, got {max_parallel}")
    suite, results, steps = load_suite(suite_path, out, overrides)
    root = results / "runs" / suite.name
    jobs = root / ".launcher" / "jobs"  # submitit's files, named by job id
    if launcher == "local":
        backend: Any = LocalBackend(jobs, max_parallel, gpus)
    else:
        backend = SlurmBackend(jobs, max_parallel, suite.name, executor_factory)
    # every step's resources are checked here, before a folder is made
    engine = Launcher(suite, results, steps, backend, force=force, report_every=report_every,
                      stream=stream)  # fmt: skip
    with suite_lock(root, launcher):
        prepare_root(suite, results)
        ok = engine.run()
    parts = []
    if engine.report_text:
        parts.append(engine.report_text)
    elif engine.report_note:
        parts.append(engine.report_note)
    parts += [f"runs in {root}", engine.summary()]
    return "\n".join(parts), ok
