"""`backend: mmseg`: the same transfer job run by mmsegmentation 1.2.2 / mmengine.

What comes from mmseg: the segmentor (EncoderDecoder), the decode head (FCNHead: two convs
of `fc_dim` channels, dropout, 21-way classifier), the loss (CrossEntropyLoss ignoring 255,
averaged over non-ignored pixels), the data preprocessor, the transforms, mmengine's Runner
(IterBasedTrainLoop, checkpoints, resume, logging) and IoUMetric. What comes from us: the
encoder, registered as mmseg backbone `BenchAlexNet` (an `nn.Sequential` named `features` in
torchvision layout, so `bench export --format mmseg` files load through init_cfg
`Pretrained` with prefix `backbone.`), the VOC2012 + SBD sample lists (`data.py`) and a
label loader that reads both palette PNGs and SBD `.mat` files.

Alignment: the backbone pads the image by FCN's 100 pixels and resamples pool5 onto the
ceil(h/32) x ceil(w/32) grid whose cells mmseg's final resize (align_corners=False) maps
back onto their own image pixels, so mmseg's outputs line up with the input too.

mmseg is imported lazily: without it this backend fails with one line naming `make mmseg`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmark.errors import BenchError
from benchmark.runs import Run, atomic_torch_save, atomic_write_text
from pretrain.alexnet import PIXEL_MEAN, PIXEL_STD, AlexNetEncoder

from .config import SegmentationConfig
from .model import FCN_PAD, Grid, feature_grids, resample, smallest_pad

INSTALL_HINT = (
    "backend mmseg needs mmsegmentation 1.2.2 with mmcv 2.1.0 compiled ops "
    "(run `make mmseg`, i.e. tools/mmseg-setup.sh)"
)
WORK_DIR = "mmseg"
BACKBONE_FILE = "backbone_mmseg.pth"


def require_mmseg() -> None:
    """Import mmseg, mmengine and mmcv's compiled ops, or raise a one-line BenchError."""
    try:
        import mmcv.ops  # noqa: F401  (the compiled extension)
        import mmengine  # noqa: F401
        import mmseg  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, version asserts, missing .so
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BenchError(f"{INSTALL_HINT}; import failed: {reason}") from None


_REGISTERED = False


