"""The 128-px inpainting context encoder: shapes, parameters, hole handling, loss, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from benchmark.distributed import DistEnv
from benchmark.loop import Precision
from pretrain.adversarial import Adversary, DCGANDiscriminator, dcgan_init_
from pretrain.inpainting.config import InpaintingConfig, InpaintLossConfig
from pretrain.inpainting.data import centre_crop, train_crop
from pretrain.inpainting.model import (
    FILL,
    Box,
    ContextEncoderGenerator,
    HoleGeometry,
    centre_patch,
    mask_context,
)
from pretrain.inpainting.train import build_nets, make_step
from pretrain.losses import masked_l2


def central_hole(overlap: int, mode: str = "code") -> torch.Tensor:
    return HoleGeometry(mode, overlap).hole_mask()


CPU = DistEnv(0, 1, 0, torch.device("cpu"))


def fp32() -> Precision:
    """Exact float32 on CPU (auto could pick bf16 on a CPU with AMX)."""
    return Precision("fp32", CPU.device)


def nets_and_step(cfg: InpaintingConfig, channels_last: bool = True):
    precision = fp32()
    g, opt_g, adversary = build_nets(cfg, CPU, precision)
    step = make_step(g, opt_g, adversary, precision, CPU.device, cfg.loss,
                     channels_last=channels_last, geometry=cfg.geometry())  # fmt: skip
    return g, adversary, step


def _conv_params(cin: int, cout: int, bn: bool) -> int:
    return cin * cout * 16 + (2 * cout if bn else 0)  # BN: scale+shift; no conv has a bias


def test_generator_shapes_and_parameter_count():
    g = ContextEncoderGenerator()
    x = torch.randn(2, 3, 128, 128)
    z = g.encoder(x)
    assert z.shape == (2, 4000, 1, 1)
    assert g(x).shape == (2, 3, 64, 64)
    assert g(x).abs().max() <= 1.0  # tanh
    enc = (
        _conv_params(3, 64, False)
        + _conv_params(64, 64, True)
        + _conv_params(64, 128, True)
        + _conv_params(128, 256, True)
        + _conv_params(256, 512, True)
        + 512 * 4000 * 16
    )
    dec = (
        2 * 4000
        + 4000 * 512 * 16
        + 2 * 512
        + 512 * 256 * 16
        + 2 * 256
        + 256 * 128 * 16
        + 2 * 128
        + 128 * 64 * 16
        + 2 * 64
        + 64 * 3 * 16
    )
    # no conv has a bias (train.lua zeroes them every step), BatchNorm keeps its affine
    assert sum(p.numel() for p in g.encoder.parameters()) == enc
    assert sum(p.numel() for p in g.decoder.parameters()) == dec
    bns = [m for m in g.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 4  # not on the first conv


def test_bottleneck_matrix_product_equals_convolution():
    g = ContextEncoderGenerator()
    conv, up = g.encoder.net[-1], g.decoder.net[2]
    x = torch.randn(3, 512, 4, 4)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(conv(inp), F.conv2d(x, conv.weight), rtol=1e-4, atol=1e-4)
    z = torch.randn(3, 4000, 1, 1)
    torch.testing.assert_close(up(z), F.conv_transpose2d(z, up.weight), rtol=1e-4, atol=1e-4)
    assert set(g.state_dict()) == set(ContextEncoderGenerator().state_dict())


def test_discriminator_sees_only_the_patch():
    d = DCGANDiscriminator(64)  # the patch discriminator: 64 px in, one logit out
    assert d(torch.randn(4, 3, 64, 64)).shape == (4,)
    p = d.probability(torch.randn(4, 3, 64, 64))
    assert ((p > 0) & (p < 1)).all()
    bns = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == [128, 256, 512]
    # The state-dict layout of the former PatchDiscriminator: old checkpoints still load.
    convs = {k: tuple(v.shape) for k, v in d.state_dict().items() if v.dim() == 4}
    assert convs == {
        "net.0.weight": (64, 3, 4, 4),
        "net.2.weight": (128, 64, 4, 4),
        "net.5.weight": (256, 128, 4, 4),
        "net.8.weight": (512, 256, 4, 4),
        "net.11.weight": (1, 512, 4, 4),
    }
    assert all(m.bias is None for m in d.modules() if isinstance(m, torch.nn.Conv2d))


def test_init_is_dcgan_normal():
    torch.manual_seed(0)
    g = ContextEncoderGenerator(256)
    w = g.decoder.net[2].weight
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    dcgan_init_(g)  # idempotent in distribution
    assert abs(g.encoder.net[-1].weight.std().item() - 0.02) < 1e-3


def test_every_parameter_gets_a_gradient_and_no_nan():
    g, d = ContextEncoderGenerator(64), DCGANDiscriminator(64)
    fake = g(torch.randn(2, 3, 128, 128))
    (fake.square().mean() + d(fake).mean()).backward()
    for name, p in [*g.named_parameters(), *d.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_central_hole_and_context():
    hole = central_hole(overlap=4)
    assert hole.shape == (1, 1, 128, 128)
    assert hole.sum() == 56 * 56 and hole[0, 0, 36, 36] and not hole[0, 0, 35, 36]
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    ctx = mask_context(x, hole)
    torch.testing.assert_close(
        ctx[:, :, 36:92, 36:92], torch.tensor(FILL).view(1, 3, 1, 1).expand(2, 3, 56, 56)
    )
    assert torch.equal(ctx[:, :, :36], x[:, :, :36])
    assert centre_patch(x).shape == (2, 3, 64, 64)


def test_data_pipeline_crops():
    rng = np.random.default_rng(0)
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 300, 3), np.uint8))
    crop = train_crop(im, rng)  # shorter side 350, random 128 crop, flip
    assert crop.shape == (128, 128, 3)
    c = centre_crop(Image.fromarray(np.arange(227 * 227 * 3, dtype=np.uint8).reshape(227, 227, 3)))
    assert c.shape == (128, 128, 3)
    full = np.arange(227 * 227 * 3, dtype=np.uint8).reshape(227, 227, 3)
    assert np.array_equal(c, full[49:177, 49:177])  # (227 - 128) // 2 = 49


# ---------------------------------------------------------------- hole geometry


@pytest.mark.parametrize(
    "mode, overlap, hole, pred",
    [
        ("code", 4, (36, 56), (32, 64)),  # released code: 64x64 prediction, inner 56x56 hole
        ("code", 7, (39, 50), (32, 64)),
        ("paper", 4, (32, 64), (28, 72)),  # paper: 64x64 hole, prediction 4 px larger
        ("paper", 7, (32, 64), (25, 78)),
        ("code", 0, (32, 64), (32, 64)),
        ("paper", 0, (32, 64), (32, 64)),
    ],
)
def test_geometry_hand_cases(mode, overlap, hole, pred):
    g = HoleGeometry(mode, overlap)
    assert g.hole == Box(*hole) and g.prediction == Box(*pred)
    assert g.scored == Box(32, 64)  # Table 1 always scores the central 64x64
    assert g.scored_region == ("prediction" if mode == "code" else "hole")
    mask = g.hole_mask()
    assert mask.shape == (1, 1, 128, 128) and mask.dtype == torch.bool
    assert mask.sum() == hole[1] ** 2
    s, e = hole[0], hole[0] + hole[1]
    assert mask[0, 0, s:e, s:e].all()
    assert g.predicted(torch.zeros(2, 3, 128, 128)).shape == (2, 3, pred[1], pred[1])
    assert g.score_crop_of_prediction(torch.zeros(2, 3, pred[1], pred[1])).shape[-1] == 64


def test_geometry_rejects_bad_settings():
    with pytest.raises(ValueError, match="hole mode"):
        HoleGeometry("bogus", 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="overlap"):
        HoleGeometry("paper", 32)


@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("overlap", [4, 7])
def test_loss_weights_one_in_hole_ten_on_ring_zero_elsewhere(mode, overlap):
    g = HoleGeometry(mode, overlap)
    w = g.loss_weights()[0, 0]
    expected = torch.zeros(128, 128)
    p, h = g.prediction, g.hole
    expected[p.start : p.stop, p.start : p.stop] = 10.0
    expected[h.start : h.stop, h.start : h.stop] = 1.0
    assert torch.equal(w, expected)
    # the ring is exactly `overlap` px wide on each side of the hole
    assert p.start == h.start - overlap and p.stop == h.stop + overlap
    assert (w == 1).sum() == h.size**2 and (w == 10).sum() == p.size**2 - h.size**2


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_random_hole_weights_stay_in_the_prediction(mode):
    g = HoleGeometry(mode, 7)
    region = torch.zeros(g.hole.size, g.hole.size)
    region[:5, -3:] = 1  # a corner blob: its ring reaches the prediction's border
    hole = g.place(region)[None]
    w = g.loss_weights(hole)
    assert w.sum() == g.predicted(w).sum()  # nothing outside the prediction box
    assert g.predicted(w)[0, 0, 7, -8] == 1 and g.predicted(w)[0, 0, 0, -1] == 10


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_paste_keeps_the_real_context_outside_the_hole(mode):
    g = HoleGeometry(mode, 7)
    image = torch.rand(2, 3, 128, 128) * 2 - 1
    context = mask_context(image, g.hole_mask())
    pred = torch.full((2, 3, g.prediction.size, g.prediction.size), 0.5)
    out = g.paste(context, pred)
    hole = g.hole_mask().expand_as(out)
    assert torch.equal(out[~hole], image[~hole])  # context (ring included) is the real image
    assert (out[hole] == 0.5).all()


def test_paper_generator_and_discriminator_take_the_larger_patch():
    cfg = InpaintingConfig(hole="paper", loss=InpaintLossConfig(kind="joint", overlap=7))
    cfg.bottleneck = 32
    g, _, adversary = build_nets(cfg, CPU, fp32())
    out = g(torch.randn(2, 3, 128, 128))
    assert out.shape == (2, 3, 78, 78) and out.abs().max() <= 1.0
    # the resize is parameter-free: the same state dict as the 64x64 generator
    ref = ContextEncoderGenerator(32)
    assert {k: v.shape for k, v in g.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert adversary.discriminator(out).shape == (2,)


def test_paper_step_lowers_loss_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    cfg = InpaintingConfig(
        hole="paper", loss=InpaintLossConfig(kind="joint", overlap=7), bottleneck=64
    )
    g, adversary, step = nets_and_step(cfg)
    batch = {"image": torch.rand(8, 3, 128, 128) * 2 - 1}
    losses = [step(batch, i)["loss"].item() for i in range(6)]
    assert losses[-1] < losses[0]
    nets = [("G", g), ("D", adversary.discriminator)]
    for tag, net in nets:
        for name, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (tag, name)
            assert p.grad.abs().sum() > 0, (tag, name)


@pytest.mark.parametrize("kind", ["l2", "adversarial", "joint"])
def test_step_runs_every_loss(kind):
    torch.manual_seed(0)
    cfg = InpaintingConfig(loss=InpaintLossConfig(kind=kind), bottleneck=64)
    g, adversary, step = nets_and_step(cfg)
    assert (adversary is None) == (kind == "l2")
    before = g.decoder.net[2].weight.clone()
    d_before = None
    if adversary is not None:
        assert isinstance(adversary, Adversary)
        assert isinstance(adversary.discriminator, DCGANDiscriminator)
        d_before = [p.detach().clone() for p in adversary.discriminator.parameters()]
    out = step({"image": torch.rand(4, 3, 128, 128) * 2 - 1}, 0)
    assert torch.isfinite(out["loss"])
    assert ("d_loss" in out) == (kind != "l2")
    assert not torch.equal(before, g.decoder.net[2].weight)
    if adversary is not None:
        assert all(p.requires_grad for p in adversary.discriminator.parameters())
        after = list(adversary.discriminator.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(d_before, after))


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_fixed_hole_loss_equals_masked_l2(mode):
    """The step's precomputed central weights give exactly losses.masked_l2."""
    torch.manual_seed(0)
    cfg = InpaintingConfig(hole=mode, loss=InpaintLossConfig(kind="l2", overlap=4), bottleneck=64)
    geo = cfg.geometry()
    size = geo.prediction.size  # code 64, paper 72
    g, _, step = nets_and_step(cfg)
    image = torch.rand(4, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        fake = g(mask_context(image, geo.hole_mask()))
    assert fake.shape == (4, 3, size, size)
    hole = geo.predicted(geo.hole_mask().float()).expand(4, 1, size, size)
    real = geo.predicted(image)
    expected = masked_l2(fake, real, hole, 4, 10.0)
    # port formula: mean over the predicted patch of d^2 weighted 10 on the 4-px band, 1 inside
    w = torch.full((1, 1, size, size), 10.0)
    w[..., 4:-4, 4:-4] = 1.0
    port = ((fake - real).square() * w).mean()
    torch.testing.assert_close(expected, port)
    out = step({"image": image}, 0)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_sequential_update_matches_reference(channels_last):
    """The step is the port's D-then-G update: same loss, same gradients. In NCHW they agree
    to float32 rounding; NHWC's CPU BatchNorm backward sums in another order (measured
    ~3e-3 relative vs ~2e-4 for NCHW against float64), and Adam's first D step, lr * sign(g),
    turns those into +-lr weight differences that the G step then sees: a looser bound."""
    torch.manual_seed(0)
    cfg = InpaintingConfig(hole="code", loss=InpaintLossConfig(kind="joint"), bottleneck=256)
    cfg.train.channels_last = channels_last
    tol = 5e-2 if channels_last else 5e-3
    g, adversary, step = nets_and_step(cfg, channels_last=channels_last)
    disc = adversary.discriminator
    g_ref = ContextEncoderGenerator(256)
    d_ref = DCGANDiscriminator(64)
    g_ref.load_state_dict(g.state_dict())
    d_ref.load_state_dict(disc.state_dict())
    opt_g = torch.optim.Adam(g_ref.parameters(), 2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d_ref.parameters(), 2e-4, betas=(0.5, 0.999))
    image = torch.rand(16, 3, 128, 128) * 2 - 1
    real = centre_patch(image)
    fake = g_ref(mask_context(image, central_hole(4)))
    bce = torch.nn.BCELoss()
    opt_d.zero_grad()
    (
        bce(d_ref.probability(real), torch.ones(16))
        + bce(d_ref.probability(fake.detach()), torch.zeros(16))
    ).backward()
    d_grads = [p.grad.clone() for p in d_ref.parameters()]
    opt_d.step()
    opt_g.zero_grad()
    w = torch.full((1, 1, 64, 64), 0.999 * 10.0)
    w[..., 4:60, 4:60] = 0.999
    err = 0.001 * bce(d_ref.probability(fake), torch.ones(16)) + ((fake - real) ** 2 * w).mean()
    err.backward()
    out = step({"image": image}, 0)
    torch.testing.assert_close(out["loss_g"], err.detach(), rtol=1e-4, atol=1e-6)
    # Adam's first step is lr * sign(grad): compare gradients, which it is made of
    # (float32 sums in another order: compare by relative norm)
    for (name, p), q in zip(g.named_parameters(), g_ref.parameters()):
        assert (p.grad - q.grad).norm() <= tol * q.grad.norm(), name
    for (name, p), q in zip(disc.named_parameters(), d_grads):
        assert (p.grad - q).norm() <= tol * q.norm(), name
