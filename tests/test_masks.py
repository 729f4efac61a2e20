"""Region masks: coverage statistics, determinism per seed, VOC shapes, mean filling."""

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.errors import DatasetError
from pretrain.masks import (
    MASKS,
    apply_mask,
    central_mask,
    deform_shape,
    load_voc_shapes,
    make_mask_fn,
    noise_pattern,
)

SIZE = (96, 96)


def fake_voc2012(root, n=6):
    """A VOC2012 folder whose SegmentationObject PNGs hold an ellipse and a box each."""
    folder = root / "VOC2012" / "SegmentationObject"
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:60, :80]
    for i in range(n):
        labels = np.zeros((60, 80), np.uint8)
        labels[((yy - 30) / (10 + i)) ** 2 + ((xx - 25) / 15) ** 2 < 1] = 1
        labels[5:20, 50 : 60 + i] = 2
        labels[0, :] = 255  # void border, not a shape
        im = Image.fromarray(labels, mode="P")
        im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
        im.save(folder / f"2007_{i:06d}.png")
    return root / "VOC2012"


def draw(fn, seed, n):
    rng = np.random.default_rng(seed)
    return [fn(rng) for _ in range(n)]


def test_mask_names():
    assert list(MASKS) == ["central", "random-block", "random-region", "noise-region"]


def test_central_square_is_a_quarter_in_the_middle():
    m = central_mask((128, 128))
    assert m.dtype == bool and m.sum() == 64 * 64
    assert m[32:96, 32:96].all() and not m[:32].any() and not m[:, 96:].any()


def test_random_block_coverage_and_determinism():
    fn = make_mask_fn("random-block", SIZE)
    masks = draw(fn, 0, 200)
    cov = np.array([m.mean() for m in masks])
    assert cov.max() <= 0.25 and cov.min() > 0.05
    assert 0.15 < cov.mean() < 0.25
    assert len({m.tobytes() for m in masks}) > 190  # not the same mask over and over
    assert all(np.array_equal(a, b) for a, b in zip(masks[:20], draw(fn, 0, 20)))
    assert not all(np.array_equal(a, b) for a, b in zip(masks[:20], draw(fn, 1, 20)))


def test_voc_shapes_are_loaded_per_object(tmp_path):
    shapes = load_voc_shapes(fake_voc2012(tmp_path, n=3))
    assert len(shapes) == 6  # two objects per file, the 255 border skipped
    assert all(s.dtype == bool and s[0].any() and s[:, 0].any() for s in shapes)  # cropped


def test_voc_shapes_missing_folder_is_one_line_error(tmp_path):
    with pytest.raises(DatasetError, match="SegmentationObject"):
        load_voc_shapes(tmp_path)


def test_deform_shape_hits_the_requested_area():
    rng = np.random.default_rng(0)
    disk = np.hypot(*np.mgrid[-20:21, -20:21]) < 20
    for area in (100, 500, 2000):
        out = deform_shape(disk, area, rng)
        assert 0.7 * area < out.sum() < 1.3 * area


def test_random_region_coverage_and_determinism(tmp_path):
    shapes = load_voc_shapes(fake_voc2012(tmp_path))
    fn = make_mask_fn("random-region", SIZE, shapes=shapes)
    masks = draw(fn, 3, 200)
    cov = np.array([m.mean() for m in masks])
    assert cov.max() <= 0.25 and cov.min() > 0.05
    assert 0.12 < cov.mean() < 0.25
    assert all(np.array_equal(a, b) for a, b in zip(masks[:20], draw(fn, 3, 20)))
    assert not all(np.array_equal(a, b) for a, b in zip(masks[:20], draw(fn, 4, 20)))
    with pytest.raises(ValueError):
        make_mask_fn("random-region", SIZE)


def test_noise_region_windows_hold_20_to_30_percent():
    pattern = noise_pattern(np.random.default_rng(0), size=1024)
    # Upsampling smooths the noise, so fewer than 25% of pixels fall below 0.25.
    assert 0.1 < pattern.mean() < 0.25
    fn = make_mask_fn("noise-region", SIZE, seed=0)
    masks = draw(fn, 0, 100)
    cov = np.array([m.mean() for m in masks])
    assert ((cov >= 0.2) & (cov <= 0.3)).mean() > 0.95
    assert all(np.array_equal(a, b) for a, b in zip(masks[:10], draw(fn, 0, 10)))
    fn_same = make_mask_fn("noise-region", SIZE, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(masks[:10], draw(fn_same, 0, 10)))


def test_dropped_pixels_get_the_dataset_mean():
    images = torch.randn(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 3:6] = 1
    fill = torch.tensor([0.1, -0.2, 0.3])
    out = apply_mask(images, mask, fill)
    for c in range(3):
        assert torch.all(out[:, c, 2:5, 3:6] == fill[c])
    keep = mask.expand_as(images) == 0
    assert torch.equal(out[keep], images[keep])
