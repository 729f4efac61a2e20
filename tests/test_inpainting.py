"""The 128-px inpainting context encoder: shapes, parameters, hole handling, loss, training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from benchmark.distributed import DistEnv
from benchmark.runs import open_run
from pretrain.inpainting import (
    FILL,
    ContextEncoderGenerator,
    PatchDiscriminator,
    central_hole,
    centre_patch,
    init_weights,
    mask_context,
)
from pretrain.inpainting_data import centre_crop, train_crop
from pretrain.inpainting_train import (
    InpaintingConfig,
    InpaintLossConfig,
    InpaintTrainConfig,
    build_nets,
    load_generator,
    main,
    make_step,
)
from pretrain.losses import masked_l2

CPU = DistEnv(0, 1, 0, torch.device("cpu"))


def _conv_params(cin: int, cout: int, bn: bool) -> int:
    return cin * cout * 16 + (2 * cout if bn else cout)  # BN: scale+shift; no BN: bias


def test_generator_shapes_and_parameter_count():
    g = ContextEncoderGenerator()
    x = torch.randn(2, 3, 128, 128)
    z = g.encoder(x)
    assert z.shape == (2, 4000, 1, 1)
    assert g(x).shape == (2, 3, 64, 64)
    assert g(x).abs().max() <= 1.0  # tanh
    enc = (_conv_params(3, 64, False) + _conv_params(64, 64, True) + _conv_params(64, 128, True)
           + _conv_params(128, 256, True) + _conv_params(256, 512, True) + 512 * 4000 * 16)
    dec = (2 * 4000 + 4000 * 512 * 16 + 2 * 512 + 512 * 256 * 16 + 2 * 256
           + 256 * 128 * 16 + 2 * 128 + 128 * 64 * 16 + 2 * 64 + 64 * 3 * 16)
    # the first conv has a bias (no BatchNorm after it); BN convs have none
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
    d = PatchDiscriminator()
    assert d(torch.randn(4, 3, 64, 64)).shape == (4,)
    p = d.probability(torch.randn(4, 3, 64, 64))
    assert ((p > 0) & (p < 1)).all()
    bns = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == [128, 256, 512]


def test_init_is_dcgan_normal():
    torch.manual_seed(0)
    g = ContextEncoderGenerator()
    w = g.decoder.net[2].weight
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    init_weights(g)  # idempotent in distribution
    assert abs(g.encoder.net[-1].weight.std().item() - 0.02) < 1e-3


def test_every_parameter_gets_a_gradient_and_no_nan():
    g, d = ContextEncoderGenerator(), PatchDiscriminator()
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
    torch.testing.assert_close(ctx[:, :, 36:92, 36:92],
                               torch.tensor(FILL).view(1, 3, 1, 1).expand(2, 3, 56, 56))
    assert torch.equal(ctx[:, :, :36], x[:, :, :36])
    assert centre_patch(x).shape == (2, 3, 64, 64)


def test_data_pipeline_crops():
    rng = np.random.default_rng(0)
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 300, 3), np.uint8))
    crop = train_crop(im, rng)  # shorter side 350, random 128 crop, flip
    assert crop.shape == (128, 128, 3)
    c = centre_crop(Image.fromarray(np.arange(227 * 227 * 3, dtype=np.uint8)
                                    .reshape(227, 227, 3)))
    assert c.shape == (128, 128, 3)
    full = np.arange(227 * 227 * 3, dtype=np.uint8).reshape(227, 227, 3)
    assert np.array_equal(c, full[49:177, 49:177])  # (227 - 128) // 2 = 49


@pytest.mark.parametrize("kind", ["l2", "adversarial", "joint"])
def test_step_runs_every_loss(kind):
    torch.manual_seed(0)
    cfg = InpaintingConfig(loss=InpaintLossConfig(kind=kind))
    nets = build_nets(cfg, CPU)
    step = make_step(nets, CPU.device, cfg.loss, overlap=cfg.loss.overlap)
    before = nets.generator.decoder.net[2].weight.clone()
    out = step({"image": torch.rand(4, 3, 128, 128) * 2 - 1}, 0)
    assert torch.isfinite(out["loss"])
    assert ("d_loss" in out) == (kind != "l2")
    assert not torch.equal(before, nets.generator.decoder.net[2].weight)
    if nets.discriminator is not None:
        assert all(p.requires_grad for p in nets.discriminator.parameters())


def test_fixed_hole_loss_equals_masked_l2():
    """The step's precomputed central weights give exactly losses.masked_l2."""
    torch.manual_seed(0)
    cfg = InpaintingConfig(loss=InpaintLossConfig(kind="l2", overlap=4))
    nets = build_nets(cfg, CPU)
    image = torch.rand(4, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        fake = nets.generator(mask_context(image, central_hole(4)))
    hole = centre_patch(central_hole(4).float()).expand(4, 1, 64, 64)
    expected = masked_l2(fake, centre_patch(image), hole, 4, 10.0)
    # port formula: mean over the 64x64 patch of d^2 weighted 10 on the 4-px band, 1 inside
    w = torch.full((1, 1, 64, 64), 10.0)
    w[..., 4:60, 4:60] = 1.0
    port = ((fake - centre_patch(image)).square() * w).mean()
    torch.testing.assert_close(expected, port)
    step = make_step(nets, CPU.device, cfg.loss, overlap=4)
    out = step({"image": image}, 0)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-4, atol=1e-6)


