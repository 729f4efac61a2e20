"""`bench run SUITE.yaml`: pretraining methods x transfer tasks (+ inpainting), then the report.

A suite is planned in full before anything runs: every step's config is built, type-checked
and checked by its stage (`Stage.check`), so a typo in the last step fails in a second, not
after hours. Every step is an ordinary run folder under `<out>/runs/<suite>/`, opened with
`resume`, so a finished step is skipped and an interrupted one continues from its last
checkpoint; running the same suite twice redoes nothing. A step whose config changed since it
ran is an error (use --force to redo everything).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.config import dump_yaml, load_config, merge, to_dict
from benchmark.errors import ConfigError
from benchmark.runs import atomic_write_text, check_run_name, default_results_root
from benchmark.stages import INPAINT_EVAL, Stage, pretrain_stage, run_stage, transfer_stage


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
    # name -> a weights file or folder made elsewhere (e.g. `bench import caffe` of released
    # weights): transferred like a pretraining method's encoder, with no pretraining step
    weights: dict[str, str] = field(default_factory=dict)
    # task name -> overrides of its transfer config, applied for every pretraining method
    transfer: dict[str, Any] = field(default_factory=dict)
    inpainting: InpaintingSuite | None = None
    report: bool = True


@dataclass
class Step:
    """One run folder of the suite: its stage, resolved config and the steps it needs."""

    name: str
    stage: Stage
    cfg: Any
    needs: tuple[str, ...] = ()


def _log(msg: str) -> None:
    print(f"[bench run] {msg}", file=sys.stderr, flush=True)


def _make(stage: Stage, overrides: dict[str, Any], name: str, needs: tuple[str, ...]) -> Step:
    """Build, type-check and stage-check one step's config (a ConfigError names the step)."""
    try:
        cfg = load_config(stage.config_cls, base=overrides)
        stage.check(cfg)
    except ConfigError as exc:
        raise ConfigError(f"suite step {name}: {exc}") from None
    return Step(check_run_name(name), stage, cfg, needs)


def plan(suite: SuiteConfig, root: Path) -> list[Step]:
    """Every step of the suite in an order that respects `needs`."""
    common = {"device": suite.device}
    steps: list[Step] = []
    for seed in suite.seeds:
        for method, pre_over in suite.pretrain.items():
            pre_name = f"pretrain-{method}-s{seed}"
            base = merge(to_dict(pre_over or {}), {**common, "method": method, "seed": seed,
                                                   "name": pre_name})  # fmt: skip
            steps.append(_make(pretrain_stage(method), base, pre_name, ()))
            for task, t_over in suite.transfer.items():
                name = f"{task}-{method}-s{seed}"
                base = merge(to_dict(t_over or {}), {**common, "seed": seed, "name": name,
                                                     "weights": str(root / pre_name)})  # fmt: skip
                steps.append(_make(transfer_stage(task), base, name, (pre_name,)))
        for label, path in suite.weights.items():
            for task, t_over in suite.transfer.items():
                name = f"{task}-{label}-s{seed}"
                base = merge(to_dict(t_over or {}), {**common, "seed": seed, "name": name,
                                                     "weights": str(path)})  # fmt: skip
                steps.append(_make(transfer_stage(task), base, name, ()))
        if suite.inpainting is not None:
            steps += _inpainting_steps(suite.inpainting, common, seed, root)
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ConfigError("suite: two steps have the same run name")
    return steps


def _inpainting_steps(
    cfg: InpaintingSuite, common: dict[str, Any], seed: int, root: Path
) -> list[Step]:
    steps = []
    for loss in cfg.losses:
        name = f"inpainting-{loss}-s{seed}"
        base = merge(to_dict(cfg.train), {**common, "method": "inpainting", "seed": seed,
                                          "loss": {"kind": loss}, "name": name})  # fmt: skip
        steps.append(_make(pretrain_stage("inpainting"), base, name, ()))
        ename = f"inpaint-eval-{loss}-s{seed}"
        base = merge(to_dict(cfg.evaluate), {**common, "seed": seed, "weights": str(root / name),
                                             "name": ename})  # fmt: skip
        steps.append(_make(INPAINT_EVAL, base, ename, (name,)))
    for baseline in cfg.baselines:
        ename = f"inpaint-eval-{baseline}-s{seed}"
        base = merge(to_dict(cfg.evaluate), {**common, "seed": seed, "baseline": baseline,
                                             "name": ename})  # fmt: skip
        needs: tuple[str, ...] = ()
        if baseline == "nn-ce":
            if "joint" not in cfg.losses:
                raise ConfigError("suite inpainting: baseline nn-ce needs the joint loss run")
            base["weights"] = str(root / f"inpainting-joint-s{seed}")
            needs = (f"inpainting-joint-s{seed}",)
        steps.append(_make(INPAINT_EVAL, base, ename, needs))
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


def run_suite(
    suite_path: Path,
    out: Path | None = None,
    force: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
) -> str:
    """Run every step of the suite; returns the report's Markdown."""
    suite, results, steps = load_suite(suite_path, out, overrides)
    root = results / "runs" / suite.name
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "suite.yaml", dump_yaml(suite))
    _log(f"suite {suite.name}: {len(steps)} steps, every config checked")
    for step in steps:
        _log(f"step {step.name}")
        start = time.time()
        run_stage(step.stage, step.cfg, root, force=force, resume=not force, command=None)
        _log(f"step {step.name} done in {time.time() - start:.0f}s")
    if not suite.report:
        return f"suite {suite.name}: runs in {root}"
    from benchmark.report import main as report_main

    report_dir = results / "reports" / suite.name
    text = report_main([root], report_dir, force=True, overlays=4)
    return f"{text}\nreport files in {report_dir}\nruns in {root}"
