"""The torch SVM solver against scikit-learn's LinearSVC: the same problem, the same optimum.

Objectives are compared in float64 on the original features. Where liblinear stopped at
max_iter (large costs) it is not at the optimum: there the torch objective must be no higher,
and the torch solution's float64 gradient small. Protocol-level: per-class test AP within
0.1 points, the same cross-validated cost wherever the CV APs are not tied (the runner-up
more than 1e-3 below the best), low-shot tables likewise.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

from transfer.probes.solver import Gram, gram_matrix, newton, rescale
from transfer.probes.svm import SVMParams, low_shot, train_svms
from transfer.svm.config import REFERENCE_COSTS

LIB = SVMParams(solver="liblinear")
TORCH = SVMParams(solver="torch")


def features(seed, n, dim=300, classes=3, signal=0.6):
    """Non-negative, strongly correlated rows (like ReLU features) with a class signal."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, classes)) < 0.25).astype(np.float32)
    labels[: 3 * classes] = np.tile(np.eye(classes, dtype=np.float32), (3, 1))
    mean = rng.random(dim)
    x = mean + 0.6 * rng.normal(size=(n, 20)) @ rng.normal(size=(20, dim)) / np.sqrt(20)
    x += signal * labels @ rng.normal(size=(classes, dim)) + 0.3 * rng.normal(size=(n, dim))
    return np.maximum(x, 0).astype(np.float32), labels


def normalise(x):
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1) + 1e-5)[:, None]


def objective(x, y, w, cost, weight=2.0):
    """LinearSVC's primal, float64, bias as the last weight on a constant feature."""
    xa = np.hstack([x, np.ones((len(x), 1))])
    c = np.where(y > 0, weight, 1.0)
    r = np.maximum(0.0, 1.0 - y * (xa @ w))
    grad = w - 2 * cost * xa.T @ (c * y * r)
    return 0.5 * w @ w + cost * np.sum(c * r * r), np.linalg.norm(grad)


def liblinear(x, y, cost):
    clf = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, tol=1e-4,
                    max_iter=2000, random_state=0)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return np.r_[clf.coef_.ravel(), clf.intercept_], int(clf.n_iter_) < 2000


def solve_all(x, labels, costs, tol):
    """{cost: W (d + 1, classes)}: every class on all rows, solved together along the
    cost path (warm starts), as cross-validation does."""
    xa = np.hstack([x, np.ones((len(x), 1))])
    gram = Gram.of(gram_matrix(torch.as_tensor(xa, dtype=torch.float32)), 16)
    y = torch.as_tensor(np.where(labels > 0, 1.0, -1.0).T[None].copy())
    a = torch.where(y > 0, 2.0, 1.0).double()
    out, beta, o = {}, None, None
    for cost in sorted(costs):
        C = torch.full(y.shape[:2], cost, dtype=torch.float64)
        if beta is not None:
            beta, o = rescale(beta, o, a, y, C)
        beta, o, info = newton(gram, a, y, C, beta, o, tol=tol)
        assert bool(info.converged.all()), cost
        out[cost] = xa.T @ beta[0].numpy().T
    return out


def kernel_newton(xa, y, cost, weight=2.0):
    """An independent float64 solve (numpy): Newton's method on the primal in representer
    form, w = xa^T beta, beta_A = (K_AA + diag(1 / (2 C c_A)))^-1 y_A on the active set A,
    with a bisection line search. Certified by its gradient in the test."""
    c = np.where(y > 0, weight, 1.0)
    k = xa @ xa.T
    beta = np.zeros(len(y))
    for _ in range(100):
        o = k @ beta
        act = 1.0 - y * o > 0
        new = np.zeros_like(beta)
        ka = k[np.ix_(act, act)] + np.diag(1.0 / (2 * cost * c[act]))
        new[act] = np.linalg.solve(ka, y[act])
        d = new - beta
        if np.abs(d).max() <= 1e-15 * max(1.0, np.abs(beta).max()):
            break
        kd = k @ d
        lo, hi = 0.0, 1.0  # the derivative along d is increasing: bisect its root
        for _ in range(60):
            t = 0.5 * (lo + hi)
            rt = np.maximum(0.0, 1.0 - y * (o + t * kd))
            der = beta @ kd + t * d @ kd - 2 * cost * np.sum(c * y * rt * kd)
            lo, hi = (t, hi) if der < 0 else (lo, t)
        beta = beta + (1.0 if hi == 1.0 else 0.5 * (lo + hi)) * d
    return xa.T @ beta


