"""The same Fast R-CNN protocol run through detectron2, used as a library at the edge.

detectron2 is imported only inside functions, and only when `backend: detectron2` runs: this
module imports without it, and `require_detectron2` turns its absence into a one-line hint.

What is detectron2's: the model (GeneralizedRCNN with precomputed proposals, StandardROIHeads
with detectron2's RoI matching and sampling, ROIPool 6x6 at 1/16, FastRCNNOutputLayers and its
losses and inference), the per-image data pipeline (DatasetMapper: resizing, flips, proposal
transforms, in train and test mode), and PascalVOCDetectionEvaluator (extra `detectron2_*`
metrics). What is ours:

- the AlexNet encoder registered as a backbone, one registry name per architecture
  (`BenchAlexNet_caffenet`, `BenchAlexNet_caffenet_poolfree`, ...; output "conv5", stride
  16, the encoder held as `features` so that `bench export --format detectron2` keys
  `backbone.features.N.*` fit), and Fast R-CNN's fc6/fc7 box head registered per dropout
  (`BenchAlexNetFCHead_dropout0.5`). Everything a run needs is thus in detectron2's own
  config keys, and the `detectron2/config.yaml` a run writes loads with plain
  `get_cfg().merge_from_file` (building a model from it needs `register_components(cfg)`);
- training: `benchmark.loop.fit`, the loop of every stage (keyed sampler, NaN guard, one
  weights-only checkpoint layout, scalars, logs). The step calls the model on a list of
  mapped dataset dicts; the lr is a pure function of the iteration (Fast R-CNN's multistep,
  no warm-up), so no scheduler state exists. Every random choice of a training sample
  (scale, flip) is drawn from generators seeded by (seed, sample number), RoI sampling and
  dropout from the loop's per-iteration seed: a run killed and resumed ends with the same
  weights, bit for bit on CPU;
- weights: never unpickled by detectron2. An exported `.pkl` is read by
  `benchmark.safe_pickle.safe_load` (containers and numpy arrays only), anything else by
  `weights.encoder.load_encoder`; both are checked as an encoder (every tensor, shape and
  value) and then loaded into the model, where only the new head's tensors may be missing;
- the image lists (`transfer.common.checked_voc_ids`, `on_bad_data`), proposals
  (`attach_proposals`, selective search or files read safely) and the training-image filter
  are the native backend's, handed to detectron2 as dataset dicts (difficult objects in
  training as `train_difficult` says);
- scores: our VOC07 11-point AP and COCO AP on the detections, metrics.json as the native
  backend writes it.

Test post-processing: detectron2's `fast_rcnn_inference` is the `coco` branch's (scores above
SCORE_THRESH_TEST, NMS per class, the best DETECTIONS_PER_IMAGE over all classes), so this
backend runs `test_postprocess: coco` only; Fast R-CNN master's running per-class cap over
the whole test set has no detectron2 key, and the default `test_postprocess: master` is
refused with a one-line hint.

Options detectron2 cannot honour are one-line ConfigErrors (`check_supported`): `rescale`
(the data-dependent init is native-only), `test_postprocess: master`, `bbox_normalize: data`
(detectron2's BBOX_REG_WEIGHTS is one divisor per coordinate for every class, and it has no
target means, so Fast R-CNN's per-class statistics cannot be expressed), `train.compile`, and
RoI bands detectron2's Matcher cannot express. torchrun is refused (one process only).

Remaining differences from the native backend: detectron2's resize rounds sizes its own way
(int(x + 0.5)) and flips with probability 1/2 per sample rather than visiting both mirror
images; boxes are continuous (x1 - 1, y1 - 1, x2, y2), so a RoI pools up to one more feature
cell at its right and bottom edges than Fast R-CNN's inclusive box, and NMS overlaps have no
+1 (on a small synthetic set, detectron2's inference of a natively trained model scored
0.92 mAP where the native inference scored 0.93). PascalVOCDetectionEvaluator needs <pose>,
<truncated> and <difficult> in every annotation; where it fails, its `detectron2_*` metrics
are null and the log says why.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from benchmark import distributed, loop
from benchmark.datasets.voc import VOC_CLASSES
from benchmark.errors import BenchError, ConfigError, printable
from benchmark.runs import Run, atomic_write_text
from encoders.alexnet import ARCHS, CONV_INDICES, AlexNetEncoder
from pretrain.dropout import Dropout
from transfer import common
from transfer.backbone import check_frozen_unchanged, describe_transfer, snapshot_frozen
from transfer.detection.config import DetectionConfig, DetectionTrainConfig
from transfer.detection.data import DetRecord
from transfer.detection.evaluate import (
    Detections,
    coco_ap,
    finite_or_none,
    score_fields,
    voc07_scores,
    write_results_files,
)
from transfer.detection.model import param_groups
from transfer.detection.records import prepare_records
from weights.encoder import encoder_from_state, load_encoder
from weights.native import framework_input

STAGE = "transfer/detection/detectron2"
INSTALL_HINT = (
    "backend: detectron2 is not installed (or its C++ ops are not built); it is not on PyPI, "
    "see https://detectron2.readthedocs.io/en/latest/tutorials/install.html (e.g. pip install "
    "--no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' where torch "
    "is installed), or use backend: native"
)
BACKBONE_PREFIX = "BenchAlexNet_"
HEAD_PREFIX = "BenchAlexNetFCHead_dropout"
# Tensors of the model that no encoder file holds: the re-initialised fc6/fc7 and the heads.
NEW_HEAD_PREFIXES = ("roi_heads.box_head.", "roi_heads.box_predictor.")
# The backbone is conv1..relu5 (`features[:12]`); a pool-free encoder's pool5 conv is unused.
UNUSED_ENCODER_PREFIXES = ("features.12.",)
SAMPLE_STREAM = 21  # keyed_seed(seed, 21, sample): the random choices of one training sample


# ------------------------------------------------------------------ detectron2 and its registry


def require_detectron2() -> Any:
    """Import detectron2 or raise the one-line BenchError that says how to install it."""
    try:
        import detectron2
        import detectron2.modeling  # noqa: F401 - fails when the C++ ops were not built
    except (ImportError, OSError):
        raise BenchError(INSTALL_HINT) from None
    register_components()
    return detectron2


def backbone_name(arch: str, pool_free: bool) -> str:
    """The registry name of the backbone for an encoder arch: BenchAlexNet_caffenet[_poolfree]."""
    if arch not in ARCHS:
        raise ConfigError(f"arch: unknown encoder arch {arch!r} (choose from {sorted(ARCHS)})")
    return BACKBONE_PREFIX + arch.replace("-", "_") + ("_poolfree" if pool_free else "")


def parse_backbone_name(name: str) -> tuple[str, bool]:
    """(arch, pool_free) of a `backbone_name`; ConfigError for any other name."""
    for arch in ARCHS:
        for pool_free in (False, True):
            if backbone_name(arch, pool_free) == name:
                return arch, pool_free
    raise ConfigError(f"MODEL.BACKBONE.NAME: {name!r} is not a bench AlexNet backbone")


def box_head_name(dropout: float) -> str:
    """The registry name of the fc6/fc7 head with this dropout: BenchAlexNetFCHead_dropout0.5."""
    return f"{HEAD_PREFIX}{float(dropout)!r}"


def parse_box_head_name(name: str) -> float:
    try:
        if name.startswith(HEAD_PREFIX):
            p = float(name[len(HEAD_PREFIX) :])
            if 0 <= p < 1:
                return p
    except ValueError:
        pass
    raise ConfigError(f"MODEL.ROI_BOX_HEAD.NAME: {name!r} is not a bench fc6/fc7 head")


def register_components(d2cfg: Any = None) -> None:
    """Add our backbones (every arch, with and without pools) to detectron2's registry, and
    the box head for the dropout `d2cfg` names (if given). Idempotent."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY, Backbone

    if backbone_name("caffenet", False) not in BACKBONE_REGISTRY:

        class AlexNetBackbone(Backbone):
            """conv1-relu5 of the encoder: (B, 3, H, W) -> {"conv5": (B, C5, H/16, W/16)}."""

            def __init__(self, arch: str, pool_free: bool, freeze_at: int) -> None:
                super().__init__()
                encoder = AlexNetEncoder(arch, pool_free)  # type: ignore[arg-type]
                self.features = encoder.features[:12]
                self._channels = encoder.out_channels
                for idx in CONV_INDICES[:freeze_at]:
                    for p in self.features[idx].parameters():
                        p.requires_grad_(False)

            def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
                # float32 out: torchvision's CPU roi_pool has no autocast rule and refuses
                # bf16 features with float32 boxes (a no-op without autocast).
                return {"conv5": self.features(x).float()}

            def output_shape(self) -> dict[str, ShapeSpec]:
                return {"conv5": ShapeSpec(channels=self._channels, stride=16)}

        def builder(arch: str, pool_free: bool) -> Any:
            def build(cfg: Any, input_shape: ShapeSpec) -> Backbone:
                return AlexNetBackbone(arch, pool_free, cfg.MODEL.BACKBONE.FREEZE_AT)

            build.__name__ = backbone_name(arch, pool_free)
            return build

        for arch in ARCHS:
            for pool_free in (False, True):
                BACKBONE_REGISTRY.register(builder(arch, pool_free))

    if d2cfg is not None:
        parse_backbone_name(d2cfg.MODEL.BACKBONE.NAME)
        register_box_head(parse_box_head_name(d2cfg.MODEL.ROI_BOX_HEAD.NAME))


