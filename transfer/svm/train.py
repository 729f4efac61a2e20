"""`bench transfer --task svm`: Goyal et al.'s linear SVMs on VOC2007 trainval -> test.

Run folder: `metrics.json` (last), `svm_cv.json` (the cross-validation AP of every class
and cost, per layer) and `scores.npz` (test image ids and each layer's (N, 20) scores).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmark.datasets.voc import VOC_CLASSES
from benchmark.errors import ConfigError
from benchmark.runs import Run
from transfer import common
from transfer.probes import stage
from transfer.probes.features import check_known_layers, check_layers, encoder_layers
from transfer.probes.svm import SVMParams, check_svm_settings, low_shot, train_svms

from .config import SVMConfig

# metrics.json's implementation of each solver (the same problem, the same optimum)
SOLVER_NAMES = {"torch": "torch-newton-cg", "liblinear": "sklearn-liblinear"}
CV_FILE = "svm_cv.json"
SCORES_FILE = stage.SCORES_FILE


def default_name(cfg: SVMConfig) -> str:
    """svm-<method>[-<mask>]-s<seed>, e.g. svm-random-s0."""
    return "-".join(common.name_parts("svm", cfg.weights)) + f"-s{cfg.seed}"


def check_config(cfg: SVMConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(layers, low-shot layers) in network order, each () where the encoder chooses (null:
    every layer it offers); ConfigError naming the key otherwise. Names are checked against
    every family's layers here, against the loaded encoder's by `svm_layers`."""
    stage.check_common(cfg)
    layers = check_known_layers(cfg.layers) if cfg.layers is not None else ()
    shot_layers: tuple[str, ...] = ()
    if cfg.low_shot:
        if cfg.low_shot_layers is not None:
            shot_layers = check_known_layers(cfg.low_shot_layers, "low_shot_layers")
        extra = [name for name in shot_layers if layers and name not in layers]
        if extra:
            raise ConfigError(f"low_shot_layers: {extra[0]} is not in layers")
        if not cfg.low_shot_sizes or min(cfg.low_shot_sizes) < 1 or cfg.low_shot_draws < 1:
            raise ConfigError("low_shot_sizes must be positive and low_shot_draws >= 1")
        if cfg.low_shot_negatives is not None and cfg.low_shot_negatives < 1:
            raise ConfigError("low_shot_negatives: must be >= 1 or null (classes - 1)")
    check_svm_settings(cfg.costs, cfg.folds, cfg.n_jobs, cfg.svm_solver)
    if cfg.max_iter < 1 or not cfg.tol > 0 or not cfg.positive_weight > 0:
        raise ConfigError("max_iter must be >= 1, tol and positive_weight > 0")
    return layers, shot_layers


