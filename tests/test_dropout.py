"""pretrain.dropout.Dropout: nn.Dropout's law and interface with a faster CPU mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pretrain.dropout import Dropout


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_the_law_of_dropout(p: float):
    torch.manual_seed(0)
    x = torch.rand(1_000_000) + 0.5  # never zero: a zero output means dropped
    y = Dropout(p).train()(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 5e-3  # ~10 std of a binomial share
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert abs(y.mean().item() / x.mean().item() - 1) < 1e-2


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = (torch.rand(64, 256) + 0.5).requires_grad_()
    y = Dropout(0.5).train()(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() * 2.0)


def test_eval_and_edge_probabilities_are_nn_dropout():
    x = torch.randn(8, 16)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    assert isinstance(Dropout(0.5), nn.Dropout) and Dropout(0.5).state_dict() == {}


def test_dtype_layout_and_seed():
    x = torch.randn(2, 64, 5, 7).bfloat16().contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    a = Dropout(0.5).train()(x)
    torch.manual_seed(3)
    b = Dropout(0.5).train()(x)
    assert a.dtype == torch.bfloat16 and a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)  # the global generator decides: seeded runs repeat
