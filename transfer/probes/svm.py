"""One-vs-all linear SVMs on frozen features: Goyal et al.'s VOC07 protocol and its low-shot
variant, solved in parallel.

Reference (facebookresearch/fair_self_supervision_benchmark, tools/svm/):

- features are L2-normalised per image, x / (||x|| + 1e-5) (svm_helper.normalize_features);
- per class, LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0,
  penalty='l2', loss='squared_hinge', tol=1e-4, dual=True, max_iter=2000), the intercept on
  (scikit-learn's default), trained on every trainval image with label +1 for present and -1
  otherwise, difficult-only images included as negatives (train_svm_kfold.py: the target -1
  of create_voc_data_files.py stays -1);
- the cost: for every cost of the grid (svm_helper.parse_cost_list), cross_val_score(clf, X,
  y, cv=3, scoring='average_precision'), i.e. scikit-learn AP on the decision values of
  StratifiedKFold(3) without shuffling over the images in id order; the first cost with the
  highest mean wins (test_svm.py get_chosen_costs, np.argmax); the model refit on all of
  trainval with that cost is tested;
- test AP (test_svm.py + svm_helper.get_precision_recall / calculate_ap): difficult-only
  images left out, then the area under the interpolated precision envelope over every
  recall step (the VOC2010 devkit's AP, `benchmark.metrics.voc_ap_area`). That is NOT
  scikit-learn's average_precision_score, which sums (R_n - R_n-1) P_n without the envelope
  and is never larger; both are reported. The reference ranks ties in numpy's unstable
  argsort order (arbitrary); here tied scores form one threshold, which changes nothing
  when scores are distinct.
- low shot (extra_scripts/create_voc_low_shot_samples.py, train_svm_low_shot.py,
  test_svm_low_shot.py, aggregate_low_shot_svm_stats.py): for each of 5 independent draws and
  each k, per class k positives and 19k negatives drawn with `random.sample` from the
  non-difficult positives / negatives (every class's positives first, then every class's
  negatives), the rest (difficult images included) ignored; one SVM per class and cost; test
  mAP per (draw, k, cost); for each k the cost with the best mean over the draws is taken,
  and the mean and (population) std over the draws at that cost are reported. The reference
  picks that cost on the test set; so does this code, and it says so in metrics.json.

Speed: the (class, cost) problems are independent and liblinear is single-threaded, so they
run in `n_jobs` processes (joblib/loky), the features shared as a read-only memmap, the
slowest (largest) costs first. Only the chosen cost is refit on all of trainval (the
reference refits every cost and keeps one: the same model, since liblinear's seed is fixed).
Features are not standardised: that would change the problem the reference solves.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits

from benchmark.errors import ConfigError, DatasetError
from benchmark.metrics import mean_ap, voc_ap_area

log = logging.getLogger("bench")
NORM_EPS = 1e-5  # svm_helper.normalize_features


SOLVERS = ("torch", "liblinear")


@dataclass(frozen=True)
class SVMParams:
    """The reference's LinearSVC (tools/svm/train_svm_kfold.py); `seed` is liblinear's.

    solver: "torch" solves the same problem for every class, cost and fold at once
    (torch_svm.py, on `device`); "liblinear" fits scikit-learn's LinearSVC one problem at a
    time, as the reference does (max_iter, tol and seed apply to it only)."""

    positive_weight: float = 2.0
    max_iter: int = 2000
    tol: float = 1e-4
    seed: int = 0
    solver: str = "torch"
    device: str = "cpu"

    def make(self, cost: float) -> LinearSVC:
        return LinearSVC(
            C=cost, class_weight={1: self.positive_weight, -1: 1.0}, intercept_scaling=1.0,
            penalty="l2", loss="squared_hinge", tol=self.tol, dual=True,
            max_iter=self.max_iter, fit_intercept=True, random_state=self.seed,
        )  # fmt: skip


def normalize_features(features: np.ndarray) -> np.ndarray:
    """float64 rows divided by their L2 norm + 1e-5, as the reference does."""
    x = np.asarray(features, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1) + NORM_EPS)[:, None]


# --------------------------------------------------------------------------- average precision


def reference_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """test_svm.py's AP of one class: labels > 0 are positives; area under the interpolated
    precision envelope (ties as one threshold). NaN without positives."""
    y = np.asarray(labels) > 0
    s = np.asarray(scores, dtype=np.float64)
    npos = int(y.sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # the end of each run of tied scores
    tp, fp = tp[last], fp[last]
    return voc_ap_area(tp / npos, tp / (tp + fp))


def sklearn_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    y = np.asarray(labels) > 0
    if not y.any():
        return float("nan")
    return float(average_precision_score(y, np.asarray(scores, dtype=np.float64)))


AP_FUNCTIONS = {"reference": reference_ap, "sklearn": sklearn_ap}


def ap_columns(
    labels: np.ndarray, scores: np.ndarray, kind: str = "reference", order: Any = None
) -> np.ndarray:
    """(P,) APs of every column of scores (n, P) against one labels (n,), as `reference_ap`
    or `sklearn_ap` compute them one at a time: each positive counts 1/npos times the
    precision at the end of its run of tied scores (scikit-learn), or the precision
    envelope's value there (the reference's interpolated area). `order(s)` may replace the
    sort: it must return numpy's stable argsort of -s along axis 0 (torch_svm.descending
    sorts on every thread)."""
    y = np.asarray(labels) > 0
    s = np.asarray(scores, dtype=np.float64)
    npos = int(y.sum())
    if npos == 0:
        return np.full(s.shape[1], np.nan)
    order = np.argsort(-s, axis=0, kind="stable") if order is None else order(s)
    s = np.take_along_axis(s, order, 0)
    ys = y[order]
    tp = np.cumsum(ys, axis=0)
    precision = tp / np.arange(1, len(s) + 1)[:, None]
    last = np.ones_like(ys)
    last[:-1] = s[1:] != s[:-1]  # the end of each run of tied scores
    # every row takes the value at the end of its run: a reverse running max over the
    # run ends (zero elsewhere), or for scikit-learn the run end's own precision
    if kind == "reference":  # reverse running max over the run ends (zero elsewhere)
        value = np.where(last, precision, 0.0)
        value = np.maximum.accumulate(value[::-1], axis=0)[::-1]
    else:
        value = _run_end_values(precision, last)
    return (ys * value).sum(0) / npos


def _run_end_values(values: np.ndarray, last: np.ndarray) -> np.ndarray:
    """values (n, P) replaced, row by row, by the value at the end of the row's run."""
    n = len(values)
    idx = np.where(last, np.arange(n)[:, None], n)
    end = np.minimum.accumulate(idx[::-1], axis=0)[::-1]
    return np.take_along_axis(values, end, 0)


