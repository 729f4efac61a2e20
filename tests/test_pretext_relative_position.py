"""relative-position (Doersch et al. 2015): pair geometry, labels, anti-shortcut
preprocessing, dataset keys, model shapes and a few training steps."""

from __future__ import annotations

import inspect
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.alexnet import AlexNetEncoder
from pretrain.data import SeededImages
from pretrain.pretext import PRETEXT_METHODS
from pretrain.pretext.relative_position import (
    GREEN_MAGENTA,
    NEIGHBOUR_NAMES,
    NEIGHBOUR_OFFSETS,
    RelativePositionConfig,
    RelativePositionImages,
    RelativePositionNet,
    grid_pitch,
    grid_span,
    make_step,
    prepare_patch,
    resize_for_pairs,
    sample_figure,
    sample_pair,
)

CFG = RelativePositionConfig()


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_labels_are_doersch_numbering():
    # Fig. 2 / pos2lbl: 1 2 3 / 4 . 5 / 6 7 8, row by row; label = number - 1.
    grid = {(dy, dx): i for i, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS)}
    assert grid == {
        (-1, -1): 0, (-1, 0): 1, (-1, 1): 2,
        (0, -1): 3, (0, 1): 4,
        (1, -1): 5, (1, 0): 6, (1, 1): 7,
    }  # fmt: skip
    assert NEIGHBOUR_NAMES[0] == "up-left" and NEIGHBOUR_NAMES[4] == "right"
    assert NEIGHBOUR_NAMES[6] == "down"


def test_paper_geometry_constants():
    assert (CFG.patch_size, CFG.gap, CFG.jitter) == (96, 48, 7)
    assert grid_pitch(CFG) == 144
    assert grid_span(CFG) == 3 * 96 + 2 * 48 + 2 * 7 == 398


@pytest.mark.parametrize("height,width", [(398, 398), (420, 700), (600, 450)])
def test_pair_geometry(height, width):
    p, pitch, j = CFG.patch_size, grid_pitch(CFG), CFG.jitter
    rng = np.random.default_rng(0)
    labels, jitters = Counter(), set()
    for _ in range(2000):
        pair = sample_pair(rng, height, width, CFG)
        (y1, x1), (y2, x2) = pair.first, pair.second
        for y, x in (pair.first, pair.second):  # both patches inside the image
            assert 0 <= y <= height - p and 0 <= x <= width - p
        dy, dx = NEIGHBOUR_OFFSETS[pair.label]
        # the second patch sits one grid step away in the label's direction, up to jitter
        assert abs((y2 - y1) - dy * pitch) <= 2 * j
        assert abs((x2 - x1) - dx * pitch) <= 2 * j
        assert round((y2 - y1) / pitch) == dy and round((x2 - x1) / pitch) == dx
        # never overlapping: at least gap - 2 * jitter = 34 px apart along a moved axis
        gap_y = abs(y2 - y1) - p if dy else None
        gap_x = abs(x2 - x1) - p if dx else None
        assert max(g for g in (gap_y, gap_x) if g is not None) >= CFG.gap - 2 * j
        labels[pair.label] += 1
        jitters.update({(y2 - y1) - dy * pitch, (x2 - x1) - dx * pitch})
    # all eight labels, about uniformly; the relative jitter spans [-14, 14]
    assert sorted(labels) == list(range(8))
    assert min(labels.values()) > 2000 / 8 * 0.75
    assert min(jitters) == -2 * j and max(jitters) == 2 * j


def test_first_patch_jitter_and_grid_origin():
    """The first patch is the centre of a 3x3 grid whose origin is uniform; it moves by
    at most `jitter` from the centre cell, whatever the label."""
    rng = np.random.default_rng(1)
    h = w = grid_span(CFG)  # the grid fits exactly: its origin is fixed at (jitter, jitter)
    centre = CFG.jitter + grid_pitch(CFG)
    offsets = set()
    for _ in range(500):
        pair = sample_pair(rng, h, w, CFG)
        offsets.update({pair.first[0] - centre, pair.first[1] - centre})
    assert offsets == set(range(-CFG.jitter, CFG.jitter + 1))
    with pytest.raises(ValueError, match="smaller than the grid"):
        sample_pair(rng, h - 1, w, CFG)


