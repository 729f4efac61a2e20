"""`bench report` on fake run folders: aggregation, missing cells, differences, writers."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from bench.report import (
    REFERENCE_DIR,
    collect_runs,
    format_duration,
    latex_escape,
    load_reference,
    main,
    per_class_table,
    table1,
    table2,
    to_latex,
    to_markdown,
)
from benchmark.errors import BenchError
from pretrain.inpainting.model import HoleGeometry

CLASSES = ["aeroplane", "bicycle", "bird"]


def make_run(root: Path, name: str, metrics: dict, config: dict | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config or {"name": name, "seed": 0}))
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def transfer(task: str, method: str, value: float, seed: int = 0, **extra) -> dict:
    key = "mean_iu" if task == "segmentation" else "map"
    per_class = {c: value + 0.01 * i for i, c in enumerate(CLASSES)}
    return {
        "stage": "transfer",
        "task": task,
        "method": method,
        "seed": seed,
        "command": "bench transfer",
        "pretrain_seconds": None,
        "weights": None,
        "backend": "native",
        key: value,
        "per_class": per_class,
        # a run on real VOC data at the paper's settings, from a protocol-faithful encoder
        "synthetic": False,
        "departures": [],
        "pretrain_departures": [],
        "pretrain_synthetic": False,
        **extra,
    }


def cfg(name: str, seed: int, **extra) -> dict:
    return {"name": name, "seed": seed, "train": {"lr": 0.001}, **extra}


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for seed, v in ((0, 0.50), (1, 0.54)):
        make_run(
            root,
            f"ce-pre-{seed}",
            {
                "stage": "pretrain",
                "method": "context-encoder",
                "seed": seed,
                "mask": "random-region",
                "train_seconds": 3600.0 * (1 + seed),
                "command": "bench pretrain",
            },
            cfg(f"ce-pre-{seed}", seed),
        )
        make_run(
            root,
            f"ce-cls-{seed}",
            transfer(
                "classification", "context-encoder", v, seed, weights=str(root / f"ce-pre-{seed}")
            ),
            cfg(f"ce-cls-{seed}", seed, weights=f"ce-pre-{seed}"),
        )
    make_run(root, "ce-seg", transfer("segmentation", "context-encoder", 0.3), cfg("ce-seg", 0))
    make_run(root, "rand-cls", transfer("classification", "random", 0.4), cfg("rand-cls", 0))
    make_run(root, "other-cls", transfer("classification", "jigsaw", 0.45), cfg("other-cls", 0))
    (root / "unfinished").mkdir()
    (root / "unfinished" / "config.yaml").write_text("seed: 0\n")
    return root


def reference() -> pd.DataFrame:
    return load_reference(
        REFERENCE_DIR / "table2.csv", ("classification", "detection", "segmentation")
    )


def test_collect_runs_finds_finished_runs_recursively(runs: Path) -> None:
    df = collect_runs([runs])
    assert len(df) == 7  # the folder without metrics.json is not a finished run
    assert set(df["stage"]) == {"pretrain", "transfer"}
    # transfer runs learn their pretraining mask through the weights' run folder
    cls = df[(df["task"] == "classification") & (df["method"] == "context-encoder")]
    assert len(cls) == 2 and set(cls["mask"]) == {"random-region"}
    assert sorted(cls["pretrain_seconds"]) == [3600.0, 7200.0]


def test_unreadable_metrics_is_an_error_naming_the_file(tmp_path: Path) -> None:
    run = make_run(tmp_path, "broken", {"stage": "transfer"})
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(BenchError, match="broken/metrics.json"):
        collect_runs([tmp_path])
    (run / "metrics.json").write_text(json.dumps({"stage": "transfer", "task": "classification"}))
    with pytest.raises(BenchError, match="'method'"):
        collect_runs([tmp_path])


def _row(t: pd.DataFrame, pretraining: str, source: str) -> pd.Series:
    sel = t[(t["Pretraining"] == pretraining) & (t["Source"] == source)]
    assert len(sel) == 1, t.to_string()
    return sel.iloc[0]


def test_table2_seeds_missing_cells_and_differences(runs: Path) -> None:
    ref = reference()
    t = table2(collect_runs([runs]), ref)
    ours = _row(t, "Context encoder (ours)", "ours (bench), VOC")
    values = [0.50 * 100, 0.54 * 100]
    expected = f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f} (n=2)"
    assert ours["Classification"] == expected == "52.0 ± 2.8 (n=2)"
    assert ours["Detection"] == "-"  # no detection run
    assert ours["Segmentation"] == "30.0"
    assert ours["Pretraining time"] == "1.5 h"  # mean of the two pretraining runs
    assert ours["Supervision"] == "context"
    paper = ref[ref["method"] == "context-encoder"].iloc[0]
    diff = _row(t, "Context encoder (ours)", "ours - paper")
    assert diff["Classification"] == f"{52.0 - paper['classification']:+.1f}"
    assert diff["Segmentation"] == f"{30.0 - paper['segmentation']:+.1f}"
    assert diff["Detection"] == "-"
    # every paper row is present, with '-' where the paper has none
    assert (t["Source"] == "paper").sum() == len(ref)
    assert _row(t, "Wang et al.", "paper")["Segmentation"] == "-"
    assert _row(t, "Random Gaussian", "ours (bench), VOC")["Classification"] == "40.0"
    # a method without a paper row is listed after the paper's
    other = _row(t, "jigsaw", "ours (bench), VOC")
    assert other["Classification"] == "45.0" and t.index[-1] == other.name
    assert _row(t, "ImageNet", "paper")["Classification"] == f"{ref.iloc[0]['classification']:.1f}"


def test_table2_splits_rows_by_differing_settings(tmp_path: Path) -> None:
    for seed in (0, 1):
        for frm in ("all", "pool5"):
            make_run(
                tmp_path,
                f"{frm}-{seed}",
                transfer("classification", "autoencoder", 0.3 + seed * 0.02),
                cfg(f"{frm}-{seed}", seed, train_from=frm),
            )
    t = table2(collect_runs([tmp_path]), reference())
    a = _row(t, "Autoencoder [train_from=all]", "ours (bench), VOC")
    b = _row(t, "Autoencoder [train_from=pool5]", "ours (bench), VOC")
    assert a["Classification"] == b["Classification"] == "31.0 ± 1.4 (n=2)"


def test_synthetic_or_off_protocol_runs_get_no_difference_to_the_paper(tmp_path: Path) -> None:
    make_run(tmp_path, "syn", transfer("classification", "random", 0.4, synthetic=True),
             cfg("syn", 0))  # fmt: skip
    short = transfer("detection", "random", 0.1, departures=["train.iterations", "train.lr"])
    make_run(tmp_path, "short", short, cfg("short", 0))
    make_run(tmp_path, "voc", transfer("segmentation", "random", 0.2), cfg("voc", 0))
    t = table2(collect_runs([tmp_path]), reference())
    assert _row(t, "Random Gaussian", "ours (bench), synthetic data")["Classification"] == "40.0"
    # the VOC row mixes a protocol run (segmentation) and a shortened one (detection): the
    # difference only for segmentation, and a line saying how many departures and which
    voc = _row(t, "Random Gaussian", "ours (bench), VOC")
    assert voc["Detection"] == "10.0" and voc["Segmentation"] == "20.0"
    diff = _row(t, "Random Gaussian", "ours - paper")
    assert diff["Detection"] == "-" and diff["Segmentation"] == f"{20.0 - 19.8:+.1f}"
    off = _row(t, "Random Gaussian", "ours: 2 departures")
    assert off["Detection"] == "train.iterations, train.lr" and off["Segmentation"] == "none"
    assert off["Classification"] == "-"
    # synthetic rows get neither line
    assert list(t["Source"]).count("ours - paper") == 1
    assert t["Source"].str.startswith("ours:").sum() == 1


def test_departures_of_the_pretraining_and_run_settings_beside_each_row(tmp_path: Path) -> None:
    enc = {"departures": [], "pretrain_departures": ["train.iterations"],
           "settings": {"device": "cuda:0", "precision": "bf16", "threads": 8, "processes": 2},
           "pretrain_settings": {"device": "cpu", "precision": "fp32", "threads": 2}}  # fmt: skip
    make_run(tmp_path, "ce", transfer("classification", "context-encoder", 0.5, **enc),
             cfg("ce", 0))  # fmt: skip
    make_run(tmp_path, "old", transfer("detection", "random", 0.4, device="cpu",
                                       precision="fp32"), cfg("old", 0))  # fmt: skip
    t = table2(collect_runs([tmp_path]), reference())
    ce = _row(t, "Context encoder (ours)", "ours (bench), VOC")
    both = "cuda, bf16, 8 threads, 2 processes; pretraining cpu, fp32, 2 threads"
    assert ce["Run settings"] == both
    off = _row(t, "Context encoder (ours)", "ours: 1 departure")
    assert off["Classification"] == "pretraining.train.iterations"
    assert _row(t, "Random Gaussian", "ours (bench), VOC")["Run settings"] == "cpu, fp32"
    assert _row(t, "Random Gaussian", "ours - paper")["Detection"] == f"{40.0 - 43.4:+.1f}"
    assert t[t["Source"] == "paper"]["Run settings"].eq("-").all()


def test_released_weights_rows_sit_beside_the_paper_number(tmp_path: Path) -> None:
    make_run(tmp_path, "ce-released",
             transfer("classification", "context-encoder", 0.55, imported=True,
                      pretrain_departures=None, pretrain_synthetic=None, arch="caffenet"),
             cfg("ce-released", 0, weights="ce_features.safetensors"))  # fmt: skip
    t = table2(collect_runs([tmp_path]), reference())
    row = _row(t, "Context encoder (ours)", "released weights, VOC")
    assert row["Classification"] == "55.0" and row["Pretraining time"] == "-"
    diff = _row(t, "Context encoder (ours)", "ours - paper")
    assert diff["Classification"] == f"{55.0 - 56.5:+.1f}"
    from bench.report import table2_extended

    x = table2_extended(collect_runs([tmp_path]), reference())
    assert "Encoder" in x.columns and "SVM, best layer" in x.columns
    assert x[x["Source"] == "released weights, VOC"].iloc[0]["Encoder"] == "caffenet"


def test_per_class_table_and_markdown(runs: Path) -> None:
    pc = per_class_table(collect_runs([runs]), "classification")
    assert list(pc.index) == [*CLASSES, "mean"]
    assert list(pc.columns) == ["context-encoder", "jigsaw", "random"]
    assert pc.loc["bicycle", "context-encoder"] == pytest.approx((0.51 + 0.55) / 2 * 100)
    assert pc.loc["mean", "context-encoder"] == pytest.approx(52.0)
    assert per_class_table(collect_runs([runs]), "detection").empty
    md = to_markdown(pd.DataFrame({"a": ["x|y"], "b": ["1.0"]}))
    assert md.splitlines()[1] == "| --- | ---: |" and "x\\|y" in md


def test_main_writes_all_files_and_refuses_to_overwrite(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    text = main([runs], out)
    assert "Table 2" in text and "52.0 ± 2.8 (n=2)" in text and "Table 1" not in text
    for name in (
        "table2.csv",
        "table2.tex",
        "table2.md",
        "per_class_classification.csv",
        "per_class_classification.md",
        "per_class_classification.png",
        "per_class_segmentation.png",
    ):
        assert (out / name).is_file(), name
    assert not (out / "table1.csv").exists() and not (out / "per_class_detection.csv").exists()
    csv = pd.read_csv(out / "table2.csv", dtype=str, keep_default_na=False)
    assert list(csv.columns)[:4] == ["Pretraining", "Source", "Supervision", "Pretraining time"]
    from PIL import Image

    with Image.open(out / "per_class_classification.png") as im:
        im.load()
        assert im.format == "PNG" and im.width > 100
    with pytest.raises(BenchError, match="table2.csv: report file exists"):
        main([runs], out)
    assert "Table 2" in main([runs], out, force=True)


def test_main_on_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="no finished run folders"):
        main([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(BenchError, match="no such folder"):
        main([tmp_path / "missing"], tmp_path / "out")


def inpaint(method: str, l1: float, l2: float, p: float, seed: int = 0) -> dict:
    return {
        "stage": "inpaint-eval",
        "method": method,
        "seed": seed,
        "command": "bench inpaint",
        "mean_l1": l1,
        "mean_l2": l2,
        "psnr": p,
        "images": 20,
        "synthetic": False,
        "departures": [],
        "pretrain_departures": [],
        "eval_crop": "resize",
    }


def test_table1_rows_and_differences(tmp_path: Path) -> None:
    make_run(tmp_path, "hog", inpaint("nn-hog", 0.2, 0.07, 12.5))
    make_run(tmp_path, "joint0", inpaint("context-encoder-joint", 0.10, 0.02, 18.0), cfg("j0", 0))
    make_run(
        tmp_path, "joint1", inpaint("context-encoder-joint", 0.12, 0.02, 19.0, 1), cfg("j1", 1)
    )
    paper = HoleGeometry().label()  # what `bench inpaint evaluate` writes by default
    l2_metrics = inpaint("context-encoder-l2", 0.11, 0.019, 18.5)
    make_run(tmp_path, "l2", {**l2_metrics, "geometry": paper})
    ref = load_reference(REFERENCE_DIR / "table1.csv", ("mean_l1", "mean_l2", "psnr"))
    t = table1(collect_runs([tmp_path]), ref)
    hog = t[t["Source"] == "ours (nn-hog), real"].iloc[0]
    # metrics.json from before `geometry`: the code hole was the only one then
    expected = "resize 128 + centre crop; code hole, scored on the 64x64 prediction"
    assert hog["Evaluation"] == expected
    l2 = t[t["Source"] == "ours (context-encoder-l2), real"].iloc[0]
    assert l2["Evaluation"] == (
        "resize 128 + centre crop; paper geometry: 64x64 hole, 78x78 prediction (overlap 7 px); "
        "scored on the 64x64 hole"
    )
    assert hog["Mean L1 (%)"] == "20.00" and hog["PSNR (dB)"] == "12.50" and hog["Images"] == "20"
    hog_ref = ref[ref["method"] == "nn-hog"].iloc[0]
    diff = t[(t["Method"] == hog["Method"]) & (t["Source"] == "ours - paper")].iloc[0]
    assert diff["PSNR (dB)"] == f"{12.5 - hog_ref['psnr']:+.2f}"
    joint = t[t["Source"] == "ours (context-encoder-joint), real"].iloc[0]
    assert joint["PSNR (dB)"] == "18.50 ± 0.71 (n=2)"
    assert t[t["Source"] == "ours (nn-ce), real"].empty  # no run: only the paper row
    assert t.iloc[-1]["Source"] == "ours (context-encoder-l2), real"  # no paper row: last
    assert not t["Source"].str.startswith("ours:").any()
    text = main([tmp_path], tmp_path / "out")
    assert "Table 1" in text and (tmp_path / "out" / "table1.tex").is_file()


def test_format_duration_and_latex_escape() -> None:
    assert format_duration(0.2) == "< 1 s"
    assert format_duration(42) == "42 s"
    assert format_duration(90) == "1.5 min"
    assert format_duration(14 * 3600) == "14.0 h"
    assert format_duration(3 * 86400) == "3.0 days"
    assert format_duration(float("nan")) == "-"
    assert latex_escape("a_b & 5% < 1 ± #") == r"a\_b \& 5\% \textless{} 1 $\pm$ \#"


def test_latex_is_booktabs_and_groups_rows() -> None:
    t = pd.DataFrame({"Name": ["x", "x", "y"], "v": ["1.0", "+0.5", "-"]})
    tex = to_latex(t, "Name")
    assert "\\begin{tabular}{lr}" in tex
    assert tex.count("\\midrule") == 2 and "\\toprule" in tex and "\\bottomrule" in tex
    assert " & $+$0.5 \\\\" in tex  # repeated group name left blank, a real plus sign
    assert latex_escape("-13.3") == "$-$13.3" and latex_escape("-") == "-"


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_latex_tables_compile(runs: Path, tmp_path: Path) -> None:
    make_run(runs, "hog", inpaint("nn-hog", 0.2, 0.07, 12.5))
    out = tmp_path / "out"
    main([runs], out)
    doc = tmp_path / "doc.tex"
    doc.write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
        f"\\input{{{out / 'table2.tex'}}}\n\n\\input{{{out / 'table1.tex'}}}\n\\end{{document}}\n"
    )
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_report_saves_segmentation_overlays(runs: Path, tmp_path: Path) -> None:
    from PIL import Image

    overlays = runs / "ce-seg" / "overlays"
    overlays.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (12, 4), (200, 0, 0)).save(overlays / name)
    out = tmp_path / "report"
    main([runs], out, overlays=2)
    saved = sorted(p.name for p in (out / "overlays" / "ce-seg").iterdir())
    assert saved == ["a.png", "b.png"]
    assert Image.open(out / "overlays" / "ce-seg" / "a.png").size == (12, 4)
    assert not (tmp_path / "plain").exists()
    main([runs], tmp_path / "plain")
    assert not (tmp_path / "plain" / "overlays").exists()


def test_table1_names_the_departures_of_a_row_on_real_images(tmp_path: Path) -> None:
    short = inpaint("context-encoder-joint", 0.1, 0.02, 18.0)
    short.update(departures=["max_images"], pretrain_departures=["train.iterations"])
    make_run(tmp_path, "joint", short)
    ref = load_reference(REFERENCE_DIR / "table1.csv", ("mean_l1", "mean_l2", "psnr"))
    t = table1(collect_runs([tmp_path]), ref)
    assert not (t["Source"] == "ours - paper").any()
    off = t[t["Source"] == "ours: 2 departures"].iloc[0]
    assert off["Evaluation"] == "max_images, training.train.iterations"
