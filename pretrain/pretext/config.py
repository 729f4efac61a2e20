"""`bench pretrain --method relative-position|rotation|jigsaw` settings: one stage config per
method, holding its paper's values (`pretext:`, from pretrain/pretext/<method>.py, where each
default cites the paper or the authors' released code) and the shared loop (`train:`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from benchmark.loop import LoopConfig
from pretrain.pretext.jigsaw import JigsawConfig
from pretrain.pretext.relative_position import RelativePositionConfig
from pretrain.pretext.rotation import RotationConfig


@dataclass
class PretextModelConfig:
    arch: str = "caffenet"  # the encoder every method shares (encoders/alexnet.py)
    pool_free: bool = False


@dataclass
class PretextTrainConfig(LoopConfig):
    # None: the method's own schedule (`pretext.iterations`, or RotNet's epochs over the data)
    iterations: int | None = None  # type: ignore[assignment]
    sample_every: int = 1000  # PNG grids of patches with true and predicted labels
    checkpoint_every: int = 5000


@dataclass
class _PretextStage:
    EXPERIMENT_KEYS: ClassVar[frozenset[str]] = frozenset({"method"})

    name: str | None = None
    seed: int = 0
    data: str | None = None  # image folder; None = the embedded synthetic unlabelled pool
    device: str = "auto"
    on_bad_data: Literal["error", "skip"] = "error"
    model: PretextModelConfig = field(default_factory=PretextModelConfig)
    train: PretextTrainConfig = field(default_factory=PretextTrainConfig)


@dataclass
class RelativePositionStageConfig(_PretextStage):
    method: Literal["relative-position"] = "relative-position"
    pretext: RelativePositionConfig = field(default_factory=RelativePositionConfig)


@dataclass
class RotationStageConfig(_PretextStage):
    method: Literal["rotation"] = "rotation"
    pretext: RotationConfig = field(default_factory=RotationConfig)


@dataclass
class JigsawStageConfig(_PretextStage):
    method: Literal["jigsaw"] = "jigsaw"
    pretext: JigsawConfig = field(default_factory=JigsawConfig)


STAGE_CONFIGS: dict[str, type] = {
    "relative-position": RelativePositionStageConfig,
    "rotation": RotationStageConfig,
    "jigsaw": JigsawStageConfig,
}
