"""What the transfer tasks share around their own training: run names from the weights' card,
the check of every file a run will read, and the keys every transfer metrics.json starts
with (docs/design.md)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from benchmark.datasets.preflight import Problem, check_detection, check_segmentation, enforce
from benchmark.datasets.voc import SegSample, read_split
from benchmark.runs import Run
from transfer.backbone import peek_card


class TransferConfig(Protocol):
    """The stage-contract fields these helpers read (every transfer config has them)."""

    seed: int
    weights: str | None
    on_bad_data: str


def name_parts(task: str, weights: str | Path | None) -> list[str]:
    """[<task>, <method>] plus <mask> when the card names one: how a run name starts."""
    card = peek_card(weights)
    parts = [task, str(card.get("method", "unknown"))]
    if card.get("mask"):
        parts.append(str(card["mask"]))
    return parts


def checked_voc_ids(
    voc_root: Path, split: str, policy: str, logger: logging.Logger, *, boxes: bool
) -> tuple[list[str], list[str]]:
    """(usable ids, skipped ids) of ImageSets/Main/<split>.txt after checking every
    annotation and image the run will read (boxes too when `boxes`), before training starts.
    policy "error": the first problem is a one-line DatasetError; "skip": bad ids dropped."""
    ids = read_split(voc_root, split, "Main")
    problems = check_detection(voc_root, ids, boxes=boxes)
    bad = enforce(problems, policy, what=f"{voc_root} {split}", logger=logger)  # type: ignore[arg-type]
    return [i for i in ids if i not in bad], sorted(bad)


def checked_segmentation(
    samples: Sequence[SegSample], policy: str, logger: logging.Logger, what: str
) -> tuple[list[SegSample], list[str]]:
    """(usable samples, skipped ids) after checking every image and label map."""
    problems: list[Problem] = check_segmentation(samples, desc=what)
    bad = enforce(problems, policy, what=what, logger=logger)  # type: ignore[arg-type]
    return [s for s in samples if s.image_id not in bad], sorted(bad)


def skipped_field(*skipped: Sequence[str]) -> dict[str, Any]:
    """metrics.json's record of the items `on_bad_data: skip` dropped."""
    items = sorted({i for group in skipped for i in group})
    return {"count": len(items), "items": items[:100]}


def metrics_head(
    task: str,
    backend: str,
    cfg: TransferConfig,
    run: Run,
    card: Mapping[str, Any],
    arch: str | None,
) -> dict[str, Any]:
    """The first keys of a transfer metrics.json: stage, task, seed, command, method, mask,
    pretrain_seconds, weights, backend, arch, and the weights' pretraining identity."""
    return {
        "stage": "transfer",
        "task": task,
        "seed": cfg.seed,
        "command": run.command(),
        "method": card.get("method"),
        "mask": card.get("mask"),
        "pretrain_seconds": card.get("pretrain_seconds"),
        "pretrain_key": card.get("pretrain_key"),
        "imported": bool(card.get("imported", False)),
        "weights": cfg.weights,
        "backend": backend,
        "arch": arch,
    }
