"""The encoder architectures: CaffeNet as Caffe ran it, BVLC AlexNet, and the older nets."""

import math

import pytest
import torch
import torchvision
from torch import nn

from benchmark.errors import BenchError
from encoders.alexnet import (
    ARCHS,
    CONV_INDICES,
    POOL_INDICES,
    AlexNetEncoder,
    CaffeLRN,
    LRNSpec,
    PoolNorm,
    features_output_size,
    layer_geometry,
    layer_output_size,
    pool5_size,
)
from weights.encoder import infer_arch, load_encoder
from weights.native import write_native

CARD = {
    "method": "context-encoder", "mask": "random-region", "iterations": 10, "data": "synth",
    "config_hash": "abc", "arch": "caffenet", "pool_free": False, "pretrain_seconds": 1.0,
}  # fmt: skip

# (weight shape, bias count) of conv1..conv5, and the exact total, per arch.
SHAPES = {
    "caffenet": [(96, 3, 11, 11), (256, 48, 5, 5), (384, 256, 3, 3), (384, 192, 3, 3),
                 (256, 192, 3, 3)],
    "alexnet-plain": [(96, 3, 11, 11), (256, 96, 5, 5), (384, 256, 3, 3), (384, 384, 3, 3),
                      (256, 384, 3, 3)],
    "torchvision": [(64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3),
                    (256, 256, 3, 3)],
}  # fmt: skip
SHAPES["bvlc-alexnet"] = SHAPES["caffenet"]
LAYER_PARAMS = {
    "caffenet": [34_944, 307_456, 885_120, 663_936, 442_624],
    "alexnet-plain": [34_944, 614_656, 885_120, 1_327_488, 884_992],
    "torchvision": [23_296, 307_392, 663_936, 884_992, 590_080],
}
LAYER_PARAMS["bvlc-alexnet"] = LAYER_PARAMS["caffenet"]
TOTALS = {"caffenet": 2_334_080, "bvlc-alexnet": 2_334_080, "alexnet-plain": 3_747_200,
          "torchvision": 2_469_696}  # fmt: skip


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_parameter_counts_and_keys(arch):
    enc = AlexNetEncoder(arch)
    convs = enc.conv_layers()
    assert [tuple(c.weight.shape) for c in convs] == SHAPES[arch]
    assert [sum(p.numel() for p in c.parameters()) for c in convs] == LAYER_PARAMS[arch]
    assert sum(p.numel() for p in enc.parameters()) == TOTALS[arch]
    keys = [f"features.{i}.{n}" for i in CONV_INDICES for n in ("weight", "bias")]
    assert list(enc.state_dict()) == keys
    assert [enc.features[i] for i in CONV_INDICES] == convs


def test_caffenet_conv2_group_count():
    conv2 = AlexNetEncoder("caffenet").conv_layers()[1]
    assert conv2.groups == 2 and conv2.weight.numel() == 256 * 48 * 25 and conv2.bias.numel() == 256
    groups = [c.groups for c in AlexNetEncoder("caffenet").conv_layers()]
    assert groups == [1, 2, 1, 2, 2]
    assert [c.groups for c in AlexNetEncoder("alexnet-plain").conv_layers()] == [1] * 5


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("pool_free", [False, True])
def test_pool5_is_6x6x256_at_227(arch, pool_free):
    enc = AlexNetEncoder(arch, pool_free).eval()
    with torch.no_grad():
        out = enc(torch.randn(2, 3, 227, 227))
        c5 = enc.conv5(torch.randn(1, 3, 227, 227))
    assert out.shape == (2, 256, 6, 6)
    assert c5.shape == (1, 256, 13, 13)  # stride 16, before pool5
    assert enc.output_size(227) == pool5_size(227, arch, pool_free) == 6  # type: ignore[arg-type]


def test_lrn_order_and_layout():
    caffenet, bvlc = AlexNetEncoder("caffenet"), AlexNetEncoder("bvlc-alexnet")
    for enc, lrn_first in ((caffenet, False), (bvlc, True)):
        for i in (2, 5):
            stage = enc.features[i]
            assert isinstance(stage, PoolNorm) and stage.lrn_first is lrn_first
            assert isinstance(stage.pool, nn.MaxPool2d) and stage.pool.ceil_mode
            assert isinstance(stage.norm, CaffeLRN)
            assert (stage.norm.size, stage.norm.alpha, stage.norm.beta, stage.norm.k) == (
                5, 1e-4, 0.75, 1.0)  # fmt: skip
        assert isinstance(enc.features[12], nn.MaxPool2d)  # no LRN after conv5
        assert all(isinstance(p, nn.MaxPool2d) for p in enc.pool_layers())
    # The orders differ in function on the same weights (LRN and max do not commute).
    for m in caffenet.conv_layers():
        nn.init.normal_(m.weight, 0.0, 0.5)  # large activations: LRN matters
    bvlc.load_state_dict(caffenet.state_dict())
    x = torch.rand(1, 3, 227, 227) * 100
    with torch.no_grad():
        a, b = caffenet(x), bvlc(x)
    assert not torch.allclose(a, b, rtol=1e-3)