def test_sequential_update_matches_reference():
    """The step is the port's D-then-G update (same losses, same gradients), NCHW or NHWC."""
    torch.manual_seed(0)
    cfg = InpaintingConfig(loss=InpaintLossConfig(kind="joint", overlap=4))
    cfg.train.channels_last = False
    nets = build_nets(cfg, CPU)
    g_ref = ContextEncoderGenerator()
    d_ref = PatchDiscriminator()
    g_ref.load_state_dict(nets.generator.state_dict())
    d_ref.load_state_dict(nets.discriminator.state_dict())
    opt_g = torch.optim.Adam(g_ref.parameters(), 2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d_ref.parameters(), 2e-4, betas=(0.5, 0.999))
    image = torch.rand(4, 3, 128, 128) * 2 - 1
    real = centre_patch(image)
    fake = g_ref(mask_context(image, central_hole(4)))
    bce = torch.nn.BCELoss()
    opt_d.zero_grad()
    (bce(d_ref.probability(real), torch.ones(4))
     + bce(d_ref.probability(fake.detach()), torch.zeros(4))).backward()
    d_grads = [p.grad.clone() for p in d_ref.parameters()]
    opt_d.step()
    opt_g.zero_grad()
    w = torch.full((1, 1, 64, 64), 0.999 * 10.0)
    w[..., 4:60, 4:60] = 0.999
    err = 0.001 * bce(d_ref.probability(fake), torch.ones(4)) + ((fake - real) ** 2 * w).mean()
    err.backward()
    step = make_step(nets, CPU.device, cfg.loss, overlap=4, channels_last=True)
    out = step({"image": image}, 0)
    torch.testing.assert_close(out["loss_g"], err.detach(), rtol=1e-4, atol=1e-6)
    # Adam's first step is lr * sign(grad): compare gradients, which it is made of
    # (float32 sums in another order: compare by relative norm)
    for (name, p), q in zip(nets.generator.named_parameters(), g_ref.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-3 * q.grad.norm(), name
    for (name, p), q in zip(nets.discriminator.named_parameters(), d_grads):
        assert (p.grad - q).norm() <= 1e-3 * q.norm(), name


def _small_folder(src: Path, dst: Path, n: int) -> Path:
    dst.mkdir()
    for p in sorted(src.iterdir(), key=lambda p: p.stat().st_size)[:n]:
        shutil.copy(p, dst / p.name)
    return dst


def test_training_run_lowers_masked_l2_and_writes_generator(tmp_path, synth_root):
    torch.manual_seed(0)
    cfg = InpaintingConfig(
        data=str(synth_root / "unlabelled"), device="cpu",
        loss=InpaintLossConfig(kind="l2", overlap=4),
        train=InpaintTrainConfig(iterations=12, batch_size=8, workers=0, log_every=4,
                                 sample_every=12, checkpoint_every=100, load_size=0),
    )
    metrics = main(cfg, open_run(tmp_path / "run", cfg))
    assert metrics["stage"] == "pretrain" and metrics["method"] == "inpainting"
    assert metrics["final_loss"] < metrics["initial_loss"]
    run = tmp_path / "run"
    assert (run / "samples" / "iter_0000012.png").is_file()
    gen, card = load_generator(run)
    assert card["loss"] == "l2" and card["overlap"] == 4 and card["iterations"] == 12
    assert json.loads((run / "metrics.json").read_text())["export"] == "generator.safetensors"
    assert gen(torch.zeros(1, 3, 128, 128)).shape == (1, 3, 64, 64)


def test_joint_run_on_real_images_lowers_masked_l2(tmp_path, shared_data):
    folder = _small_folder(shared_data / "ImageNet-sample", tmp_path / "imgs", 16)
    torch.manual_seed(0)
    cfg = InpaintingConfig(
        data=str(folder), device="cpu", loss=InpaintLossConfig(kind="joint", overlap=4),
        train=InpaintTrainConfig(iterations=10, batch_size=8, workers=0, log_every=5,
                                 sample_every=0, checkpoint_every=100, load_size=160),
    )
    metrics = main(cfg, open_run(tmp_path / "run", cfg))
    assert metrics["final_loss"] < metrics["initial_loss"]


def test_random_region_holes_stay_in_the_patch(tmp_path, synth_root):
    from pretrain.inpainting_train import make_hole_fn

    cfg = InpaintingConfig(mask="random-region", shapes=str(synth_root / "VOCdevkit/VOC2012"),
                           loss=InpaintLossConfig(overlap=4))
    fn = make_hole_fn(cfg)
    hole = fn(np.random.default_rng(0))
    assert hole.shape == (1, 128, 128) and hole.sum() > 0
    outside = hole.clone()
    outside[:, 36:92, 36:92] = 0
    assert outside.sum() == 0
    nets = build_nets(InpaintingConfig(loss=InpaintLossConfig(kind="l2", overlap=4)), CPU)
    step = make_step(nets, CPU.device, cfg.loss, overlap=4)
    holes = torch.stack([fn(np.random.default_rng(i)) for i in range(4)])
    out = step({"image": torch.rand(4, 3, 128, 128) * 2 - 1, "hole": holes}, 0)
    assert torch.isfinite(out["loss"])


def test_resume_continues_bit_exact(tmp_path, synth_root):
    def cfg(iterations: int) -> InpaintingConfig:
        return InpaintingConfig(
            data=str(synth_root / "unlabelled"), device="cpu",
            loss=InpaintLossConfig(kind="joint", overlap=4),
            train=InpaintTrainConfig(iterations=iterations, batch_size=4, workers=0,
                                     log_every=1, sample_every=0, checkpoint_every=2,
                                     load_size=0),
        )

    main(cfg(4), open_run(tmp_path / "a", cfg(4)))
    main(cfg(2), open_run(tmp_path / "b", cfg(2)))
    (tmp_path / "b" / "metrics.json").unlink()
    main(cfg(4), open_run(tmp_path / "b", cfg(4), resume=True, force=False)
         if False else _reopen(tmp_path / "b", cfg(4)))
    a, _ = load_generator(tmp_path / "a")
    b, _ = load_generator(tmp_path / "b")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def _reopen(path: Path, cfg: InpaintingConfig):
    import yaml

    from benchmark.config import to_dict

    (path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))  # iterations raised
    return open_run(path, cfg, resume=True)
