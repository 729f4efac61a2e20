"""LinearSVC's problem, solved for many (class, cost, fold) at once with torch.

The problem (scikit-learn's LinearSVC with loss='squared_hinge', penalty='l2', an intercept
with intercept_scaling 1, i.e. liblinear's L2R_L2LOSS_SVC on features with a constant 1
appended, the intercept regularised like every weight):

    min_w  0.5 ||w||^2 + C * sum_i c_i * max(0, 1 - y_i <w, x_i>)^2

with c_i the class weight of row i (2 for positives in Goyal et al.'s protocol). It is
strongly convex, so it has one optimum; liblinear's dual coordinate descent approaches it to
its tolerance, this module approaches the same point by Newton's method.

How. The optimum lies in the span of the training rows, so with X (n, d+1) = R^T Q^T (the
QR factorisation of X^T) every row subset of X is solved in z = Q^T w coordinates, where the
rows are G = R^T (n, n) and margins are G z. Householder QR is backward stable: G is X up to
float32 rounding, with none of the squared conditioning of a Gram matrix. Every problem is a
column of one batch: a weight per row (0 outside its training rows), its labels, its cost.
Each Newton step solves H d = -g by conjugate gradients, H = I + 2C G^T D G (D: the weights of
the rows inside the margin), every Hessian product being two matmuls (n, n) @ (n, P) for the
whole batch; the preconditioner is H restricted exactly to the top `rank` right singular
vectors of G (a dense block per problem) and the identity elsewhere. The step length is the
exact minimiser along d of the piecewise quadratic objective. Problems leave the batch when
converged; a path over increasing costs starts each cost from the previous solution.

Stopping: ||grad f(z)|| <= tol * ||z||. f is 1-strongly convex, so then
||z - z*|| <= ||grad f|| and f(z) - f* <= ||grad f||^2 / 2: the weights are within `tol`
(relative) of the optimum and the objective within tol^2 / 2 of it, relative to ||z||^2.
Everything runs in float32 (matmuls in full float32: TF32 is never enabled here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch


@dataclass
class Basis:
    """Rows G (n, r) of the data in orthonormal coordinates of their span, and the
    preconditioner's subspace: V (r, k) top right singular vectors of G, B = G V (n, k)."""

    G: torch.Tensor
    V: torch.Tensor
    B: torch.Tensor


