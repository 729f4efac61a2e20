"""End to end: `main_svm` / `main_knn` on the tiny synthetic VOC2007 with a random encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmark.config import from_dict, to_dict
from benchmark.datasets.voc import VOC_CLASSES
from benchmark.errors import ConfigError, DatasetError
from benchmark.runs import open_run
from transfer.knn.config import KNNConfig
from transfer.knn.train import default_name as default_name_knn
from transfer.knn.train import main as main_knn
from transfer.svm.config import REFERENCE_COSTS, SVMConfig
from transfer.svm.train import default_name as default_name_svm
from transfer.svm.train import main as main_svm


def small_svm(synth_root, tmp_path, **over):
    base = dict(
        data=str(synth_root / "VOCdevkit" / "VOC2007"), device="cpu", layers=("conv5", "pool5"),
        costs=(0.01, 1.0), folds=2, n_jobs=1, low_shot_sizes=(1,), low_shot_draws=2,
        low_shot_negatives=2, low_shot_layers=("pool5",), input_size=99, batch_size=8,
        workers=0, cache_dir=str(tmp_path / "cache"), on_bad_data="skip",
    )  # fmt: skip
    base.update(over)
    return SVMConfig(**base)


def test_defaults_are_the_reference():
    cfg = SVMConfig()
    assert cfg.costs == REFERENCE_COSTS and len(cfg.costs) == 26
    assert cfg.costs[:10] == (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
    assert cfg.costs[10] == 0.5**4 and cfg.costs[-1] == 0.5**19
    assert (cfg.folds, cfg.positive_weight, cfg.max_iter, cfg.tol) == (3, 2.0, 2000, 1e-4)
    assert cfg.low_shot_sizes == (1, 2, 4, 8, 16, 32, 64, 96) and cfg.low_shot_draws == 5
    # the encoder decides: AlexNet 227, conv1-pool5 and pool5 for the k-NN (features.py)
    assert cfg.input_size is None and cfg.layers is None and cfg.resize_shorter == 256
    assert (KNNConfig().k, KNNConfig().temperature, KNNConfig().layer) == (20, 0.07, None)
    # the configs round-trip through the project's YAML typing
    assert from_dict(SVMConfig, to_dict(cfg)) == cfg
    assert from_dict(KNNConfig, to_dict(KNNConfig())) == KNNConfig()
    assert default_name_svm(cfg) == "svm-random-s0"
    assert default_name_knn(KNNConfig(seed=2)) == "knn-random-k20-s2"


def test_main_svm_writes_metrics_and_reuses_features(synth_root, tmp_path):
    cfg = small_svm(synth_root, tmp_path)
    metrics = main_svm(cfg, open_run(tmp_path / "run", cfg))
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics, default=str))
    assert (metrics["stage"], metrics["task"], metrics["method"]) == ("transfer", "svm", "random")
    assert metrics["seed"] == 0 and metrics["weights"] is None
    assert set(metrics["per_layer"]) == {"conv5", "pool5"}
    for layer in metrics["per_layer"].values():
        assert set(layer["per_class"]) == set(VOC_CLASSES)
        assert set(layer["cost"]) == set(VOC_CLASSES)
        trained = [c for c, v in layer["cost"].items() if v is not None]
        assert trained and all(layer["cost"][c] in (0.01, 1.0) for c in trained)
        assert set(layer["skipped"]) == set(VOC_CLASSES) - set(trained)
        assert layer["feature"]["dim"] > 0
    assert metrics["best_layer"] in ("conv5", "pool5")
    assert metrics["map"] == metrics["per_layer"][metrics["best_layer"]]["map"]
    assert 0.0 <= metrics["map"] <= 1.0
    shot = metrics["low_shot"]["pool5"]["1"]
    assert len(shot["draws"]) == 2 and shot["cost"] in (0.01, 1.0)
    assert shot["mean"] == pytest.approx(np.mean(shot["draws"]))
    assert not metrics["feature_cache"]["train"]["hit"]
    scores = np.load(tmp_path / "run" / "scores.npz")
    assert scores["pool5"].shape == (metrics["test_images"], len(VOC_CLASSES))
    cv = json.loads((tmp_path / "run" / "svm_cv.json").read_text())
    assert len(cv["layers"]["conv5"]) == 20 and len(cv["layers"]["conv5"][0]) == 2

    again = main_svm(cfg, open_run(tmp_path / "run2", cfg))
    assert again["feature_cache"]["train"]["hit"] and again["feature_cache"]["test"]["hit"]

    def timeless(per_layer):
        drop = ("seconds", "cpu_seconds")
        return {n: {k: v for k, v in d.items() if k not in drop} for n, d in per_layer.items()}

    assert timeless(again["per_layer"]) == timeless(metrics["per_layer"])  # deterministic
    assert again["low_shot"] == metrics["low_shot"]


def test_main_svm_bad_data_and_config_errors(synth_root, tmp_path):
    cfg = small_svm(synth_root, tmp_path, on_bad_data="error", low_shot=False)
    with pytest.raises(DatasetError, match="cross-validation needs 2 of each"):
        main_svm(cfg, open_run(tmp_path / "run", cfg))
    for bad in (dict(layers=("fc6",)), dict(folds=1), dict(costs=()), dict(n_jobs=0),
                dict(low_shot_layers=("conv1",))):  # fmt: skip
        cfg = small_svm(synth_root, tmp_path, **bad)
        with pytest.raises(ConfigError):
            main_svm(cfg, open_run(tmp_path / f"bad{len(str(bad))}", cfg))


def test_main_knn_writes_metrics(synth_root, tmp_path):
    cfg = KNNConfig(data=str(synth_root / "VOCdevkit" / "VOC2007"), device="cpu", k=5,
                    input_size=99, workers=0, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    metrics = main_knn(cfg, open_run(tmp_path / "run", cfg))
    assert (metrics["task"], metrics["k"], metrics["temperature"]) == ("knn", 5, 0.07)
    assert metrics["layer"] == "pool5" and 0.0 < metrics["map"] <= 1.0
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_feature_cache_lives_under_the_results_root(synth_root, tmp_path, monkeypatch):
    """No cache_dir: the cache goes to <--out>/cache/features, whatever the current folder
    (runs are <out>/runs/<name>, or <out>/runs/<suite>/<name> in a suite)."""
    from transfer.probes.stage import feature_cache_dir

    out = tmp_path / "out"
    assert feature_cache_dir(out / "runs" / "a") == (out / "cache" / "features").resolve()
    assert feature_cache_dir(out / "runs" / "s" / "a") == (out / "cache" / "features").resolve()
    assert feature_cache_dir(tmp_path / "x" / "a") == (tmp_path / "x" / "cache" / "features")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = KNNConfig(data=str(synth_root / "VOCdevkit" / "VOC2007"), device="cpu", k=5,
                    input_size=99, workers=0)  # fmt: skip
    metrics = main_knn(cfg, open_run(out / "runs" / "knn", cfg))
    cached = sorted((out / "cache" / "features").glob("*.npz"))
    assert len(cached) == 2 and not any(cwd.iterdir())
    assert metrics["feature_cache"]["train"]["path"] in {str(p.resolve()) for p in cached}


def test_feature_cache_key_covers_every_input_of_a_feature(tmp_path):
    """The key changes with the weights (their content hash), the layer, the input size and
    resize, the input convention, the precision of the forward pass and the image list; not
    with anything else."""
    from types import SimpleNamespace

    from benchmark.input_convention import CAFFE, TORCHVISION
    from transfer.probes.features import cache_key, pool_spec

    class Images(SimpleNamespace):
        def __len__(self):
            return len(self.ids)

    (tmp_path / "a.jpg").write_bytes(b"x")
    images = Images(paths=[tmp_path / "a.jpg"], ids=["a"])
    conv5 = {"conv5": pool_spec("conv5", 256, 13)}
    base = dict(encoder_hash="w1", specs=conv5, images=images, input_size=227,
                resize_shorter=256, convention=CAFFE)  # fmt: skip
    key = cache_key(**base)[0]
    assert cache_key(**base)[0] == key
    for change in (dict(encoder_hash="w2"), dict(specs={"pool5": pool_spec("pool5", 256, 6)}),
                   dict(input_size=99), dict(resize_shorter=None),
                   dict(convention=TORCHVISION), dict(precision="bf16"),
                   dict(images=Images(paths=[tmp_path / "a.jpg"], ids=["b"]))):  # fmt: skip
        assert cache_key(**{**base, **change})[0] != key, change
