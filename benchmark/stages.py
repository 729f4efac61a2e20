"""The name -> (config class, main, default_name) table behind `bench pretrain/transfer/run`.

A plain dict of lazy importers (STYLE.md: a dict from name to builder, no registry): the heavy
modules of one task are only imported when that task runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.errors import BenchError


@dataclass(frozen=True)
class Stage:
    """What the CLI needs to run one kind of run folder."""

    config_cls: type
    main: Callable[..., dict[str, Any]]
    default_name: Callable[[Any], str]


def _load(module: str, config: str) -> Stage:
    mod = importlib.import_module(module)
    return Stage(getattr(mod, config), mod.main, mod.default_name)


PRETRAIN_METHODS: dict[str, Callable[[], Stage]] = {
    "context-encoder": lambda: _load("pretrain.train", "PretrainConfig"),
    "autoencoder": lambda: _load("pretrain.train", "PretrainConfig"),
    "random": lambda: _load("pretrain.train", "PretrainConfig"),
    "imagenet": lambda: _load("pretrain.train", "PretrainConfig"),
    "inpainting": lambda: _load("pretrain.inpainting_train", "InpaintingConfig"),
}

TRANSFER_TASKS: dict[str, Callable[[], Stage]] = {
    "classification": lambda: _load("transfer.classification", "ClassificationConfig"),
    "detection": lambda: _load("transfer.detection", "DetectionConfig"),
    "segmentation": lambda: _load("transfer.segmentation", "SegmentationConfig"),
}


def pretrain_stage(method: str) -> Stage:
    if method not in PRETRAIN_METHODS:
        choices = ", ".join(PRETRAIN_METHODS)
        raise BenchError(f"unknown pretraining method '{method}' (choose from {choices})")
    return PRETRAIN_METHODS[method]()


def transfer_stage(task: str) -> Stage:
    if task not in TRANSFER_TASKS:
        choices = ", ".join(TRANSFER_TASKS)
        raise BenchError(f"unknown transfer task '{task}' (choose from {choices})")
    return TRANSFER_TASKS[task]()


def inpaint_eval_stage() -> Stage:
    """`bench inpaint evaluate`: Table 1 metrics of a model or a nearest-neighbour baseline."""
    return _load("pretrain.inpaint_eval", "InpaintEvalConfig")


def run_stage(
    stage: Stage,
    cfg: Any,
    runs_root: Path,
    *,
    force: bool = False,
    resume: bool = False,
    command: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Open the run folder, run the stage, return (folder, metrics).

    A complete run opened with `resume` is not redone: its metrics are returned as they are,
    which is what lets `bench run` skip finished steps.
    """
    from benchmark import distributed
    from benchmark.runs import open_run

    env = distributed.setup(getattr(cfg, "device", "auto"))
    name = getattr(cfg, "name", None) or stage.default_name(cfg)
    path = Path(runs_root) / name
    # Rank 0 creates (or clears) the folder first; the other ranks then attach to it.
    run = None
    if env.is_main:
        run = open_run(path, cfg, force=force, resume=resume, command=command)
    distributed.barrier()
    if run is None:
        run = open_run(path, cfg, resume=True, is_main=False)
    try:
        if run.complete:
            run.logger.info(f"{path}: already complete, skipping (use --force to redo)")
            return path, run.metrics()
        if run.resumed and env.is_main:
            run.logger.info(f"{path}: resuming")
        metrics = stage.main(cfg, run)
        if env.is_main:
            from benchmark.curves import write_curves

            write_curves(path)
        return path, metrics
    finally:
        run.close()
