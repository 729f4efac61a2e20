"""jigsaw (Noroozi and Favaro 2016): tile geometry, shuffling by hand, per-tile
normalisation, colour handling, model shapes and a few training steps."""

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
from pretrain.pretext.jigsaw import (
    JigsawConfig,
    JigsawImages,
    JigsawNet,
    cell_size,
    crop_image,
    cut_tiles,
    learning_rate,
    make_optimizer,
    make_step,
    normalise_tiles,
    sample_figure,
    shuffle_tiles,
    tile_origins,
    unshuffle_tiles,
)
from pretrain.pretext.permutations import permutation_set

CFG = JigsawConfig()


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_paper_puzzle_geometry():
    assert (CFG.crop_size, cell_size(CFG), CFG.tile_size) == (225, 75, 64)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        origins = tile_origins(rng, CFG)
        assert origins.shape == (9, 2)
        for i, (y, x) in enumerate(origins):
            r, c = divmod(i, 3)  # row-major over the grid
            oy, ox = y - 75 * r, x - 75 * c
            assert 0 <= oy <= 75 - 64 and 0 <= ox <= 75 - 64  # inside its own cell
            seen.update({int(oy), int(ox)})
    assert seen == set(range(12))


def test_tiles_follow_the_permutation():
    """A crop whose cells hold their own index: input position i shows cell perm[i]."""
    cfg = JigsawConfig(channel_jitter=0)
    crop = np.zeros((225, 225, 3), np.uint8)
    for k in range(9):
        r, c = divmod(k, 3)
        crop[75 * r : 75 * (r + 1), 75 * c : 75 * (c + 1)] = 10 * k
    rng = np.random.default_rng(0)
    tiles = cut_tiles(crop, tile_origins(rng, cfg), rng, cfg, jitter=False)
    assert [int(t[0, 0, 0]) for t in tiles] == [10 * k for k in range(9)]
    perm = np.array([8, 0, 4, 2, 6, 1, 7, 3, 5])
    shuffled = shuffle_tiles(tiles, perm)
    assert [int(t.mean()) for t in shuffled] == [10 * k for k in perm]
    back = unshuffle_tiles(torch.from_numpy(shuffled), perm.tolist())
    assert torch.equal(back, torch.from_numpy(tiles))


def test_channel_jitter_bounds():
    """Rows of channel 0 and columns of channel 1 encode coordinates: each channel is cut
    at most 2 px from its tile, and some are moved."""
    yy, xx = np.mgrid[0:225, 0:225]
    crop = np.stack([yy, xx, np.zeros_like(yy)], axis=2).astype(np.uint8)
    rng = np.random.default_rng(3)
    moved = set()
    for _ in range(50):
        origins = tile_origins(rng, CFG)
        tiles = cut_tiles(crop, origins, rng, CFG, jitter=True)
        for (y, x), t in zip(origins, tiles):
            dy, dx = int(t[0, 0, 0]) - y, int(t[0, 0, 1]) - x
            assert abs(dy) <= 2 and abs(dx) <= 2
            moved.update({dy, dx})
    assert moved == {-2, -1, 0, 1, 2}


def test_per_tile_normalisation():
    tiles = np.random.default_rng(0).random((9, 64, 64, 3)).astype(np.float32) * 255
    tiles[3] = tiles[3] * 0.1 + 100  # a dim, low-contrast tile
    tiles[5] = 42.0  # a flat tile
    out = normalise_tiles(tiles)
    for i in range(9):
        if i == 5:
            assert np.all(out[i] == 0)
            continue
        assert abs(float(out[i].mean())) < 1e-5
        assert float(out[i].std()) == pytest.approx(1.0, abs=1e-4)


