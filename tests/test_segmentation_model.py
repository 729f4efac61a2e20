"""FCN geometry: outputs have the input's size and each output pixel is centred on itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pretrain.alexnet import AlexNetEncoder
from transfer.segmentation.model import FCN, Grid, feature_grids, resample

torch.set_num_threads(1)


def uniform_fcn(arch: str, variant: str) -> FCN:
    """Every conv averages its inputs (weights 1/fan-in, zero bias), pools are convs too:
    a linear, all-positive network whose input gradient is its receptive-field profile."""
    model = FCN(AlexNetEncoder(arch, pool_free=True), 1, variant, fc_dim=4, dropout=0.0).eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 1.0 / m.weight[0].numel())
            nn.init.zeros_(m.bias)
    return model


@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s", "fcn8s"])
@pytest.mark.parametrize("size", [(1, 1), (3, 31), (33, 57), (101, 75), (227, 227)])
def test_output_size_equals_input_size(variant: str, size: tuple[int, int]) -> None:
    model = FCN(AlexNetEncoder("caffenet"), 21, variant, fc_dim=8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 21, *size)


def test_resized_input_scores_full_size_label() -> None:
    model = FCN(AlexNetEncoder("caffenet"), 21, "fcn32s", fc_dim=8).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 45, 61), out_size=(91, 121)).shape == (1, 21, 91, 121)


@pytest.mark.parametrize(("arch", "variant"), [("caffenet", "fcn32s"), ("torchvision", "fcn8s")])
def test_each_output_pixel_is_centred_on_its_input_pixel(arch: str, variant: str) -> None:
    """The gradient of output pixel (y, x) w.r.t. the (padded) input is centred at (y, x),
    at odd sizes and off-grid positions: scores are aligned with the image, no shift.
    The image is large enough that the receptive fields (~420 px) are not clipped."""
    model = uniform_fcn(arch, variant)
    h, w = 419, 387
    padded: list[torch.Tensor] = []

    def grab(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        args[0].retain_grad()
        padded.append(args[0])

    model.encoder.features[0].register_forward_pre_hook(grab)
    x = torch.ones(1, 3, h, w, requires_grad=True)
    out = model(x)
    assert out.shape[-2:] == (h, w)
    pad = model.pad
    for y0, x0 in [(209, 193), (200, 180), (215, 201)]:
        padded[0].grad = None
        out[0, 0, y0, x0].backward(retain_graph=True)
        g = padded[0].grad[0].sum(0).double()
        ys = torch.arange(g.shape[0], dtype=torch.float64)[:, None] - pad
        xs = torch.arange(g.shape[1], dtype=torch.float64)[None, :] - pad
        cy, cx = float((g * ys).sum() / g.sum()), float((g * xs).sum() / g.sum())
        assert cy == pytest.approx(y0, abs=0.02) and cx == pytest.approx(x0, abs=0.02)


def test_shifting_the_input_by_the_stride_shifts_scores_by_one_cell() -> None:
    """Cropping 32 px off the left moves every score cell's image coordinate by 32 px:
    the stride-32 scores of the cropped image equal the original's, one cell further on."""
    torch.manual_seed(0)
    model = FCN(AlexNetEncoder("caffenet"), 3, "fcn32s", fc_dim=8, dropout=0.0).eval()
    nn.init.normal_(model.score_fr.weight, 0, 0.1)
    big = torch.randn(1, 3, 97, 1100)  # wide: cells far from the left edge see no padding
    feats = {}

    def keep(name: str):
        def hook(_: nn.Module, __: object, out: torch.Tensor) -> None:
            feats[name] = out

        return hook

    model.score_fr.register_forward_hook(keep("score"))
    with torch.no_grad():
        model(big)
        a = feats["score"]
        model(big[..., 32:])
        b = feats["score"]
    # cells far from both ends see no padding difference
    assert torch.allclose(a[..., 12:20], b[..., 11:19], atol=1e-5)


def test_grid_arithmetic_matches_fcn_alexnet_crop() -> None:
    """With pad 100, CaffeNet's stride-32 scores sit at 32 j + 13 (FCN-AlexNet's 63-wide
    bilinear deconvolution, centre 31, is then cropped by 31 - 13 = 18, as in its prototxt)."""
    grids = feature_grids(AlexNetEncoder("caffenet").features, 100)
    g32 = grids[-1].after(6, 1, 0)
    assert g32 == Grid(13.0, 32.0)
    assert grids[4] == Grid(-91.0, 8.0)  # conv2: conv1 centre -100 + 5, pool1 + 4 * 1


def test_resample_is_linear_interpolation_between_cells() -> None:
    x = torch.tensor([[[[0.0, 10.0, 30.0]]]])
    row = torch.tensor([0.0])
    out = resample(x, Grid(0.0, 1.0), row, torch.tensor([0.0, 0.5, 1.5, 2.0, 9.0]))
    assert out.flatten().tolist() == pytest.approx([0.0, 5.0, 20.0, 30.0, 30.0])
    out = resample(x, Grid(5.0, 10.0), row + 5, torch.tensor([0.0, 5.0, 10.0, 20.0, 30.0]))
    assert out.flatten().tolist() == pytest.approx([0.0, 0.0, 5.0, 20.0, 30.0])
