"""Shared helpers for `benchmarks/`: timing, the machine's matmul peak, FLOP counts, tables.

Benchmarks print numbers; they never assert wall times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall times mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MatmulRate:
    """The matmul rate measured beside a workload: `once()` times one square matmul (2 n^3
    FLOPs) and keeps it; `gflops` is the median so far. Why interleaved: on a shared or
    frequency-scaled machine the rate drifts by tens of percent within a minute, so a step's
    share of it means something only against matmuls timed between its own repeats."""

    def __init__(self, device: torch.device, size: int = 2048, dtype: torch.dtype = torch.float32):
        self.device, self.size = device, size
        self.a = torch.randn(size, size, device=device, dtype=dtype)
        self.b = torch.randn(size, size, device=device, dtype=dtype)
        self.rates: list[float] = []
        for _ in range(2):
            self.a @ self.b  # warm-up
        sync(device)

    def once(self) -> float:
        tic = time.perf_counter()
        self.a @ self.b
        sync(self.device)
        rate = 2.0 * self.size**3 / (time.perf_counter() - tic) / 1e9
        self.rates.append(rate)
        return rate

    @property
    def gflops(self) -> float:
        rates = sorted(self.rates)
        return rates[len(rates) // 2]


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (e.g. forward + backward) as torch's counter sees them:
    convolutions and matmuls, counting a multiply-add as 2."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts -> a Markdown table (floats with 4 significant digits)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
