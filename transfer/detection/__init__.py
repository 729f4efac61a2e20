"""Fast R-CNN detection transfer on PASCAL VOC2007 (Table 2's Detection column).

`main` fine-tunes the pretrained encoder as Fast R-CNN's backbone on trainval with
selective-search proposals and scores test with VOC2007 11-point AP (plus COCO AP).
`backend="detectron2"` runs the same protocol through detectron2 (imported lazily).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.errors import BenchError
from benchmark.runs import Run, default_results_root
from transfer.detection.config import DetectionConfig
from transfer.detection.data import (
    DetRecord,
    TrainSet,
    TrainStream,
    collate_train,
    load_records,
    roi_labels,
)
from transfer.detection.sampling import target_stats

__all__ = ["DetectionConfig", "main", "default_name"]


def default_name(cfg: DetectionConfig) -> str:
    """det-<weights stem or random>-<backend>-s<seed>."""
    if cfg.weights:
        w = Path(cfg.weights)
        source = w.name if w.is_dir() or w.suffix == "" else w.stem
    else:
        source = f"random-{cfg.arch}"
    return f"det-{source}-{cfg.backend}-s{cfg.seed}"


def voc2007_root(data: str | None) -> Path:
    from benchmark.datasets.resolve import resolve_data

    return Path(resolve_data(data, "voc2007"))


def proposal_cache_dir() -> Path:
    return default_results_root() / "cache" / "proposals"


def attach_proposals(
    records: list[DetRecord], source: str | None, cfg: DetectionConfig, split: str
) -> None:
    """Fill `records[i].proposals` from `source` (a file) or cached selective search."""
    from transfer.detection.proposals import load_proposal_file, selective_search_cached

    ids = [r.image_id for r in records]
    if source:
        boxes = load_proposal_file(source, ids)
    else:
        boxes = selective_search_cached(
            ids,
            [r.path for r in records],
            proposal_cache_dir(),
            mode=cfg.ss_mode,
            max_boxes=cfg.ss_max_boxes,
            image_width=cfg.ss_image_width,
            min_box=cfg.ss_min_box,
            workers=cfg.ss_workers,
            desc=f"selective search ({split})",
        )
    for rec, b in zip(records, boxes):
        b = np.asarray(b, np.float32).reshape(-1, 4)
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, rec.width - 1)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, rec.height - 1)
        rec.proposals = b[(b[:, 2] >= b[:, 0]) & (b[:, 3] >= b[:, 1])]


def bbox_normalisation(
    records: list[DetRecord], cfg: DetectionConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(21, 4) means and stds of the regression targets: fixed (means 0, `bbox_stds`) or,
    with bbox_normalize="data", measured on the training RoIs as Fast R-CNN does."""
    if cfg.bbox_normalize == "fixed":
        return np.zeros((21, 4), np.float32), np.tile(np.float32(cfg.bbox_stds), (21, 1))
    flips = (False, True) if cfg.flip else (False,)
    rois = [roi_labels(r, f, cfg.train_difficult, cfg.fg_thresh) for r in records for f in flips]
    return target_stats(rois, 20, cfg.fg_thresh)


def usable_for_training(rec: DetRecord, cfg: DetectionConfig) -> bool:
    """Fast R-CNN's filter_roidb: at least one foreground or background RoI."""
    rl = roi_labels(rec, False, cfg.train_difficult, cfg.fg_thresh)
    ov = rl.max_overlap
    return bool(
        ((ov >= cfg.fg_thresh) | ((ov < cfg.bg_thresh_hi) & (ov >= cfg.bg_thresh_lo))).any()
    )


def init_batch(dataset: TrainSet, cfg: DetectionConfig) -> dict[str, torch.Tensor]:
    """A few training images with their sampled RoIs, drawn apart from the training stream."""
    n = min(cfg.rescale_images, dataset.num_entries)
    order = np.random.default_rng([cfg.seed, 7]).permutation(dataset.num_entries)[:n]
    return collate_train([dataset[(10**12 + i, int(e))] for i, e in enumerate(order)])


def check_config(cfg: DetectionConfig) -> None:
    if cfg.ims_per_batch < 1 or cfg.rois_per_batch % cfg.ims_per_batch:
        raise BenchError(
            f"rois_per_batch: {cfg.rois_per_batch} must be a multiple of ims_per_batch "
            f"({cfg.ims_per_batch})"
        )
    if not 0 <= cfg.freeze_at <= 5:
        raise BenchError(f"freeze_at: {cfg.freeze_at} must be between 0 (train all) and 5")
    if cfg.iterations < 1:
        raise BenchError(f"iterations: must be at least 1, got {cfg.iterations}")


def main(cfg: DetectionConfig, run: Run) -> dict[str, Any]:
    """Train Fast R-CNN on train_split, detect on test_split, write detections and metrics."""
    check_config(cfg)
    voc_root = voc2007_root(cfg.data)
    if cfg.backend == "detectron2":
        from transfer.detection.detectron2_backend import run_detectron2

        return run_detectron2(cfg, run, voc_root)
    return run_native(cfg, run, voc_root)


