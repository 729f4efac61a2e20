"""Nearest-neighbour inpainting baselines and context features."""

from __future__ import annotations

import numpy as np
import torch
from skimage.feature import hog

from encoders.alexnet import AlexNetEncoder
from pretrain.inpainting.model import (
    ContextEncoderGenerator,
    HoleGeometry,
    centre_patch,
    mask_context,
)
from pretrain.inpainting.nearest import (
    ContextIndex,
    build_index,
    context_features,
    hog_features,
    load_alexnet,
    nn_inpaint,
    training_crops,
)

CODE4, CODE7, PAPER7 = HoleGeometry("code", 4), HoleGeometry("code", 7), HoleGeometry("paper", 7)


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth random images so HOG has structure
    low = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(128, 128), mode="bilinear")


def test_hog_ignores_the_hole_content():
    x = _images(2, 0)
    y = x.clone()
    y[:, :, 36:92, 36:92] = torch.rand(2, 3, 56, 56)  # change only the dropped pixels
    torch.testing.assert_close(hog_features(x, geometry=CODE4), hog_features(y, geometry=CODE4))
    z = x.clone()
    z[:, :, :8, :8] = 1.0  # change the context
    assert not torch.allclose(hog_features(x, geometry=CODE4), hog_features(z, geometry=CODE4))


def test_hog_keeps_exactly_the_blocks_off_the_hole():
    x = _images(1, 1)
    geometry = HoleGeometry("code", 0)
    grey = ((mask_context(x, geometry.hole_mask())[0] + 1) / 2).clamp(0, 1)  # hole mean-filled
    grey = (0.299 * grey[0] + 0.587 * grey[1] + 0.114 * grey[2]).numpy()
    full = hog(
        grey,
        orientations=9,
        pixels_per_cell=(8, 8),
        cells_per_block=(2, 2),
        block_norm="L2-Hys",
        feature_vector=False,
    )  # (15, 15, 2, 2, 9)
    # overlap 0: hole [32, 96); blocks start at 8 i and span 16 px: blocks 3..11 touch it
    keep = np.ones((15, 15), bool)
    keep[3:12, 3:12] = False
    expected = full[keep].reshape(-1)
    np.testing.assert_allclose(hog_features(x, geometry)[0].numpy(), expected, rtol=1e-6)


def test_nn_hog_returns_the_training_centre_for_a_training_query():
    train = _images(12, 2)
    index = build_index(train, "hog", geometry=CODE7)
    for i in (0, 5, 11):
        fill = nn_inpaint(index, train[i : i + 1], "hog", geometry=CODE7)
        assert torch.equal(fill[0], centre_patch(train)[i])


def test_nn_ce_returns_the_training_centre_for_a_training_query():
    torch.manual_seed(0)
    g = ContextEncoderGenerator(64).eval()
    train = _images(6, 3)
    index = build_index(train, "ce", geometry=CODE4, generator=g)
    fill = nn_inpaint(index, train[2:3], "ce", geometry=CODE4, generator=g)
    assert torch.equal(fill[0], centre_patch(train)[2])


def test_index_ranks_by_distance():
    feats = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0]]), dim=1)
    index = ContextIndex(feats, torch.arange(3).float().view(3, 1, 1, 1).expand(3, 3, 64, 64))
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2]]), dim=1)
    assert index.nearest(q, 3).tolist() == [[0, 2, 1]]


def test_features_are_normalised_and_ce_sees_only_context():
    torch.manual_seed(0)
    g = ContextEncoderGenerator(32).eval()
    x = _images(3, 4)
    f = context_features("ce", x, geometry=CODE4, generator=g)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(3))
    y = x.clone()
    y[:, :, 36:92, 36:92] = 0.3
    torch.testing.assert_close(f, context_features("ce", y, geometry=CODE4, generator=g))
    assert torch.equal(mask_context(x, CODE4.hole_mask()), mask_context(y, CODE4.hole_mask()))


def test_training_crops_centre_and_random(tmp_path):
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 255, (150, 200, 3), np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    crops = training_crops([tmp_path / "a.png"], load_size=0, crops_per_image=3, seed=0)
    assert crops.shape == (3, 3, 128, 128)
    expected = torch.from_numpy(arr[11:139, 36:164].astype(np.float32)).permute(2, 0, 1)
    torch.testing.assert_close(crops[0], expected / 127.5 - 1)


def test_alexnet_features_from_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    state = AlexNetEncoder("torchvision").state_dict()
    state["classifier.1.weight"] = torch.zeros(2, 2)  # torchvision's head: ignored
    torch.save(state, tmp_path / "alexnet.pth")
    encoder = load_alexnet(tmp_path / "alexnet.pth")
    assert encoder.arch == "torchvision" and not encoder.training
    assert torch.equal(encoder.features[0].weight, state["features.0.weight"])
    x = _images(2, 5)
    f = context_features("alexnet", x, geometry=CODE4, alexnet=encoder)
    assert f.shape == (2, 256 * 6 * 6)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2))
    y = x.clone()
    y[:, :, 36:92, 36:92] = 0.3  # the hole's content is never seen
    torch.testing.assert_close(f, context_features("alexnet", y, geometry=CODE4, alexnet=encoder))


def test_paper_geometry_masks_the_64px_hole_and_pastes_the_larger_patch():
    x = _images(2, 6)
    y = x.clone()
    y[:, :, 32:96, 32:96] = torch.rand(2, 3, 64, 64)  # the paper's hole: the whole 64x64
    # (on the 8-px HOG grid: the kept cells next to it must not see its pixels' gradients)
    torch.testing.assert_close(hog_features(x, PAPER7), hog_features(y, PAPER7))
    assert not torch.allclose(hog_features(x, CODE4), hog_features(y, CODE4))
    torch.manual_seed(0)
    g = ContextEncoderGenerator(32, output_size=78).eval()
    torch.testing.assert_close(
        context_features("ce", x, PAPER7, generator=g),
        context_features("ce", y, PAPER7, generator=g),
    )
    train = _images(6, 7)
    index = build_index(train, "hog", PAPER7)
    assert index.centres.shape == (6, 3, 78, 78)
    fill = nn_inpaint(index, train[3:4], "hog", PAPER7)
    assert torch.equal(fill[0], train[3, :, 25:103, 25:103])
