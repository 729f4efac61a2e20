"""timm's Vision Transformer (ViT-S/16, ViT-B/16) as an encoder, tapped as DINO evaluates it.

The network is `timm.models.vision_transformer.VisionTransformer` itself with no
classifier (`num_classes=0`), so its state dict has exactly timm's keys (`cls_token`,
`pos_embed`, `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
mlp.fc2}.*`, `norm.*`) minus `head.*`; `forward` returns the [CLS] token after the final
LayerNorm, what timm's `head` (and a fine-tuned classifier) reads.

Taps, all read after the final LayerNorm (`norm`), as facebookresearch/dino evaluates:

- `cls`: the last block's [CLS] token (eval_knn.py: `model(x)` of DINO's ViT returns
  `norm(x)[:, 0]`), D values;
- `cls4`: the [CLS] tokens of the last 4 blocks, each through the final norm
  (`get_intermediate_layers(x, 4)`), concatenated earliest first (eval_linear.py,
  `n_last_blocks=4, avgpool_patchtokens=False`: ViT-S/16's linear evaluation), 4D values;
- `cls+avg`: the last block's [CLS] token and the mean of its patch tokens
  (`n_last_blocks=1, avgpool_patchtokens=True`: ViT-B/16's linear evaluation), 2D values,
  interleaved as DINO's code leaves them: it stacks the two D-vectors on a last axis and
  reshapes, giving [cls_0, avg_0, cls_1, avg_1, ...].

eval_linear.py's help: "We use n=4 when evaluating ViT-Small and n=1 with ViT-Base", so
`default_taps` is (`cls4`,) below ViT-B's width (768) and (`cls+avg`,) from it on.
Importing this module imports timm; `encoders.vit_module()` turns its absence into a
one-line error naming the `bench-ssl[vit]` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from .contract import (
    CONVENTIONS,
    TORCHVISION_INPUT,
    HeadInput,
    InputConvention,
    Tap,
    check_input,
    check_tap_names,
)

DINO_LINEAR = "DINO eval_linear.py (facebookresearch/dino), get_intermediate_layers"
DINO_KNN = "DINO eval_knn.py (facebookresearch/dino), the final norm's [CLS]"
LAST_BLOCKS = 4  # n_last_blocks of ViT-S/16's linear evaluation
BASE_WIDTH = 768  # ViT-B's embedding width: from here on DINO's linear features are cls+avg


@dataclass(frozen=True)
class ViTConfig:
    """The constructor arguments that a checkpoint's shapes cannot all tell: `num_heads`
    (MoCo v3's ViT-S has 12 heads, timm's and DINO's 6) comes from the format or the user."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 16
    img_size: int = 224
    mlp_ratio: float = 4.0
    qkv_bias: bool = True


VIT_S16 = ViTConfig(384, 12, 6)
VIT_B16 = ViTConfig(768, 12, 12)
# timm's names; the head count does not change the name (MoCo v3's ViT-S is still a ViT-S).
NAMED: dict[tuple[int, int, int, int, float], str] = {
    (384, 12, 16, 224, 4.0): "vit_small_patch16_224",
    (768, 12, 16, 224, 4.0): "vit_base_patch16_224",
}


def vit_arch(c: ViTConfig) -> str:
    key = (c.embed_dim, c.depth, c.patch_size, c.img_size, float(c.mlp_ratio))
    return NAMED.get(key, f"vit-d{c.embed_dim}-l{c.depth}-p{c.patch_size}-{c.img_size}")


def vit_taps(c: ViTConfig) -> dict[str, Tap]:
    """The taps of a ViT of config `c` (no network needed: the card and docs use it)."""
    tokens = (c.img_size // c.patch_size) ** 2 + 1
    shape = (tokens, c.embed_dim)
    d = c.embed_dim
    taps = {"cls": Tap("cls", "last block, after the final norm", shape, "[CLS] token", d,
                       DINO_KNN)}  # fmt: skip
    if c.depth >= LAST_BLOCKS:
        taps["cls4"] = Tap(
            "cls4",
            f"blocks {c.depth - LAST_BLOCKS + 1}-{c.depth}, each after the final norm",
            shape,
            "[CLS] tokens concatenated, earliest first",
            LAST_BLOCKS * d,
            DINO_LINEAR + " n_last_blocks=4",
        )
    taps["cls+avg"] = Tap(
        "cls+avg", "last block, after the final norm", shape,
        "[CLS] token and mean patch token, interleaved as DINO reshapes them", 2 * d,
        DINO_LINEAR + " n_last_blocks=1, avgpool_patchtokens=True",
    )  # fmt: skip
    return taps


def default_vit_taps(c: ViTConfig) -> tuple[str, ...]:
    if c.embed_dim < BASE_WIDTH and c.depth >= LAST_BLOCKS:
        return ("cls4",)
    return ("cls+avg",)


class ViTEncoder(VisionTransformer):
    """timm's VisionTransformer with no head; see the module docstring."""

    family = "vit"
    knn_tap = "cls"

    def __init__(
        self, cfg: ViTConfig = VIT_S16, input_convention: InputConvention = TORCHVISION_INPUT
    ) -> None:
        super().__init__(
            img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias, num_classes=0,
        )  # fmt: skip
        self.cfg = cfg
        self.arch = vit_arch(cfg)
        self.input_size = cfg.img_size
        self.input_convention = input_convention
        self.taps = vit_taps(cfg)
        self.default_taps = default_vit_taps(cfg)
        self.head_input = HeadInput("[CLS] token after the final norm (timm's head input)",
                                    (cfg.embed_dim,))  # fmt: skip

    def config(self) -> dict[str, Any]:
        return {**asdict(self.cfg), "input_convention": self.input_convention.name}

    def extract(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """{tap: (N, dim)} in network order from one pass through the blocks."""
        names = check_tap_names(self, names)
        check_input(self, x)
        keep = LAST_BLOCKS if "cls4" in names else 1
        blocks = self.forward_intermediates(
            x,
            indices=keep,
            return_prefix_tokens=True,
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
        )  # [(patch tokens (N, L, D), prefix tokens (N, 1, D))], earliest block first
        patches, prefix = blocks[-1]
        out: dict[str, torch.Tensor] = {}
        for name in names:
            if name == "cls":
                out[name] = prefix[:, 0]
            elif name == "cls4":
                out[name] = torch.cat([p[:, 0] for _, p in blocks], dim=-1)
            else:  # cls+avg, in DINO's order: stack on a last axis, then flatten
                pair = torch.stack((prefix[:, 0], patches.mean(dim=1)), dim=-1)
                out[name] = pair.reshape(pair.shape[0], -1)
        return out


def vit_small(input_convention: InputConvention = TORCHVISION_INPUT) -> ViTEncoder:
    """ViT-S/16 at 224 (timm's vit_small_patch16_224: 384 wide, 12 blocks, 6 heads)."""
    return ViTEncoder(VIT_S16, input_convention)


def vit_base(input_convention: InputConvention = TORCHVISION_INPUT) -> ViTEncoder:
    """ViT-B/16 at 224 (timm's vit_base_patch16_224: 768 wide, 12 blocks, 12 heads)."""
    return ViTEncoder(VIT_B16, input_convention)


def from_config(config: dict[str, Any]) -> ViTEncoder:
    """Inverse of `ViTEncoder.config()` (a card's `config`)."""
    config = dict(config)
    convention = CONVENTIONS[config.pop("input_convention", TORCHVISION_INPUT.name)]
    return ViTEncoder(ViTConfig(**config), convention)
