"""The report's table per encoder family: published rows with their source beside our runs
of that family, never subtracted from them; Table 2 keeps AlexNet's rows only."""

from __future__ import annotations

from test_report import make_run, transfer

from bench.report import REFERENCE_DIR, collect_runs, family_table, load_reference, main


def _resnet(task: str, value: float, seed: int = 0, **extra) -> dict:
    return {**transfer(task, "mocov2", value, seed, **extra), "family": "resnet",
            "arch": "resnet50", "imported": True}  # fmt: skip


def test_resnet_table_has_published_rows_and_ours_with_departures(tmp_path):
    root = tmp_path / "runs"
    svm = {"best_layer": "res5", "low_shot": {"res5": {"1": {"mean": 0.40}, "96": {"mean": 0.8}}}}
    make_run(root, "svm-r50", _resnet("svm", 0.85, **svm))
    make_run(root, "knn-r50", _resnet("knn", 0.70, departures=["input_size"]))
    make_run(root, "cls-alex", transfer("classification", "context-encoder", 0.56))
    df = collect_runs([root])
    assert sorted(df["family"]) == ["alexnet", "resnet", "resnet"]
    ref = load_reference(REFERENCE_DIR / "families.csv", ("svm", "k1", "k8", "k96"))
    table = family_table(df, "resnet", ref)
    published = table[table["Source"] == "published"]
    assert "MoCo v2 (MMSelfSup 200 epochs)" in set(published["Pretraining"])
    assert set(published["SVM, best layer"]) >= {"84.0 (res5)", "87.0 (res5)"}
    ours = table[table["Pretraining"] == "mocov2"]
    assert list(ours["Source"]) == ["released weights, VOC", "ours: 1 departure"]
    first = ours.iloc[0]
    assert first["SVM, best layer"] == "85.0 (res5)" and first["k-NN"] == "70.0"
    assert first["Low-shot k=1"] == "40.0 (res5)" and first["Low-shot k=8"] == "-"
    assert ours.iloc[1]["k-NN"] == "input_size" and ours.iloc[1]["SVM, best layer"] == "none"
    assert not table["Source"].str.contains("ours - ").any()  # nothing subtracted

    out = tmp_path / "report"
    main([root], out)
    assert "mocov2" not in (out / "table2.md").read_text()  # Table 2 is AlexNet's
    assert "56.0" in (out / "table2.md").read_text()  # the context encoder's row
    text = (out / "families.md").read_text()
    assert "## ResNet-50 encoders" in text and "ViT encoders" not in text
    assert (out / "family_resnet.csv").is_file() and "family_resnet" in (
        out / "index.html").read_text()  # fmt: skip


def test_resnet_table_shows_detection_ap_columns_and_mocos_published_rows(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "det-r50", _resnet("detection", 0.80, ap=0.55, ap75=0.61))
    make_run(root, "seg-r50", _resnet("segmentation", 0.0, mean_iu=0.66))
    df = collect_runs([root])
    numeric = ("svm", "k1", "k8", "k96", "detection", "detection_ap", "detection_ap75")
    ref = load_reference(REFERENCE_DIR / "families.csv", numeric)
    table = family_table(df, "resnet", ref)
    moco = table[table["Pretraining"] == "MoCo v2 (MoCo 800 epochs)"].iloc[0]
    assert (moco["Detection AP50"], moco["Detection AP"], moco["Detection AP75"]) == (
        "82.5", "57.4", "64.0")  # fmt: skip
    assert moco["SVM, best layer"] == "-" and moco["Segmentation"] == "-"
    ours = table[table["Pretraining"] == "mocov2"].iloc[0]
    assert (ours["Detection AP50"], ours["Detection AP"], ours["Detection AP75"]) == (
        "80.0", "55.0", "61.0")  # fmt: skip
    assert ours["Segmentation"] == "66.0"
