"""`bench report`: the paper's Table 2 (VOC transfer) and Table 1 (inpainting) from run folders.

Tables are built only from the runs' `metrics.json` and `config.yaml` files plus the paper's
published numbers in `benchmark/reference/*.csv`, never from numbers in this code. Runs of one
configuration that differ only in seed are averaged (mean ± sample std, with n); runs of one
method under different transfer settings become separate rows labelled by the settings.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import benchmark
from bench.report_charts import LowShotCurve, low_shot_chart
from bench.report_html import Table as HtmlTable
from bench.report_html import render as render_html
from benchmark.config import RUNTIME_KEYS, flatten, read_yaml
from benchmark.errors import BenchError, printable
from benchmark.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    atomic_write_bytes,
    atomic_write_text,
    read_metrics,
    refuse_linked_folders,
    remove_stale_temporaries_in,
)

# Package data, so an installed wheel finds them too (pyproject: tool.setuptools.package-data).
REFERENCE_DIR = Path(benchmark.__file__).resolve().parent / "reference"  # package data

TASKS = ("classification", "detection", "segmentation")
TASK_METRIC = {"classification": "map", "detection": "map", "segmentation": "mean_iu"}
TASK_TITLE = {t: t.capitalize() for t in TASKS}
INPAINT_COLUMNS = {"mean_l1": "Mean L1 (%)", "mean_l2": "Mean L2 (%)", "psnr": "PSNR (dB)"}

# Config keys that do not make two runs different experiments: seeds are averaged over, and
# the weights path differs between seeds of one pretraining method.
IGNORED_CONFIG_KEYS = RUNTIME_KEYS | {"seed", "weights", "num_workers", "resume", "force"}
MISSING = "-"
HTML_FILE = "index.html"
ALEXNET = "alexnet"  # the family of Table 2 (runs written before metrics named a family)
# The other encoder families, each with its own table: published rows of
# reference/families.csv beside our runs of that family.
FAMILY_TITLES = {"resnet": "ResNet-50", "vit": "ViT"}


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    data = read_yaml(path, "run config", BenchError) or {}
    if not isinstance(data, dict):
        raise BenchError(f"{printable(path)}: expected a mapping of config keys")
    return flatten(data)


REQUIRED_KEYS = {
    "pretrain": ("method",),
    "transfer": ("task", "method"),
    "inpaint-eval": ("method",),
}


def _weights_info(run_dir: Path, weights: Any) -> dict[str, Any]:
    """What a transfer run's weights say about their pretraining (mask, seconds), if findable.

    Accepts a pretrain run folder or a native export with its `*.card.json` beside it; a path
    that no longer resolves just gives nothing (the transfer metrics stay authoritative).
    """
    from weights.native import read_card

    if not weights:
        return {}
    for p in (Path(str(weights)), run_dir / str(weights)):
        try:
            if p.is_dir() and (p / METRICS_FILE).is_file():
                m = read_metrics(p / METRICS_FILE)
                return {"mask": m.get("mask"), "pretrain_seconds": m.get("train_seconds")}
            if p.is_file():
                cards = [p.parent / f"{p.stem}.card.json", *sorted(p.parent.glob("*.card.json"))]
                for card in cards:
                    if card.is_file():
                        return read_card(card)
        except (OSError, BenchError):
            return {}
    return {}


def _pretraining_identity(run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """What made a transfer run's encoder, seed left out: the pretraining run's config
    (`pretrain.<key>`, found through the weights path) or the card's `pretrain_key`."""
    weights = metrics.get("weights")
    for p in (Path(str(weights)), run_dir / str(weights)) if weights else ():
        folder = p if p.is_dir() else p.parent
        if (folder / CONFIG_FILE).is_file() and (folder / METRICS_FILE).is_file():
            try:
                config = _read_config(folder / CONFIG_FILE)
            except BenchError:
                break
            return {f"pretrain.{k}": v for k, v in config.items()
                    if k.split(".")[-1] not in IGNORED_CONFIG_KEYS}  # fmt: skip
    return {"pretrain.key": metrics.get("pretrain_key")}


def collect_runs(paths: Sequence[Path]) -> pd.DataFrame:
    """One row per finished run found (recursively) under `paths`.

    A run folder holds both `metrics.json` (written last, so it means "done") and
    `config.yaml`. Columns: run, stage, task, method, mask, seed, config_key (the config
    without seed/name/weights, to group seeds of one configuration), config (flat dict),
    metrics (dict). Raises BenchError for a missing input path or an unreadable metrics.json.
    """
    rows = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise BenchError(f"{root}: no such folder")
        found = [root / METRICS_FILE] if (root / METRICS_FILE).is_file() else []
        found += sorted(p for p in root.rglob(METRICS_FILE) if p.parent != root)
        for metrics_path in found:
            run_dir = metrics_path.parent
            if not (run_dir / CONFIG_FILE).is_file():
                continue
            metrics = read_metrics(metrics_path)
            stage = metrics.get("stage")
            if not isinstance(stage, str):
                raise BenchError(f"{metrics_path}: missing key 'stage'")
            for key in REQUIRED_KEYS.get(stage, ()):
                if metrics.get(key) in (None, ""):
                    raise BenchError(f"{metrics_path}: missing key '{key}' for stage {stage}")
            config = _read_config(run_dir / CONFIG_FILE)
            linked = _weights_info(run_dir, metrics.get("weights")) if stage == "transfer" else {}
            kept = {k: v for k, v in config.items() if k.split(".")[-1] not in IGNORED_CONFIG_KEYS}
            if stage == "transfer":  # seeds of one encoder recipe group; other recipes never
                kept.update(_pretraining_identity(run_dir, metrics))
            rows.append(
                {
                    "run": str(run_dir),
                    "stage": stage,
                    "task": metrics.get("task"),
                    "method": metrics.get("method"),
                    "mask": metrics.get("mask") or linked.get("mask"),
                    "seed": metrics.get("seed", config.get("seed")),
                    "pretrain_seconds": _seconds(metrics, linked),
                    "provenance": "released" if metrics.get("imported") else "bench",
                    "data_kind": _data_kind(metrics, config),
                    "comparable": comparable(metrics),
                    "arch": metrics.get("arch") or linked.get("arch") or "",
                    "family": metrics.get("family") or ALEXNET,
                    "config_key": json.dumps(kept, sort_keys=True, default=str),
                    "config": config,
                    "metrics": metrics,
                }
            )
    columns = ["run", "stage", "task", "method", "mask", "seed", "pretrain_seconds",
               "provenance", "data_kind", "comparable", "arch", "family"]  # fmt: skip
    df = pd.DataFrame(rows, columns=[*columns, "config_key", "config", "metrics"])
    return df.drop_duplicates(subset="run").reset_index(drop=True)