def test_plain_and_torchvision_keep_their_old_layers():
    plain = AlexNetEncoder("alexnet-plain")
    for i in POOL_INDICES:
        assert isinstance(plain.features[i], nn.MaxPool2d) and not plain.features[i].ceil_mode
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in plain.modules())
    pf = AlexNetEncoder("alexnet-plain", pool_free=True)
    assert "features.2.weight" in pf.state_dict() and "features.12.weight" in pf.state_dict()
    tv = AlexNetEncoder("torchvision")
    torchvision.models.alexnet().features.load_state_dict(tv.features.state_dict())
    assert tv.features[0].padding == (2, 2)


def test_pool_free_keys():
    keys = set(AlexNetEncoder("caffenet", pool_free=True).state_dict())
    assert {"features.2.pool.weight", "features.5.pool.weight", "features.12.weight"} <= keys
    enc = AlexNetEncoder("caffenet", pool_free=True)
    assert all(isinstance(p, nn.Conv2d) for p in enc.pool_layers())
    assert len(enc.conv_layers()) == 5


def _lrn_by_hand(x: torch.Tensor, n: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """Caffe's ACROSS_CHANNELS formula, written out (zero-padded window of n channels)."""
    x = x.double()
    out = torch.empty_like(x)
    c_count = x.shape[1]
    half = (n - 1) // 2
    for c in range(c_count):
        lo, hi = max(0, c - half), min(c_count, c + half + 1)
        scale = k + alpha / n * (x[:, lo:hi] ** 2).sum(1)
        out[:, c] = x[:, c] * scale ** (-beta)
    return out


LAYOUTS = [torch.contiguous_format, torch.channels_last]  # the window sum has a path for each


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", [LRNSpec(), LRNSpec(3, 2e-3, 0.5, 2.0), LRNSpec(7, 1.0, 1.0, 1.0)])
def test_lrn_matches_caffe_formula(spec, layout):
    torch.manual_seed(0)
    x = torch.randn(2, 11, 4, 5) * 30  # edge channels 0, 1, 9, 10 see a clipped window
    got = CaffeLRN(spec)(x.contiguous(memory_format=layout))
    assert got.is_contiguous(memory_format=layout)
    got = got.double()
    want = _lrn_by_hand(x, spec.local_size, spec.alpha, spec.beta, spec.k)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(x.double(), want, rtol=1e-2)  # the normalisation did something


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", [LRNSpec(), LRNSpec(3, 2e-3, 0.5, 2.0), LRNSpec(7, 1.0, 1.0, 1.0)])
def test_lrn_backward_matches_autograd_of_the_formula(spec, layout):
    """The hand-written backward (Caffe's) equals autograd through the formula in float64,
    and torch's own LRN's gradient."""
    torch.manual_seed(0)
    x = torch.randn(2, 11, 4, 5) * 3
    grad = torch.randn(2, 11, 4, 5)
    a = x.clone().contiguous(memory_format=layout).requires_grad_()
    CaffeLRN(spec)(a).backward(grad)
    b = x.double().requires_grad_()
    _lrn_by_hand(b, spec.local_size, spec.alpha, spec.beta, spec.k).backward(grad.double())
    assert torch.allclose(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)
    c = x.clone().requires_grad_()
    torch.nn.functional.local_response_norm(
        c, spec.local_size, spec.alpha, spec.beta, spec.k
    ).backward(grad)
    assert torch.allclose(a.grad, c.grad, rtol=1e-4, atol=1e-5)


def test_lrn_half_precision_does_not_overflow():
    x = torch.full((1, 5, 2, 2), 400.0)  # 400^2 overflows float16
    y = CaffeLRN(LRNSpec())(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert torch.allclose(y.float(), CaffeLRN(LRNSpec())(x), rtol=1e-3)


def test_even_lrn_size_is_refused():
    with pytest.raises(ValueError, match="odd"):
        CaffeLRN(LRNSpec(local_size=4))


def _caffe_pool(n: int, k: int = 3, s: int = 2, p: int = 0) -> int:
    """pooling_layer.cpp: ceil((n + 2p - k) / s) + 1, one less if the last window starts in
    the padding (only checked when p > 0)."""
    out = int(math.ceil((n + 2 * p - k) / s)) + 1
    if p > 0 and (out - 1) * s >= n + p:
        out -= 1
    return out


def _caffe_sizes(h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(conv5 size, pool5 size) of CaffeNet for an h x w input, by Caffe's formulas."""
    sizes = []
    for n in (h, w):
        n = (n - 11) // 4 + 1  # conv1 (convolutions round down in Caffe too)
        n = _caffe_pool(_caffe_pool(n))  # pool1, pool2 (conv2-conv5 keep the size)
        sizes.append((n, _caffe_pool(n)))
    return (sizes[0][0], sizes[1][0]), (sizes[0][1], sizes[1][1])


@pytest.mark.parametrize(
    "hw", [(227, 227), (224, 224), (231, 231), (300, 300), (600, 1000), (1000, 600), (67, 99)]
)
@pytest.mark.parametrize("arch", ["caffenet", "bvlc-alexnet"])
def test_pooling_rounds_up_like_caffe(arch, hw):
    enc = AlexNetEncoder(arch).to("meta")  # shapes only
    x = torch.empty(1, 3, *hw, device="meta")
    conv5, pool5 = _caffe_sizes(*hw)
    assert tuple(enc.conv5(x).shape[-2:]) == conv5
    assert tuple(enc(x).shape[-2:]) == pool5
    if hw[0] == hw[1]:
        assert enc.output_size(hw[0]) == pool5[0] == pool5_size(hw[0], arch)
        assert features_output_size(enc.features[:12], hw[0]) == conv5[0]


def test_ceil_and_floor_differ_where_caffe_says():
    # 231 px: conv1 gives 56, Caffe pools it to 28 where floor rounding gives 27.
    assert _caffe_pool(56) == 28 and (56 - 3) // 2 + 1 == 27
    assert pool5_size(231, "caffenet") == 7 and pool5_size(231, "alexnet-plain") == 6
    assert pool5_size(231, "caffenet", pool_free=True) == 6  # convolutions round down


def test_layer_geometry_understands_the_composite():
    enc = AlexNetEncoder("caffenet")
    geometry = [layer_geometry(m) for m in enc.features]
    assert [g for g in geometry if g is not None] == [
        (11, 4, 0), (3, 2, 0), (5, 1, 2), (3, 2, 0), (3, 1, 1), (3, 1, 1), (3, 1, 1), (3, 2, 0),
    ]  # fmt: skip
    assert [i for i, g in enumerate(geometry) if g is not None] == [0, 2, 3, 5, 6, 8, 10, 12]
    pf = AlexNetEncoder("caffenet", pool_free=True)
    assert layer_geometry(pf.features[2]) == (3, 2, 0)
    assert layer_output_size(enc.features[2], 56) == 28
    assert layer_output_size(pf.features[2], 56) == 27
    assert layer_geometry(nn.ReLU()) is None
    assert layer_geometry(CaffeLRN(LRNSpec())) is None


# ------------------------------------------------------------------------ loading old files


def test_old_caffenet_card_with_plain_weights_loads_as_alexnet_plain(tmp_path):
    torch.manual_seed(0)
    old = AlexNetEncoder("alexnet-plain")
    path = write_native(tmp_path / "encoder.safetensors", old.state_dict(), CARD)
    enc, card = load_encoder(path)
    assert enc.arch == "alexnet-plain" and card["arch"] == "alexnet-plain"
    assert "alexnet-plain" in card["arch_note"] and "caffenet" in card["arch_note"]
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in enc.state_dict().items())


def test_old_pool_free_caffenet_card_loads_as_alexnet_plain(tmp_path):
    old = AlexNetEncoder("alexnet-plain", pool_free=True)
    path = write_native(tmp_path / "e.safetensors", old.state_dict(), {**CARD, "pool_free": True})
    enc, card = load_encoder(path)
    assert (enc.arch, enc.pool_free) == ("alexnet-plain", True)


def test_new_caffenet_card_loads_as_caffenet(tmp_path):
    src = AlexNetEncoder("caffenet", pool_free=True)
    path = write_native(tmp_path / "e.safetensors", src.state_dict(), {**CARD, "pool_free": True})
    enc, card = load_encoder(path)
    assert (enc.arch, enc.pool_free) == ("caffenet", True) and "arch_note" not in card


@pytest.mark.parametrize("arch", ["caffenet", "alexnet-plain", "torchvision"])
def test_infer_arch_without_a_card(tmp_path, arch):
    state = AlexNetEncoder(arch).state_dict()  # type: ignore[arg-type]
    assert infer_arch(state, tmp_path) == arch
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "w.safetensors"))
    enc, card = load_encoder(tmp_path / "w.safetensors")
    assert enc.arch == arch and card["pool_free"] is False


def test_pool_free_inferred_for_lrn_archs(tmp_path):
    from safetensors.torch import save_file

    save_file(AlexNetEncoder("caffenet", True).state_dict(), str(tmp_path / "w.safetensors"))
    enc, card = load_encoder(tmp_path / "w.safetensors")
    assert (enc.arch, enc.pool_free, card["pool_free"]) == ("caffenet", True, True)


def test_nan_weight_is_a_one_line_error_naming_the_tensor(tmp_path):
    state = AlexNetEncoder("caffenet").state_dict()
    state["features.8.weight"][0, 0, 0, 0] = float("nan")
    state["features.10.bias"][3] = float("inf")
    path = write_native(tmp_path / "encoder.safetensors", state, CARD)
    with pytest.raises(BenchError) as err:
        load_encoder(path)
    msg = str(err.value)
    assert "features.10.bias" in msg and "NaN or infinite" in msg and "\n" not in msg
