"""Which network family `--weights` (or the random baseline's `arch`) holds, and the
ResNet encoder of a checkpoint, for the stages whose model depends on the family
(detection: Fast R-CNN for AlexNet, Faster R-CNN R50-C4 for ResNet; segmentation: FCN on
AlexNet, FCN on a dilated ResNet-50).

The family is read before the encoder is built, so that a stage can choose its model (and
refuse a family) before its run folder exists; the encoder itself is loaded by
`weights.encoder.load_encoder`, which reads every format bench imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from benchmark.errors import BenchError
from encoders import ResNetEncoder
from weights.encoder import peek_card, resolve_weights_path

Family = Literal["alexnet", "resnet", "vit"]


def family_of(weights: str | Path | None, arch: str) -> Family:
    """The family: "resnet" / "vit" for those encoders, "alexnet" for anything else (its
    loader reports a bad file in its own words). Reads at most the tensors' names."""
    if weights is None or str(weights) == "":
        return "resnet" if arch.startswith("resnet") else "vit" if arch.startswith("vit") else (
            "alexnet")  # fmt: skip
    card = peek_card(weights)
    if card.get("family") in ("resnet", "vit"):
        return card["family"]
    if "arch" in card:  # an AlexNet card (bench's own files)
        return "alexnet"
    from weights.load import key_map

    try:
        return key_map(resolve_weights_path(weights)).family  # type: ignore[return-value]
    except (BenchError, OSError):
        return "alexnet"


def load_resnet(weights: str | Path | None, arch: str, task: str) -> tuple[ResNetEncoder, dict]:
    """(encoder, card) of a ResNet checkpoint (`weights.encoder.load_encoder`, ResNets
    only), or torchvision's random init for no weights and arch resnet50; in train mode."""
    from weights.encoder import load_encoder

    encoder, card = load_encoder(weights, arch, families=("resnet",), task=task)
    encoder.train()
    return encoder, card


def keys_for_other_family(cfg: Any, own: str, resnet: bool, shared: set[str]) -> list[str]:
    """Keys changed from their defaults that the run's model never reads: AlexNet's keys
    for a ResNet run (everything outside `own.*` and `shared`), `own.*` for an AlexNet run.
    A setting silently left unused would report a run that did not happen as asked."""
    from benchmark.config import flatten, to_dict

    ours, default = flatten(to_dict(cfg)), flatten(to_dict(type(cfg)()))
    changed = [k for k, v in ours.items() if default.get(k) != v]
    if resnet:
        return [k for k in changed if k.split(".")[0] not in shared | {own}]
    return [k for k in changed if k.split(".")[0] == own]


def refuse_other_family_keys(cfg: Any, own: str, resnet: bool, shared: set[str]) -> None:
    """One-line ConfigError naming the first key the chosen model does not read."""
    from benchmark.errors import ConfigError

    unused = keys_for_other_family(cfg, own, resnet, shared)
    if not unused:
        return
    if resnet:
        raise ConfigError(f"{unused[0]}: applies to AlexNet encoders; a ResNet encoder runs "
                          f"the settings under {own}: (e.g. {own}.train.iterations)")  # fmt: skip
    raise ConfigError(f"{unused[0]}: applies to ResNet encoders; an AlexNet encoder runs the "
                      "top-level settings")  # fmt: skip