def register_box_head(dropout: float) -> str:
    """Register (once) Fast R-CNN's fc6/fc7 head with this dropout; returns its name."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY

    name = box_head_name(dropout)
    if name in ROI_BOX_HEAD_REGISTRY:
        return name

    class AlexNetFCHead(nn.Module):
        """RoI features (R, C5, 6, 6) -> fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout,
        with Caffe's fillers (N(0, 0.005), bias 0.1) as the native model."""

        def __init__(self, cfg: Any, input_shape: ShapeSpec) -> None:
            super().__init__()
            dim = cfg.MODEL.ROI_BOX_HEAD.FC_DIM
            in_dim = input_shape.channels * input_shape.height * input_shape.width
            self.fc6 = nn.Linear(in_dim, dim)
            self.fc7 = nn.Linear(dim, dim)
            self.dropout = Dropout(dropout)
            for fc in (self.fc6, self.fc7):
                nn.init.normal_(fc.weight, 0.0, 0.005)
                nn.init.constant_(fc.bias, 0.1)
            self._output_size = dim

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.dropout(torch.relu(self.fc6(x.flatten(1))))
            return self.dropout(torch.relu(self.fc7(x)))

        @property
        def output_shape(self) -> ShapeSpec:
            return ShapeSpec(channels=self._output_size)

    AlexNetFCHead.__name__ = name
    ROI_BOX_HEAD_REGISTRY.register(AlexNetFCHead)
    return name