def test_resize_for_pairs():
    rng = np.random.default_rng(0)
    for size in [(500, 375), (1600, 1200), (200, 120), (3000, 400)]:
        for _ in range(5):
            out = resize_for_pairs(Image.new("RGB", size), rng, CFG)
            w, h = out.size
            assert min(w, h) >= grid_span(CFG)
            if min(w, h) > grid_span(CFG):  # not scaled up to fit: 150K-450K pixels
                assert CFG.min_pixels * 0.99 <= w * h <= CFG.max_pixels * 1.01
                assert w / h == pytest.approx(size[0] / size[1], rel=0.01)  # aspect kept


def test_patches_are_cut_at_their_positions(tmp_path):
    """Without colour handling, pixelation or per-patch normalisation a patch is the image
    pixels at its reported position in the default CaffeNet's input convention (Caffe's: BGR,
    0-255, minus (104, 117, 123))."""
    cfg = RelativePositionConfig(colour="none", pixelate_prob=0.0, normalise_patches=False)
    ds = RelativePositionImages(write_images(tmp_path, [(450, 420), (640, 480)]), cfg)
    for key in [(0, 11), (1, 12), (1, 99)]:
        item = ds[key]
        image, rng = ds.load(key)
        pixels = np.asarray(resize_for_pairs(image, rng, cfg))
        assert tuple(item["image_size"].tolist()) == pixels.shape[:2]
        p = cfg.patch_size
        for k, (y, x) in enumerate(item["positions"].tolist()):
            bgr = pixels[y : y + p, x : x + p, ::-1] - np.float32([104, 117, 123])
            expected = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))
            torch.testing.assert_close(item["patches"][k], expected)
        dy, dx = NEIGHBOUR_OFFSETS[int(item["label"])]
        (y1, x1), (y2, x2) = item["positions"].tolist()
        assert round((y2 - y1) / grid_pitch(cfg)) == dy and round((x2 - x1) / grid_pitch(cfg)) == dx


def test_dataset_is_keyed(tmp_path):
    ds = RelativePositionImages(write_images(tmp_path, [(400, 400), (500, 400)]))
    a, b, c = ds[(1, 5)], ds[(1, 5)], ds[(1, 6)]
    assert a["patches"].shape == (2, 3, 96, 96) and a["patches"].dtype == torch.float32
    assert a["label"].dtype == torch.int64 and a["label"].shape == ()
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["patches"], c["patches"])


def test_colour_dropping_keeps_one_channel():
    cfg = RelativePositionConfig(colour="drop", pixelate_prob=0.0)
    patch = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    kept = Counter()
    for seed in range(30):
        x = prepare_patch(patch, np.random.default_rng(seed), cfg)
        std = x.flatten(1).std(dim=1)
        keep = int(std.argmax())
        kept[keep] += 1
        others = [c for c in range(3) if c != keep]
        assert (std[others] < 0.02 * std[keep]).all()  # noise ~1/100 of the kept channel
        # unit RMS, zero mean per channel (the released prep_image)
        assert float(x.pow(2).mean().sqrt()) == pytest.approx(1.0, abs=1e-4)
        assert x.mean(dim=(1, 2)).abs().max() < 1e-4
    assert sorted(kept) == [0, 1, 2]


def test_colour_projection_removes_green_magenta():
    cfg = RelativePositionConfig(colour="project", pixelate_prob=0.0)
    patch = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    x = prepare_patch(patch, np.random.default_rng(0), cfg)
    a = torch.tensor(GREEN_MAGENTA, dtype=torch.float32).view(3, 1, 1)
    assert (x * a).sum(0).abs().max() < 1e-4  # every pixel orthogonal to [-1, 2, -1]
    assert x.flatten(1).std(dim=1).min() > 0.1  # colour otherwise kept


def test_pixelation_blurs():
    cfg = RelativePositionConfig(
        colour="none", pixelate_prob=1.0, pixelate_min_side=10, pixelate_max_side=10
    )
    patch = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    x = prepare_patch(patch, np.random.default_rng(0), cfg)
    plain = RelativePositionConfig(colour="none", pixelate_prob=0.0)
    sharp = prepare_patch(patch, np.random.default_rng(0), plain)
    neighbour_diff = (x[:, 1:] - x[:, :-1]).abs().mean()
    assert neighbour_diff < 0.2 * (sharp[:, 1:] - sharp[:, :-1]).abs().mean()


