"""`bench transfer --task detection` for a ResNet encoder: MoCo's VOC protocol, Faster R-CNN
R50-C4 fine-tuned on VOC07+12 trainval and tested on VOC07 test (`faster_rcnn.py`).

Images as detectron2's DatasetMapper makes them for that config: the shorter side one of
`min_size_train` (drawn per image), the longer at most `max_size_train`
(ResizeShortestEdge's rounding), mirrored with probability 0.5; boxes are the annotation's
with x1, y1 minus 1 (detectron2's VOC loader), scaled with the image. Every random choice of
a sample is a function of (seed, sample number), so a resumed run sees the same batches.
Batches are formed in sampler order (detectron2 groups images of like aspect ratio,
ASPECT_RATIO_GROUPING; that changes padding only). After training, TEST.PRECISE_BN
recomputes every BN's statistics over `precise_bn_iters` training batches, then the test
images are detected at `min_size_test` and scored by the devkit's AP50 (`map`) and by
detectron2's PascalVOCDetectionEvaluator (`ap`, `ap50`, `ap75`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from benchmark import distributed, loop
from benchmark.datasets.preflight import checked_voc_ids
from benchmark.datasets.resolve import resolve_data
from benchmark.datasets.voc import VOC_CLASSES
from benchmark.distributed import DistEnv
from benchmark.errors import ConfigError, DatasetError
from benchmark.input_convention import InputConvention
from benchmark.runs import Run
from transfer import common
from transfer.detection.config import DetectionConfig, FasterRCNNConfig
from transfer.detection.data import DetRecord, load_records
from transfer.detection.evaluate import (
    Detections,
    detectron2_voc_ap,
    score_fields,
    voc07_scores,
    write_results_files,
)
from transfer.detection.faster_rcnn import FasterRCNNC4, lr_at, param_groups
from transfer.encoder_family import load_resnet

STAGE = "transfer/detection"
YEARS = ("2007", "2012")


def check_faster_rcnn(c: FasterRCNNConfig) -> None:
    """The R50-C4 settings no run can use, as one-line errors."""
    for key in ("train_sets", "test_set"):
        for item in (c.train_sets if key == "train_sets" else (c.test_set,)):
            year, _, split = str(item).partition(":")
            if year not in YEARS or not split:
                raise ConfigError(f"faster_rcnn.{key}: {item!r} must be '<2007|2012>:<split>'")
    if not c.train_sets:
        raise ConfigError("faster_rcnn.train_sets: at least one '<year>:<split>'")
    sizes = [*c.min_size_train, c.max_size_train, c.min_size_test, c.max_size_test]
    if not c.min_size_train or min(sizes) < 1:
        raise ConfigError("faster_rcnn: image sizes must be >= 1")
    if not 0 <= c.freeze_at <= 4:
        raise ConfigError(f"faster_rcnn.freeze_at: {c.freeze_at} must be 0 (none) .. 4 (res4)")
    if c.precise_bn_iters < 0 or c.pooler_resolution < 1 or c.detections_per_image < 1:
        raise ConfigError("faster_rcnn: precise_bn_iters >= 0, pooler_resolution and "
                          "detections_per_image >= 1")  # fmt: skip
    t = c.train
    loop.check_loop(t, "faster_rcnn.train")
    if t.ims_per_batch < 1:
        raise ConfigError("faster_rcnn.train.ims_per_batch: must be >= 1")
    loop.positive("faster_rcnn.train.lr", t.lr)
    loop.positive("faster_rcnn.train.weight_decay", t.weight_decay, allow_zero=True)
    if not 0 <= t.momentum < 1 or not 0 < t.warmup_factor <= 1 or t.warmup_iters < 0:
        raise ConfigError("faster_rcnn.train: momentum in [0, 1), warmup_factor in (0, 1], "
                          "warmup_iters >= 0")  # fmt: skip


def output_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge.get_output_shape: (new h, new w)."""
    scale = short / min(h, w)
    nh, nw = (short, scale * w) if h < w else (scale * h, short)
    if max(nh, nw) > max_size:
        s = max_size / max(nh, nw)
        nh, nw = nh * s, nw * s
    return int(nh + 0.5), int(nw + 0.5)


def load_image(path: Path, size: tuple[int, int], flip: bool,
               convention: InputConvention) -> torch.Tensor:  # fmt: skip
    """(3, h, w) input in the encoder's convention; bilinear resize (detectron2: PIL's)."""
    import cv2

    from benchmark.datasets.folder import load_rgb

    img = np.asarray(load_rgb(path), dtype=np.float32)
    if flip:
        img = img[:, ::-1]
    if img.shape[:2] != size:
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return convention.normalise_hwc(img)


def d2_boxes(rec: DetRecord, use_difficult: bool) -> tuple[np.ndarray, np.ndarray]:
    """(boxes, classes) as detectron2 reads the XML: x1 - 1, y1 - 1, x2, y2 (records hold
    every coordinate minus 1, so x2 and y2 get the 1 back)."""
    keep = np.ones(len(rec.gt_boxes), bool) if use_difficult else ~rec.gt_difficult
    boxes = rec.gt_boxes[keep].astype(np.float32).copy()
    boxes[:, 2:] += 1.0
    return boxes, rec.gt_classes[keep]


