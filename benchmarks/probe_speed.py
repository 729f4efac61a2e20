"""Wall time of the VOC07 SVM probe's fitting: `n_jobs` worker processes against one.

    python -m benchmarks.probe_speed --data /work/shared/data/VOCdevkit/VOC2007 --n-jobs 2

The real VOC sample holds only a `train` split, so its images (sorted ids) are split in two
by a permutation seeded with --split-seed: one half plays trainval, the other test. Features
come from the encoder given by --weights (default: the random-Gaussian baseline, seeded),
extracted once at 227 and cached like `bench transfer --task svm` does. For each layer the
whole protocol (cross-validation over the cost grid, refit at the chosen cost, test scores)
is timed with n_jobs = 1 and n_jobs = N; the two must give identical scores. Prints a
Markdown table: fits, wall seconds each way, speed-up, CPU seconds and cores used each way
(CPU / wall: on a busy machine the speed-up is bounded by the cores the scheduler gives),
and whether the results agree.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmark.distributed import pick_device
from benchmarks.common import markdown_table
from transfer.backbone import load_encoder
from transfer.probes.config import REFERENCE_COSTS
from transfer.probes.features import extract_features, load_split
from transfer.probes.svm import SVMParams, train_svms


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return np.sort(order[:half]), np.sort(order[half:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/work/shared/data/VOCdevkit/VOC2007")
    parser.add_argument("--split", default="train", help="the split file to divide in two")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--arch", default="caffenet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", nargs="+", default=["conv3", "pool5"])
    parser.add_argument("--costs", type=float, nargs="+", default=list(REFERENCE_COSTS))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="default <results root>/cache/features")
    args = parser.parse_args()

    logger = logging.getLogger("bench.probe_speed")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    images = load_split(Path(args.data), args.split)
    tr, te = split_halves(len(images), args.split_seed)
    train, test = images.subset(tr), images.subset(te)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    encoder, card = load_encoder(args.weights, args.arch)
    kw = dict(device=device, batch_size=args.batch_size, workers=args.workers,
              cache_dir=args.cache_dir, logger=logger)  # fmt: skip
    tick = time.perf_counter()
    ftr = extract_features(encoder, train, args.layers, **kw)  # type: ignore[arg-type]
    fte = extract_features(encoder, test, args.layers, **kw)  # type: ignore[arg-type]
    extract = time.perf_counter() - tick
    cached = "cached" if ftr.from_cache and fte.from_cache else f"{extract:.1f}s"
    print(
        f"data: {args.data} ({args.split}: {len(train)} train / {len(test)} test images, "
        f"split seed {args.split_seed}); encoder: {card.get('method')} ({card.get('arch')}); "
        f"features on {device}: {cached}; costs: {len(args.costs)}; folds: {args.folds}\n"
    )

    rows = []
    params = SVMParams(seed=args.seed)
    for name in args.layers:
        runs = {}
        for n_jobs in (1, args.n_jobs):
            tick = time.perf_counter()
            res = train_svms(
                ftr.arrays[name], train.labels, train.difficult,
                fte.arrays[name], test.labels, test.difficult,
                costs=args.costs, folds=args.folds, params=params, n_jobs=n_jobs,
                on_bad_data="skip", logger=logger,
            )  # fmt: skip
            runs[n_jobs] = (time.perf_counter() - tick, res)
        (t1, r1), (tn, rn) = runs[1], runs[args.n_jobs]
        same = np.array_equal(r1.scores, rn.scores, equal_nan=True) and r1.costs == rn.costs
        load = os.getloadavg()[0]
        rows.append({
            "layer": name, "dim": ftr.specs[name].dim,
            "classes": 20 - len(r1.skipped), "fits": r1.fits, "at max_iter": r1.unconverged,
            "n_jobs=1 s": t1, f"n_jobs={args.n_jobs} s": tn, "speed-up": t1 / tn,
            "CPU s (1 / N)": f"{r1.cpu_seconds:.1f} / {rn.cpu_seconds:.1f}",
            "cores used (1 / N)": f"{r1.cpu_seconds / t1:.2f} / {rn.cpu_seconds / tn:.2f}",
            "mAP (ref AP)": r1.mean("reference"), "identical": same,
            "load avg": load,
        })  # fmt: skip
    print(markdown_table(rows))
    print(
        f"\n{os.cpu_count()} CPUs. 'CPU s' sums the fitting tasks' CPU time over processes and "
        "'cores used' divides it by the wall time: the work is the same both ways, so a "
        "speed-up below N with 'cores used' below N means the cores were busy with other "
        "processes ('load avg': the 1-minute load after each layer)."
    )


if __name__ == "__main__":
    main()
