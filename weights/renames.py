"""Key renames from other tools' layer names to torchvision's (ResNet) and timm's (ViT).

Each table is a list of (regex, replacement) applied in order to a key that has already
lost its format's prefix; a rule that does not match leaves the key as it is, and a key
that no table turns into a canonical one is caught by the guard (`keymap.check_keys`).
Tables are data so that `--show-keys` can print the rules as well as their results.
"""

from __future__ import annotations

import re

Rules = tuple[tuple[str, str], ...]

# `nn.Sequential(*list(resnet.children())[:-1])` (lightly, sthalles/PyTorch-BYOL): the
# children of torchvision's ResNet in order are conv1, bn1, relu, maxpool, layer1..layer4,
# avgpool, fc; only 0, 1 and 4-7 hold tensors.
SEQUENTIAL_RESNET: Rules = (
    (r"^0\.", "conv1."),
    (r"^1\.", "bn1."),
    (r"^4\.", "layer1."),
    (r"^5\.", "layer2."),
    (r"^6\.", "layer3."),
    (r"^7\.", "layer4."),
    (r"^9\.", "fc."),
)

# The inverse of MoCo's detection/convert-pretrain-to-detectron2.py, which writes
# "stem." before every non-layer key, layerN -> res(N+1), bnK -> convK.norm,
# downsample.0 -> shortcut and downsample.1 -> shortcut.norm.
DETECTRON2_RESNET: Rules = (
    (r"^stem\.", ""),
    (r"^res2\.", "layer1."),
    (r"^res3\.", "layer2."),
    (r"^res4\.", "layer3."),
    (r"^res5\.", "layer4."),
    (r"\.shortcut\.norm\.", ".downsample.1."),
    (r"\.shortcut\.", ".downsample.0."),
    (r"(^|\.)conv([123])\.norm\.", r"\1bn\2."),
)

# MMPretrain's VisionTransformer (mmpretrain/models/backbones/vision_transformer.py) ->
# timm's: patch_embed.projection, layers.N.{ln1, attn, ln2, ffn.layers.0.0, ffn.layers.1},
# the final norm ln1, and ln2 (after average pooling, out_type='avg_featmap': timm's fc_norm).
MMPRETRAIN_VIT: Rules = (
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.attn\.", r"blocks.\1.attn."),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
    (r"^ln1\.", "norm."),
    (r"^ln2\.", "fc_norm."),
)

TABLES: dict[str, Rules] = {
    "sequential-resnet": SEQUENTIAL_RESNET,
    "detectron2-resnet": DETECTRON2_RESNET,
    "mmpretrain-vit": MMPRETRAIN_VIT,
}
_COMPILED = {name: tuple((re.compile(p), r) for p, r in rules) for name, rules in TABLES.items()}


def rename(key: str, table: str) -> str:
    """`key` through every rule of `table`, in order."""
    for pattern, replacement in _COMPILED[table]:
        key = pattern.sub(replacement, key, count=1)
    return key