def class_aps(
    scores: np.ndarray, labels: np.ndarray, difficult: np.ndarray, kind: str = "reference"
) -> np.ndarray:
    """Per-class AP (C,) with difficult-only images left out of their class; NaN where a
    class has no positive test image or no scores (a column of NaN: class not trained)."""
    fn = AP_FUNCTIONS[kind]
    out = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        keep = ~difficult[:, c]
        if np.isnan(scores[keep, c]).any():
            continue
        out[c] = fn(labels[keep, c], scores[keep, c])
    return out


# --------------------------------------------------------------------------- problems


def class_problem(
    labels: np.ndarray, difficult: np.ndarray, c: int, train_difficult: str = "negative"
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, y in {-1, 1}) of class c's training problem: every image, difficult-only ones
    as negatives (the reference) or left out (train_difficult="ignore")."""
    rows = np.arange(len(labels))
    if train_difficult == "ignore":
        rows = rows[~difficult[:, c]]
    elif train_difficult != "negative":
        raise ConfigError(f"train_difficult: {train_difficult!r} is not 'negative' or 'ignore'")
    y = np.where(labels[rows, c] > 0, 1, -1).astype(np.int64)
    return rows, y


def _fit(x: np.ndarray, y: np.ndarray, cost: float, params: SVMParams) -> tuple[LinearSVC, bool]:
    clf = params.make(cost)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf, bool(np.max(clf.n_iter_) >= params.max_iter)


def _cv_task(
    features: np.ndarray,
    rows: np.ndarray,
    y: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    cost: float,
    params: SVMParams,
) -> tuple[float, int, float]:
    """(mean fold AP (scikit-learn, as cross_val_score's 'average_precision') of one cost,
    fits stopped at max_iter, CPU seconds)."""
    cpu = time.process_time()
    aps, unconverged = [], 0
    with threadpool_limits(limits=1):  # same BLAS sums in a worker and in-process
        for train, held in splits:
            clf, capped = _fit(features[rows[train]], y[train], cost, params)
            unconverged += capped
            scores = clf.decision_function(features[rows[held]])
            aps.append(average_precision_score(y[held], scores))
    return float(np.mean(aps)), unconverged, time.process_time() - cpu


def _final_task(
    features: np.ndarray,
    rows: np.ndarray,
    y: np.ndarray,
    cost: float,
    params: SVMParams,
    test_features: np.ndarray,
) -> tuple[np.ndarray, int, float]:
    cpu = time.process_time()
    with threadpool_limits(limits=1):
        clf, capped = _fit(features[rows], y, cost, params)
        scores = clf.decision_function(test_features)
    return scores, int(capped), time.process_time() - cpu


class _Shared:
    """Arrays handed to worker processes as read-only memmaps (no per-task pickling or
    hashing of hundreds of MB); in-process (n_jobs=1) the arrays themselves."""

    def __init__(self, n_jobs: int) -> None:
        self.n_jobs = n_jobs
        self.folder: Path | None = None

    def __enter__(self) -> _Shared:
        if self.n_jobs != 1:
            self.folder = Path(tempfile.mkdtemp(prefix="bench-svm-"))
        return self

    def put(self, name: str, array: np.ndarray) -> np.ndarray:
        if self.folder is None:
            return array
        path = self.folder / f"{name}.npy"
        np.save(path, np.ascontiguousarray(array))
        return np.load(path, mmap_mode="r")

    def __exit__(self, *exc: object) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _parallel(n_jobs: int) -> Parallel:
    return Parallel(n_jobs=n_jobs, backend="loky" if n_jobs != 1 else "sequential",
                    max_nbytes=None)  # fmt: skip


@dataclass
class LayerResult:
    """One layer's SVMs. Arrays are per class (C,); NaN/None where a class was skipped."""

    per_class: dict[str, np.ndarray]  # {"reference": (C,), "sklearn": (C,)} test AP
    costs: list[float | None]  # chosen cost per class
    cv_ap: np.ndarray  # (C, len(costs)) mean cross-validation AP
    scores: np.ndarray  # (N_test, C) decision values, NaN for skipped classes
    skipped: dict[str, str] = field(default_factory=dict)  # class -> why
    unconverged: int = 0  # fits that stopped at max_iter
    fits: int = 0
    seconds: float = 0.0  # wall time
    cpu_seconds: float = 0.0  # CPU time of the fitting tasks, summed over processes

    def mean(self, kind: str) -> float:
        return mean_ap(self.per_class[kind])


def check_svm_settings(
    costs: Sequence[float], folds: int, n_jobs: int, solver: str = "torch"
) -> None:
    if solver not in SOLVERS:
        raise ConfigError(f"solver: {solver!r} is not one of {', '.join(SOLVERS)}")
    if not costs or any(not c > 0 for c in costs):
        raise ConfigError("costs: need at least one cost, every cost > 0")
    if folds < 2:
        raise ConfigError(f"folds: cross-validation needs at least 2 folds, got {folds}")
    if n_jobs == 0 or n_jobs < -1:
        raise ConfigError(f"n_jobs: {n_jobs} (use a positive number or -1 for every core)")


def _bad(message: str, on_bad_data: str, skipped: dict[str, str], name: str,
         logger: logging.Logger) -> None:  # fmt: skip
    if on_bad_data == "error":
        raise DatasetError(message + " (set on_bad_data: skip to leave the class out)")
    skipped[name] = message
    logger.warning(message + "; skipping the class (on_bad_data=skip)")


def train_svms(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    train_difficult: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    test_difficult: np.ndarray,
    *,
    costs: Sequence[float],
    folds: int = 3,
    params: SVMParams = SVMParams(),
    difficult_as: str = "negative",
    n_jobs: int = 1,
    classes: Sequence[str] | None = None,
    on_bad_data: str = "error",
    logger: logging.Logger = log,
) -> LayerResult:
    """Cross-validate the cost of every class, refit, score the test images.

    features: raw (N, D) arrays (normalised here as the reference does); labels (N, C) in
    {0, 1}; difficult (N, C) bool. A class with fewer than `folds` positive or negative
    training images cannot be cross-validated: DatasetError, or skipped with on_bad_data.
    """
    check_svm_settings(costs, folds, n_jobs, params.solver)
    tick = time.perf_counter()
    n_classes = train_labels.shape[1]
    names = list(classes) if classes is not None else [str(c) for c in range(n_classes)]
    xtr, xte = normalize_features(train_features), normalize_features(test_features)
    skipped: dict[str, str] = {}
    problems: dict[int, tuple[np.ndarray, np.ndarray, list]] = {}
    for c in range(n_classes):
        rows, y = class_problem(train_labels, train_difficult, c, difficult_as)
        npos, nneg = int((y > 0).sum()), int((y < 0).sum())
        if min(npos, nneg) < folds:
            _bad(f"class {names[c]}: {npos} positive and {nneg} negative training images, "
                 f"{folds}-fold cross-validation needs {folds} of each",
                 on_bad_data, skipped, names[c], logger)  # fmt: skip
            continue
        splits = list(StratifiedKFold(n_splits=folds).split(np.zeros((len(y), 1)), y))
        problems[c] = (rows, y, splits)
    if params.solver == "torch":
        return _train_svms_torch(xtr, xte, problems, n_classes, costs, folds, params,
                                 test_labels, test_difficult, skipped, tick,
                                 (train_features, test_features))  # fmt: skip

    cv_ap = np.full((n_classes, len(costs)), np.nan)
    scores = np.full((len(xte), n_classes), np.nan)
    chosen: list[float | None] = [None] * n_classes
    unconverged, cpu = 0, 0.0
    with _Shared(n_jobs) as shared:
        xtr_s, xte_s = shared.put("train", xtr), shared.put("test", xte)
        # largest costs first: they take the most iterations, so the pool stays busy
        jobs = sorted(((c, j) for c in problems for j in range(len(costs))),
                      key=lambda cj: (-costs[cj[1]], cj[0]))  # fmt: skip
        results = _parallel(n_jobs)(
            delayed(_cv_task)(
                xtr_s, problems[c][0], problems[c][1], problems[c][2], costs[j], params
            )  # fmt: skip
            for c, j in jobs
        )
        for (c, j), (ap, capped, seconds) in zip(jobs, results):
            cv_ap[c, j] = ap
            unconverged += capped
            cpu += seconds
        order = list(problems)
        for c in order:
            chosen[c] = float(costs[int(np.argmax(cv_ap[c]))])
        finals = _parallel(n_jobs)(
            delayed(_final_task)(
                xtr_s, problems[c][0], problems[c][1], chosen[c], params, xte_s
            )  # fmt: skip
            for c in order
        )
        for c, (s, capped, seconds) in zip(order, finals):
            scores[:, c] = s
            unconverged += capped
            cpu += seconds
    per_class = {kind: class_aps(scores, test_labels, test_difficult, kind)
                 for kind in AP_FUNCTIONS}  # fmt: skip
    fits = len(jobs) * folds + len(order)
    return LayerResult(per_class, chosen, cv_ap, scores, skipped, unconverged, fits,
                       time.perf_counter() - tick, cpu)  # fmt: skip


def _train_svms_torch(
    xtr: np.ndarray,
    xte: np.ndarray,
    problems: dict[int, tuple[np.ndarray, np.ndarray, list]],
    n_classes: int,
    costs: Sequence[float],
    folds: int,
    params: SVMParams,
    test_labels: np.ndarray,
    test_difficult: np.ndarray,
    skipped: dict[str, str],
    tick: float,
    key: tuple[np.ndarray, np.ndarray],
) -> LayerResult:
    from .torch_svm import cross_validate

    cpu = time.process_time()
    layer = _layer_gram(key, xtr, xte, params.device)
    cv_ap, chosen, scores, unconverged = cross_validate(
        layer, problems, n_classes, costs, params.positive_weight,
        lambda y, s: ap_columns(y, s, "sklearn"),
    )  # fmt: skip
    per_class = {kind: class_aps(scores, test_labels, test_difficult, kind)
                 for kind in AP_FUNCTIONS}  # fmt: skip
    fits = len(problems) * (len(costs) * folds + 1)  # every fold at every cost, one refit
    return LayerResult(per_class, chosen, cv_ap, scores, skipped, unconverged, fits,
                       time.perf_counter() - tick, time.process_time() - cpu)  # fmt: skip


_LAYER: list[Any] = []  # [(weakrefs of the raw train and test arrays, device, LayerGram)]


def _layer_gram(key: tuple[np.ndarray, np.ndarray], xtr: np.ndarray, xte: np.ndarray,
                device: str) -> Any:  # fmt: skip
    """torch_svm.LayerGram of a layer's features, kept for the next call on the same raw
    arrays (cross-validation then low-shot of a layer: one Gram matrix, not two)."""
    import torch

    from .torch_svm import LayerGram

    if _LAYER:
        (rtr, rte), dev, layer = _LAYER[0]
        if rtr() is key[0] and rte() is key[1] and dev == device:
            return layer
    _LAYER.clear()
    layer = LayerGram(xtr, xte, torch.device(device))
    _LAYER.append(((weakref.ref(key[0]), weakref.ref(key[1])), device, layer))
    return layer


# --------------------------------------------------------------------------- low shot


def _draw_seed(seed: int, draw: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, draw, k]).generate_state(1)[0])