# ------------------------------------------------------------------ config


def check_supported(cfg: DetectionConfig) -> None:
    """One-line ConfigErrors for the options this backend cannot honour, and a refusal
    under torchrun; needs no detectron2."""
    if cfg.rescale:
        raise ConfigError(
            "rescale: the data-dependent init is not available with backend: detectron2 "
            "(use backend: native)"
        )
    if cfg.test_postprocess != "coco":
        raise ConfigError(
            "test_postprocess: detectron2's inference is the coco branch's (score > "
            "score_thresh, NMS, the best max_per_image over all classes); Fast R-CNN master's "
            "running per-class cap needs backend: native (or set test_postprocess: coco)"
        )
    if cfg.bbox_normalize != "fixed":
        raise ConfigError(
            "bbox_normalize: 'data' needs per-class target means and stds, but detectron2's "
            "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS is one divisor per coordinate for all classes "
            "(set bbox_normalize: fixed, which scales targets by bbox_stds, or use backend: "
            "native)"
        )
    if cfg.train.compile:
        raise ConfigError("train.compile: not supported with backend: detectron2")
    iou_bands(cfg)  # raises for bands detectron2's Matcher cannot express
    if distributed.torchrun_world() > 1:
        raise BenchError(
            f"backend: detectron2 runs in one process, but torchrun started "
            f"{distributed.torchrun_world()} (WORLD_SIZE); run it without torchrun or use "
            "backend: native"
        )


def iou_bands(cfg: DetectionConfig) -> tuple[list[float], list[int]]:
    """Fast R-CNN's RoI bands as detectron2 Matcher thresholds and labels: IoU < bg_lo
    ignored, [bg_lo, bg_hi) background, [bg_hi, fg) ignored, >= fg foreground (the Matcher
    wants thresholds > 0, so a zero edge is dropped)."""
    lo, hi, fg = cfg.bg_thresh_lo, cfg.bg_thresh_hi, cfg.fg_thresh
    if not 0 < fg <= 1:
        raise ConfigError(f"fg_thresh: must be in (0, 1] with backend: detectron2, got {fg}")
    if hi > fg:
        raise ConfigError(
            f"bg_thresh_hi: {hi} above fg_thresh {fg} makes RoIs both background and "
            "foreground, which detectron2's Matcher cannot express"
        )
    thresholds: list[float] = []
    labels = [-1]  # labels[0]: IoU below thresholds[0]; labels[k + 1]: [thresholds[k], next)
    points = ((lo, 0), (hi, -1), (fg, 1))
    for k, (t, label) in enumerate(points):
        if k + 1 < len(points) and points[k + 1][0] == t:
            continue  # an empty band
        if t <= 0:
            labels[-1] = label
        else:
            thresholds.append(float(t))
            labels.append(label)
    return thresholds, labels