def svm_layers(cfg: SVMConfig, encoder: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(layers, low-shot layers) of the loaded encoder: null = every layer it offers; a
    named layer it lacks is a one-line error (a ResNet has no pool5)."""
    known = encoder_layers(encoder)
    what = f"{getattr(encoder, 'arch', 'encoder')} layer"
    try:
        layers = check_layers(cfg.layers or known, "layers", known)
        shot: tuple[str, ...] = ()
        if cfg.low_shot:
            shot = check_layers(cfg.low_shot_layers or layers, "low_shot_layers", known)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("unknown layer", f"no {what}")) from None
    extra = [name for name in shot if name not in layers]
    if extra:
        raise ConfigError(f"low_shot_layers: {extra[0]} is not in layers")
    return layers, shot


def check(cfg: SVMConfig) -> None:
    """The stage table's check: every setting no run can use is a one-line error."""
    check_config(cfg)


def main(cfg: SVMConfig, run: Run) -> dict[str, Any]:
    """Extract (or load) features, train and test the SVMs of every layer, the low-shot
    table, write metrics.json; returns the metrics."""
    check_config(cfg)
    device = stage.setup(cfg)
    encoder, card, input_size = stage.load(cfg, "svm")
    layers, shot_layers = svm_layers(cfg, encoder)
    train, test, ftrain, ftest = stage.extract(cfg, run, encoder, input_size, layers, device)
    del encoder
    params = SVMParams(cfg.positive_weight, cfg.max_iter, cfg.tol, cfg.seed, cfg.svm_solver,
                       str(device))  # fmt: skip
    per_layer: dict[str, Any] = {}
    cv: dict[str, Any] = {"costs": list(cfg.costs), "classes": list(VOC_CLASSES), "layers": {}}
    scores: dict[str, np.ndarray] = {"ids": np.asarray(test.ids, dtype=str)}
    tick = time.perf_counter()
    for name in layers:
        result = train_svms(
            ftrain.arrays[name], train.labels, train.difficult,
            ftest.arrays[name], test.labels, test.difficult,
            costs=cfg.costs, folds=cfg.folds, params=params, difficult_as=cfg.train_difficult,
            n_jobs=cfg.n_jobs, classes=VOC_CLASSES, on_bad_data=cfg.on_bad_data,
            logger=run.logger,
        )  # fmt: skip
        main_ap = result.per_class[cfg.ap]
        per_layer[name] = {
            "map": stage.ap_or_none(result.mean(cfg.ap)),
            "map_reference": stage.ap_or_none(result.mean("reference")),
            "map_sklearn": stage.ap_or_none(result.mean("sklearn")),
            "per_class": stage.per_class_aps(main_ap),
            "per_class_reference": stage.per_class_aps(result.per_class["reference"]),
            "per_class_sklearn": stage.per_class_aps(result.per_class["sklearn"]),
            "cost": dict(zip(VOC_CLASSES, result.costs)),
            "feature": ftrain.specs[name].as_dict(),
            "skipped": result.skipped,
            "fits": result.fits, "unconverged": result.unconverged,
            "seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
        }  # fmt: skip
        cv["layers"][name] = [[stage.ap_or_none(v) for v in row] for row in result.cv_ap]
        scores[name] = result.scores
        run.logger.info(
            f"svm {name}: mAP {per_layer[name]['map_reference']} (reference AP), "
            f"{per_layer[name]['map_sklearn']} (scikit-learn AP); {result.fits} fits in "
            f"{result.seconds:.1f}s, {result.unconverged} at max_iter"
        )
    svm_seconds = time.perf_counter() - tick
    ranked = [n for n in layers if per_layer[n]["map"] is not None]
    best = max(ranked, key=lambda n: per_layer[n]["map"]) if ranked else None

    table: dict[str, Any] = {}
    tick = time.perf_counter()
    for name in shot_layers:
        table[name] = low_shot(
            ftrain.arrays[name], train.targets(), ftest.arrays[name], test.labels,
            test.difficult, sizes=cfg.low_shot_sizes, draws=cfg.low_shot_draws,
            costs=cfg.costs, seed=cfg.seed, params=params,
            negatives_per_positive=cfg.low_shot_negatives, n_jobs=cfg.n_jobs, kind=cfg.ap,
            classes=VOC_CLASSES, on_bad_data=cfg.on_bad_data, logger=run.logger,
        )  # fmt: skip
        run.logger.info(f"svm low-shot {name}: " + ", ".join(
            f"k={k} {v['mean']}" for k, v in table[name].items()))  # fmt: skip
    low_shot_seconds = time.perf_counter() - tick

    if run.is_main:
        run.write_json(CV_FILE, cv)
        stage.write_npz(run.file(SCORES_FILE), scores)
    metrics = {
        **common.metrics_head("svm", SOLVER_NAMES[cfg.svm_solver], cfg, run, card, card.get("arch"),
                              device=device, precision=ftrain.precision),
        "protocol": "goyal2019-voc07-svm",
        "ap": cfg.ap,
        "map": per_layer[best]["map"] if best else None,
        "best_layer": best,
        "layers": list(layers),
        "per_layer": per_layer,
        "low_shot": table,
        "low_shot_cost_selection": "test mAP averaged over draws (aggregate_low_shot_svm_stats.py)",
        "costs": list(cfg.costs), "folds": cfg.folds, "train_difficult": cfg.train_difficult,
        "train_images": len(train), "test_images": len(test),
        "input_size": input_size, "device": str(device), "n_jobs": cfg.n_jobs,
        "solver": cfg.svm_solver,
        "feature_cache": {"train": stage.cache_info(ftrain), "test": stage.cache_info(ftest)},
        "extract_seconds": ftrain.seconds + ftest.seconds,
        "svm_seconds": svm_seconds, "low_shot_seconds": low_shot_seconds,
        "cv": CV_FILE, "scores": SCORES_FILE,
    }  # fmt: skip
    run.write_metrics(metrics)
    return metrics
