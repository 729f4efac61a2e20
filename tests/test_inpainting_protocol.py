"""The inpainting protocol against its sources: the paper's Table 1 geometry as the default,
the released code's as one named option, mixed geometries only on request; and the released
code's networks, learning rates and noise masks, each checked against the lines of
pathak22/context-encoder@68abd11 train.lua / train_random.lua it comes from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from benchmark.config import load_config
from benchmark.distributed import DistEnv
from benchmark.errors import BenchError, ConfigError
from benchmark.input_convention import CAFFE
from benchmark.loop import Precision
from benchmark.protocol import departures
from pretrain.adversarial import DCGANDiscriminator
from pretrain.data import PretrainImages
from pretrain.inpainting.config import InpaintEvalConfig, InpaintingConfig
from pretrain.inpainting.model import ContextEncoderGenerator, HoleGeometry
from pretrain.inpainting.train import build_nets, check, training_images
from pretrain.inpainting.weights import card_geometry
from pretrain.masks import make_mask_fn

CPU = DistEnv(0, 1, 0, torch.device("cpu"))


def config(*overrides: str) -> InpaintingConfig:
    return load_config(InpaintingConfig, overrides=list(overrides))


# ---------------------------------------------------------------- Table 1 geometry


def test_default_is_the_papers_64px_hole_with_a_7px_overlap():
    """Section 5.1: a 64x64 hole; the prediction overlaps the context by 7 px (78x78)."""
    g = config().geometry()
    assert (g.mode, g.overlap, g.mixed) == ("paper", 7, False)
    assert (g.hole.start, g.hole.size) == (32, 64)
    assert (g.prediction.start, g.prediction.size) == (25, 78)
    assert g.scored == g.hole and g.scored_region == "hole"
    assert g.hole_mask().sum() == 64 * 64
    assert departures(config()) == []


def test_released_geometry_is_one_option_with_its_own_overlap():
    """train.lua L282-285 (mean fill of the inner 56x56), README L75 overlapPred=4: one key."""
    cfg = config("hole=code")
    g = cfg.geometry()
    assert (g.overlap, g.hole.size, g.prediction.size, g.mixed) == (4, 56, 64, False)
    assert g.scored == g.prediction  # the public port scores the 64x64 prediction
    assert departures(cfg) == ["hole"]
    # the released overlap stated as well is the same one departure
    assert departures(config("hole=code", "loss.overlap=4")) == ["hole"]
    assert departures(config("hole=paper", "loss.overlap=7")) == []


def test_mixed_geometry_needs_both_keys_and_is_a_departure():
    with pytest.raises(ConfigError, match="mixes two geometries.*hole=code"):
        config("loss.overlap=4")
    mixed = config("hole=code", "loss.overlap=7")  # the former default: 50x50 in 64x64
    g = mixed.geometry()
    assert g.mixed and (g.hole.size, g.prediction.size) == (50, 64)
    assert "mixed" in g.describe() and g.label().startswith("mixed geometry")
    assert departures(mixed) == ["hole", "loss.overlap"]
    paper_hole = config("hole=paper", "loss.overlap=4")
    assert paper_hole.geometry().mixed and departures(paper_hole) == ["loss.overlap"]


def test_a_config_round_trips_through_its_dump():
    """A run's saved config (every key given) loads back to the same geometry."""
    from benchmark.config import from_dict, to_dict

    for over in ([], ["hole=code"], ["hole=code", "loss.overlap=7"]):
        cfg = config(*over)
        again = from_dict(InpaintingConfig, to_dict(cfg))
        assert again == cfg and again.geometry() == cfg.geometry()


