"""`backend: mmseg` for a ResNet encoder: mmsegmentation's own fcn_r50-d8 VOC12aug protocol,
trained by bench's loop (`benchmark.loop.fit`), as `mmseg_backend.py` runs FCN-AlexNet.

mmseg's parts: `EncoderDecoder` with mmseg's `ResNet` backbone (style pytorch, strides
(1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation: MMSelfSup's benchmark backbone for
torchvision-layout checkpoints, whose keys are torchvision's), its `FCNHead` decode head
(2 convs of 512, concat_input, dropout 0.1) and auxiliary FCNHead on res4 (256, loss 0.4),
`CrossEntropyLoss` (avg_non_ignore False), `SegDataPreProcessor` (the encoder's input
convention), mmseg's training pipeline (RandomResize, RandomCrop with cat_max_ratio, RandomFlip,
PhotoMetricDistortion, Pad) and test pipeline (Resize keep_ratio), `IoUMetric`. The values
are `fcn_resnet:`'s, the native backend's (`fcn_resnet_train.py`).

Ours: the loop (checkpoints, resume, NaN guard; no mmengine checkpoint is written or read),
the sample lists (`fcn_resnet_train.train_samples`: train + aug), the encoder's tensors
copied into the backbone (`weights.encoder.load_encoder`), poly lr as a function of the
iteration, every random choice of a sample drawn from globals seeded by (seed, sample).
mmseg's ResNet has no bottleneck width option: the encoder must have torchvision's widths
(width_per_group 64; any depth). BN: plain BatchNorm in one process (SyncBN's statistic
there); torchrun is refused, as for FCN-AlexNet.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmark import loop
from benchmark.datasets.voc import IGNORE_INDEX
from benchmark.errors import BenchError, ConfigError
from benchmark.runs import Run
from transfer.segmentation.config import FCNResNetConfig, SegmentationConfig
from transfer.segmentation.fcn_resnet import poly_lr
from weights.native import framework_input

from . import mmseg_backend as mb

STAGE = "transfer/segmentation/mmseg"


def backbone_class() -> type:
    """mmseg's ResNet taking its stage depths from the encoder (`stage_blocks`)."""
    from mmseg.models.backbones import ResNet
    from mmseg.models.backbones.resnet import Bottleneck
    from mmseg.registry import MODELS

    class BenchResNet(ResNet):
        def __init__(self, stage_blocks: list[int], **kwargs: Any) -> None:
            self.arch_settings = {0: (Bottleneck, tuple(stage_blocks))}
            super().__init__(depth=0, **kwargs)

    MODELS.register_module(module=BenchResNet, force=True)
    return BenchResNet


def model_config(c: FCNResNetConfig, layers: list[int], convention: Any) -> dict[str, Any]:
    """mmseg's fcn_r50-d8 (configs/_base_/models/fcn_r50-d8.py) with the `fcn_resnet` values."""
    norm = dict(type="BN", requires_grad=True)

    def head(cin: int, ch: int, convs: int, concat: bool, index: int, weight: float) -> dict:
        return dict(
            type="FCNHead", in_channels=cin, in_index=index, channels=ch, num_convs=convs,
            concat_input=concat, dropout_ratio=c.dropout, num_classes=mb.NUM_CLASSES,
            norm_cfg=norm, align_corners=False, ignore_index=IGNORE_INDEX,
            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=weight),
        )  # fmt: skip

    config = dict(
        type="EncoderDecoder",
        _scope_="mmseg",
        data_preprocessor=dict(
            type="SegDataPreProcessor", **framework_input("mmseg", convention),
            size=(c.crop_size, c.crop_size), pad_val=0, seg_pad_val=IGNORE_INDEX,
        ),  # fmt: skip
        backbone=dict(
            type="BenchResNet", stage_blocks=list(layers), num_stages=4,
            out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1),
            norm_cfg=norm, norm_eval=c.norm == "frozen", style="pytorch", contract_dilation=True,
        ),  # fmt: skip
        decode_head=head(2048, c.channels, 2, True, 3, 1.0),
        train_cfg=dict(),
        test_cfg=dict(mode="whole"),
    )
    if c.aux_weight:
        config["auxiliary_head"] = head(1024, c.aux_channels, 1, False, 2, c.aux_weight)
    return config


def pipelines(c: FCNResNetConfig) -> tuple[list[dict], list[dict]]:
    """(train, test) pipelines: mmseg's pascal_voc12_aug.py with bench's label loader."""
    load = dict(type="LoadImageFromFile", imdecode_backend="pillow",
                color_type="color_ignore_orientation")  # fmt: skip
    train: list[dict] = [load, dict(type="BenchLoadLabel"),
                         dict(type="RandomResize", scale=tuple(c.scale),
                              ratio_range=tuple(c.ratio_range), keep_ratio=True),
                         dict(type="RandomCrop", crop_size=(c.crop_size, c.crop_size),
                              cat_max_ratio=c.cat_max_ratio)]  # fmt: skip
    if c.flip:
        train.append(dict(type="RandomFlip", prob=0.5))
    if c.photometric:
        train.append(dict(type="PhotoMetricDistortion"))
    train += [dict(type="Pad", size=(c.crop_size, c.crop_size)), dict(type="PackSegInputs")]
    test = [load, dict(type="Resize", scale=tuple(c.scale), keep_ratio=True),
            dict(type="BenchLoadLabel"), dict(type="PackSegInputs")]  # fmt: skip
    return train, test


