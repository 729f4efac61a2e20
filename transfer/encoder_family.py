"""Which network family `--weights` (or the random baseline's `arch`) holds, and the
ResNet encoder of a checkpoint, for the stages whose model depends on the family
(detection: Fast R-CNN for AlexNet, Faster R-CNN R50-C4 for ResNet; segmentation: FCN on
AlexNet, FCN on a dilated ResNet-50).

AlexNet files (bench's runs and exports, torchvision AlexNet, Caffe) keep their loader
(`transfer.backbone.load_encoder`); ResNet checkpoints of any format `weights` reads
(torchvision, MoCo, DINO, SwAV, VISSL, MMSelfSup, detectron2 .pkl, ...) load through
`weights.import_checkpoint`, with its key guard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from benchmark.errors import BenchError
from encoders import ResNetEncoder, resnet50
from transfer.backbone import peek_card, resolve_weights_path

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


def load_resnet(weights: str | Path | None, arch: str = "resnet50") -> tuple[ResNetEncoder, dict]:
    """(encoder, card) of a ResNet checkpoint, or torchvision's random init (arch resnet50)
    for no weights. The card says what a metrics.json needs (method, arch, conventions)."""
    if weights is None or str(weights) == "":
        if arch != "resnet50":
            raise BenchError(f"arch: {arch!r} has no random baseline here (resnet50)")
        encoder = resnet50()
        card: dict[str, Any] = {"method": "random", "arch": "resnet50", "family": "resnet",
                                "iterations": 0, "pretrain_seconds": 0.0}  # fmt: skip
    else:
        from weights.load import import_checkpoint

        path = resolve_weights_path(weights)
        imported = import_checkpoint(path, family="resnet")
        encoder = imported.encoder  # type: ignore[assignment]
        card = {**imported.card, "method": path.stem.split(".")[0], "imported": True}
    convention = encoder.input_convention.as_dict()
    card.update(input_convention=convention, input_convention_loaded=convention["name"])
    encoder.train()
    return encoder, card