def test_paper_sized_model_shapes():
    model = RelativePositionNet("caffenet").eval()
    # CaffeNet, 96 px patches, conv1 padded by 5: pool5 256 x 3 x 3, as the released net
    assert model.pool5_shape == (256, 3, 3)
    assert model.fc6[1].in_features == 2304 and model.fc6[1].out_features == 4096
    assert model.fc7[0].in_features == 8192 and model.fc7[0].out_features == 4096
    assert model.fc8[0].out_features == 4096 and model.fc9.out_features == 8
    with torch.no_grad():
        assert model(torch.randn(3, 2, 3, 96, 96)).shape == (3, 8)
        assert model.embed(torch.randn(2, 3, 96, 96)).shape == (2, 4096)
    # the encoder's weights are the plain encoder's: they transfer like any other
    plain = AlexNetEncoder("caffenet").state_dict()
    mine = model.encoder.state_dict()
    assert mine.keys() == plain.keys()
    assert all(mine[k].shape == plain[k].shape for k in plain)


class RecordingPrecision:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def autocast(self):
        self.calls.append("autocast")
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def backward(self, loss):
        self.calls.append("backward")
        loss.backward()

    def step(self, optimizer):
        self.calls.append("step")
        optimizer.step()

    def update(self):
        self.calls.append("update")


def small_model(seed: int = 0) -> tuple[RelativePositionNet, RelativePositionConfig]:
    torch.manual_seed(seed)
    cfg = RelativePositionConfig(patch_size=48, fc6=32, fc7=32, fc8=32)
    return RelativePositionNet("caffenet", cfg=cfg), cfg


def test_steps_lower_the_loss_and_reach_every_parameter():
    model, cfg = small_model()
    torch.manual_seed(1)
    batch = {"patches": torch.randn(4, 2, 3, 48, 48), "label": torch.tensor([0, 2, 5, 7])}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = make_step(model, opt, torch.device("cpu"), loss_reduction="mean")
    first = step(batch, 0)
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    losses = [float(first["loss"])] + [float(step(batch, i)["loss"]) for i in range(1, 5)]
    assert losses[-1] < losses[0] - 0.3
    assert set(first) == {"loss", "accuracy"} and 0 <= float(first["accuracy"]) <= 1


def test_summed_loss_reports_the_mean():
    model, _ = small_model()
    batch = {"patches": torch.randn(4, 2, 3, 48, 48), "label": torch.tensor([0, 3, 5, 7])}
    sums = make_step(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.device("cpu"))
    means = make_step(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        torch.device("cpu"),
        loss_reduction="mean",
    )
    model.eval()  # same BatchNorm statistics for both calls
    assert float(sums(batch, 0)["loss"]) == pytest.approx(float(means(batch, 0)["loss"]), rel=1e-5)


def test_step_goes_through_the_precision_object():
    model, _ = small_model()
    prec = RecordingPrecision()
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    step = make_step(model, opt, torch.device("cpu"), precision=prec, channels_last=True)
    out = step({"patches": torch.randn(2, 2, 3, 48, 48), "label": torch.tensor([1, 2])}, 0)
    assert prec.calls == ["autocast", "backward", "step"]  # update() is the loop's
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_sample_figure(tmp_path):
    batch = {"patches": torch.randn(3, 2, 3, 96, 96), "label": torch.tensor([0, 4, 7])}
    path = sample_figure(batch, torch.randn(3, 8), tmp_path / "s" / "pairs.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 50


def test_registered():
    parts = PRETEXT_METHODS["relative-position"]
    assert parts.model is RelativePositionNet and parts.make_step is make_step
    assert parts.learning_rate(CFG, 10**6) == 1e-5
    opt = parts.make_optimizer(small_model()[0], CFG)
    assert all(g["lr"] == 1e-5 and g["weight_decay"] == 0.0 for g in opt.param_groups)


@pytest.mark.skipif(
    "seed" not in inspect.signature(SeededImages.__init__).parameters,
    reason="this SeededImages keys samples without a run seed",
)
def test_run_seed_changes_the_samples(tmp_path):
    paths = write_images(tmp_path, [(400, 400)])
    a = RelativePositionImages(paths, None, seed=0)[(0, 3)]
    b = RelativePositionImages(paths, None, seed=1)[(0, 3)]
    key = next(iter(a))
    assert not torch.equal(a[key], b[key])
