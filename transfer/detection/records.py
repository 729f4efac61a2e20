"""The records a detection run trains and tests on, prepared once for both backends (the
native Fast R-CNN and detectron2's): every annotation and image checked before the first
step, proposals attached, training images without a usable RoI dropped."""

from __future__ import annotations

from pathlib import Path

from benchmark.errors import BenchError
from benchmark.runs import Run
from transfer import common
from transfer.detection.config import DetectionConfig
from transfer.detection.data import DetRecord, load_records, usable_for_training
from transfer.detection.proposals import attach_proposals


def prepare_records(
    cfg: DetectionConfig, run: Run, voc_root: Path
) -> tuple[list[DetRecord], list[DetRecord], list[str], list[str]]:
    """(train records, test records, skipped train ids, skipped test ids)."""
    train_ids, skip_train = common.checked_voc_ids(
        voc_root, cfg.train_split, cfg.on_bad_data, run.logger
    )
    test_ids, skip_test = common.checked_voc_ids(
        voc_root, cfg.test_split, cfg.on_bad_data, run.logger
    )
    train_records = load_records(voc_root, cfg.train_split, train_ids)
    test_records = load_records(voc_root, cfg.test_split, test_ids)
    attach_proposals(train_records, cfg.proposals_train, cfg, cfg.train_split)
    attach_proposals(test_records, cfg.proposals_test, cfg, cfg.test_split)
    usable = [
        r for r in train_records
        if usable_for_training(r, cfg.train_difficult, cfg.fg_thresh, cfg.bg_thresh_hi,
                               cfg.bg_thresh_lo)
    ]  # fmt: skip
    if not usable:
        raise BenchError(f"{voc_root}: no {cfg.train_split} image has a usable object for training")
    return usable, test_records, skip_train, skip_test
