"""Deterministic fault injection for the kill-and-resume tests.

`BENCH_FAULT=<point>[@<n>]` makes the process kill itself with SIGKILL (no cleanup, no
`finally`, exactly like `kill -9`) the n-th time it reaches <point> (default the first).
Points: `step:<iteration>` (after that training step), `write:<file name>` (half-way
through writing that file atomically). Unset, `reach` is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_counts: Counter[str] = Counter()


def reach(point: str) -> None:
    """Die here if BENCH_FAULT names this point (and this is its n-th visit)."""
    spec = os.environ.get("BENCH_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != point:
        return
    _counts[point] += 1
    if _counts[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
