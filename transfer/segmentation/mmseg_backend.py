"""`backend: mmseg`: the segmentation protocol with mmsegmentation 1.2.2's parts, trained by
bench's one loop (`benchmark.loop.fit`).

What comes from mmseg / mmcv / mmengine: the segmentor (`EncoderDecoder`, built from a config
made in code through mmseg's MODELS registry), its data preprocessor (`SegDataPreProcessor`:
the encoder's input convention, BGR to RGB where it takes RGB, mean / std), the decode-head
machinery (`BaseDecodeHead`: loss, resizing of the scores to the label, prediction), the loss
(`CrossEntropyLoss` ignoring 255), the per-sample data pipeline (`LoadImageFromFile`,
`RandomFlip`, `PackSegInputs`) and the evaluation metric (`IoUMetric`). What comes from us:

- the loop: `fit` owns the iteration budget, checkpoints (bench's weights-only layout, stage
  "transfer/segmentation/mmseg"), resume, the NaN guard, precision and logs. mmengine's
  Runner is not used: no mmengine checkpoint is ever written or read, and every file is
  unpickled by torch's weights-only loader (a shared run folder cannot run code);
- the encoder, registered as mmseg backbone `BenchAlexNet` (its `features` in torchvision
  layout, so `bench export --format mmseg` keys `backbone.features.N.*` match). Its weights
  come from `weights.encoder.load_encoder` (or an mmseg export read with
  `torch.load(weights_only=True)`) and are copied in by us, not through init_cfg;
- the head, `BenchFCNHead`: FCN-32s's fc6 (6x6 convolution, no padding), fc7 (1x1), each
  ReLU + dropout, and mmseg's 1x1 `conv_seg` score layer. mmseg's `FCNHead` cannot express
  this (all its convolutions share one kernel size, 3x3 "same" padded, and it drops out
  channel-wise once before the classifier), so the head is ours on mmseg's base class. It is
  initialised as the native FCN's (He-normal fc6 / fc7, zero score layer);
- alignment: the backbone pads the image by FCN's 100 pixels (more for tiny images) and
  returns pool5 with its grid (`model.Grid`: image coordinate of every cell); the head
  linearly interpolates its stride-32 scores at every pixel of the network input, with the
  native `upsample` edge rule (deconv: FCN's fixed bilinear up-convolution and crop, fading
  past the outermost scores; interpolate: edge scores held). mmseg then
  resizes those per-pixel scores to the label (bilinear, align_corners=False). Where the image
  was not shrunk that resize is the identity and scores and loss are the native FCN's on the
  same weights (tested); on a shrunk image the label's pixels get an interpolation of the
  per-pixel scores rather than native's one interpolation of the coarse map (close, not equal);
- the data: VOC2012 + SBD sample lists and checks (`prepare_data`), a label transform reading
  palette PNGs and SBD `.mat` files, and `BenchShrink`, which (like the native `shrink`)
  only ever makes an image smaller: mmcv's `Resize(keep_ratio=True)` would scale small
  images up. Labels keep their full resolution, as in the native backend;
- the optimisation step: one forward / backward per image (images differ in size), each
  weighted 1/(iter_size x batch_size), then one SGD (or Adam) update with the native
  backend's multipliers (the score layer's bias at 2x lr without decay, everything else at
  lr with weight decay), as the native step does.
  `normalize_loss: false` sums the loss over pixels (CrossEntropyLoss reduction "sum");
- `rescale`: the native call (`transfer.rescale.rescale_for_transfer_`, Krähenbühl et al.'s
  data-dependent init) on the same 227x227 batch, on backbone, fc6, fc7 and conv_seg;
- evaluation: mmseg's predictions in eval mode, scored by mmseg's `IoUMetric` and by our
  confusion matrix (`benchmark.metrics`) on the same predictions; metrics.json has the native
  backend's keys (from the confusion matrix) plus `mmseg_iou_metric` (IoUMetric's own
  rounded percentages and its exact mean IU, which must agree), and overlays as native.

Every random choice of a training sample (the flip) is drawn inside the pipeline from numpy /
random / torch seeded with `keyed_seed(seed, 31, sample number)`, the global generators being
restored afterwards, so a resumed run repeats the batches it would have seen.

Not supported (one-line errors): variants fcn16s / fcn8s (native only), torchrun with more
than one process. mmseg is imported only inside functions: without it this backend fails
with one line naming `make mmseg`, and the module imports without it.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from benchmark import loop
from benchmark.datasets.voc import IGNORE_INDEX, SegSample
from benchmark.distributed import DistEnv, torchrun_world
from benchmark.errors import BenchError, ConfigError, DatasetError, printable
from benchmark.input_convention import InputConvention
from benchmark.metrics import confusion_matrix
from benchmark.runs import Run, torch_load_safe
from encoders.alexnet import ARCHS, AlexNetEncoder
from pretrain.dropout import Dropout
from weights.native import framework_input

from .config import SegmentationConfig, SegmentationTrainConfig
from .model import FCN_PAD, DenseConv2d, Grid, feature_grids, resample, smallest_pad

INSTALL_HINT = (
    "backend mmseg needs mmsegmentation 1.2.2 with mmcv 2.1.0 compiled ops "
    "(run `make mmseg`, i.e. tools/mmseg-setup.sh)"
)
STAGE = "transfer/segmentation/mmseg"
NUM_CLASSES = 21
FC6_KERNEL = 6  # FCN-AlexNet's fc6: AlexNet's 6x6 fc6 as a convolution
BIAS_LR_MULT = 2.0  # the score layer's bias (FCN-AlexNet's score_fr)
SCORE_BIAS = "decode_head.conv_seg.bias"
SAMPLE_STREAM = 31  # keyed_seed(seed, 31, sample): a training sample's random choices
HEAD = "BenchFCNHead (fc6 6x6, fc7 1x1, conv_seg 1x1)"
# `upsample` -> the edge rule of model.resample: deconv is FCN's fixed bilinear up-convolution
# and crop (scores fade to zero past the outermost score centres), interpolate holds them.
UPSAMPLE_EDGES = {"deconv": "zero", "interpolate": "hold"}


def require_mmseg() -> None:
    """Import mmseg, mmengine and mmcv's compiled ops, or raise a one-line BenchError."""
    try:
        import mmcv.ops  # noqa: F401  (the compiled extension)
        import mmengine  # noqa: F401
        import mmseg  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, version asserts, missing .so
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchError(f"{INSTALL_HINT}; import failed: {reason}") from None


