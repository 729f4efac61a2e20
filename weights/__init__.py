"""Encoder weights in the layouts other tools write, read without running their code.

- files.py: a checkpoint file -> plain containers of tensors (torch weights-only, safetensors,
  restricted unpickler);
- formats.py: the layouts (torchvision, timm, MoCo v1/v2/v3, DINO, SwAV, BYOL-style
  prefixes, VISSL, MMSelfSup/MMPretrain, solo-learn, lightly, MAE, detectron2) as data;
- renames.py: other tools' layer names -> torchvision's / timm's;
- keymap.py: a layout applied to a file (printable rows) and the guard on the result;
- load.py: the file -> a loaded encoder and its card.
"""

from __future__ import annotations

from .files import read_checkpoint
from .formats import FORMATS, Format, get_format
from .keymap import KeyMap, KeyRow, check_keys, describe_format, format_key_map, map_keys
from .load import (
    Imported,
    describe,
    encoder_spec,
    import_checkpoint,
    import_tree,
    key_map,
    show_keys,
)

__all__ = [
    "FORMATS", "Format", "Imported", "KeyMap", "KeyRow", "check_keys", "describe",
    "describe_format", "encoder_spec", "format_key_map", "get_format", "import_checkpoint",
    "import_tree", "key_map", "map_keys", "read_checkpoint", "show_keys",
]  # fmt: skip
