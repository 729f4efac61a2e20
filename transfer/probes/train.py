"""`bench transfer --task svm|knn`: frozen-feature probes on VOC2007 trainval -> test.

Run folder: `metrics.json` (last), `svm_cv.json` (the cross-validation AP of every class
and cost, per layer) and `scores.npz` (test image ids and each layer's, or the k-NN's,
(N, 20) scores). Features come from `<results root>/cache/features/` when the same encoder
saw the same images before (features.py).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark import host_memory
from benchmark.datasets.voc import VOC_CLASSES
from benchmark.distributed import pick_device
from benchmark.errors import ConfigError
from benchmark.metrics import classification_ap
from benchmark.runs import Run, atomic_write_bytes
from transfer import common
from weights.encoder import FAMILIES, load_encoder

from .config import KNNConfig, SVMConfig
from .features import (
    Features,
    SplitImages,
    check_known_layers,
    check_layers,
    default_input_size,
    encoder_layers,
    extract_features,
    is_contract,
    load_split,
)
from .knn import knn_scores
from .svm import SVMParams, check_svm_settings, low_shot, train_svms

SCORES_FILE = "scores.npz"
# metrics.json's implementation of each solver (the same problem, the same optimum)
SOLVER_NAMES = {"torch": "torch-newton-cg", "liblinear": "sklearn-liblinear"}
CV_FILE = "svm_cv.json"


def default_name_svm(cfg: SVMConfig) -> str:
    """svm-<method>[-<mask>]-s<seed>, e.g. svm-random-s0."""
    return "-".join(common.name_parts("svm", cfg.weights)) + f"-s{cfg.seed}"


def default_name_knn(cfg: KNNConfig) -> str:
    """knn-<method>[-<mask>]-k<k>-s<seed>, e.g. knn-random-k20-s0."""
    return "-".join(common.name_parts("knn", cfg.weights)) + f"-k{cfg.k}-s{cfg.seed}"


def _ap(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)


def _per_class(values: np.ndarray) -> dict[str, float | None]:
    return {c: _ap(v) for c, v in zip(VOC_CLASSES, values)}


def _voc2007(data: str | None) -> Path:
    from benchmark.datasets.resolve import resolve_data

    return Path(resolve_data(data, "voc2007"))


def _check_common(cfg: SVMConfig | KNNConfig) -> None:
    if cfg.batch_size < 1 or cfg.workers < 0:
        raise ConfigError("batch_size must be >= 1 and workers >= 0")
    if cfg.input_size is not None and cfg.input_size < 32:
        raise ConfigError(f"input_size: {cfg.input_size} is too small for any encoder (>= 32)")
    if cfg.resize_shorter is not None and cfg.resize_shorter < 1:
        raise ConfigError("resize_shorter: must be a positive side or null")


def _input_size(cfg: SVMConfig | KNNConfig, encoder: Any) -> int:
    """The configured side, or the encoder's own (AlexNet 227, ResNet-50 / ViT 224)."""
    size = cfg.input_size if cfg.input_size is not None else default_input_size(encoder)
    if not is_contract(encoder) and size < 63:
        raise ConfigError(f"input_size: {size} is too small for AlexNet (>= 63)")
    return size


