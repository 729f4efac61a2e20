"""What the transfer tasks share around their own training: run names from the weights' card,
the resumable loop state and its checkpoints, and the keys every transfer metrics.json
starts with (docs/design.md)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from benchmark.config import to_dict
from benchmark.runs import Run
from transfer.backbone import peek_card

CHECKPOINT = "last.pt"  # resumable: weights, optimiser and loop state
FINAL = "final.pt"  # the fine-tuned weights once training is over


class TransferConfig(Protocol):
    """The stage-contract fields these helpers read (every transfer config has them)."""

    seed: int
    weights: str | None


def name_parts(task: str, weights: str | Path | None) -> list[str]:
    """[<task>, <method>] plus <mask> when the card names one: how a run name starts."""
    card = peek_card(weights)
    parts = [task, str(card.get("method", "unknown"))]
    if card.get("mask"):
        parts.append(str(card["mask"]))
    return parts


def run_command(run: Run) -> str | None:
    """The command line the run folder was opened with (command.txt), if recorded."""
    path = run.file("command.txt")
    return path.read_text().strip() if path.is_file() else None


def start_state(model: nn.Module, ckpt: Mapping[str, Any] | None) -> dict[str, Any]:
    """The loop state to start from: a fresh one, or the state saved in checkpoint `ckpt`,
    whose weights are loaded into `model`."""
    if ckpt is None:
        return {"iteration": 0, "initial_loss": None, "final_loss": None, "train_seconds": 0.0}
    model.load_state_dict(ckpt["model"])
    return dict(ckpt["state"])


def save_state(
    run: Run,
    name: str,
    model: nn.Module,
    state: Mapping[str, Any],
    cfg: Any,
    card: Mapping[str, Any],
    optimizer: Any = None,
) -> None:
    """Checkpoint `name`: the weights, the loop state, the config and the weights' card, plus
    the optimiser state when given (the resumable checkpoint; the final one has none)."""
    payload: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    payload.update(state=dict(state), config=to_dict(cfg), card=card)
    run.save_checkpoint(payload, name)


def drop_resume_checkpoint(run: Run, is_main: bool) -> None:
    """Training is over: the resumable checkpoint (optimiser state included) is not kept."""
    if is_main and (run.checkpoint_dir / CHECKPOINT).is_file():
        (run.checkpoint_dir / CHECKPOINT).unlink()


def metrics_head(
    task: str,
    backend: str,
    cfg: TransferConfig,
    run: Run,
    card: Mapping[str, Any],
    arch: str | None,
) -> dict[str, Any]:
    """The first keys of a transfer metrics.json: stage, task, seed, command, method, mask,
    pretrain_seconds, weights, backend, arch."""
    return {
        "stage": "transfer",
        "task": task,
        "seed": cfg.seed,
        "command": run_command(run),
        "method": card.get("method"),
        "mask": card.get("mask"),
        "pretrain_seconds": card.get("pretrain_seconds"),
        "weights": cfg.weights,
        "backend": backend,
        "arch": arch,
    }
