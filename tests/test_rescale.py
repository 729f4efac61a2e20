"""transfer/rescale.py: Krähenbühl et al.'s data-dependent init, checked on tiny CPU models
against small independent computations written here."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from transfer.rescale import (
    format_report,
    layers_in_forward_order,
    lrn_k,
    magic_init_,
    set_lrn_k_,
    weights_from_data,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: thread start-up costs more than it saves (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_net(lrn: nn.Module | None = None) -> nn.Sequential:
    """conv(3->8) ReLU pool [LRN] conv(8->12, 2 groups) ReLU conv(12->12, k2 s2: pool-free)
    ReLU flatten fc(48->16) ReLU fc(16->5): (B, 3, 12, 12) -> (B, 5)."""
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    if lrn is not None:
        mods.append(lrn)
    mods += [
        nn.Conv2d(8, 12, 3, groups=2),
        nn.ReLU(inplace=True),
        nn.Conv2d(12, 12, 2, stride=2),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(48, 16),
        nn.ReLU(inplace=True),
        nn.Linear(16, 5),
    ]
    return nn.Sequential(*mods)


def badly_scaled_(net: nn.Module, seed: int = 1) -> nn.Module:
    """'Pretrained-like' weights: N(0, s_k) with s_k spanning three orders of magnitude and
    non-zero biases, so the layers' gradient ratios differ wildly."""
    g = gen(seed)
    scales = iter([0.01, 3.0, 0.05, 2.0, 0.1, 1.0])
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * next(scales))
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.1)
    return net


def batch(seed: int = 0, n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=gen(seed)) * 2.0 + 0.5


