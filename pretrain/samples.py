"""PNG grids of inpainting samples: one row per kind of image, one column per example."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from benchmark.runs import atomic_write_bytes


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