def register() -> None:
    """Register our backbone, dataset, label loader and metric in mmseg's registries."""
    global _REGISTERED
    if _REGISTERED:
        return
    require_mmseg()
    from mmcv.transforms import BaseTransform
    from mmengine.model import BaseModule
    from mmseg.datasets import BaseSegDataset
    from mmseg.evaluation import IoUMetric
    from mmseg.registry import DATASETS, METRICS, MODELS, TRANSFORMS

    from benchmark.datasets.voc import VOC_PALETTE, read_label

    from .data import CLASSES

    class BenchAlexNet(BaseModule):
        """Our AlexNet encoder as an mmseg backbone; returns pool5 on mmseg's output grid."""

        def __init__(
            self,
            arch: str = "caffenet",
            pool_free: bool = False,
            pad: int = FCN_PAD,
            init_cfg: dict | None = None,
        ) -> None:
            super().__init__(init_cfg)
            self.features = AlexNetEncoder(arch, pool_free).features  # type: ignore[arg-type]
            self.pad = pad
            self.grid = feature_grids(self.features, 0)[-1]

        def _pad_for(self, size: int) -> int:
            return smallest_pad(size, self.pad, self.features, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            h, w = x.shape[-2:]
            pad = self._pad_for(min(h, w))
            y = self.features(F.pad(x, (pad,) * 4))
            grid = Grid(self.grid.offset - pad, self.grid.stride)
            stride = int(self.grid.stride)
            nh, nw = math.ceil(h / stride), math.ceil(w / stride)
            ys = (torch.arange(nh, device=x.device) + 0.5) * (h / nh) - 0.5
            xs = (torch.arange(nw, device=x.device) + 0.5) * (w / nw) - 0.5
            return (resample(y, grid, ys, xs),)

    class BenchVOCDataset(BaseSegDataset):
        """Sample list from a JSON file of {img_path, seg_map_path} (VOC PNG or SBD .mat)."""

        METAINFO = dict(classes=CLASSES, palette=VOC_PALETTE[: len(CLASSES)].tolist())

        def load_data_list(self) -> list[dict]:
            rows = json.loads(Path(self.ann_file).read_text())
            return [
                dict(
                    img_path=r["img_path"],
                    seg_map_path=r["seg_map_path"],
                    seg_fields=[],
                    label_map=None,
                    reduce_zero_label=False,
                )
                for r in rows
            ]

    class BenchLoadLabel(BaseTransform):
        """gt_seg_map from a palette PNG or an SBD cls/*.mat (255 = ignore)."""

        def transform(self, results: dict) -> dict:
            results["gt_seg_map"] = read_label(Path(results["seg_map_path"]))
            results.setdefault("seg_fields", []).append("gt_seg_map")
            return results

    class BenchIoUMetric(IoUMetric):
        """mmseg's IoUMetric that also keeps the unrounded summed areas and the first
        `keep` predictions (for overlays)."""

        def __init__(self, keep: int = 0, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.keep = keep
            self.kept: list[tuple[str, np.ndarray, np.ndarray]] = []  # last evaluation's
            self._pending: list[tuple[str, np.ndarray, np.ndarray]] = []
            self.last_areas: tuple[np.ndarray, ...] | None = None

        def process(self, data_batch: dict, data_samples: Any) -> None:
            super().process(data_batch, data_samples)
            for s in data_samples:
                if len(self._pending) < self.keep:
                    pred = s["pred_sem_seg"]["data"].squeeze().cpu().numpy().astype(np.uint8)
                    gt = s["gt_sem_seg"]["data"].squeeze().cpu().numpy().astype(np.uint8)
                    self._pending.append((s["img_path"], gt, pred))

        def compute_metrics(self, results: list) -> dict[str, float]:
            cols = tuple(zip(*results))
            # float64: float32 sums of pixel counts lose exactness past 2**24 pixels
            self.last_areas = tuple(torch.stack(list(c)).double().sum(0).numpy() for c in cols)
            self.kept, self._pending = self._pending, []
            return super().compute_metrics(results)

    MODELS.register_module(module=BenchAlexNet, force=True)
    DATASETS.register_module(module=BenchVOCDataset, force=True)
    TRANSFORMS.register_module(module=BenchLoadLabel, force=True)
    METRICS.register_module(module=BenchIoUMetric, force=True)
    _REGISTERED = True


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


def mmseg_weights(cfg: SegmentationConfig, run: Run) -> tuple[Path | None, dict[str, Any], str]:
    """(checkpoint for init_cfg, model card, arch). An `bench export --format mmseg` file is
    used as it is; any other weights are loaded (and checked) by transfer.backbone and
    written in the mmseg layout into the run folder."""
    from transfer.backbone import load_encoder

    if cfg.weights:
        path = Path(cfg.weights).expanduser()
        if path.is_file() and path.suffix in (".pth", ".pt"):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - not a torch file: load_encoder will say why
                obj = None
            state = obj.get("state_dict") if isinstance(obj, dict) else None
            if isinstance(state, dict) and state and all(k.startswith("backbone.") for k in state):
                encoder, card = load_encoder_from_state(state, obj.get("meta") or {}, path)
                return path, card, encoder.arch
    encoder, card = load_encoder(cfg.weights, cfg.arch)
    if cfg.weights is None:
        return None, card, encoder.arch
    out = run.file(f"{WORK_DIR}/{BACKBONE_FILE}")
    state = {f"backbone.{k}": v for k, v in encoder.state_dict().items()}
    atomic_torch_save(out, {"state_dict": state, "meta": card})
    return out, card, encoder.arch


def load_encoder_from_state(
    state: dict[str, torch.Tensor], meta: dict[str, Any], path: Path
) -> tuple[AlexNetEncoder, dict[str, Any]]:
    """Check an mmseg-layout state dict against the encoder it claims to be."""
    from transfer.backbone import infer_arch, load_state_checked

    inner = {k.removeprefix("backbone."): v for k, v in state.items()}
    card = dict(meta)
    card.setdefault("method", "unknown")
    arch = card.get("arch") or infer_arch(inner, path) or "caffenet"
    pool_free = bool(card.get("pool_free", "features.2.weight" in inner))
    encoder = AlexNetEncoder(arch, pool_free)  # type: ignore[arg-type]
    load_state_checked(encoder, inner, path)
    card.update(arch=arch, pool_free=pool_free, source=str(path))
    return encoder, card


@contextmanager
def trusted_checkpoints() -> Iterator[None]:
    """mmengine's resume checkpoints hold its bookkeeping (numpy arrays, message hub), which
    torch's weights-only loading refuses; they are this run folder's own files."""
    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _sample_file(run: Run, name: str, samples: list) -> str:
    rows = [{"img_path": str(s.image_path), "seg_map_path": str(s.mask_path)} for s in samples]
    path = run.file(f"{WORK_DIR}/{name}.json")
    atomic_write_text(path, json.dumps(rows))
    return str(path)


def build_config(
    cfg: SegmentationConfig,
    run: Run,
    train_file: str,
    eval_file: str,
    checkpoint: Path | None,
    arch: str,
    pool_free: bool,
) -> dict[str, Any]:
    """The mmseg/mmengine config, built in code (no config files to keep in sync)."""
    resize = (
        [dict(type="Resize", scale=(cfg.max_size, cfg.max_size), keep_ratio=True)]
        if cfg.max_size
        else []
    )
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="BenchLoadLabel"),
        *resize,
        *([dict(type="RandomFlip", prob=0.5)] if cfg.mirror else []),
        dict(type="PackSegInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        *resize,
        dict(type="BenchLoadLabel"),
        dict(type="PackSegInputs"),
    ]
    backbone: dict[str, Any] = dict(
        type="BenchAlexNet", arch=arch, pool_free=pool_free, pad=cfg.pad
    )
    if checkpoint is not None:
        backbone["init_cfg"] = dict(
            type="Pretrained", checkpoint=str(checkpoint), prefix="backbone."
        )
    optimizer: dict[str, Any] = (
        dict(type="Adam", lr=cfg.lr, betas=(cfg.momentum, 0.999))
        if cfg.solver == "adam"
        else dict(type="SGD", lr=cfg.lr, momentum=cfg.momentum)
    )
    optimizer["weight_decay"] = cfg.weight_decay
    workers = 0
    val_interval = cfg.eval_every or max(cfg.iterations, 1)
    return dict(
        default_scope="mmseg",
        work_dir=str(run.file(WORK_DIR)),
        model=dict(
            type="EncoderDecoder",
            data_preprocessor=dict(
                type="SegDataPreProcessor",
                mean=[255 * m for m in PIXEL_MEAN],
                std=[255 * s for s in PIXEL_STD],
                bgr_to_rgb=True,
                size_divisor=1,  # batches pad to their largest image, nothing more
                pad_val=0,
                seg_pad_val=255,
            ),
            backbone=backbone,
            decode_head=dict(
                type="FCNHead",
                in_channels=256,
                in_index=0,
                channels=cfg.fc_dim,
                num_convs=2,
                kernel_size=3,
                concat_input=False,
                dropout_ratio=cfg.dropout,
                num_classes=21,
                norm_cfg=None,
                align_corners=False,
                loss_decode=dict(
                    type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True
                ),
            ),
            train_cfg=dict(),
            test_cfg=dict(mode="whole"),
        ),
        train_dataloader=dict(
            batch_size=cfg.batch_size,
            num_workers=workers,
            persistent_workers=False,
            sampler=dict(type="InfiniteSampler", shuffle=True, seed=cfg.seed),
            dataset=dict(type="BenchVOCDataset", ann_file=train_file, pipeline=train_pipeline),
        ),
        val_dataloader=dict(
            batch_size=1,
            num_workers=workers,
            persistent_workers=False,
            sampler=dict(type="DefaultSampler", shuffle=False),
            dataset=dict(
                type="BenchVOCDataset", ann_file=eval_file, pipeline=test_pipeline, test_mode=True
            ),
        ),
        val_evaluator=dict(type="BenchIoUMetric", iou_metrics=["mIoU"], keep=cfg.save_overlays),
        train_cfg=dict(
            type="IterBasedTrainLoop", max_iters=max(cfg.iterations, 1), val_interval=val_interval
        ),
        val_cfg=dict(type="ValLoop"),
        optim_wrapper=dict(
            type="OptimWrapper",
            optimizer=optimizer,
            paramwise_cfg=dict(bias_lr_mult=2.0, bias_decay_mult=0.0),
        ),
        # no param_scheduler: FCN's learning rate is fixed
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=cfg.log_every, log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(
                type="CheckpointHook",
                by_epoch=False,
                interval=cfg.checkpoint_every,
                max_keep_ckpts=1,
                save_last=True,
            ),
            sampler_seed=dict(type="DistSamplerSeedHook"),
        ),
        log_processor=dict(by_epoch=False),
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="nccl")),
        randomness=dict(seed=cfg.seed),
        launcher="none",
        log_level="INFO",
        resume=run.resumed,
    )


