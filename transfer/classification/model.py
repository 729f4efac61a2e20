"""AlexNet for VOC classification: the transferred encoder up to pool5, new fc6-fc8.

Also the data-dependent initialisation of Krähenbühl et al. 2015 (`--rescale`), see
`data_dependent_init_`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.errors import ConfigError
from pretrain.alexnet import PIXEL_MEAN, PIXEL_STD, AlexNetEncoder

NUM_CLASSES = 20
HIDDEN = 4096

# Parameter-name prefixes that `train_from` freezes ("all" trains every layer; "pool5" trains
# fc6-fc8 on a fixed encoder; "fc7" trains fc8 only, a linear classifier on fc7 features).
FROZEN_PREFIXES: dict[str, tuple[str, ...]] = {
    "all": (),
    "pool5": ("encoder.",),
    "fc7": ("encoder.", "fc6.", "fc7."),
}


def pool5_size(encoder: AlexNetEncoder, crop: int) -> int:
    """Side of the pool5 map for a `crop` x `crop` input (6 for the protocol's 227)."""
    with torch.no_grad():
        try:
            out = encoder(torch.zeros(1, 3, crop, crop))
        except RuntimeError:
            raise ConfigError(f"augment.crop: {crop} is too small for the encoder") from None
    return int(out.shape[-1])


class ClassificationNet(nn.Module):
    """(B, 3, crop, crop) normalised images -> (B, 20) logits.

    encoder (conv1..pool5) -> fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8.
    At the protocol's 227 crop fc6 sees 256 * 6 * 6 = 9216 features; a smaller crop (demo
    runs) gives a smaller pool5 map and fc6 is sized to it.
    """

    def __init__(
        self,
        encoder: AlexNetEncoder,
        num_classes: int = NUM_CLASSES,
        crop: int = 227,
        dropout: float = 0.5,
        hidden: int = HIDDEN,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        side = pool5_size(encoder, crop)
        self.fc6 = nn.Linear(encoder.out_channels * side * side, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(dropout)
        reinit_head_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(x).flatten(1)
        x = self.dropout(F.relu(self.fc6(x)))
        x = self.dropout(F.relu(self.fc7(x)))
        return self.fc8(x)

    def head(self) -> list[nn.Linear]:
        return [self.fc6, self.fc7, self.fc8]


def reinit_head_(model: ClassificationNet, std: float = 0.01, bias: float = 0.1) -> None:
    """The protocol's fresh fc6-fc8: N(0, 0.01) weights, biases 0.1."""
    for layer in model.head():
        nn.init.normal_(layer.weight, 0.0, std)
        nn.init.constant_(layer.bias, bias)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (x / 255 - mean) / std, the input every stage feeds."""
    mean = torch.tensor(PIXEL_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def sigmoid_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Sum over kept (image, class) pairs of binary cross-entropy, divided by the batch size.

    logits, targets (B, C); keep (B, C) bool, False where the label is 'difficult' (ignored,
    contributes neither loss nor gradient). Normalised per image like Caffe's sigmoid loss
    in Krähenbühl et al.'s code.
    """
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return (loss * keep).sum() / logits.shape[0]


# ------------------------------------------------------------- data-dependent initialisation


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the measured layer has run."""


def _learned_layers(model: ClassificationNet) -> list[nn.Module]:
    """Convolutions (pool-free ones included) and fc layers, in forward order."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def _preactivation_stats(
    model: nn.Module, layer: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of `layer`'s output (before its ReLU) on `images`."""
    stats: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        # Read now: the encoder's in-place ReLU overwrites `out` right after this hook.
        dims = [0, 2, 3] if out.dim() == 4 else [0]
        z = out.double()
        stats["mean"], stats["var"] = z.mean(dims), z.var(dims, unbiased=False)
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    return stats["mean"], stats["var"]


@torch.no_grad()
def data_dependent_init_(
    model: ClassificationNet, images: torch.Tensor, pretrained_encoder: bool, eps: float = 1e-8
) -> list[tuple[str, float]]:
    """Krähenbühl et al. 2015 within-layer initialisation, layer by layer on a data batch.

    images: normalised (B, 3, crop, crop) training crops. Layers are visited in forward
    order, each measured with every earlier layer already adjusted:

    - a new layer (fc6-fc8; the encoder too when it is random) gets, for each output channel
      c with pre-activation mean mu_c and std sigma_c on the batch,
      W_c <- W_c / sigma_c and b_c <- (b_c - mu_c) / sigma_c: zero mean, unit variance;
    - a pretrained layer keeps its learned within-layer structure and only gets one scale:
      alpha = 1 / sqrt(mean_c var_c), the same for all its channels, so the average
      channel variance is 1 in every layer (equalised scale). Its bias is also multiplied by
      the product C of the scales of the pretrained layers before it, which keeps the
      encoder's function exactly: ReLU and max pooling are positively homogeneous, so each
      pretrained layer's output is C times the original one.

    Not implemented: the paper's between-layer adjustment (iteratively matching the ratio
    of gradient to weight norms across layers). Returns (layer, applied scale) pairs.
    """
    was_training = model.training
    model.eval()  # no dropout while measuring
    pretrained = {id(m) for m in model.encoder.modules()} if pretrained_encoder else set()
    names = {id(m): n for n, m in model.named_modules()}
    cumulative = 1.0
    applied: list[tuple[str, float]] = []
    for layer in _learned_layers(model):
        assert isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.bias is not None
        if id(layer) in pretrained:
            layer.bias.mul_(cumulative)
            _, var = _preactivation_stats(model, layer, images)
            sigma = math.sqrt(float(var.mean()))
            alpha = 1.0 / sigma if sigma > eps else 1.0
            layer.weight.mul_(alpha)
            layer.bias.mul_(alpha)
            cumulative *= alpha
            applied.append((names[id(layer)], alpha))
        else:
            mean, var = _preactivation_stats(model, layer, images)
            sigma = var.sqrt()
            sigma = torch.where(sigma > eps, sigma, torch.ones_like(sigma))
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            layer.weight.div_(sigma.view(shape).to(layer.weight.dtype))
            layer.bias.sub_(mean.to(layer.bias.dtype)).div_(sigma.to(layer.bias.dtype))
            cumulative = 1.0  # downstream inputs are no longer a rescaled original
            applied.append((names[id(layer)], float((1.0 / sigma).mean())))
    model.train(was_training)
    return applied