def test_evaluation_geometry_follows_the_card_and_refuses_half_a_mix():
    assert card_geometry(None) == HoleGeometry("paper", 7)  # NN baselines without weights
    assert card_geometry({}) == HoleGeometry("code", 7)  # a card from before `hole`
    assert card_geometry({"hole": "code", "overlap": 4}) == HoleGeometry("code")
    assert card_geometry(None, "code") == HoleGeometry("code", 4)  # a hole brings its overlap
    assert card_geometry({"hole": "paper", "overlap": 7}, overlap=7) == HoleGeometry("paper")
    with pytest.raises(BenchError, match="mixes two geometries"):
        card_geometry({"hole": "paper", "overlap": 7}, overlap=4)
    assert card_geometry(None, "paper", 4).mixed
    assert departures(InpaintEvalConfig(baseline="nn-hog")) == []
    assert departures(InpaintEvalConfig(baseline="nn-hog", hole="code")) == ["hole"]


# ---------------------------------------------------------------- the released networks

# pathak22/context-encoder@68abd11 train.lua, module by module (unconditioned D, no noise):
# conv = SpatialConvolution(cin, cout, k, k, s, s, p, p); up = SpatialFullConvolution.
RELEASED_G = [
    ("conv", 3, 64, 4, 2, 1), ("lrelu",),  # L88-89
    ("conv", 64, 64, 4, 2, 1), ("bn", 64), ("lrelu",),  # L91-92
    ("conv", 64, 128, 4, 2, 1), ("bn", 128), ("lrelu",),  # L94-95
    ("conv", 128, 256, 4, 2, 1), ("bn", 256), ("lrelu",),  # L97-98
    ("conv", 256, 512, 4, 2, 1), ("bn", 512), ("lrelu",),  # L100-101
    ("conv", 512, 4000, 4, 1, 0),  # L103 (nBottleneck 4000: README L75)
    ("bn", 4000), ("lrelu",),  # L126: the bottleneck's BatchNorm + LeakyReLU
    ("up", 4000, 512, 4, 1, 0), ("bn", 512), ("relu",),  # L133-134
    ("up", 512, 256, 4, 2, 1), ("bn", 256), ("relu",),  # L136-137
    ("up", 256, 128, 4, 2, 1), ("bn", 128), ("relu",),  # L139-140
    ("up", 128, 64, 4, 2, 1), ("bn", 64), ("relu",),  # L142-143
    ("up", 64, 3, 4, 2, 1), ("tanh",),  # L145-146
]  # fmt: skip
RELEASED_D = [
    ("conv", 3, 64, 4, 2, 1), ("lrelu",),  # L180-181
    ("conv", 64, 128, 4, 2, 1), ("bn", 128), ("lrelu",),  # L184-185
    ("conv", 128, 256, 4, 2, 1), ("bn", 256), ("lrelu",),  # L187-188
    ("conv", 256, 512, 4, 2, 1), ("bn", 512), ("lrelu",),  # L190-191
    ("conv", 512, 1, 4, 1, 0),  # L193; the sigmoid of L194 is in the loss / .probability
]  # fmt: skip


def _layers(net: nn.Module) -> list[tuple]:
    out: list[tuple] = []
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            kind = "up" if isinstance(m, nn.ConvTranspose2d) else "conv"
            out.append((kind, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0],
                        m.padding[0]))  # fmt: skip
            # train.lua zeroes every conv bias before each D and G step (L274-275,
            # L344-345): the released networks train without any
            assert m.bias is None, m
        elif isinstance(m, nn.BatchNorm2d):
            assert m.affine and m.eps == 1e-5  # BatchNorm keeps scale and shift
            out.append(("bn", m.num_features))
        elif isinstance(m, nn.LeakyReLU):
            assert m.negative_slope == 0.2
            out.append(("lrelu",))
        elif isinstance(m, nn.ReLU):
            out.append(("relu",))
        elif isinstance(m, nn.Tanh):
            out.append(("tanh",))
    return out


def test_generator_is_the_released_one_layer_by_layer():
    assert _layers(ContextEncoderGenerator()) == RELEASED_G
    # the paper's 78x78 prediction: the same layers and state dict, a parameter-free resize
    paper = ContextEncoderGenerator(output_size=78)
    assert _layers(paper) == RELEASED_G
    assert paper.state_dict().keys() == ContextEncoderGenerator().state_dict().keys()


