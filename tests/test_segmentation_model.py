"""FCN geometry: outputs have the input's size and each output pixel is centred on itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encoders.alexnet import AlexNetEncoder, PoolNorm
from transfer.segmentation.model import FCN, Grid, feature_grids, resample, smallest_pad

torch.set_num_threads(1)


def uniform_fcn(arch: str, variant: str) -> FCN:
    """Every conv averages its inputs (weights 1/fan-in, zero bias), pools are convs too:
    a linear, all-positive network whose input gradient is its receptive-field profile.
    CaffeNet's LRN (point-wise in space, so irrelevant to alignment) is taken out to keep
    the network linear."""
    model = FCN(AlexNetEncoder(arch, pool_free=True), 1, variant, fc_dim=4, dropout=0.0).eval()
    for m in model.modules():
        if isinstance(m, PoolNorm):
            m.norm = nn.Identity()
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


@pytest.mark.parametrize("size", [(1, 1), (3, 31)])
def test_tiny_inputs_get_scores_with_floor_pooling_too(size: tuple[int, int]) -> None:
    """The LRN-free, floor-pooling network needs more than FCN's pad 100 for tiny inputs."""
    model = FCN(AlexNetEncoder("alexnet-plain"), 21, "fcn8s", fc_dim=8).eval()
    assert model.pad_for(min(size)) > 100
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 21, *size)


