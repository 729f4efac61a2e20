"""Training curves as a PNG a person can look at, drawn from a run's `scalars.jsonl`."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from benchmark.runs import SCALARS_FILE, atomic_write_bytes

CURVES_FILE = "curves.png"


def read_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...]} from a scalars.jsonl file. Lines that are not a JSON
    object with an integer step (the torn last line of a killed process, anything else)
    are skipped: the file only feeds a plot."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in Path(path).read_bytes().decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # a process killed mid-append: a partial line
            continue
        step = row.get("step", 0) if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        for key, value in row.items():
            if key in ("step", "time") or not isinstance(value, (int, float)):
                continue
            if isinstance(value, bool) or not math.isfinite(value):
                continue
            series.setdefault(key, []).append((step, float(value)))
    return series


def write_curves(run_dir: Path) -> Path | None:
    """Plot every scalar of the run against its step into `curves.png`; None if none."""
    run_dir = Path(run_dir)
    if not (run_dir / SCALARS_FILE).is_file():
        return None
    series = read_scalars(run_dir / SCALARS_FILE)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, points) in zip(axes.flat, sorted(series.items())):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path = run_dir / CURVES_FILE
    atomic_write_bytes(path, buf.getvalue())
    return path