def learned(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def preactivations(net: nn.Module, layers, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's output (before its ReLU) on x, read with forward hooks, float64."""
    out: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(
            lambda _m, _i, o, n=n: out.__setitem__(n, o.detach().double().clone())
        )
        for n, m in layers
    ]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return out


def channel_mean_std(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = z.reshape(-1, z.shape[-1]) if z.dim() == 2 else z.transpose(0, 1).flatten(1).T
    return flat.mean(0), flat.std(0, unbiased=False)


def expected_ratios(net: nn.Module, layers, x: torch.Tensor, draws: int = 32) -> list[float]:
    """sqrt(E_g[mean(dW^2)] / mean(W^2)) per layer for N(0, 1) output gradients g, averaged
    over `draws` independent draws (the quantity magic_init equalises, without its noise)."""
    weights = [m.weight for _, m in layers]
    sq = [torch.zeros((), dtype=torch.float64) for _ in weights]
    g = gen(1234)
    for _ in range(draws):
        out = net(x)
        grads = torch.autograd.grad(out, weights, torch.randn(out.shape, generator=g))
        for i, d in enumerate(grads):
            sq[i] += d.double().pow(2).mean() / draws
    return [math.sqrt(float(s / w.detach().double().pow(2).mean())) for s, w in zip(sq, weights)]


def log_spread(ratios: list[float]) -> float:
    return float(torch.tensor(ratios).log().std(unbiased=False))


def positive_multiple_residual(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(scale c, ||b - c a|| / ||b||) for the least-squares c with b ~ c a."""
    a, b = a.double().flatten(), b.double().flatten()
    c = float(a @ b / (a @ a))
    return c, float((b - c * a).norm() / b.norm())


# --------------------------------------------------------------------------- within-layer


@pytest.mark.parametrize("init", ["gaussian", "pca", "kmeans", "rand"])
def test_new_layers_get_zero_mean_unit_variance_per_channel(init: str) -> None:
    net, x = tiny_net(), batch(n=8 if init == "kmeans" else 32)  # MiniBatchKMeans is slow-ish
    layers = learned(net)
    report = magic_init_(
        net,
        layers,
        lambda: net(x),
        set(),
        init=init,
        bias=0.0,
        between_layer=False,
        generator=gen(0),
    )
    assert [e["name"] for e in report] == [n for n, _ in layers]
    assert all(e["step"] == init for e in report)
    for name, z in preactivations(net, layers, x).items():
        mean, std = channel_mean_std(z)
        assert mean.abs().max() < 1e-4, name
        assert (std - 1).abs().max() < 1e-4, name


def test_memory_limit_subsamples_the_data_driven_init() -> None:
    """--mem-limit bounds the rows used for whitening; the normalisation still uses them all."""
    net, x = tiny_net(), batch()
    layers = learned(net)
    magic_init_(
        net,
        layers,
        lambda: net(x),
        set(),
        init="pca",
        bias=0.0,
        mem_limit_mb=0.01,
        between_layer=False,
        generator=gen(0),
    )
    for name, z in preactivations(net, layers, x).items():
        mean, std = channel_mean_std(z)
        assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 1e-4, name


def test_bias_option_sets_the_channel_mean() -> None:
    net, x = tiny_net(), batch()
    layers = learned(net)
    magic_init_(net, layers, lambda: net(x), set(), bias=0.1, between_layer=False, generator=gen(0))
    for z in preactivations(net, layers, x).values():
        mean, std = channel_mean_std(z)
        assert torch.allclose(mean, torch.full_like(mean, 0.1), atol=1e-4)
        assert torch.allclose(std, torch.ones_like(std), atol=1e-4)


def test_gaussian_draw_matches_the_reference_formula() -> None:
    """elwise: W ~ N(0, 1), then W /= sigma_c, b = bias - mu_c / sigma_c (initializeLayer)."""
    layer = nn.Linear(6, 4)
    x = torch.randn(50, 6, generator=gen(5)) * 3 + 1
    magic_init_(
        layer,
        [("fc", layer)],
        lambda: layer(x),
        set(),
        bias=0.1,
        between_layer=False,
        generator=gen(7),
    )
    w0 = torch.randn((4, 6), generator=gen(7)).double()
    z = x.double() @ w0.T
    mu, sigma = z.mean(0), z.std(0, unbiased=False)
    assert torch.allclose(layer.weight.double(), w0 / sigma[:, None], rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.bias.double(), 0.1 - mu / sigma, rtol=1e-5, atol=1e-6)


def test_pca_decorrelates_the_outputs() -> None:
    mix = torch.randn(10, 10, generator=gen(1))
    x = torch.randn(400, 10, generator=gen(2)) @ mix  # strongly correlated inputs
    layer = nn.Linear(10, 4)
    magic_init_(
        layer,
        [("fc", layer)],
        lambda: layer(x),
        set(),
        init="pca",
        between_layer=False,
        generator=gen(0),
    )
    z = layer(x).detach().double()
    corr = torch.corrcoef(z.T)
    assert torch.allclose(corr, torch.eye(4, dtype=torch.float64), atol=1e-4)


def clustered(k: int, dim: int, n_per: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k tight clusters (noise inside their own affine span) at 4 x orthonormal directions."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen(seed)))
    centres = 4.0 * q[:k]
    span = centres - centres.mean(0)
    coef = torch.randn(k * n_per, k, generator=gen(seed + 1)) * 0.05
    x = centres.repeat_interleave(n_per, 0) + coef @ span
    return x, centres


@pytest.mark.parametrize("as_conv", [False, True])
def test_kmeans_filters_are_the_cluster_centroids(as_conv: bool) -> None:
    """Each k-means filter responds most to a different cluster: the filters are the
    (whitened) centroids, one per cluster."""
    k, dim = 4, 8
    x, centres = clustered(k, dim, 100, seed=3)
    if as_conv:  # each pixel is one sample: a 1x1 convolution
        layer: nn.Module = nn.Conv2d(dim, k, 1)
        inp = x.view(16, 25, dim).permute(0, 2, 1).reshape(16, dim, 5, 5)
        w = lambda: layer.weight.view(k, dim)  # noqa: E731
    else:
        layer = nn.Linear(dim, k)
        inp = x
        w = lambda: layer.weight  # noqa: E731
    report = magic_init_(
        layer,
        [("l", layer)],
        lambda: layer(inp),
        set(),
        init="kmeans",
        between_layer=False,
        generator=gen(0),
    )
    assert report[0]["step"] == "kmeans" and report[0]["note"] is None
    best = (w().detach() @ centres.T).argmax(1)  # per filter: the cluster it responds to most
    assert sorted(best.tolist()) == list(range(k))


def test_weights_from_data_kmeans_recovers_centroids_in_whitened_space() -> None:
    """Independent whitening here: the returned filters, applied to the data, score each
    sample highest on the filter of its own cluster."""
    x, _ = clustered(3, 5, 60, seed=11)
    labels = torch.arange(3).repeat_interleave(60)
    w, note = weights_from_data(x, "kmeans", 3, gen(0))
    assert note is None and w.shape == (3, 5)
    scores = (x.double() - x.double().mean(0)) @ w.T
    assign = scores.argmax(1)
    # one filter per cluster, and every sample goes to its cluster's filter
    mapping = {int(assign[labels == c].mode().values) for c in range(3)}
    assert len(mapping) == 3
    for c in range(3):
        assert (assign[labels == c] == assign[labels == c][0]).all()


def test_weights_from_data_falls_back_to_gaussian_with_few_samples() -> None:
    w, note = weights_from_data(torch.randn(3, 10), "kmeans", 5, gen(0))
    assert w.shape == (5, 10) and "gaussian" in note


# ---------------------------------------------------------------------------- pretrained


def encoder(net: nn.Sequential) -> nn.Sequential:
    return net[:8]  # conv1 .. relu after the pool-free conv


@pytest.mark.parametrize("pretrained_within", ["keep", "scalar"])
def test_pretrained_layers_are_only_scaled_and_the_encoder_kept_up_to_scale(
    pretrained_within: str,
) -> None:
    net = badly_scaled_(tiny_net())
    x, fresh = batch(0), batch(9)
    layers = learned(net)
    convs = {n for n, m in layers if isinstance(m, nn.Conv2d)}
    before = copy.deepcopy(net)
    report = magic_init_(
        net, layers, lambda: net(x), convs, pretrained_within=pretrained_within, generator=gen(0)
    )
    old = dict(before.named_modules())
    for name, m in layers:
        if name not in convs:
            continue
        for p, p0 in ((m.weight, old[name].weight), (m.bias, old[name].bias)):
            c, residual = positive_multiple_residual(p0.detach(), p.detach())
            assert c > 0 and residual < 1e-5, name  # direction unchanged, positive scale
        entry = next(e for e in report if e["name"] == name)
        c, _ = positive_multiple_residual(old[name].weight.detach(), m.weight.detach())
        assert c == pytest.approx(entry["within_scale"] * entry["between_scale"], rel=1e-5)
    with torch.no_grad():
        c, residual = positive_multiple_residual(encoder(before)(fresh), encoder(net)(fresh))
    assert c > 0 and residual < 1e-5  # on images not used for the init too
    assert not torch.allclose(net[-1].weight, before[-1].weight)  # the head was re-drawn


def test_scalar_mode_sets_mean_channel_variance_of_pretrained_layers_to_one() -> None:
    net = badly_scaled_(tiny_net())
    x = batch()
    layers = learned(net)
    names = {n for n, _ in layers}
    magic_init_(
        net,
        layers,
        lambda: net(x),
        names,
        pretrained_within="scalar",
        between_layer=False,
        generator=gen(0),
    )
    for name, z in preactivations(net, layers, x).items():
        _, std = channel_mean_std(z)
        assert float((std**2).mean()) == pytest.approx(1.0, rel=1e-4), name


def test_fully_pretrained_network_keeps_its_function_up_to_scale() -> None:
    net = badly_scaled_(tiny_net())
    x, fresh = batch(0), batch(4)
    layers = learned(net)
    before = copy.deepcopy(net)
    report = magic_init_(net, layers, lambda: net(x), {n for n, _ in layers}, generator=gen(0))
    with torch.no_grad():
        c, residual = positive_multiple_residual(before(fresh), net(fresh))
    assert c > 0 and residual < 1e-5
    summary = report[-1]
    assert summary["step"] == "summary" and summary["output_residual"] < 1e-5


# ------------------------------------------------------------------------- between-layer


def test_between_layer_equalises_the_gradient_to_weight_ratio() -> None:
    net = badly_scaled_(tiny_net())
    x = batch()
    layers = learned(net)
    spread_before = log_spread(expected_ratios(net, layers, x))
    report = magic_init_(net, layers, lambda: net(x), {n for n, _ in layers}, generator=gen(0))
    spread_after = log_spread(expected_ratios(net, layers, x))
    assert spread_before > 1.5  # the badly scaled net: ratios over orders of magnitude
    assert spread_after < 0.25 and spread_after < 0.1 * spread_before
    summary = report[-1]
    assert summary["ratio_log_std_before"] > 1.5 and summary["ratio_log_std_after"] < 0.3
    assert summary["iterations"] >= 1


def test_one_between_layer_iteration_matches_the_reference_update() -> None:
    """scale_k = sqrt(r_k / target), target = geomean(r) * output_std^(1/L); biases also
    follow the input's scale change (product of the scales below)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for m, s in zip(net[::2], (0.1, 5.0, 0.3)):
            m.weight.mul_(s)
            m.bias.uniform_(0.0, 0.2)
    x = torch.randn(32, 6, generator=gen(8))
    layers = learned(net)
    ref = copy.deepcopy(net)
    # independent: the first random backward signal is the generator's first draw
    g = torch.randn((32, 3), generator=gen(5))
    out = ref(x)
    weights = [m.weight for m in ref[::2]]
    grads = torch.autograd.grad(out, weights, g)
    r = [
        math.sqrt(float(d.double().pow(2).mean() / w.detach().double().pow(2).mean()))
        for d, w in zip(grads, weights)
    ]
    o = float(out.detach().double().std(0, unbiased=False).mean())
    target = math.exp(sum(math.log(v) for v in r) / 3) * o ** (1 / 3)
    s = [math.sqrt(v / target) for v in r]
    report = magic_init_(
        net,
        layers,
        lambda: net(x),
        {n for n, _ in layers},
        iterations=1,
        tolerance=0.0,
        generator=gen(5),
    )
    below = 1.0
    for k, (m, m0) in enumerate(zip(net[::2], ref[::2])):
        assert torch.allclose(m.weight.double(), s[k] * m0.weight.double(), rtol=1e-5)
        assert torch.allclose(m.bias.double(), s[k] * below * m0.bias.double(), rtol=1e-5)
        assert report[k]["between_scale"] == pytest.approx(s[k], rel=1e-6)
        below *= s[k]
    assert report[-1]["iterations"] == 1


# ------------------------------------------------------------------------------------ LRN


def lrn_net() -> nn.Sequential:
    return badly_scaled_(tiny_net(lrn=nn.LocalResponseNorm(3, alpha=1.0, beta=0.75, k=1.0)), 2)


@pytest.mark.parametrize(
    ("within", "between"), [("keep", True), ("scalar", False), ("scalar", True)]
)
def test_lrn_fold_keeps_the_function_up_to_scale(within: str, between: bool) -> None:
    net = lrn_net()
    x, fresh = batch(0), batch(6)
    layers = learned(net)
    before = copy.deepcopy(net)
    report = magic_init_(
        net,
        layers,
        lambda: net(x),
        {n for n, _ in layers},
        lrn="fold",
        pretrained_within=within,
        between_layer=between,
        generator=gen(0),
    )
    folds = [e for e in report if e["step"] == "lrn_fold"]
    assert len(folds) == 1 and folds[0]["k_after"] != pytest.approx(folds[0]["k_before"])
    assert lrn_k(net) == {"3": pytest.approx(folds[0]["k_after"])}
    with torch.no_grad():
        c, residual = positive_multiple_residual(before(fresh), net(fresh))
    assert c > 0 and residual < 1e-4
    rebuilt = lrn_net()  # k is not in the state dict: set_lrn_k_ restores it
    rebuilt.load_state_dict(net.state_dict())
    set_lrn_k_(rebuilt, lrn_k(net))
    with torch.no_grad():
        assert torch.allclose(rebuilt(fresh), net(fresh))


def test_lrn_reference_mode_scales_through_it_and_reports_the_change() -> None:
    net = lrn_net()
    x = batch(0)
    layers = learned(net)
    before = copy.deepcopy(net)
    report = magic_init_(net, layers, lambda: net(x), {n for n, _ in layers}, generator=gen(0))
    assert net[3].k == 1.0
    with torch.no_grad():
        _, residual = positive_multiple_residual(before(x), net(x))
    assert residual > 1e-3  # LRN is not homogeneous: magic_init changes the function
    assert report[-1]["output_residual"] == pytest.approx(residual, rel=1e-3)


# ------------------------------------------------------------------ determinism, structure


@pytest.mark.parametrize("init", ["gaussian", "kmeans"])
def test_deterministic_per_seed(init: str) -> None:
    x = batch(n=8)

    def run(seed: int) -> tuple[dict, list]:
        net = tiny_net()
        rep = magic_init_(net, learned(net), lambda: net(x), set(), init=init, generator=gen(seed))
        return net.state_dict(), rep

    (a, ra), (b, rb), (c, _) = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ra == rb
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("init", ["gaussian", "pca", "kmeans"])
def test_grouped_and_depthwise_convolutions(init: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.ReLU(),  # depthwise
        nn.Conv2d(8, 12, 3, groups=4),
    )
    x = torch.randn(8, 4, 10, 10, generator=gen(1))
    layers = learned(net)
    before = [m.weight.shape for _, m in layers]
    magic_init_(
        net,
        layers,
        lambda: net(x),
        set(),
        init=init,
        bias=0.0,
        generator=gen(0),
        between_layer=False,
    )
    assert [m.weight.shape for _, m in layers] == before
    for name, z in preactivations(net, layers, x).items():
        mean, std = channel_mean_std(z)
        assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 1e-4, name


def test_conv_transpose_is_gaussian_only() -> None:
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    x = torch.randn(8, 4, 5, 5, generator=gen(1))
    report = magic_init_(
        layer,
        [("up", layer)],
        lambda: layer(x),
        set(),
        init="kmeans",
        bias=0.0,
        between_layer=False,
        generator=gen(0),
    )
    assert "gaussian" in report[0]["note"]
    mean, std = channel_mean_std(layer(x).detach().double())
    assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 1e-4


def test_zca_needs_fast() -> None:
    layer = nn.Linear(6, 4)
    x = torch.randn(100, 6, generator=gen(0))
    with pytest.raises(ValueError, match="fast=True"):
        magic_init_(
            layer, [("fc", layer)], lambda: layer(x), set(), init="zca", between_layer=False
        )
    magic_init_(
        layer,
        [("fc", layer)],
        lambda: layer(x),
        set(),
        init="zca",
        fast=True,
        bias=0.0,
        between_layer=False,
        generator=gen(0),
    )
    mean, std = channel_mean_std(layer(x).detach().double())
    assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 1e-4


# ------------------------------------------------------------------------- API contracts


def test_forward_order_report_json_and_modes_restored() -> None:
    net, x = tiny_net(), batch()
    layers = layers_in_forward_order(net, lambda: net(x))
    assert [n for n, _ in layers] == [n for n, _ in learned(net)]
    net.train()
    for _, m in layers[:2]:
        m.weight.requires_grad_(False)
    report = magic_init_(net, layers, lambda: net(x), set(), generator=gen(0))
    assert net.training
    assert [m.weight.requires_grad for _, m in layers] == [False, False, True, True, True]
    json.dumps(report)
    line = format_report(report)
    assert layers[0][0] in line and "between-layer" in line


def test_layer_without_gradient_or_not_run_is_an_error() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    unused = nn.Linear(4, 4)
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="did not run"):
        magic_init_(net, learned(net) + [("unused", unused)], lambda: net(x), set())
    side = nn.Linear(4, 3)  # runs, but its output is not returned

    def fwd() -> torch.Tensor:
        side(x)
        return net(x)

    with pytest.raises(ValueError, match="no usable gradient"):
        magic_init_(net, learned(net) + [("side", side)], fwd, set())
    with pytest.raises(ValueError, match="not among the layers"):
        magic_init_(net, learned(net), lambda: net(x), {"conv9"})
