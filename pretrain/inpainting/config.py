"""`bench pretrain --method inpainting` settings: the 128-px inpainting context encoder of
Section 5.1, with the paper's values as defaults (PROTOCOL.md "Inpainting context encoder")."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from benchmark.errors import ConfigError
from benchmark.loop import LoopConfig
from pretrain.inpainting.data import LOAD_SIZE
from pretrain.inpainting.model import BOTTLENECK, OVERLAPS, HoleGeometry, HoleMode
from pretrain.losses import ADV_WEIGHT, OVERLAP_WEIGHT, REC_WEIGHT

LossKind = Literal["l2", "adversarial", "joint"]
HoleName = Literal["central", "random-region", "noise-region"]
# The released code trains G 10x faster than D for the joint loss only:
# `learningRate = (opt.wtl2>0 and opt.wtl2<1) and opt.lr*10 or opt.lr`
# (pathak22/context-encoder@68abd11 train.lua L213-221); Section 5.1 states the 10x.
G_LR_RATIO = 10.0


@dataclass
class InpaintLossConfig:
    kind: LossKind = "joint"  # Table 1's context encoder row
    # px of context the prediction also covers. None: the hole geometry's own (`hole`: paper
    # 7, Section 5.1; code 4, the released README L75). Any other value is a mixed geometry,
    # accepted only with `hole` also given (InpaintingConfig.check_given).
    overlap: int | None = None
    overlap_weight: float = OVERLAP_WEIGHT
    rec_weight: float = REC_WEIGHT  # joint: 0.999 L2 + 0.001 adversarial
    adv_weight: float = ADV_WEIGHT


@dataclass
class InpaintTrainConfig(LoopConfig):
    # Not stated for the inpainting model; the paper's "about 100K iterations" of Section 5.2.
    iterations: int = 100_000
    batch_size: int = 64
    # Adam lr of the discriminator, and of the generator for l2 and adversarial runs
    # (train.lua L19 `lr = 0.0002`, L213-221).
    lr: float = 2e-4
    g_lr_ratio: float = G_LR_RATIO  # joint loss only: the generator at g_lr_ratio x lr
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
    # Where the hole and the predicted patch lie (`model.HoleGeometry`), each with its own
    # overlap (`loss.overlap` None). "paper": a 64x64 hole and a 78x78 prediction overlapping
    # the context by 7 px ("we predict a slightly larger patch that overlaps with the context
    # (by 7px)", Section 5.1), Table 1 scored on the hole; "code": the released code's 64x64
    # prediction around a 56x56 hole, overlap 4 (pathak22/context-encoder@68abd11 train.lua
    # L282-285, L380-389, README L75), scored on the prediction as the public port does.
    # Either way the overlap ring weighs loss.overlap_weight.
    hole: HoleMode = "paper"
    # VOC2012 folder for random-region (None: the synthetic VOC2012 when `data` is None too;
    # with a user's image folder it must be given)
    shapes: str | None = None
    bottleneck: int = BOTTLENECK  # the paper's 4000-d code; smaller only for quick tests
    loss: InpaintLossConfig = field(default_factory=InpaintLossConfig)
    train: InpaintTrainConfig = field(default_factory=InpaintTrainConfig)

    def __post_init__(self) -> None:
        # An overlap equal to the hole's own is no choice of its own: stored as None, so that
        # `hole: code` with `loss.overlap: 4` departs from the paper in `hole` alone.
        own = OVERLAPS.get(self.hole)
        if self.loss.overlap is not None and self.loss.overlap == own:
            self.loss = replace(self.loss, overlap=None)

    @classmethod
    def check_given(cls, data: dict[str, Any]) -> None:
        """The keys a user gave (before defaults fill the rest; `benchmark.config.from_dict`):
        an overlap other than the default hole's own is a mixed geometry, which needs `hole`
        given too, so that changing one key never silently mixes the two geometries."""
        loss = data.get("loss")
        overlap = loss.get("overlap") if isinstance(loss, dict) else None
        hole = cls.hole
        if overlap is None or "hole" in data or overlap == OVERLAPS[hole]:
            return
        raise ConfigError(
            f"loss.overlap: {overlap} px with the default hole ({hole}, whose own overlap is "
            f"{OVERLAPS[hole]} px) mixes two geometries; for the released code's set "
            "hole=code (its overlap is 4), or give hole too to run the mixed geometry "
            "(a departure from the paper)"
        )

    def geometry(self) -> HoleGeometry:
        """The hole and prediction boxes of this run (hole mode, loss.overlap)."""
        return HoleGeometry(self.hole, self.loss.overlap)

    def generator_lr(self) -> float:
        """The generator's Adam lr: g_lr_ratio x lr for the joint loss, lr otherwise
        (train.lua L213-221)."""
        tc = self.train
        return tc.lr * tc.g_lr_ratio if self.loss.kind == "joint" else tc.lr


# the stage `bench inpaint evaluate` (pretrain/inpainting/evaluate.py): Table 1's metrics
EVAL_CROPS = {
    "resize": "shorter side resized to 128, centre 128x128 crop (the public evaluation)",
    "centre": "centre 128x128 crop at native resolution",
}


@dataclass
class InpaintEvalConfig:
    # which of Table 1's rows a run is, not a departure from it (benchmark.protocol)
    EXPERIMENT_KEYS: ClassVar[frozenset[str]] = frozenset({"baseline"})

    name: str | None = None
    seed: int = 0
    # Held-out images. None: the synthetic VOC2007 images, which the default training pool
    # (the synthetic unlabelled folder) does not contain.
    data: str | None = None
    device: str = "auto"
    weights: str | None = None  # inpainting run folder or generator.safetensors
    baseline: Literal["nn-hog", "nn-ce"] | None = None  # nn-ce also needs weights
    train_data: str | None = None  # images the NN baselines search (None: synthetic pool)
    max_images: int = 100  # Table 1 uses 100 held-out Paris StreetView images
    # resize: the public evaluation's loading of the 227x227 Paris images (resize to 128,
    # centre crop: BoyuanJiang/context_encoder_pytorch@01cbf96 test.py L52-55); centre: the
    # centre 128x128 crop at native resolution.
    eval_crop: Literal["resize", "centre"] = "resize"
    # hole geometry (see pretrain.inpainting.config): None: the weights' card (a card without
    # `hole`: "code"; the baselines without weights: "paper"); overlap None: the card's, or
    # with `hole` given that hole's own (paper 7, code 4); an overlap mixing the geometries
    # needs `hole` given too
    hole: HoleMode | None = None
    overlap: int | None = None
    train_load_size: int = 0  # NN database: shorter side before the centre crop (0: native)
    train_crops: int = 1  # NN database crops per training image (1: the centre crop only)
    batch_size: int = 32
