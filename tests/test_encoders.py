"""The encoder contract: ResNet's Goyal et al. taps, ViT's DINO taps, cards, the timm extra."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from benchmark.errors import BenchError
from encoders import (
    TORCHVISION_INPUT,
    Encoder,
    ResNetEncoder,
    build,
    card_fields,
    check_encoder,
    from_card,
    vit_module,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _small_resnet(input_size: int = 64) -> ResNetEncoder:
    torch.manual_seed(0)
    enc = ResNetEncoder((2, 1, 1, 1), 8, input_size)
    for m in enc.modules():  # BN statistics that matter in eval mode
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.1)
            m.bias.data.normal_(0, 0.1)
    return enc.eval()


def _small_vit(width: int = 32):
    vit = vit_module()
    torch.manual_seed(0)
    return vit.ViTEncoder(vit.ViTConfig(width, 4, 2, 16, 32)).eval()


def test_resnet50_taps_are_goyal_et_al_at_224():
    """The dimensions of fair_self_supervision_benchmark's resnet50 VOC07 feature blobs."""
    with torch.device("meta"):
        enc = ResNetEncoder()
    dims = {name: tap.dim for name, tap in enc.taps.items()}
    assert dims == {
        "conv1": 9216,
        "res2": 9216,
        "res3": 8192,
        "res4": 9216,
        "res5": 8192,
        "res5avg": 2048,
    }
    shapes = {name: tap.shape for name, tap in enc.taps.items()}
    assert shapes["conv1"] == (64, 112, 112) and shapes["res4"] == (1024, 14, 14)
    assert enc.default_taps == ("conv1", "res2", "res3", "res4", "res5")
    assert enc.knn_tap == "res5avg" and enc.head_input.dim == 2048
    assert enc.arch == "resnet50" and "fc.weight" not in enc.state_dict()
    assert set(enc.state_dict()) == {
        k for k in torchvision.models.resnet50(weights=None).state_dict() if not k.startswith("fc.")
    }


