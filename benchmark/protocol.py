"""Whether a run followed the published protocol, so that a table never compares unlike with
unlike: the settings in which it departed from the protocol of record, whether it ran on the
embedded synthetic data, and the settings it ran with that are not protocol but may move its
numbers (device, precision, threads, ...).

The protocol of record is data: `benchmark/reference/protocol.yaml`, one section per stage config
class, each protocol key with the published value and where it was read. `departures(cfg)`
compares a config with that record, never with the config class's own defaults, so a default
that drifts from the paper shows up in every run that uses it (and fails
tests/test_protocol.py). Every metrics.json records `departures`, `synthetic` and `settings`;
the report prints an "ours - paper" difference only for runs on real data whose transfer (and,
for encoders bench pretrained, pretraining) settings are the protocol's, and names the
departures of the others.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmark.config import RUNTIME_KEYS, flatten, from_dict, to_dict
from benchmark.errors import BenchError, ConfigError

# Package data beside the paper's tables, so an installed wheel reads it too.
RECORD_FILE = Path(__file__).resolve().parent / "reference" / "protocol.yaml"

# Keys that say where things are or which seed a run drew, not what protocol it follows.
LOCATION_KEYS = frozenset(
    {"name", "seed", "data", "weights", "sbd", "shapes", "proposals_train", "proposals_test",
     "train_data", "on_bad_data", "cache_dir", "save_overlays"}
)  # fmt: skip
# Settings that are not the paper's but not protocol either: how a run executed, which may
# still move its numbers (bf16 rounding, another thread count's summation order, another
# backend's kernels). They never count as departures; metrics.json records them (`settings`)
# and the report shows them beside every row that used them.
SETTINGS_KEYS = frozenset({"device", "threads", "precision", "channels_last", "compile", "backend"})
SYNTH_MARKER = "synth.json"  # benchmark.datasets.synth writes it at a synthetic tree's root


@dataclass(frozen=True)
class StageRecord:
    """One stage's section of the record: protocol values (typed as the config class types
    them, in `to_dict` form), their sources, and the class's keys that are not protocol."""

    stage: str
    config: str  # "module.ClassName" of the stage's config class
    values: dict[str, Any]
    sources: dict[str, str]
    not_protocol: dict[str, str]


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.cache
def _raw_record(path: Path) -> dict[str, dict[str, Any]]:
    """The record's `stages` mapping, read once per process."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0]
        raise BenchError(f"{path}: unreadable protocol record ({first})") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict):
        raise BenchError(f"{path}: the protocol record needs a 'stages' mapping")
    return stages


def stage_record(cls: type, path: Path | None = None) -> StageRecord:
    """The record's section for config class `cls` (found by its qualified name)."""
    path = path or RECORD_FILE
    name = class_name(cls)
    found = [(stage, section) for stage, section in _raw_record(path).items()
             if isinstance(section, dict) and section.get("config") == name]  # fmt: skip
    if len(found) != 1:
        raise BenchError(f"{path}: {len(found)} stages of the protocol record have config {name}")
    stage, section = found[0]
    entries = section.get("values") or {}
    where = f"{path}: stage {stage}"
    if not isinstance(entries, dict) or not all(
        isinstance(e, dict) and set(e) == {"value", "source"} for e in entries.values()
    ):
        raise BenchError(f"{where}: every value needs exactly 'value' and 'source'")
    leaves = set(flatten(to_dict(cls())))
    stale = sorted((set(entries) | set(section.get("not_protocol") or {})) - leaves)
    if stale:
        raise BenchError(f"{where}: '{stale[0]}' is not a key of {cls.__qualname__}")
    nested: dict[str, Any] = {}
    for key, entry in entries.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = entry["value"]
    try:  # the record's values, typed by the config class (tuples, floats written as 1e-4)
        typed = flatten(to_dict(from_dict(cls, nested)))
    except ConfigError as exc:
        raise BenchError(f"{where}: {exc}") from None
    return StageRecord(
        stage=stage,
        config=name,
        values={k: typed[k] for k in entries},
        sources={k: str(e["source"]) for k, e in entries.items()},
        not_protocol=dict(section.get("not_protocol") or {}),
    )


