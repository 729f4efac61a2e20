"""Whether a run followed the published protocol, so that a table never compares unlike with
unlike: the settings in which it departed from its stage's defaults (the paper's values), and
whether it ran on the embedded synthetic data.

Every metrics.json records both (`departures`, `synthetic`), and the report prints an
"ours - paper" difference only for runs on real data whose transfer (and, for encoders bench
pretrained, pretraining) settings are the protocol's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from benchmark.config import RUNTIME_KEYS, to_dict

# Keys that say where things are or how a run executes, not what protocol it follows.
LOCATION_KEYS = frozenset(
    {"name", "seed", "data", "weights", "sbd", "shapes", "proposals_train", "proposals_test",
     "train_data", "on_bad_data", "cache_dir", "backend", "precision", "compile",
     "channels_last", "save_overlays"}
)  # fmt: skip
SYNTH_MARKER = "synth.json"  # benchmark.datasets.synth writes it at a synthetic tree's root


def departures(cfg: Any) -> list[str]:
    """Dotted config keys whose values differ from the config class's defaults (the paper's
    values), leaving out locations, seeds, runtime settings and the keys that choose which
    of the paper's experiments a run is (a config class's `EXPERIMENT_KEYS`, e.g. `method`,
    or the loss of a Table 1 row)."""
    default = to_dict(type(cfg)())
    chosen = frozenset(getattr(type(cfg), "EXPERIMENT_KEYS", ()))
    found: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if prefix.rstrip(".") in chosen:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                if str(k) in LOCATION_KEYS or str(k) in RUNTIME_KEYS:
                    continue
                walk(a.get(k), b.get(k), f"{prefix}{k}.")
        elif a != b:
            found.append(prefix.rstrip("."))

    if not dataclasses.is_dataclass(cfg):
        raise TypeError("departures needs a config dataclass")
    walk(to_dict(cfg), default, "")
    return found


def is_synthetic(path: str | Path | None) -> bool:
    """Whether `path` (a resolved dataset folder) lies in a `bench data synth` tree."""
    if path is None:
        return True
    p = Path(path).resolve()
    return any((d / SYNTH_MARKER).is_file() for d in (p, *p.parents))
