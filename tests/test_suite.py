"""`bench run`: every step checked before the first runs, a tiny suite end to end (skip on
rerun), and a report that averages seeds of one encoder recipe but never two recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench.report import collect_runs, table2
from bench.report import load_reference as load_ref
from bench.suite import load_suite, run_suite
from benchmark.errors import ConfigError

TINY = {
    "name": "tiny",
    "device": "cpu",
    "seeds": [0, 1],
    "pretrain": {
        "random": {},
        "context-encoder": {
            "mask": "central",
            "model": {"input_size": 67},
            "train": {"iterations": 2, "batch_size": 4, "workers": 0, "sample_every": 0,
                      "threads": 1},
        },
    },
    "transfer": {
        "classification": {
            "hidden": 16, "augment": {"crop": 67}, "test": {"mode": "center"},
            "train": {"iterations": 2, "batch_size": 4, "workers": 0, "threads": 1},
        },
    },
}  # fmt: skip


def _suite(tmp_path: Path, synth: Path, **changes) -> Path:
    suite = json.loads(json.dumps(TINY))
    suite["pretrain"]["context-encoder"]["data"] = str(synth / "unlabelled")
    suite["transfer"]["classification"]["data"] = str(synth)
    for key, value in changes.items():
        node = suite
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def test_every_step_is_checked_before_the_first_runs(tmp_path, synth_root):
    path = _suite(tmp_path, synth_root, **{"transfer.classification.train.lr": -1.0})
    with pytest.raises(ConfigError, match="suite step classification-random-s0: train.lr"):
        run_suite(path, out=tmp_path / "out")
    assert not (tmp_path / "out" / "runs" / "tiny").exists() or not any(
        (tmp_path / "out" / "runs" / "tiny").iterdir()
    )
    path = _suite(tmp_path, synth_root, **{"transfer.classification.trian": {}})
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_suite(path, out=tmp_path / "out")


def test_plan_names_and_dependencies(tmp_path, synth_root):
    _, _, steps = load_suite(_suite(tmp_path, synth_root), out=tmp_path / "out")
    names = [s.name for s in steps]
    assert names[:3] == ["pretrain-random-s0", "classification-random-s0",
                         "pretrain-context-encoder-s0"]  # fmt: skip
    by_name = {s.name: s for s in steps}
    assert by_name["classification-context-encoder-s1"].needs == ("pretrain-context-encoder-s1",)
    assert by_name["classification-context-encoder-s1"].cfg.weights.endswith(
        "runs/tiny/pretrain-context-encoder-s1"
    )


@pytest.mark.slow
def test_tiny_suite_end_to_end_then_skipped_on_rerun(tmp_path, synth_root, capsys):
    path = _suite(tmp_path, synth_root)
    report = run_suite(path, out=tmp_path / "out")
    assert "Table 2" in report and "(n=2)" in report
    runs = tmp_path / "out" / "runs" / "tiny"
    assert all(
        (runs / n / "metrics.json").is_file()
        for n in (
            "pretrain-random-s0",
            "pretrain-context-encoder-s1",
            "classification-context-encoder-s1",
        )
    )
    capsys.readouterr()
    again = run_suite(path, out=tmp_path / "out")
    assert "already complete" in capsys.readouterr().err
    assert again.split("report files")[0] == report.split("report files")[0]


def _fake_run(root: Path, name: str, config: dict, metrics: dict) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_report_never_averages_two_encoder_recipes(tmp_path):
    """Two context encoders pretrained for 100 and 200 iterations, two seeds each: four
    classification runs give two rows of n=2, not one row of n=4."""
    root = tmp_path / "runs"
    values = {(100, 0): 0.40, (100, 1): 0.42, (200, 0): 0.60, (200, 1): 0.62}
    for (iters, seed), m in values.items():
        pre = _fake_run(
            root, f"pre-{iters}-s{seed}",
            {"method": "context-encoder", "seed": seed, "train": {"iterations": iters}},
            {"stage": "pretrain", "method": "context-encoder", "seed": seed,
             "train_seconds": 1.0, "mask": "random-region"},
        )  # fmt: skip
        _fake_run(
            root, f"cls-{iters}-s{seed}",
            {"seed": seed, "weights": str(pre), "train": {"iterations": 10}},
            {"stage": "transfer", "task": "classification", "method": "context-encoder",
             "seed": seed, "weights": str(pre), "map": m, "mask": "random-region"},
        )  # fmt: skip
    ref = load_ref(Path(__file__).resolve().parents[1] / "benchmark/reference/table2.csv",
                   ("classification", "detection", "segmentation"))  # fmt: skip
    table = table2(collect_runs([root]), ref)
    ours = table[table["Source"].str.startswith("ours (bench)")]
    assert sorted(ours["Classification"]) == ["41.0 ± 1.4 (n=2)", "61.0 ± 1.4 (n=2)"]
    assert all("iterations=" in label for label in ours["Pretraining"])


def test_a_suite_can_transfer_imported_weights_as_a_method(tmp_path, synth_root):
    path = _suite(tmp_path, synth_root, weights={"ce-released": "imported/ce.safetensors"})
    _, _, steps = load_suite(path, out=tmp_path / "out")
    released = [s for s in steps if s.name == "classification-ce-released-s0"]
    assert len(released) == 1 and released[0].needs == ()
    assert released[0].cfg.weights == "imported/ce.safetensors"
    assert not any(s.name.startswith("pretrain-ce-released") for s in steps)


def test_a_suite_lists_checkpoints_of_any_family_with_their_format(tmp_path, synth_root):
    weights = {"mocov2": {"path": "ckpt/moco_v2_800ep.pth.tar", "format": "moco"},
               "dino": "ckpt/dino_vits16.pth"}  # fmt: skip
    path = _suite(tmp_path, synth_root, weights=weights,
                  **{"transfer.svm": {"data": str(synth_root)}})  # fmt: skip
    _, _, steps = load_suite(path, out=tmp_path / "out")
    by_name = {s.name: s for s in steps}
    assert by_name["svm-mocov2-s0"].cfg.weights_format == "moco"
    assert by_name["classification-mocov2-s0"].cfg.weights == "ckpt/moco_v2_800ep.pth.tar"
    assert by_name["svm-dino-s0"].cfg.weights_format is None
    bad = _suite(tmp_path, synth_root, weights={"x": {"file": "a.pth"}})
    with pytest.raises(ConfigError, match=r"weights.x: a path, or a mapping"):
        load_suite(bad, out=tmp_path / "out")
    # the example suite of imported checkpoints plans (every step checked)
    example = Path(__file__).resolve().parents[1] / "configs" / "checkpoints.yaml"
    _, _, steps = load_suite(example, out=tmp_path / "out2")
    assert {s.name for s in steps} >= {"svm-mocov2-s0", "knn-mocov2-s0",
                                       "classification-mocov2-s0"}  # fmt: skip


@pytest.mark.parametrize("name", ["demo.yaml", "demo-full.yaml"])
def test_the_demo_suites_plan_and_name_their_departures(name, tmp_path):
    """The main job and its one-seed full version load, pass every step's check, and every
    step that changes a setting says so (docs/protocols.md's departure table)."""
    from benchmark.protocol import departures

    path = Path(__file__).resolve().parents[1] / "configs" / name
    suite, _, steps = load_suite(path, out=tmp_path)
    tasks = {s.name.split("-")[0] for s in steps}
    assert {"pretrain", "svm", "knn", "classification"} <= tasks
    if name == "demo.yaml":
        assert suite.seeds == [0, 1, 2] and not {"detection", "segmentation"} & tasks
    else:
        assert {"detection", "segmentation", "inpainting"} <= tasks
    for step in steps:
        if not step.name.startswith(("pretrain-random", "inpaint-eval")):  # nothing to change
            assert departures(step.cfg), step.name