def fast_rcnn_config(
    cfg: DetectionConfig,
    *,
    arch: str,
    pool_free: bool,
    train_dataset: str,
    test_dataset: str,
    output_dir: Path,
    device: str,
    proposals_topk_train: int | None = None,
    proposals_topk_test: int | None = None,
    precision: str = "fp32",
) -> Any:
    """A detectron2 CfgNode holding the protocol in detectron2's own keys: precomputed
    proposals, RoI max pooling 6x6 at 1/16, fc6/fc7 with dropout, 2 images x 64 RoIs (25% fg
    >= 0.5, bg [0.1, 0.5)), smooth-L1 box loss on targets scaled by 1/(0.1, 0.1, 0.2, 0.2),
    the solver (documentation: the loop applies it), frozen."""
    from detectron2.config import get_cfg

    t: DetectionTrainConfig = cfg.train
    thresholds, labels = iou_bands(cfg)
    c = get_cfg()
    c.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    c.MODEL.DEVICE = str(device)
    c.MODEL.WEIGHTS = ""  # weights are loaded by bench, never by DetectionCheckpointer
    c.MODEL.MASK_ON = False
    c.MODEL.KEYPOINT_ON = False
    c.MODEL.LOAD_PROPOSALS = True
    c.MODEL.PROPOSAL_GENERATOR.NAME = "PrecomputedProposals"
    c.MODEL.BACKBONE.NAME = backbone_name(arch, pool_free)
    c.MODEL.BACKBONE.FREEZE_AT = cfg.freeze_at
    # The encoder's input convention in detectron2's keys: images read in INPUT.FORMAT, then
    # (x - PIXEL_MEAN) / PIXEL_STD (Caffe's for CaffeNet: BGR, minus (104, 117, 123), std 1).
    pixels = framework_input("detectron2", ARCHS[arch].convention)
    c.INPUT.FORMAT = pixels["INPUT.FORMAT"]
    c.MODEL.PIXEL_MEAN = pixels["MODEL.PIXEL_MEAN"]
    c.MODEL.PIXEL_STD = pixels["MODEL.PIXEL_STD"]
    c.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    c.MODEL.ROI_HEADS.IN_FEATURES = ["conv5"]
    c.MODEL.ROI_HEADS.NUM_CLASSES = len(VOC_CLASSES)
    c.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = t.rois_per_batch // t.ims_per_batch
    c.MODEL.ROI_HEADS.POSITIVE_FRACTION = cfg.fg_fraction
    c.MODEL.ROI_HEADS.IOU_THRESHOLDS = thresholds
    c.MODEL.ROI_HEADS.IOU_LABELS = labels
    c.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT = True  # Fast R-CNN trains on the gt boxes too
    c.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.score_thresh
    c.MODEL.ROI_HEADS.NMS_THRESH_TEST = cfg.nms
    c.TEST.DETECTIONS_PER_IMAGE = cfg.max_per_image
    c.MODEL.ROI_BOX_HEAD.NAME = box_head_name(cfg.dropout)
    c.MODEL.ROI_BOX_HEAD.FC_DIM = cfg.fc_dim
    c.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIPool"
    c.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = cfg.roi_size
    c.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0
    c.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = tuple(1.0 / s for s in cfg.bbox_stds)
    c.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 1.0
    c.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = False
    c.DATASETS.TRAIN = (train_dataset,)
    c.DATASETS.TEST = (test_dataset,)
    # Proposals travel in the dataset dicts (bench reads proposal files, safely); no file
    # is handed to detectron2.
    c.DATASETS.PROPOSAL_FILES_TRAIN = ()
    c.DATASETS.PROPOSAL_FILES_TEST = ()
    c.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN = int(proposals_topk_train or cfg.ss_max_boxes)
    c.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST = int(proposals_topk_test or cfg.ss_max_boxes)
    c.DATALOADER.NUM_WORKERS = t.workers
    c.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    c.INPUT.MIN_SIZE_TRAIN = tuple(cfg.scales)
    c.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    c.INPUT.MAX_SIZE_TRAIN = cfg.max_size
    c.INPUT.MIN_SIZE_TEST = cfg.test_scale
    c.INPUT.MAX_SIZE_TEST = cfg.test_max_size
    c.INPUT.RANDOM_FLIP = "horizontal" if cfg.flip else "none"
    c.SOLVER.IMS_PER_BATCH = t.ims_per_batch
    c.SOLVER.BASE_LR = t.lr
    c.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    c.SOLVER.STEPS = tuple(t.lr_steps)
    c.SOLVER.GAMMA = t.gamma
    c.SOLVER.MAX_ITER = t.iterations
    c.SOLVER.MOMENTUM = t.momentum
    c.SOLVER.NESTEROV = False
    c.SOLVER.WEIGHT_DECAY = t.weight_decay
    c.SOLVER.WEIGHT_DECAY_BIAS = 0.0
    c.SOLVER.BIAS_LR_FACTOR = t.bias_lr_mult
    c.SOLVER.WARMUP_ITERS = 0  # Fast R-CNN has no warm-up
    c.SOLVER.WARMUP_FACTOR = 1.0
    c.SOLVER.CHECKPOINT_PERIOD = t.checkpoint_every
    c.SOLVER.AMP.ENABLED = precision in ("bf16", "fp16")  # the resolved `train.precision`
    c.TEST.EVAL_PERIOD = 0
    c.OUTPUT_DIR = str(output_dir)
    c.SEED = cfg.seed
    c.freeze()
    return c


