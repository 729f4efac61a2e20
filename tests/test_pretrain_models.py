"""Context encoder, channel-wise FC, decoder and discriminator: shapes and parameter counts."""

import torch
import torch.nn.functional as F
from torch import nn

from encoders.alexnet import AlexNetEncoder, PoolNorm, pool5_size
from pretrain.adversarial import DCGANDiscriminator
from pretrain.context_encoder import Autoencoder, ChannelWiseFC, ContextEncoder, Decoder


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_channel_wise_fc_has_m_n4_weights_not_m2_n4():
    layer = ChannelWiseFC(256, 6)
    assert layer.weight.numel() == 256 * 6**4 == 331_776
    assert layer.bias.numel() == 256 * 6 * 6
    full = nn.Linear(256 * 36, 256 * 36, bias=False)  # what a full layer would need
    assert full.weight.numel() == 256**2 * 6**4 == 84_934_656
    assert full.weight.numel() // layer.weight.numel() == 256


def test_channel_wise_fc_matches_grouped_convolution():
    """The released Caffe model's form: conv with kernel n, m*n^2 outputs, m groups."""
    torch.manual_seed(0)
    m, n = 5, 3
    layer = ChannelWiseFC(m, n)
    x = torch.randn(4, m, n, n)
    # output unit j of map c = sum_i x[c, i] * W[c, i, j]  ->  conv weight (c*n^2 + j, 1, i)
    weight = layer.weight.detach().transpose(1, 2).reshape(m * n * n, 1, n, n)
    conv = F.conv2d(x, weight, layer.bias.detach().reshape(-1), groups=m)
    assert torch.allclose(layer(x), conv.reshape(4, m, n, n), atol=1e-5)


def test_channel_wise_fc_connects_no_two_maps():
    torch.manual_seed(0)
    layer = ChannelWiseFC(4, 3)
    x = torch.randn(2, 4, 3, 3)
    y0 = layer(x)
    x[:, 1] += 1.0
    changed = (layer(x) - y0).abs().flatten(2).amax(-1) > 0
    assert changed[:, 1].all() and not changed[:, [0, 2, 3]].any()