def test_discriminator_is_the_released_one_layer_by_layer():
    assert _layers(DCGANDiscriminator(64)) == RELEASED_D
    # the 78x78 patch of the paper's geometry: the same layers, 78 -> 39 -> 19 -> 9 -> 4
    assert _layers(DCGANDiscriminator(78)) == RELEASED_D


@pytest.mark.parametrize(
    "kind, lr_g, lr_d", [("joint", 2e-3, 2e-4), ("l2", 2e-4, None), ("adversarial", 2e-4, 2e-4)]
)
def test_generator_is_10x_faster_for_the_joint_loss_only(kind, lr_g, lr_d):
    """train.lua L213-221: G at opt.lr*10 iff 0 < wtl2 < 1 (the joint loss), D at opt.lr
    (L19: 0.0002); with wtl2 1 (L2 only) or 0 (adversarial only) both at opt.lr."""
    cfg = config(f"loss.kind={kind}", "bottleneck=8")
    assert cfg.generator_lr() == pytest.approx(lr_g)
    _, opt_g, adversary = build_nets(cfg, CPU, Precision("fp32", CPU.device))
    assert opt_g.param_groups[0]["lr"] == pytest.approx(lr_g)
    assert opt_g.param_groups[0]["betas"] == (0.5, 0.999)  # train.lua L20 beta1 0.5
    if lr_d is None:
        assert adversary is None
    else:
        assert adversary.optimizer.param_groups[0]["lr"] == pytest.approx(lr_d)
    assert departures(cfg) == ["bottleneck"]


def test_generator_ratio_is_refused_where_it_cannot_apply():
    check(config("train.g_lr_ratio=1"))  # joint: the public PyTorch port's equal rates
    assert departures(config("train.g_lr_ratio=1")) == ["train.g_lr_ratio"]
    with pytest.raises(ConfigError, match="g_lr_ratio: applies to the joint loss only"):
        check(config("loss.kind=l2", "train.g_lr_ratio=1"))


# ---------------------------------------------------------------- noise-region: one a batch


def test_noise_holes_are_one_per_batch_random_regions_one_per_image(synth_root):
    """train_random.lua L316-330: one noise window per batch, repeated over the batch."""
    paths = sorted((synth_root / "unlabelled").iterdir())[:3]
    noise = training_images(config("mask=noise-region", "train.batch_size=4"), paths)
    assert noise.mask_batch == 4
    batch = [noise[(k % 3, k)]["hole"] for k in range(8, 12)]  # iteration 2's global batch
    assert all(torch.equal(h, batch[0]) for h in batch) and batch[0].sum() > 0
    assert not torch.equal(noise[(0, 12)]["hole"], batch[0])  # the next batch: another
    assert not torch.equal(noise[(0, 8)]["image"], noise[(0, 9)]["image"])  # crops stay own
    shapes = str(synth_root / "VOCdevkit/VOC2012")
    region = training_images(config("mask=random-region", f"shapes={shapes}"), paths)
    assert region.mask_batch == 0
    assert not torch.equal(region[(0, 8)]["hole"], region[(0, 9)]["hole"])


def test_feature_learning_noise_masks_are_one_per_batch_too(synth_root):
    paths = sorted((synth_root / "unlabelled").iterdir())[:2]
    fn = make_mask_fn("noise-region", (64, 64), seed=0)
    ds = PretrainImages(paths, 64, CAFFE, fn, seed=0, mask_batch=3)
    masks = [ds[(k % 2, k)]["mask"] for k in (3, 4, 5, 6)]
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])
    assert not torch.equal(masks[2], masks[3])
    frac = masks[0].mean().item()
    assert 0.2 < frac < 0.3  # train_random.lua L324: area>20 and area<30 (percent)
    per_image = PretrainImages(paths, 64, CAFFE, fn, seed=0)
    assert not np.array_equal(per_image[(0, 3)]["mask"], per_image[(1, 4)]["mask"])
