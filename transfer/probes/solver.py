"""LinearSVC's problem, solved for many (class, cost, fold) at once from the Gram matrix.

The problem (scikit-learn's LinearSVC with loss='squared_hinge', penalty='l2', an intercept
with intercept_scaling 1, i.e. liblinear's L2R_L2LOSS_SVC on features with a constant 1
appended, the intercept regularised like every weight):

    min_w  0.5 ||w||^2 + C * sum_i c_i * max(0, 1 - y_i <w, x_i>)^2

with c_i the class weight of row i (2 for positives in Goyal et al.'s protocol). It is
strongly convex: one optimum, which liblinear's dual coordinate descent approaches to its
tolerance and this module approaches by Newton's method.

Representer form. The optimum is w = X^T beta (a combination of the training rows), so
everything is computed from K = X X^T: margins o = K beta, ||w||^2 = beta^T o. A problem is a
column: a weight per row (a_i = c_i on its training rows, 0 elsewhere: held-out rows get
their margins for free), labels, a cost. Newton's method on the primal (Keerthi and DeCoste
2005; Chapelle 2007): at beta, the training rows inside the margin, A = {i: y_i o_i < 1},
define a quadratic whose minimiser beta' solves (K_AA + diag(1 / e_A)) beta'_A = y_A with
e_i = 2 C c_i (zero off A); the step goes from beta towards beta' by the exact minimiser of
the piecewise-quadratic objective along the line. Once A stops changing the step is exact:
finite convergence, a handful of steps from the previous cost's solution.

Each Newton system is solved by preconditioned conjugate gradients in float32, every problem
of a batch in one matmul with K per iteration; the preconditioner is exact on K's top `rank`
directions (a Nystrom factor F, K ~ F F^T + diag(K - F F^T), inverted by Woodbury per
problem). The system's right-hand side is the gradient at float64 margins, so the float32
solve only has to be roughly right: the iteration is an iterative refinement and converges to
the float64 optimum for this K.

Precision: K = X X^T is one float32 matmul (each entry within ~1e-6 of its float64 value:
the problem solved differs from the float64 one by that much). Margins o = K beta are
computed in float64 (beta's entries cancel: ||beta||_1 is about ||w||^2, so float32 margins
would lose the digits that matter at large costs); the gradient g = X^T gamma, gamma = beta -
e (y - o) on A, is small, and its norm ||g||^2 = gamma^T K gamma needs only float32.

Stopping: ||grad f(w)|| <= tol * ||w||. f is 1-strongly convex, so then ||w - w*|| <= tol ||w||
and f(w) - f* <= ||grad f||^2 / 2 (the duality gap is exactly that): the weights are within
`tol` (relative) of the optimum, the objective within tol^2 / 2 relative to ||w||^2.

Layout: every tensor of a batch is (G, P, m): G Gram blocks (cross-validation: one, all
trainval rows; low-shot: one per drawn training set) of m rows, P problems per block; a
product with K is v @ K (K is symmetric), reductions run over the contiguous last axis.
Matmuls are full float32 and float64: TF32 is never enabled here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def gram_matrix(x: Tensor, y: Tensor | None = None, block: int = 1024) -> Tensor:
    """x y^T in float32; x x^T when y is None, exactly symmetric, from the blocks on and
    above the diagonal (row bands of `block` rows against the rows from their own on: 60%
    of a full product's flops at VOC2007's 5,011 rows), mirrored below."""
    if y is not None:
        return x @ y.T
    n = len(x)
    k = x.new_empty(n, n)
    for i in range(0, n, block):
        j = min(i + block, n)
        band = x[i:j] @ x[i:].T  # (b, n - i): the diagonal block, then the rest of the rows
        diag = band[:, : j - i]
        band[:, : j - i] = (diag + diag.T) * 0.5
        k[i:j, i:] = band
        k[j:, i:j] = band[:, j - i :].T
    return k


def nystrom(k: Tensor, rank: int, power: int = 2, seed: int = 0) -> Tensor:
    """F (G, m, r) with F F^T <= K and K - F F^T small on K's top `rank` directions: the
    Nystrom approximation on a subspace from randomised subspace iteration (Halko et al.
    2011, Alg. 4.4), computed in float64."""
    G, m, _ = k.shape
    r = min(rank, m)
    if r == 0:
        return k.new_zeros(G, m, 0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(m, r, generator=gen, dtype=k.dtype).to(k.device)
    q = torch.linalg.qr(k @ omega).Q
    for _ in range(power):
        q = torch.linalg.qr(k @ q).Q
    y = (k @ q).double()  # (G, m, r)
    core = q.double().transpose(1, 2) @ y
    core = (core + core.transpose(1, 2)) * 0.5
    # F = Y (Q^T K Q)^+1/2 by its eigendecomposition: rank-deficient K (fewer independent
    # rows than `rank`) drops the directions at rounding level
    s, u = torch.linalg.eigh(core)
    keep = s > s[:, -1:].clamp_min(1e-300) * 1e-10
    f = y @ (u * torch.where(keep, s.clamp_min(1e-300).rsqrt(), 0.0)[:, None, :])
    return f.to(k.dtype).contiguous()


@dataclass
class Gram:
    """Gram blocks of a batch: K (G, m, m) in float32 (inner solves) and float64 (margins),
    and the preconditioner: F (G, m, r), resid = diag(K - F F^T) (G, m) >= 0."""

    k32: Tensor
    k64: Tensor
    factor: Tensor
    resid: Tensor

    @staticmethod
    def of(k32: Tensor, rank: int = 128) -> Gram:
        """From float32 Gram blocks (G, m, m) (or one (m, m))."""
        if k32.dim() == 2:
            k32 = k32.unsqueeze(0)
        f = nystrom(k32, rank)
        resid = (k32.diagonal(dim1=1, dim2=2) - (f * f).sum(-1)).clamp_min(0)
        return Gram(k32, k32.double(), f, resid)

    def rows(self, index: Tensor) -> Gram:
        """Blocks of the rows `index` (G', m') of the single block: K[idx][:, idx] for each
        row of `index`; the factor's rows go with them (K_SS - F_S F_S^T >= 0 still)."""
        if self.k32.shape[0] != 1:
            raise ValueError("rows() takes sub-blocks of a single block")
        k = self.k32[0]
        k32 = k[index[:, :, None], index[:, None, :]]
        f = self.factor[0][index]
        return Gram(k32, k32.double(), f, self.resid[0][index])

    def take(self, groups: Tensor) -> Gram:
        return Gram(self.k32[groups], self.k64[groups], self.factor[groups], self.resid[groups])