def check_objectives(x, labels, costs):
    """Solutions against LinearSVC and against an independent float64 primal solve."""
    ours = solve_all(x, labels, costs, 1e-4)
    xa = np.hstack([x, np.ones((len(x), 1))])
    tight = {cost: np.stack([kernel_newton(xa, np.where(labels[:, c] > 0, 1.0, -1.0), cost)
                             for c in range(labels.shape[1])], 1) for cost in costs}  # fmt: skip
    xa = np.hstack([x, np.ones((len(x), 1))])
    for cost in costs:
        for c in range(labels.shape[1]):
            y = np.where(labels[:, c] > 0, 1.0, -1.0)
            f, _ = objective(x, y, ours[cost][:, c], cost)
            best, grad = objective(x, y, tight[cost][:, c], cost)
            assert grad <= 1e-8 * max(1.0, np.linalg.norm(tight[cost][:, c])), (cost, c)
            w_ref, finished = liblinear(x, y, cost)
            ref, _ = objective(x, y, w_ref, cost)
            assert best <= ref * (1 + 1e-12)  # the float64 optimum is below liblinear's point
            if finished:  # liblinear within its tolerance: the same objective
                assert f == pytest.approx(ref, rel=1e-4), (cost, c)
            else:  # liblinear stopped at max_iter, short of the optimum
                assert f <= ref, (cost, c)
            assert f == pytest.approx(best, rel=1e-5), (cost, c)
            s, s_best = xa @ ours[cost][:, c], xa @ tight[cost][:, c]
            assert np.abs(s - s_best).max() <= 1e-3 * np.abs(s_best).max(), (cost, c)


def test_objectives_match_liblinear_on_synthetic_features():
    x, labels = features(0, 120)
    check_objectives(normalise(x), labels, sorted(REFERENCE_COSTS)[::3] + [10.0, 100.0])


def tied(cv_row, chosen_index, tol=1e-3):
    """Indices of costs whose CV AP is within `tol` of the best (ties)."""
    return set(np.flatnonzero(cv_row >= cv_row[chosen_index] - tol).tolist())


def compare_protocol(xtr, ytr, xte, yte, costs):
    dtr, dte = np.zeros_like(ytr, bool), np.zeros_like(yte, bool)
    ref = train_svms(xtr, ytr, dtr, xte, yte, dte, costs=costs, params=LIB)
    ours = train_svms(xtr, ytr, dtr, xte, yte, dte, costs=costs, params=TORCH)
    np.testing.assert_allclose(ours.cv_ap, ref.cv_ap, atol=2e-3)
    for c in range(ytr.shape[1]):
        best = int(np.argmax(ref.cv_ap[c]))
        assert list(costs).index(ours.costs[c]) in tied(ref.cv_ap[c], best), c
    for kind in ("reference", "sklearn"):
        np.testing.assert_allclose(ours.per_class[kind], ref.per_class[kind], atol=1e-3)
    return ref, ours


def test_protocol_matches_liblinear_on_synthetic_features():
    x, labels = features(1, 300)
    costs = [1e-5, 1e-3, 1e-2, 0.0625, 0.1, 1.0, 10.0]
    compare_protocol(x[:150], labels[:150], x[150:], labels[150:], costs)


def test_low_shot_matches_liblinear():
    x, labels = features(2, 400, classes=3)
    xtr, ytr, xte, yte = x[:250], labels[:250], x[250:], labels[250:]
    targets = ytr.astype(np.int8)
    kw = dict(sizes=[1, 4, 16], draws=2, costs=[1e-4, 0.01, 0.1, 1.0, 100.0], seed=0,
              negatives_per_positive=3)  # fmt: skip
    compare_low_shot(xtr, targets, xte, yte, kw)


