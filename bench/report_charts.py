"""The low-shot chart of a report: test mAP against positives per class, one line per encoder.

Kept apart from `bench.report` (which builds the numbers) so that the report module stays
about tables; this module only draws what it is given.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LowShotCurve:
    """One encoder recipe's low-shot results on one layer: for each number of positives per
    class k, the value (mAP in [0, 1]) of every run (seed) of the recipe."""

    label: str
    source: str
    layer: str
    points: dict[int, list[float]] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)  # run folders behind the curve


def low_shot_chart(curves: list[LowShotCurve]) -> bytes:
    """PNG bytes: one panel per layer, x = positives per class (log2), y = mAP (%), a line
    per encoder at the seeds' mean with mean ± sample std shaded where there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(c.layer for c in curves))
    fig, axes = plt.subplots(
        1, len(layers), figsize=(5.0 * len(layers) + 1.0, 4.0), squeeze=False, sharey=True
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(f"{c.label} ({c.source})" for c in curves))
    for ax, layer in zip(axes[0], layers):
        for curve in (c for c in curves if c.layer == layer):
            ks = sorted(curve.points)
            values = [np.asarray(curve.points[k], dtype=float) * 100 for k in ks]
            mean = np.array([v.mean() for v in values])
            std = np.array([v.std(ddof=1) if v.size > 1 else 0.0 for v in values])
            name = f"{curve.label} ({curve.source})"
            colour = colours[labels.index(name) % len(colours)]
            ax.plot(ks, mean, marker="o", color=colour, label=name)
            if any(v.size > 1 for v in values):
                ax.fill_between(ks, mean - std, mean + std, color=colour, alpha=0.2, lw=0)
        ax.set_xscale("log", base=2)
        ticks = sorted({k for c in curves if c.layer == layer for k in c.points})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(k) for k in ticks])
        ax.set_xlabel("positives per class")
        ax.set_title(f"low-shot linear SVMs, {layer}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("VOC2007 test mAP (%)")
    axes[0][-1].legend(fontsize="small", loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
