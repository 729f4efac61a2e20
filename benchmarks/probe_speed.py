"""Wall time of Goyal et al.'s whole VOC07 SVM protocol (extraction excluded), torch solver
against the LinearSVC path it replaces, on random features of VOC2007's shape.

    python -m benchmarks.probe_speed            # VOC2007 size: 5011 / 4952 images, six layers
    python -m benchmarks.probe_speed --quick    # a small shape, a minute or two

Features: per layer, non-negative rows (a shared positive mean, 20 class directions, a
low-rank part with a power-law spectrum and noise, through a ReLU), so rows are strongly
correlated as conv features are; labels drawn with about VOC2007 trainval's class
frequencies. The torch solver runs the whole protocol: every layer's 20 classes x 26 costs x
(3 folds + refit) and low-shot 8 sizes x 5 draws x 20 classes x 26 costs. The LinearSVC path
(scikit-learn, one fit at a time) is timed on a slice: one class with every cost (its three
folds and refit), and low-shot one class of one draw at every k and cost, on the first
layer; its whole-protocol time is that slice extrapolated (x classes, x layers, x draws),
divided by --n-jobs (its processes run in parallel). The fp32 matmul rate is measured
between the layers (benchmarks.common.MatmulRate): on a shared machine wall times drift, the
rate says how fast the machine was meanwhile. Peak memory: the process's maximum RSS.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import time
import warnings

import numpy as np
import torch

from benchmark import host_memory
from benchmark.distributed import pick_device
from benchmarks.common import MatmulRate, markdown_table
from transfer.probes.svm import (
    SVMParams,
    _fit,
    class_problem,
    low_shot,
    low_shot_sample,
    normalize_features,
    train_svms,
)
from transfer.svm.config import LOW_SHOT_DRAWS, LOW_SHOT_SIZES, REFERENCE_COSTS

# VOC2007 trainval images per class (aeroplane ... tvmonitor), about; used as frequencies.
VOC07_TRAINVAL_COUNTS = (238, 243, 330, 181, 244, 186, 713, 337, 445, 141,
                         200, 421, 287, 245, 2008, 245, 96, 229, 261, 256)  # fmt: skip
LAYER_DIMS = {"conv1": 9600, "conv2": 9216, "conv3": 9600, "conv4": 9600, "conv5": 9216,
              "pool5": 9216}  # fmt: skip


def random_labels(n: int, seed: int) -> np.ndarray:
    p = np.asarray(VOC07_TRAINVAL_COUNTS) / 5011.0
    labels = (np.random.default_rng(seed).random((n, len(p))) < p).astype(np.float32)
    labels[: len(p)] = np.maximum(labels[: len(p)], np.eye(len(p), dtype=np.float32))
    return labels


def random_features(labels: np.ndarray, dim: int, seed: int, rank: int = 400) -> np.ndarray:
    """float32 (n, dim) >= 0: mean + low-rank power-law part + class signal + noise, ReLU."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    mean = rng.random(dim, dtype=np.float32)
    basis = rng.standard_normal((rank, dim), dtype=np.float32) * 0.5
    scales = np.arange(1, rank + 1, dtype=np.float32) ** -0.5
    classes = rng.standard_normal((labels.shape[1], dim), dtype=np.float32) * 0.5
    x = (rng.standard_normal((n, rank), dtype=np.float32) * scales) @ basis
    x += mean + labels @ classes + 0.3 * rng.standard_normal((n, dim), dtype=np.float32)
    return np.maximum(x, 0, out=x)