def _conv_params(groups):
    """conv1-conv5 parameters of CaffeNet's widths with the given groups per layer."""
    shapes = [(3, 96, 11), (96, 256, 5), (256, 384, 3), (384, 384, 3), (384, 256, 3)]
    return sum(cin // g * cout * k * k + cout for (cin, cout, k), g in zip(shapes, groups))


CHANNEL_FC = 256 * 6**4 + 256 * 36
MIX = 256 * 256 + 256  # the stride-1 convolution across channels
DECODER = sum(
    cin * cout * 16 + cout for cin, cout in [(256, 128), (128, 64), (64, 64), (64, 32), (32, 3)]
)


def test_context_encoder_shapes_and_exact_parameter_count():
    model = ContextEncoder()  # caffenet (Caffe's CaffeNet), 227 px, with pooling
    assert pool5_size(227) == 6
    x = torch.randn(1, 3, 227, 227)
    with torch.no_grad():
        assert model.encoder(x).shape == (1, 256, 6, 6)
        assert model(x).shape == (1, 3, 227, 227)
    # CaffeNet: conv2, conv4 and conv5 in two groups; LRN after pool1 and pool2.
    encoder = _conv_params((1, 2, 1, 2, 2))
    assert [c.groups for c in model.encoder.conv_layers()] == [1, 2, 1, 2, 2]
    pools = [model.encoder.features[i] for i in (2, 5)]
    assert all(isinstance(m, PoolNorm) and not m.lrn_first for m in pools)
    assert all(p.ceil_mode for p in model.encoder.pool_layers())
    assert n_params(model.encoder) == encoder == 2_334_080
    assert n_params(model.channel_fc) == CHANNEL_FC
    assert n_params(model.mix) == MIX and model.mix.stride == (1, 1)
    assert n_params(model.decoder) == DECODER
    assert n_params(model) == encoder + CHANNEL_FC + MIX + DECODER == 3_496_355


def test_alexnet_plain_is_the_old_ungrouped_network():
    model = ContextEncoder(arch="alexnet-plain")
    assert [c.groups for c in model.encoder.conv_layers()] == [1] * 5
    assert not any(isinstance(m, PoolNorm) for m in model.encoder.modules())
    assert not any(p.ceil_mode for p in model.encoder.pool_layers())
    with torch.no_grad():
        assert model.encoder(torch.randn(1, 3, 227, 227)).shape == (1, 256, 6, 6)
    assert n_params(model.encoder) == _conv_params((1,) * 5) == 3_747_200
    assert n_params(model) == 3_747_200 + CHANNEL_FC + MIX + DECODER == 4_909_475


def test_pool5_size_follows_each_archs_rounding():
    # 71 px: conv1 gives 16, an even side where Caffe's ceil pooling keeps one more row.
    assert pool5_size(71, "caffenet") == 2 and pool5_size(71, "alexnet-plain") == 1
    assert pool5_size(71, "caffenet", pool_free=True) == 1  # learned convolutions floor
    for arch, pool_free in [("caffenet", False), ("alexnet-plain", False), ("caffenet", True)]:
        n = pool5_size(71, arch, pool_free)
        enc = AlexNetEncoder(arch, pool_free)
        with torch.no_grad():
            assert enc(torch.randn(1, 3, 71, 71)).shape == (1, 256, n, n)
        assert enc.output_size(71) == n
        model = ContextEncoder(arch, pool_free, input_size=71)
        assert model.channel_fc.size == n
        assert model(torch.randn(1, 3, 71, 71)).shape == (1, 3, 71, 71)


def test_dropout_half_only_after_channel_wise_fc():
    model = ContextEncoder(input_size=99)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == 0.5 and drops[0] is model.dropout
    x = torch.randn(1, 3, 99, 99)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_decoder_has_five_up_convolutions_back_to_input_size():
    dec = Decoder(256, 227)
    ups = [m for m in dec.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 5 and all(u.stride == (2, 2) for u in ups)
    assert dec(torch.randn(1, 256, 6, 6)).shape == (1, 3, 227, 227)
    assert sum(isinstance(m, nn.ReLU) for m in dec.modules()) == 4  # none on the pixels


def test_small_inputs_and_pool_free_and_autoencoder():
    for size, n in [(67, 1), (99, 2), (131, 3)]:
        assert pool5_size(size) == n
        assert ContextEncoder(input_size=size)(torch.randn(1, 3, size, size)).shape == (
            1,
            3,
            size,
            size,
        )
    pf = ContextEncoder(pool_free=True, input_size=99)
    assert pf(torch.randn(1, 3, 99, 99)).shape == (1, 3, 99, 99)
    # caffenet keeps pool + LRN together at index 2; the learned pool is its `pool` child.
    assert "features.2.pool.weight" in pf.encoder.state_dict()
    assert "features.2.weight" not in pf.encoder.state_dict()
    plain = ContextEncoder(arch="alexnet-plain", pool_free=True, input_size=99)
    assert plain(torch.randn(1, 3, 99, 99)).shape == (1, 3, 99, 99)
    assert "features.2.weight" in plain.encoder.state_dict()
    ae = Autoencoder(input_size=99)
    assert isinstance(ae.encoder, AlexNetEncoder) and n_params(ae) == n_params(
        ContextEncoder(input_size=99)
    )


def test_every_parameter_gets_a_gradient_and_no_nan():
    torch.manual_seed(0)
    model = ContextEncoder(input_size=99)
    out = model(torch.randn(2, 3, 99, 99))
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dcgan_discriminator():
    d = DCGANDiscriminator(64)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.stride == (2, 2) and c.kernel_size == (4, 4) for c in convs[:4])
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3  # not on the first
    assert all(m.negative_slope == 0.2 for m in d.modules() if isinstance(m, nn.LeakyReLU))
    x = torch.randn(3, 3, 64, 64, requires_grad=True)
    logits = d(x)
    assert logits.shape == (3,)
    logits.sum().backward()
    assert all(p.grad is not None for p in d.parameters())
    with torch.no_grad():
        assert DCGANDiscriminator(227)(torch.randn(2, 3, 227, 227)).shape == (2,)
