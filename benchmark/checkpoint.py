"""The one checkpoint layout of every stage, loadable with `torch.load(weights_only=True)`.

    {
      "format": "bench-checkpoint/1",
      "stage": "pretrain/context-encoder",      # which stage wrote it
      "config": {...},                          # the resolved config (plain dict)
      "input_convention": "caffe",              # what the encoder was fed (stages with one)
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
from benchmark.validate import check_depth, fail, get, non_negative

FORMAT = "bench-checkpoint/1"
# The two append-only logs a resume cuts back (runs.LOG_FILE, runs.SCALARS_FILE): the only
# names `logs` may hold.
LOG_FILES = ("log.txt", "scalars.jsonl")
_PY_STATE = 626  # random.getstate(): version, 624 Mersenne Twister words and a position
_MT_WORDS = 624
# The input convention of checkpoints that do not name one: every stage fed torchvision's
# before the encoder's convention became its arch's (benchmark.input_convention).
LEGACY_INPUT_CONVENTION = "torchvision"


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
    """Restore what `rng_state` saved (CUDA states only onto as many devices as saved);
    `validate_checkpoint` has checked every tensor's dtype, shape and range."""
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
    input_convention: str | None = None,
) -> dict[str, Any]:
    """The checkpoint dict (see the module docstring)."""
    extra = {} if input_convention is None else {"input_convention": input_convention}
    return {
        "format": FORMAT,
        "stage": stage,
        "config": dict(config),
        **extra,
        "iteration": int(iteration),
        "seconds": float(seconds),
        "scalars": dict(scalars or {}),
        "logs": dict(logs or {}),
        "rng": rng_state(),
        "state": {k: v for k, v in state.items()},
    }


def check_checkpoint(
    ckpt: Any, stage: str, where: object, input_convention: str | None = None
) -> dict[str, Any]:
    """The checkpoint if it is ours, of `stage` and (when given) made feeding the encoder
    `input_convention`; a one-line BenchError otherwise. Resuming weights and optimiser
    moments made for another input would train on silently wrong inputs."""
    ckpt = validate_checkpoint(ckpt, where)
    if ckpt["stage"] != stage:
        raise BenchError(
            f"{printable(where)}: checkpoint of stage {printable(ckpt['stage'])!r}, not "
            f"{stage!r} (use --force to start this run over)"
        )
    saved = ckpt.get("input_convention", LEGACY_INPUT_CONVENTION)
    if input_convention is not None and saved != input_convention:
        raise BenchError(
            f"{printable(where)}: checkpoint was trained feeding the encoder {saved!r} input, "
            f"this run feeds {input_convention!r} (use --force to start this run over)"
        )
    return ckpt


def validate_checkpoint(ckpt: Any, where: object) -> dict[str, Any]:
    """The checkpoint if every field has the type, range and shape `make_checkpoint` gives
    it; else a one-line BenchError naming the file and the field.

    The weights-only loader only proves that the file holds no code; a file it accepts can
    still say anything. `logs` is the one field that touches files (the resume cuts the
    logs back to these sizes), so it may name only log.txt and scalars.jsonl, with sizes
    that are non-negative integers.
    """
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise BenchError(f"{printable(where)}: not a {FORMAT} checkpoint")
    check_depth(ckpt, where, "checkpoint")
    get(ckpt, "stage", str, where)
    get(ckpt, "config", dict, where)
    get(ckpt, "input_convention", str, where, required=False)
    get(ckpt, "iteration", int, where, check=non_negative)
    get(ckpt, "seconds", (int, float), where, check=non_negative)
    scalars = get(ckpt, "scalars", dict, where, required=False) or {}
    get(scalars, "first", dict, where, prefix="scalars.", required=False)
    history = get(scalars, "history", list, where, prefix="scalars.", required=False) or []
    if not all(isinstance(row, dict) for row in history):
        raise fail(where, "scalars.history", "expected a list of objects")
    logs = get(ckpt, "logs", dict, where, required=False) or {}
    for name in logs:
        if name not in LOG_FILES:
            raise fail(where, "logs", f"names {printable(name)!r}; only {' and '.join(LOG_FILES)}"
                       " are rewound")  # fmt: skip
        get(logs, name, int, where, prefix="logs.", check=non_negative)
    _validate_rng(get(ckpt, "rng", dict, where), where)
    state = get(ckpt, "state", dict, where)
    for name, part in state.items():
        if not isinstance(name, str) or not isinstance(part, dict):
            raise fail(where, f"state.{printable(name)}", "expected an object of tensors")
    return ckpt


def _validate_rng(rng: dict[str, Any], where: object) -> None:
    """Each generator's state tensor: dtype, shape and the values its setter accepts."""

    def tensor(key: str, dtype: torch.dtype, size: int | None) -> torch.Tensor:
        t = get(rng, key, torch.Tensor, where, prefix="rng.")
        if t.dtype != dtype or t.dim() != 1 or (size is not None and t.numel() != size):
            shape = f"({size},)" if size is not None else "1-D"
            raise fail(where, f"rng.{key}", f"expected a {shape} {dtype} tensor, got "
                       f"{tuple(t.shape)} {t.dtype}")  # fmt: skip
        return t

    py = tensor("python", torch.int64, _PY_STATE)
    if int(py[0]) != 3 or (py[1:] < 0).any() or (py[1:] >= 2**32).any() or py[-1] > _MT_WORDS:
        raise fail(where, "rng.python", "not a Mersenne Twister state")
    gauss = tensor("python_gauss", torch.float64, None)
    if gauss.numel() > 1:
        raise fail(where, "rng.python_gauss", "expected at most one value")
    keys = tensor("numpy", torch.int64, _MT_WORDS)
    meta = tensor("numpy_meta", torch.float64, 3)
    pos, has_gauss, cached = meta.tolist()
    if ((keys < 0).any() or (keys >= 2**32).any() or pos not in range(_MT_WORDS + 1)
            or has_gauss not in (0, 1) or not np.isfinite(cached)):  # fmt: skip
        raise fail(where, "rng.numpy", "not a Mersenne Twister state")
    tensor("torch", torch.uint8, torch.get_rng_state().numel())
    cuda = get(rng, "cuda", list, where, prefix="rng.", required=False) or []
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
        raise fail(where, "rng.cuda", "expected a list of uint8 tensors")
