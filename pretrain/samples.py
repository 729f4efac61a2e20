"""The sample figures of pretraining: a fixed batch drawn once, and PNG grids of it (one row
per kind of image, one column per example)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.utils import make_grid

from benchmark.runs import atomic_write_bytes

# sample numbers of the figure batch: keyed datasets draw masks and crops from (index,
# sample), and these are far from any training sample: the figure shows the same draws always
SAMPLE_KEY = 10**12


def sample_batch(dataset: Any, count: int) -> Any:
    """The figure batch: `count` items keyed (i, SAMPLE_KEY + i), collated as a loader would."""
    items = [dataset[(i % len(dataset), SAMPLE_KEY + i)] for i in range(count)]
    return torch.utils.data.default_collate(items)


def save_grid(path: Path, rows: Sequence[torch.Tensor], padding: int = 2) -> Path:
    """Write rows of images (each (B, 3, H, W), values in [0, 1]) as one PNG, atomically.

    Rows are e.g. input / masked input / prediction / prediction pasted into the context.
    """
    if not rows:
        raise ValueError("save_grid needs at least one row")
    n = rows[0].shape[0]
    stacked = torch.cat([r.detach().float().cpu().clamp(0, 1) for r in rows], dim=0)
    grid = make_grid(stacked, nrow=n, padding=padding, pad_value=1.0)
    pixels = (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