def test_resnet_conv1_pooling_leaves_padding_out():
    """conv1's 112x112 map, avg k10 s10 pad 4 without counting padding (Caffe2/cuDNN): the
    corner cell is the mean of the 6x6 pixels inside, the next the mean of rows/cols 6-15."""
    enc = _small_resnet(224)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        stem = enc.relu(enc.bn1(enc.conv1(x)))  # (1, 64, 112, 112)
        got = enc.extract(x, ["conv1"])["conv1"].view(64, 12, 12)
    assert torch.allclose(got[:, 0, 0], stem[0, :, :6, :6].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(got[:, 1, 1], stem[0, :, 6:16, 6:16].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(got[:, 11, 11], stem[0, :, 106:, 106:].mean(dim=(1, 2)), atol=1e-6)


def test_resnet_stage_taps_match_an_independent_torchvision_forward():
    """res2..res5 are torchvision's layer outputs pooled with Goyal's windows, (C, h, w)
    flattened; res5avg and forward() are torchvision's fc input."""
    enc = _small_resnet(224)
    tv = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck, [2, 1, 1, 1], width_per_group=8
    ).eval()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(enc.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = enc.extract(x, list(enc.taps))
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        maps = {}
        for name, layer in zip(
            ("res2", "res3", "res4", "res5"), (tv.layer1, tv.layer2, tv.layer3, tv.layer4)
        ):
            h = maps[name] = layer(h)
        windows = {"res2": (16, 8), "res3": (13, 5), "res4": (8, 3), "res5": (6, 1)}
        for name, (k, s) in windows.items():
            want = F.avg_pool2d(maps[name], k, s).reshape(2, -1)
            assert torch.allclose(out[name], want, atol=1e-6), name
        assert torch.equal(out["res5avg"], tv(x))
        assert torch.equal(enc(x), tv(x))


def test_resnet_extract_stops_after_the_deepest_tap():
    enc = _small_resnet()
    calls: list[str] = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(enc, name).register_forward_hook(lambda *_, n=name: calls.append(n))
    with torch.no_grad():
        out = enc.extract(torch.randn(1, 3, 64, 64), ["res3", "conv1"])
    assert list(out) == ["conv1", "res3"] and calls == ["layer1", "layer2"]


def test_resnet_other_input_size_pools_adaptively_to_the_reference_grid():
    enc = _small_resnet(64)
    assert enc.taps["res2"].pooling.startswith("adaptive avg to 6x6")
    assert {n: t.dim for n, t in enc.taps.items()}["res3"] == 512 * 4 * 4
    check_encoder(enc)


def test_unknown_tap_and_wrong_input_size_are_one_line_errors():
    enc = _small_resnet()
    with pytest.raises(BenchError, match="unknown layer 'pool5'.*conv1, res2") as err:
        enc.extract(torch.zeros(1, 3, 64, 64), ["pool5"])
    assert "\n" not in str(err.value)
    with pytest.raises(BenchError, match=r"expected \(N, 3, 64, 64\)"):
        enc.extract(torch.zeros(1, 3, 32, 32), ["conv1"])


def _dino_intermediate(enc, x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """DINO's vision_transformer.get_intermediate_layers, written out on timm's modules."""
    h = enc.patch_embed(x)
    h = torch.cat((enc.cls_token.expand(x.shape[0], -1, -1), h), dim=1) + enc.pos_embed
    out = []
    for i, blk in enumerate(enc.blocks):
        h = blk(h)
        if len(enc.blocks) - i <= n:
            out.append(enc.norm(h))
    return out


def test_vit_taps_are_dinos_linear_and_knn_features():
    """eval_linear.py: cat of the last n [CLS]; with avgpool, cat((cls.unsqueeze(-1),
    mean.unsqueeze(-1)), -1).reshape(N, -1); eval_knn.py: model(x) = norm(x)[:, 0]."""
    enc = _small_vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = enc.extract(x, ["cls+avg", "cls", "cls4"])
        four = _dino_intermediate(enc, x, 4)
        one = four[-1:]
        cls4 = torch.cat([t[:, 0] for t in four], dim=-1)
        linear = torch.cat([t[:, 0] for t in one], dim=-1)
        with_avg = torch.cat(
            (linear.unsqueeze(-1), torch.mean(one[-1][:, 1:], dim=1).unsqueeze(-1)), dim=-1
        ).reshape(3, -1)
        head = enc(x)
    assert list(out) == ["cls", "cls4", "cls+avg"]
    assert torch.allclose(out["cls4"], cls4, atol=1e-5)
    assert torch.allclose(out["cls+avg"], with_avg, atol=1e-5)
    assert torch.allclose(out["cls"], one[-1][:, 0], atol=1e-5)
    assert torch.equal(head, out["cls"])  # timm's head input is the same token


def test_vit_defaults_follow_dinos_eval_linear():
    vit = vit_module()
    small, base = vit.vit_taps(vit.VIT_S16), vit.vit_taps(vit.VIT_B16)
    assert {n: t.dim for n, t in small.items()} == {"cls": 384, "cls4": 1536, "cls+avg": 768}
    assert {n: t.dim for n, t in base.items()} == {"cls": 768, "cls4": 3072, "cls+avg": 1536}
    assert vit.default_vit_taps(vit.VIT_S16) == ("cls4",)
    assert vit.default_vit_taps(vit.VIT_B16) == ("cls+avg",)
    assert vit.vit_arch(vit.VIT_S16) == "vit_small_patch16_224"
    assert vit.vit_arch(vit.ViTConfig(384, 12, 12)) == "vit_small_patch16_224"  # MoCo v3's


def test_contract_and_card_round_trip():
    for enc in (_small_resnet(), _small_vit()):
        assert isinstance(enc, Encoder)
        check_encoder(enc)
        card = card_fields(enc)
        assert card["input"]["name"] == "torchvision" and card["family"] in ("resnet", "vit")
        rebuilt = from_card(card)
        rebuilt.load_state_dict(enc.state_dict())
        x = torch.randn(2, 3, enc.input_size, enc.input_size)
        with torch.no_grad():
            assert torch.equal(rebuilt.eval()(x), enc(x))
        assert card_fields(rebuilt) == card
    with pytest.raises(BenchError, match="unknown encoder family 'alexnet'"):
        from_card({"family": "alexnet", "config": {}})
    with pytest.raises(BenchError, match="unknown encoder 'vgg16'"):
        build("vgg16")


def test_input_convention_normalises_as_torchvision():
    pixels = torch.tensor(np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2) * 20)
    want = torchvision.transforms.functional.normalize(
        pixels / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    )
    # float32 rounding: the convention computes (x - 255 m) / (255 s)
    assert torch.allclose(TORCHVISION_INPUT.normalise(pixels), want, atol=1e-6)


def test_missing_timm_is_a_one_line_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ModuleNotFoundError
    for name in [m for m in sys.modules if m.startswith("timm.") or m == "encoders.vit"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr("encoders.vit", raising=False)
    with pytest.raises(BenchError, match=r"pip install 'bench-ssl\[vit\]'") as err:
        vit_module()
    assert "\n" not in str(err.value)
    with pytest.raises(BenchError, match="timm"):
        build("vit_small_patch16_224")


def _images(n: int = 2, side: int = 224) -> torch.Tensor:
    """Smooth colour gradients with texture: (n, 3, side, side) pixels in [0, 255]."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 255, side)
    base = torch.stack(
        [
            ramp.view(1, -1).expand(side, side),
            ramp.view(-1, 1).expand(side, side),
            ramp.flip(0).view(1, -1).expand(side, side),
        ]
    )
    noise = torch.rand(n, 3, side, side, generator=g) * 60
    return (0.7 * base + noise).clamp(0, 255).round()


@torch.no_grad()
def _random_encoder(arch: str) -> Encoder:
    """`build(arch)` with quick random values (torchvision's and timm's initialisers cost
    seconds on a loaded CPU): fan-in-scaled weights, BatchNorm statistics that matter."""
    with torch.device("meta"):
        enc = build(arch)
    enc.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    for name, t in enc.state_dict().items():
        if t.dim() >= 2:
            t.normal_(0, t[0].numel() ** -0.5, generator=g)
        elif name.endswith("running_var"):
            t.uniform_(0.5, 2.0, generator=g)
        elif name.endswith("num_batches_tracked"):
            t.zero_()
        else:  # norm weights near 1, biases and means near 0
            t.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=g)
    return enc.eval()


@pytest.mark.slow
def test_real_resnet50_and_vit_s16_end_to_end(tmp_path):
    """The real ResNet-50 and ViT-S/16 shapes: written as torchvision / timm files, imported,
    and every tap of two 224-px images identical to the original network's."""
    from safetensors.torch import save_file

    from weights import import_checkpoint

    x = TORCHVISION_INPUT.normalise(_images())
    for arch, fmt in (("resnet50", "torchvision"), ("vit_small_patch16_224", "timm")):
        original = _random_encoder(arch)
        path = tmp_path / f"{arch}.safetensors"
        save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
        imported = import_checkpoint(path)
        assert imported.card["format"] == fmt and imported.card["arch"] == arch
        with torch.no_grad():
            want = original.extract(x, list(original.taps))
            got = imported.encoder.extract(x, list(original.taps))
            head = imported.encoder(x[:1])
        for name, tap in original.taps.items():
            assert got[name].shape == (2, tap.dim) and torch.isfinite(got[name]).all()
            assert torch.equal(got[name], want[name]), name
        assert head.shape == (1, original.head_input.dim)
        knn = got[original.knn_tap][:1]
        assert torch.allclose(head, knn, atol=1e-6)  # the k-NN feature is the head input