def run_native(cfg: DetectionConfig, run: Run, voc_root: Path) -> dict[str, Any]:
    from benchmark.distributed import pick_device
    from transfer.backbone import load_encoder
    from transfer.common import run_command
    from transfer.detection.engine import (
        detect,
        make_optimizer,
        resume,
        train,
        trainable_summary,
    )
    from transfer.detection.evaluate import coco_ap, voc07_scores, write_results_files
    from transfer.detection.model import FastRCNN, data_dependent_init_

    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    encoder, card = load_encoder(cfg.weights, cfg.arch)
    train_records = load_records(voc_root, cfg.train_split)
    test_records = load_records(voc_root, cfg.test_split)
    attach_proposals(train_records, cfg.proposals_train, cfg, cfg.train_split)
    attach_proposals(test_records, cfg.proposals_test, cfg, cfg.test_split)
    train_records = [r for r in train_records if usable_for_training(r, cfg)]
    if not train_records:
        raise BenchError(f"{voc_root}: no {cfg.train_split} image has a usable object for training")
    means, stds = bbox_normalisation(train_records, cfg)
    model = FastRCNN(
        encoder,
        fc_dim=cfg.fc_dim,
        dropout=cfg.dropout,
        roi_size=cfg.roi_size,
        freeze_at=cfg.freeze_at,
        bbox_means=means,
        bbox_stds=stds,
    ).to(device)
    dataset = TrainSet(
        train_records, flip=cfg.flip, scales=cfg.scales, max_size=cfg.max_size,
        rois_per_image=cfg.rois_per_batch // cfg.ims_per_batch, fg_fraction=cfg.fg_fraction,
        fg_thresh=cfg.fg_thresh, bg_thresh_hi=cfg.bg_thresh_hi, bg_thresh_lo=cfg.bg_thresh_lo,
        use_difficult=cfg.train_difficult, bbox_means=means, bbox_stds=stds, seed=cfg.seed,
    )  # fmt: skip
    optimizer = make_optimizer(model, cfg)
    start = resume(run, model, optimizer) if run.resumed else 0
    if cfg.rescale and start == 0:
        batch = init_batch(dataset, cfg)
        applied = data_dependent_init_(
            model, batch["images"].to(device), batch["rois"].to(device), card["method"] != "random"
        )
        run.logger.info(
            "data-dependent init scales: " + ", ".join(f"{n} {a:.3g}" for n, a in applied)
        )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    run.logger.info(
        f"fast r-cnn: {trainable_summary(model)}; {len(train_records)} train images, "
        f"{len(test_records)} test images"
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.ims_per_batch,
        collate_fn=collate_train,
        num_workers=cfg.workers,
        sampler=TrainStream(dataset.num_entries, cfg.seed, start * cfg.ims_per_batch),
        persistent_workers=False,
    )
    t0 = time.time()
    if start < cfg.iterations:
        train(model, iter(loader), optimizer, cfg, run, device, start)
    train_seconds = time.time() - t0
    for n, p in model.named_parameters():
        if n in frozen and not torch.equal(frozen[n], p.detach()):
            raise RuntimeError(f"frozen parameter {n} changed during training")
    detections = detect(model, test_records, cfg, device)
    if run.is_main:
        write_results_files(run.file("detections"), detections)
    per_class, mean = voc07_scores(detections, test_records)
    coco = coco_ap(detections, test_records)
    metrics = {
        "stage": "transfer",
        "task": "detection",
        "backend": "native",
        **score_fields(card, cfg.weights, mean, coco, per_class),
        "seed": cfg.seed,
        "command": run_command(run),
        "iterations": cfg.iterations,
        "train_seconds": round(train_seconds, 2),
        "train_images": len(train_records),
        "test_images": len(test_records),
        "mean_proposals": float(np.mean([len(r.proposals) for r in test_records])),
    }
    run.logger.info(f"detection mAP {100 * (mean if mean == mean else 0):.2f}  COCO AP {coco:.4f}")
    run.write_metrics(metrics)
    return metrics


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN: a score that could not be computed becomes null."""
    return None if x is None or x != x else float(x)


def score_fields(
    card: dict[str, Any],
    weights: str | None,
    mean: float,
    coco: float,
    per_class: dict[str, float],
) -> dict[str, Any]:
    """The metrics both backends report the same way: method, pretrain_seconds, weights, map,
    coco_ap, per_class (NaN as null)."""
    return {
        "method": card.get("method", "unknown"),
        "pretrain_seconds": card.get("pretrain_seconds"),
        "weights": weights,
        "map": finite_or_none(mean),
        "coco_ap": finite_or_none(coco),
        "per_class": {c: finite_or_none(v) for c, v in per_class.items()},
    }
