"""Masked reconstruction losses, overlap band, adversarial and joint losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.adversarial import discriminator_loss, discriminator_lr, generator_adversarial_loss
from pretrain.losses import (
    ADV_WEIGHT,
    REC_WEIGHT,
    extend_mask,
    joint_loss,
    loss_weights,
    masked_l1,
    masked_l2,
)


def central(size=12, lo=4, hi=8):
    m = torch.zeros(1, 1, size, size)
    m[..., lo:hi, lo:hi] = 1
    return m


def test_masked_l2_and_l1_hand_case():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert masked_l2(pred, target, mask).item() == pytest.approx((1 + 16) / 2)
    assert masked_l1(pred, target, mask).item() == pytest.approx((1 + 4) / 2)


def test_full_mask_is_plain_mse():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    ones = torch.ones(2, 1, 5, 5)
    assert torch.allclose(masked_l2(pred, target, ones), F.mse_loss(pred, target))
    assert torch.allclose(masked_l1(pred, target, ones), F.l1_loss(pred, target))


def test_overlap_band_weights():
    w = loss_weights(central(), overlap=2, overlap_weight=10)
    assert (w == 1).sum() == 16  # the 4x4 hole
    assert (w == 10).sum() == 8 * 8 - 16  # the 2 px band around it
    assert (w == 0).sum() == 144 - 64
    assert torch.equal(extend_mask(central(), 2), central(lo=2, hi=10))


def test_overlap_loss_hand_case():
    """Error 1 everywhere: sum(w) / (C * #pixels in the extended region)."""
    pred, target = torch.ones(1, 3, 12, 12), torch.zeros(1, 3, 12, 12)
    got = masked_l2(pred, target, central(), overlap=2, overlap_weight=10)
    assert got.item() == pytest.approx((16 * 1 + 48 * 10) * 3 / (3 * 64))


@pytest.mark.parametrize("overlap", [0, 4, 7])
def test_l2_gives_no_gradient_outside_the_extended_region(overlap):
    torch.manual_seed(0)
    size = 40
    mask = central(size, 15, 25)
    pred = torch.randn(2, 3, size, size, requires_grad=True)
    target = torch.randn(2, 3, size, size)
    masked_l2(pred, target, mask.expand(2, -1, -1, -1), overlap=overlap).backward()
    region = extend_mask(mask, overlap).bool().expand(2, 3, -1, -1)
    assert torch.all(pred.grad[~region] == 0)  # exactly zero, not just small
    assert torch.all(pred.grad[region] != 0)


def test_adversarial_losses_match_the_log_likelihood():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    want_d = -(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean())
    assert discriminator_loss(real, fake).item() == pytest.approx(want_d.item(), rel=1e-6)
    want_g = -torch.log(sig(fake)).mean()
    assert generator_adversarial_loss(fake).item() == pytest.approx(want_g.item(), rel=1e-6)


def test_joint_weights_and_learning_rates():
    assert (REC_WEIGHT, ADV_WEIGHT) == (0.999, 0.001)
    rec, adv = torch.tensor(2.0), torch.tensor(math.log(2.0))
    assert joint_loss(rec, adv).item() == pytest.approx(0.999 * 2 + 0.001 * math.log(2))
    assert joint_loss(rec, None).item() == 2.0
    assert discriminator_lr(2e-3) == pytest.approx(2e-4)
