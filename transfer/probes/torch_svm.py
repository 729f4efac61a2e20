"""Goyal et al.'s SVM protocol on `solver.py`: every class, cost and fold of a layer at once.

Cross-validation: one Gram matrix K = X X^T of the layer's trainval rows (bias feature
included) serves every problem; a fold is a column whose held-out rows have weight 0, so
their margins come out of the same products as the training margins. The batch holds every
(class, fold) and walks the cost grid upwards, each cost warm-started from the previous one.
The refit on all of trainval runs once per class, at its chosen cost (as the reference does),
started from its folds' solutions. Test scores are X_test (X^T beta), in float64.

Low shot: a drawn training set of class c is a row subset S_c of trainval, so its Gram
matrix is the block K[S_c, S_c] of the same K; every class and cost of a draw is solved in
one batch of those blocks, and its test scores are K_test[:, S_c] beta.

Imported lazily by `svm.py`, whose liblinear worker processes never load torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .solver import Gram, gram_matrix, margins, newton, rescale

PRECONDITIONER_RANK = 64
# low-shot: costs up to 0.01 solved together from zero, larger ones one after another along
# the path (`_cost_path`; batching 0.0156-0.1 from the 0.01 solution measured slower)
BATCH_TIERS = (0.01,)
TOL = 1e-4  # ||grad|| <= TOL ||w||: weights within 1e-4 (relative) of the optimum


def _augmented(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 (n, d + 1): the normalised features and liblinear's constant 1 (the bias
    feature, intercept_scaling 1)."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    return torch.cat([t, torch.ones(len(t), 1, dtype=t.dtype, device=device)], 1)


class LayerGram:
    """A layer's trainval Gram matrix (bias feature included) with its preconditioner, and
    the float64 features for test scores. Built once per layer, shared by cross-validation
    and low-shot."""

    def __init__(self, xtr: np.ndarray, xte: np.ndarray, device: torch.device) -> None:
        X = _augmented(xtr, device)
        self.gram = Gram.of(gram_matrix(X), PRECONDITIONER_RANK)
        del X
        self.xtr, self.xte, self.device = xtr, xte, device
        self._test: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.gram.k32.shape[-1]

    def test_gram(self) -> torch.Tensor:
        """K_test (N_test, n) = [X_test 1] [X 1]^T in float32 (low-shot scores)."""
        if self._test is None:
            self._test = gram_matrix(_augmented(self.xte, self.device),
                                     _augmented(self.xtr, self.device))  # fmt: skip
        return self._test

    def test_scores(self, beta: torch.Tensor) -> np.ndarray:
        """(N_test, P) scores of the solutions beta (P, n) on all trainval rows, through
        w = X^T beta in float64 (beta's entries cancel; float32 would lose digits)."""
        b = beta.double().cpu().numpy()
        w = self.xtr.T @ b.T  # (d, P)
        return np.asarray(self.xte, dtype=np.float64) @ w + b.sum(1)[None, :]


def _columns(
    n: int, problems: dict[int, tuple[np.ndarray, np.ndarray, list]], positive_weight: float,
    refit: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:  # fmt: skip
    """Row weights a and labels y (1, P, n) float64 of every (class, fold) (refit: every
    class on all its rows, fold -1), and the (class, fold) of each column."""
    A, Y, cols = [], [], []
    for c, (rows, y, splits) in problems.items():
        label = np.zeros(n)
        label[rows] = y
        weight = np.where(y > 0, positive_weight, 1.0)
        parts = [(np.arange(len(rows)), -1)] if refit else [(t, f) for f, (t, _) in
                                                             enumerate(splits)]  # fmt: skip
        for train, f in parts:
            a = np.zeros(n)
            a[rows[train]] = weight[train]
            A.append(a)
            Y.append(label)
            cols.append((c, f))
    return torch.tensor(np.stack(A))[None], torch.tensor(np.stack(Y))[None], cols


def cross_validate(
    layer: LayerGram,
    problems: dict[int, tuple[np.ndarray, np.ndarray, list]],
    n_classes: int,
    costs: Sequence[float],
    positive_weight: float,
    ap_columns,
    tol: float = TOL,
) -> tuple[np.ndarray, list[float | None], np.ndarray, int]:
    """(cv_ap (C, J) in `costs` order, chosen cost per class, test scores (N_test, C),
    problems stopped before convergence); NaN / None for classes not in `problems`.
    ap_columns(labels (n,), scores (n, P)) -> (P,) APs (scikit-learn's, as the reference's
    cross_val_score)."""
    gram, n = layer.gram, layer.n
    cv_ap = np.full((n_classes, len(costs)), np.nan)
    chosen: list[float | None] = [None] * n_classes
    scores = np.full((len(layer.xte), n_classes), np.nan)
    if not problems:
        return cv_ap, chosen, scores, 0
    a, y, cols = _columns(n, problems, positive_weight, refit=False)
    a, y = a.to(layer.device), y.to(layer.device)
    P = a.shape[1]
    unconverged = 0
    path: dict[float, torch.Tensor] = {}  # cost -> fold solutions (P, n)
    beta = o = None
    for cost in sorted(set(float(c) for c in costs)):
        C = torch.full((1, P), cost, dtype=torch.float64, device=layer.device)
        if beta is not None:
            beta, o = rescale(beta, o, a, y, C)
        beta, o, info = newton(gram, a, y, C, beta, o, tol=tol)
        unconverged += int((~info.converged).sum())
        path[cost] = beta[0].clone()
        held_out = o[0].cpu().numpy()
        for c, (rows, yc, splits) in problems.items():
            fold_aps = []
            for p, (cc, f) in enumerate(cols):
                if cc == c:
                    held = rows[splits[f][1]]
                    fold_aps.append(ap_columns(yc[splits[f][1]], held_out[p, held][:, None])[0])
            mean = float(np.mean(fold_aps))
            for j, v in enumerate(costs):
                if float(v) == cost:
                    cv_ap[c, j] = mean
    for c in problems:
        chosen[c] = float(costs[int(np.argmax(cv_ap[c]))])
    # the refit: every class on all its rows at its chosen cost, from its folds' mean
    a, y, rcols = _columns(n, problems, positive_weight, refit=True)
    a, y = a.to(layer.device), y.to(layer.device)
    C = torch.tensor([[chosen[c] for c, _ in rcols]], dtype=torch.float64, device=layer.device)
    start = torch.stack([
        sum(path[chosen[c]][p] for p, (cc, _) in enumerate(cols) if cc == c) for c, _ in rcols
    ])[None]  # fmt: skip
    start, o = rescale(start, margins(gram, start), a, y, C)
    beta, _, info = newton(gram, a, y, C, start, o, tol=tol)
    unconverged += int((~info.converged).sum())
    s = layer.test_scores(beta[0])
    for p, (c, _) in enumerate(rcols):
        scores[:, c] = s[:, p]
    return cv_ap, chosen, scores, unconverged


def low_shot_scores(
    layer: LayerGram,
    sample: np.ndarray,
    costs: Sequence[float],
    positive_weight: float,
    tol: float = TOL,
) -> tuple[list[np.ndarray | None], int]:
    """Test scores (N_test, J) of every class of one drawn training set (None where the
    class was not drawn), and the number of problems stopped before convergence."""
    n_classes = sample.shape[1]
    out: list[np.ndarray | None] = [None] * n_classes
    unconverged = 0
    device = layer.device
    by_size: dict[int, list[int]] = {}
    for c in range(n_classes):
        m = int((sample[:, c] != -1).sum())
        if m:
            by_size.setdefault(m, []).append(c)
    solved: list[tuple[list[int], Tensor, Tensor]] = []  # (classes, rows (G, m), beta (G, J, m))
    for classes in by_size.values():
        index = torch.as_tensor(np.stack([np.flatnonzero(sample[:, c] != -1)
                                          for c in classes]), device=device)  # fmt: skip
        block = layer.gram.rows(index)
        yv = np.stack([np.where(sample[np.flatnonzero(sample[:, c] != -1), c] == 1, 1.0, -1.0)
                       for c in classes])  # fmt: skip
        yt = torch.as_tensor(yv, device=device)[:, None, :]
        at = torch.where(yt > 0, positive_weight, 1.0).to(yt)
        beta, count = _cost_path(block, at, yt, costs, tol)
        unconverged += count
        solved.append((classes, index, beta))
    if solved:
        scores = _test_scores(layer, solved)
        J = len(costs)
        done = [c for classes, _, _ in solved for c in classes]
        for i, c in enumerate(done):
            out[c] = scores[:, i * J : (i + 1) * J]
    return out, unconverged


def _test_scores(layer: LayerGram, solved: list[tuple[list[int], Tensor, Tensor]]) -> np.ndarray:
    """(N_test, classes x J) test scores of every solved class and cost, in `solved` order:
    one product of K_test's columns on the rows any class trained on with the solutions
    scattered into those rows (a gather of K_test's columns per class reads far more)."""
    device = layer.device
    rows = torch.unique(torch.cat([index.reshape(-1) for _, index, _ in solved]))
    where = torch.full((layer.n,), -1, dtype=torch.long, device=device)
    where[rows] = torch.arange(len(rows), device=device)
    J = solved[0][2].shape[1]
    cols = sum(len(classes) for classes, _, _ in solved) * J
    B = torch.zeros(len(rows), cols, dtype=torch.float32, device=device)
    col = 0
    for classes, index, beta in solved:
        for g in range(len(classes)):
            B[where[index[g]], col : col + J] = beta[g].float().T
            col += J
    test = layer.test_gram()
    k = test if len(rows) == layer.n else test[:, rows]
    return (k @ B).double().cpu().numpy()


def _cost_path(
    block: Gram, a: Tensor, y: Tensor, costs: Sequence[float], tol: float
) -> tuple[Tensor, int]:
    """beta (G, J, m) of every block at every cost (in `costs` order) for one problem per
    block (a, y: (G, 1, m)), and the number stopped before convergence. The costs are
    solved in tiers (BATCH_TIERS): the first from zero (every training row is inside the
    margin there: one or two Newton steps), each next tier's costs together, started from
    the previous tier's largest solution rescaled, and costs above the last tier one after
    another along the path (a few steps each, where a cold start would take ten or more).
    A tier's columns share each product with K: a matrix-vector product reads all of K,
    so several columns cost about one."""
    G, _, m = a.shape
    order = sorted(set(float(c) for c in costs))
    tiers: list[list[float]] = []
    lower = 0.0
    for upper in BATCH_TIERS:
        tier = [c for c in order if lower < c <= upper]
        if tier:
            tiers.append(tier)
        lower = upper
    tiers += [[c] for c in order if c > lower]
    found: dict[float, Tensor] = {}
    unconverged = 0
    beta = o = None
    for tier in tiers:
        J = len(tier)
        C = torch.tensor([tier], dtype=torch.float64, device=a.device).expand(G, -1)
        aj, yj = a.expand(-1, J, -1), y.expand(-1, J, -1)
        if beta is not None:
            beta, o = rescale(beta.expand(-1, J, -1), o.expand(-1, J, -1), aj, yj, C)
        beta, o, info = newton(block, aj, yj, C, beta, o, tol=tol)
        unconverged += int((~info.converged).sum())
        for j, c in enumerate(tier):
            found[c] = beta[:, j]
        beta, o = beta[:, -1:], o[:, -1:]
    return torch.stack([found[float(c)] for c in costs], 1), unconverged


def descending(scores: np.ndarray) -> np.ndarray:
    """numpy's np.argsort(-scores, axis=0, kind="stable") by torch, on every thread (a stable
    descending sort keeps tied scores in row order, as the stable sort of -scores does). The
    low-shot protocol scores 20 classes x 26 costs x 40 draws: numpy's single-threaded sort
    was an eighth of its time."""
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64)).T.contiguous()
    return torch.sort(s, dim=1, descending=True, stable=True).indices.T.numpy()
