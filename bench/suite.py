"""`bench run SUITE.yaml`: pretraining methods x transfer tasks (+ inpainting), then the report.

A suite is planned in full before anything runs: every step's config is built, type-checked
and checked by its stage (`Stage.check`), so a typo in the last step fails in a second, not
after hours. Every step is an ordinary run folder under `<out>/runs/<suite>/`, opened with
`resume`, so a finished step is skipped and an interrupted one continues from its last
checkpoint; running the same suite twice redoes nothing. A step whose config changed since it
ran is an error (use --force to redo everything).

`bench run --launcher sequential` (the default) runs the steps here, one after another;
`--launcher local|slurm` hands them to `bench.launch` (a dependency graph, submitit jobs).
Either way the suite folder is locked (`<out>/runs/<suite>/.launcher.lock`), so two launchers
of one suite never run side by side, and `bench run SUITE --step NAME` runs one planned step
(what a launcher's job calls). The suite folder carries bench's marker as a suite's folder
(`runs.mark_folder`): no run ever clears it, and a suite never moves into a folder bench did
not make for it (a suite folder of an older bench, with its `suite.yaml`, is taken over).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stages import INPAINT_EVAL, Stage, pretrain_stage, run_stage, transfer_stage
from benchmark.config import dump_yaml, load_config, merge, to_dict
from benchmark.errors import BenchError, ConfigError, printable
from benchmark.runs import (
    METRICS_FILE,
    atomic_write_text,
    check_run_name,
    default_results_root,
    folder_kind,
    is_empty_folder,
    mark_folder,
    not_made_by_bench,
    open_no_follow,
    refuse_links,
)

try:  # POSIX advisory locks, as for run folders
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LAUNCHER_LOCK = ".launcher.lock"
# resources keys that are not a method, task or step name: every step, then one kind of step
RESOURCE_KINDS = ("default", "pretrain", "transfer", "inpaint-eval")


@dataclass
class InpaintingSuite:
    """Section 5.1: train the 128-px inpainting net with each loss, then Table 1."""

    losses: list[str] = field(default_factory=lambda: ["l2", "adversarial", "joint"])
    train: dict[str, Any] = field(default_factory=dict)  # InpaintingConfig overrides
    evaluate: dict[str, Any] = field(default_factory=dict)  # InpaintEvalConfig overrides
    baselines: list[str] = field(default_factory=lambda: ["nn-hog", "nn-ce"])


@dataclass
class SuiteConfig:
    name: str = "suite"
    out: str | None = None
    device: str = "auto"
    seeds: list[int] = field(default_factory=lambda: [0])
    # method name -> overrides of its pretraining config (e.g. {train: {iterations: 300}})
    pretrain: dict[str, Any] = field(default_factory=dict)
    # name -> a weights file or folder made elsewhere (`bench import caffe` of released
    # weights, `bench import --format F` of a ResNet / ViT checkpoint, or such a checkpoint
    # as it is): transferred like a pretraining method's encoder, with no pretraining step.
    # A value is the path, or {path: P, format: F} to name a checkpoint's layout
    # (`weights_format` of the tasks that read checkpoints: svm, knn, classification)
    weights: dict[str, Any] = field(default_factory=dict)
    # task name -> overrides of its transfer config, applied for every pretraining method
    transfer: dict[str, Any] = field(default_factory=dict)
    inpainting: InpaintingSuite | None = None
    report: bool = True
    # what each step's job asks for under `bench run --launcher local|slurm` (ignored by the
    # sequential launcher): key -> submitit parameters, merged from the general to the
    # particular: default < pretrain|transfer|inpaint-eval < a method or task name < a step
    # name. E.g. {pretrain: {gpus_per_node: 1, cpus_per_task: 8, timeout_min: 1440,
    # partition: gpu}, transfer: {gpus_per_node: 1, timeout_min: 240}}
    resources: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    """One run folder of the suite: its stage, resolved config and the steps it needs."""

    name: str
    stage: Stage
    cfg: Any
    needs: tuple[str, ...] = ()
    kind: str = ""  # pretrain, transfer or inpaint-eval (a `resources` key)
    key: str = ""  # its method or task (a `resources` key)


def _log(msg: str) -> None:
    print(f"[bench run] {msg}", file=sys.stderr, flush=True)


def _make(
    stage: Stage,
    overrides: dict[str, Any],
    name: str,
    needs: tuple[str, ...],
    kind: str = "",
    key: str = "",
) -> Step:
    """Build, type-check and stage-check one step's config (a ConfigError names the step)."""
    try:
        cfg = load_config(stage.config_cls, base=overrides)
        stage.check(cfg)
    except ConfigError as exc:
        raise ConfigError(f"suite step {name}: {exc}") from None
    return Step(check_run_name(name), stage, cfg, needs, kind, key)