def test_dataset_items(tmp_path):
    cfg = JigsawConfig(permutations=100)
    ds = JigsawImages(write_images(tmp_path, [(320, 240), (256, 300)]), cfg)
    a, b, c = ds[(0, 1)], ds[(0, 1)], ds[(0, 2)]
    assert a["tiles"].shape == (9, 3, 64, 64) and a["tiles"].dtype == torch.float32
    assert a["label"].dtype == torch.int64 and 0 <= int(a["label"]) < 100
    assert torch.equal(a["tiles"], b["tiles"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["tiles"], c["tiles"])
    # every tile of every puzzle: zero mean and unit standard deviation on its own
    for key in [(0, s) for s in range(5)] + [(1, s) for s in range(5)]:
        tiles = ds[key]["tiles"].flatten(1)
        assert tiles.mean(dim=1).abs().max() < 1e-4
        torch.testing.assert_close(
            tiles.std(dim=1, unbiased=False), torch.ones(9), atol=1e-3, rtol=0
        )
    assert ds.permutations.shape == (100, 9)


def test_grey_puzzles(tmp_path):
    paths = write_images(tmp_path, [(300, 300)])
    grey = JigsawImages(paths, JigsawConfig(permutations=10, gray_prob=1.0))
    t = grey[(0, 0)]["tiles"]
    assert torch.equal(t[:, 0], t[:, 1]) and torch.equal(t[:, 1], t[:, 2])
    colour = JigsawImages(paths, JigsawConfig(permutations=10, gray_prob=0.0))
    t = colour[(0, 0)]["tiles"]
    assert not torch.equal(t[:, 0], t[:, 1])
    # about 30% of the default puzzles are grey
    ds = JigsawImages(paths, JigsawConfig(permutations=10))
    n_grey = sum(
        bool(torch.equal(ds[(0, s)]["tiles"][:, 0], ds[(0, s)]["tiles"][:, 1])) for s in range(60)
    )
    assert 8 <= n_grey <= 30


def test_crop_image_sizes():
    rng = np.random.default_rng(0)
    for size in [(500, 375), (100, 80), (225, 1000)]:
        assert crop_image(Image.new("RGB", size), rng, CFG).shape == (225, 225, 3)
    with pytest.raises(ValueError, match="does not fit"):
        JigsawNet(cfg=JigsawConfig(tile_size=80))


def test_paper_sized_model_shapes():
    model = JigsawNet("caffenet").eval()
    assert model.encoder.features[0].stride == (2, 2)  # the CFN's conv1 stride
    assert model.pool5_shape == (256, 3, 3)  # 64 px tiles, as the released CFN
    assert model.fc6[1].in_features == 2304 and model.fc6[1].out_features == 1024
    assert model.fc7[0].in_features == 9 * 1024 and model.fc7[0].out_features == 4096
    assert model.fc8.out_features == 1000
    with torch.no_grad():
        assert model(torch.randn(2, 9, 3, 64, 64)).shape == (2, 1000)
    # released init: conv2/4/5 biases 1, fc6/fc7 biases 1
    assert bool((model.encoder.features[3].bias == 1).all())
    assert bool((model.encoder.features[6].bias == 0).all())
    assert bool((model.fc7[0].bias == 1).all()) and bool((model.fc8.bias == 0).all())
    plain = AlexNetEncoder("caffenet").state_dict()
    mine = model.encoder.state_dict()
    assert mine.keys() == plain.keys() and all(mine[k].shape == plain[k].shape for k in plain)


def small_model(seed: int = 0) -> JigsawNet:
    torch.manual_seed(seed)
    cfg = JigsawConfig(tile_size=32, crop_size=108, permutations=10, fc6=16, fc7=32, dropout=0.0)
    return JigsawNet("caffenet", cfg=cfg)


def test_steps_lower_the_loss_and_reach_every_parameter():
    model = small_model()
    torch.manual_seed(1)
    batch = {"tiles": torch.randn(2, 9, 3, 32, 32), "label": torch.tensor([0, 6])}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = make_step(model, opt, torch.device("cpu"))
    first = step(batch, 0)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    losses = [float(first["loss"])] + [float(step(batch, i)["loss"]) for i in range(1, 5)]
    assert losses[-1] < losses[0] - 0.3, losses
    assert set(first) == {"loss", "accuracy"}


def test_schedule_and_optimiser():
    assert [learning_rate(CFG, i) for i in (0, 99_999, 100_000, 250_000)] == pytest.approx(
        [0.01, 0.01, 0.001, 0.0001]
    )
    opt = make_optimizer(small_model(), CFG)
    weights, biases = opt.param_groups
    assert weights["lr"] == 0.01 and weights["weight_decay"] == 5e-4
    assert biases["lr"] == 0.02 and biases["weight_decay"] == 0.0  # lr_mult 2, decay_mult 0
    assert all(p.dim() == 1 for p in biases["params"])


def test_sample_figure(tmp_path):
    perms = permutation_set(10, 0, "mean")
    batch = {"tiles": torch.randn(2, 9, 3, 32, 32), "label": torch.tensor([1, 7])}
    path = sample_figure(batch, torch.randn(2, 10), tmp_path / "jig.png", permutations=perms)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[1] > 100


def test_registered():
    parts = PRETEXT_METHODS["jigsaw"]
    assert parts.model is JigsawNet and parts.dataset is JigsawImages
    assert parts.total_iterations(CFG, 10) == 350_000


@pytest.mark.skipif(
    "seed" not in inspect.signature(SeededImages.__init__).parameters,
    reason="this SeededImages keys samples without a run seed",
)
def test_run_seed_changes_the_samples(tmp_path):
    paths = write_images(tmp_path, [(300, 240)])
    a = JigsawImages(paths, JigsawConfig(permutations=10), seed=0)[(0, 3)]
    b = JigsawImages(paths, JigsawConfig(permutations=10), seed=1)[(0, 3)]
    key = next(iter(a))
    assert not torch.equal(a[key], b[key])