class TrainSet(Dataset):
    """Items keyed (record index, sample number): image, target and size."""

    def __init__(self, records: Sequence[DetRecord], c: FasterRCNNConfig, seed: int,
                 convention: InputConvention) -> None:  # fmt: skip
        self.records, self.c, self.seed, self.convention = list(records), c, seed, convention

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, sample = key
        rec = self.records[index]
        rng = np.random.default_rng([self.seed, 23, sample])
        short = int(rng.choice(self.c.min_size_train))
        flip = bool(self.c.flip and rng.random() < 0.5)
        h, w = output_size(rec.height, rec.width, short, self.c.max_size_train)
        image = load_image(rec.path, (h, w), flip, self.convention)
        boxes, classes = d2_boxes(rec, self.c.train_difficult)
        if flip:
            boxes[:, [0, 2]] = rec.width - boxes[:, [2, 0]]
        boxes *= np.array([w / rec.width, h / rec.height] * 2, np.float32)
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(classes)}
        return {"image": image, "target": target}


def pad_batch(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Zero-pad to the largest height and width (detectron2's ImageList, size_divisibility
    0 for C4): the padded batch and the images' own sizes."""
    sizes = [(int(x.shape[1]), int(x.shape[2])) for x in images]
    out = images[0].new_zeros(len(images), 3, max(s[0] for s in sizes), max(s[1] for s in sizes))
    for i, x in enumerate(images):
        out[i, :, : x.shape[1], : x.shape[2]] = x
    return out, sizes


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    images, sizes = pad_batch([it["image"] for it in items])
    return {"images": images, "sizes": sizes, "targets": [it["target"] for it in items]}


def voc_folder(data: str | None, year: str) -> Path:
    return Path(resolve_data(data, "voc2007" if year == "2007" else "voc2012"))


def prepare(cfg: DetectionConfig, run: Run) -> tuple[list[DetRecord], list[DetRecord], list[str]]:
    """(train records of every train set, test records, skipped ids), checked as
    `bench data check` checks them; training images without an object are dropped
    (DATALOADER.FILTER_EMPTY_ANNOTATIONS)."""
    c = cfg.faster_rcnn
    train, skipped = [], []
    for item in c.train_sets:
        year, _, split = item.partition(":")
        root = voc_folder(cfg.data, year)
        ids, bad = checked_voc_ids(root, split, cfg.on_bad_data, run.logger)
        train += load_records(root, split, ids)
        skipped += [f"{year}/{i}" for i in bad]
    year, _, split = c.test_set.partition(":")
    root = voc_folder(cfg.data, year)
    ids, bad = checked_voc_ids(root, split, cfg.on_bad_data, run.logger)
    skipped += [f"{year}/{i}" for i in bad]
    test = load_records(root, split, ids)
    train = [r for r in train if len(d2_boxes(r, c.train_difficult)[0])]
    if not train:
        raise DatasetError(f"{', '.join(c.train_sets)}: no training image has an object")
    return train, test, skipped


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, c: FasterRCNNConfig,
              precision: loop.Precision, device: torch.device):  # fmt: skip
    t = c.train

    def step(batch: dict[str, Any], iteration: int) -> dict[str, Any]:
        lr = lr_at(t.lr, t.lr_steps, t.gamma, t.warmup_iters, t.warmup_factor, iteration)
        for g in optimizer.param_groups:
            g["lr"] = lr
        images = batch["images"].to(device)
        targets = [{k: v.to(device) for k, v in tg.items()} for tg in batch["targets"]]
        with precision.autocast():
            losses = model(images, batch["sizes"], targets)
        loss = sum(v.float() for v in losses.values())
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)
        return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}, "lr": lr}

    return step


