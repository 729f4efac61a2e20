"""The inpainting generator's weights file: `generator.safetensors` with its card.

Safetensors holds only tensors (and a JSON card in its metadata), so a shared generator file
can never run code when it is loaded. Building the network from it is the inpainting stage's
(`pretrain.inpainting.weights.load_generator`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmark.errors import BenchError, printable

from .native import read_safetensors, write_safetensors

GENERATOR_FILE = "generator.safetensors"


def write_generator(
    path: Path, state_dict: dict[str, torch.Tensor], card: dict[str, Any]
) -> Path:
    """Generator state dict (BatchNorm buffers included) + card, atomically."""
    return write_safetensors(path, state_dict, card)


def generator_file(weights: str | Path) -> Path:
    """A run folder or a `generator.safetensors` file -> the file (checked)."""
    path = Path(weights)
    if path.is_dir():
        path = path / GENERATOR_FILE
    if not path.is_file():
        raise BenchError(
            f"{printable(path)}: inpainting generator weights not found (give an inpainting "
            f"run folder or its {GENERATOR_FILE})"
        )
    return path


def read_generator(weights: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """(file, tensors, card) of a run folder or generator file; a card-less file has {}."""
    path = generator_file(weights)
    state, card = read_safetensors(path, "generator weights")
    return path, state, card or {}
