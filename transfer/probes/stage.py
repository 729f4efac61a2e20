"""What the two frozen-feature probe stages (transfer/svm, transfer/knn) share: the encoder
loaded for any family, VOC2007's splits and their features (from the cache when the same
encoder saw the same images, features.py), and the files and metrics fields both write.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark import host_memory
from benchmark.datasets.voc import VOC_CLASSES
from benchmark.distributed import pick_device
from benchmark.errors import ConfigError
from benchmark.loop import resolve_precision
from benchmark.runs import Run, atomic_write_bytes
from weights.encoder import FAMILIES, load_encoder

from .features import (
    Features,
    SplitImages,
    default_input_size,
    extract_features,
    is_contract,
    load_split,
)

SCORES_FILE = "scores.npz"  # test image ids and each layer's, or the k-NN's, (N, 20) scores
Probe = Any  # an SVMConfig or a KNNConfig: the fields both have


def ap_or_none(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)


def per_class_aps(values: np.ndarray) -> dict[str, float | None]:
    return {c: ap_or_none(v) for c, v in zip(VOC_CLASSES, values)}


def voc2007(data: str | None) -> Path:
    from benchmark.datasets.resolve import resolve_data

    return Path(resolve_data(data, "voc2007"))


def check_common(cfg: Probe) -> None:
    if cfg.batch_size < 1 or cfg.workers < 0:
        raise ConfigError("batch_size must be >= 1 and workers >= 0")
    if cfg.input_size is not None and cfg.input_size < 32:
        raise ConfigError(f"input_size: {cfg.input_size} is too small for any encoder (>= 32)")
    if cfg.resize_shorter is not None and cfg.resize_shorter < 1:
        raise ConfigError("resize_shorter: must be a positive side or null")
    resolve_precision(cfg.precision, pick_device(cfg.device))  # a bad name, fp16 off CUDA


def input_size_of(cfg: Probe, encoder: Any) -> int:
    """The configured side, or the encoder's own (AlexNet 227, ResNet-50 / ViT 224)."""
    size = cfg.input_size if cfg.input_size is not None else default_input_size(encoder)
    if not is_contract(encoder) and size < 63:
        raise ConfigError(f"input_size: {size} is too small for AlexNet (>= 63)")
    return size


def load(cfg: Probe, task: str) -> tuple[Any, dict[str, Any], int]:
    """(encoder, card, input side): any family; a ResNet's taps pooled for the side."""
    torch.manual_seed(cfg.seed)  # the random baseline's weights
    encoder, card = load_encoder(cfg.weights, cfg.arch, fmt=cfg.weights_format,
                                 families=FAMILIES, input_size=cfg.input_size,
                                 task=f"--task {task}")  # fmt: skip
    return encoder, card, input_size_of(cfg, encoder)


def feature_cache_dir(run_path: Path) -> Path:
    """<results root>/cache/features of a run folder: the results root (`--out`) is the
    folder holding `runs/` (<out>/runs/<run> or, in a suite, <out>/runs/<suite>/<run>);
    a run folder outside any `runs/` keeps its cache beside it. Never the current folder."""
    path = Path(run_path).resolve()
    for parent in path.parents:
        if parent.name == "runs":
            return parent.parent / "cache" / "features"
    return path.parent / "cache" / "features"


def extract(
    cfg: Probe,
    run: Run,
    encoder: Any,
    input_size: int,
    layers: tuple[str, ...],
    device: torch.device,
) -> tuple[SplitImages, SplitImages, Features, Features]:
    voc = voc2007(cfg.data)
    train = load_split(voc, cfg.train_split, cfg.on_bad_data, run.logger)
    test = load_split(voc, cfg.test_split, cfg.on_bad_data, run.logger)
    cache_dir = cfg.cache_dir or feature_cache_dir(run.path)
    kw = dict(device=device, input_size=input_size, resize_shorter=cfg.resize_shorter,
              batch_size=cfg.batch_size, workers=cfg.workers, cache_dir=cache_dir,
              on_bad_data=cfg.on_bad_data, precision=cfg.precision, logger=run.logger)  # fmt: skip
    ftrain = extract_features(encoder, train, layers, **kw)  # type: ignore[arg-type]
    ftest = extract_features(encoder, test, layers, **kw)  # type: ignore[arg-type]
    return train.subset(ftrain.keep), test.subset(ftest.keep), ftrain, ftest


def cache_info(f: Features) -> dict[str, Any]:
    return {"hit": f.from_cache, "path": str(f.path) if f.path else None, "key": f.key,
            "seconds": f.seconds, "skipped_images": f.skipped,
            "precision": f.precision}  # fmt: skip


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def setup(cfg: Probe) -> torch.device:
    """The probe's device; host memory kept for reuse as in the training loop."""
    if cfg.keep_host_memory:
        host_memory.keep_freed_memory()
    return pick_device(cfg.device)