class Pool5(NamedTuple):
    """What the backbone hands the head: pool5 of the padded image, the image coordinates of
    its cells, and the (height, width) of the unpadded input."""

    features: torch.Tensor
    grid: Grid
    size: tuple[int, int]


_REGISTERED = False


def register() -> None:
    """Register our backbone, head and transforms in mmseg's registries (once a process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    require_mmseg()
    from mmcv.transforms import BaseTransform
    from mmengine.model import BaseModule
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    from mmseg.registry import MODELS, TRANSFORMS

    from benchmark.datasets.voc import read_label

    from .data import shrink

    class BenchAlexNet(BaseModule):
        """Our AlexNet encoder as an mmseg backbone: (B, 3, h, w) -> Pool5.

        The input is padded by `pad` (FCN's 100), or more where pool5 would otherwise have
        fewer than `min_cells` cells (fc6's 6) along the shorter side."""

        def __init__(
            self,
            arch: str = "caffenet",
            pool_free: bool = False,
            pad: int = FCN_PAD,
            min_cells: int = FC6_KERNEL,
            init_cfg: dict | None = None,
        ) -> None:
            super().__init__(init_cfg)
            encoder = AlexNetEncoder(arch, pool_free)  # type: ignore[arg-type]
            self.features = encoder.features
            self.arch, self.pool_free, self.out_channels = arch, pool_free, encoder.out_channels
            self.pad, self.min_cells = pad, min_cells
            self.grid = feature_grids(self.features, 0)[-1]  # pool5, unpadded input

        def pad_for(self, size: int) -> int:
            return smallest_pad(size, self.pad, self.features, self.min_cells)

        def forward(self, x: torch.Tensor) -> Pool5:
            h, w = (int(s) for s in x.shape[-2:])
            pad = self.pad_for(min(h, w))
            y = self.features(F.pad(x, (pad,) * 4))
            return Pool5(y, self.grid.shifted(-pad), (h, w))

    class BenchFCNHead(BaseDecodeHead):
        """FCN-32s's head on mmseg's BaseDecodeHead: fc6 (6x6 conv), ReLU, dropout, fc7
        (1x1), ReLU, dropout, conv_seg (1x1); scores interpolated at every input pixel."""

        def __init__(self, in_channels: int, channels: int, *, dropout: float = 0.5,
                     upsample: str = "deconv", **kwargs: Any) -> None:  # fmt: skip
            kwargs.update(dropout_ratio=0.0, init_cfg=None, norm_cfg=None, in_index=0)
            super().__init__(in_channels, channels, **kwargs)
            if upsample not in UPSAMPLE_EDGES:
                raise ValueError(f"upsample {upsample!r} is not one of {sorted(UPSAMPLE_EDGES)}")
            self.edge = UPSAMPLE_EDGES[upsample]
            # the native FCN's layers (one matmul each), so that both compute the same
            self.fc6 = DenseConv2d(in_channels, channels, kernel_size=FC6_KERNEL)
            self.fc7 = DenseConv2d(channels, channels, kernel_size=1)
            # Caffe's (element-wise) dropout, as FCN and the native head; BaseDecodeHead's
            # own is channel-wise (Dropout2d) and turned off above.
            self.drop = Dropout(dropout) if dropout > 0 else nn.Identity()
            for m in (self.fc6, self.fc7):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
            nn.init.zeros_(self.conv_seg.weight)
            nn.init.zeros_(self.conv_seg.bias)

        def forward(self, inputs: Pool5) -> torch.Tensor:
            feats, grid, (h, w) = inputs
            y = self.drop(F.relu(self.fc6(feats), inplace=True))
            y = self.drop(F.relu(self.fc7(y), inplace=True))
            score = self.conv_seg(y).float()  # float: coordinates in bf16 would be coarse
            grid = grid.after(FC6_KERNEL, 1, 0)  # fc7 and conv_seg are 1x1
            ys = torch.arange(h, device=score.device, dtype=score.dtype)
            xs = torch.arange(w, device=score.device, dtype=score.dtype)
            return resample(score, grid, ys, xs, self.edge)

    class BenchLoadLabel(BaseTransform):
        """gt_seg_map at full resolution from a palette PNG or an SBD cls/*.mat (255: ignore),
        checked against the image's original size."""

        def transform(self, results: dict) -> dict:
            path = Path(results["seg_map_path"])
            label = read_label(path)
            shape = tuple(results.get("ori_shape") or label.shape)
            if label.shape != shape:
                raise DatasetError(
                    f"{printable(path)}: label is {label.shape[1]}x{label.shape[0]}, its image "
                    f"{Path(results['img_path']).name} is {shape[1]}x{shape[0]}"
                )
            results["gt_seg_map"] = label
            results.setdefault("seg_fields", []).append("gt_seg_map")
            return results

    class BenchShrink(BaseTransform):
        """The native `shrink`: the image's longer side down to `max_size` when it is larger
        (PIL bilinear, same rounding); never enlarges; labels are left at full size."""

        def __init__(self, max_size: int | None) -> None:
            self.max_size = max_size

        def transform(self, results: dict) -> dict:
            img = results["img"]  # (H, W, 3) BGR uint8
            h, w = img.shape[:2]
            if self.max_size is None or max(h, w) <= self.max_size:
                return results
            rgb = shrink(Image.fromarray(np.ascontiguousarray(img[..., ::-1])), self.max_size)
            results["img"] = np.ascontiguousarray(rgb[..., ::-1])
            results["img_shape"] = rgb.shape[:2]
            results["scale_factor"] = (rgb.shape[1] / w, rgb.shape[0] / h)
            return results

    MODELS.register_module(module=BenchAlexNet, force=True)
    MODELS.register_module(module=BenchFCNHead, force=True)
    TRANSFORMS.register_module(module=BenchLoadLabel, force=True)
    TRANSFORMS.register_module(module=BenchShrink, force=True)
    _REGISTERED = True


# ---------------------------------------------------------------- configs built in code


def loss_config(normalize: bool) -> dict[str, Any]:
    """mmseg's softmax cross-entropy ignoring 255: the mean over non-ignored pixels
    (`normalize_loss`, PROTOCOL.md) or their sum."""
    return dict(
        type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, loss_name="loss_ce",
        avg_non_ignore=True, reduction="mean" if normalize else "sum",
    )  # fmt: skip


def model_config(cfg: SegmentationConfig, arch: str, pool_free: bool) -> dict[str, Any]:
    """The EncoderDecoder config (a plain dict; `build_model` makes it a ConfigDict)."""
    return dict(
        type="EncoderDecoder",
        _scope_="mmseg",  # nested parts (the data preprocessor) are looked up in mmseg too
        data_preprocessor=dict(
            type="SegDataPreProcessor",
            # the encoder's input convention: images load BGR, are made RGB when the
            # convention is, then (x - mean) / std (Caffe's for CaffeNet: BGR - (104, 117, 123))
            **framework_input("mmseg", ARCHS[arch].convention),
            size_divisor=1,  # one image a pass: nothing is padded
            pad_val=0,
            seg_pad_val=IGNORE_INDEX,
        ),
        backbone=dict(type="BenchAlexNet", arch=arch, pool_free=pool_free, pad=cfg.pad),
        decode_head=dict(
            type="BenchFCNHead",
            in_channels=AlexNetEncoder(arch, pool_free).out_channels,  # type: ignore[arg-type]
            channels=cfg.fc_dim,
            dropout=cfg.dropout,
            upsample=cfg.upsample,
            num_classes=NUM_CLASSES,
            ignore_index=IGNORE_INDEX,
            align_corners=False,
            loss_decode=loss_config(cfg.normalize_loss),
        ),
        train_cfg=dict(),
        test_cfg=dict(mode="whole"),
    )


def pipeline_config(max_size: int | None, mirror: bool, train: bool) -> list[dict[str, Any]]:
    """mmseg's per-sample pipeline: load (PIL's decoder, as the native loader; no EXIF
    rotation, which would break the image / label correspondence), full-size label, shrink
    only when `max_size` asks, flip when `mirror` (training), pack."""
    steps: list[dict[str, Any]] = [
        dict(
            type="LoadImageFromFile",
            imdecode_backend="pillow",
            color_type="color_ignore_orientation",
        ),  # fmt: skip
        dict(type="BenchLoadLabel"),
    ]
    if max_size is not None:
        steps.append(dict(type="BenchShrink", max_size=max_size))
    if train and mirror:
        steps.append(dict(type="RandomFlip", prob=0.5, direction="horizontal"))
    steps.append(dict(type="PackSegInputs"))
    return steps


def build_model(cfg: SegmentationConfig, arch: str, pool_free: bool) -> nn.Module:
    """The mmseg segmentor, built through mmseg's MODELS registry."""
    register()
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    with warnings.catch_warnings():  # BaseDecodeHead calls its own deprecated build_loss
        warnings.filterwarnings("ignore", message=".*build_loss.*deprecated")
        return MODELS.build(ConfigDict(model_config(cfg, arch, pool_free)))


def build_pipeline(steps: Sequence[dict[str, Any]]) -> Any:
    register()
    from mmengine.dataset import Compose
    from mmseg.registry import TRANSFORMS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    return Compose([TRANSFORMS.build({"_scope_": "mmseg", **step}) for step in steps])


# ---------------------------------------------------------------- data


def sample_info(sample: SegSample, index: int) -> dict[str, Any]:
    """The dict a mmseg dataset hands its pipeline."""
    return dict(
        img_path=str(sample.image_path), seg_map_path=str(sample.mask_path), seg_fields=[],
        reduce_zero_label=False, label_map=None, sample_idx=index,
    )  # fmt: skip


class MMSegTrainSet(Dataset):
    """Item (index, sample number) -> mmseg's packed sample (`inputs`, `data_samples`),
    every random choice a function of (seed, sample number). The pipeline is built on first
    use, so that DataLoader workers (fork or spawn) build their own."""

    def __init__(self, samples: Sequence[SegSample], steps: list[dict[str, Any]],
                 seed: int) -> None:  # fmt: skip
        self.samples, self.steps, self.seed = list(samples), steps, seed
        self._pipeline: Any = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pipeline": None}

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, sample = item
        if self._pipeline is None:
            self._pipeline = build_pipeline(self.steps)
        with loop.seeded_globals(loop.keyed_seed(self.seed, SAMPLE_STREAM, sample)):
            return self._pipeline(sample_info(self.samples[index], index))


# ---------------------------------------------------------------- weights


def mmseg_state(obj: Any) -> dict[str, torch.Tensor] | None:
    """The `backbone.*` tensors of a `bench export --format mmseg` file, else None."""
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        return None
    if not all(isinstance(k, str) and k.startswith("backbone.") for k in state):
        return None
    return state


def load_mmseg_encoder(weights: str | None, arch: str) -> tuple[AlexNetEncoder, dict[str, Any]]:
    """(encoder, model card) for `--weights`: an mmseg export (checked as every weights file
    is: keys, shapes, finite values; its arch from the card or the tensors), or anything
    `weights.encoder.load_encoder` reads."""
    from weights.encoder import encoder_from_state, load_encoder

    if weights:
        path = Path(weights).expanduser()
        if path.is_file() and path.suffix in (".pth", ".pt"):
            obj = torch_load_safe(path, "torch file")
            state = mmseg_state(obj)
            if state is not None:
                if not all(isinstance(v, torch.Tensor) for v in state.values()):
                    raise BenchError(f"{printable(path)}: state_dict holds non-tensor values")
                inner = {k.removeprefix("backbone."): v for k, v in state.items()}
                meta = obj.get("meta")
                card = {"method": "unknown", **(meta if isinstance(meta, dict) else {})}
                return encoder_from_state(inner, card, path, arch)
    return load_encoder(weights, arch)


# ---------------------------------------------------------------- training


def check_supported(cfg: SegmentationConfig) -> None:
    """One-line errors for what this backend does not run."""
    if cfg.variant != "fcn32s":
        raise ConfigError(
            f"variant: {cfg.variant!r} is native-only; backend mmseg runs FCN-32s "
            "(use backend: native)"
        )
    world = torchrun_world()
    if world > 1:
        raise ConfigError(
            f"backend mmseg runs in one process; torchrun started {world} (run it without "
            "torchrun, or use backend: native)"
        )


def rescale_(segmentor: nn.Module, samples: Sequence[SegSample], pretrained_encoder: bool,
             seed: int = 0, *, convention: InputConvention) -> list[dict]:  # fmt: skip
    """Krähenbühl et al.'s data-dependent init exactly as the native backend applies it
    (transfer.rescale on training images resized to 227x227, in the encoder's input
    `convention`), on the backbone, fc6, fc7 and conv_seg."""
    from transfer.rescale import rescale_for_transfer_

    from .data import rescale_batch

    x = rescale_batch(list(samples), next(segmentor.parameters()).device, convention)
    return rescale_for_transfer_(
        segmentor, lambda: segmentor.decode_head(segmentor.backbone(x)), "backbone.",
        pretrained_encoder, seed,
    )  # fmt: skip


def make_optimizer(model: nn.Module, t: SegmentationTrainConfig) -> torch.optim.Optimizer:
    """SGD (or Adam) with the native backend's (FCN-AlexNet's) multipliers: the score layer's
    bias (conv_seg, native score_fr) at 2x lr without decay, every other parameter at 1x with
    decay (Caffe's defaults where voc-fcn-alexnet/train.prototxt sets no `param`)."""
    score_bias, rest = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (score_bias if n == SCORE_BIAS else rest).append(p)
    groups = [
        {"params": rest, "lr": t.lr, "weight_decay": t.weight_decay},
        {"params": score_bias, "lr": t.lr * BIAS_LR_MULT, "weight_decay": 0.0},
    ]
    if t.solver == "adam":
        return loop.adam(groups, t.lr, (t.momentum, 0.999))
    return loop.sgd(groups, t.lr, t.momentum)


def one_image(item: dict[str, Any]) -> dict[str, list[Any]]:
    """A packed sample as a batch of one, the data preprocessor's input."""
    return {"inputs": [item["inputs"]], "data_samples": [item["data_samples"]]}


def make_step(
    model: nn.Module,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: loop.Precision,
    channels_last: bool,
):
    """One update as the native step: every image of the batch (batch_size x iter_size) its
    own pass, its loss weighted 1/(their number) (Caffe divides the accumulated gradient by
    iter_size), then one optimiser step. `model` is the plain segmentor, `net` what to call
    (compiled or not)."""

    def step(batch: list[dict[str, Any]], iteration: int) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        total, passes = 0.0, len(batch)
        for item in batch:
            data = model.data_preprocessor(one_image(item), True)
            if channels_last and data["inputs"].device.type == "cuda":
                data["inputs"] = data["inputs"].contiguous(memory_format=torch.channels_last)
            with precision.autocast():
                losses = net(**data, mode="loss")
            loss, _ = model.parse_losses(losses)  # sum of the loss_* terms (here loss_ce)
            loss = loss.float() / passes
            precision.backward(loss)
            total += float(loss.detach())
        precision.step(optimizer)
        return {"loss": total}

    return step


# ---------------------------------------------------------------- evaluation


class Evaluation(NamedTuple):
    hist: np.ndarray  # (21, 21) confusion matrix of our own count
    areas: tuple[np.ndarray, ...]  # IoUMetric's summed (intersect, union, pred, label)
    mmseg: dict[str, float]  # IoUMetric's own numbers (percent, rounded to 2 decimals)
    kept: list[tuple[SegSample, np.ndarray, np.ndarray, np.ndarray]]  # for overlays


@torch.no_grad()
def evaluate(
    model: nn.Module,
    samples: Sequence[SegSample],
    max_size: int | None,
    env: DistEnv,
    precision: loop.Precision | None = None,
    keep: int = 0,
    steps: Sequence[dict[str, Any]] | None = None,
) -> Evaluation:
    """Whole-image predictions (mmseg's predict, scores resized to the label) of the model
    in eval mode, scored by mmseg's IoUMetric and by our confusion matrix on the same
    predictions; (sample, network image RGB, label, prediction) of the first `keep`.
    `steps`: the test pipeline (default FCN-AlexNet's, shrinking to `max_size`)."""
    register()
    from mmseg.evaluation import IoUMetric

    from .data import CLASSES

    model.eval()
    pipeline = build_pipeline(steps or pipeline_config(max_size, False, train=False))
    metric = IoUMetric(ignore_index=IGNORE_INDEX, iou_metrics=["mIoU"], prefix="mmseg")
    metric.dataset_meta = {"classes": CLASSES}
    hist = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    kept = []
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    for n, sample in enumerate(samples):
        item = pipeline(sample_info(sample, n))
        data = model.data_preprocessor(one_image(item), False)
        with autocast():
            (out,) = model(**data, mode="predict")
        metric.process({}, [out.to_dict()])
        pred = out.pred_sem_seg.data[0].to(torch.uint8).cpu().numpy()
        label = out.gt_sem_seg.data[0].cpu().numpy().astype(np.uint8)
        hist += confusion_matrix(pred, label, NUM_CLASSES, ignore_index=IGNORE_INDEX)
        if n < keep:
            image = item["inputs"].permute(1, 2, 0).numpy()[..., ::-1]  # BGR CHW -> RGB HWC
            kept.append((sample, np.ascontiguousarray(image), label, pred))
    if not metric.results:
        raise BenchError("the evaluation set is empty")
    # float64: float32 sums of pixel counts lose exactness past 2**24 pixels
    areas = tuple(torch.stack(list(c)).double().sum(0).numpy() for c in zip(*metric.results))
    with _quiet_mmengine():
        theirs = metric.compute_metrics(metric.results)
    metric.results.clear()
    # IoUMetric's values are float32 percentages rounded to 2 decimals: kept as such
    return Evaluation(hist, areas, {k: round(float(v), 2) for k, v in theirs.items()}, kept)


@contextlib.contextmanager
def _quiet_mmengine() -> Iterator[None]:
    """IoUMetric prints a per-class table through mmengine's logger; ours logs the scores."""
    import logging

    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def scores_from_areas(
    intersect: np.ndarray, union: np.ndarray, label_area: np.ndarray, classes: tuple[str, ...]
) -> dict[str, Any]:
    """metrics.json's segmentation keys from mmseg's summed areas (same definitions as FCN:
    classes with an empty union are left out of the means)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        iu = intersect / union
        acc = intersect / label_area

    def mean(x: np.ndarray) -> float | None:
        x = x[~np.isnan(x)]
        return float(x.mean()) if x.size else None

    total = label_area.sum()
    return {
        "mean_iu": mean(iu),
        "pixel_acc": float(intersect.sum() / total) if total else None,
        "mean_acc": mean(acc),
        "per_class": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, iu)},
    }


# ---------------------------------------------------------------- the stage


def run_mmseg(cfg: SegmentationConfig, run: Run) -> dict[str, Any]:
    """Train through `loop.fit` and evaluate; writes metrics.json as the native backend."""
    from transfer import common
    from transfer.backbone import describe_transfer

    from .data import CLASSES, prepare_data
    from .evaluate import OVERLAY_DIR, save_overlays, scores_from_hist

    check_supported(cfg)
    register()
    t = cfg.train
    env = loop.setup(cfg.device, t)
    torch.manual_seed(cfg.seed)
    data, skipped = prepare_data(cfg, run)

    encoder, card = load_mmseg_encoder(cfg.weights, cfg.arch)
    arch, pool_free = str(card["arch"]), bool(card.get("pool_free", False))
    model = build_model(cfg, arch, pool_free)
    model.backbone.load_state_dict(encoder.state_dict())
    del encoder
    model.to(env.device)
    if cfg.rescale and run.checkpoint is None:
        from transfer.rescale import format_report

        report = rescale_(
            model, data.train[: cfg.rescale_images], card["method"] != "random", cfg.seed,
            convention=ARCHS[arch].convention,
        )  # fmt: skip
        run.logger.info("data-dependent init: " + format_report(report))
    describe_transfer(model, (), run.logger)
    net = loop.prepare_model(model, env, t, ddp=False)
    model.train()
    optimizer = make_optimizer(model, t)
    precision = loop.Precision(t.precision, env.device)

    def interim(iteration: int) -> None:
        if iteration == t.iterations:
            return  # the final evaluation below scores this iteration
        ev = evaluate(model, data.eval, cfg.max_size, env, precision)
        scores = scores_from_hist(ev.hist, CLASSES)
        run.log_scalars(iteration, {k: scores[k] or 0.0 for k in ("mean_iu", "pixel_acc")},
                        prefix="val/")  # fmt: skip
        run.logger.info(f"iteration {iteration}: mean IU {scores['mean_iu']}")
        model.train()

    train_set = MMSegTrainSet(data.train, pipeline_config(cfg.max_size, cfg.mirror, True), cfg.seed)
    result = loop.fit(
        run, env, t, stage=STAGE, config=cfg, seed=cfg.seed,
        step=make_step(model, net, optimizer, precision, t.channels_last),
        batches=loop.loader_batches(
            train_set, t.batch_size * t.iter_size, cfg.seed, env, t.workers,
            collate_fn=loop.list_collate,
        ),
        state={"model": net, "optimizer": optimizer}, precision=precision,
        hooks=[loop.Hook(cfg.eval_every, interim, at_end=False)], desc="segmentation (mmseg)",
        input_convention=ARCHS[arch].convention.name,
    )  # fmt: skip

    tick = time.perf_counter()
    ev = evaluate(model, data.eval, cfg.max_size, env, precision, keep=cfg.save_overlays)
    scores = scores_from_hist(ev.hist, CLASSES)
    theirs = scores_from_areas(ev.areas[0], ev.areas[1], ev.areas[3], CLASSES)
    if (theirs["mean_iu"] is None) != (scores["mean_iu"] is None) or (
        scores["mean_iu"] is not None and abs(theirs["mean_iu"] - scores["mean_iu"]) > 1e-9
    ):
        run.logger.warning(
            f"mmseg's IoUMetric gives mean IU {theirs['mean_iu']}, our confusion matrix "
            f"{scores['mean_iu']} on the same predictions"
        )
    overlays = save_overlays(run.file(OVERLAY_DIR), ev.kept) if run.is_main and ev.kept else []
    metrics = {
        **common.metrics_head("segmentation", "mmseg", cfg, run, card, arch,
                            device=env.device, precision=result.precision),
        "variant": cfg.variant,
        "head": HEAD,
        "rescale": cfg.rescale,
        **scores,
        "mmseg_iou_metric": {**ev.mmseg, "mean_iu_exact": theirs["mean_iu"]},
        "split": data.split, "eval_images": len(data.eval),
        "train_images": len(data.train), "train_sources": data.train_sources,
        **loop.fit_fields(result, env.device), "iter_size": t.iter_size,
        "eval_seconds": time.perf_counter() - tick,
        "skipped": common.skipped_field(skipped),
        "confusion_matrix": ev.hist.tolist(),
        "overlays": [f"{OVERLAY_DIR}/{n}" for n in overlays],
    }  # fmt: skip
    run.log_scalars(result.iterations, {"mean_iu": scores["mean_iu"] or 0.0}, prefix="val/")
    run.logger.info(
        f"segmentation (mmseg, {data.split}): mean IU {scores['mean_iu']} (mmseg IoUMetric "
        f"mIoU {ev.mmseg.get('mIoU')}%), pixel acc {scores['pixel_acc']}, mean acc "
        f"{scores['mean_acc']}"
    )
    run.write_metrics(metrics)
    return metrics
