"""The networks whose representations bench evaluates, behind one contract (`contract.py`).

`resnet.py` holds torchvision's bottleneck ResNet (ResNet-50), `vit.py` timm's ViT-S/16 and
ViT-B/16. timm is an optional extra (`pip install 'bench-ssl[vit]'`): `vit.py` is imported only
through `vit_module()`, so ResNet users never need it and ViT users get a one-line error
naming the extra instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from benchmark.errors import BenchError

from .contract import (
    CONVENTIONS,
    INCEPTION_INPUT,
    TORCHVISION_INPUT,
    Encoder,
    HeadInput,
    InputConvention,
    Tap,
    card_fields,
    check_encoder,
)
from .resnet import ResNetEncoder, resnet50

__all__ = [
    "ARCHS", "CONVENTIONS", "INCEPTION_INPUT", "TORCHVISION_INPUT", "Encoder", "HeadInput",
    "InputConvention", "ResNetEncoder", "Tap", "build", "card_fields", "check_encoder",
    "from_card", "resnet50", "vit_module",
]  # fmt: skip

VIT_EXTRA = "ViT encoders need timm, an optional extra: pip install 'bench-ssl[vit]'"
# The architectures `build` makes (randomly initialised: the "random" baseline rows).
ARCHS = ("resnet50", "vit_small_patch16_224", "vit_base_patch16_224")


def vit_module() -> ModuleType:
    """`encoders.vit`, or a one-line BenchError when timm is not installed."""
    try:
        from . import vit
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "timm":
            raise BenchError(VIT_EXTRA) from None
        raise
    return vit


def build(arch: str) -> Encoder:
    """A randomly initialised encoder of a named architecture (see `ARCHS`)."""
    if arch == "resnet50":
        return resnet50()
    if arch == "vit_small_patch16_224":
        return vit_module().vit_small()
    if arch == "vit_base_patch16_224":
        return vit_module().vit_base()
    raise BenchError(f"arch: unknown encoder {arch!r} (choose from {', '.join(ARCHS)})")


def from_card(card: Mapping[str, Any]) -> Encoder:
    """The (randomly initialised) network a model card describes (`card_fields`' family and
    config), ready for the weights saved beside the card."""
    family, config = card.get("family"), card.get("config")
    if not isinstance(config, Mapping):
        raise BenchError(f"model card: family {family!r} without a 'config' mapping")
    try:
        if family == "resnet":
            return ResNetEncoder(**config)
        if family == "vit":
            return vit_module().from_config(dict(config))
    except (TypeError, KeyError) as exc:
        raise BenchError(
            f"model card: config {dict(config)} does not build a {family} ({exc})"
        ) from None
    raise BenchError(f"model card: unknown encoder family {family!r} (resnet, vit)")
