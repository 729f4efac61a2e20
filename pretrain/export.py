"""Encoder weights (conv1-pool5) out of a run, in our format or a framework's.

The native file, `encoder.safetensors`, holds torchvision key names (`features.N.weight`)
and the model card as JSON in its metadata; a card is also written beside every export as
`<stem>.card.json`. The other formats are converted from the native file:

- torchvision: a plain state dict (`features.N.*`), loadable into torchvision's AlexNet
  features when the encoder was trained with arch "torchvision" (CaffeNet widths differ);
- detectron2: a pickled {"model": {name: numpy array}, "__author__", "matching_heuristics":
  False} with names `backbone.features.N.*` (our backbone registered as `features`);
- mmseg: a torch file {"state_dict": {"backbone.features.N.*": tensor}, "meta": card}.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from benchmark.errors import BenchError, printable
from benchmark.runs import atomic_torch_save, atomic_write_bytes, atomic_write_json

Format = Literal["native", "torchvision", "detectron2", "mmseg"]
NATIVE_FILE = "encoder.safetensors"
CARD_KEYS = (
    "method",
    "mask",
    "iterations",
    "data",
    "config_hash",
    "arch",
    "pool_free",
    "pretrain_seconds",
)
DEFAULT_NAMES: dict[str, str] = {
    "native": NATIVE_FILE,
    "torchvision": "encoder_torchvision.pth",
    "detectron2": "encoder_detectron2.pkl",
    "mmseg": "encoder_mmseg.pth",
}
FRAMEWORK_PREFIX = "backbone."


def card_path(weights: Path) -> Path:
    """`encoder.safetensors` -> `encoder.card.json`."""
    return weights.with_name(weights.name.split(".")[0] + ".card.json")


def write_native(path: Path, state_dict: dict[str, torch.Tensor], card: dict[str, Any]) -> Path:
    """Save encoder weights + card (in the metadata and beside the file), atomically."""
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise ValueError(f"model card lacks {missing}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    data = save(tensors, metadata={"card": json.dumps(card, sort_keys=True, default=str)})
    atomic_write_bytes(Path(path), data)
    atomic_write_json(card_path(Path(path)), card)
    return Path(path)


def native_file(source: Path) -> Path:
    """A run folder or a weights file -> the native safetensors file."""
    source = Path(source)
    path = source / NATIVE_FILE if source.is_dir() else source
    if not path.is_file():
        where = (
            f"{source}: run folder has no {NATIVE_FILE}"
            if source.is_dir()
            else (f"{source}: weights file not found")
        )
        raise BenchError(where + " (did the pretrain run finish?)")
    return path


def load_native(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict with `features.N.*` keys, model card) from a native file or run folder."""
    path = native_file(path)
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise BenchError(f"{path}: not a readable safetensors file ({exc})") from None
    card = json.loads(meta["card"]) if "card" in meta else {}
    return state, card


def export(run_dir: Path, fmt: Format, out: Path | None = None, *, force: bool = False) -> Path:
    """Write the run's encoder in format `fmt` (default path inside the run folder). An
    existing file is only replaced with `force`."""
    if fmt not in DEFAULT_NAMES:
        raise BenchError(f"--format: {fmt!r} is not one of {', '.join(DEFAULT_NAMES)}")
    src = native_file(Path(run_dir))
    state, card = load_native(src)
    out = Path(out) if out is not None else src.parent / DEFAULT_NAMES[fmt]
    if out.is_dir():
        raise BenchError(f"{printable(out)}: --out is a folder; give a file name")
    same = out.exists() and out.resolve() == src.resolve()
    if out.exists() and not same and not force:
        raise BenchError(f"{printable(out)}: file exists; pass --force to overwrite it")
    if fmt == "native":
        if out.resolve() != src.resolve():
            write_native(out, state, card)
        return out
    if fmt == "torchvision":
        atomic_torch_save(out, dict(state))
    elif fmt == "detectron2":
        model = {FRAMEWORK_PREFIX + k: v.numpy() for k, v in state.items()}
        blob = {"model": model, "__author__": "bench", "matching_heuristics": False}
        atomic_write_bytes(out, pickle.dumps(blob, protocol=pickle.HIGHEST_PROTOCOL))
    elif fmt == "mmseg":
        sd = {FRAMEWORK_PREFIX + k: v for k, v in state.items()}
        atomic_torch_save(out, {"state_dict": sd, "meta": card})
    atomic_write_json(card_path(out), {**card, "format": fmt})
    return out


def key_map(state_dict: dict[str, torch.Tensor], fmt: Format) -> list[tuple[str, str]]:
    """(our key, exported key) pairs, for printing what a conversion renames."""
    prefix = FRAMEWORK_PREFIX if fmt in ("detectron2", "mmseg") else ""
    return [(k, prefix + k) for k in state_dict]
