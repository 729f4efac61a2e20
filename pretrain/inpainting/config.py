"""`bench pretrain --method inpainting` settings: the 128-px inpainting context encoder of
Section 5.1, with the paper's values as defaults (PROTOCOL.md "Inpainting context encoder")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from benchmark.loop import LoopConfig
from pretrain.inpainting.data import LOAD_SIZE
from pretrain.inpainting.model import BOTTLENECK, HoleGeometry, HoleMode
from pretrain.losses import ADV_WEIGHT, OVERLAP_PAPER, OVERLAP_WEIGHT, REC_WEIGHT

LossKind = Literal["l2", "adversarial", "joint"]
HoleName = Literal["central", "random-region", "noise-region"]


@dataclass
class InpaintLossConfig:
    kind: LossKind = "joint"  # Table 1's context encoder row
    overlap: int = OVERLAP_PAPER  # px of context also predicted (released code: 4)
    overlap_weight: float = OVERLAP_WEIGHT
    rec_weight: float = REC_WEIGHT  # joint: 0.999 L2 + 0.001 adversarial
    adv_weight: float = ADV_WEIGHT


@dataclass
class InpaintTrainConfig(LoopConfig):
    # Not stated for the inpainting model; the paper's "about 100K iterations" of Section 5.2.
    iterations: int = 100_000
    batch_size: int = 64
    lr_g: float = 2e-3  # 10x the discriminator's (Section 5.1)
    lr_d: float = 2e-4
    beta1: float = 0.5
    load_size: int = LOAD_SIZE  # shorter side before the random 128 crop (0: no resize)
    workers: int = 2
    sample_every: int = 1000
    # As in every stage, NHWC activations on CPU too (`loop.nhwc`); oneDNN's BatchNorm
    # backward then sums in another order (gradients ~3e-3 relative from float64, NCHW ~2e-4).
    channels_last: bool = True
    fused_discriminator: bool = False  # one D batch for real+fake: changes BatchNorm stats


@dataclass
class InpaintingConfig:
    # which of the paper's experiments a run is, not a departure from it (benchmark.protocol)
    EXPERIMENT_KEYS: ClassVar[frozenset[str]] = frozenset({"method", "loss.kind"})

    name: str | None = None
    seed: int = 0
    data: str | None = None  # image folder; None = the embedded synthetic unlabelled pool
    on_bad_data: Literal["error", "skip"] = "error"  # an image `bench data check` flags
    device: str = "auto"
    method: Literal["inpainting"] = "inpainting"
    mask: HoleName = "central"  # random-region / noise-region: random holes in the hole box
    # Where the hole and the predicted patch lie (`model.HoleGeometry`). "code": the
    # released code's, a 64x64 prediction whose inner (64 - 2 overlap)^2 is the hole
    # (pathak22/context-encoder train.lua L282-285, L380-389; the public PyTorch port);
    # "paper": a 64x64 hole and a (64 + 2 overlap)^2 prediction overlapping the context by
    # `loss.overlap` px ("we predict a slightly larger patch that overlaps the context by
    # 7px", Sections 3.2 and 5.1). Either way the overlap ring weighs loss.overlap_weight.
    hole: HoleMode = "code"
    # VOC2012 folder for random-region (None: the synthetic VOC2012 when `data` is None too;
    # with a user's image folder it must be given)
    shapes: str | None = None
    bottleneck: int = BOTTLENECK  # the paper's 4000-d code; smaller only for quick tests
    loss: InpaintLossConfig = field(default_factory=InpaintLossConfig)
    train: InpaintTrainConfig = field(default_factory=InpaintTrainConfig)

    def geometry(self) -> HoleGeometry:
        """The hole and prediction boxes of this run (hole mode, loss.overlap)."""
        return HoleGeometry(self.hole, self.loss.overlap)
