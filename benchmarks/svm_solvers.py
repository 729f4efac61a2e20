"""Which solver for the SVM probe: bench's torch solver against the libraries that solve the
same problem, on one class of one layer at VOC2007's size.

    python -m benchmarks.svm_solvers                # 5011 rows x 9600 dims, every cost
    python -m benchmarks.svm_solvers --quick        # 1000 x 2048, a few seconds

The problem (the reference's LinearSVC): 0.5 ||w||^2 + C sum_i c_i max(0, 1 - y_i <w, x_i>)^2
with the intercept a regularised constant feature (intercept_scaling 1) and c_i = 2 for
positives, on L2-normalised rows. The slice is the cross-validation of one class (the median
VOC2007 frequency): its three folds at each of the 26 reference costs, as the protocol fits
them. Every solver's weights are scored by that objective in float64, and the table gives
its excess over the best of all solvers (relative), so a fast solver that stops early shows
it. Solvers:

- torch: `transfer.probes.solver` (Newton on the Gram matrix, the three folds together,
  warm-started up the cost grid), as `solver: torch` runs it, the Gram matrix included;
- liblinear: scikit-learn's LinearSVC, one fit at a time (the reference; tol 1e-4);
- cyanure (when installed): `cyanure.estimators.LinearSVC` with loss sqhinge, the constant
  feature appended (fit_intercept off: liblinear regularises the intercept), each positive
  row given twice (weight 2) and lambda_1 = 1 / (2 C n') for the n' rows (cyanure's squared
  hinge is half of liblinear's: the same problem divided by 2 C n'); warm-started along the
  costs, at its default duality-gap tolerance and at a tight one.

snapml's SupportVectorMachine solves the hinge (not squared hinge) loss: not this problem,
so it is not timed. Peak memory is not compared (one class is small for every solver).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from benchmark import host_memory
from benchmarks.common import MatmulRate, markdown_table
from benchmarks.probe_speed import VOC07_TRAINVAL_COUNTS, random_features, random_labels
from transfer.probes.solver import Gram, gram_matrix, newton, rescale
from transfer.probes.svm import SVMParams, _fit, normalize_features
from transfer.svm.config import REFERENCE_COSTS


def objective(x: np.ndarray, y: np.ndarray, c: np.ndarray, w: np.ndarray, cost: float) -> float:
    """The LinearSVC objective of weights w (d + 1: the last is the constant feature's)."""
    margin = y * (x @ w[:-1] + w[-1])
    return float(0.5 * w @ w + cost * (c * np.maximum(0.0, 1.0 - margin) ** 2).sum())


def torch_path(x: np.ndarray, y: np.ndarray, c: np.ndarray, folds: list, costs: list[float]
               ) -> dict[tuple[int, float], np.ndarray]:  # fmt: skip
    """{(fold, cost): w} from the torch solver: the folds as columns of one batch."""
    xa = np.concatenate([x, np.ones((len(x), 1))], 1)
    gram = Gram.of(gram_matrix(torch.as_tensor(xa, dtype=torch.float32)), 64)
    a = np.zeros((len(folds), len(x)))
    for f, train in enumerate(folds):
        a[f, train] = c[train]
    at = torch.as_tensor(a)[None]
    yt = torch.as_tensor(y, dtype=torch.float64).expand(1, len(folds), -1).contiguous()
    out, beta, o = {}, None, None
    for cost in sorted(costs):
        C = torch.full((1, len(folds)), cost, dtype=torch.float64)
        if beta is not None:
            beta, o = rescale(beta, o, at, yt, C)
        beta, o, _ = newton(gram, at, yt, C, beta, o)
        for f in range(len(folds)):
            out[(f, cost)] = xa.T @ beta[0, f].numpy()
    return out


def liblinear_path(x, y, folds, costs) -> dict[tuple[int, float], np.ndarray]:
    params = SVMParams(solver="liblinear")
    out = {}
    for f, train in enumerate(folds):
        for cost in costs:
            clf, _ = _fit(x[train], y[train], cost, params)
            out[(f, cost)] = np.r_[clf.coef_[0], clf.intercept_[0]]
    return out


def cyanure_path(x, y, folds, costs, tol: float) -> dict[tuple[int, float], np.ndarray]:
    from cyanure.estimators import LinearSVC as CyanureSVC

    out = {}
    for f, train in enumerate(folds):
        pos = train[y[train] > 0]
        rows = np.concatenate([train, pos])  # a positive twice: class weight 2
        xa = np.concatenate([x[rows], np.ones((len(rows), 1))], 1)
        clf = CyanureSVC(loss="sqhinge", penalty="l2", fit_intercept=False, tol=tol,
                         max_iter=2000, warm_start=True, verbose=False)  # fmt: skip
        for cost in sorted(costs):
            clf.set_params(lambda_1=0.5 / (cost * len(rows)))
            clf.fit(xa, y[rows])
            out[(f, cost)] = np.asarray(clf.coef_, dtype=np.float64).reshape(-1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1000 rows x 2048 dims")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    host_memory.keep_freed_memory()
    n, dim = (1000, 2048) if args.quick else (5011, 9600)
    labels = random_labels(n, args.seed)
    x = normalize_features(random_features(labels, dim, args.seed))
    cls = int(np.argsort(VOC07_TRAINVAL_COUNTS)[len(VOC07_TRAINVAL_COUNTS) // 2])
    y = np.where(labels[:, cls] > 0, 1.0, -1.0)
    c = np.where(y > 0, 2.0, 1.0)
    from sklearn.model_selection import StratifiedKFold

    folds = [t for t, _ in StratifiedKFold(n_splits=3).split(np.zeros((n, 1)), y)]
    costs = list(REFERENCE_COSTS)
    rate = MatmulRate(torch.device("cpu"))
    rate.once()
    print(f"{n} rows x {dim} dims, class {cls} ({int((y > 0).sum())} positives), 3 folds x "
          f"{len(costs)} costs = {3 * len(costs)} problems; torch {torch.get_num_threads()} "
          "threads", flush=True)  # fmt: skip
    solvers = {"torch (solver: torch)": lambda: torch_path(x, y, c, folds, costs),
               "liblinear (scikit-learn LinearSVC, tol 1e-4)": lambda: liblinear_path(
                   x, y, folds, costs)}  # fmt: skip
    try:
        import cyanure  # noqa: F401

        solvers["cyanure LinearSVC, tol 1e-3 (its default)"] = lambda: cyanure_path(
            x, y, folds, costs, 1e-3)
        solvers["cyanure LinearSVC, tol 1e-6"] = lambda: cyanure_path(x, y, folds, costs, 1e-6)
    except ImportError:
        print("cyanure is not installed: not compared")
    found, seconds = {}, {}
    for name, run in solvers.items():
        tick = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found[name] = run()
        seconds[name] = time.perf_counter() - tick
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
        rate.once()
    values = {name: {(f, cost): objective(x[folds[f]], y[folds[f]], c[folds[f]], w, cost)
                     for (f, cost), w in ws.items()} for name, ws in found.items()}  # fmt: skip
    best = {key: min(v[key] for v in values.values()) for key in values[next(iter(values))]}
    rows = []
    for name, v in values.items():
        excess = [v[key] / best[key] - 1 for key in best]
        rows.append({"solver": name, "seconds": seconds[name],
                     "x torch's time": seconds[name] / seconds[next(iter(found))],
                     "median objective excess": float(np.median(excess)),
                     "max objective excess": float(np.max(excess))})  # fmt: skip
    print()
    print(markdown_table(rows))
    print(f"\nfp32 matmul {rate.gflops:.0f} GFLOP/s (median of {len(rate.rates)})")


if __name__ == "__main__":
    main()