def liblinear_slice(
    xtr: np.ndarray, labels: np.ndarray, costs: list[float], folds: int, cls: int,
    sizes: list[int], targets: np.ndarray,
) -> tuple[float, float, int]:  # fmt: skip
    """(seconds of one class's CV + refit over every cost, seconds of one class of one
    low-shot draw at every k and cost, fits), LinearSVC in this process on one core."""
    from sklearn.model_selection import StratifiedKFold

    x = normalize_features(xtr)
    params = SVMParams(solver="liblinear")
    rows, y = class_problem(labels, np.zeros_like(labels, bool), cls)
    splits = list(StratifiedKFold(n_splits=folds).split(np.zeros((len(y), 1)), y))
    fits = 0
    tick = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cost in costs:
            for train, _ in splits:
                _fit(x[rows[train]], y[train], cost, params)
                fits += 1
        _fit(x[rows], y, float(np.median(costs)), params)  # the refit at one cost
        fits += 1
        cv = time.perf_counter() - tick
        tick = time.perf_counter()
        for k in sizes:
            sample, _ = low_shot_sample(targets, k, 0, on_bad_data="skip")
            keep = np.flatnonzero(sample[:, cls] != -1)
            if not keep.size:  # too few positives for this k (skipped by torch too)
                continue
            yk = np.where(sample[keep, cls] == 1, 1, -1)
            for cost in costs:
                _fit(x[keep], yk, cost, params)
                fits += 1
    return cv, time.perf_counter() - tick, fits


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1000 / 1000 images, 2 layers "
                        "of 2048, low-shot k 1, 8, 32 x 2 draws")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-jobs", type=int, default=2, help="LinearSVC processes assumed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-liblinear", action="store_true")
    parser.add_argument("--layers", type=int, default=None,
                        help="time only the first N layers (the total then covers those)")
    args = parser.parse_args()
    host_memory.keep_freed_memory()  # as the probe stage does (svm.keep_host_memory)

    if args.quick:
        n_train, n_test, dims = 1000, 1000, {"conv3": 2048, "pool5": 2048}
        sizes, draws = [1, 8, 32], 2
    else:
        n_train, n_test, dims = 5011, 4952, dict(LAYER_DIMS)
        sizes, draws = list(LOW_SHOT_SIZES), LOW_SHOT_DRAWS
    full_dims = dict(dims)
    if args.layers:
        dims = dict(list(dims.items())[: args.layers])
    costs = list(REFERENCE_COSTS)
    device = pick_device(args.device)
    params = SVMParams(solver="torch", device=str(device))
    ytr, yte = random_labels(n_train, args.seed), random_labels(n_test, args.seed + 1)
    dtr, dte = np.zeros_like(ytr, bool), np.zeros_like(yte, bool)
    targets = ytr.astype(np.int8)
    rate = MatmulRate(device)
    quiet = logging.getLogger("bench.probe_speed")  # classes too rare for a k: skipped
    quiet.setLevel(logging.ERROR)
    rows = []
    first: tuple[np.ndarray, ...] | None = None
    total = 0.0
    print(f"{n_train} train / {n_test} test images, {len(dims)} layers, {len(costs)} costs, "
          f"3 folds + refit; low-shot k {sizes} x {draws} draws; torch on {device}, "
          f"{torch.get_num_threads()} threads; load average {_load()}", flush=True)  # fmt: skip
    for i, (layer, dim) in enumerate(dims.items()):
        xtr = random_features(ytr, dim, args.seed + 10 * i)
        xte = random_features(yte, dim, args.seed + 10 * i + 1)
        if first is None:
            first = (xtr, xte)
        rate.once()
        tick = time.perf_counter()
        res = train_svms(xtr, ytr, dtr, xte, yte, dte, costs=costs, params=params)
        t_cv = time.perf_counter() - tick
        rate.once()
        tick = time.perf_counter()
        shot = low_shot(xtr, targets, xte, yte, dte, sizes=sizes, draws=draws, costs=costs,
                        params=params, on_bad_data="skip", logger=quiet)  # fmt: skip
        t_shot = time.perf_counter() - tick
        total += t_cv + t_shot
        rows.append({"layer": layer, "dim": dim, "problems": res.fits,
                     "not converged": res.unconverged, "CV + refit s": t_cv,
                     "low-shot problems": sum(v["classes"] for v in shot.values()) * draws
                     * len(costs),
                     "low-shot not converged": sum(v["unconverged"] for v in shot.values()),
                     "low-shot s": t_shot, "mAP": res.mean("reference")})  # fmt: skip
        print(markdown_table(rows[-1:]), flush=True)
    rate.once()
    print(f"load average at the end: {_load()} (other processes on the machine slow every "
          "figure above)")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("\ntorch solver, whole protocol:\n")
    print(markdown_table(rows))
    print(f"\ntotal {total:.1f} s ({total / 60:.2f} min); fp32 matmul {rate.gflops:.0f} GFLOP/s "
          f"(median of {len(rate.rates)}, range {min(rate.rates):.0f}-{max(rate.rates):.0f}); "
          f"peak memory {peak_gb:.2f} GB (max RSS)")  # fmt: skip
    if len(dims) < len(full_dims):
        print(f"{len(full_dims)} layers at this rate (x {len(full_dims)} / {len(dims)}): "
              f"{total * len(full_dims) / len(dims):.0f} s")  # fmt: skip
    if args.skip_liblinear or first is None:
        return
    cls = int(np.argsort(VOC07_TRAINVAL_COUNTS)[len(VOC07_TRAINVAL_COUNTS) // 2])  # median
    with torch.no_grad():
        cv, shot, fits = liblinear_slice(first[0], ytr, costs, 3, cls, sizes, targets)
    per_layer = 20 * (cv + draws * shot)
    whole = per_layer * len(dims) / args.n_jobs
    print(f"\nLinearSVC slice (class {cls}, layer {next(iter(dims))}, one core): {fits} fits, "
          f"CV + refit {cv:.1f} s, one low-shot draw {shot:.1f} s; whole protocol "
          f"extrapolated: 20 classes x {len(dims)} layers x ({draws} draws) / {args.n_jobs} "
          f"processes = {whole:.0f} s ({whole / 3600:.2f} h); torch {total:.0f} s: "
          f"{whole / total:.1f}x faster")  # fmt: skip


if __name__ == "__main__":
    main()
