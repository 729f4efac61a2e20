"""What the transfer tasks share around their own training: run names from the weights' card
and the keys every transfer metrics.json starts with (docs/design.md)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from benchmark.datasets.preflight import (  # noqa: F401 - the tasks call them as common.*
    checked_segmentation,
    checked_voc_ids,
    enforce,
    skipped_field,
)
from benchmark.protocol import departures, is_synthetic, settings
from benchmark.runs import Run
from weights.encoder import peek_card


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


def metrics_head(
    task: str,
    backend: str,
    cfg: TransferConfig,
    run: Run,
    card: Mapping[str, Any],
    arch: str | None,
    *,
    device: Any = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """The first keys of a transfer metrics.json: stage, task, seed, command, method, mask,
    pretrain_seconds, weights, backend, the encoder family (alexnet, resnet, vit), arch, the
    input convention fed to the encoder and the one its weights were made for
    (`input_convention_loaded`; they differ where conv1 was folded on load), the weights'
    pretraining identity, how the run relates to the protocol (`departures` from the
    protocol of record, of this run and of the encoder's pretraining; `synthetic` data) and
    the settings it and the pretraining ran with (`settings`, `pretrain_settings`: device,
    precision, threads, ...)."""
    data = getattr(cfg, "data", None)
    fed = card.get("input_convention")
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
        "family": card.get("family") or "alexnet",
        "arch": arch,
        "input_convention": fed.get("name") if isinstance(fed, Mapping) else fed,
        "input_convention_loaded": card.get("input_convention_loaded"),
        "data": data,
        "synthetic": is_synthetic(data),
        "departures": departures(cfg),
        "pretrain_departures": card.get("departures"),
        "pretrain_synthetic": card.get("synthetic"),
        "settings": settings(cfg, device=device, precision=precision),
        "pretrain_settings": card.get("settings"),
    }