# Newton systems of at most this many active rows are always factorised (small blocks: one
# batched Cholesky costs less than the matmuls and the preconditioner of a few CG steps)
DIRECT_SIZE = 256


@dataclass
class SolveInfo:
    newton: Tensor  # (G, P) Newton steps taken
    converged: Tensor  # (G, P) bool: ||grad|| <= tol ||w|| reached
    grad_norm: Tensor  # (G, P) last ||grad|| / ||w||
    cg: int = 0  # conjugate-gradient iterations (batched matmuls)
    direct: int = 0  # Newton systems solved by Cholesky factorisations of the active blocks


def line_search(
    wd: Tensor, dd: Tensor, o: Tensor, q: Tensor, y: Tensor, a: Tensor, C: Tensor,
    lower: float = 0.0,
) -> Tensor:  # fmt: skip
    """Exact t >= lower minimising 0.5 ||w + t u||^2 + C sum a (1 - y (o + t q))_+^2 per
    column, given wd = w.u and dd = u.u (float64, (G, P)). The derivative
    wd + t dd - sum 2 C a y q (1 - y o - t y q)_+ is piecewise linear and increasing; row i
    enters or leaves the sum at t_i = (1 - y_i o_i) / (y_i q_i). With the t_i sorted, running
    sums give the derivative at every t_i, and its root lies on the first piece where it
    turns non-negative: one sort per column, no iteration."""
    r0 = 1 - y * o
    yq = y * q
    ayq = 2 * C[..., None] * a * yq  # zero for rows outside the problem or with y q = 0
    c0, c1 = ayq * r0, ayq * yq
    rising = yq > 0  # in the sum for t < t_i (leave at t_i); yq < 0: enter at t_i
    s0 = (c0 * rising).sum(-1)  # the sums at t -> -inf
    s1 = (c1 * rising).sum(-1)
    moving = ayq != 0
    t_i = torch.where(moving, r0 / torch.where(moving, yq, 1.0), torch.inf)
    t_i, order = torch.sort(t_i, dim=-1)
    sign = torch.where(rising, -1.0, 1.0).to(c0)
    d0 = (sign * c0).gather(-1, order).cumsum(-1) + s0[..., None]  # sums just after t_i
    d1 = (sign * c1).gather(-1, order).cumsum(-1) + s1[..., None]
    der = wd[..., None] + t_i * (dd[..., None] + d1) - d0  # derivative at t_i
    der = torch.where(torch.isinf(t_i), torch.inf, der)
    piece = (der < 0).sum(-1, keepdim=True)  # the root lies after this many t_i
    before = (piece - 1).clamp_min(0)
    first = piece == 0
    S0 = torch.where(first, s0[..., None], d0.gather(-1, before)).squeeze(-1)
    S1 = torch.where(first, s1[..., None], d1.gather(-1, before)).squeeze(-1)
    slope = dd + S1
    t = torch.where(slope > 0, (S0 - wd) / slope.clamp_min(1e-300), torch.zeros_like(wd))
    return t.clamp_min(lower)


