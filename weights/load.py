"""A foreign checkpoint -> an encoder with its weights, or a one-line error.

`import_checkpoint` reads the file without running its code (files.py), maps its keys
(keymap.py), builds the network the tensors describe (a torchvision bottleneck ResNet or a
timm ViT, sized from the shapes) and loads it through the guard. `key_map` / `show_keys`
do the first two steps only, for `--show-keys`.

What the shapes cannot tell is recorded in the card: a ViT's head count (timm's D / 64,
unless the format's writer builds its ViTs otherwise, MoCo v3's ViT-S has 12, or the caller
says), and the input convention (ImageNet mean/std unless the caller says: every format
listed here trains with it; timm's own supervised augreg ViTs use "inception").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmark.errors import BenchError, printable
from encoders import CONVENTIONS, TORCHVISION_INPUT, Encoder, card_fields, from_card

from .files import read_checkpoint
from .keymap import ENCODER, HEAD, OTHER, KeyMap, check_keys, few, format_key_map, map_keys

HEAD_WIDTH = 64  # timm's ViTs (and DINO's, MAE's, MMPretrain's DeiT) use 64-d heads
VIT_S16_FIELDS = {"embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16,
                  "img_size": 224, "mlp_ratio": 4.0, "qkv_bias": True}  # fmt: skip


@dataclass
class Imported:
    """An imported checkpoint: the loaded encoder (eval mode), its key map, its card."""

    encoder: Encoder
    keymap: KeyMap
    card: dict[str, Any]


def key_map(
    path: Path, family: str | None = None, fmt: str | None = None, branch: str | None = None
) -> KeyMap:
    """The key map of a checkpoint file (see keymap.map_keys)."""
    return map_keys(read_checkpoint(Path(path)), path, family, fmt, branch)


def show_keys(
    path: Path, family: str | None = None, fmt: str | None = None, branch: str | None = None
) -> str:
    """What `bench import --show-keys` prints for a file."""
    return format_key_map(key_map(path, family, fmt, branch))


def import_checkpoint(
    path: Path,
    family: str | None = None,
    fmt: str | None = None,
    branch: str | None = None,
    num_heads: int | None = None,
    input_convention: str | None = None,
    input_size: int = 224,
) -> Imported:
    """The encoder a checkpoint holds, loaded and checked (module docstring); the arguments
    after `branch` are `encoder_spec`'s."""
    return import_tree(read_checkpoint(Path(path)), path, family, fmt, branch, num_heads,
                       input_convention, input_size)  # fmt: skip


def import_tree(
    tree: Any,
    path: Path | str,
    family: str | None = None,
    fmt: str | None = None,
    branch: str | None = None,
    num_heads: int | None = None,
    input_convention: str | None = None,
    input_size: int = 224,
) -> Imported:
    """`import_checkpoint` of a file already read (`read_checkpoint`): a caller that looked
    inside the file first (is it an AlexNet?) does not read it twice."""
    km = map_keys(tree, path, family, fmt, branch)
    spec = encoder_spec(km, num_heads, input_convention, input_size)
    with torch.device("meta"):  # no random init: every tensor comes from the file
        encoder: Any = from_card(spec)
    encoder.load_state_dict(check_keys(km, encoder.state_dict()), assign=True)
    left = [
        name for name, t in [*encoder.named_parameters(), *encoder.named_buffers()] if t.is_meta
    ]
    if left:  # a tensor outside the state dict (a non-persistent buffer) would be garbage
        raise RuntimeError(f"{spec['family']} encoder: {few(left)} not set by its state dict")
    encoder.eval()
    counts = {"encoder": len(km.keys_of(ENCODER)), "head": len(km.keys_of(HEAD)),
              "not_encoder": len(km.keys_of(OTHER))}  # fmt: skip
    card = {**card_fields(encoder), "format": km.format.name, "source": str(path),
            "branch": km.branch, "keys": counts, **spec["notes"]}  # fmt: skip
    return Imported(encoder, km, card)