def low_shot_sample(
    targets: np.ndarray,
    k: int,
    draw: int,
    seed: int = 0,
    negatives_per_positive: int | None = None,
    on_bad_data: str = "error",
    classes: Sequence[str] | None = None,
) -> tuple[np.ndarray, dict[str, str]]:
    """One low-shot training set, in create_voc_low_shot_samples.py's coding and order.

    targets: (N, C) int, 1 present / 0 absent / -1 difficult only (SplitImages.targets).
    Returns (sample (N, C) int8: 1 drawn positive, 0 drawn negative, -1 not used; skipped
    classes -> why). Per class, k of the images with target 1 and `negatives_per_positive`
    * k (default C - 1 = 19) of those with target 0 are drawn with Python's random.sample,
    first the positives of every class, then the negatives, from a generator seeded by
    (seed, draw, k); difficult-only images are never drawn. A class with too few images is
    an error (the reference's random.sample would fail), or skipped with on_bad_data.
    """
    targets = np.asarray(targets)
    n_classes = targets.shape[1]
    names = list(classes) if classes is not None else [str(c) for c in range(n_classes)]
    ratio = n_classes - 1 if negatives_per_positive is None else negatives_per_positive
    if k < 1 or ratio < 1:
        raise ConfigError(f"low-shot: need k >= 1 and >= 1 negative per positive, got {k}, {ratio}")
    rng = random.Random(_draw_seed(seed, draw, k))
    out = np.full(targets.shape, -1, dtype=np.int8)
    skipped: dict[str, str] = {}

    def check(c: int, pool: np.ndarray, need: int, what: str) -> bool:
        if len(pool) >= need:
            return True
        message = (f"low-shot k={k}: class {names[c]} has {len(pool)} {what} training "
                   f"images, {need} are needed")  # fmt: skip
        if on_bad_data == "error":
            raise DatasetError(message + " (set on_bad_data: skip to leave the class out)")
        skipped[names[c]] = message
        return False

    for c in range(n_classes):
        pool = np.flatnonzero(targets[:, c] == 1)
        if check(c, pool, k, "positive"):
            out[rng.sample(list(pool), k), c] = 1
    for c in range(n_classes):
        if names[c] in skipped:
            continue
        pool = np.flatnonzero(targets[:, c] == 0)
        if check(c, pool, ratio * k, "negative"):
            out[rng.sample(list(pool), ratio * k), c] = 0
        else:
            out[:, c] = -1
    return out, skipped