def run_mmseg(cfg: SegmentationConfig, run: Run) -> dict[str, Any]:
    """Train and evaluate through mmengine's Runner; writes metrics.json like the native one."""
    import time

    from transfer.common import metrics_head

    from .data import CLASSES, prepare_data
    from .evaluate import OVERLAY_DIR, overlay_png

    register()
    if cfg.variant != "fcn32s":
        raise BenchError(f"variant: {cfg.variant!r} is native-only; the mmseg backend runs FCNHead")
    from mmengine.config import Config
    from mmengine.runner import Runner

    data = prepare_data(cfg, run)
    checkpoint, card, arch = mmseg_weights(cfg, run)
    pool_free = bool(card.get("pool_free", False))
    train_file = _sample_file(run, "train", data.train)
    eval_file = _sample_file(run, "eval", data.eval)
    mm_cfg = build_config(cfg, run, train_file, eval_file, checkpoint, arch, pool_free)
    runner = Runner.from_cfg(Config(mm_cfg))
    tick = time.perf_counter()
    with trusted_checkpoints() if run.resumed else nullcontext():
        if cfg.iterations > 0:
            runner.train()  # evaluates at the end (and every eval_every iterations)
        metric = runner.val_loop.evaluator.metrics[0]
        if metric.last_areas is None:  # no training, or a resumed run that had finished it
            if cfg.iterations == 0:
                runner.model.init_weights()  # Runner.val() alone would skip init_cfg
            runner.val()
    seconds = time.perf_counter() - tick
    if metric.last_areas is None:
        raise BenchError(f"{run.path}: mmseg evaluation produced no results")
    intersect, union, _, label_area = metric.last_areas
    scores = scores_from_areas(intersect, union, label_area, CLASSES)
    overlays = []
    if run.is_main:
        from benchmark.datasets.folder import load_rgb
        from benchmark.runs import atomic_write_bytes

        for img_path, gt, pred in metric.kept:
            name = f"{Path(img_path).stem}.png"
            image = np.asarray(load_rgb(Path(img_path)))
            atomic_write_bytes(run.file(f"{OVERLAY_DIR}/{name}"), overlay_png(image, gt, pred))
            overlays.append(f"{OVERLAY_DIR}/{name}")
    metrics = {
        **metrics_head("segmentation", "mmseg", cfg, run, card, arch),
        "variant": "fcn32s-mmseg-fcnhead",
        **scores,
        "split": data.split,
        "eval_images": len(data.eval),
        "train_images": len(data.train),
        "train_sources": data.train_sources,
        "iterations": cfg.iterations,
        "train_seconds": seconds,
        "overlays": overlays,
    }
    run.logger.info(f"segmentation (mmseg, {data.split}): mean IU {scores['mean_iu']}")
    run.write_metrics(metrics)
    return metrics
