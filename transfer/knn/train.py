"""`bench transfer --task knn`: weighted k-NN on frozen features, VOC2007 trainval -> test.

Run folder: `metrics.json` (last) and `scores.npz` (test image ids and the (N, 20) scores).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmark.errors import ConfigError
from benchmark.metrics import classification_ap
from benchmark.runs import Run
from transfer import common
from transfer.probes import stage
from transfer.probes.features import check_known_layers, encoder_layers
from transfer.probes.knn import knn_scores

from .config import KNNConfig

SCORES_FILE = stage.SCORES_FILE


def default_name(cfg: KNNConfig) -> str:
    """knn-<method>[-<mask>]-k<k>-s<seed>, e.g. knn-random-k20-s0."""
    return "-".join(common.name_parts("knn", cfg.weights)) + f"-k{cfg.k}-s{cfg.seed}"


def check(cfg: KNNConfig) -> None:
    """The stage table's check: every setting no run can use is a one-line error."""
    check_config(cfg)


def check_config(cfg: KNNConfig) -> str | None:
    """The configured layer (None: the encoder's k-NN layer); a name no family has, or a bad
    k or temperature, is a one-line error."""
    stage.check_common(cfg)
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


def main(cfg: KNNConfig, run: Run) -> dict[str, Any]:
    """Weighted k-NN on one layer's features (the encoder's k-NN layer by default); writes
    metrics.json."""
    check_config(cfg)
    device = stage.setup(cfg)
    encoder, card, input_size = stage.load(cfg, "knn")
    layer = knn_layer(cfg, encoder)
    train, test, ftrain, ftest = stage.extract(cfg, run, encoder, input_size, (layer,), device)
    del encoder
    tick = time.perf_counter()
    scores = knn_scores(ftrain.arrays[layer], train.labels, ftest.arrays[layer], cfg.k,
                        cfg.temperature, device)  # fmt: skip
    per_class, mean = classification_ap(scores, test.labels, test.difficult)
    k = min(cfg.k, len(train))
    run.logger.info(f"knn {layer} k={k} T={cfg.temperature}: mAP {mean:.4f}")
    if run.is_main:
        ids = np.asarray(test.ids, dtype=str)
        stage.write_npz(run.file(SCORES_FILE), {"ids": ids, layer: scores})
    metrics = {
        **common.metrics_head("knn", "torch", cfg, run, card, card.get("arch"), device=device,
                              precision=ftrain.precision),
        "protocol": "weighted-knn (Wu et al. 2018, DINO eval_knn)",
        "map": stage.ap_or_none(mean),
        "per_class": stage.per_class_aps(per_class),
        "k": k, "temperature": cfg.temperature, "layer": layer,
        "feature": ftrain.specs[layer].as_dict(),
        "train_images": len(train), "test_images": len(test),
        "input_size": input_size, "device": str(device),
        "feature_cache": {"train": stage.cache_info(ftrain), "test": stage.cache_info(ftest)},
        "extract_seconds": ftrain.seconds + ftest.seconds,
        "knn_seconds": time.perf_counter() - tick, "scores": SCORES_FILE,
    }  # fmt: skip
    run.write_metrics(metrics)
    return metrics