def _low_shot_task(
    features: np.ndarray,
    sample: np.ndarray,
    costs: Sequence[float],
    params: SVMParams,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    test_difficult: np.ndarray,
    kind: str,
) -> tuple[np.ndarray, int]:
    """Test AP (len(costs), C) of one drawn training set, every class and cost."""
    n_classes = sample.shape[1]
    out = np.full((len(costs), n_classes), np.nan)
    unconverged = 0
    fn = AP_FUNCTIONS[kind]
    with threadpool_limits(limits=1):  # same BLAS sums in a worker and in-process
        for c in range(n_classes):
            rows = np.flatnonzero(sample[:, c] != -1)
            if not rows.size:
                continue
            x = features[rows]
            y = np.where(sample[rows, c] == 1, 1, -1)
            keep = ~test_difficult[:, c]
            xt, yt = test_features[keep], test_labels[keep, c]
            for j, cost in enumerate(costs):
                clf, capped = _fit(x, y, cost, params)
                unconverged += capped
                out[j, c] = fn(yt, clf.decision_function(xt))
    return out, unconverged


def _low_shot_torch(
    layer: Any,
    samples: dict[tuple[int, int], np.ndarray],
    keys: list[tuple[int, int]],
    costs: Sequence[float],
    params: SVMParams,
    test_labels: np.ndarray,
    test_difficult: np.ndarray,
    kind: str,
) -> list[tuple[np.ndarray, int]]:
    """_low_shot_task's (AP (len(costs), C), unconverged) for every key, by torch_svm."""
    from .torch_svm import descending, low_shot_scores

    results = []
    for kd in keys:
        sample = samples[kd]
        scores, unconverged = low_shot_scores(layer, sample, costs, params.positive_weight)
        table = np.full((len(costs), sample.shape[1]), np.nan)
        for c, s in enumerate(scores):
            if s is None:
                continue
            keep = ~test_difficult[:, c]
            table[:, c] = ap_columns(test_labels[keep, c], s[keep], kind, descending)
        results.append((table, unconverged))
    return results