def _outside_protocol(key: str, cls: type, record: StageRecord) -> bool:
    """Locations, runtime keys, settings, the class's experiment-choosing keys (`method`, a
    Table 1 row's loss) and the record's `not_protocol` keys of this class."""
    parts = key.split(".")
    if any(p in LOCATION_KEYS or p in RUNTIME_KEYS or p in SETTINGS_KEYS for p in parts):
        return True
    chosen = set(getattr(cls, "EXPERIMENT_KEYS", ())) | set(record.not_protocol)
    return any(".".join(parts[: i + 1]) in chosen for i in range(len(parts)))


def protocol_keys(cls: type, record: StageRecord | None = None) -> list[str]:
    """Every dotted key of config class `cls` that belongs to the protocol."""
    record = record or stage_record(cls)
    return [k for k in flatten(to_dict(cls())) if not _outside_protocol(k, cls, record)]


def record_problems(cls: type, path: Path | None = None) -> list[str]:
    """What keeps the record and config class `cls` from agreeing, one line each: protocol
    keys without a recorded value, and defaults that differ from the recorded value."""
    path = path or RECORD_FILE
    record = stage_record(cls, path)
    default = flatten(to_dict(cls()))
    problems = []
    for key in protocol_keys(cls, record):
        if key not in record.values:
            problems.append(f"{record.stage}: '{key}' has no value in {path.name}")
        elif default[key] != record.values[key]:
            problems.append(
                f"{record.stage}: the default {key} = {default[key]!r} differs from the "
                f"recorded {record.values[key]!r} ({record.sources[key]})"
            )
    problems += [
        f"{record.stage}: '{key}' is both a recorded value and not_protocol"
        for key in record.not_protocol
        if key in record.values
    ]
    return problems


def departures(cfg: Any) -> list[str]:
    """Dotted config keys whose values differ from the protocol of record, leaving out
    locations, seeds, runtime keys, `SETTINGS_KEYS` and the keys that choose which of the
    paper's experiments a run is. A protocol key the record lacks is an error: a new config
    field must say what the paper ran (tests/test_protocol.py)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError("departures needs a config dataclass")
    cls = type(cfg)
    record = stage_record(cls)
    ours = flatten(to_dict(cfg))
    found = []
    for key in protocol_keys(cls, record):
        if key not in record.values:
            raise BenchError(
                f"{RECORD_FILE}: stage {record.stage} has no value for '{key}' (add the "
                "published value and its source)"
            )
        if ours[key] != record.values[key]:
            found.append(key)
    return sorted(found)


def settings(cfg: Any, *, device: Any = None, precision: str | None = None) -> dict[str, Any]:
    """How a run executed, for metrics.json's `settings`: the device and precision it ran
    with (as resolved, when the stage knows them), torch's intra-op threads and the number of
    processes, and the config's own `SETTINGS_KEYS` (train.channels_last, backend, ...)."""
    import torch

    from benchmark.distributed import torchrun_world

    flat = flatten(to_dict(cfg))
    chosen = {k.split(".")[-1]: v for k, v in sorted(flat.items()) if k.split(".")[-1] in
              SETTINGS_KEYS}  # fmt: skip
    return {
        **chosen,
        "device": str(device) if device is not None else chosen.get("device"),
        "precision": precision if precision is not None else chosen.get("precision"),
        "threads": torch.get_num_threads(),
        "processes": torchrun_world(),
    }


def is_synthetic(path: str | Path | None) -> bool:
    """Whether `path` (a resolved dataset folder) lies in a `bench data synth` tree."""
    if path is None:
        return True
    p = Path(path).resolve()
    return any((d / SYNTH_MARKER).is_file() for d in (p, *p.parents))