def _bmm_live(k: Tensor, v: Tensor, live: Tensor) -> Tensor:
    """v @ k (= K v per column, K symmetric), computing only the columns (G == 1) or blocks
    of v that are live (G, P)."""
    G = k.shape[0]
    if bool(live.all()):
        return v @ k
    out = torch.zeros_like(v)
    if G == 1:
        cols = live[0].nonzero().squeeze(1)
        out[:, cols] = v[:, cols] @ k
    else:  # block by block: k[groups] would copy the live blocks first
        for g in live.any(1).nonzero().squeeze(1).tolist():
            out[g] = v[g] @ k[g]
    return out


def _woodbury(factor: Tensor, dinv: Tensor, chunk: int = 16) -> Tensor:
    """Cholesky factors (G, P, r, r) of I + F^T diag(dinv[:, :, p]) F for every column p, in
    chunks of columns (a single einsum would build a (G, P, m, r) intermediate)."""
    G, m, r = factor.shape
    P = dinv.shape[1]
    eye = torch.eye(r, dtype=factor.dtype, device=factor.device)
    out = []
    for i in range(0, P, chunk):
        fd = factor.unsqueeze(1) * dinv[:, i : i + chunk, :, None]  # (G, p, m, r)
        out.append(fd.transpose(-1, -2) @ factor.unsqueeze(1) + eye)
    return torch.linalg.cholesky(torch.cat(out, 1))