def _data_kind(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    """ "synthetic" for runs on the embedded synthetic data, "real" otherwise. Runs written
    before metrics recorded it count as synthetic when their config gave no data path."""
    if "synthetic" in metrics:
        return "synthetic" if metrics["synthetic"] else "real"
    return "synthetic" if not config.get("data") else "real"


def comparable_inpainting(metrics: dict[str, Any]) -> bool:
    """Whether a Table 1 row may be set against the paper's: real held-out images, Table 1's
    evaluation settings, and (for a trained model) the paper's training settings."""
    return (
        metrics.get("synthetic") is False
        and metrics.get("departures") == []
        and metrics.get("pretrain_departures") == []
    )


def comparable(metrics: dict[str, Any]) -> bool:
    """Whether a transfer run may be set against the paper's number: real data, the transfer
    protocol's settings, and an encoder that is either released weights or pretrained by
    bench on real data with the protocol's settings."""
    if metrics.get("stage") == "inpaint-eval":
        return comparable_inpainting(metrics)
    if metrics.get("stage") != "transfer" or metrics.get("synthetic", True):
        return False
    if metrics.get("departures") != []:
        return False
    if metrics.get("imported") or metrics.get("method") in ("random", "imagenet"):
        return metrics.get("pretrain_departures") in ([], None)
    return metrics.get("pretrain_departures") == [] and metrics.get("pretrain_synthetic") is False


def departure_notes(metrics: dict[str, Any]) -> list[str]:
    """What keeps a run from the paper's protocol, one note each: its own departures from the
    protocol of record, those of the encoder's (or generator's) training, prefixed
    `pretraining.` (`training.`), and training on synthetic data. Empty for a run that
    `comparable` accepts, data aside."""
    own = metrics.get("departures")
    notes = list(own) if isinstance(own, list) else ["departures not recorded"]
    pre = metrics.get("pretrain_departures")
    if metrics.get("stage") == "inpaint-eval":
        return notes + ([f"training.{k}" for k in pre] if isinstance(pre, list)
                        else ["training: departures not recorded"])  # fmt: skip
    released = metrics.get("imported") or metrics.get("method") in ("random", "imagenet")
    if isinstance(pre, list):
        notes += [f"pretraining.{k}" for k in pre]
    elif not released:
        notes.append("pretraining: departures not recorded")
    if not released and metrics.get("pretrain_synthetic") is not False:
        notes.append("pretraining on synthetic data")
    return notes


def settings_text(settings: dict[str, Any] | None, metrics: dict[str, Any] | None = None) -> str:
    """A run's execution settings in a few words ("cpu, bf16, 2 threads"): what is not
    protocol but may move its numbers. Older runs without `settings` give what metrics.json
    has (device, precision)."""
    s, m = settings or {}, metrics or {}
    device, precision = s.get("device") or m.get("device"), s.get("precision") or m.get("precision")
    parts = [str(device).split(":")[0] if device else "", str(precision or "")]
    if s.get("threads"):
        parts.append(f"{s['threads']} thread" + ("s" if s["threads"] != 1 else ""))
    if (s.get("processes") or 1) > 1:
        parts.append(f"{s['processes']} processes")
    if s.get("backend") not in (None, "native"):
        parts.append(f"{s['backend']} backend")
    if s.get("compile"):
        parts.append("compiled")
    if s.get("channels_last") is False:
        parts.append("NCHW")
    return ", ".join(p for p in parts if p)


def _seconds(metrics: dict[str, Any], linked: dict[str, Any]) -> float:
    for value in (
        metrics.get("train_seconds") if metrics.get("stage") == "pretrain" else None,
        metrics.get("pretrain_seconds"),
        linked.get("pretrain_seconds"),
    ):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return float("nan")


# ---------------------------------------------------------------------------------------------
# Reference numbers
# ---------------------------------------------------------------------------------------------


def load_reference(path: Path, numeric: Sequence[str]) -> pd.DataFrame:
    """A reference CSV with text columns as str ('' when empty) and `numeric` as floats."""
    try:
        ref = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BenchError(f"{path}: unreadable reference table ({exc})") from None
    for col in ("method", "label", *numeric):
        if col not in ref.columns:
            raise BenchError(f"{path}: missing column '{col}'")
    for col in numeric:
        values = []
        for i, cell in enumerate(ref[col]):
            try:
                values.append(float(cell) if cell.strip() else float("nan"))
            except ValueError:
                raise BenchError(f"{path}: row {i + 2}, column '{col}': not a number") from None
        ref[col] = values
    return ref


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


@dataclass
class Stat:
    """Values of one metric over the runs (seeds) of one configuration."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else 0.0


def _number(x: Any) -> float:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return float("nan")


@dataclass
class OurRow:
    """One row of ours: a method (and mask / setting variant), where its encoder came from
    (bench pretraining or released weights) and its data, with its runs' metrics."""

    method: str
    variant: str
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # key -> metrics
    pretrain_seconds: list[float] = field(default_factory=list)
    provenance: str = "bench"  # "bench" (pretrained here) or "released" (imported weights)
    data_kind: str = "real"  # "real" or "synthetic"
    comparable: bool = False  # every run on real data with the paper's settings
    arch: str = ""
    runs: dict[str, list[str]] = field(default_factory=dict)  # key -> run folders, as results

    @property
    def label(self) -> str:
        return f"{self.method} [{self.variant}]" if self.variant else self.method

    @property
    def rescaled(self) -> bool:
        """Whether any run of the row used Krähenbühl et al.'s data-dependent init."""
        return any(m.get("rescale") for ms in self.results.values() for m in ms)

    @property
    def source(self) -> str:
        """What the row is: "released weights" or "ours (bench)", and on which data."""
        who = "released weights" if self.provenance == "released" else "ours (bench)"
        data = "synthetic data" if self.data_kind == "synthetic" else "VOC"
        return f"{who}, {data}"

    def stat(self, key: str, metric: str) -> Stat:
        vals = [_number(m.get(metric)) for m in self.results.get(key, [])]
        return Stat([v for v in vals if not math.isnan(v)])

    def comparable_at(self, key: str) -> bool:
        """Whether every run of `key` (a task, or ALL) may be set against the paper."""
        runs = self.results.get(key, [])
        return bool(runs) and all(comparable(m) for m in runs)

    def departures(self, key: str) -> list[str]:
        """`departure_notes` of the runs of `key`, over all of them."""
        return sorted({n for m in self.results.get(key, []) for n in departure_notes(m)})

    @property
    def settings(self) -> str:
        """The execution settings of the row's runs (`settings_text`), and of their
        pretraining where it ran otherwise; '-' when no run recorded any."""
        runs = [m for ms in self.results.values() for m in ms]
        own = sorted({settings_text(m.get("settings"), m) for m in runs} - {""})
        pre = sorted({settings_text(m.get("pretrain_settings")) for m in runs} - {""} - set(own))
        return "; ".join([*own, *(f"pretraining {t}" for t in pre)]) or MISSING


def _variant_labels(groups: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """Short labels naming the config keys in which several groups of runs differ."""
    configs = {key: json.loads(key) for key in groups}
    keys = sorted({k for c in configs.values() for k in c})
    differing = [k for k in keys if len({json.dumps(c.get(k)) for c in configs.values()}) > 1]
    return {
        key: ", ".join(f"{k.split('.')[-1]}={c.get(k)}" for k in differing)
        for key, c in configs.items()
    }


ALL = "all"  # result key of stages without tasks (inpaint-eval)
PRETRAIN = "pretrain"  # OurRow.runs key of the pretraining runs behind a row's encoder


def _masks(runs: pd.DataFrame) -> pd.Series:
    return runs["mask"].map(lambda m: m if isinstance(m, str) else "")


def _our_rows(df: pd.DataFrame, stage: str) -> list[OurRow]:
    """Rows of ours for one stage: one per method, split by pretraining mask when a method was
    pretrained with several, and by differing settings when one task was run several ways.

    Results are keyed by task (transfer) or ALL (inpaint-eval). A task run in one way only is
    shown in every row of its method.
    """
    by_task = stage == "transfer"
    stage_runs = df[df["stage"] == stage]
    pretrains = df[df["stage"] == "pretrain"] if by_task else df.iloc[0:0]
    out: list[OurRow] = []
    kinds = sorted(set(zip(stage_runs["provenance"], stage_runs["data_kind"])), reverse=True)
    for provenance, data_kind in kinds or [("bench", "real")]:
        runs = stage_runs[(stage_runs["provenance"] == provenance)
                          & (stage_runs["data_kind"] == data_kind)]  # fmt: skip
        for row in _method_rows(runs, pretrains, by_task):
            if not row.results:
                continue
            mine = [m for ms in row.results.values() for m in ms]
            row.provenance, row.data_kind = provenance, data_kind
            row.comparable = bool(mine) and all(comparable(m) for m in mine)
            row.arch = ", ".join(sorted({str(m.get("arch")) for m in mine if m.get("arch")}))
            out.append(row)
    return out


def _method_rows(runs: pd.DataFrame, pretrains: pd.DataFrame, by_task: bool) -> list[OurRow]:
    """`_our_rows` for one provenance and data kind."""
    out: list[OurRow] = []
    for method in sorted(set(runs["method"])):
        mine = runs[runs["method"] == method]
        pre_all = pretrains[pretrains["method"] == method]
        run_masks, pre_masks = _masks(mine), _masks(pre_all)
        masks = sorted(set(run_masks) | set(pre_masks))
        split = len([m for m in masks if m]) > 1  # label rows by mask only when it varies
        for mask in masks if split else [None]:
            if mask is None:
                sel, pre = mine, pre_all
            else:
                sel, pre = mine[run_masks == mask], pre_all[pre_masks == mask]
            if sel.empty and pre.empty:
                continue
            shared: dict[str, list[dict[str, Any]]] = {}
            variants: dict[str, dict[str, list[dict[str, Any]]]] = {}
            folders: dict[tuple[str, str], list[str]] = {}  # (variant, key) -> run folders
            keys = sorted(set(sel["task"].dropna())) if by_task else [ALL]
            for key in keys:
                part = sel[sel["task"] == key] if by_task else sel
                groups: dict[str, list[dict[str, Any]]] = {}
                where: dict[str, list[str]] = {}
                for ck, m, run in zip(part["config_key"], part["metrics"], part["run"]):
                    groups.setdefault(ck, []).append(m)
                    where.setdefault(ck, []).append(run)
                if len(groups) == 1:
                    shared[key] = next(iter(groups.values()))
                    folders[("", key)] = next(iter(where.values()))
                    continue
                for ck, label in _variant_labels(groups).items():
                    variants.setdefault(label, {})[key] = groups[ck]
                    folders[(label, key)] = where[ck]
            seconds = [s for s in pre["pretrain_seconds"] if not math.isnan(s)]
            if not seconds:
                seconds = [s for s in sel["pretrain_seconds"] if not math.isnan(s)]
            prefix = f"mask={mask}" if mask else ""
            for vlabel, res in (variants or {"": {}}).items():
                variant = ", ".join(p for p in (prefix, vlabel) if p)
                row = OurRow(method, variant, {**shared, **res}, seconds)
                row.runs = {k: folders[(vlabel if k in res else "", k)] for k in row.results}
                row.runs[PRETRAIN] = list(pre["run"])
                out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """Human-readable time like the paper's column: '45 s', '12.5 min', '3.2 h', '2.1 days'."""
    if seconds is None or math.isnan(seconds):
        return MISSING
    if seconds < 1:
        return "< 1 s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _cell(stat: Stat, scale: float, digits: int) -> str:
    if stat.n == 0:
        return MISSING
    if stat.n == 1:
        return f"{stat.mean * scale:.{digits}f}"
    return f"{stat.mean * scale:.{digits}f} ± {stat.std * scale:.{digits}f} (n={stat.n})"


def _paper_cell(value: float, digits: int) -> str:
    return MISSING if math.isnan(value) else f"{value:.{digits}f}"


def _diff_cell(stat: Stat, scale: float, paper: float, digits: int) -> str:
    if stat.n == 0 or math.isnan(paper):
        return MISSING
    return f"{stat.mean * scale - paper:+.{digits}f}"


def _text(value: Any) -> str:
    s = "" if value is None else str(value).strip()
    return s or MISSING


# ---------------------------------------------------------------------------------------------
# Table 2
# ---------------------------------------------------------------------------------------------

SETTINGS_COLUMN = "Run settings"
TABLE2_COLUMNS = [
    "Pretraining", "Source", "Supervision", "Pretraining time", *TASK_TITLE.values(),
    SETTINGS_COLUMN,
]  # fmt: skip


def departures_line(row: OurRow, keys: Sequence[str]) -> tuple[str, list[str]]:
    """The line under a row on real data that is not (everywhere) the paper's protocol: its
    Source says how many departures, and each of `keys`' cells which ('none' for a key whose
    runs are the protocol's, '-' for a key without runs)."""
    notes = {k: row.departures(k) for k in keys if row.results.get(k)}
    n = sum(len(v) for v in notes.values())
    cells = [(", ".join(notes[k]) or "none") if k in notes else MISSING for k in keys]
    return f"ours: {n} departure{'' if n == 1 else 's'}", cells


def _off_protocol(row: OurRow, keys: Sequence[str]) -> bool:
    """A row on real data some of whose runs of `keys` are not the paper's protocol."""
    ran = [k for k in keys if row.results.get(k)]
    return row.data_kind == "real" and any(not row.comparable_at(k) for k in ran)


def table2(df: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Table 2 as display strings: paper rows in the paper's order, ours and the difference
    (ours - paper, percentage points) under each, then our methods the paper does not have.

    Task columns are percent with one decimal ("mean ± std (n=k)" over seeds); '-' = missing.
    """
    ours = _our_rows(df, "transfer")
    by_method: dict[str, list[OurRow]] = {}
    for row in ours:
        by_method.setdefault(row.method, []).append(row)
    records: list[list[str]] = []
    folders: list[list[str]] = []  # the run folders behind each record
    used: set[str] = set()
    for _, ref in reference.iterrows():
        label = ref["label"]
        kind = "published" if str(ref.get("source", "")).strip() else "paper"
        records.append(
            [label, kind, _text(ref.get("supervision")), _text(ref.get("pretraining_time"))]
            + [_paper_cell(ref[t], 1) for t in TASKS]
            + [MISSING]
        )
        folders.append([])
        method = ref["method"].strip()
        for row in by_method.get(method, []) if method else []:
            used.add(method)
            name = f"{label} [{row.variant}]" if row.variant else label
            records.append(_table2_record(row, name, ref.get("supervision")))
            folders.append(row_runs(row, (PRETRAIN, *TASKS)))
            fair = [t for t in TASKS if row.comparable_at(t) and not math.isnan(ref[t])]
            if fair:  # a difference only where every run of the task is the paper's protocol
                records.append(
                    [name, f"ours - {kind}", MISSING, MISSING]
                    + [_diff_cell(row.stat(t, TASK_METRIC[t]), 100.0, ref[t], 1)
                       if t in fair else MISSING for t in TASKS]
                    + [MISSING]
                )  # fmt: skip
                folders.append([])  # (the row above links them)
            if _off_protocol(row, TASKS):
                source, cells = departures_line(row, TASKS)
                records.append([name, source, MISSING, MISSING, *cells, MISSING])
                folders.append([])
    for method in sorted(set(by_method) - used):
        for row in by_method[method]:
            if any(row.results.get(t) for t in TASKS):  # (not a probe-only method)
                records.append(_table2_record(row, row.label, None))
                folders.append(row_runs(row, (PRETRAIN, *TASKS)))
                if _off_protocol(row, TASKS):
                    source, cells = departures_line(row, TASKS)
                    records.append([row.label, source, MISSING, MISSING, *cells, MISSING])
                    folders.append([])
    return _with_runs(pd.DataFrame(records, columns=TABLE2_COLUMNS), folders)


def row_runs(row: OurRow, keys: Iterable[str]) -> list[str]:
    """The run folders behind a row's results for `keys` (tasks, probes or ALL)."""
    return [run for key in keys for run in row.runs.get(key, [])]


def _with_runs(table: pd.DataFrame, runs: list[list[str]]) -> pd.DataFrame:
    """The table with `attrs["runs"]`: per record, the run folders it was computed from, so
    the HTML report links every row to its runs without matching labels again."""
    table.attrs["runs"] = runs
    return table


def _table2_record(row: OurRow, name: str, supervision: Any) -> list[str]:
    seconds = Stat(row.pretrain_seconds).mean if row.provenance == "bench" else float("nan")
    name = f"{name} (rescaled)" if row.rescaled else name
    return [name, row.source, _text(supervision), format_duration(seconds)] + [
        _cell(row.stat(t, TASK_METRIC[t]), 100.0, 1) for t in TASKS
    ] + [row.settings]


def table2_extended(
    df: pd.DataFrame, reference: pd.DataFrame, others: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Table 2 with the encoder's architecture and the frozen-feature probes: the best layer's
    linear-SVM mAP (Goyal et al.) and the k-NN mAP on pool5, for the same rows; `others`
    adds published rows of methods the paper's table does not have (Source "published")."""
    if others is not None and not others.empty:
        reference = pd.concat([reference, others], ignore_index=True)
    base = table2(df, reference)
    rows = {(r.method, r.variant, r.source): r for r in _our_rows(df, "transfer")}
    labels = {r["label"]: str(r["method"]).strip() for _, r in reference.iterrows()}
    arch, svm, knn = [], [], []
    folders = list(base.attrs["runs"])
    current = ""
    for i, rec in base.iterrows():
        current = labels.get(rec["Pretraining"].removesuffix(" (rescaled)").split(" [")[0], current)
        row = _find_row(rows, rec, current)
        arch.append(row.arch if row is not None else MISSING)
        svm.append(_best_layer_cell(row) if row is not None else MISSING)
        knn.append(_cell(row.stat("knn", "map"), 100.0, 1) if row is not None else MISSING)
        if row is not None:
            folders[i] = folders[i] + row_runs(row, ("svm", "knn"))
    out = base.copy()
    out.insert(2, "Encoder", arch)
    out["SVM, best layer"] = svm
    out["k-NN"] = knn
    out = out[[c for c in out.columns if c != SETTINGS_COLUMN] + [SETTINGS_COLUMN]]
    return _with_runs(out, folders)


def _find_row(
    rows: dict[tuple[str, str, str], OurRow], rec: pd.Series, paper_method: str
) -> OurRow | None:
    if rec["Source"] in ("paper", "published", "ours - paper", "ours - published"):
        return None
    if rec["Source"].startswith("ours: "):  # a departures line
        return None
    name = rec["Pretraining"].removesuffix(" (rescaled)")
    variant = name.split(" [", 1)[1][:-1] if " [" in name else ""
    for (method, var, source), row in rows.items():
        if (
            source == rec["Source"]
            and var == variant
            and (method == paper_method or row.label == rec["Pretraining"])
        ):
            return row
    return None


def _best_layer_cell(row: OurRow) -> str:
    runs = row.results.get("svm", [])
    if not runs:
        return MISSING
    best = Stat([_number(m.get("map")) for m in runs])
    layers = sorted({str(m.get("best_layer")) for m in runs if m.get("best_layer")})
    return f"{_cell(best, 100.0, 1)} ({'/'.join(layers)})" if layers else _cell(best, 100.0, 1)


PROBE_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5")


def probe_table(df: pd.DataFrame) -> pd.DataFrame:
    """Frozen-feature probes per method: the linear-SVM mAP of every layer (Goyal et al.'s
    VOC07 protocol), the best layer, and the weighted k-NN mAP. Empty without probe runs."""
    records, folders = [], []
    for row in _our_rows(df, "transfer"):
        svm, knn = row.results.get("svm", []), row.stat("knn", "map")
        if not svm and not knn.n:
            continue
        cells = []
        for layer in PROBE_LAYERS:
            values = [_number((m.get("per_layer") or {}).get(layer, {}).get("map")) for m in svm]
            cells.append(_cell(Stat([v for v in values if not math.isnan(v)]), 100.0, 1))
        records.append([row.label, row.source, row.arch or MISSING, *cells,
                        _best_layer_cell(row), _cell(knn, 100.0, 1), row.settings])  # fmt: skip
        folders.append(row_runs(row, (PRETRAIN, "svm", "knn")))
    columns = ["Pretraining", "Source", "Encoder", *PROBE_LAYERS, "Best", "k-NN", SETTINGS_COLUMN]
    return _with_runs(pd.DataFrame(records, columns=columns), folders)


def low_shot_curves(df: pd.DataFrame) -> list[LowShotCurve]:
    """The SVM probes' low-shot results per encoder row and layer. A run's value at k is its
    test mAP averaged over the draws at the cost best on average (its metrics.json's
    `low_shot`, as aggregate_low_shot_svm_stats.py reports it); a row's runs are its seeds."""
    curves = []
    for row in _our_rows(df, "transfer"):
        runs = row.results.get("svm", [])
        tables = [m.get("low_shot") if isinstance(m.get("low_shot"), dict) else {} for m in runs]
        for layer in PROBE_LAYERS:
            folders = row_runs(row, (PRETRAIN, "svm"))
            curve = LowShotCurve(row.label, row.source, layer, runs=folders)
            for table in tables:
                for k, entry in (table.get(layer) or {}).items():
                    value = _number(entry.get("mean")) if isinstance(entry, dict) else math.nan
                    if str(k).isdigit() and not math.isnan(value):
                        curve.points.setdefault(int(k), []).append(value)
            if curve.points:
                curves.append(curve)
    return curves


def low_shot_table(curves: Sequence[LowShotCurve]) -> pd.DataFrame:
    """Low-shot mAP in percent: one row per encoder row and layer, one column per number of
    positives per class ("mean ± std (n=seeds)"). Empty without low-shot runs."""
    ks = sorted({k for c in curves for k in c.points})
    records = [
        [c.label, c.source, c.layer, *(_cell(Stat(c.points.get(k, [])), 100.0, 1) for k in ks)]
        for c in curves
    ]
    columns = ["Pretraining", "Source", "Layer", *(f"k={k}" for k in ks)]
    table = pd.DataFrame(records, columns=columns)
    return _with_runs(table, [c.runs for c in curves])


def per_class_table(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Per-class AP (IU for segmentation) in percent: one row per class, one column per method
    (mean over seeds), plus a last row with the runs' overall metric. Empty if no per_class."""
    rows = [r for r in _our_rows(df, "transfer") if r.results.get(task)]
    columns: dict[str, dict[str, float]] = {}
    folders: dict[str, list[str]] = {}
    classes: list[str] = []
    for row in rows:
        sums: dict[str, list[float]] = {}
        for m in row.results[task]:
            for cls, v in (m.get("per_class") or {}).items():
                if cls not in classes:
                    classes.append(cls)
                sums.setdefault(cls, []).append(_number(v))
        if not sums:
            continue
        col = {
            c: float(np.nanmean(v)) * 100 if not np.isnan(v).all() else float("nan")
            for c, v in sums.items()
        }
        col["mean"] = row.stat(task, TASK_METRIC[task]).mean * 100
        columns[row.label] = col
        folders[row.label] = row_runs(row, (task,))
    if not columns:
        return pd.DataFrame()
    table = pd.DataFrame(columns, index=[*classes, "mean"])
    table.index.name = "class"
    table.attrs["column_runs"] = folders  # per method column, its run folders
    return table


def _per_class_display(table: pd.DataFrame) -> pd.DataFrame:
    shown = table.map(lambda v: MISSING if math.isnan(v) else f"{v:.1f}")
    return shown.reset_index()


def per_class_chart(table: pd.DataFrame, title: str) -> bytes:
    """PNG bytes of a grouped bar chart: classes on x, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = table.drop(index="mean", errors="ignore")
    n_cls, n_meth = len(data.index), len(data.columns)
    width = 0.8 / max(n_meth, 1)
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.2 * n_cls * n_meth + 2)), 4.5))
    x = np.arange(n_cls)
    for i, col in enumerate(data.columns):
        ax.bar(x + (i - (n_meth - 1) / 2) * width, data[col].fillna(0).to_numpy(), width, label=col)
    ax.set_xticks(x)
    ax.set_xticklabels(data.index, rotation=60, ha="right")
    ax.set_ylabel("percent")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Table 1
# ---------------------------------------------------------------------------------------------

TABLE1_COLUMNS = [
    "Method", "Source", *INPAINT_COLUMNS.values(), "Images", "Evaluation", SETTINGS_COLUMN
]  # fmt: skip
EVAL_NAMES = {"resize": "resize 128 + centre crop", "centre": "centre crop, native size"}


def table1(df: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as display strings: paper rows, ours and the difference under each, then our
    methods without a paper row. L1/L2 in percent with two decimals, PSNR in dB."""
    ours = _our_rows(df, "inpaint-eval")
    by_method: dict[str, list[OurRow]] = {}
    for row in ours:
        by_method.setdefault(row.method, []).append(row)
    scale = {"mean_l1": 100.0, "mean_l2": 100.0, "psnr": 1.0}

    def our_record(name: str, row: OurRow) -> list[str]:
        cells = [_cell(row.stat(ALL, k), scale[k], 2) for k in INPAINT_COLUMNS]
        runs = row.results.get(ALL, [])
        images = Stat([_number(m.get("images")) for m in runs]).mean
        how = sorted({
            EVAL_NAMES.get(str(m.get("eval_crop")), "centre crop, native size")
            + "; " + str(m.get("geometry") or (  # metrics.json before `geometry` existed
                f"{m.get('hole') or 'code'} hole, scored on the 64x64 "
                + ("hole" if m.get("scored_region") == "hole" else "prediction")))
            for m in runs
        })  # fmt: skip
        return [
            name,
            f"ours ({row.method}), {'synthetic data' if row.data_kind == 'synthetic' else 'real'}",
            *cells,
            MISSING if math.isnan(images) else f"{images:.0f}",
            "; ".join(how) or MISSING,
            row.settings,
        ]

    def departures_record(name: str, row: OurRow) -> list[str]:
        """The departures of a row on real data, in its Evaluation cell."""
        source, (cell,) = departures_line(row, [ALL])
        return [name, source, *(MISSING for _ in INPAINT_COLUMNS), MISSING, cell, MISSING]

    records: list[list[str]] = []
    folders: list[list[str]] = []  # the run folders behind each record
    used: set[str] = set()
    for _, ref in reference.iterrows():
        records.append(
            [ref["label"], "paper", *(_paper_cell(ref[k], 2) for k in INPAINT_COLUMNS), "100",
             "not stated (the public evaluation: resize 128 + centre crop)", MISSING]
        )  # fmt: skip
        folders.append([])
        method = ref["method"].strip()
        for row in by_method.get(method, []) if method else []:
            used.add(method)
            name = f"{ref['label']} [{row.variant}]" if row.variant else ref["label"]
            records.append(our_record(name, row))
            folders.append(row_runs(row, (ALL,)))
            if _off_protocol(row, [ALL]):
                records.append(departures_record(name, row))
                folders.append([])
            if not row.comparable:
                continue
            folders.append([])  # (the row above links them)
            records.append(
                [
                    name,
                    "ours - paper",
                    *(_diff_cell(row.stat(ALL, k), scale[k], ref[k], 2) for k in INPAINT_COLUMNS),
                    MISSING,
                    MISSING,
                    MISSING,
                ]
            )
    for method in sorted(set(by_method) - used):
        for row in by_method[method]:
            records.append(our_record(row.label, row))
            folders.append(row_runs(row, (ALL,)))
            if _off_protocol(row, [ALL]):
                records.append(departures_record(row.label, row))
                folders.append([])
    return _with_runs(pd.DataFrame(records, columns=TABLE1_COLUMNS), folders)


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "−": "-",
    "–": "--",
    "×": r"$\times$",
}


def latex_escape(text: str) -> str:
    """Text safe in a LaTeX table cell; a signed number gets a real minus sign."""
    text = str(text)
    if len(text) > 1 and text[0] in "+-" and text[1].isdigit():
        return f"${text[0]}${text[1:]}"
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _is_numeric_column(values: Iterable[str]) -> bool:
    cells = [v for v in values if v != MISSING]
    return bool(cells) and all(v[:1] in "+-0123456789" for v in cells)


def to_latex(table: pd.DataFrame, group_column: str | None = None) -> str:
    """A booktabs `tabular` (needs only \\usepackage{booktabs}), to \\input into a paper.

    Rows that share `group_column` with the row above are drawn as one group: the repeated
    name is left blank and a \\midrule separates groups.
    """
    cols = list(table.columns)
    spec = "".join("r" if _is_numeric_column(table[c].astype(str)) else "l" for c in cols)
    lines = [
        "% Generated by `bench report`; needs \\usepackage{booktabs}.",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(latex_escape(c) for c in cols) + " \\\\",
        "\\midrule",
    ]
    previous = None
    for i, (_, row) in enumerate(table.iterrows()):
        cells = [str(v) for v in row]
        if group_column is not None:
            g = cells[cols.index(group_column)]
            if i and g != previous:
                lines.append("\\midrule")
            elif i:
                cells[cols.index(group_column)] = ""
            previous = g
        lines.append(" & ".join(latex_escape(c) for c in cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; numeric columns right-aligned."""
    cols = list(table.columns)

    def esc(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    align = ["---:" if _is_numeric_column(table[c].astype(str)) else "---" for c in cols]
    lines = ["| " + " | ".join(esc(c) for c in cols) + " |", "| " + " | ".join(align) + " |"]
    lines += [
        "| " + " | ".join(esc(v) for v in row) + " |" for row in table.itertuples(index=False)
    ]
    return "\n".join(lines) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False)


TABLE2_NOTE = (
    "Percent. Classification: VOC2007 test mAP (scikit-learn AP, as Krähenbühl et al.'s code "
    "computes it; the devkit's 11-point VOCevalcls with `ap: voc07`); Detection: VOC2007 "
    "test mAP (11-point, devkit rules); Segmentation: mean IU. Several seeds of one encoder "
    "recipe: mean ± sample std (n runs). 'ours - paper' (percentage points) appears only "
    "for tasks whose runs are on the real datasets with the transfer and pretraining "
    "settings of the protocol of record (benchmark/reference/protocol.yaml); a row on real "
    "data that departs from it is followed by an 'ours: N departures' line naming the "
    "settings per task ('pretraining.' for the encoder's). Rows on the embedded synthetic "
    "data say so in 'Source' and are not comparable with the paper's numbers. 'Run "
    "settings': device, precision, threads (and backend, processes) the runs used, which "
    "are not protocol but can move the last digit. '-' = no run / not reported."
)
PROBE_NOTE = (
    "Percent mAP on VOC2007 test of frozen features: one-vs-all linear SVMs per layer "
    "(Goyal et al. 2019: average-pooled to ~9k dimensions, cost by 3-fold cross-validation "
    "on trainval, their all-points AP); k-NN: weighted votes of the 20 nearest pool5 "
    "neighbours (cosine, temperature 0.07)."
)
LOW_SHOT_NOTE = (
    "Percent mAP on VOC2007 test of linear SVMs trained on k positives per class (and 19 "
    "negatives per positive) drawn from trainval, Goyal et al. 2019's low-shot protocol: each "
    "run's value is the mean over its independent draws at the cost best on average over them; "
    "several seeds of one encoder recipe: mean ± sample std (n runs)."
)
TABLE1_NOTE = (
    "Mean L1 / L2 over the centre patch with pixels in [-1, 1], in percent; PSNR per image on "
    "0..255, averaged. 'ours - paper' is the difference, for runs on real images at the "
    "protocol of record's settings; an 'ours: N departures' line names the settings of the "
    "others ('training.' for the generator's). '-' = not available."
)


# ---------------------------------------------------------------------------------------------
# A table per encoder family (ResNet-50, ViT; AlexNet's is Table 2)
# ---------------------------------------------------------------------------------------------

FAMILY_SHOTS = (1, 8, 96)  # low-shot columns: positives per class
FAMILY_KEYS = ("svm", "knn", *TASKS)
# Detection: the devkit's AP50 and detectron2's VOC AP (IoU 0.50:0.95) and AP75, the three
# numbers MoCo reports for its R50-C4 protocol; segmentation: mean IU.
DETECTION_COLUMNS = {"map": "Detection AP50", "ap": "Detection AP", "ap75": "Detection AP75"}
FAMILY_TASK_COLUMNS = [TASK_TITLE["classification"], *DETECTION_COLUMNS.values(),
                       TASK_TITLE["segmentation"]]  # fmt: skip
FAMILY_COLUMNS = [
    "Pretraining", "Source", "Encoder", "SVM, best layer", *(f"Low-shot k={k}" for k in
    FAMILY_SHOTS), "k-NN", *FAMILY_TASK_COLUMNS, SETTINGS_COLUMN,
]  # fmt: skip
FAMILY_PUBLISHED = ("classification", "detection", "detection_ap", "detection_ap75",
                    "segmentation")  # families.csv columns of the task cells, percent  # fmt: skip


def _low_shot_cell(row: OurRow, k: int) -> str:
    """Low-shot mAP at k positives on each run's best SVM layer (where it ran low-shot)."""
    values, layers = [], set()
    for m in row.results.get("svm", []):
        table = m.get("low_shot") if isinstance(m.get("low_shot"), dict) else {}
        layer = m.get("best_layer")
        entry = (table.get(layer) or {}).get(str(k)) if layer else None
        value = _number(entry.get("mean")) if isinstance(entry, dict) else math.nan
        if not math.isnan(value):
            values.append(value)
            layers.add(str(layer))
    if not values:
        return MISSING
    return f"{_cell(Stat(values), 100.0, 1)} ({'/'.join(sorted(layers))})"


def _published(ref: pd.Series, column: str) -> float:
    """A published row's number in `column` (NaN where the file lacks it or it is empty)."""
    value = ref.get(column, "")
    if isinstance(value, float):
        return value
    return float(value) if str(value).strip() else math.nan


def family_table(df: pd.DataFrame, family: str, reference: pd.DataFrame) -> pd.DataFrame:
    """One encoder family's table: the published rows of `reference` (families.csv) for the
    family, with their source, then our runs of the family, one row per method (and
    setting variant): the best SVM layer, low-shot at its best layer, the k-NN and the
    fine-tuning tasks, percent. No 'ours - published' line: a published row is another
    checkpoint (its own pretraining length and recipe) than the user's. A row on real data
    that departs from the protocol of record is followed by its departures, as in Table 2."""
    records: list[list[str]] = []
    folders: list[list[str]] = []
    published = reference[reference["family"] == family] if not reference.empty else reference
    for _, ref in published.iterrows():
        layer = f" ({ref['svm_layer']})" if ref["svm_layer"] else ""
        svm = MISSING if math.isnan(ref["svm"]) else f"{ref['svm']:.1f}{layer}"
        shots = [_paper_cell(ref[f"k{k}"], 1) for k in FAMILY_SHOTS]
        tasks = [_paper_cell(_published(ref, c), 1) for c in FAMILY_PUBLISHED]
        records.append([ref["label"], "published", FAMILY_TITLES[family], svm, *shots, MISSING,
                        *tasks, MISSING])  # fmt: skip
        folders.append([])
    for row in _our_rows(df[df["family"] == family], "transfer"):
        name = f"{row.label} (rescaled)" if row.rescaled else row.label
        records.append(
            [name, row.source, row.arch or MISSING, _best_layer_cell(row)]
            + [_low_shot_cell(row, k) for k in FAMILY_SHOTS]
            + [_cell(row.stat("knn", "map"), 100.0, 1)]
            + [_cell(row.stat("classification", "map"), 100.0, 1)]
            + [_cell(row.stat("detection", k), 100.0, 1) for k in DETECTION_COLUMNS]
            + [_cell(row.stat("segmentation", "mean_iu"), 100.0, 1)]
            + [row.settings]
        )
        folders.append(row_runs(row, (PRETRAIN, *FAMILY_KEYS)))
        if _off_protocol(row, FAMILY_KEYS):
            source, cells = departures_line(row, FAMILY_KEYS)
            svm, knn, cls, det, seg = cells
            records.append([name, source, MISSING, svm, *([MISSING] * len(FAMILY_SHOTS)), knn,
                            cls, det, MISSING, MISSING, seg, MISSING])  # fmt: skip
            folders.append([])
    return _with_runs(pd.DataFrame(records, columns=FAMILY_COLUMNS), folders)


FAMILY_NOTE = (
    "Percent mAP on VOC2007 test, the protocols of Table 2 and of the probes run on this "
    "family's encoders (benchmark/reference/protocol.yaml names each value a reference "
    "defines for it and each choice bench made). SVM: Goyal et al.'s linear SVMs per layer, "
    "best layer in brackets; low-shot: k positives per class, at each run's best layer. "
    "'published' rows are numbers read in a reference repository (source in "
    "benchmark/reference/families.csv: MMSelfSup's own runs of the VOC07 SVM and low-shot "
    "protocols on its 200-epoch ResNet-50 checkpoints), each for its own checkpoint: they "
    "sit beside ours and are not subtracted from them. Rows on the embedded synthetic data "
    "say so in 'Source'; a row on real data off the protocol of record is followed by its "
    "departures. Detection: Faster R-CNN R50-C4 fine-tuned on VOC07+12 trainval, tested on "
    "VOC07 test (MoCo's detectron2 protocol): AP50 by the devkit's 11-point rule, AP (IoU "
    "0.50:0.95) and AP75 as detectron2's VOC evaluator; its published rows are MoCo's "
    "(facebookresearch/moco detection/README.md). Segmentation: FCN on a dilated ResNet-50, "
    "VOC2012 train + aug, mean IU on VOC2012 val (mmsegmentation's fcn_r50-d8 VOC12aug). "
    "'-' = no run / not reported."
)
VIT_NOTE = (
    " No reference repository or paper read here reports VOC2007 numbers for a ViT under "
    "these protocols (DINO's k-NN and linear numbers are ImageNet's): no published rows."
)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _family_tables(
    df: pd.DataFrame, reference_dir: Path, files: dict[str, str | bytes], page: list[HtmlTable]
) -> str:
    """The ResNet-50 and ViT tables of the families that have runs: `family_<name>.csv`,
    `.tex`, all in `families.md`, and on the page; returns their Markdown."""
    path = reference_dir / "families.csv"
    numeric = ("svm", *(f"k{k}" for k in FAMILY_SHOTS), *FAMILY_PUBLISHED)
    reference = load_reference(path, numeric) if path.is_file() else pd.DataFrame()
    parts = []
    for family, title in FAMILY_TITLES.items():
        if not (df["family"] == family).any():
            continue
        table = family_table(df, family, reference)
        note = FAMILY_NOTE + (VIT_NOTE if family == "vit" else "")
        title = f"{title} encoders: VOC2007 probes and transfer"
        files[f"family_{family}.csv"] = to_csv(table)
        files[f"family_{family}.tex"] = to_latex(table, "Pretraining")
        parts.append(f"## {title}\n\n{to_markdown(table)}\n{note}\n")
        page.append(HtmlTable(f"family_{family}", title, table, note))
    if parts:
        files["families.md"] = "\n".join(parts)
    return "\n".join(parts)


def overlay_files(df: pd.DataFrame, limit: int) -> dict[str, bytes]:
    """Up to `limit` prediction overlays (image | ground truth | prediction) of every
    segmentation run, as `overlays/<run>/<image>.png` report files. The PNGs are the ones the
    run wrote (`save_overlays: K`); a run that wrote none contributes nothing."""
    out: dict[str, bytes] = {}
    for _, row in df[df["task"] == "segmentation"].iterrows():
        run = Path(row["run"])
        for png in sorted((run / "overlays").glob("*.png"))[:limit]:
            out[f"overlays/{run.name}/{png.name}"] = png.read_bytes()
    return out


# What the report writes (tables, per-class charts, overlays): the names whose temporary
# files a killed report leaves, removed by the next one.
REPORT_FILES = r"[\w.+=-]+\.(?:csv|tex|md|png|html|json)"


def remove_stale_report_temporaries(out_dir: Path) -> None:
    """Delete the temporary files of report files that a killed `bench report` left."""
    remove_stale_temporaries_in(out_dir, REPORT_FILES)
    overlays = Path(out_dir) / "overlays"
    if overlays.is_dir() and not overlays.is_symlink():
        for folder in overlays.iterdir():
            if folder.is_dir() and not folder.is_symlink():
                remove_stale_temporaries_in(folder, REPORT_FILES)


def main(
    inputs: Sequence[Path],
    out_dir: Path,
    force: bool = False,
    reference_dir: Path | None = None,
    overlays: int = 0,
) -> str:
    """Write Table 2, the probe and low-shot tables, per-class tables/charts, (with inpainting
    runs) Table 1, and index.html showing all of them with the runs' figures, to out_dir.

    Refuses to overwrite existing report files unless `force`. Returns the Markdown of
    Table 2 (and Table 1) for printing.
    """
    inputs = [Path(p) for p in inputs]
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BenchError(f"{printable(out_dir)}: report --out is a file, not a folder")
    reference_dir = Path(reference_dir) if reference_dir else REFERENCE_DIR
    df = collect_runs(inputs)
    if df.empty:
        names = ", ".join(str(p) for p in inputs)
        raise BenchError(
            f"{names}: no finished run folders found (a run folder holds metrics.json and "
            "config.yaml)"
        )
    ref2 = load_reference(reference_dir / "table2.csv", TASKS)
    families = df  # every family, for their own tables below
    df = df[df["family"] == ALEXNET].reset_index(drop=True)  # Table 2 and its probes
    files: dict[str, str | bytes] = {}
    page: list[HtmlTable] = []  # the same tables, for index.html
    t2 = table2(df, ref2)
    title = "Table 2: PASCAL VOC transfer"
    md2 = f"## {title}\n\n{to_markdown(t2)}\n{TABLE2_NOTE}\n"
    files.update(
        {"table2.csv": to_csv(t2), "table2.tex": to_latex(t2, "Pretraining"), "table2.md": md2}
    )
    page.append(HtmlTable("table2", title, t2, TABLE2_NOTE))
    others_path = reference_dir / "other_methods.csv"
    others = load_reference(others_path, TASKS) if others_path.is_file() else None
    t2x = table2_extended(df, ref2, others)
    title = "Table 2, extended: encoder and frozen-feature probes"
    files.update({
        "table2_extended.csv": to_csv(t2x), "table2_extended.tex": to_latex(t2x, "Pretraining"),
        "table2_extended.md": f"## {title}\n\n{to_markdown(t2x)}\n{TABLE2_NOTE}\n{PROBE_NOTE}\n",
    })  # fmt: skip
    page.append(HtmlTable("table2_extended", title, t2x, f"{TABLE2_NOTE} {PROBE_NOTE}"))
    probes = probe_table(df)
    if not probes.empty:
        title = "Frozen-feature probes (VOC2007)"
        mdp = f"## {title}\n\n{to_markdown(probes)}\n{PROBE_NOTE}\n"
        files.update({"probes.csv": to_csv(probes), "probes.tex": to_latex(probes),
                      "probes.md": mdp})  # fmt: skip
        md2 += "\n" + mdp
        page.append(HtmlTable("probes", title, probes, PROBE_NOTE))
    curves = low_shot_curves(df)
    if curves:
        shots = low_shot_table(curves)
        title = "Low-shot linear SVMs (VOC2007)"
        chart = low_shot_chart(curves)
        files.update({
            "low_shot.csv": to_csv(shots), "low_shot.tex": to_latex(shots, "Pretraining"),
            "low_shot.md": f"## {title}\n\n{to_markdown(shots)}\n{LOW_SHOT_NOTE}\n",
            "low_shot.png": chart,
        })  # fmt: skip
        page.append(HtmlTable("low_shot", title, shots, LOW_SHOT_NOTE, chart))
    family_md = _family_tables(families, reference_dir, files, page)
    if family_md:
        md2 += "\n" + family_md
    for task in TASKS:
        pc = per_class_table(df, task)
        if pc.empty:
            continue
        shown = _per_class_display(pc)
        score = "IU" if task == "segmentation" else "AP"
        title = f"Per-class {task} {score} (percent)"
        chart = per_class_chart(pc, f"VOC {task}: per-class {score} (%)")
        files[f"per_class_{task}.csv"] = pc.reset_index().to_csv(index=False, float_format="%.4f")
        files[f"per_class_{task}.md"] = f"## {title}\n\n{to_markdown(shown)}"
        files[f"per_class_{task}.png"] = chart
        page.append(HtmlTable(f"per_class_{task}", title, shown, chart=chart))
    printed = md2
    if (df["stage"] == "inpaint-eval").any():
        ref1 = load_reference(reference_dir / "table1.csv", tuple(INPAINT_COLUMNS))
        t1 = table1(df, ref1)
        title = "Table 1: inpainting"
        md1 = f"## {title}\n\n{to_markdown(t1)}\n{TABLE1_NOTE}\n"
        files.update(
            {"table1.csv": to_csv(t1), "table1.tex": to_latex(t1, "Method"), "table1.md": md1}
        )
        printed += "\n" + md1
        page.append(HtmlTable("table1", title, t1, TABLE1_NOTE))
    files[HTML_FILE] = render_html(page, families, out_dir, inputs)
    if overlays:
        files.update(overlay_files(families, overlays))
    remove_stale_report_temporaries(out_dir)
    for name in files:
        refuse_linked_folders(out_dir, out_dir / name)
    if not force:
        for name in files:
            if (out_dir / name).exists():
                raise BenchError(f"{out_dir / name}: report file exists; pass --force to overwrite")
    for name, content in files.items():
        if isinstance(content, bytes):
            atomic_write_bytes(out_dir / name, content)
        else:
            atomic_write_text(out_dir / name, content)
    return printed
