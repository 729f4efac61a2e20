"""index.html of `bench report`: every table has its CSV's rows, rows link their runs, nothing
from a file becomes markup, and a real browser draws the page."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_report import cfg, inpaint, make_run, transfer

from bench.report import collect_runs, low_shot_curves, low_shot_table, main

EVIL = '<script>alert("x")</script>'
# tags and attributes the page may contain; anything else came from a file
TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "p", "nav",
        "a", "main", "section", "div", "table", "thead", "tbody", "tr", "th", "td", "br", "span",
        "figure", "img", "figcaption", "code", "ul", "li", "details", "summary", "pre"}  # fmt: skip
ATTRS = {"id", "class", "href", "title", "src", "alt", "loading", "lang", "charset", "name",
         "content", "http-equiv", "open"}  # fmt: skip


class Page(HTMLParser):
    """Tables (cell texts per row), links, images, tags and attributes of a page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: set[str] = set()
        self.attrs: set[str] = set()
        self.links: list[str] = []
        self.images: list[str] = []
        self.ids: set[str] = set()
        self.row_links: dict[str, list[list[str]]] = {}  # table -> per body row, its links
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._in_head = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        self.attrs.update(a)
        if "id" in a:
            self.ids.add(str(a["id"]))
        if tag == "table" and str(a.get("id", "")).startswith("t-"):
            self._table = str(a["id"])[2:]
            self.tables[self._table], self.row_links[self._table] = [], []
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr" and self._table and not self._in_head:
            self.tables[self._table].append([])
            self.row_links[self._table].append([])
        elif tag in ("td", "th") and self._table and not self._in_head:
            self._cell = []
        elif tag == "a":
            self.links.append(str(a.get("href")))
            if self._table and self.row_links[self._table] and not self._in_head:
                self.row_links[self._table][-1].append(str(a.get("href")))
        elif tag == "img":
            self.images.append(str(a.get("src")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag == "thead":
            self._in_head = False
        elif tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def svm(method: str, value: float, seed: int) -> dict:
    """An SVM probe's metrics with a low-shot table (k = 1, 2, 4 on pool5)."""
    shots = {str(k): {"mean": value * k / 4, "std": 0.01, "draws": [value * k / 4] * 2,
                      "cost": 1.0, "classes": 3, "skipped": {}} for k in (1, 2, 4)}  # fmt: skip
    out = transfer("svm", method, value, seed, device="cpu")
    out.update(per_layer={"pool5": {"map": value}}, best_layer="pool5", low_shot={"pool5": shots})
    return out


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for seed in (0, 1):
        pre = make_run(root, f"ce-pre-{seed}",
                       {"stage": "pretrain", "method": "context-encoder", "seed": seed,
                        "mask": "random-region", "train_seconds": 60.0, "precision": "bf16",
                        "departures": ["train.iterations"], "command": "bench pretrain"},
                       cfg(f"ce-pre-{seed}", seed, train={"iterations": 30}))  # fmt: skip
        (pre / "curves.png").write_bytes(png((0, 90, 200)))
        (pre / "samples").mkdir()
        (pre / "samples" / "iter_0000030.png").write_bytes(png((0, 200, 0)))
        for task, v in (("classification", 0.5), ("segmentation", 0.3)):
            make_run(root, f"ce-{task}-{seed}",
                     transfer(task, "context-encoder", v + seed / 50, seed, weights=str(pre),
                              device="cpu", precision="fp32", departures=["train.lr"]),
                     cfg(f"ce-{task}-{seed}", seed, weights=str(pre)))  # fmt: skip
        make_run(root, f"ce-svm-{seed}", svm("context-encoder", 0.4 + seed / 100, seed),
                 cfg(f"ce-svm-{seed}", seed, weights=str(pre)))  # fmt: skip
        make_run(root, f"rand-svm-{seed}", svm("random", 0.2 + seed / 100, seed),
                 cfg(f"rand-svm-{seed}", seed))  # fmt: skip
    overlays = root / "ce-segmentation-0" / "overlays"
    overlays.mkdir()
    for name in ("a.png", "b.png"):
        (overlays / name).write_bytes(png((200, 0, 0), (60, 20)))
    make_run(root, "hog", inpaint("nn-hog", 0.2, 0.07, 12.5), cfg("hog", 0))
    return root


def test_low_shot_table_averages_each_runs_draws_over_seeds(runs: Path) -> None:
    curves = low_shot_curves(collect_runs([runs]))
    assert sorted((c.label, c.layer, len(c.runs)) for c in curves) == [
        ("context-encoder", "pool5", 4),
        ("random", "pool5", 2),
    ]  # (+ 2 pretraining runs)
    table = low_shot_table(curves)
    assert list(table.columns) == ["Pretraining", "Source", "Layer", "k=1", "k=2", "k=4"]
    ce = table[table["Pretraining"] == "context-encoder"].iloc[0]
    values = [0.40 / 4 * 100, 0.41 / 4 * 100]  # per seed: its mean over draws at k=1
    assert ce["k=1"] == f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f} (n=2)"


def _csv_rows(path: Path) -> list[list[str]]:
    return pd.read_csv(path, dtype=str, keep_default_na=False).values.tolist()


def test_every_table_has_the_rows_of_its_csv(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    main([runs], out)
    page = Page((out / "index.html").read_text())
    csvs = sorted(p.stem for p in out.glob("*.csv"))
    assert csvs == sorted(["table2", "table2_extended", "probes", "low_shot", "table1",
                           "per_class_classification", "per_class_segmentation"])  # fmt: skip
    assert sorted(page.tables) == csvs
    for key in csvs:
        rows = _csv_rows(out / f"{key}.csv")
        shown = page.tables[key]
        if key.startswith("per_class_"):  # 4 decimals in the CSV, 1 on the page
            assert shown[-1][0] == "Runs"
            assert len(shown) - 1 == len(rows), key
            for got, want in zip(shown, rows):
                assert got[0] == want[0]
                for cell, value in zip(got[1:], want[1:]):
                    assert float(cell) == pytest.approx(float(value), abs=0.051), key
            continue
        assert [r[: len(rows[0])] for r in shown] == rows, key
        assert all(len(r) == len(rows[0]) + 1 for r in shown)  # plus the Runs column


def test_rows_link_their_runs_config_and_settings(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    main([runs], out)
    text = (out / "index.html").read_text()
    page = Page(text)
    t2 = page.tables["table2"]
    (ce,) = [
        i for i, r in enumerate(t2) if r[:2] == ["Context encoder (ours)", "ours (bench), VOC"]
    ]
    anchors = page.row_links["table2"][ce]  # pretraining and both tasks, both seeds
    assert len(anchors) == 6 and all(a[1:] in page.ids for a in anchors)
    for i, row in enumerate(t2):
        if row[1] == "paper":
            assert not page.row_links["table2"][i]
    assert "cpu · fp32 · 1 departure" in text and "train.lr = 0.001" in text
    assert "bf16" in text and "train.iterations = 30" in text
    configs = [unquote(h) for h in page.links if h.endswith("config.yaml")]
    assert len(configs) == len(list(runs.rglob("metrics.json")))
    for href in configs:
        assert (out / href).resolve().is_file(), href
    for key in ("probes", "low_shot"):  # every row is ours: every row links its runs
        assert page.row_links[key] and all(page.row_links[key]), key
    (ce,) = [i for i, r in enumerate(page.tables["table2_extended"]) if r[1] == "ours (bench), VOC"
             and r[0].startswith("Context")]  # fmt: skip
    assert len(page.row_links["table2_extended"][ce]) == 8  # and the SVM probes'


def test_figures_are_inline_pngs(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    main([runs], out)
    page = Page((out / "index.html").read_text())
    prefix = "data:image/png;base64,"
    assert page.images and all(src.startswith(prefix) for src in page.images)
    sizes = [Image.open(io.BytesIO(base64.b64decode(s[len(prefix) :]))).size for s in page.images]
    # charts: low-shot and two per-class; curves and samples of two pretraining runs; overlays
    assert len(sizes) == 3 + 2 + 2 + 2
    assert sizes.count((40, 20)) == 4 and sizes.count((60, 20)) == 2
    assert {"curves", "samples", "runs", "low_shot"} <= page.ids
    assert not [h for h in page.links if h.startswith(("http:", "https:", "//"))]


def test_nothing_from_a_file_becomes_markup(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    name = 'x"><img src=x onerror=alert(1)>'
    metrics = transfer("classification", EVIL, 0.5, device=EVIL, precision="<b>",
                       departures=[EVIL, "train.lr"])  # fmt: skip
    run = make_run(root, name, metrics, {"name": EVIL, "seed": 0, "train": {"lr": EVIL}})
    (run / "curves.png").write_bytes(b"<svg onload=alert(1)>")  # not a PNG: left out
    out = tmp_path / "report"
    main([root], out)
    text = (out / "index.html").read_text()
    page = Page(text)
    assert page.tags <= TAGS and page.attrs <= ATTRS
    assert "<script" not in text.lower() and "<img src=x" not in text
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert not [h for h in page.links if ":" in h]  # relative or anchors only
    assert EVIL in "".join(c for r in page.tables["table2"] for c in r)  # shown as text


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(_browser() is None, reason="no headless Chromium (make test installs it)")
def test_a_real_browser_draws_the_page(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    main([runs], out)
    shot = tmp_path / "shot.png"
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1280,4000", (out / "index.html").resolve().as_uri()]  # fmt: skip
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 4000)
        body = im.convert("RGB").crop((0, 200, 1280, 1400))  # below the header: tables
        dark = sum(body.convert("L").histogram()[:128])  # text and rules
        colours = len(im.convert("RGB").getcolors(1 << 22) or [])
    assert dark > 5000 and colours > 100, (dark, colours)
