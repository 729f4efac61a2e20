"""The checkpoint layouts people bring, as data: where the encoder's keys sit in each.

A `Format` says where the state dict lies in the file (`containers`), under which key
prefix the encoder is (`prefixes`, most specific first), which other keys are the method's
head (`heads`: projectors, predictors, prototypes, classifiers, decoders) or training state
that is not the encoder (`others`: momentum / target copies, queues), and which rename
table (renames.py) turns the remaining names into torchvision's or timm's. Every key of the
state dict must fall in one of those groups; `keymap.map_keys` applies a format and
`detect` picks one from the file's structure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmark.errors import BenchError

FAMILIES = ("resnet", "vit")
# The family's own classifier inside the encoder's prefix: torchvision's `fc`, timm's
# `head` (and `fc_norm`, the norm timm applies after average pooling, on the head's side
# of `forward_head`). MoCo v2 / v3 replace these by their projection MLPs.
FAMILY_HEADS: dict[str, tuple[str, ...]] = {"resnet": ("fc.",), "vit": ("head.", "fc_norm.")}
# A key that only this family's encoder has, after renaming: it tells the family and the
# prefix apart (a ViT has no conv1, a ResNet no patch_embed).
FAMILY_MARKERS: dict[str, str] = {"resnet": "conv1.weight", "vit": "patch_embed.proj.weight"}
FAMILY_NAMES = {"resnet": "ResNet", "vit": "ViT"}


@dataclass(frozen=True)
class Format:
    """One checkpoint layout (see the module docstring)."""

    name: str
    about: str
    prefixes: tuple[str, ...]
    containers: tuple[str, ...] = ("",)  # dotted paths into the file; "" = the file itself
    heads: tuple[str, ...] = ()
    others: tuple[str, ...] = ()
    renames: Mapping[str, str] = field(default_factory=dict)  # family -> renames.TABLES key
    families: tuple[str, ...] = FAMILIES
    markers: tuple[str, ...] = ()  # a state-dict key starting with one identifies the format
    top_markers: tuple[str, ...] = ()  # top-level keys that must all be present to identify it
    branches: tuple[str, ...] = ()  # networks the file holds (first: the default), each a container
    vit_heads: Mapping[int, int] = field(default_factory=dict)  # width -> heads, writer's own


FORMATS: tuple[Format, ...] = (
    Format(
        "vissl",
        "VISSL checkpoints: classy_state_dict.base_model.model {trunk, heads}, and "
        "exports flattened to trunk._feature_blocks.* / _feature_blocks.*",
        prefixes=("trunk._feature_blocks.", "trunk.", "_feature_blocks."),
        containers=("classy_state_dict.base_model.model", "model", ""),
        heads=("heads.",),
        markers=("trunk.", "_feature_blocks."),
    ),
    Format(
        "dino",
        "DINO training checkpoints {student, teacher, ...} (teacher by default, as "
        "DINO's own evaluation); DINO's released backbones are plain torchvision / timm files",
        prefixes=("module.backbone.", "backbone."),
        heads=("module.head.", "head."),
        top_markers=("student", "teacher"),
        branches=("teacher", "student"),
    ),
    Format(
        "detectron2",
        "detectron2 .pkl as MoCo's convert-pretrain-to-detectron2.py writes it "
        "({model: stem.*, resN.*}, numpy arrays)",
        prefixes=("",),
        containers=("model",),
        renames={"resnet": "detectron2-resnet"},
        families=("resnet",),
        markers=("stem.", "res2."),
    ),
    Format(
        "moco",
        "MoCo v1/v2 (facebookresearch/moco main_moco.py): state_dict "
        "module.encoder_q.* (fc.* = v1 fc or v2 MLP), module.encoder_k.*, queue",
        prefixes=("module.encoder_q.", "encoder_q."),
        containers=("state_dict", ""),
        others=("module.encoder_k.", "encoder_k.", "module.queue", "queue"),
        markers=("module.encoder_q.", "encoder_q."),
    ),
    Format(
        "mocov3",
        "MoCo v3 (facebookresearch/moco-v3): state_dict module.base_encoder.* "
        "(fc.* / head.* = projector), module.momentum_encoder.*, module.predictor.*",
        prefixes=("module.base_encoder.", "base_encoder."),
        containers=("state_dict", ""),
        heads=("module.predictor.", "predictor."),
        others=("module.momentum_encoder.", "momentum_encoder."),
        markers=("module.base_encoder.", "base_encoder."),
        vit_heads={384: 12, 768: 12, 1024: 16, 1280: 16},  # moco-v3 vits.py
    ),
    Format(
        "mae",
        "MAE pretraining checkpoints (facebookresearch/mae): model {encoder, "
        "mask_token, decoder_*}",
        prefixes=("",),
        containers=("model", ""),
        heads=("decoder_", "mask_token"),
        families=("vit",),
        markers=("decoder_", "mask_token"),
    ),
    Format(
        "mmpretrain",
        "MMSelfSup / MMPretrain: {meta, state_dict: backbone.*, neck.*, head.*} "
        "(ResNet keys as torchvision's; ViT keys renamed to timm's)",
        prefixes=("backbone.",),
        containers=("state_dict",),
        heads=("neck.", "head.", "target_generator."),
        others=("momentum_encoder.", "target_encoder.", "teacher.", "data_preprocessor.", "queue"),
        renames={"vit": "mmpretrain-vit"},
        markers=("backbone.",),
        top_markers=("meta",),
    ),  # fmt: skip
    Format(
        "solo-learn",
        "solo-learn Lightning checkpoints: state_dict backbone.* (encoder.* "
        "before v1), projector.*, classifier.*, predictor.*, momentum_*",
        prefixes=("backbone.", "encoder."),
        containers=("state_dict", ""),
        heads=("projector.", "classifier.", "predictor.", "prototypes.", "head."),
        others=("momentum_", "queue"),
        markers=("projector.", "classifier.", "momentum_backbone.", "momentum_encoder."),
    ),
    Format(
        "lightly",
        "lightly models: backbone.* as torchvision names or as nn.Sequential of "
        "the ResNet's children (backbone.0 conv1, .1 bn1, .4-.7 layer1-4)",
        prefixes=("backbone.",),
        containers=("state_dict", ""),
        heads=("projection_head.", "prediction_head.", "prototypes."),
        others=("backbone_momentum.", "projection_head_momentum."),
        renames={"resnet": "sequential-resnet"},
        markers=("projection_head.", "prediction_head.", "backbone_momentum.", "backbone.0."),
    ),
    Format(
        "swav",
        "SwAV (facebookresearch/swav): module.* (or unprefixed) torchvision keys, "
        "projection_head.*, prototypes.*",
        prefixes=("module.", ""),
        containers=("state_dict", ""),
        heads=("module.projection_head.", "projection_head.", "module.prototypes.", "prototypes."),
        markers=(
            "module.prototypes.",
            "prototypes.",
            "module.projection_head.",
            "projection_head.",
        ),
    ),  # fmt: skip
    Format(
        "prefixed",
        "BYOL conversions and other state dicts with the encoder under one known "
        "prefix: online_network.encoder. / encoder. (sthalles/PyTorch-BYOL), net. "
        "(lucidrains/byol-pytorch), backbone.",
        prefixes=("online_network.encoder.", "net.", "encoder.", "backbone."),
        containers=("online_network_state_dict", "state_dict", ""),
        heads=(
            "online_network.projection.",
            "online_network.projetion.",
            "projetion.",
            "projection.",
            "projector.",
            "online_encoder.projector.",
            "online_predictor.",
            "predictor.",
        ),
        others=("online_encoder.net.", "target_network.", "target_encoder."),
        renames={"resnet": "sequential-resnet"},
        markers=("online_network.encoder.", "net.", "encoder.", "backbone."),
    ),  # fmt: skip
    Format(
        "torchvision",
        "torchvision ResNet state dicts (torchvision's own, SimCLR conversions "
        "such as tonylins/simclr-converter, DINO's released ResNet-50), at the top or under "
        "state_dict / model, module. allowed; fc.* is the head",
        prefixes=("module.", ""),
        containers=("state_dict", "model", ""),
        families=("resnet",),
    ),
    Format(
        "timm",
        "timm ViT state dicts (timm's own, DINO's released ViTs, MAE exports), at the "
        "top or under state_dict / model, module. allowed; head.* and fc_norm.* are the head",
        prefixes=("module.", ""),
        containers=("state_dict", "model", ""),
        families=("vit",),
    ),
)
BY_NAME: dict[str, Format] = {f.name: f for f in FORMATS}


def get_format(name: str) -> Format:
    if name not in BY_NAME:
        raise BenchError(f"--format: unknown checkpoint format {name!r} "
                         f"(choose from {', '.join(BY_NAME)})")  # fmt: skip
    return BY_NAME[name]


def _at(tree: Any, dotted: str) -> Any:
    node = tree
    for part in dotted.split(".") if dotted else ():
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _has_tensors(node: Any) -> bool:
    return isinstance(node, Mapping) and any(
        isinstance(v, torch.Tensor) or _has_tensors(v) for v in node.values()
    )


def container(tree: Any, fmt: Format, branch: str | None = None) -> tuple[str, Mapping] | None:
    """(path, mapping) of the first of `fmt`'s containers present in `tree` that holds
    tensors; for a format with branches, the branch's container (default: the first)."""
    paths = (branch or fmt.branches[0],) if fmt.branches else fmt.containers
    for path in paths:
        node = _at(tree, path)
        if _has_tensors(node):
            return path, node
    return None


def flatten(node: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {dotted key: leaf} (VISSL nests trunk / heads; most are flat)."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def matches(tree: Any, fmt: Format) -> bool:
    """Whether the file's structure identifies `fmt` (formats without markers never do:
    they are the fallbacks tried last)."""
    if not isinstance(tree, Mapping):
        return False
    if fmt.top_markers and not all(k in tree for k in fmt.top_markers):
        return False
    found = container(tree, fmt)
    if found is None:
        return False
    if fmt.top_markers and not fmt.markers:
        return True
    keys = flatten(found[1])
    return bool(fmt.markers) and any(k.startswith(fmt.markers) for k in keys)


def candidates(tree: Any) -> list[Format]:
    """Formats to try, in order: those whose markers the file carries, then the plain
    torchvision and timm layouts."""
    marked = [f for f in FORMATS if (f.markers or f.top_markers) and matches(tree, f)]
    plain = [f for f in FORMATS if not (f.markers or f.top_markers)]
    return marked + plain