def low_shot(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    test_difficult: np.ndarray,
    *,
    sizes: Sequence[int],
    draws: int,
    costs: Sequence[float],
    seed: int = 0,
    params: SVMParams = SVMParams(),
    negatives_per_positive: int | None = None,
    n_jobs: int = 1,
    kind: str = "reference",
    classes: Sequence[str] | None = None,
    on_bad_data: str = "error",
    logger: logging.Logger = log,
) -> dict[str, dict[str, Any]]:
    """{str(k): {mean, std, draws, cost, classes, skipped}} over `draws` independent draws.

    train_targets: (N, C) 1 / 0 / -1 (SplitImages.targets). mean/std are over the draws'
    test mAPs at the cost whose mean over draws is best (aggregate_low_shot_svm_stats.py);
    std is numpy's population std. A k for which no class can be drawn is reported with
    mean None and the reasons.
    """
    if draws < 1 or not sizes:
        raise ConfigError("low_shot_draws must be >= 1 and low_shot_sizes non-empty")
    xtr, xte = normalize_features(train_features), normalize_features(test_features)
    n_classes = train_targets.shape[1]
    names = list(classes) if classes is not None else [str(c) for c in range(n_classes)]
    samples: dict[tuple[int, int], np.ndarray] = {}
    skipped: dict[int, dict[str, str]] = {}
    for k in sizes:
        skipped[k] = {}
        for d in range(draws):
            sample, why = low_shot_sample(train_targets, k, d, seed, negatives_per_positive,
                                          on_bad_data, names)  # fmt: skip
            skipped[k].update(why)
            samples[(k, d)] = sample
    for why in skipped.values():
        for message in why.values():
            logger.warning(message + "; skipping the class (on_bad_data=skip)")
    out: dict[str, dict[str, Any]] = {}
    keys = sorted(samples, key=lambda kd: (-kd[0], kd[1]))  # big training sets first
    if params.solver == "torch":
        layer = _layer_gram((train_features, test_features), xtr, xte, params.device)
        results = _low_shot_torch(layer, samples, keys, costs, params, test_labels,
                                  test_difficult, kind)  # fmt: skip
    else:
        with _Shared(n_jobs) as shared:
            xtr_s, xte_s = shared.put("train", xtr), shared.put("test", xte)
            results = _parallel(n_jobs)(
                delayed(_low_shot_task)(
                    xtr_s, samples[kd], costs, params, xte_s, test_labels, test_difficult, kind
                )  # fmt: skip
                for kd in keys
            )
    by_key = dict(zip(keys, results))
    for k in sizes:
        # (draws, costs) mAP over the classes that could be drawn
        table = np.array([[mean_ap(by_key[(k, d)][0][j]) for j in range(len(costs))]
                          for d in range(draws)])  # fmt: skip
        used = [names[c] for c in range(n_classes) if names[c] not in skipped[k]]
        entry: dict[str, Any] = {"mean": None, "std": None, "draws": [], "cost": None,
                                 "classes": len(used), "skipped": skipped[k]}  # fmt: skip
        if used and not np.isnan(table).all():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                means = np.nanmean(table, axis=0)
            j = int(np.nanargmax(means))
            entry.update(mean=float(means[j]), std=float(np.std(table[:, j])),
                         draws=[float(v) for v in table[:, j]], cost=float(costs[j]))  # fmt: skip
        entry["unconverged"] = int(sum(by_key[(k, d)][1] for d in range(draws)))
        out[str(k)] = entry
    return out