@torch.no_grad()
def precise_bn_(model: nn.Module, batches: Iterator[dict[str, Any]], iters: int,
                device: torch.device) -> int:  # fmt: skip
    """detectron2's PreciseBN (fvcore update_bn_stats): every BN's running statistics set to
    the average of `iters` training batches' statistics (the model in training mode, no
    update of any weight). Returns the number of BN layers updated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.training and m.track_running_stats]  # fmt: skip
    if not bns or iters == 0:
        return 0
    momenta = [bn.momentum for bn in bns]
    means = [torch.zeros_like(bn.running_mean) for bn in bns]
    variances = [torch.zeros_like(bn.running_var) for bn in bns]
    for bn in bns:
        bn.momentum = 1.0  # running stats := this batch's
    for k in range(iters):
        batch = next(batches)
        targets = [{n: v.to(device) for n, v in tg.items()} for tg in batch["targets"]]
        model(batch["images"].to(device), batch["sizes"], targets)
        for i, bn in enumerate(bns):
            means[i] += (bn.running_mean - means[i]) / (k + 1)
            variances[i] += (bn.running_var - variances[i]) / (k + 1)
    for bn, m, v, mom in zip(bns, means, variances, momenta):
        bn.running_mean.copy_(m)
        bn.running_var.copy_(v)
        bn.momentum = mom
    return len(bns)


@torch.no_grad()
def detect(model: FasterRCNNC4, records: Sequence[DetRecord], c: FasterRCNNConfig,
           env: DistEnv) -> Detections:  # fmt: skip
    """Detections of every record in the devkit's 1-based coordinates (detectron2's
    evaluator writes x1 + 1, y1 + 1, x2, y2); each process detects every world-th image."""
    model.eval()
    mine = []
    for i in range(env.rank, len(records), env.world_size):
        rec = records[i]
        h, w = output_size(rec.height, rec.width, c.min_size_test, c.max_size_test)
        image = load_image(rec.path, (h, w), False, model.convention).to(env.device)
        out = model(image[None], [(h, w)])[0]
        boxes = out["boxes"].float().cpu().numpy() / np.array([w / rec.width, h / rec.height] * 2)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, rec.width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, rec.height)
        mine.append((i, boxes, out["scores"].float().cpu().numpy(), out["labels"].cpu().numpy()))
    found = sorted(x for part in distributed.gather_objects(mine) for x in part) if (
        distributed.initialized()) else mine  # fmt: skip
    dets: Detections = {cls: [] for cls in VOC_CLASSES}
    for i, boxes, scores, labels in found:
        for b, s, k in zip(boxes, scores, labels):
            box = (float(b[0]) + 1.0, float(b[1]) + 1.0, float(b[2]), float(b[3]))
            dets[VOC_CLASSES[int(k) - 1]].append((records[i].image_id, float(s), box))
    return dets


def run_faster_rcnn(cfg: DetectionConfig, run: Run, env: DistEnv) -> dict[str, Any]:
    """Train R50-C4 Faster R-CNN, detect the test set, write detections and metrics."""
    c, t = cfg.faster_rcnn, cfg.faster_rcnn.train
    torch.manual_seed(cfg.seed)
    encoder, card = load_resnet(cfg.weights, cfg.arch, "Faster R-CNN R50-C4 detection")
    train_records, test_records, skipped = prepare(cfg, run)
    model = FasterRCNNC4(encoder, c).to(env.device)
    if env.world_size > 1 and c.norm == "batch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.train()
    sets = ", ".join(c.train_sets)
    run.logger.info(f"faster r-cnn r50-c4: {len(train_records)} train images ({sets}), "
                    f"{len(test_records)} test ({c.test_set})")  # fmt: skip
    dataset = TrainSet(train_records, c, cfg.seed, encoder.input_convention)
    net = loop.prepare_model(model, env, t)
    optimizer = loop.sgd(param_groups(model, t.weight_decay, t.weight_decay_norm), t.lr,
                         t.momentum)  # fmt: skip
    precision = loop.Precision(t.precision, env.device)
    batches = loop.loader_batches(dataset, t.ims_per_batch, cfg.seed, env, t.workers,
                                  collate_fn=collate)  # fmt: skip
    result = loop.fit(
        run, env, t, stage=STAGE, config=cfg, seed=cfg.seed,
        step=make_step(net, optimizer, c, precision, env.device), batches=batches,
        state={"model": net, "optimizer": optimizer}, precision=precision,
        desc="faster r-cnn", input_convention=encoder.input_convention.name,
    )  # fmt: skip
    tick = time.perf_counter()
    torch.manual_seed(loop.keyed_seed(cfg.seed, 12, env.rank, t.iterations))
    updated = precise_bn_(model, batches(t.iterations), c.precise_bn_iters, env.device)
    if updated:
        run.logger.info(f"precise BN: {updated} layers over {c.precise_bn_iters} batches")
    detections = detect(model, test_records, c, env)
    if run.is_main:
        write_results_files(run.file("detections"), detections)
    per_class, mean = voc07_scores(detections, test_records)
    d2 = detectron2_voc_ap(detections, test_records)
    metrics = {
        **common.metrics_head("detection", "native", cfg, run, card, card.get("arch"),
                              device=env.device, precision=result.precision),
        "model": "faster-rcnn-r50-c4",
        **score_fields(mean, float("nan"), per_class),
        "ap": d2["ap"],
        "ap50": d2["ap50"],
        "ap75": d2["ap75"],
        "ap_per_threshold": d2["per_threshold"],
        "iterations": result.iterations,
        "train_seconds": round(result.seconds, 2),
        "test_seconds": round(time.perf_counter() - tick, 2),
        "precision": result.precision,
        "device": str(env.device),
        "initial_loss": result.first.get("loss"),
        "final_loss": result.last.get("loss"),
        "train_images": len(train_records),
        "test_images": len(test_records),
        "skipped": common.skipped_field(skipped),
    }
    metrics.pop("coco_ap")
    run.logger.info(f"detection AP50 (devkit) {metrics['map']}  AP {d2['ap']}  AP75 {d2['ap75']}")
    run.write_metrics(metrics)
    return metrics
