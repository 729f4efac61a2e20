"""Krähenbühl et al.'s data-dependent initialisation ("magic init"), as philkr/magic_init does it.

One generic entry point, `magic_init_`, for any nn.Module whose learned layers are Conv1d/2d/3d,
ConvTranspose2d or Linear (grouped and pool-free convolutions included). It runs the two steps
of Krähenbühl, Doersch, Donahue, Darrell, "Data-dependent Initializations of Convolutional
Neural Networks" (ICLR 2016) on a fixed data batch: the within-layer initialisation of new
layers and the between-layer scale calibration of all layers (pretrained ones included).

Reference behaviour
-------------------
Read from philkr/magic_init at commit 20b87dc78b6b9285cf16f670c6b0d9e67972c77c (the newest;
`magic_init.py` blob 7464af4, `measure_stat.py` blob e8feda6). Line numbers are that file's.
The paper's own text could not be retrieved here (only its abstract), so the code is the
authority below; the paper's Algorithms 1-2 are described in the same terms (within-layer:
per-channel mean/variance normalisation; between-layer: iterative per-layer scale correction
equalising the gradient-to-weight ratio) but their exact formulas were not checked.

Which layers are initialised. `magicInitialize` (l. 167-204) walks the layers in prototxt
(forward) order and re-draws a parameter layer only if all its weights are zero
(`np.sum(np.abs(w)) <= 1e-10`, l. 185); any other layer is printed "Skipping layer" and left
untouched (l. 192-193; l. 195 is a TODO "Estimate and rescale the values"). So a pretrained
(`-l/--load`, l. 385 and 426-427) layer gets no within-layer step at all. `main` only calls
`magicInitialize` when some layer is all-zero (l. 437-441); `-z` zeroes every layer first
(l. 432-436), i.e. re-draws everything.

Within-layer step, `initializeLayer` (l. 110-163), for one new layer with its input from the
already-initialised layers below:
- all blobs are zeroed (l. 119); type 'elwise' (the CLI default, l. 388) draws the weights
  i.i.d. N(0, 1) (l. 124-126);
- the data-driven types ('pca', 'zca', 'kmeans', 'rand'; `fast_` prefix, l. 120-122) first
  gather the layer's input in a random basis, `gatherInputData` (l. 31-71): to avoid
  re-implementing padding/stride, the layer is run with random N(0, 1) weights T, OS times,
  OS = ceil(fan_in / n_out) (l. 42; per-group fan_in but the layer's total n_out, so grouped
  layers get fewer than fan_in projections per group), OS = 1 for `fast_` (l. 43). The rows
  (one per output position and image, all batches) are randomly subsampled to at most
  max_data / (n_out * OS) rows, max_data = --mem-limit MiB / 4 bytes (l. 58-66, 439). Columns
  are packed so groups stay contiguous (l. 68-71);
- groups: G = bottom channels // weight channels (l. 128-134); each group's block of D and T
  is handled separately (l. 143-152);
- `initializeWeight` (l. 73-107) on a group's data D (samples x dims): fewer samples than
  outputs -> N(0, 1) weights (l. 77-79); centre D (l. 80); eigen-decompose C = D^T D (not
  divided by N, l. 83-84), keep the top n_out components (l. 86-88), s < 1e-6 -> 0, else
  1 / sqrt(s + 1e-3) (l. 89-90). 'pca' returns S V^T (l. 92-93); 'zca' V S V^T (l. 94-95, a
  dims x dims matrix: it only fits when dims == n_out, i.e. with `fast_`). Otherwise the data
  is whitened, wD = D V S, every row scaled to unit norm (l. 97-98); 'kmeans' runs
  `sklearn.cluster.MiniBatchKMeans(n_clusters=n_out, batch_size=10 * n_out)` on wD and takes
  the cluster centres (l. 99-102); 'rand' takes n_out random rows of wD (l. 103-104); the
  centres are mapped back, C = centres S V^T, and each row divided by the std of its
  responses D C^T (l. 105-106). The layer's weights are then C T (l. 152): a filter's response
  to an input is the dot product of its centroid with the whitened input;
- for every type, the layer's pre-activation top (its output before the in-place ReLU; bias
  zero) is computed on all NIT batches, flattened per output channel over batch and space
  (`flattenData`, l. 27-29) and mean mu / std sigma (numpy, ddof=0) taken per channel
  (l. 154-157); weights /= sigma (l. 158-161, per output channel, axis 1 for Deconvolution),
  bias = -mu / sigma + bias (l. 162-163). So channels get mean `bias`, std 1; no guard for
  sigma = 0. 'Deconvolution' only supports 'elwise' (l. 115-117).

Between-layer step, `calibrateGradientRatio(net, NIT=1)` (l. 259-360), run when `-cs` is
given (l. 442-446; off by default, but every README example uses it), on all parameter
layers, pretrained or new, always with NIT=1: one fresh batch of `-bs` images:
- forward once; remember each parameter layer's input scale, bottom_scale = mean |input|
  (l. 282), and output_std = mean over output channels of the per-channel std of the last
  non-loss layer's top (l. 263-273, 293);
- up to 10 iterations (hard-coded `range(10)`, l. 295): zero the diffs, set the top's diff
  to fresh N(0, 1) noise (a random backward signal: no labels, no loss, l. 301-302), back-
  propagate (l. 304), and per layer ratio_k = sqrt(mean(dW_k^2) / mean(W_k^2)) over the
  weight blob only (l. 312); target = geometric mean of the ratios * output_std^(1/L)
  (l. 319); stop when every |log ratio_k / log target - 1| < 0.01 (l. 322-324);
- else re-forward the stored batch layer by layer (l. 327-352): each layer first multiplies
  its biases by current mean |input| / bottom_scale (the input's scale change caused by the
  layers below: this keeps a positively homogeneous network's function up to scale) and
  stores the new bottom_scale (l. 337-341), then multiplies weights and biases by
  sqrt(ratio_k / target) (l. 344-346). No damping exponent beyond that square root. For a
  homogeneous network ratio_k scales as (product of all scales) / scale_k^2, so one update
  equalises the ratios measured with that noise draw and takes the output std o to sqrt(o);
- it prints a warning when the output std moved by more than exp(0.25) ("not homogeneous",
  l. 354-359). A layer whose gradient is zero (lr_mult 0, or not reaching the top) gives
  log(0): the reference does not guard it. `estimateHomogenety` (l. 220-257) exists but its
  call is commented out (l. 445).
- LRN (l. 9, supported) is not homogeneous: the reference scales through it anyway; the
  bias correction uses the measured mean |input| ratio, the output_std factor in the target
  "hope[s] to undo correct the estimation over time" (l. 314-318), and the function of a
  pretrained net with LRN is NOT preserved.

Command-line defaults (`main`, l. 383-396): --bias/-b 0.1, --type/-t 'elwise', -cs off,
-z off, -s 1.0 (input scale), -bs 16, -nit 10 (number of batches for the within-layer
statistics: 160 images), --mem-limit 500 (MiB), --gpu 0; data from -d: an `ImageData` layer
resizing every image to the net's input size (no crop, no mirror), mean_value
(104, 117, 123), scale -s (l. 420); the net is built in the TRAIN phase (l. 422, 424), so
Dropout is active while measuring.

What differs here, and why
--------------------------
- Layers to re-draw are named (`pretrained`), not detected as all-zero.
- The model is put in eval() mode (Dropout off; the reference measures in Caffe's TRAIN
  phase) so that the result is a deterministic function of the batch and the generator.
- Statistics, eigen-decompositions and k-means run in float64 (the reference computes on
  Caffe's float32 blobs); k-means uses scikit-learn's MiniBatchKMeans with n_init=3 (its default
  in the 2015-16 releases the reference ran with; newer releases default to 'auto', one run)
  and a random_state drawn from `generator`, so results are reproducible but not bit-equal to
  the reference's.
- sigma <= eps (a dead channel) leaves that channel unscaled instead of dividing by zero; a
  zero row of the whitened data stays zero instead of becoming NaN; a layer with no gradient
  raises ValueError instead of producing NaN; log(target) == 0 falls back to an absolute test.
- 'zca' without `fast=True` raises ValueError (the reference crashes on the reshape).
- The between-layer step keeps the iteration whose log-ratios were most equal when the last
  one is worse or its output not finite (the summary's `kept_iteration`). The reference's
  update assumes a chain of positively homogeneous layers; FCN-8s' skip branches break that
  and its iteration diverges (a random CaffeNet FCN-8s on the synthetic data: log-ratio std
  1.35 -> 12.4, output std 1.2 -> 2e13, the first training loss 1.6e13, NaN at iteration 2).
- `pretrained_within="scalar"` (not the default) adds the project's earlier behaviour: one
  scale per pretrained layer making its mean channel variance 1, bias tracked so that the
  function is kept up to scale.
- `lrn="fold"` (not the default) keeps the function of a network with nn.LocalResponseNorm
  up to a positive scale: when the LRN input is scaled by c, its k becomes k c^2, so LRN(c
  a; k c^2) = c^(1-2 beta) LRN(a; k). k is a plain attribute, not in the state dict: the
  report lists the new values and `lrn_k` / `set_lrn_k_` read and restore them next to a
  checkpoint. The default, "reference", scales through LRN as magic_init does; the summary's
  `output_residual` then measures how far the output moved from a positive multiple of the
  original. Subclasses of nn.LocalResponseNorm (the encoder's CaffeLRN) are covered. With k
  folded the LRN output is homogeneous of degree 1 - 2 beta (-0.5 for CaffeNet), not 1, so
  the reference's update (derived for degree 1) overshoots and its "not homogeneous" warning
  fires on some iterations; the ratios still equalise (a smoke run, CaffeNet with N(0, 0.01)
  conv weights as the "pretrained" encoder, 16 random 131 px inputs: log-ratio std 5.96 ->
  0.07 in both modes, output residual 2e-5 with "fold", 1.2e-2 with "reference").

Run it before wrapping the model in DistributedDataParallel; every rank gets the same result
from the same batch and generator seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Init = Literal["gaussian", "pca", "zca", "kmeans", "rand"]
INITS: tuple[str, ...] = ("gaussian", "pca", "zca", "kmeans", "rand")

# The reference's command-line defaults (magic_init.py main(), l. 383-396; l. 295, 446).
REFERENCE_BIAS = 0.1  # -b
REFERENCE_INIT: Init = "gaussian"  # -t elwise
REFERENCE_BATCH_SIZE = 16  # -bs
REFERENCE_WITHIN_BATCHES = 10  # -nit: within-layer statistics on 10 x 16 = 160 images
REFERENCE_GRADIENT_BATCHES = 1  # calibrateGradientRatio(n) with NIT=1: one batch of 16
REFERENCE_ITERATIONS = 10  # range(10) in calibrateGradientRatio
REFERENCE_TOLERANCE = 0.01  # |log r / log target - 1| < 0.01
REFERENCE_MEM_LIMIT_MB = 500  # --mem-limit
REFERENCE_MEAN_BGR = (104.0, 117.0, 123.0)  # ImageData mean_value, 0-255 BGR input
HOMOGENEITY_WARNING = 0.25  # |log output_std change| that triggers the reference's warning

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LRN = (nn.LocalResponseNorm, nn.CrossMapLRN2d)


# ------------------------------------------------------------------------------ helpers


def layers_in_forward_order(
    model: nn.Module,
    forward: Callable[[], Any],
    types: tuple[type[nn.Module], ...] = (*_CONV, nn.ConvTranspose2d, nn.Linear),
) -> list[tuple[str, nn.Module]]:
    """(name, module) of every `types` module of `model`, in the order `forward()` runs them
    (modules that do not run are left out)."""
    order: list[tuple[str, nn.Module]] = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, types):

            def hook(mod: nn.Module, _inp: object, name: str = name) -> None:
                if all(mod is not o for _, o in order):
                    order.append((name, mod))

            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return order


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, _CONV):
        return "conv"
    if isinstance(layer, nn.ConvTranspose2d):
        return "deconv"
    raise TypeError(f"magic_init_ supports Conv1d/2d/3d, ConvTranspose2d and Linear, not {layer}")


def _groups(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Linear) else int(layer.groups)


def _apply(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`layer`'s linear map with `weight` in place of its own, no bias: (input) -> (output)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight)
    if isinstance(layer, _CONV):
        return layer._conv_forward(x, weight, None)
    assert isinstance(layer, nn.ConvTranspose2d)
    return F.conv_transpose2d(
        x, weight, None, layer.stride, layer.padding, layer.output_padding, layer.groups,
        layer.dilation,
    )  # fmt: skip


def _channels_last(z: torch.Tensor, linear: bool) -> torch.Tensor:
    """(..., C) for Linear outputs, (B, C, *S) -> (B * prod(S), C) for convolutions."""
    if linear:
        return z.reshape(-1, z.shape[-1])
    return z.transpose(0, 1).reshape(z.shape[1], -1).T


def _channel_stats(z: torch.Tensor, linear: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel mean and std (ddof 0) over batch and space, float64."""
    flat = _channels_last(z, linear).double()
    return flat.mean(0), flat.std(0, unbiased=False)


