"""The one checkpoint layout of every stage, loadable with `torch.load(weights_only=True)`.

    {
      "format": "bench-checkpoint/1",
      "stage": "pretrain/context-encoder",      # which stage wrote it
      "config": {...},                          # the resolved config (plain dict)
      "iteration": 1000,                        # loop position: iterations completed
      "seconds": 812.4,                         # training time so far (all sessions)
      "scalars": {"first": {...}, "history": [...]},
      "logs": {"log.txt": 5120, "scalars.jsonl": 880},   # sizes to rewind to on resume
      "rng": {"python": tensor, "numpy": tensor, "torch": tensor, "cuda": [tensor, ...]},
      "state": {"model": state_dict, "optimizer": state_dict, ...},
    }

Everything is tensors, numbers, strings, lists and dicts, which is all the weights-only
unpickler accepts: a checkpoint someone shares cannot run code when it is loaded. RNG states
are stored as tensors for the same reason.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from benchmark.errors import BenchError, printable

FORMAT = "bench-checkpoint/1"


def rng_state() -> dict[str, Any]:
    """Every global random generator a step may draw from, as tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_meta": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    assert kind == "MT19937"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` saved (CUDA states only onto as many devices as saved)."""
    py = state["python"].tolist()
    gauss = state["python_gauss"].tolist()
    random.setstate((int(py[0]), tuple(int(v) for v in py[1:]), gauss[0] if gauss else None))
    pos, has_gauss, cached = state["numpy_meta"].tolist()
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def make_checkpoint(
    *,
    stage: str,
    config: Mapping[str, Any],
    iteration: int,
    seconds: float,
    state: Mapping[str, Mapping[str, Any]],
    scalars: Mapping[str, Any] | None = None,
    logs: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict (see the module docstring)."""
    return {
        "format": FORMAT,
        "stage": stage,
        "config": dict(config),
        "iteration": int(iteration),
        "seconds": float(seconds),
        "scalars": dict(scalars or {}),
        "logs": dict(logs or {}),
        "rng": rng_state(),
        "state": {k: v for k, v in state.items()},
    }


def check_checkpoint(ckpt: Any, stage: str, where: object) -> dict[str, Any]:
    """The checkpoint if it is ours and of `stage`; a one-line BenchError otherwise."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise BenchError(f"{printable(where)}: not a {FORMAT} checkpoint")
    if ckpt.get("stage") != stage:
        raise BenchError(
            f"{printable(where)}: checkpoint of stage {ckpt.get('stage')!r}, not {stage!r} "
            "(use --force to start this run over)"
        )
    missing = [k for k in ("iteration", "state", "rng") if k not in ckpt]
    if missing:
        raise BenchError(f"{printable(where)}: checkpoint lacks {', '.join(missing)}")
    return ckpt
