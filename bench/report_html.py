"""`index.html` of a report: every table of the text files, the charts, the runs' figures, and
for every row the runs it came from (config, departures, precision, device).

The page is self-contained: its CSS is inline, its images are `data:` URIs, it has no script
and fetches nothing, so it can be mailed or opened offline. The tables are the DataFrames the
CSV and Markdown files are written from (`bench.report.main` hands them over), so the page
never shows other numbers than the files. Everything read from a file (run names, config
values, metrics, notes) is escaped: a crafted run folder cannot inject markup.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from benchmark import __version__
from benchmark.curves import CURVES_FILE
from benchmark.runs import CONFIG_FILE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_CONFIG_CHARS = 20_000  # a config.yaml larger than this is cut in the page (the link has all)
MAX_IMAGE_BYTES = 4 << 20  # a larger PNG is left out (its run folder keeps it)
OVERLAYS_PER_RUN = 4
REFERENCE_SOURCES = ("paper", "published")
MISSING = "-"


@dataclass
class Table:
    """One table of the report as the text files have it: `key` is their file stem."""

    key: str
    title: str
    frame: pd.DataFrame
    note: str = ""
    chart: bytes | None = None  # a PNG drawn from the same numbers, shown under the table


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    """A note with its `code` spans, escaped first so the markup added is the only markup."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text))


def _href(path: Path, base: Path) -> str:
    """A relative link from the report folder to `path`, percent-encoded (no scheme can
    appear: ':' is encoded) and escaped for an attribute."""
    try:
        rel = os.path.relpath(path, base)
    except ValueError:  # another drive (Windows)
        rel = str(path)
    return esc(quote(Path(rel).as_posix()))


def _image(data: bytes, alt: str) -> str:
    if not data.startswith(PNG_MAGIC) or len(data) > MAX_IMAGE_BYTES:
        return f'<p class="missing">{esc(alt)}: not a PNG of at most 4 MiB, left out</p>'
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{esc(alt)}" loading="lazy">'


def _read_png(path: Path) -> bytes | None:
    try:
        return path.read_bytes() if path.is_file() else None
    except OSError:
        return None


# ------------------------------------------------------------------------------- runs


@dataclass
class RunInfo:
    """What the page says about one run folder."""

    anchor: str
    folder: Path
    stage: str
    task: str
    method: str
    seed: str
    data: str
    device: str
    precision: str
    threads: str
    departures: list[str]
    pretrain_departures: list[str] | None
    command: str

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def kind(self) -> str:
        """What the run is, in a word: its task (transfer runs) or its stage."""
        return self.task if self.stage == "transfer" else self.stage

    @property
    def summary(self) -> str:
        n = len(self.departures)
        threads = f"{self.threads} threads" if self.threads != MISSING else MISSING
        parts = [self.device, self.precision, threads, f"{n} departure{'s' if n != 1 else ''}"]
        return " · ".join(p for p in parts if p != MISSING)


def _departures(value: Any, config: dict[str, Any]) -> list[str]:
    """Departures as lines: a dotted key gets its value from the resolved config."""
    if isinstance(value, dict):
        return [f"{k}: {v}" for k, v in value.items()]
    if not isinstance(value, list):
        return []
    out = []
    for item in value:
        if isinstance(item, str) and item in config:
            out.append(f"{item} = {config[item]}")
        else:
            out.append(str(item))
    return out


def _setting(metrics: dict[str, Any], config: dict[str, Any], key: str) -> str:
    """What the run used (metrics.json's `settings`, or the key itself), else what its config
    asked for."""
    used = metrics.get("settings") if isinstance(metrics.get("settings"), dict) else {}
    for value in (used.get(key), metrics.get(key)):
        if value not in (None, ""):
            return str(value)
    for k in (key, f"train.{key}"):
        if config.get(k) not in (None, ""):
            return f"{config[k]} (requested)"
    return MISSING