def check_supported(cfg: SegmentationConfig, encoder: Any) -> None:
    if getattr(encoder, "width_per_group", 64) != 64:
        raise ConfigError(
            f"backend mmseg: mmseg's ResNet has torchvision's bottleneck widths only; the "
            f"encoder {encoder.arch} has width_per_group {encoder.width_per_group}"
        )
    world = mb.torchrun_world()
    if world > 1:
        raise ConfigError(f"backend mmseg runs in one process; torchrun started {world}")


def build(c: FCNResNetConfig, encoder: Any) -> nn.Module:
    mb.register()
    backbone_class()
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*build_loss.*deprecated")
        model = MODELS.build(ConfigDict(model_config(c, list(encoder.layers),
                                                     encoder.input_convention)))  # fmt: skip
    model.init_weights()  # ConvModule's Kaiming init, conv_seg N(0, 0.01): mmseg's runner does
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pools.")}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BenchError(f"mmseg ResNet: encoder keys do not fit (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")  # fmt: skip
    return model


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, c: FCNResNetConfig,
              precision: loop.Precision):  # fmt: skip
    t = c.train

    def step(batch: list[dict[str, Any]], iteration: int) -> dict[str, Any]:
        lr = poly_lr(t.lr, t.min_lr, t.poly_power, t.iterations, iteration)
        for g in optimizer.param_groups:
            g["lr"] = lr
        data = model.data_preprocessor({"inputs": [b["inputs"] for b in batch],
                                        "data_samples": [b["data_samples"] for b in batch]},
                                       True)  # fmt: skip
        with precision.autocast():
            losses = model(**data, mode="loss")
        loss, parts = model.parse_losses(losses)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss.float())
        precision.step(optimizer)
        return {"loss": loss.detach(), **{k: float(v) for k, v in parts.items() if k != "loss"},
                "lr": lr}  # fmt: skip

    return step


def run_mmseg_resnet(cfg: SegmentationConfig, run: Run) -> dict[str, Any]:
    """Train mmseg's FCN-R50-d8 through `loop.fit`, evaluate, write metrics.json."""
    from transfer import common
    from transfer.encoder_family import load_resnet

    from .data import CLASSES
    from .evaluate import scores_from_hist
    from .fcn_resnet_train import prepare

    mb.require_mmseg()
    c, t = cfg.fcn_resnet, cfg.fcn_resnet.train
    env = loop.setup(cfg.device, t)
    torch.manual_seed(cfg.seed)
    train, evaluation, skipped = prepare(cfg, run)
    encoder, card = load_resnet(cfg.weights, cfg.arch, "FCN-ResNet segmentation (mmseg)")
    check_supported(cfg, encoder)
    model = build(c, encoder)
    convention = encoder.input_convention
    del encoder
    model.to(env.device).train()
    net = loop.prepare_model(model, env, t, ddp=False)
    optimizer = loop.sgd([p for p in model.parameters() if p.requires_grad], t.lr, t.momentum,
                         weight_decay=t.weight_decay)  # fmt: skip
    precision = loop.Precision(t.precision, env.device)
    train_steps, test_steps = pipelines(c)
    result = loop.fit(
        run, env, t, stage=STAGE, config=cfg, seed=cfg.seed,
        step=make_step(model, optimizer, c, precision),
        batches=loop.loader_batches(mb.MMSegTrainSet(train, train_steps, cfg.seed), t.batch_size,
                                    cfg.seed, env, t.workers, collate_fn=loop.list_collate),
        state={"model": net, "optimizer": optimizer}, precision=precision,
        desc="fcn r50-d8 (mmseg)", input_convention=convention.name,
    )  # fmt: skip
    tick = time.perf_counter()
    ev = mb.evaluate(model, evaluation, None, env, precision, steps=test_steps)
    scores = scores_from_hist(ev.hist, CLASSES)
    theirs = mb.scores_from_areas(ev.areas[0], ev.areas[1], ev.areas[3], CLASSES)
    metrics = {
        **common.metrics_head("segmentation", "mmseg", cfg, run, card, card.get("arch"),
                              device=env.device, precision=result.precision),
        "model": "fcn-resnet-d8",
        **scores,
        "mmseg_iou_metric": {**ev.mmseg, "mean_iu_exact": theirs["mean_iu"]},
        "split": f"voc2012-{c.split}", "eval_images": len(evaluation),
        "train_images": len(train), **loop.fit_fields(result, env.device),
        "eval_seconds": time.perf_counter() - tick,
        "skipped": common.skipped_field(skipped),
        "confusion_matrix": ev.hist.tolist(),
    }  # fmt: skip
    if np.isfinite(theirs["mean_iu"] or np.nan) and scores["mean_iu"] is not None and abs(
            theirs["mean_iu"] - scores["mean_iu"]) > 1e-9:  # fmt: skip
        run.logger.warning(f"mmseg's IoUMetric gives mean IU {theirs['mean_iu']}, our "
                           f"confusion matrix {scores['mean_iu']}")  # fmt: skip
    run.logger.info(f"segmentation (mmseg, voc2012-{c.split}): mean IU {scores['mean_iu']}")
    run.write_metrics(metrics)
    return metrics