def _pcg(
    gram: Gram, act: Tensor, inv_e: Tensor, rhs: Tensor, eta: float, max_cg: int
) -> tuple[Tensor, int]:
    """Solve (K_AA + diag(inv_e_A)) x = rhs on A (act) for every column in float32, by
    conjugate gradients preconditioned with (F F^T + diag(resid))_AA + diag(inv_e_A), until
    ||residual|| <= eta ||rhs||. Returns (x, iterations)."""
    k32, factor = gram.k32, gram.factor
    mask = act.float()
    inv_e = inv_e.float()
    dinv = mask / (gram.resid.unsqueeze(1) + inv_e).clamp_min(1e-30)
    chol = _woodbury(factor, dinv) if factor.shape[2] else None

    def precondition(v: Tensor) -> Tensor:
        u = dinv * v
        if chol is None:
            return u
        c = (u @ factor).unsqueeze(-1)  # (G, P, r, 1)
        s = torch.cholesky_solve(c, chol).squeeze(-1)  # (G, P, r)
        return u - dinv * (s @ factor.transpose(1, 2))

    b = rhs.float() * mask
    x = torch.zeros_like(b)
    res = b.clone()
    z = precondition(res)
    p = z.clone()
    rz = (res * z).sum(-1)
    target = eta * b.norm(dim=-1)
    live = res.norm(dim=-1) > target
    it = 0
    while it < max_cg and bool(live.any()):
        it += 1
        mp = _bmm_live(k32, p, live) * mask + inv_e * p
        curv = (p * mp).sum(-1)
        alpha = torch.where(live & (curv > 0), rz / curv.clamp_min(1e-30), torch.zeros_like(rz))
        x += alpha[..., None] * p
        res -= alpha[..., None] * mp
        live &= res.norm(dim=-1) > target
        if not bool(live.any()):
            break
        z = precondition(res)
        rz_new = (res * z).sum(-1)
        beta = torch.where(live, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = torch.where(live[..., None], z + beta[..., None] * p, torch.zeros_like(p))
        rz = torch.where(live, rz_new, torch.ones_like(rz))
    return x.double(), it


def _direct(
    gram: Gram, act: Tensor, inv_e: Tensor, rhs: Tensor, memory: int = 2**28
) -> Tensor:
    """Solve (K_AA + diag(inv_e_A)) x = rhs on A (act) for every column by a Cholesky
    factorisation of its active block, in float32; blocks padded to the largest |A| with
    identity rows, in chunks of columns of at most `memory` bytes. Cheaper than conjugate
    gradients when few rows are inside the margin (large costs): |A|^3 / 3 against
    2 m^2 per iteration."""
    G, P, m = act.shape
    count = act.sum(-1)  # (G, P)
    size = max(int(count.max()), 1)
    # active rows first, in order; padding points at row 0 and is masked out
    order = torch.sort((~act).to(torch.int8), dim=-1, stable=True).indices[..., :size]
    pad = torch.arange(size, device=act.device) >= count[..., None]  # (G, P, size)
    x = torch.zeros(G, P, m, dtype=torch.float64, device=act.device)
    chunk = max(1, memory // (4 * size * size))
    flat = order.reshape(G * P, size)
    flat_pad = pad.reshape(G * P, size)
    groups = torch.arange(G, device=act.device).repeat_interleave(P)
    d = torch.where(pad, torch.ones_like(inv_e[..., :size]), inv_e.gather(-1, order))
    b = torch.where(pad, 0.0, rhs.gather(-1, order)).reshape(G * P, size)
    d = d.reshape(G * P, size)
    out = torch.empty(G * P, size, dtype=torch.float64, device=act.device)
    for i in range(0, G * P, chunk):
        idx, pm, g = flat[i : i + chunk], flat_pad[i : i + chunk], groups[i : i + chunk]
        kaa = gram.k32[g[:, None, None], idx[:, :, None], idx[:, None, :]]
        kaa = kaa.masked_fill(pm[:, :, None] | pm[:, None, :], 0.0)
        kaa.diagonal(dim1=1, dim2=2).add_(d[i : i + chunk].float())
        lower, info = torch.linalg.cholesky_ex(kaa)
        bad = info != 0
        if bool(bad.any()):  # float32 rounding lost definiteness: those in float64
            k64 = kaa[bad].double()
            lower64 = torch.linalg.cholesky(k64)
            sol = torch.cholesky_solve(b[i : i + chunk][bad, :, None], lower64).squeeze(-1)
        sol32 = torch.cholesky_solve(b[i : i + chunk, :, None].float(), lower).squeeze(-1)
        out[i : i + chunk] = sol32.double()
        if bool(bad.any()):
            out[i : i + chunk][bad] = sol
    out = out.masked_fill(flat_pad, 0.0).reshape(G, P, size)
    x.scatter_(-1, order, out)
    return x * act


def margins(gram: Gram, beta: Tensor) -> Tensor:
    """o = K beta (G, P, m) in float64."""
    return beta @ gram.k64


def objective(gram: Gram, a: Tensor, y: Tensor, C: Tensor, beta: Tensor) -> Tensor:
    """(G, P) 0.5 ||w||^2 + C sum a (1 - y o)_+^2 in float64."""
    o = margins(gram, beta)
    return 0.5 * (beta * o).sum(-1) + C * (a * (1 - y * o).clamp_min(0) ** 2).sum(-1)


def rescale(beta: Tensor, o: Tensor, a: Tensor, y: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """(s beta, s o) with the scale s >= 0 minimising the objective at cost C along the ray
    through beta: the warm start of a new cost from the previous cost's solution."""
    wn = (beta * o).sum(-1)
    t = line_search(wn, wn, o, o, y, a, C, lower=-1.0)
    s = (1 + t)[..., None]
    return beta * s, o * s


def newton(
    gram: Gram,
    a: Tensor,
    y: Tensor,
    C: Tensor,
    beta: Tensor | None = None,
    o: Tensor | None = None,
    *,
    tol: float = 1e-4,
    eta: float = 1e-5,
    max_newton: int = 60,
    max_cg: int = 200,
    direct_below: float = 24.0,
) -> tuple[Tensor, Tensor, SolveInfo]:
    """Solve every problem: row weights a (G, P, m) (0: row not in the problem), labels y in
    {-1, 1}, costs C (G or 1, P), start beta with its margins o = K beta (zero when None).
    All float64. Returns (beta, o, info); o is exact (float64) for the returned beta."""
    G, P, m = a.shape
    C = C.expand(G, P).to(a)
    if beta is None:
        beta, o = torch.zeros_like(a), torch.zeros_like(a)
    elif o is None:
        o = margins(gram, beta)
    beta, o = beta.clone(), o.clone()
    steps = torch.zeros(G, P, dtype=torch.int64, device=a.device)
    done = torch.zeros(G, P, dtype=torch.bool, device=a.device)
    gnorm = torch.full((G, P), float("inf"), dtype=a.dtype, device=a.device)
    cg_total = direct = 0
    for _ in range(max_newton + 1):
        act = ((1 - y * o) > 0) & (a > 0)
        e = 2 * C[..., None] * a * act
        gamma = beta - e * (y - o)  # w - 2C X_A^T c (y - o) = X^T gamma: the gradient
        g_in = gamma * act
        g_out = gamma - g_in  # beta on training rows outside the margin
        if bool(g_out.any()):
            kg = torch.cat([g_in, g_out], 1).float() @ gram.k32
            kg_in, kg_out = kg[:, :P].double(), kg[:, P:].double()
        else:  # every training row with a weight is inside the margin (small costs)
            kg_in, kg_out = (g_in.float() @ gram.k32).double(), torch.zeros_like(g_in)
        gk = (gamma * (kg_in + kg_out)).sum(-1).clamp_min(0).sqrt()
        wn = (beta * o).sum(-1).clamp_min(0).sqrt()
        gnorm = torch.where(done, gnorm, gk / wn.clamp_min(1e-300))
        done |= gk <= tol * wn
        live = ~done & (steps < max_newton)
        if not bool(live.any()):
            break
        steps += live.long()
        inv_e = torch.where(act, 1 / e.clamp_min(1e-300), torch.zeros_like(e))
        rhs = torch.where(act & live[..., None], -g_in * inv_e + kg_out, torch.zeros_like(e))
        system = act & live[..., None]
        size = int(system.sum(-1).max())
        if size <= DIRECT_SIZE or size**3 <= direct_below * m * m:
            delta = _direct(gram, system, inv_e, rhs)
            direct += 1
        else:
            delta, it = _pcg(gram, system, inv_e, rhs, eta, max_cg)
            cg_total += it
        step = torch.where(live[..., None], delta - g_out, torch.zeros_like(delta))
        q = _bmm_live(gram.k64, step, live)
        t = line_search((step * o).sum(-1), (step * q).sum(-1), o, q, y, a, C)
        beta += t[..., None] * step
        o += t[..., None] * q
    return beta, o, SolveInfo(steps, done, gnorm, cg_total, direct)