def plan(suite: SuiteConfig, root: Path) -> list[Step]:
    """Every step of the suite in an order that respects `needs`."""
    common = {"device": suite.device}
    steps: list[Step] = []
    for seed in suite.seeds:
        for method, pre_over in suite.pretrain.items():
            pre_name = f"pretrain-{method}-s{seed}"
            base = merge(to_dict(pre_over or {}), {**common, "method": method, "seed": seed,
                                                   "name": pre_name})  # fmt: skip
            steps.append(_make(pretrain_stage(method), base, pre_name, (), "pretrain", method))
            for task, t_over in suite.transfer.items():
                name = f"{task}-{method}-s{seed}"
                base = merge(to_dict(t_over or {}), {**common, "seed": seed, "name": name,
                                                     "weights": str(root / pre_name)})  # fmt: skip
                steps.append(_make(transfer_stage(task), base, name, (pre_name,), "transfer", task))
        for label, entry in suite.weights.items():
            given = _weights_entry(label, entry)
            for task, t_over in suite.transfer.items():
                name = f"{task}-{label}-s{seed}"
                base = merge(to_dict(t_over or {}), {**common, "seed": seed, "name": name,
                                                     **given})  # fmt: skip
                steps.append(_make(transfer_stage(task), base, name, (), "transfer", task))
        if suite.inpainting is not None:
            steps += _inpainting_steps(suite.inpainting, common, seed, root)
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ConfigError("suite: two steps have the same run name")
    _check_resources(suite.resources, steps)
    return steps


def _weights_entry(label: str, entry: Any) -> dict[str, str]:
    """A `weights` value as transfer config keys: a path, or {path, format}."""
    if isinstance(entry, (str, Path)):
        return {"weights": str(entry)}
    if isinstance(entry, dict) and set(entry) <= {"path", "format"} and "path" in entry:
        out = {"weights": str(entry["path"])}
        if entry.get("format"):
            out["weights_format"] = str(entry["format"])
        return out
    raise ConfigError(f"weights.{label}: a path, or a mapping {{path: P, format: F}}")


def _check_resources(resources: dict[str, Any], steps: list[Step]) -> None:
    """Every `resources` key names something the suite has, and holds a mapping."""
    known = set(RESOURCE_KINDS) | {s.key for s in steps} | {s.name for s in steps}
    for key, value in resources.items():
        if key not in known:
            raise ConfigError(
                f"resources.{key}: not a step kind ({', '.join(RESOURCE_KINDS)}), method, "
                "task or step name of this suite"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"resources.{key}: must be a mapping of job parameters")


def step_resources(suite: SuiteConfig, step: Step) -> dict[str, Any]:
    """The job parameters of one step: `resources` merged from `default` to its name."""
    out: dict[str, Any] = {}
    for key in ("default", step.kind, step.key, step.name):
        if key and key in suite.resources:
            out.update(to_dict(suite.resources[key]) or {})
    return out


def _inpainting_steps(
    cfg: InpaintingSuite, common: dict[str, Any], seed: int, root: Path
) -> list[Step]:
    steps = []
    for loss in cfg.losses:
        name = f"inpainting-{loss}-s{seed}"
        base = merge(to_dict(cfg.train), {**common, "method": "inpainting", "seed": seed,
                                          "loss": {"kind": loss}, "name": name})  # fmt: skip
        steps.append(_make(pretrain_stage("inpainting"), base, name, (), "pretrain", "inpainting"))
        ename = f"inpaint-eval-{loss}-s{seed}"
        base = merge(to_dict(cfg.evaluate), {**common, "seed": seed, "weights": str(root / name),
                                             "name": ename})  # fmt: skip
        steps.append(_make(INPAINT_EVAL, base, ename, (name,), "inpaint-eval", "inpaint-eval"))
    # The NN baselines fill the hole the trained rows use (nn-ce reads it from its card).
    train = to_dict(cfg.train)
    geometry = {"hole": train.get("hole"), "overlap": (train.get("loss") or {}).get("overlap")}
    geometry = {k: v for k, v in geometry.items() if v is not None}
    for baseline in cfg.baselines:
        ename = f"inpaint-eval-{baseline}-s{seed}"
        base = merge(to_dict(cfg.evaluate), {**common, "seed": seed, "baseline": baseline,
                                             "name": ename})  # fmt: skip
        if baseline == "nn-hog" and not {"hole", "overlap"} & set(base):
            base.update(geometry)
        needs: tuple[str, ...] = ()
        if baseline == "nn-ce":
            if "joint" not in cfg.losses:
                raise ConfigError("suite inpainting: baseline nn-ce needs the joint loss run")
            base["weights"] = str(root / f"inpainting-joint-s{seed}")
            needs = (f"inpainting-joint-s{seed}",)
        steps.append(_make(INPAINT_EVAL, base, ename, needs, "inpaint-eval", "inpaint-eval"))
    return steps