def lr_at(train: DetectionTrainConfig, iteration: int) -> float:
    """Fast R-CNN's multistep schedule: lr x gamma at each of lr_steps passed, no warm-up."""
    return train.lr * train.gamma ** sum(iteration >= s for s in train.lr_steps)


# ------------------------------------------------------------------ weights


def read_detectron2_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `bench export --format detectron2` pickle ({"model": {name: array}}
    or a bare {name: array}), read with the restricted unpickler: a file never runs code."""
    from benchmark.safe_pickle import safe_load

    blob = safe_load(path)
    model = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(model, dict) or not model:
        raise BenchError(
            f"{printable(path)}: not a detectron2 weights pickle (expected a dict "
            "{'model': {name: array}})"
        )
    state = {}
    for key, value in model.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise BenchError(
                f"{printable(path)}: entry {printable(str(key))!r} is a "
                f"{type(value).__name__}, not a numpy array"
            )
        if value.dtype.kind not in "fiub":
            raise BenchError(f"{printable(path)}: {key} has unsupported dtype {value.dtype}")
        state[key] = torch.from_numpy(np.array(value, dtype=value.dtype.newbyteorder("=")))
    return state


def _pickle_card(path: Path) -> dict[str, Any]:
    """The card beside an exported pickle (`<stem>.card.json`), else {"method": "unknown"}."""
    from weights.native import card_path, read_card

    sidecar = card_path(path)
    card: dict[str, Any] = read_card(sidecar) if sidecar.is_file() else {}
    card.setdefault("method", "unknown")
    return card


def load_weights(weights: str | None, arch: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model tensors `backbone.features.N.*`, card) of `--weights`, checked as an encoder
    (key sets, shapes, finite values): a `.pkl` through the restricted unpickler, anything
    else (run folder, native, torchvision, Caffe, None = random) through `load_encoder`."""
    if weights and Path(weights).suffix.lower() in (".pkl", ".pickle"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BenchError(f"{printable(path)}: weights file not found")
        raw = read_detectron2_pickle(path)
        outside = sorted(k for k in raw if not k.startswith("backbone."))
        if outside:
            shown = ", ".join(outside[:8]) + (
                f", ... ({len(outside)} in all)" if len(outside) > 8 else ""
            )
            raise BenchError(
                f"{printable(path)}: tensors outside the backbone ({shown}); expected only "
                "backbone.features.N.* (bench export --format detectron2)"
            )
        state = {k.removeprefix("backbone."): v for k, v in raw.items()}
        encoder, card = encoder_from_state(state, _pickle_card(path), path, arch)
    else:
        encoder, card = load_encoder(weights, arch)
    tensors = {
        f"backbone.{k}": v.detach().cpu()
        for k, v in encoder.state_dict().items()
        if not k.startswith(UNUSED_ENCODER_PREFIXES)
    }
    card.setdefault("arch", encoder.arch)
    card.setdefault("pool_free", encoder.pool_free)
    return tensors, card


def load_into_model(model: nn.Module, state: Mapping[str, torch.Tensor], where: object) -> None:
    """Load the encoder's tensors into the detectron2 model: every model tensor must come
    from `state` except the new head's (fc6/fc7, classifier, box regressor), nothing in
    `state` may be left over, and shapes must match."""
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    not_new = {k for k in missing if not k.startswith(NEW_HEAD_PREFIXES)}
    if not_new or unexpected:
        raise BenchError(
            f"{printable(where)}: tensors do not match the detectron2 model: missing "
            f"[{', '.join(sorted(not_new)[:12]) or 'none'}]; unexpected "
            f"[{', '.join(sorted(unexpected)[:12]) or 'none'}]"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise BenchError(
                f"{printable(where)}: {key} has shape {tuple(value.shape)}, the detectron2 "
                f"model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)


def build_fast_rcnn(d2cfg: Any) -> nn.Module:
    """The detectron2 model of `d2cfg` (our backbone and head registered first); weights are
    loaded separately (`load_weights` + `load_into_model`)."""
    require_detectron2()
    from detectron2.modeling import build_model

    register_components(d2cfg)
    return build_model(d2cfg)


# ------------------------------------------------------------------ data


def dataset_dict(rec: DetRecord, use_difficult: bool) -> dict[str, Any]:
    """A detectron2 dataset dict of one image: continuous XYXY_ABS boxes (x1, y1, x2 + 1,
    y2 + 1) from our inclusive pixels, the proposals with logits falling by rank (selective
    search has no objectness; detectron2 keeps the top k), difficult objects dropped unless
    `use_difficult`."""
    from detectron2.structures import BoxMode

    annotations = [
        {
            "bbox": [float(b[0]), float(b[1]), float(b[2]) + 1.0, float(b[3]) + 1.0],
            "bbox_mode": BoxMode.XYXY_ABS,
            "category_id": int(c) - 1,
            "iscrowd": 0,
        }
        for b, c, d in zip(rec.gt_boxes, rec.gt_classes, rec.gt_difficult)
        if use_difficult or not d
    ]
    props = rec.proposals if rec.proposals is not None else np.zeros((0, 4), np.float32)
    boxes = np.asarray(props, np.float32).reshape(-1, 4).copy()
    boxes[:, 2:] += 1.0
    return {
        "file_name": str(rec.path),
        "image_id": rec.image_id,
        "height": int(rec.height),
        "width": int(rec.width),
        "annotations": annotations,
        "proposal_boxes": boxes,
        "proposal_objectness_logits": -np.arange(len(boxes), dtype=np.float32),
        "proposal_bbox_mode": BoxMode.XYXY_ABS,
    }


class KeyedMapper(Dataset):
    """Item (index, sample number) from the loop's IterationSampler -> detectron2's
    DatasetMapper output for dicts[index], every random choice seeded by (seed, sample)."""

    def __init__(self, dicts: Sequence[dict[str, Any]], mapper: Any, seed: int) -> None:
        self.dicts, self.mapper, self.seed = list(dicts), mapper, seed

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, sample = item
        with loop.seeded_globals(loop.keyed_seed(self.seed, SAMPLE_STREAM, sample)):
            return self.mapper(self.dicts[index])  # DatasetMapper deep-copies the dict


def register_split(name: str, voc_root: Path, split: str) -> None:
    """Register `name`'s VOC metadata (what PascalVOCDetectionEvaluator reads), replacing an
    earlier registration. The dicts themselves are not put in DatasetCatalog: nothing here
    looks them up by name, and a process-wide catalogue would keep them alive after the run."""
    from detectron2.data import MetadataCatalog

    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(
        thing_classes=list(VOC_CLASSES), dirname=str(voc_root), year=2007, split=split
    )


def dataset_name(voc_root: Path, split: str) -> str:
    """bench_voc2007_<split>_<hash of the folder>: stable across processes."""
    digest = hashlib.sha1(str(Path(voc_root).resolve()).encode()).hexdigest()[:8]
    return f"bench_voc2007_{split}_{digest}"


# ------------------------------------------------------------------ training step


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: DetectionTrainConfig,
    precision: loop.Precision,
) -> loop.StepFn:
    """One SGD step of detectron2's Fast R-CNN on a list of mapped dataset dicts."""
    from detectron2.utils.events import EventStorage

    def step(batch: list[dict[str, Any]], iteration: int) -> dict[str, Any]:
        lr = lr_at(train, iteration)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        with EventStorage(iteration) as storage, precision.autocast():
            losses = model(batch)
        loss = sum(v.float() for v in losses.values())
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)
        latest = storage.latest()
        out: dict[str, Any] = {
            "loss": loss.detach(),
            "loss_cls": losses["loss_cls"].detach(),
            "loss_box": losses["loss_box_reg"].detach(),
            "lr": lr,
        }
        for key, name in (
            ("acc", "fast_rcnn/cls_accuracy"),
            ("fg_acc", "fast_rcnn/fg_cls_accuracy"),
        ):
            if name in latest:
                out[key] = float(latest[name][0])
        return out

    return step


# ------------------------------------------------------------------ evaluation


def _collector() -> Any:
    from detectron2.evaluation import DatasetEvaluator

    class CollectDetections(DatasetEvaluator):
        """Every detection in devkit (1-based) coordinates, for our own scoring."""

        def reset(self) -> None:
            self.dets: Detections = {c: [] for c in VOC_CLASSES}

        def process(self, inputs: list[dict], outputs: list[dict]) -> None:
            for inp, out in zip(inputs, outputs):
                inst = out["instances"].to("cpu")
                boxes = inst.pred_boxes.tensor.numpy()
                for b, s, c in zip(boxes, inst.scores.tolist(), inst.pred_classes.tolist()):
                    # detectron2's continuous box -> the devkit's 1-based pixels
                    box = (float(b[0]) + 1, float(b[1]) + 1, float(b[2]), float(b[3]))
                    self.dets[VOC_CLASSES[c]].append((str(inp["image_id"]), float(s), box))

        def evaluate(self) -> dict:
            return {}

    return CollectDetections()


def evaluate(
    model: nn.Module,
    d2cfg: Any,
    test_dicts: list[dict[str, Any]],
    test_ids: Sequence[str],
    workers: int,
    precision: loop.Precision,
    work: Path,
    logger: Any,
) -> tuple[Detections, dict[str, float]]:
    """(our detections, detectron2's PascalVOCDetectionEvaluator bbox numbers) on the test
    dicts, through detectron2's test-mode DatasetMapper and inference_on_dataset."""
    from detectron2.data import DatasetMapper, build_detection_test_loader
    from detectron2.evaluation import PascalVOCDetectionEvaluator, inference_on_dataset

    collector = _collector()
    loader = build_detection_test_loader(
        [d for d in test_dicts if len(d["proposal_boxes"])],  # no proposal, no detection
        mapper=DatasetMapper(d2cfg, is_train=False),
        num_workers=workers,
    )
    voc = PascalVOCDetectionEvaluator(d2cfg.DATASETS.TEST[0])
    # Score the images this run tested (on_bad_data: skip may have dropped some).
    image_set = work / "test_image_set.txt"
    atomic_write_text(image_set, "".join(f"{i}\n" for i in test_ids))
    voc._image_set_path = str(image_set)
    model.eval()
    with precision.autocast():
        inference_on_dataset(model, loader, collector_and(voc, collector))
    try:
        bbox = dict(voc.evaluate()["bbox"])
    except Exception as exc:  # noqa: BLE001 - the extra numbers must not sink the run
        logger.warning(
            f"detectron2's PascalVOCDetectionEvaluator failed: {type(exc).__name__}: {exc}"
        )
        bbox = {}
    return collector.dets, {k: float(v) for k, v in bbox.items()}


def collector_and(*evaluators: Any) -> Any:
    """Feed every evaluator, evaluate none (each is evaluated apart)."""
    from detectron2.evaluation import DatasetEvaluator

    class Both(DatasetEvaluator):
        def reset(self) -> None:
            for e in evaluators:
                e.reset()

        def process(self, inputs: list[dict], outputs: list[dict]) -> None:
            for e in evaluators:
                e.process(inputs, outputs)

        def evaluate(self) -> dict:
            return {}

    return Both()


# ------------------------------------------------------------------ the run


def run_detectron2(cfg: DetectionConfig, run: Run, voc_root: Path) -> dict[str, Any]:
    """Train and evaluate through detectron2; writes the same metrics as the native backend
    plus detectron2's own VOC evaluator numbers."""
    check_supported(cfg)
    d2 = require_detectron2()
    from detectron2.data import DatasetMapper

    t = cfg.train
    env = loop.setup(cfg.device, t)
    torch.manual_seed(cfg.seed)
    state, card = load_weights(cfg.weights, cfg.arch)
    arch, pool_free = str(card["arch"]), bool(card["pool_free"])
    train_records, test_records, skip_train, skip_test = prepare_records(cfg, run, voc_root)
    train_dicts = [dataset_dict(r, cfg.train_difficult) for r in train_records]
    test_dicts = [dataset_dict(r, True) for r in test_records]
    train_name = dataset_name(voc_root, cfg.train_split)
    test_name = dataset_name(voc_root, cfg.test_split)
    register_split(train_name, voc_root, cfg.train_split)
    register_split(test_name, voc_root, cfg.test_split)
    work = run.path / "detectron2"
    topk = [max([len(d["proposal_boxes"]) for d in ds] + [1]) for ds in (train_dicts, test_dicts)]
    precision = loop.Precision(t.precision, env.device)
    d2cfg = fast_rcnn_config(
        cfg, arch=arch, pool_free=pool_free, train_dataset=train_name, test_dataset=test_name,
        output_dir=work, device=str(env.device), proposals_topk_train=topk[0],
        proposals_topk_test=topk[1], precision=precision.name,
    )  # fmt: skip
    if run.is_main:
        atomic_write_text(work / "config.yaml", d2cfg.dump())

    model = build_fast_rcnn(d2cfg)
    load_into_model(model, state, card.get("source") or f"{arch} random init")
    model.to(env.device)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    snapshot = snapshot_frozen(model, frozen)
    describe_transfer(model, (), run.logger)
    run.logger.info(
        f"fast r-cnn (detectron2 {d2.__version__}): {len(train_dicts)} train images, "
        f"{len(test_dicts)} test"
    )
    net = loop.prepare_model(model, env, t, ddp=False)
    optimizer = loop.sgd(
        param_groups(model, t.lr, t.weight_decay, t.bias_lr_mult), t.lr, t.momentum
    )
    dataset = KeyedMapper(train_dicts, DatasetMapper(d2cfg, is_train=True), cfg.seed)
    net.train()
    result = loop.fit(
        run, env, t, stage=STAGE, config=cfg, seed=cfg.seed,
        step=make_step(net, optimizer, t, precision),
        batches=loop.loader_batches(dataset, t.ims_per_batch, cfg.seed, env, t.workers,
                                    collate_fn=loop.list_collate),
        state={"model": net, "optimizer": optimizer}, precision=precision,
        desc="fast r-cnn (detectron2)", input_convention=ARCHS[arch].convention.name,
    )  # fmt: skip
    check_frozen_unchanged(model, snapshot)

    tick = time.perf_counter()
    test_ids = [r.image_id for r in test_records]
    detections, bbox = evaluate(
        model, d2cfg, test_dicts, test_ids, t.workers, precision, work, run.logger
    )
    if run.is_main:
        write_results_files(run.file("detections"), detections)
    per_class, mean = voc07_scores(detections, test_records)
    coco = coco_ap(detections, test_records)

    def percent(key: str) -> float | None:
        value = bbox.get(key)
        return None if value is None or not math.isfinite(value) else value / 100

    metrics = {
        **common.metrics_head("detection", "detectron2", cfg, run, card, arch,
                            device=env.device, precision=result.precision),
        **score_fields(mean, coco, per_class),
        # detectron2's own PascalVOCDetectionEvaluator (percent there -> fraction here)
        "detectron2_ap50": finite_or_none(percent("AP50")),
        "detectron2_ap75": finite_or_none(percent("AP75")),
        "detectron2_ap": finite_or_none(percent("AP")),
        "detectron2_version": d2.__version__,
        "bbox_normalize": cfg.bbox_normalize,
        "rescale": cfg.rescale,
        **loop.fit_fields(result, env.device),
        "test_seconds": round(time.perf_counter() - tick, 3),
        "train_images": len(train_records),
        "test_images": len(test_records),
        "skipped": common.skipped_field(skip_train, skip_test),
        "mean_proposals": float(np.mean([len(r.proposals) for r in test_records]))
        if test_records
        else 0.0,
    }
    run.logger.info(
        f"detectron2 detection mAP {metrics['map']}  COCO AP {metrics['coco_ap']}  "
        f"detectron2 AP50 {metrics['detectron2_ap50']}"
    )
    run.write_metrics(metrics)
    return metrics