@pytest.mark.parametrize("arch", ["caffenet", "alexnet-plain", "torchvision"])
def test_smallest_pad_follows_each_layers_rounding(arch: str) -> None:
    """The pad is the least that leaves pool5 6x6, as the layers really round: CaffeNet's
    ceil-mode pools need less padding than floor pooling would (99 px, not 113, for 1 px)."""
    encoder = AlexNetEncoder(arch).eval()
    for size in (1, 31, 100):
        pad = smallest_pad(size, 0, encoder.features, 6)
        with torch.no_grad():
            assert encoder(torch.zeros(1, 3, size + 2 * pad, size + 2 * pad)).shape[-1] == 6
            smaller = size + 2 * pad - 2
            assert encoder(torch.zeros(1, 3, smaller, smaller)).shape[-1] < 6, (size, pad)
        assert smallest_pad(size, pad + 3, encoder.features, 6) == pad + 3  # never below `pad`
    if arch == "caffenet":
        assert smallest_pad(1, 0, encoder.features, 6) == 99
        assert smallest_pad(1, 100, encoder.features, 6) == 100  # FCN's pad suffices


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
    bilinear deconvolution, centre 31, is then cropped by 31 - 13 = 18, as in its prototxt).
    Ceil-mode pooling adds cells at the far end but moves none: every arch with CaffeNet's
    kernels has the same grids (the pool+LRN layers count as their pools)."""
    for arch in ("caffenet", "bvlc-alexnet", "alexnet-plain"):
        grids = feature_grids(AlexNetEncoder(arch).features, 100)
        g32 = grids[-1].after(6, 1, 0)
        assert g32 == Grid(13.0, 32.0), arch
        assert grids[4] == Grid(-91.0, 8.0), arch  # conv2: conv1 centre -100 + 5, pool1 + 4 * 1
        assert grids[2] == Grid(-91.0, 8.0) and grids[5] == Grid(-83.0, 16.0), arch  # pool1/2


def test_resample_is_linear_interpolation_between_cells() -> None:
    x = torch.tensor([[[[0.0, 10.0, 30.0]]]])
    row = torch.tensor([0.0])
    out = resample(x, Grid(0.0, 1.0), row, torch.tensor([0.0, 0.5, 1.5, 2.0, 9.0]))
    assert out.flatten().tolist() == pytest.approx([0.0, 5.0, 20.0, 30.0, 30.0])
    out = resample(x, Grid(5.0, 10.0), row + 5, torch.tensor([0.0, 5.0, 10.0, 20.0, 30.0]))
    assert out.flatten().tolist() == pytest.approx([0.0, 0.0, 5.0, 20.0, 30.0])


def test_deconv_upsampling_is_fcn_alexnets_upscore_and_crop():
    """`upsample: deconv` equals FCN-AlexNet's fixed bilinear ConvTranspose2d (kernel 63,
    stride 32, one filter per class) followed by its Crop at offset 18, borders included."""
    from transfer.segmentation.model import FCN_PAD

    model = FCN(AlexNetEncoder("caffenet"), 21, "fcn32s", fc_dim=4)
    grid = model.grid_32.shifted(-FCN_PAD)
    assert (grid.offset, grid.stride) == (13.0, 32.0)  # 31 - 18: FCN's crop
    torch.manual_seed(0)
    n, size = 5, 150
    score = torch.randn(1, 3, n, n, dtype=torch.float64)
    t = torch.arange(63, dtype=torch.float64)
    tent = 1 - (t - 31).abs() / 32  # Caffe's bilinear filler for factor 32, kernel 63
    up = torch.nn.ConvTranspose2d(3, 3, 63, stride=32, groups=3, bias=False).double()
    with torch.no_grad():
        up.weight.copy_((tent[:, None] * tent[None, :]).expand(3, 1, 63, 63))
        reference = up(score)[..., 18 : 18 + size, 18 : 18 + size]
    coords = torch.arange(size, dtype=torch.float64)
    ours = resample(score, grid, coords, coords, edge="zero")
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    held = resample(score, grid, coords, coords, edge="hold")
    assert not torch.allclose(held[..., -1, -1], reference[..., -1, -1])  # edges differ


def test_rescale_of_fcn8s_keeps_the_skip_scores_at_zero_and_converges():
    """magic_init's calibration assumes a chain: FCN-8s' skip scores stay at FCN's zero init
    (re-drawn, the calibration diverged: output std 1.2 -> 2e13, NaN by iteration 3)."""
    from transfer.rescale import rescale_for_transfer_
    from transfer.segmentation.train import SKIP_SCORES

    torch.manual_seed(0)
    model = FCN(AlexNetEncoder("caffenet"), 21, "fcn8s", fc_dim=16, dropout=0.0, pad=0)
    x = torch.randn(4, 3, 131, 131)
    report = rescale_for_transfer_(model, lambda: model(x), "encoder.", False, 0, SKIP_SCORES)
    summary = report[-1]
    assert summary["step"] == "summary"
    assert summary["ratio_log_std_after"] < 0.1 < 1.0 < summary["ratio_log_std_before"], summary
    assert 0.1 < summary["output_std_after"] < 3, summary
    torch.manual_seed(0)  # the same net with its skip scores re-drawn: far from equalised
    other = FCN(AlexNetEncoder("caffenet"), 21, "fcn8s", fc_dim=16, dropout=0.0, pad=0)
    worse = rescale_for_transfer_(other, lambda: other(x), "encoder.", False, 0)[-1]
    assert worse["ratio_log_std_after"] > 0.5, worse
    assert worse["kept_iteration"] < worse["iterations"]  # the guard kept a better iteration
    assert not model.score_16.weight.any() and not model.score_8.weight.any()
    assert model.score_fr.weight.any()  # re-drawn by the within-layer step


@pytest.mark.parametrize("kernel, channels_last", [(6, False), (6, True), (1, True), (1, False)])
def test_dense_conv_is_the_convolution(kernel, channels_last):
    """fc6 / fc7 / score_fr as a matmul over unfolded windows: the convolution's values and
    gradients (float64), whatever the input's layout."""
    from transfer.segmentation.model import DenseConv2d

    torch.manual_seed(0)
    dense = DenseConv2d(5, 7, kernel).double()
    conv = torch.nn.Conv2d(5, 7, kernel).double()
    conv.load_state_dict(dense.state_dict())
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = dense(xa), conv(xb)
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(yb)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(dense.weight.grad, conv.weight.grad)
    torch.testing.assert_close(dense.bias.grad, conv.bias.grad)


def test_resample_as_matmuls_equals_gathering_in_value_and_gradient() -> None:
    """The two-matmul resample against the gather it replaced (float64, both edge rules)."""
    from transfer.segmentation.model import _axis_weights

    def gathered(x, grid, ys, xs, edge):
        h, w = x.shape[-2:]
        y0, y1, wy0, wy1 = (t.double() if t.is_floating_point() else t
                            for t in _axis_weights(ys, grid, h, edge))  # fmt: skip
        x0, x1, wx0, wx1 = (t.double() if t.is_floating_point() else t
                            for t in _axis_weights(xs, grid, w, edge))  # fmt: skip
        rows = x.index_select(-2, y0) * wy0[:, None] + x.index_select(-2, y1) * wy1[:, None]
        return rows.index_select(-1, x0) * wx0 + rows.index_select(-1, x1) * wx1

    torch.manual_seed(0)
    grid = Grid(13.0, 32.0)
    ys, xs = torch.arange(0.0, 170.0, 1.0), torch.arange(0.0, 230.0, 1.5)
    for edge in ("zero", "hold"):
        a = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
        b = a.detach().clone().requires_grad_()
        out, ref = resample(a, grid, ys, xs, edge), gathered(b, grid, ys, xs, edge)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(ref)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
