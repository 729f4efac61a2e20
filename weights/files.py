"""Reading a checkpoint file into plain containers of tensors, without running its code.

- torch files (`.pth`, `.pth.tar`, `.pt`, `.ckpt`, `.tar`, `.bin`, `.torch`, zip or
  legacy): `torch.load(weights_only=True)`, which rebuilds tensors and builtin containers
  only. `argparse.Namespace` is allowed too: DINO and other training scripts save their
  `args` in the checkpoint, and a Namespace is rebuilt by setting attributes, no code runs.
- `.safetensors`: the safetensors reader (tensors only, by construction).
- `.pkl` / `.pickle` (detectron2): `benchmark.safe_pickle` (containers and numpy arrays);
  arrays become tensors.

Every failure is one line naming the file: a file that asks for any other Python object is
refused (naming the object), a truncated or garbled one is "unreadable or truncated".
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from benchmark.errors import BenchError, printable
from benchmark.runs import first_sentence, torch_load_safe
from benchmark.safe_pickle import safe_load

PICKLE_SUFFIXES = (".pkl", ".pickle")
SAFETENSORS_SUFFIX = ".safetensors"
_ZIP_MAGIC = b"PK\x03\x04"


def read_checkpoint(path: Path) -> Any:
    """The file's object: a mapping (usually nested) whose leaves are tensors or metadata."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "file not found"
        raise BenchError(f"{printable(path)}: {what}")
    kind = _kind(path)
    if kind == "safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise BenchError(f"{printable(path)}: unreadable or truncated safetensors file "
                             f"({first_sentence(exc)})") from None  # fmt: skip
    if kind == "pickle":
        return _numpy_to_torch(safe_load(path))
    return _read_torch(path)


def _kind(path: Path) -> str:
    """By suffix; a file with another suffix by its first bytes (safetensors starts with an
    8-byte header length and a JSON object; anything else goes to torch.load)."""
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    with path.open("rb") as f:
        head = f.read(10)
    if not head.startswith(_ZIP_MAGIC) and head[8:10] == b'{"':
        return "safetensors"
    return "torch"


def _read_torch(path: Path) -> Any:
    return torch_load_safe(path, "or truncated torch file", allow=[argparse.Namespace])


def _numpy_to_torch(obj: Any) -> Any:
    """numpy arrays (detectron2 pickles) -> tensors, through the same nested containers."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))  # a copy: the unpickled buffer is read-only
    if isinstance(obj, dict):
        return {k: _numpy_to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_numpy_to_torch(v) for v in obj)
    return obj