def _text(value: Any) -> str:
    """A cell from collect_runs: None and NaN (no task) as '-', a float seed as an integer."""
    if value is None or value != value or value == "":
        return MISSING
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def run_infos(runs: pd.DataFrame) -> dict[str, RunInfo]:
    """{run folder: RunInfo} for every row of `collect_runs`, anchors in folder order."""
    out: dict[str, RunInfo] = {}
    for i, (_, r) in enumerate(runs.sort_values("run").iterrows()):
        m, c = r["metrics"], r["config"]
        pre = m.get("pretrain_departures")
        out[r["run"]] = RunInfo(
            anchor=f"run-{i}",
            folder=Path(r["run"]),
            stage=_text(r["stage"]),
            task=_text(r["task"]),
            method=_text(r["method"]),
            seed=_text(r["seed"]),
            data=str(r["data_kind"]),
            device=_setting(m, c, "device"),
            precision=_setting(m, c, "precision"),
            threads=_setting(m, {}, "threads"),  # (a config's 0 is torch's default)
            departures=_departures(m.get("departures"), c),
            pretrain_departures=_departures(pre, {}) if isinstance(pre, list) else None,
            command=str(m.get("command") or ""),
        )
    return out


def _run_links(folders: Sequence[str], infos: dict[str, RunInfo]) -> str:
    """One line per kind of run (pretrain, a task): its runs as links to their entries in the
    Runs section, labelled by seed; hovering shows how each ran (device, precision,
    departures)."""
    groups: dict[str, list[RunInfo]] = {}
    for info in (infos[f] for f in folders if f in infos):
        groups.setdefault(info.kind, []).append(info)
    lines = []
    for kind, known in groups.items():
        by_seed = len({i.seed for i in known}) == len(known)
        links = " ".join(
            f'<a href="#{i.anchor}" title="{esc(i.name)}: {esc(i.summary)}">'
            f"{esc('s' + i.seed if by_seed else i.name)}</a>"
            for i in known
        )
        lines.append(f'<span class="kind">{esc(kind)}</span> {links}')
    return "<br>".join(lines)


# ------------------------------------------------------------------------------- tables


def _row_class(source: str) -> str:
    if source in REFERENCE_SOURCES:
        return ' class="ref"'
    if source.startswith("ours - "):
        return ' class="diff"'
    return ""


def _is_number(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or (cell[0] in "+-" and cell[1:2].isdigit()))


def _is_numeric_column(cells: pd.Series) -> bool:
    """Right-aligned: every cell a number or '-', at least one a number."""
    shown = [c for c in cells if c != MISSING]
    return bool(shown) and all(_is_number(c) for c in shown)


def _number_cell(cell: str) -> str:
    """'17.0 ± 0.7 (n=2) (conv5)' with a line break allowed only before each '(': a narrow
    window wraps the table's cells instead of scrolling it. The text stays the same."""
    parts = re.split(r" (?=\()", cell)
    return " ".join(f'<span class="nw">{esc(p)}</span>' for p in parts)