def load_suite(
    suite_path: Path, out: Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[SuiteConfig, Path, list[Step]]:
    """(suite config, results root, planned steps) of a suite file."""
    suite = load_config(SuiteConfig, suite_path, overrides)
    check_run_name(suite.name)
    results = Path(out or suite.out or default_results_root())
    root = results / "runs" / suite.name
    return suite, results, plan(suite, root)


def print_plan(
    suite_path: Path, out: Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> str:
    """YAML of every planned step: its stage, dependencies, departures from the paper's
    settings and resolved config (what `bench run --print-config` prints)."""
    import yaml

    from benchmark.protocol import departures

    _, _, steps = load_suite(suite_path, out, overrides)
    docs = [
        {"step": s.name, "needs": list(s.needs), "departures": departures(s.cfg),
         "config": to_dict(s.cfg)}
        for s in steps
    ]  # fmt: skip
    return yaml.safe_dump_all(docs, sort_keys=False)


def claim_suite_root(root: Path) -> Path:
    """Make `root` the suite's folder, marked as one; refuse a run folder, a symbolic link
    and a folder bench did not make (one of an older bench counts if its suite.yaml names
    this suite)."""
    root = Path(root)
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise BenchError(f"{printable(root)}: suite folder is a symbolic link or a file")
    kind = folder_kind(root) if root.exists() else None
    if kind == "run":
        raise BenchError(f"{printable(root)}: is a run folder, not a suite's; give the suite "
                         "another name")  # fmt: skip
    if kind is None:
        if root.exists() and not is_empty_folder(root) and not _older_suite(root):
            raise not_made_by_bench(root, "suite name or --out")
        root.mkdir(parents=True, exist_ok=True)
        mark_folder(root, "suite")
    return root


def _older_suite(root: Path) -> bool:
    """Whether `root` is a suite folder of a bench older than the marker: its suite.yaml
    (written by `prepare_root`) names the suite after the folder."""
    from benchmark.config import read_yaml

    try:
        suite = read_yaml(root / "suite.yaml", "suite file", BenchError)
    except BenchError:
        return False
    return isinstance(suite, dict) and suite.get("name") == root.name


@contextlib.contextmanager
def suite_lock(root: Path, launcher: str = "sequential") -> Iterator[None]:
    """Hold `<root>/.launcher.lock` while a launcher runs the suite; a second launcher of the
    same suite fails at once with a one-line error (the kernel drops the lock of a dead one)."""
    claim_suite_root(root)
    refuse_links(root, "suite folder")
    path = root / LAUNCHER_LOCK
    f = open(open_no_follow(path, os.O_RDWR | os.O_CREAT), "a+")  # noqa: SIM115 - held
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = " ".join(f.read().split())[:120] or "unknown"
                raise BenchError(
                    f"{printable(root)}: this suite is being run by another launcher "
                    f"({holder}); wait for it or stop it, then rerun"
                ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} launcher {launcher} since {time.strftime('%H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the flock


def prepare_root(suite: SuiteConfig, results: Path) -> Path:
    """The suite folder, with the resolved suite (what every step of it was planned from)."""
    root = claim_suite_root(results / "runs" / suite.name)
    atomic_write_text(root / "suite.yaml", dump_yaml(suite))
    return root


def write_report(suite: SuiteConfig, results: Path) -> tuple[Path, str]:
    """The suite's report from every finished run folder: (report folder, Markdown)."""
    from bench.report import main as report_main

    root = results / "runs" / suite.name
    report_dir = results / "reports" / suite.name
    return report_dir, report_main([root], report_dir, force=True, overlays=4)


def run_suite(
    suite_path: Path,
    out: Path | None = None,
    force: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
) -> str:
    """Run every step of the suite; returns the report's Markdown."""
    suite, results, steps = load_suite(suite_path, out, overrides)
    root = results / "runs" / suite.name
    with suite_lock(root, "sequential"):
        prepare_root(suite, results)
        _log(f"suite {suite.name}: {len(steps)} steps, every config checked")
        for step in steps:
            done = not force and (root / step.name / METRICS_FILE).is_file()
            _log(f"step {step.name}" + (": already complete, skipped" if done else ""))
            start = time.time()
            run_stage(step.stage, step.cfg, root, force=force, resume=not force, command=None)
            if not done:
                _log(f"step {step.name} done in {time.time() - start:.0f}s")
        if not suite.report:
            return f"suite {suite.name}: runs in {root}"
        report_dir, text = write_report(suite, results)
    from bench.report import HTML_FILE

    return f"{text}\nreport files in {report_dir} (open {report_dir / HTML_FILE})\nruns in {root}"


def find_step(steps: list[Step], name: str) -> Step:
    for step in steps:
        if step.name == name:
            return step
    shown = ", ".join(s.name for s in steps[:8]) + (" ..." if len(steps) > 8 else "")
    raise BenchError(f"--step {printable(name)}: not a step of this suite (steps: {shown})")


def run_step(
    suite_path: Path,
    name: str,
    out: Path | None = None,
    force: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[Path, dict[str, Any]]:
    """Run exactly one planned step (`bench run SUITE --step NAME`, a launcher's job): the
    suite is planned in full, then the step's run folder is opened as a sequential run opens
    it (resumed, or redone with `force`). Runs under torchrun like any stage."""
    suite, results, steps = load_suite(suite_path, out, overrides)
    step = find_step(steps, name)
    root = claim_suite_root(results / "runs" / suite.name)
    return run_stage(step.stage, step.cfg, root, force=force, resume=not force, command=None)
