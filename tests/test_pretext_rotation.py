"""rotation (RotNet, Gidaris et al. 2018): rotation labels by hand, all four rotations of
each image, crops, schedule, model shapes and a few training steps."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.alexnet import AlexNetEncoder
from pretrain.data import SeededImages
from pretrain.pretext import PRETEXT_METHODS
from pretrain.pretext.rotation import (
    RotationConfig,
    RotationImages,
    RotationNet,
    all_rotations,
    iterations_per_epoch,
    learning_rate,
    make_optimizer,
    make_step,
    random_sized_crop,
    rotate,
    sample_figure,
    total_iterations,
)


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def rotnet_rotate_img(img: np.ndarray, rot: int) -> np.ndarray:
    """dataloader.py's rotate_img, on (H, W, C) arrays."""
    if rot == 0:
        return img
    if rot == 90:
        return np.flipud(np.transpose(img, (1, 0, 2)))
    if rot == 180:
        return np.fliplr(np.flipud(img))
    return np.transpose(np.flipud(img), (1, 0, 2))


def test_rot90_by_hand():
    img = torch.arange(9.0).view(1, 3, 3)  # 0 1 2 / 3 4 5 / 6 7 8
    assert rotate(img, 0)[0].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert rotate(img, 1)[0].tolist() == [[2, 5, 8], [1, 4, 7], [0, 3, 6]]  # 90 ccw
    assert rotate(img, 2)[0].tolist() == [[8, 7, 6], [5, 4, 3], [2, 1, 0]]
    assert rotate(img, 3)[0].tolist() == [[6, 3, 0], [7, 4, 1], [8, 5, 2]]  # 270 ccw
    assert torch.equal(rotate(rotate(img, 1), 3), img)


def test_rotations_match_rotnet_loader():
    x = np.random.default_rng(0).random((5, 5, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(2, 0, 1)
    for k, deg in enumerate((0, 90, 180, 270)):
        ours = rotate(t, k).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(ours, rotnet_rotate_img(x, deg))


def test_all_four_rotations_of_every_image():
    images = torch.randn(3, 3, 8, 8)
    x, labels = all_rotations(images)
    assert x.shape == (12, 3, 8, 8)
    assert labels.tolist() == [0, 1, 2, 3] * 3
    for i in range(3):
        for k in range(4):
            assert torch.equal(x[4 * i + k], rotate(images[i], k))
    with pytest.raises(ValueError, match="square"):
        all_rotations(torch.zeros(1, 3, 8, 9))


def test_random_sized_crop_and_fallback():
    rng = np.random.default_rng(0)
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    for _ in range(10):
        assert random_sized_crop(im, 224, rng).size == (224, 224)
    # an image far outside [3/4, 4/3] falls back to a centre crop at the nearest ratio
    thin = Image.new("RGB", (1000, 20))
    assert random_sized_crop(thin, 32, rng, scale=(0.99, 1.0)).size == (32, 32)


def test_dataset_is_keyed(tmp_path):
    ds = RotationImages(write_images(tmp_path, [(300, 240), (256, 400)]))
    a, b, c = ds[(0, 3)], ds[(0, 3)], ds[(0, 4)]
    assert a["image"].shape == (3, 224, 224) and a["image"].dtype == torch.float32
    assert torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])
    fixed = RotationImages(ds.paths, RotationConfig(random_sized_crop=False, crop_size=96))
    assert fixed[(1, 0)]["image"].shape == (3, 96, 96)


def test_schedule_and_optimiser():
    cfg = RotationConfig()
    per_epoch = iterations_per_epoch(cfg, 1_281_167)  # ImageNet train
    assert per_epoch == 6673
    assert total_iterations(cfg, 1_281_167) == 50 * 6673
    rates = [learning_rate(cfg, e * per_epoch, per_epoch) for e in (0, 14, 15, 29, 30, 45, 49, 60)]
    assert rates == [0.01, 0.01, 0.001, 0.001, 1e-4, 1e-5, 1e-5, 1e-5]
    opt = make_optimizer(RotationNet(cfg=RotationConfig(crop_size=64, fc=16)), cfg)
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    assert all(g["weight_decay"] == 5e-4 and g["lr"] == 0.01 for g in opt.param_groups)
    assert cfg.batch_size == 192 and cfg.epochs == 50
    with pytest.raises(ValueError, match="iterations_per_epoch"):
        learning_rate(cfg, 0)


@pytest.mark.parametrize("arch", ["caffenet", "torchvision"])
def test_paper_sized_model_shapes(arch):
    model = RotationNet(arch).eval()
    assert model.pool5_shape == (256, 6, 6)  # RotNet's num_pool5_feats = 6 * 6 * 256
    assert model.fc_block[1].in_features == 9216 and model.fc_block[1].out_features == 4096
    assert model.fc_block[1].bias is None  # bias=False before BatchNorm, as AlexNet.py
    assert model.classifier.out_features == 4
    with torch.no_grad():
        assert model(torch.randn(4, 3, 224, 224)).shape == (4, 4)
    plain = AlexNetEncoder(arch).state_dict()
    assert model.encoder.state_dict().keys() == plain.keys()


def small_model(seed: int = 0) -> RotationNet:
    torch.manual_seed(seed)
    return RotationNet("caffenet", cfg=RotationConfig(crop_size=64, fc=32))


def test_steps_lower_the_loss_and_reach_every_parameter():
    model = small_model()
    torch.manual_seed(1)
    batch = {"image": torch.randn(3, 3, 64, 64)}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = make_step(model, opt, torch.device("cpu"))
    first = step(batch, 0)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    losses = [float(first["loss"])] + [float(step(batch, i)["loss"]) for i in range(1, 6)]
    assert losses[-1] < losses[0] - 0.15, losses
    assert set(first) == {"loss", "accuracy"}


def test_step_under_bf16_autocast():
    class Bf16:
        def autocast(self):
            return torch.autocast("cpu", dtype=torch.bfloat16)

        def backward(self, loss):
            loss.backward()

        def step(self, optimizer):
            optimizer.step()

    model = small_model()
    step = make_step(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        torch.device("cpu"),
        precision=Bf16(),
        channels_last=True,
    )
    out = step({"image": torch.randn(2, 3, 64, 64)}, 0)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_sample_figure(tmp_path):
    batch = {"image": torch.randn(2, 3, 64, 64)}
    path = sample_figure(batch, torch.randn(8, 4), tmp_path / "rot.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_registered():
    parts = PRETEXT_METHODS["rotation"]
    assert parts.model is RotationNet and parts.dataset is RotationImages
    assert parts.config().lr_schedule[0] == (15, 0.01)


@pytest.mark.skipif(
    "seed" not in inspect.signature(SeededImages.__init__).parameters,
    reason="this SeededImages keys samples without a run seed",
)
def test_run_seed_changes_the_samples(tmp_path):
    paths = write_images(tmp_path, [(300, 240)])
    a = RotationImages(paths, None, seed=0)[(0, 3)]
    b = RotationImages(paths, None, seed=1)[(0, 3)]
    key = next(iter(a))
    assert not torch.equal(a[key], b[key])
