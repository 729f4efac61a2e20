"""The guards around fine-tuning: which parameters are frozen, what is trained, and proof
after training that the frozen ones did not move (STYLE.md "guard transfer"). Loading the
encoder is `weights.encoder`'s."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

log = logging.getLogger("bench")

# --------------------------------------------------------------------------- transfer guards


def _frozen(name: str, prefixes: Iterable[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)


def freeze(model: nn.Module, frozen_prefixes: Iterable[str]) -> None:
    """Turn off gradients of every parameter whose name starts with one of the prefixes."""
    prefixes = tuple(frozen_prefixes)
    for name, p in model.named_parameters():
        p.requires_grad_(not _frozen(name, prefixes))


def describe_transfer(
    model: nn.Module, frozen_prefixes: Iterable[str] = (), logger: logging.Logger | None = None
) -> tuple[int, int]:
    """Log (and return) the trainable and total parameter counts; check the freeze took.

    A parameter under a frozen prefix that still requires grad would be trained silently.
    """
    prefixes = tuple(frozen_prefixes)
    trainable = total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            if _frozen(name, prefixes):
                raise RuntimeError(f"parameter {name} is under a frozen prefix but requires grad")
            trainable += p.numel()
    frozen = ", ".join(p.rstrip(".") for p in prefixes) or "nothing"
    (logger or log).info(
        "trainable parameters: %s of %s (frozen: %s)", f"{trainable:,}", f"{total:,}", frozen
    )
    return trainable, total


def snapshot_frozen(model: nn.Module, frozen_prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """CPU copies of the frozen parameters, to prove after training that they did not move."""
    prefixes = tuple(frozen_prefixes)
    return {
        name: p.detach().to("cpu", copy=True)
        for name, p in model.named_parameters()
        if _frozen(name, prefixes)
    }


def check_frozen_unchanged(model: nn.Module, snapshot: Mapping[str, torch.Tensor]) -> None:
    """Raise RuntimeError naming the first frozen parameter that changed since the snapshot.

    Frozen layers can still move through weight decay or momentum if they leak into the
    optimiser; this check makes such a bug loud instead of a quietly wrong table entry.
    """
    params = dict(model.named_parameters())
    for name, before in snapshot.items():
        if name not in params:
            raise RuntimeError(f"frozen parameter {name} is no longer in the model")
        if not torch.equal(params[name].detach().cpu(), before):
            raise RuntimeError(f"frozen parameter {name} changed during training")
