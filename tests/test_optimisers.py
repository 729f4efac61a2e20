"""`loop.sgd` / `loop.adam`: torch's fused kernels, the same updates as the per-tensor loop."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmark import loop


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((64, 3, 5, 5), (64,), (10, 9))
    return [torch.randn(s, generator=g, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("make, reference", [
    (lambda p: loop.sgd([{"params": p[:2], "weight_decay": 5e-4}, {"params": p[2:]}], 0.01, 0.9),
     lambda p: torch.optim.SGD([{"params": p[:2], "weight_decay": 5e-4}, {"params": p[2:]}],
                               lr=0.01, momentum=0.9, foreach=False)),
    (lambda p: loop.sgd(p, 0.1, 0.9, nesterov=True, weight_decay=5e-4),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                               foreach=False)),
    (lambda p: loop.adam(p, 1e-3, (0.5, 0.999)),
     lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.5, 0.999), foreach=False)),
])  # fmt: skip
def test_fused_optimisers_make_the_per_tensor_loops_updates(make, reference):
    ours, theirs = _params(0), _params(0)
    opt, ref = make(ours), reference(theirs)
    assert all(g["fused"] for g in opt.param_groups)
    for i in range(4):
        grads = _params(100 + i)
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.detach().clone(), g.detach().clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(p, q0) for p, q0 in zip(ours, _params(0)))  # it did move


def test_an_optimiser_state_saved_unfused_resumes_fused():
    """A checkpoint from before the fused optimisers loads, and the run goes on the same."""
    a, b = _params(0), _params(0)
    old = torch.optim.SGD(a, lr=0.1, momentum=0.9)
    for p, g in zip(a, _params(1)):
        p.grad = g.detach().clone()
    old.step()
    new = loop.sgd(b, 0.1, 0.9)
    with torch.no_grad():
        for p, q in zip(b, a):
            p.copy_(q)
    new.load_state_dict(copy.deepcopy(old.state_dict()))  # as read back from a file
    for opt, ps in ((old, a), (new, b)):
        for p, g in zip(ps, _params(2)):
            p.grad = g.detach().clone()
        opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("clip", [1e-3, 1e6])  # clipped; left as it is
def test_clipping_equals_clip_grad_norm(clip: float):
    """Precision.step(clip=...) skips the scaling pass only where it would multiply by 1."""
    ours, theirs = _params(2), _params(2)
    for p, q in zip(ours, theirs):
        p.grad = torch.full_like(p, 0.5)
        q.grad = torch.full_like(q, 0.5)
    opt_a = loop.sgd(ours, 0.1, 0.9)
    opt_b = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, foreach=False)
    norm = loop.Precision("fp32", torch.device("cpu")).step(opt_a, clip=clip)
    expected = float(torch.nn.utils.clip_grad_norm_(theirs, clip))
    opt_b.step()
    assert norm == expected
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
