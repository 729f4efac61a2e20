"""`bench pretrain` settings. Defaults are the paper's values (Sections 3-5.2); the released
code's values are named options (`mask: noise-region`, `loss.overlap: 4`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from benchmark.loop import LoopConfig

Method = Literal["context-encoder", "autoencoder", "random", "imagenet"]
MaskName = Literal["central", "random-block", "random-region", "noise-region"]

# Adam learning rates of Section 5.2: 1e-3 for central masks, 1e-4 for random regions.
PAPER_LR: dict[str, float] = {
    "central": 1e-3,
    "random-block": 1e-4,
    "random-region": 1e-4,
    "noise-region": 1e-4,
}


@dataclass
class ModelConfig:
    # caffenet: Caffe's CaffeNet, as the paper ran it; bvlc-alexnet (LRN before pooling),
    # alexnet-plain (no LRN, no groups: bench's network before issue 11), torchvision.
    arch: str = "caffenet"
    pool_free: bool = False  # the paper keeps pooling for every feature result
    input_size: int = 227


@dataclass
class TrainConfig(LoopConfig):
    iterations: int = 100_000  # "converges in about 100K iterations" (Section 5.2)
    batch_size: int = 64
    lr: float | None = None  # None: PAPER_LR of the mask (autoencoder: the central rate)
    beta1: float = 0.9  # Adam's default; the inpainting model of Section 5.1 uses 0.5
    sample_every: int = 1000  # PNG grids of input / masked input / prediction


@dataclass
class LossConfig:
    kind: Literal["l2", "l1"] = "l2"
    overlap: int = 0  # px of context also predicted (inpainting model: paper 7, code 4)
    overlap_weight: float = 10.0
    # The joint loss's 0.001 adversarial term diverged with AlexNet (Section 3.2), so
    # feature learning uses reconstruction only; set 0.001 to try the joint loss.
    adversarial_weight: float = 0.0


@dataclass
class PretrainConfig:
    # which of the paper's experiments a run is, not a departure from it (benchmark.protocol)
    EXPERIMENT_KEYS: ClassVar[frozenset[str]] = frozenset({"method"})

    name: str | None = None
    seed: int = 0
    data: str | None = None  # image folder; None = the embedded synthetic dataset
    on_bad_data: Literal["error", "skip"] = "error"  # an image `bench data check` flags
    device: str = "auto"
    method: Method = "context-encoder"
    mask: MaskName = "random-region"
    weights: str | None = None  # imagenet: a torchvision AlexNet state-dict file
    # VOC2012 folder whose segmentation shapes make random-region masks. None: the
    # synthetic VOC2012 when `data` is None too, else the noise-region fallback.
    shapes: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