def table_html(table: Table, infos: dict[str, RunInfo]) -> str:
    """The table with a last "Runs" column (per-class tables: a last "Runs" row)."""
    frame = table.frame
    rows_runs = frame.attrs.get("runs")
    col_runs = frame.attrs.get("column_runs")
    head = [esc(c) for c in frame.columns] + (["Runs"] if rows_runs is not None else [])
    numeric = [_is_numeric_column(frame[c].astype(str)) for c in frame.columns]
    out = [f'<table id="t-{esc(table.key)}"><thead><tr>']
    out += [f"<th>{h}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(frame.itertuples(index=False)):
        cells = [str(v) for v in row]
        source = cells[list(frame.columns).index("Source")] if "Source" in frame.columns else ""
        out.append(f"<tr{_row_class(source)}>")
        out += [f'<td class="num">{_number_cell(c)}</td>' if numeric[j] else f"<td>{esc(c)}</td>"
                for j, c in enumerate(cells)]  # fmt: skip
        if rows_runs is not None:
            folders = rows_runs[i] if i < len(rows_runs) else []
            out.append(f'<td class="runs">{_run_links(folders, infos)}</td>')
        out.append("</tr>")
    if col_runs is not None:
        out.append('<tr class="runsrow"><td>Runs</td>')
        out += [f'<td class="runs">{_run_links(col_runs.get(c, []), infos)}</td>'
                for c in frame.columns[1:]]  # fmt: skip
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _table_section(table: Table, infos: dict[str, RunInfo]) -> str:
    parts = [f'<section id="{esc(table.key)}"><h2>{esc(table.title)}</h2>',
             f'<div class="scroll">{table_html(table, infos)}</div>']  # fmt: skip
    if table.note:
        parts.append(f'<p class="note">{_note(table.note)}</p>')
    if table.chart:
        parts.append(f"<figure>{_image(table.chart, table.title)}</figure>")
    parts.append(
        f'<p class="files">Files: <a href="{esc(quote(table.key))}.csv">{esc(table.key)}.csv</a>'
        f' · <a href="{esc(quote(table.key))}.md">{esc(table.key)}.md</a></p></section>'
    )
    return "\n".join(parts)


# ------------------------------------------------------------------------------- figures


def _figure(png: bytes, caption: str, info: RunInfo | None) -> str:
    link = f' (<a href="#{info.anchor}">run</a>)' if info else ""
    return f"<figure>{_image(png, caption)}<figcaption>{esc(caption)}{link}</figcaption></figure>"


def _curves_section(infos: dict[str, RunInfo]) -> str:
    """Each run's curves.png, grouped by kind of run (pretraining first), at its own size."""
    groups: dict[str, list[str]] = {}
    for info in sorted(infos.values(), key=lambda i: (i.stage != "pretrain", i.kind, i.name)):
        png = _read_png(info.folder / CURVES_FILE)
        if png is not None:
            groups.setdefault(info.kind, []).append(_figure(png, info.name, info))
    if not groups:
        return ""
    body = "".join(f"<details open><summary><h3>{esc(kind)} ({len(figures)} runs)</h3></summary>"
                   f'<div class="flow">{"".join(figures)}</div></details>'
                   for kind, figures in groups.items())  # fmt: skip
    note = "Every scalar a run logged (its <code>scalars.jsonl</code>) against the iteration."
    return (
        f'<section id="curves"><h2>Training curves</h2><p class="note">{note}</p>{body}</section>'
    )


def _samples_section(infos: dict[str, RunInfo]) -> str:
    pre, overlays = [], []
    for info in infos.values():
        samples = sorted((info.folder / "samples").glob("*.png"))
        if samples:  # the last one written: what training ended with
            png = _read_png(samples[-1])
            if png is not None:
                pre.append(_figure(png, f"{info.name}: {samples[-1].name}", info))
        for path in sorted((info.folder / "overlays").glob("*.png"))[:OVERLAYS_PER_RUN]:
            png = _read_png(path)
            if png is not None:
                overlays.append(_figure(png, f"{info.name}: {path.name}", info))
    parts = []
    if pre:
        parts.append("<h3>Pretraining and inpainting samples</h3><p class=\"note\">The last "
                     "sample grid each run wrote (<code>samples/</code>).</p>"
                     f'<div class="grid">{"".join(pre)}</div>')  # fmt: skip
    if overlays:
        parts.append("<h3>Segmentation overlays</h3><p class=\"note\">Image | ground truth | "
                     f"prediction, up to {OVERLAYS_PER_RUN} per run (<code>overlays/</code>).</p>"
                     f'<div class="grid">{"".join(overlays)}</div>')  # fmt: skip
    if not parts:
        return ""
    return f'<section id="samples"><h2>Samples</h2>{"".join(parts)}</section>'


# ------------------------------------------------------------------------------- runs section


def _config_text(folder: Path) -> str:
    try:
        text = (folder / CONFIG_FILE).read_text(errors="replace")
    except OSError as exc:
        return f"(unreadable: {exc.strerror})"
    if len(text) > MAX_CONFIG_CHARS:
        return text[:MAX_CONFIG_CHARS] + "\n... (cut; the linked file has all of it)"
    return text


def _list(items: list[str] | None) -> str:
    if items is None:
        return "-"
    if not items:
        return "none"
    return "<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>"


def _runs_section(infos: dict[str, RunInfo], base: Path) -> str:
    head = ["Run", "What", "Device", "Precision", "Threads", "Departures from the paper",
            "Its encoder's pretraining departures", "Config"]  # fmt: skip
    rows = []
    for info in infos.values():
        what = " · ".join(esc(p) for p in (info.stage, info.task, info.method) if p != MISSING)
        what += f"<br>seed {esc(info.seed)}, {esc(info.data)} data"
        command = f"<br><code>{esc(info.command)}</code>" if info.command else ""
        config = (
            f'<a href="{_href(info.folder / CONFIG_FILE, base)}">config.yaml</a>'
            f"<details><summary>resolved config</summary><pre>{esc(_config_text(info.folder))}"
            f"</pre></details>"
        )
        rows.append(
            f'<tr id="{info.anchor}"><td><a href="{_href(info.folder, base)}">{esc(info.name)}'
            f"</a>{command}</td><td>{what}</td><td>{esc(info.device)}</td>"
            f'<td>{esc(info.precision)}</td><td>{esc(info.threads)}</td>'
            f'<td class="deps">{_list(info.departures)}</td>'
            f'<td class="deps">{_list(info.pretrain_departures)}</td><td>{config}</td></tr>'
        )
    return (
        '<section id="runs"><h2>Runs</h2><p class="note">Every run folder the report read. '
        "Departures are the settings in which a run differs from the protocol of record "
        "(benchmark/reference/protocol.yaml: the paper's values and their sources); device, "
        "precision and threads are what the run used (not protocol, but they can move the "
        "last digit), or what its config asked for where the run did not record it.</p>"
        '<div class="scroll"><table class="runs-table"><thead><tr>'
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div></section>"
    )


# ------------------------------------------------------------------------------- page

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2329;
margin:0;background:#fafbfc}
header{background:#22313f;color:#fff;padding:18px 24px}
header h1{margin:0 0 4px;font-size:24px}
header p{margin:2px 0;color:#cfd8e0;font-size:14px}
nav{padding:8px 24px;background:#e9eef2;font-size:14px;position:sticky;top:0;z-index:1}
nav a{margin-right:14px;color:#22313f}
main{padding:8px 24px 40px}
h2{margin:28px 0 8px;font-size:20px;border-bottom:2px solid #d5dde4;padding-bottom:4px}
h3{margin:18px 0 6px;font-size:16px}
summary h3{display:inline-block;margin:12px 0 6px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;background:#fff;margin:6px 0}
th,td{border:1px solid #d5dde4;padding:3px 7px;vertical-align:top;text-align:left}
th{background:#eef2f5;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.nw{white-space:nowrap}
tr.ref td{color:#55606b;background:#f6f8fa}
tr.diff td{color:#7a4b00;background:#fff8e6;font-style:italic}
tr.runsrow td{background:#f6f8fa}
td.runs{font-size:12px;white-space:nowrap}
td:first-child{min-width:10em}
.kind{font-weight:600;color:#22313f}
.sub{color:#66727d}
.note{color:#4a5560;font-size:13px;max-width:1100px}
.files{font-size:12px;color:#66727d}
.banner{background:#fff3cd;border:1px solid #e7c96b;padding:8px 12px;margin:12px 0;
max-width:1100px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
.flow{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.flow figure{max-width:100%;box-sizing:border-box}
figure{margin:8px 0;background:#fff;border:1px solid #e1e6ea;padding:6px}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#4a5560;margin-top:4px;word-break:break-all}
pre{font-size:12px;max-height:360px;overflow:auto;background:#f6f8fa;padding:6px}
code{font-size:12px;background:#eef2f5;padding:0 3px}
td ul{margin:0;padding-left:16px}
.runs-table td{font-size:12px}
.runs-table td.deps{min-width:18em}
.missing{color:#a33}
"""


def render(
    tables: Sequence[Table], runs: pd.DataFrame, out_dir: Path, inputs: Sequence[Path]
) -> str:
    """The whole page. `runs` is `collect_runs`'s frame; tables carry `attrs["runs"]`."""
    infos = run_infos(runs)
    base = Path(out_dir).resolve()
    sections = [_table_section(t, infos) for t in tables]
    extra = [("curves", "Training curves", _curves_section(infos)),
             ("samples", "Samples", _samples_section(infos))]  # fmt: skip
    extra = [(key, title, body) for key, title, body in extra if body]
    nav = [(t.key, t.title.split(":")[0]) for t in tables] + [(k, t) for k, t, _ in extra]
    nav.append(("runs", "Runs"))
    kinds = set(runs["data_kind"])
    banner = ""
    if kinds == {"synthetic"}:
        banner = ('<p class="banner">Every run here is on the embedded synthetic dataset: the '
                  "numbers show that the pipeline works, not how the encoders compare with the "
                  "paper's.</p>")  # fmt: skip
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = ", ".join(str(p) for p in inputs)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # no network, no script: only inline styles and data: images may load
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">",
        f"<title>bench report</title><style>{CSS}</style></head><body>",
        f"<header><h1>bench report</h1><p>{len(runs)} run folders from {esc(where)}</p>"
        f"<p>bench {esc(__version__)} · written {esc(when)}</p></header>",
        "<nav>" + "".join(f'<a href="#{esc(k)}">{esc(t)}</a>' for k, t in nav) + "</nav>",
        f"<main>{banner}",
        *sections,
        *(s for _, _, s in extra),
        _runs_section(infos, base),
        "</main></body></html>",
        "",
    ])  # fmt: skip
