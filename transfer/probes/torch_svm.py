"""Goyal et al.'s SVM protocol on `solver.py`: every class, cost and fold of a layer at once.

Cross-validation and refit: one QR basis of the layer's trainval rows serves every problem
(a fold is a row subset); the batch holds, per class, one problem per fold and one on all of
trainval, and walks the cost grid upwards, each cost warm-started from the previous one. The
held-out margins of every fold come out of the same matmul as the training margins.

Low shot: each (draw, k, class) problem has its own 20k rows; its basis is the Cholesky
factor of their Gram matrix (rows of L, L L^T = X_S X_S^T), all 26 costs solved together,
the test scores read through the test-train Gram matrix of the layer.

Imported lazily by `svm.py`, whose liblinear worker processes never load torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from .solver import make_basis, newton, qr_rows, solve_path, weights_of

PRECONDITIONER_RANK = 64
TOL = 1e-4  # ||grad|| <= TOL ||z||: weights within 1e-4 (relative) of the optimum


def _augmented(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 (n, d + 1): the normalised features and liblinear's constant 1 (the bias
    feature, intercept_scaling 1)."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    return torch.cat([t, torch.ones(len(t), 1, dtype=t.dtype, device=device)], 1)


def cross_validate(
    xtr: np.ndarray,
    xte: np.ndarray,
    problems: dict[int, tuple[np.ndarray, np.ndarray, list]],
    n_classes: int,
    costs: Sequence[float],
    positive_weight: float,
    device: torch.device,
    tol: float = TOL,
) -> tuple[np.ndarray, list[float | None], np.ndarray, int]:
    """(cv_ap (C, J) in `costs` order, chosen cost per class, test scores (N_test, C),
    problems stopped before convergence); NaN / None for classes not in `problems`."""
    X = _augmented(xtr, device)
    n = len(X)
    G = qr_rows(X) if n <= X.shape[1] else X  # more rows than dims: the features themselves
    basis = make_basis(G, PRECONDITIONER_RANK)
    columns: list[tuple[int, int]] = []  # (class, fold); fold == -1: all of trainval
    A = []
    Y = []
    for c, (rows, y, splits) in problems.items():
        label = np.zeros(n, dtype=np.float32)
        label[rows] = y
        weight = np.where(y > 0, positive_weight, 1.0).astype(np.float32)
        for f, (train, _) in enumerate(list(splits) + [(np.arange(len(rows)), None)]):
            a = np.zeros(n, dtype=np.float32)
            a[rows[train]] = weight[train]
            A.append(a)
            Y.append(label)
            columns.append((c, f if f < len(splits) else -1))
    At = torch.as_tensor(np.stack(A, 1), device=device)
    Yt = torch.as_tensor(np.stack(Y, 1), device=device)
    cv_ap = np.full((n_classes, len(costs)), np.nan)
    refit: dict[float, torch.Tensor] = {}
    unconverged = 0
    index = {float(c): [j for j, v in enumerate(costs) if v == c] for c in costs}
    for cost, Z, info in solve_path(basis, At, Yt, costs, tol=tol):
        unconverged += int((~info.converged).sum())
        margins = (G @ Z).cpu().numpy()
        folds: dict[int, list[float]] = {}
        for p, (c, f) in enumerate(columns):
            if f < 0:
                continue
            rows, y, splits = problems[c]
            held = splits[f][1]
            folds.setdefault(c, []).append(
                float(average_precision_score(y[held], margins[rows[held], p]))
            )
        for c, aps in folds.items():
            for j in index[float(cost)]:
                cv_ap[c, j] = float(np.mean(aps))
        refit[float(cost)] = Z[:, [p for p, (_, f) in enumerate(columns) if f < 0]].clone()
    chosen: list[float | None] = [None] * n_classes
    scores = np.full((len(xte), n_classes), np.nan)
    finals = [c for c, f in columns if f < 0]
    Xte = _augmented(xte, device)
    for i, c in enumerate(finals):
        chosen[c] = float(costs[int(np.argmax(cv_ap[c]))])
        z = refit[chosen[c]][:, i : i + 1]
        w = weights_of(G, X, z) if G is not X else z
        scores[:, c] = (Xte @ w).squeeze(1).cpu().numpy()
    return cv_ap, chosen, scores, unconverged


class LowShotGram:
    """The layer's Gram matrices with the bias feature: train-train (n, n) and test-train."""

    def __init__(self, xtr: np.ndarray, xte: np.ndarray, device: torch.device) -> None:
        X = _augmented(xtr, device)
        self.train = X @ X.T
        self.test = _augmented(xte, device) @ X.T
        self.device = device


def _kernel_basis(K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, T) with G G^T = K (rows in coordinates of their span) and w = X_S^T T z: the
    Cholesky factor (T = L^-T), or where K is singular (repeated rows) its eigenvectors
    above rounding (G = U s^1/2, T = U s^-1/2)."""
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) == 0:
        eye = torch.eye(len(K), dtype=K.dtype, device=K.device)
        return L, torch.linalg.solve_triangular(L.T, eye, upper=True)
    s, U = torch.linalg.eigh(K)
    keep = s > s.max() * len(K) * torch.finfo(K.dtype).eps
    U, s = U[:, keep], s[keep]
    return U * s.sqrt(), U / s.sqrt()


def low_shot_scores(
    gram: LowShotGram,
    sample: np.ndarray,
    costs: Sequence[float],
    positive_weight: float,
    tol: float = TOL,
) -> tuple[list[np.ndarray | None], int]:
    """Test scores (N_test, J) of every class of one drawn training set (None where the
    class was not drawn), and the number of problems stopped before convergence."""
    out: list[np.ndarray | None] = []
    unconverged = 0
    device = gram.device
    Cv = torch.tensor([float(c) for c in costs], dtype=torch.float32, device=device)
    for c in range(sample.shape[1]):
        rows = np.flatnonzero(sample[:, c] != -1)
        if not rows.size:
            out.append(None)
            continue
        idx = torch.as_tensor(rows, device=device)
        G, T = _kernel_basis(gram.train[idx][:, idx])
        y = np.where(sample[rows, c] == 1, 1.0, -1.0).astype(np.float32)
        weight = np.where(y > 0, positive_weight, 1.0).astype(np.float32)
        J = len(costs)
        A = torch.as_tensor(weight, device=device)[:, None].expand(-1, J).contiguous()
        Y = torch.as_tensor(y, device=device)[:, None].expand(-1, J).contiguous()
        basis = make_basis(G, min(PRECONDITIONER_RANK, G.shape[1] // 2))
        Z, info = newton(basis, A, Y, Cv, torch.zeros(G.shape[1], J, device=device), tol=tol)
        unconverged += int((~info.converged).sum())
        out.append((gram.test[:, idx] @ (T @ Z)).cpu().numpy())
    return out, unconverged