def compare_low_shot(xtr, targets, xte, yte, kw):
    """The low-shot summary (mean over draws at the best cost, each draw's mAP) of both
    solvers within 0.1 AP points."""
    dte = np.zeros_like(yte, bool)
    ref = low_shot(xtr, targets, xte, yte, dte, params=LIB, **kw)
    ours = low_shot(xtr, targets, xte, yte, dte, params=TORCH, **kw)
    for k in ref:
        assert ours[k]["mean"] == pytest.approx(ref[k]["mean"], abs=1e-3), k
        np.testing.assert_allclose(ours[k]["draws"], ref[k]["draws"], atol=1e-3)
        assert ours[k]["unconverged"] == 0


# --------------------------------------------------------------------------- real features


@pytest.fixture(scope="module")
def real_features(shared_data):
    """conv2 and pool5 of 240 real VOC images (the sample's first ids) through the seeded
    random CaffeNet at 99 px: 120 train, 120 test."""
    from transfer.probes.features import extract_features, load_split
    from weights.encoder import load_encoder

    images = load_split(Path(shared_data) / "VOCdevkit" / "VOC2007", "train")
    images = images.subset(np.arange(240))
    torch.manual_seed(0)
    encoder, _ = load_encoder(None, "caffenet")
    f = extract_features(encoder, images, ["conv2", "pool5"], input_size=99,
                         resize_shorter=112, batch_size=40, use_cache=False)  # fmt: skip
    return f.arrays, images.labels


@pytest.mark.parametrize("layer", ["conv2", "pool5"])
def test_real_features_objectives(real_features, layer):
    arrays, labels = real_features
    keep = [c for c in range(20) if 3 <= labels[:120, c].sum()][:3]
    costs = [1e-6, 1e-3, 0.0625, 1.0, 100.0]
    check_objectives(normalise(arrays[layer][:120]), labels[:120, keep], costs)


@pytest.mark.parametrize("layer", ["conv2", "pool5"])
def test_real_features_protocol(real_features, layer):
    arrays, labels = real_features
    keep = [c for c in range(20) if min(labels[:120, c].sum(), labels[120:, c].sum()) >= 3][:4]
    x, y = arrays[layer], labels[:, keep]
    compare_protocol(x[:120], y[:120], x[120:], y[120:], [1e-4, 1e-2, 0.0625, 0.1, 1.0])


def test_ap_columns_match_the_one_at_a_time_aps():
    """The batched APs (numpy's sort and torch's, every column at once) against reference_ap
    and sklearn_ap, ties included (scores rounded to one decimal)."""
    from transfer.probes.svm import ap_columns, reference_ap, sklearn_ap
    from transfer.probes.torch_svm import descending

    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 60))
        y = (rng.random(n) < 0.3).astype(int)
        y[0] = 1
        s = np.round(rng.normal(size=(n, 5)), 1)
        for kind, fn in (("reference", reference_ap), ("sklearn", sklearn_ap)):
            expected = [fn(y, s[:, j]) for j in range(5)]
            np.testing.assert_allclose(ap_columns(y, s, kind), expected, atol=1e-12)
            np.testing.assert_allclose(ap_columns(y, s, kind, descending), expected, atol=1e-12)
            np.testing.assert_array_equal(descending(s), np.argsort(-s, axis=0, kind="stable"))
    assert np.isnan(ap_columns(np.zeros(4), np.ones((4, 2)))).all()


@pytest.mark.parametrize("layer", ["conv2", "pool5"])
def test_real_features_low_shot(real_features, layer):
    arrays, labels = real_features
    keep = [c for c in range(20) if labels[:120, c].sum() >= 2][:3]
    x, y = arrays[layer], labels[:, keep]
    kw = dict(sizes=[1, 2], draws=2, costs=[1e-4, 0.01, 0.1, 1.0, 100.0], seed=0,
              negatives_per_positive=5)  # fmt: skip
    compare_low_shot(x[:120], y[:120].astype(np.int8), x[120:], y[120:], kw)