def top_subspace(G: torch.Tensor, rank: int, seed: int = 0, power: int = 2) -> torch.Tensor:
    """V (r, k): G's top right singular vectors by randomised subspace iteration (Halko et
    al. 2011, Alg. 4.4), k = min(rank, r)."""
    r = G.shape[1]
    k = min(rank, r)
    if k == 0:
        return G.new_zeros(r, 0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(r, min(k + 16, r), generator=gen).to(G)
    y = torch.linalg.qr(G @ omega).Q
    for _ in range(power):
        y = torch.linalg.qr(G.T @ y).Q
        y = torch.linalg.qr(G @ y).Q
    vh = torch.linalg.svd(y.T @ G, full_matrices=False).Vh  # (k+16, r)
    return vh[:k].T.contiguous()


def make_basis(G: torch.Tensor, rank: int = 64) -> Basis:
    V = top_subspace(G, rank)
    return Basis(G, V, G @ V)


def qr_rows(X: torch.Tensor) -> torch.Tensor:
    """R^T (n, n) of X^T = Q R: the rows of X (n, d), n <= d, in coordinates of their span."""
    if X.shape[0] > X.shape[1]:
        raise ValueError(f"qr_rows needs at most as many rows as columns, got {tuple(X.shape)}")
    R = torch.linalg.qr(X.T, mode="r").R
    return R.T.contiguous()


def weights_of(R_t: torch.Tensor, X: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """w (d, P) = Q z for G = R^T = qr_rows(X): Q = X^T R^-1, so w = X^T (R^-1 z)."""
    beta = torch.linalg.solve_triangular(R_t.T, Z, upper=True)
    return X.T @ beta


@dataclass
class SolveInfo:
    newton: torch.Tensor  # (P,) Newton steps taken
    converged: torch.Tensor  # (P,) bool: ||grad|| <= tol ||z|| reached
    grad_norm: torch.Tensor  # (P,) last ||grad||
    cg: int = 0  # conjugate-gradient iterations, summed over problems


def _line_search(
    zd: torch.Tensor, dd: torch.Tensor, r: torch.Tensor, yq: torch.Tensor, a: torch.Tensor,
    C: torch.Tensor, iters: int = 50,
) -> torch.Tensor:  # fmt: skip
    """Exact step t >= 0 minimising 0.5||z + t d||^2 + C sum a (r - t yq)_+^2 per column,
    by Newton's method on its piecewise-linear, increasing derivative (from t = 1)."""
    t = torch.ones_like(zd)
    for _ in range(iters):
        s = (r - t * yq).clamp_min(0) * (a > 0)
        der = zd + t * dd - 2 * C * (a * yq * s).sum(0)
        sec = dd + 2 * C * (a * yq * yq * (s > 0)).sum(0)
        step = der / sec.clamp_min(torch.finfo(sec.dtype).tiny)
        t = t - step
        if bool((step.abs() <= 1e-6 * t.abs().clamp_min(1e-12)).all()):
            break
    return t.clamp_min(0)


def _weighted_grams(B: torch.Tensor, a: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """(P, k, k) B^T diag(a[:, p]) B for every column p, `chunk` columns per batched matmul
    (an einsum would build an (n, P, k, k) intermediate)."""
    out = [(a[:, i : i + chunk].T.unsqueeze(2) * B).transpose(1, 2) @ B
           for i in range(0, a.shape[1], chunk)]  # fmt: skip
    return torch.cat(out)


def _precondition(V: torch.Tensor, chol: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """M^-1 v for M = V H_k V^T + (I - V V^T), H_k = chol chol^T per column."""
    if chol is None:
        return v
    c = V.T @ v
    s = torch.cholesky_solve(c.T.unsqueeze(-1), chol).squeeze(-1).T
    return v + V @ (s - c)


def newton(
    basis: Basis,
    A: torch.Tensor,
    Y: torch.Tensor,
    C: torch.Tensor,
    Z: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_newton: int = 60,
    max_cg: int = 500,
    eta: float = 0.1,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve P problems, column p: row weights A[:, p] (0 = row not used), labels Y[:, p] in
    {-1, 1}, cost C[p], start Z[:, p]. Returns (Z, info)."""
    G, V, B = basis.G, basis.V, basis.B
    P = A.shape[1]
    Z = Z.clone()
    k = V.shape[1]
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    steps = torch.zeros(P, dtype=torch.int64)
    converged = torch.zeros(P, dtype=torch.bool)
    gnorm = torch.full((P,), float("inf"), dtype=Z.dtype)
    todo = torch.arange(P, device=Z.device)
    cg_total = 0
    for _ in range(max_newton + 1):
        if todo.numel() == 0:
            break
        Zi, Ai, Yi, Ci = Z[:, todo], A[:, todo], Y[:, todo], C[todo]
        M = G @ Zi
        r = 1 - Yi * M
        a = Ai * (r > 0)
        grad = Zi - 2 * Ci * (G.T @ (a * Yi * r))
        gn = grad.norm(dim=0)
        gnorm[todo.cpu()] = gn.cpu()
        done = gn <= tol * Zi.norm(dim=0)
        converged[todo[done].cpu()] = True
        keep = ~done
        if int(steps[todo.cpu()].max()) >= max_newton:
            break
        if not bool(keep.any()):
            break
        todo, Zi, Yi, Ci, Ai, M, r, a, grad, gn = (
            t[..., keep] for t in (todo, Zi, Yi, Ci, Ai, M, r, a, grad, gn)
        )
        steps[todo.cpu()] += 1
        # block preconditioner on span(V): I + 2C B^T diag(a) B, identity elsewhere
        chol = None
        if k:
            blocks = _weighted_grams(B, a) * (2 * Ci)[:, None, None] + eye
            chol = torch.linalg.cholesky(blocks)
        precondition = partial(_precondition, V, chol)
        d = torch.zeros_like(grad)
        q = torch.zeros_like(M)  # G d, kept for the line search
        res = -grad
        zv = precondition(res)
        p = zv.clone()
        rz = (res * zv).sum(0)
        target = eta * gn
        live = torch.ones_like(gn, dtype=torch.bool)
        for _ in range(max_cg):
            Gp = G @ p
            Hp = p + 2 * Ci * (G.T @ (a * Gp))
            cg_total += int(live.sum())
            curv = (p * Hp).sum(0)
            alpha = torch.where(live & (curv > 0), rz / curv, torch.zeros_like(rz))
            d += alpha * p
            q += alpha * Gp
            res -= alpha * Hp
            live &= res.norm(dim=0) > target
            if not bool(live.any()):
                break
            zv = precondition(res)
            rz_new = (res * zv).sum(0)
            beta = torch.where(live, rz_new / rz, torch.zeros_like(rz))
            p = torch.where(live, zv + beta * p, torch.zeros_like(p))  # finished: no step
            rz = torch.where(live, rz_new, torch.ones_like(rz))
        t = _line_search((Zi * d).sum(0), (d * d).sum(0), r, Yi * q, Ai, Ci)
        Z[:, todo] = Zi + t * d
    return Z, SolveInfo(steps, converged, gnorm, cg_total)


def objective(
    basis: Basis, A: torch.Tensor, Y: torch.Tensor, C: torch.Tensor, Z: torch.Tensor
) -> torch.Tensor:
    """(P,) 0.5 ||z||^2 + C sum a (1 - y g.z)_+^2 of every column."""
    r = (1 - Y * (basis.G @ Z)).clamp_min(0)
    return 0.5 * (Z * Z).sum(0) + C * (A * r * r).sum(0)


def solve_path(
    basis: Basis,
    A: torch.Tensor,
    Y: torch.Tensor,
    costs: Sequence[float],
    *,
    tol: float = 1e-4,
    max_newton: int = 60,
):  # type: ignore[no-untyped-def]
    """Yield (cost, Z (r, P), info) for each cost in increasing order; every problem of the
    batch at that cost, each started from its solution at the previous cost scaled by
    (C / C_prev)^g, g the growth of ||z|| over the last step (1 for the first), or not
    scaled where that is lower in objective."""
    P = A.shape[1]
    Z = torch.zeros(basis.G.shape[1], P, dtype=basis.G.dtype, device=basis.G.device)
    prev: tuple[float, torch.Tensor] | None = None
    growth = torch.ones(P, dtype=basis.G.dtype, device=basis.G.device)
    for cost in sorted(costs):
        Cv = torch.full((P,), float(cost), dtype=basis.G.dtype, device=basis.G.device)
        if prev is not None:
            scaled = Z * (cost / prev[0]) ** growth
            better = objective(basis, A, Y, Cv, scaled) < objective(basis, A, Y, Cv, Z)
            Z = torch.where(better, scaled, Z)
        Z, info = newton(basis, A, Y, Cv, Z, tol=tol, max_newton=max_newton)
        norm = Z.norm(dim=0)
        if prev is not None:
            ratio = norm / prev[1].clamp_min(1e-30)
            growth = ratio.clamp_min(1e-30).log() / torch.log(torch.tensor(cost / prev[0]))
            growth = growth.clamp(0.0, 1.0).nan_to_num(1.0)
        prev = (cost, norm)
        yield cost, Z, info
