"""What a pretraining run says about itself: the head of its model card and of its
metrics.json, the same fields for every pretraining method (docs/design.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from benchmark.config import config_hash, identity_hash
from benchmark.datasets.preflight import skipped_field
from benchmark.loop import FitResult
from benchmark.protocol import departures, is_synthetic, settings
from benchmark.runs import Run


def card_head(
    cfg: Any, result: FitResult | None, device: torch.device | None = None,
    *, synthetic: bool | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The fields every pretraining card starts with: which config made it (hash and the
    pretraining identity), how long and at what precision, the departures from the protocol
    of record, whether its images were synthetic, and how it ran. `synthetic` overrides the
    test on `cfg.data` (methods that read no images)."""
    precision = result.precision if result else None
    return {
        "method": cfg.method,
        "iterations": result.iterations if result else 0,
        "data": getattr(cfg, "data", None),
        "config_hash": config_hash(cfg),
        "pretrain_key": identity_hash(cfg),
        "pretrain_seconds": result.seconds if result else None,
        "seed": cfg.seed,
        "precision": precision,
        "departures": departures(cfg),
        "synthetic": is_synthetic(cfg.data) if synthetic is None else synthetic,
        "settings": settings(cfg, device=device, precision=precision),
    }


def metrics_head(
    cfg: Any, run: Run, card: dict[str, Any], export: str, skipped: Sequence[str] = ()
) -> dict[str, Any]:
    """The fields every pretraining metrics.json starts with (the loop's come from
    `benchmark.loop.fit_fields`)."""
    return {
        "stage": "pretrain",
        "seed": cfg.seed,
        "command": run.command(),
        "method": card["method"],
        "pretrain_key": card["pretrain_key"],
        "departures": card["departures"],
        "synthetic": card["synthetic"],
        "settings": card["settings"],
        "skipped": skipped_field(skipped),
        "export": export,
    }