def encoder_spec(
    km: KeyMap,
    num_heads: int | None = None,
    input_convention: str | None = None,
    input_size: int = 224,
) -> dict[str, Any]:
    """{"family", "config", "notes"}: the network the mapped tensors describe, in the form
    `encoders.from_card` builds. No network is built and no tensor read beyond its shape.

    num_heads: a ViT's attention heads where neither timm's rule nor the format knows them;
    input_convention: "torchvision" (default) or "inception" (a ViT's; ResNets are all
    torchvision's); input_size: the ResNet's input side the taps are pooled for (a ViT's
    comes from its position embedding).
    """
    convention = input_convention or TORCHVISION_INPUT.name
    if convention not in CONVENTIONS:
        raise BenchError(f"input_convention: {convention!r} is not one of "
                         f"{', '.join(CONVENTIONS)}")  # fmt: skip
    state = km.state()
    if km.family == "resnet":
        layers, width = _resnet_shape(state, km.where)
        config = {"layers": list(layers), "width_per_group": width, "input_size": input_size}
        return {"family": "resnet", "config": config, "notes": {}}
    config, origin = _vit_config(state, km, num_heads)
    config["input_convention"] = convention
    return {"family": "vit", "config": config, "notes": {"num_heads_from": origin}}


def _blocks(state: Mapping[str, Any], stem: str) -> int:
    """How many blocks `stem.N.*` keys number (0 when there are none)."""
    pattern = re.compile(rf"^{re.escape(stem)}\.(\d+)\.")
    found = [int(m[1]) for k in state if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    value = state.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _resnet_shape(state: Mapping[str, Any], where: str) -> tuple[tuple[int, ...], int]:
    """(blocks per stage, width_per_group) from the tensors. Keys the shapes need but the
    file lacks fall back to ResNet-50's, and the guard then names them as missing."""
    layers = tuple(_blocks(state, f"layer{n}") or d for n, d in zip(range(1, 5), (3, 4, 6, 3)))
    if "layer1.0.conv1.weight" in state and "layer1.0.conv3.weight" not in state:
        raise BenchError(f"{where}: a ResNet of basic blocks (ResNet-18/34); bench's ResNet "
                         "encoder is the bottleneck ResNet (ResNet-50, -101, -152)")  # fmt: skip
    inner = _shape(state, "layer1.0.conv1.weight")
    return layers, inner[0] if inner else 64


def _vit_config(
    state: Mapping[str, Any], km: KeyMap, num_heads: int | None
) -> tuple[dict[str, Any], str]:
    """(ViTConfig fields, where num_heads came from) from the tensors' shapes; ViT-S/16's
    where the shapes are missing (the guard then names the missing keys)."""
    cls, patch = _shape(state, "cls_token"), _shape(state, "patch_embed.proj.weight")
    pos, fc1 = _shape(state, "pos_embed"), _shape(state, "blocks.0.mlp.fc1.weight")
    if cls is None or patch is None or pos is None or fc1 is None:
        return dict(VIT_S16_FIELDS), "default"
    width, side = cls[-1], patch[-1]
    grid = round((pos[1] - 1) ** 0.5)
    if grid * grid != pos[1] - 1:
        raise BenchError(f"{km.where}: pos_embed has {pos[1]} tokens, not a square grid of "
                         "patches plus [CLS]")  # fmt: skip
    if num_heads is not None:
        heads, origin = num_heads, "given"
    elif width in km.format.vit_heads:
        heads, origin = km.format.vit_heads[width], f"{km.format.name} writer"
    elif width % HEAD_WIDTH == 0:
        heads, origin = width // HEAD_WIDTH, "timm (width / 64)"
    else:
        raise BenchError(f"{km.where}: a ViT {width} wide: pass num_heads (its attention "
                         "heads cannot be read from the tensors)")  # fmt: skip
    if heads < 1 or width % heads:
        raise BenchError(f"num_heads: {heads} does not divide the ViT's width {width}")
    config = {
        "embed_dim": width, "depth": _blocks(state, "blocks"), "num_heads": heads,
        "patch_size": side, "img_size": grid * side, "mlp_ratio": fc1[0] / width,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
    }  # fmt: skip
    return config, origin


def describe(imported: Imported) -> str:
    """One line for logs: what was imported from where."""
    card = imported.card
    return (f"{printable(card['source'])}: {card['format']} -> {card['arch']} "
            f"({card['keys']['encoder']} tensors; dropped {card['keys']['head']} head, "
            f"{card['keys']['not_encoder']} other)")  # fmt: skip
