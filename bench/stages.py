"""The stage table behind `bench pretrain / transfer / inpaint / run`: plain dicts of name ->
`Stage` (config class, `main`, `default_name`, `check`), imported directly.

Every stage follows one layout: `<stage>/config.py` (the dataclass, paper values as
defaults), `<stage>/train.py` (`main(cfg, run) -> metrics`, `default_name`, `check`).
`run_stage` checks the config (`check`) and what the run will read (`preflight`, where a
stage has one), and only then opens the run folder (name checked, lock held, resumed or
started over), runs the stage, and writes the training curves: a run that cannot start
leaves no folder behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pretrain.inpainting.evaluate as inpaint_eval
import pretrain.inpainting.train as inpainting
import pretrain.pretext.train as pretext
import pretrain.train as pretraining
import transfer.classification.train as classification
import transfer.detection.train as detection
import transfer.knn.train as knn
import transfer.segmentation.train as segmentation
import transfer.svm.train as svm
from benchmark import distributed
from benchmark.curves import write_curves
from benchmark.errors import BenchError
from benchmark.runs import METRICS_FILE, check_run_name, open_run
from pretrain.config import PretrainConfig
from pretrain.inpainting.config import InpaintEvalConfig, InpaintingConfig
from pretrain.pretext.config import STAGE_CONFIGS as PRETEXT_CONFIGS
from transfer.classification.config import ClassificationConfig
from transfer.detection.config import DetectionConfig
from transfer.knn.config import KNNConfig
from transfer.segmentation.config import SegmentationConfig
from transfer.svm.config import SVMConfig


@dataclass(frozen=True)
class Stage:
    """What the CLI and suites need to run one kind of run folder."""

    config_cls: type
    main: Callable[[Any, Any], dict[str, Any]]
    default_name: Callable[[Any], str]
    check: Callable[[Any], None]
    distributed: bool = True  # runs under torchrun (else refused there with a one-line error)
    # Reads and checks the run's data before its folder exists; what it returns is passed to
    # `main` as a third argument (pretraining: pretrain/preflight.py).
    preflight: Callable[[Any], Any] | None = None


def _pretrain(main: Callable[..., dict[str, Any]]) -> Stage:
    return Stage(PretrainConfig, main, pretraining.default_name, pretraining.check,
                 preflight=pretraining.preflight)  # fmt: skip


# the one dispatch on --method: each method's config class and main
PRETRAIN_METHODS: dict[str, Stage] = {
    "context-encoder": _pretrain(pretraining.main_context_encoder),
    "autoencoder": _pretrain(pretraining.main_context_encoder),
    "random": _pretrain(pretraining.main_random),
    "imagenet": _pretrain(pretraining.main_imagenet),
    "inpainting": Stage(
        InpaintingConfig, inpainting.main, inpainting.default_name, inpainting.check,
        preflight=inpainting.preflight,
    ),  # fmt: skip
    # other pretext methods on the same encoder, data and protocols (pretrain/pretext/)
    **{
        name: Stage(cls, pretext.main, pretext.default_name, pretext.check,
                    preflight=pretext.preflight)  # fmt: skip
        for name, cls in PRETEXT_CONFIGS.items()
    },
}

TRANSFER_TASKS: dict[str, Stage] = {
    "classification": Stage(
        ClassificationConfig, classification.main, classification.default_name, classification.check
    ),
    "detection": Stage(DetectionConfig, detection.main, detection.default_name, detection.check),
    "segmentation": Stage(
        SegmentationConfig, segmentation.main, segmentation.default_name, segmentation.check
    ),
    # frozen-feature probes (Goyal et al. 2019): linear SVMs per layer, weighted k-NN
    "svm": Stage(SVMConfig, svm.main, svm.default_name, svm.check, False),
    "knn": Stage(KNNConfig, knn.main, knn.default_name, knn.check, False),
}

INPAINT_EVAL = Stage(
    InpaintEvalConfig,
    inpaint_eval.main,
    inpaint_eval.default_name,
    inpaint_eval.check,
    distributed=False,
)


def pretrain_stage(method: str) -> Stage:
    if method not in PRETRAIN_METHODS:
        choices = ", ".join(PRETRAIN_METHODS)
        raise BenchError(f"unknown pretraining method '{method}' (choose from {choices})")
    return PRETRAIN_METHODS[method]


def transfer_stage(task: str) -> Stage:
    if task not in TRANSFER_TASKS:
        choices = ", ".join(TRANSFER_TASKS)
        raise BenchError(f"unknown transfer task '{task}' (choose from {choices})")
    return TRANSFER_TASKS[task]


def run_name(stage: Stage, cfg: Any) -> str:
    """The run folder's name: the config's `name`, else the stage's default; one component."""
    return check_run_name(getattr(cfg, "name", None) or stage.default_name(cfg))


def run_stage(
    stage: Stage,
    cfg: Any,
    runs_root: Path,
    *,
    force: bool = False,
    resume: bool = False,
    command: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Check the config and what the run reads, open the run folder, run the stage, return
    (folder, metrics).

    A complete run opened with `resume` is not redone: its metrics are returned as they are,
    which is what lets `bench run` skip finished steps (without reading its data again).
    """
    stage.check(cfg)
    distributed.pick_device(getattr(cfg, "device", "auto"))  # no folder for a device we lack
    if not stage.distributed and distributed.torchrun_world() > 1:
        raise BenchError(
            f"{type(cfg).__name__}: this stage runs in one process (its work is not split "
            "over GPUs); run it without torchrun"
        )
    path = Path(runs_root) / run_name(stage, cfg)
    # A finished folder is either reused as it is (resume) or refused (open_run): its data
    # need not be read. Anything else reads and checks it before the folder is made.
    finished = not force and (path / METRICS_FILE).is_file()
    prepared = stage.preflight(cfg) if stage.preflight is not None and not finished else None
    # Rank 0 prepares the folder (lock, rewind, start over) first; the others then attach.
    run = open_run(path, cfg, force=force, resume=resume, command=command) if _main() else None
    distributed.barrier()
    if run is None:
        run = open_run(path, cfg, resume=True, is_main=False)
    try:
        if run.complete:
            run.logger.info(f"{path}: already complete, skipping (use --force to redo)")
            return path, run.metrics()
        if stage.preflight is not None:
            metrics = stage.main(cfg, run, prepared)  # type: ignore[call-arg]
        else:
            metrics = stage.main(cfg, run)
        if run.is_main:
            write_curves(path)
        return path, metrics
    finally:
        run.close()


def _main() -> bool:
    """Whether this process is rank 0 (torchrun's RANK; one process is rank 0)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0