def check_svm_config(cfg: SVMConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(layers, low-shot layers) in network order, each () where the encoder chooses (null:
    every layer it offers); ConfigError naming the key otherwise. Names are checked against
    every family's layers here, against the loaded encoder's by `svm_layers`."""
    _check_common(cfg)
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


def check_svm(cfg: SVMConfig) -> None:
    """The stage table's check: every setting no run can use is a one-line error."""
    check_svm_config(cfg)


def check_knn(cfg: KNNConfig) -> None:
    """The stage table's check: every setting no run can use is a one-line error."""
    check_knn_config(cfg)


def _load(cfg: SVMConfig | KNNConfig, task: str) -> tuple[Any, dict[str, Any], int]:
    """(encoder, card, input side): any family; a ResNet's taps pooled for the side."""
    torch.manual_seed(cfg.seed)  # the random baseline's weights
    encoder, card = load_encoder(cfg.weights, cfg.arch, fmt=cfg.weights_format,
                                 families=FAMILIES, input_size=cfg.input_size,
                                 task=f"--task {task}")  # fmt: skip
    return encoder, card, _input_size(cfg, encoder)


def _extract(
    cfg: SVMConfig | KNNConfig,
    run: Run,
    encoder: Any,
    input_size: int,
    layers: tuple[str, ...],
    device: torch.device,
) -> tuple[SplitImages, SplitImages, Features, Features]:
    voc = _voc2007(cfg.data)
    train = load_split(voc, cfg.train_split, cfg.on_bad_data, run.logger)
    test = load_split(voc, cfg.test_split, cfg.on_bad_data, run.logger)
    kw = dict(device=device, input_size=input_size, resize_shorter=cfg.resize_shorter,
              batch_size=cfg.batch_size, workers=cfg.workers, cache_dir=cfg.cache_dir,
              on_bad_data=cfg.on_bad_data, logger=run.logger)  # fmt: skip
    ftrain = extract_features(encoder, train, layers, **kw)  # type: ignore[arg-type]
    ftest = extract_features(encoder, test, layers, **kw)  # type: ignore[arg-type]
    return train.subset(ftrain.keep), test.subset(ftest.keep), ftrain, ftest


def _cache_info(f: Features) -> dict[str, Any]:
    return {"hit": f.from_cache, "path": str(f.path) if f.path else None, "key": f.key,
            "seconds": f.seconds, "skipped_images": f.skipped}  # fmt: skip


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _setup(cfg: SVMConfig | KNNConfig) -> torch.device:
    """The probe's device; host memory kept for reuse as in the training loop."""
    if cfg.keep_host_memory:
        host_memory.keep_freed_memory()
    return pick_device(cfg.device)


def main_svm(cfg: SVMConfig, run: Run) -> dict[str, Any]:
    """Extract (or load) features, train and test the SVMs of every layer, the low-shot
    table, write metrics.json; returns the metrics."""
    check_svm_config(cfg)
    device = _setup(cfg)
    encoder, card, input_size = _load(cfg, "svm")
    layers, shot_layers = svm_layers(cfg, encoder)
    train, test, ftrain, ftest = _extract(cfg, run, encoder, input_size, layers, device)
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
            "map": _ap(result.mean(cfg.ap)),
            "map_reference": _ap(result.mean("reference")),
            "map_sklearn": _ap(result.mean("sklearn")),
            "per_class": _per_class(main_ap),
            "per_class_reference": _per_class(result.per_class["reference"]),
            "per_class_sklearn": _per_class(result.per_class["sklearn"]),
            "cost": dict(zip(VOC_CLASSES, result.costs)),
            "feature": ftrain.specs[name].as_dict(),
            "skipped": result.skipped,
            "fits": result.fits, "unconverged": result.unconverged,
            "seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
        }  # fmt: skip
        cv["layers"][name] = [[_ap(v) for v in row] for row in result.cv_ap]
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
        _write_npz(run.file(SCORES_FILE), scores)
    metrics = {
        **common.metrics_head("svm", SOLVER_NAMES[cfg.svm_solver], cfg, run, card, card.get("arch"),
                              device=device),
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
        "feature_cache": {"train": _cache_info(ftrain), "test": _cache_info(ftest)},
        "extract_seconds": ftrain.seconds + ftest.seconds,
        "svm_seconds": svm_seconds, "low_shot_seconds": low_shot_seconds,
        "cv": CV_FILE, "scores": SCORES_FILE,
    }  # fmt: skip
    run.write_metrics(metrics)
    return metrics


def check_knn_config(cfg: KNNConfig) -> str | None:
    """The configured layer (None: the encoder's k-NN layer); a name no family has, or a bad
    k or temperature, is a one-line error."""
    _check_common(cfg)
    if cfg.layer is not None:
        check_known_layers([cfg.layer], "layer")
    if cfg.k < 1 or not cfg.temperature > 0:
        raise ConfigError(f"k must be >= 1 and temperature > 0, got {cfg.k}, {cfg.temperature}")
    return cfg.layer


def knn_layer(cfg: KNNConfig, encoder: Any) -> str:
    """The configured layer, else the encoder's own k-NN feature: AlexNet's pool5, a
    ResNet's res5avg and a ViT's final [CLS] token (DINO's eval_knn features)."""
    known = encoder_layers(encoder)
    layer = cfg.layer or getattr(encoder, "knn_tap", "pool5")
    if layer not in known:
        raise ConfigError(f"layer: no {getattr(encoder, 'arch', 'encoder')} layer {layer!r} "
                          f"(choose from {', '.join(known)})")  # fmt: skip
    return layer


def main_knn(cfg: KNNConfig, run: Run) -> dict[str, Any]:
    """Weighted k-NN on one layer's features (the encoder's k-NN layer by default); writes
    metrics.json."""
    check_knn_config(cfg)
    device = _setup(cfg)
    encoder, card, input_size = _load(cfg, "knn")
    layer = knn_layer(cfg, encoder)
    train, test, ftrain, ftest = _extract(cfg, run, encoder, input_size, (layer,), device)
    del encoder
    tick = time.perf_counter()
    scores = knn_scores(ftrain.arrays[layer], train.labels, ftest.arrays[layer], cfg.k,
                        cfg.temperature, device)  # fmt: skip
    per_class, mean = classification_ap(scores, test.labels, test.difficult)
    k = min(cfg.k, len(train))
    run.logger.info(f"knn {layer} k={k} T={cfg.temperature}: mAP {mean:.4f}")
    if run.is_main:
        _write_npz(run.file(SCORES_FILE), {"ids": np.asarray(test.ids, dtype=str), layer: scores})
    metrics = {
        **common.metrics_head("knn", "torch", cfg, run, card, card.get("arch"), device=device),
        "protocol": "weighted-knn (Wu et al. 2018, DINO eval_knn)",
        "map": _ap(mean),
        "per_class": _per_class(per_class),
        "k": k, "temperature": cfg.temperature, "layer": layer,
        "feature": ftrain.specs[layer].as_dict(),
        "train_images": len(train), "test_images": len(test),
        "input_size": input_size, "device": str(device),
        "feature_cache": {"train": _cache_info(ftrain), "test": _cache_info(ftest)},
        "extract_seconds": ftrain.seconds + ftest.seconds,
        "knn_seconds": time.perf_counter() - tick, "scores": SCORES_FILE,
    }  # fmt: skip
    run.write_metrics(metrics)
    return metrics