def _output_std(out: torch.Tensor) -> float:
    """The reference's output_std: mean over channels (dim 1, or the last dim of a 2-D output)
    of the per-channel std over batch and space (flattenData, l. 293)."""
    _, std = _channel_stats(out.detach(), linear=out.dim() <= 2)
    return float(std.mean())


def _scale_output_channels_(layer: nn.Module, factors: torch.Tensor) -> None:
    """weight[output channel c] *= factors[c] (handles ConvTranspose's (in, out/G, ...) layout)."""
    w = layer.weight
    f = factors.to(device=w.device, dtype=w.dtype)
    if isinstance(layer, nn.ConvTranspose2d):
        g = layer.groups
        view = w.view(g, w.shape[0] // g, w.shape[1], -1)
        view.mul_(f.view(g, 1, w.shape[1], 1))
    else:
        w.mul_(f.view((-1,) + (1,) * (w.dim() - 1)))


def _randn(
    shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    """N(0, 1) drawn on the CPU from `generator` (same numbers on every device), moved to `like`."""
    z = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return z.to(device=like.device, dtype=like.dtype)


def _seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    tensors = [t for t in out if isinstance(t, torch.Tensor)]
    if not tensors:
        raise TypeError("forward() must return a tensor or a sequence of tensors")
    return tensors


# ------------------------------------------------------------------- within-layer step


def weights_from_data(
    data: torch.Tensor, init: str, n_out: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, str | None]:
    """`initializeWeight` (magic_init.py l. 73-107): (n_out, dims) weights in the space of
    `data` (samples, dims), and a note when it fell back to N(0, 1).

    Whiten with the top n_out eigenvectors of D^T D (D centred), then 'pca': S V^T; 'zca':
    V S V^T (needs dims == n_out); 'kmeans' / 'rand': centres (MiniBatchKMeans / random rows)
    of the unit-normalised whitened data, mapped back by S V^T and each divided by the std of
    its responses. float64 throughout.
    """
    d = data.double()
    if d.shape[1] < n_out:
        raise ValueError(f"{d.shape[1]} data dimensions cannot give {n_out} filters")
    if d.shape[0] < n_out:  # l. 77-79
        return _randn((n_out, d.shape[1]), generator, d), "fewer samples than outputs: gaussian"
    d = d - d.mean(0, keepdim=True)
    s, v = torch.linalg.eigh(d.T @ d)  # ascending
    s, v = s[-n_out:], v[:, -n_out:]
    keep = s >= 1e-6
    s = torch.where(keep, 1.0 / torch.sqrt(s.clamp_min(0) + 1e-3), torch.zeros_like(s))
    if init == "pca":
        return s[:, None] * v.T, None
    if init == "zca":
        if v.shape[0] != n_out:
            raise ValueError(
                "init='zca' gives a dims x dims matrix: it needs fast=True (one projection per "
                "output), as in the reference"
            )
        return v @ (s[:, None] * v.T), None
    wd = d @ (v * s[None, :])
    norms = wd.norm(dim=1, keepdim=True)
    wd = wd / torch.where(norms > 0, norms, torch.ones_like(norms))
    k = wd.shape[1]
    if init == "kmeans":
        from sklearn.cluster import MiniBatchKMeans

        km = MiniBatchKMeans(
            n_clusters=k, batch_size=10 * k, n_init=3, random_state=_seed(generator)
        )
        centres = torch.from_numpy(km.fit(wd.cpu().numpy()).cluster_centers_).to(wd)
    elif init == "rand":
        rows = torch.randperm(wd.shape[0], generator=generator)[:k].to(wd.device)
        centres = wd[rows]
    else:
        raise ValueError(f"unknown init {init!r}; choose from {INITS}")
    c = centres @ (s[:, None] * v.T)
    std = (d @ c.T).std(0, unbiased=False)
    return c / torch.where(std > 0, std, torch.ones_like(std))[:, None], None


def _projected_input(
    layer: nn.Module,
    x: torch.Tensor,
    fast: bool,
    mem_limit_mb: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gatherInputData` (l. 31-71): T (n_out * OS, *weight.shape[1:]) random N(0, 1) weights and
    D (samples, n_out * OS) float64, the layer's responses to its input with weights T.

    As in the reference: OS draws of the layer's own shape, one forward each (peak memory: one
    ordinary output), the rows subsampled once (after the first draw) to at most
    mem_limit / 4 bytes / (n_out * OS), and rows/columns packed c * OS + o so that each
    group's outputs stay contiguous."""
    w = layer.weight
    n_out, fan_in = w.shape[0], w[0].numel()
    os_ = 1 if fast else math.ceil(fan_in / n_out)
    max_rows = int(mem_limit_mb * 1024 * 1024 / 4 / (n_out * os_))
    ts, ds, rows = [], [], None
    for _ in range(os_):
        t = _randn(w.shape, generator, w)
        d = _channels_last(_apply(layer, x, t), isinstance(layer, nn.Linear))
        if rows is None and max_rows < d.shape[0]:
            rows = torch.randperm(d.shape[0], generator=generator)[:max_rows].to(d.device)
        ts.append(t)
        ds.append((d if rows is None else d[rows]).double())
    t = torch.stack(ts, 1).reshape(n_out * os_, *w.shape[1:])
    return t, torch.stack(ds, 2).reshape(ds[0].shape[0], n_out * os_)


def _draw_weights_(
    layer: nn.Module, x: torch.Tensor, init: str, fast: bool, mem_limit_mb: float,
    generator: torch.Generator | None,
) -> str | None:  # fmt: skip
    """Fill layer.weight with the within-layer draw (before the mean/std normalisation)."""
    w = layer.weight
    if init == "gaussian":
        w.copy_(_randn(w.shape, generator, w))
        return None
    if isinstance(layer, nn.ConvTranspose2d):  # l. 115-117: Deconvolution is elwise only
        w.copy_(_randn(w.shape, generator, w))
        return f"{init!r} unsupported for ConvTranspose2d (as in the reference): gaussian"
    t, d = _projected_input(layer, x, fast, mem_limit_mb, generator)
    g = _groups(layer)
    n_out_g, rows_g, cols_g = w.shape[0] // g, t.shape[0] // g, d.shape[1] // g
    notes = set()
    for i in range(g):
        dg = d[:, i * cols_g : (i + 1) * cols_g]
        tg = t[i * rows_g : (i + 1) * rows_g].reshape(rows_g, -1).double()
        wg, note = weights_from_data(dg, init, n_out_g, generator)
        w[i * n_out_g : (i + 1) * n_out_g] = (wg @ tg).reshape(n_out_g, *w.shape[1:]).to(w)
        if note:
            notes.add(note)
    return "; ".join(sorted(notes)) or None


def _normalise_(layer: nn.Module, x: torch.Tensor, bias: float, eps: float) -> tuple[float, int]:
    """weights /= sigma_c, bias = bias - mu_c / sigma_c (l. 154-163); returns the mean applied
    1 / sigma and the number of channels left alone because sigma <= eps."""
    mu, sigma = _channel_stats(_apply(layer, x, layer.weight), isinstance(layer, nn.Linear))
    dead = sigma <= eps
    sigma = torch.where(dead, torch.ones_like(sigma), sigma)
    _scale_output_channels_(layer, 1.0 / sigma)
    if layer.bias is not None:
        layer.bias.copy_((bias - mu / sigma).to(layer.bias))
    return float((1.0 / sigma).mean()), int(dead.sum())


# ---------------------------------------------------------------------------- main API


def magic_init_(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    forward: Callable[[], Any],
    pretrained: set[str] | frozenset[str] = frozenset(),
    *,
    init: Init = REFERENCE_INIT,
    bias: float = REFERENCE_BIAS,
    fast: bool = False,
    between_layer: bool = True,
    iterations: int = REFERENCE_ITERATIONS,
    tolerance: float = REFERENCE_TOLERANCE,
    gradient_forward: Callable[[], Any] | None = None,
    pretrained_within: Literal["keep", "scalar"] = "keep",
    lrn: Literal["reference", "fold"] = "reference",
    mem_limit_mb: float = REFERENCE_MEM_LIMIT_MB,
    generator: torch.Generator | None = None,
    eps: float = 1e-8,
) -> list[dict[str, Any]]:
    """Krähenbühl et al.'s data-dependent initialisation of `layers`, in place, as magic_init.

    model: the network (put in eval() while measuring, its mode restored after).
    layers: (name, module) of the Conv/ConvTranspose2d/Linear layers to handle; each must run
        exactly once per forward() (their list order only orders the report).
    forward: runs `model` on the fixed data batch and returns its output (a tensor, or a
        sequence/dict of tensors: every one gets the random backward signal). It is called
        under no_grad for the within-layer step; for the between-layer step it must build an
        autograd graph (do not wrap it in no_grad). The reference uses 10 batches of 16 images
        (REFERENCE_WITHIN_BATCHES x REFERENCE_BATCH_SIZE) for the within-layer statistics.
    pretrained: names of layers whose weights are learned: never re-drawn; with
        pretrained_within="keep" (reference) untouched by the within-layer step, with
        "scalar" given one scale (mean channel variance 1) and their bias tracked; both keep
        a positively homogeneous network's function up to a positive scale.
    init: within-layer draw of new layers: "gaussian" (the reference's 'elwise', its default),
        "pca", "zca" (needs fast=True), "kmeans", "rand"; fast: one random projection instead
        of ceil(fan_in / n_out) (the reference's 'fast_' prefix).
    bias: pre-activation mean of new layers (reference CLI default 0.1; 0 for zero mean).
    between_layer: run `calibrateGradientRatio` on all `layers` (reference: the -cs flag, used
        in every README example); iterations, tolerance: its loop (10, 0.01 in the reference).
    gradient_forward: forward for the between-layer step (reference: one fresh batch of 16);
        defaults to `forward`.
    lrn: "reference" scales through LocalResponseNorm (not homogeneous: the function changes);
        "fold" multiplies each LRN's k by c^2 when its input is scaled by c, keeping the
        function up to scale (k is not in the state dict: see the report).
    mem_limit_mb: the reference's --mem-limit, bounding the samples of data-driven inits.
    generator: a CPU torch.Generator; every random draw (weights, projections, subsamples,
        k-means seed, backward noise) comes from it, on the CPU, then moves to the model's
        device: deterministic per seed on any device (None: torch's global generator).

    Returns one dict per layer (name, kind, step, within_scale, between_scale, bias_adjust,
    ratio_before, ratio_after, dead_channels, note), then one per folded LRN
    (step "lrn_fold"), then, if between_layer, a summary (name "between_layer",
    step "summary": iterations, converged, output_std_before/after, ratio_log_std_before/after,
    output_scale, output_residual, warnings).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {INITS}")
    if pretrained_within not in ("keep", "scalar"):
        raise ValueError(f"pretrained_within must be 'keep' or 'scalar', not {pretrained_within!r}")
    if lrn not in ("reference", "fold"):
        raise ValueError(f"lrn must be 'reference' or 'fold', not {lrn!r}")
    names = [n for n, _ in layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    unknown = set(pretrained) - set(names)
    if unknown:
        raise ValueError(f"pretrained names not among the layers: {sorted(unknown)}")
    report = {n: _entry(n, m, n in pretrained, init) for n, m in layers}
    lrns = (
        [(n, m) for n, m in model.named_modules() if isinstance(m, _LRN)] if lrn == "fold" else []
    )
    lrn_report: dict[str, dict[str, Any]] = {
        n: {"name": n, "step": "lrn_fold", "k_before": float(m.k), "k_after": float(m.k)}
        for n, m in lrns
    }
    summary: dict[str, Any] | None = None
    was_training = model.training
    model.eval()
    try:
        _within_layer_(
            layers, forward, set(pretrained), report, lrns, lrn_report, init=init, bias=bias,
            fast=fast, pretrained_within=pretrained_within, mem_limit_mb=mem_limit_mb,
            generator=generator, eps=eps,
        )  # fmt: skip
        if between_layer:
            summary = _between_layer_(
                layers, gradient_forward or forward, report, lrns, lrn_report,
                iterations=iterations, tolerance=tolerance, generator=generator,
            )  # fmt: skip
    finally:
        model.train(was_training)
    for n, m in lrns:
        lrn_report[n]["k_after"] = float(m.k)
    out = [report[n] for n in names] + list(lrn_report.values())
    return out + ([summary] if summary is not None else [])


def _entry(name: str, layer: nn.Module, pretrained: bool, init: str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": _kind(layer),
        "step": "pretrained" if pretrained else init,
        "within_scale": 1.0,
        "between_scale": 1.0,
        "bias_adjust": 1.0,
        "ratio_before": None,
        "ratio_after": None,
        "dead_channels": 0,
        "note": None,
    }


class _Hooks:
    """Forward pre-hooks on the layers (and LRNs), removed on exit; checks each ran once."""

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], fn: Callable, lrns=(), lrn_fn=None):
        self.layers, self.counts = layers, {n: 0 for n, _ in layers}
        self.handles = []
        for name, m in layers:

            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                self.counts[name] += 1
                if self.counts[name] > 1:
                    raise RuntimeError(f"layer {name!r} ran twice in one forward (shared weights)")
                with torch.no_grad():
                    fn(name, mod, args[0])

            self.handles.append(m.register_forward_pre_hook(hook))
        for name, m in lrns:

            def lhook(mod: nn.Module, args: tuple, name: str = name) -> None:
                with torch.no_grad():
                    lrn_fn(name, mod, args[0])

            self.handles.append(m.register_forward_pre_hook(lhook))

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        if exc[0] is None:
            missing = [n for n, c in self.counts.items() if c != 1]
            if missing:
                raise ValueError(f"layers that did not run in forward(): {missing}")


def _mean_abs(x: torch.Tensor) -> float:
    return float(x.detach().double().abs().mean())


def _within_layer_(
    layers, forward, pretrained, report, lrns, lrn_report, *, init, bias, fast,
    pretrained_within, mem_limit_mb, generator, eps,
) -> None:  # fmt: skip
    """One forward pass; each layer is initialised by a pre-hook on its actual input, i.e.
    with every layer below it already initialised (magicInitialize's order)."""
    original: dict[str, float] = {}
    scalar = pretrained_within == "scalar" and bool(pretrained)
    if scalar:  # input scales of the untouched network, to track biases of pretrained layers
        record = lambda n, m, x: original.__setitem__(n, _mean_abs(x))  # noqa: E731
        with _Hooks(layers, record, lrns, record):
            with torch.no_grad():
                forward()
    chain = {"intact": True}  # every layer run so far is pretrained: its function is kept

    def adjust(name: str, x: torch.Tensor) -> float:
        if not (scalar and chain["intact"]) or original.get(name, 0.0) <= 0:
            return 1.0
        return _mean_abs(x) / original[name]

    def layer_fn(name: str, layer: nn.Module, x: torch.Tensor) -> None:
        entry = report[name]
        if name in pretrained:
            if not scalar:
                return
            adj = adjust(name, x)
            if layer.bias is not None:
                layer.bias.mul_(adj)
            entry["bias_adjust"] *= adj
            _, sigma = _channel_stats(_apply(layer, x, layer.weight), isinstance(layer, nn.Linear))
            var = float((sigma**2).mean())
            alpha = 1.0 / math.sqrt(var) if var > eps**2 else 1.0
            layer.weight.mul_(alpha)
            if layer.bias is not None:
                layer.bias.mul_(alpha)
            entry["within_scale"] = alpha
            entry["step"] = "pretrained_scalar"
            return
        chain["intact"] = False
        if layer.bias is not None:
            layer.bias.zero_()
        entry["note"] = _draw_weights_(layer, x, init, fast, mem_limit_mb, generator)
        entry["within_scale"], entry["dead_channels"] = _normalise_(layer, x, bias, eps)
        if layer.bias is None:
            entry["note"] = "; ".join(filter(None, [entry["note"], "no bias: mean not set"]))

    def lrn_fn(name: str, m: nn.Module, x: torch.Tensor) -> None:
        adj = adjust(name, x)
        m.k = float(m.k) * adj**2

    with _Hooks(layers, layer_fn, lrns if scalar else (), lrn_fn):
        with torch.no_grad():
            forward()


def _ratios(outs: list[torch.Tensor], layers, generator) -> dict[str, float]:
    """ratio_k = sqrt(mean(dW^2) / mean(W^2)) for a N(0, 1) backward signal (l. 301-312)."""
    weights = [m.weight for _, m in layers]
    outs = [o for o in outs if o.requires_grad]  # e.g. integer or detached extras
    noise = [_randn(o.shape, generator, o) for o in outs]
    grads = torch.autograd.grad(outs, weights, grad_outputs=noise, allow_unused=True)
    ratios = {}
    for (name, _), w, g in zip(layers, weights, grads):
        r = (
            0.0
            if g is None
            else math.sqrt(float(g.double().pow(2).mean() / w.detach().double().pow(2).mean()))
        )
        if not r > 0 or not math.isfinite(r):
            raise ValueError(
                f"layer {name!r} gets no usable gradient from forward()'s output (ratio {r}): "
                "leave fixed or unused layers out of `layers`"
            )
        ratios[name] = r
    return ratios


def _converged(ratios: dict[str, float], output_std: float, tolerance: float) -> tuple[bool, float]:
    """(every |log ratio / log target - 1| < tolerance, log target), l. 319-324; target =
    geometric mean of the ratios * output_std^(1 / L). log target == 0: absolute test."""
    logs = np.log(list(ratios.values()))
    log_target = float(logs.mean()) + math.log(max(output_std, 1e-300)) / len(ratios)
    if log_target != 0:
        return bool(np.all(np.abs(logs / log_target - 1) < tolerance)), log_target
    return bool(np.all(np.abs(logs) < tolerance)), log_target


def _log_std(ratios: dict[str, float]) -> float:
    return float(np.std(np.log(list(ratios.values()))))


def _between_layer_(
    layers, forward, report, lrns, lrn_report, *, iterations, tolerance, generator
) -> dict[str, Any]:
    """`calibrateGradientRatio` (l. 259-360): the update of iteration i is applied by pre-hooks
    during the forward that also gives iteration i+1's gradients."""
    bottom: dict[str, float] = {}
    pending: dict[str, float] = {}
    warnings = 0

    def layer_fn(name: str, layer: nn.Module, x: torch.Tensor) -> None:
        current = _mean_abs(x)
        if name in pending:
            adj = current / bottom[name] if bottom[name] > 0 else 1.0  # l. 337-341
            scale = pending[name]  # l. 344-346
            layer.weight.mul_(scale)
            if layer.bias is not None:
                layer.bias.mul_(adj * scale)
            report[name]["between_scale"] *= scale
            report[name]["bias_adjust"] *= adj
        bottom[name] = current

    def lrn_fn(name: str, m: nn.Module, x: torch.Tensor) -> None:
        current = _mean_abs(x)
        if pending and bottom.get(name, 0.0) > 0:
            m.k = float(m.k) * (current / bottom[name]) ** 2
        bottom[name] = current

    def run() -> list[torch.Tensor]:
        with _Hooks(layers, layer_fn, lrns, lrn_fn):
            with torch.enable_grad():
                return _outputs(forward())

    params = [m.weight for _, m in layers] + [m.bias for _, m in layers if m.bias is not None]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        outs = run()
        if not outs[0].requires_grad:
            raise ValueError(
                "the between-layer step needs forward() to build an autograd graph: do not "
                "wrap it in torch.no_grad()"
            )
        first = outs[0].detach().double().clone()
        output_std = std_before = _output_std(outs[0])
        ratios = _ratios(outs, layers, generator)
        before, done = dict(ratios), 0

        def snapshot() -> dict[str, Any]:
            return {
                "params": [p.detach().clone() for p in params],
                "report": {n: dict(report[n]) for n, _ in layers},
                "k": {n: float(m.k) for n, m in lrns},
                "ratios": dict(ratios),
                "output_std": output_std,
                "out": outs[0].detach().double().clone(),
                "iteration": done,
            }

        best = snapshot()
        for _ in range(iterations):
            converged, log_target = _converged(ratios, output_std, tolerance)
            if converged:
                break
            pending.clear()
            pending.update(
                {n: math.sqrt(math.exp(math.log(r) - log_target)) for n, r in ratios.items()}
            )
            outs = run()
            pending.clear()
            done += 1
            new_std = _output_std(outs[0])
            if (
                abs(math.log(max(output_std, 1e-300)) - math.log(max(new_std, 1e-300)))
                > HOMOGENEITY_WARNING
            ):
                warnings += 1
            output_std = new_std
            ratios = _ratios(outs, layers, generator)
            if math.isfinite(new_std) and _log_std(ratios) < _log_std(best["ratios"]):
                best = snapshot()
        kept = done
        if not (math.isfinite(output_std) and _log_std(ratios) <= _log_std(best["ratios"])):
            # Diverged (e.g. FCN-8s: skip branches break the chain the update assumes):
            # keep the iteration whose ratios were most equal, not the reference's last one.
            with torch.no_grad():
                for p, v in zip(params, best["params"]):
                    p.copy_(v)
            for n, _ in layers:
                report[n].update(best["report"][n])
            for n, m in lrns:
                m.k = best["k"][n]
            ratios, output_std, kept = best["ratios"], best["output_std"], best["iteration"]
            outs = [best["out"]]
        last = outs[0].detach().double()
        converged, _ = _converged(ratios, output_std, tolerance)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    for name, _ in layers:
        report[name]["ratio_before"], report[name]["ratio_after"] = before[name], ratios[name]
    a = float((first * last).sum() / (first * first).sum().clamp_min(1e-300))
    residual = float((last - a * first).norm() / last.norm().clamp_min(1e-300))
    return {
        "name": "between_layer",
        "step": "summary",
        "iterations": done,
        "converged": converged,
        "output_std_before": std_before,
        "output_std_after": output_std,
        "ratio_log_std_before": _log_std(before),
        "ratio_log_std_after": _log_std(ratios),
        "output_scale": a,
        "output_residual": residual,
        "warnings": warnings,
        "kept_iteration": kept,
    }


def lrn_k(model: nn.Module) -> dict[str, float]:
    """{module name: k} of every LocalResponseNorm (subclasses included, e.g. the encoder's
    CaffeLRN): what lrn="fold" changes. k is not in the state dict: save this next to it."""
    return {n: float(m.k) for n, m in model.named_modules() if isinstance(m, _LRN)}


def set_lrn_k_(model: nn.Module, ks: dict[str, float]) -> None:
    """Restore `lrn_k` values (e.g. after rebuilding a folded model from its state dict)."""
    modules = dict(model.named_modules())
    for name, k in ks.items():
        if not isinstance(modules.get(name), _LRN):
            raise KeyError(f"{name!r} is not a LocalResponseNorm of the model")
        modules[name].k = float(k)


def format_report(report: list[dict[str, Any]]) -> str:
    """One log line: 'conv1 gaussian x0.52 | x1.3 ...; between-layer: 4 iterations ...'."""
    parts, tail = [], ""
    for e in report:
        if e["step"] == "summary":
            tail = (
                f"; between-layer: {e['iterations']} iterations, log-ratio std "
                f"{e['ratio_log_std_before']:.3g} -> {e['ratio_log_std_after']:.3g}, output std "
                f"{e['output_std_before']:.3g} -> {e['output_std_after']:.3g}"
            )
            if e.get("kept_iteration", e["iterations"]) != e["iterations"]:
                tail += f" (diverged: kept iteration {e['kept_iteration']})"
        elif e["step"] == "lrn_fold":
            parts.append(f"{e['name']} LRN k {e['k_before']:.3g} -> {e['k_after']:.3g}")
        else:
            parts.append(
                f"{e['name']} {e['step']} x{e['within_scale']:.3g} | x{e['between_scale']:.3g}"
            )
    return ", ".join(parts) + tail


# ---------------------------------------------------------------- the transfer tasks' entry


def rescale_for_transfer_(
    model: nn.Module,
    forward: Callable[[], Any],
    prefix: str,
    pretrained_encoder: bool,
    seed: int,
    exclude: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """`rescale: true` of the three transfer tasks: `magic_init_` with the reference's
    defaults (gaussian within-layer draw of the new layers, bias 0.1, between-layer
    calibration of every layer) on all learned Conv/Linear layers of `model` that require a
    gradient, in forward order, minus `exclude` (layers whose own initialisation the protocol
    keeps, e.g. Fast R-CNN's output layers). Layers under `prefix` (the encoder) are the
    pretrained ones unless the encoder is the random baseline. Deterministic per seed."""
    layers = [
        (n, m)
        for n, m in layers_in_forward_order(model, forward)
        if n not in exclude and all(p.requires_grad for p in m.parameters())
    ]
    pretrained = {n for n, _ in layers if n.startswith(prefix)} if pretrained_encoder else set()
    generator = torch.Generator().manual_seed(int(seed))
    return magic_init_(model, layers, forward, pretrained, generator=generator)
