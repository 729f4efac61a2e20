"""What every encoder offers the probes, the classifier and the model card.

An encoder is an `nn.Module` whose own `state_dict()` uses the canonical key names of its
family (torchvision's ResNet keys without `fc.*`, timm's ViT keys without `head.*`,
`features.N.*` for AlexNet), so that weights move between files and networks by name.
Beyond `forward(x)`, which returns what a classification head is fine-tuned from, it
exposes:

- `family` / `arch`: e.g. "resnet" / "resnet50", "vit" / "vit_small_patch16_224";
- `taps`: the named layers a probe can read, each with the pooling that turns the layer
  into one vector per image and that vector's size (`Tap`), in network order;
- `extract(x, names)`: {name: (N, D) features} for a batch in one forward pass;
- `default_taps` / `knn_tap`: the layers the reference protocols read (Goyal et al.'s SVM
  layers, DINO's linear and k-NN features);
- `head_input`: what `forward` returns and its shape (`HeadInput`);
- `input_convention` and `input_size`: how images must be prepared (`InputConvention`, from
  `benchmark.input_convention`, the one place that knows the conventions);
- `config()`: the JSON-able constructor arguments, so a card can rebuild the network.

This is a Protocol rather than a base class: AlexNet's encoder predates it and only needs
the attributes added, and a check (`check_encoder`) says whether a module keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any, Protocol, runtime_checkable

import torch

from benchmark.errors import BenchError
from benchmark.input_convention import INCEPTION, TORCHVISION, InputConvention

# The conventions these families are trained with: torchvision's ImageNet statistics, as
# torchvision, timm (its `IMAGENET_DEFAULT_*`), MoCo, DINO, SwAV, VISSL and MMPretrain all
# train their ResNets and ViTs; timm's inception statistics for its own supervised ViTs.
TORCHVISION_INPUT = TORCHVISION
INCEPTION_INPUT = INCEPTION
CONVENTIONS: dict[str, InputConvention] = {c.name: c for c in (TORCHVISION_INPUT, INCEPTION_INPUT)}


@dataclass(frozen=True)
class Tap:
    """One layer a probe can read, as a vector per image.

    reads: where in the network (e.g. "layer1 output, after the last block's ReLU");
    shape: the layer's shape at the encoder's input size, before pooling ((C, H, W) for a
    feature map, (tokens, D) for a transformer); pooling: how it becomes a vector; dim: the
    vector's size; source: the reference that defines this tap.
    """

    name: str
    reads: str
    shape: tuple[int, ...]
    pooling: str
    dim: int
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {"reads": self.reads, "shape": list(self.shape), "pooling": self.pooling,
                "dim": self.dim, "source": self.source}  # fmt: skip


@dataclass(frozen=True)
class HeadInput:
    """What a classification head is fine-tuned from: `forward(x)` has shape (N, *shape)."""

    reads: str
    shape: tuple[int, ...]

    @property
    def dim(self) -> int:
        return prod(self.shape)


@runtime_checkable
class Encoder(Protocol):
    """The contract (see the module docstring); implementations are `nn.Module`s."""

    family: str
    arch: str
    input_convention: InputConvention
    input_size: int
    taps: Mapping[str, Tap]
    default_taps: tuple[str, ...]
    knn_tap: str
    head_input: HeadInput

    def extract(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...


def check_tap_names(encoder: Encoder, names: Sequence[str]) -> tuple[str, ...]:
    """`names` in network order; an unknown or repeated name is a one-line error."""
    unknown = [n for n in names if n not in encoder.taps]
    if unknown or not names:
        choices = ", ".join(encoder.taps)
        what = f"unknown layer {unknown[0]!r}" if unknown else "no layer named"
        raise BenchError(f"{encoder.arch}: {what} (choose from {choices})")
    if len(set(names)) != len(names):
        raise BenchError(f"{encoder.arch}: a layer is named twice ({', '.join(names)})")
    order = list(encoder.taps)
    return tuple(sorted(names, key=order.index))


def check_input(encoder: Encoder, x: torch.Tensor) -> None:
    """The taps' pooling is defined for `input_size`: any other input would change dims."""
    side = encoder.input_size
    if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (side, side):
        raise BenchError(
            f"{encoder.arch}: input has shape {tuple(x.shape)}, expected (N, 3, {side}, {side})"
        )


def card_fields(encoder: Encoder) -> dict[str, Any]:
    """What a model card records about the network, enough to rebuild it (`config`)."""
    return {
        "family": encoder.family,
        "arch": encoder.arch,
        "config": encoder.config(),
        "input": encoder.input_convention.as_dict(),
        "input_size": encoder.input_size,
        "taps": {name: tap.as_dict() for name, tap in encoder.taps.items()},
        "default_taps": list(encoder.default_taps),
        "knn_tap": encoder.knn_tap,
        "head_input": {"reads": encoder.head_input.reads,
                       "shape": list(encoder.head_input.shape)},
    }  # fmt: skip


@torch.no_grad()
def check_encoder(encoder: Encoder, batch: int = 2) -> None:
    """Raise AssertionError where `encoder` breaks the contract: every tap's vector has the
    size its `Tap` claims, `default_taps` and `knn_tap` exist, `forward` has the head's
    shape. One forward pass per call at `input_size`; for tests and new implementations."""
    assert isinstance(encoder, Encoder), f"{type(encoder).__name__} lacks the Encoder attributes"
    assert isinstance(encoder, torch.nn.Module), "an encoder is an nn.Module"
    assert set(encoder.default_taps) <= set(encoder.taps), "default_taps names unknown taps"
    assert encoder.knn_tap in encoder.taps, "knn_tap names an unknown tap"
    was_training = encoder.training
    encoder.eval()
    try:
        x = torch.zeros(batch, 3, encoder.input_size, encoder.input_size)
        out = encoder.extract(x, list(encoder.taps))
        assert list(out) == list(encoder.taps), "extract returns the taps in network order"
        for name, tap in encoder.taps.items():
            assert tuple(out[name].shape) == (batch, tap.dim), (
                f"tap {name}: extract gives {tuple(out[name].shape)}, Tap says {tap.dim}"
            )
        head = encoder(x)
        assert tuple(head.shape) == (batch, *encoder.head_input.shape), "forward shape"
    finally:
        encoder.train(was_training)
