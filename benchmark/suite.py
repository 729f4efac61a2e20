"""`bench run SUITE.yaml`: pretraining methods x transfer tasks, then the report.

Every step is an ordinary run folder under `<out>/runs/<suite>/`, opened with `resume`, so a
finished step is skipped and an interrupted one continues from its last checkpoint; running
the same suite twice redoes nothing. A step whose config changed since it ran is an error
(use --force to redo everything).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.config import dump_yaml, load_config, merge, to_dict
from benchmark.runs import atomic_write_text, default_results_root
from benchmark.stages import pretrain_stage, run_stage, transfer_stage


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
    # task name -> overrides of its transfer config, applied for every pretraining method
    transfer: dict[str, Any] = field(default_factory=dict)
    inpainting: InpaintingSuite | None = None
    report: bool = True


def _log(msg: str) -> None:
    print(f"[bench run] {msg}", file=sys.stderr, flush=True)


def _step(stage: Any, overrides: dict[str, Any], root: Path, force: bool) -> tuple[Path, dict]:
    cfg = load_config(stage.config_cls, base=overrides)
    _log(f"step {cfg.name}")
    start = time.time()
    path, metrics = run_stage(stage, cfg, root, force=force, resume=not force, command=None)
    _log(f"step {cfg.name} done in {time.time() - start:.0f}s")
    return path, metrics


def run_suite(
    suite_path: Path,
    out: Path | None = None,
    force: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
) -> str:
    """Run every step of the suite; returns the report's Markdown."""
    suite = load_config(SuiteConfig, suite_path, overrides)
    results = Path(out or suite.out or default_results_root())
    root = results / "runs" / suite.name
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "suite.yaml", dump_yaml(suite))
    common = {"device": suite.device}

    for seed in suite.seeds:
        for method, pre_over in suite.pretrain.items():
            pre_over = to_dict(pre_over or {})
            base = merge(
                pre_over,
                {**common, "method": method, "seed": seed, "name": f"pretrain-{method}-s{seed}"},
            )
            pre_path, _ = _step(pretrain_stage(method), base, root, force)
            for task, t_over in suite.transfer.items():
                base = merge(
                    to_dict(t_over or {}),
                    {
                        **common,
                        "seed": seed,
                        "weights": str(pre_path),
                        "name": f"{task}-{method}-s{seed}",
                    },
                )
                _step(transfer_stage(task), base, root, force)
        if suite.inpainting is not None:
            _inpainting_steps(suite.inpainting, common, seed, root, force)

    if not suite.report:
        return f"suite {suite.name}: runs in {root}"
    from benchmark.report import main as report_main

    report_dir = results / "reports" / suite.name
    text = report_main([root], report_dir, force=True, overlays=4)
    return f"{text}\nreport files in {report_dir}\nruns in {root}"


def _inpainting_steps(
    cfg: InpaintingSuite, common: dict[str, Any], seed: int, root: Path, force: bool
) -> None:
    from benchmark.stages import inpaint_eval_stage

    eval_stage = inpaint_eval_stage()
    for loss in cfg.losses:
        base = merge(
            to_dict(cfg.train),
            {
                **common,
                "method": "inpainting",
                "seed": seed,
                "loss": {"kind": loss},
                "name": f"inpainting-{loss}-s{seed}",
            },
        )
        path, _ = _step(pretrain_stage("inpainting"), base, root, force)
        base = merge(
            to_dict(cfg.evaluate),
            {**common, "seed": seed, "weights": str(path), "name": f"inpaint-eval-{loss}-s{seed}"},
        )
        _step(eval_stage, base, root, force)
    for baseline in cfg.baselines:
        base = merge(
            to_dict(cfg.evaluate),
            {
                **common,
                "seed": seed,
                "baseline": baseline,
                "name": f"inpaint-eval-{baseline}-s{seed}",
            },
        )
        if baseline == "nn-ce" and "joint" in cfg.losses:
            base["weights"] = str(root / f"inpainting-joint-s{seed}")
        _step(eval_stage, base, root, force)
