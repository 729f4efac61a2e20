"""VOC detection data for Fast R-CNN: per-image records, the protocol's image scaling and
flips, and the RoI minibatches of training.

A training item is one image at one of `scales` (shorter side, longer side capped at
`max_size`), maybe mirrored, with `rois_per_image` sampled RoIs; two items make a batch.
The order of items is a pure function of (seed, position in the stream), so a resumed run
sees the same minibatches it would have seen without the interruption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from benchmark.datasets.voc import VOC_CLASSES, VOCAnnotation, parse_voc_xml, read_split
from benchmark.input_convention import InputConvention
from transfer.detection.sampling import RoiLabels, label_rois, sample_rois, target_stats


@dataclass
class DetRecord:
    """One image: gt in 0-based inclusive pixels, class indices 1..20, and its proposals."""

    image_id: str
    path: Path
    width: int
    height: int
    gt_boxes: np.ndarray  # (G, 4) float32
    gt_classes: np.ndarray  # (G,) int64 in 1..20
    gt_difficult: np.ndarray  # (G,) bool
    proposals: np.ndarray | None = None  # (P, 4) float32


def records_from_annotations(
    voc_root: Path, annotations: Sequence[VOCAnnotation]
) -> list[DetRecord]:
    index = {c: k + 1 for k, c in enumerate(VOC_CLASSES)}
    out = []
    for ann in annotations:
        boxes = np.array([o.box for o in ann.objects], np.float32).reshape(-1, 4) - 1.0
        out.append(
            DetRecord(
                image_id=ann.image_id,
                path=Path(voc_root) / "JPEGImages" / ann.filename,
                width=ann.width,
                height=ann.height,
                gt_boxes=boxes,
                gt_classes=np.array([index[o.name] for o in ann.objects], np.int64),
                gt_difficult=np.array([o.difficult for o in ann.objects], bool),
            )
        )
    return out


def load_records(voc_root: Path, split: str, ids: Sequence[str] | None = None) -> list[DetRecord]:
    """Records of ImageSets/Main/<split>.txt (or of the given, already checked, ids)."""
    ids = read_split(voc_root, split, "Main") if ids is None else ids
    annotations = [parse_voc_xml(Path(voc_root) / "Annotations" / f"{i}.xml") for i in ids]
    return records_from_annotations(voc_root, annotations)


def image_scale(height: int, width: int, target: int, max_size: int) -> float:
    """Fast R-CNN's factor: shorter side to `target` unless the longer would pass `max_size`."""
    scale = target / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = max_size / max(height, width)
    return scale


def prepare_image(
    path: Path, scale: float, flip: bool, convention: InputConvention
) -> torch.Tensor:
    """(3, H', W') float tensor in the encoder's input `convention`, like every stage.

    Fast R-CNN subtracts its own mean, (102.9801, 115.9465, 122.7717) BGR (config.py L119),
    before resizing; the encoder's convention is used instead, Caffe's (104, 117, 123) for
    CaffeNet (docs/reference-values.md section 8). Resizing is linear, so subtracting after
    it gives the same pixels."""
    import cv2

    from benchmark.datasets.folder import load_rgb

    img = np.asarray(load_rgb(path), dtype=np.float32)
    if flip:
        img = img[:, ::-1]
    h, w = img.shape[:2]
    if scale != 1.0:
        img = cv2.resize(
            img,
            (max(1, round(w * scale)), max(1, round(h * scale))),
            interpolation=cv2.INTER_LINEAR,
        )
    return convention.normalise_hwc(img)


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2] - 1
    out[:, 2] = width - boxes[:, 0] - 1
    return out


def training_gt(rec: DetRecord, use_difficult: bool) -> tuple[np.ndarray, np.ndarray]:
    keep = np.ones(len(rec.gt_boxes), bool) if use_difficult else ~rec.gt_difficult
    return rec.gt_boxes[keep], rec.gt_classes[keep]


def roi_labels(rec: DetRecord, flip: bool, use_difficult: bool, bbox_thresh: float) -> RoiLabels:
    boxes, classes = training_gt(rec, use_difficult)
    props = rec.proposals if rec.proposals is not None else np.zeros((0, 4), np.float32)
    if flip:
        boxes, props = flip_boxes(boxes, rec.width), flip_boxes(props, rec.width)
    return label_rois(props, boxes, classes, bbox_thresh)


class TrainSet(Dataset):
    """Item (entry, sample number) -> dict(image, rois, labels, targets) for one image of a
    minibatch; every random choice (scale, RoI sample) is drawn from the sample number."""

    def __init__(
        self,
        records: Sequence[DetRecord],
        *,
        flip: bool,
        scales: Sequence[int],
        max_size: int,
        rois_per_image: int,
        fg_fraction: float,
        fg_thresh: float,
        bg_thresh_hi: float,
        bg_thresh_lo: float,
        use_difficult: bool,
        bbox_means: np.ndarray,
        bbox_stds: np.ndarray,
        seed: int,
        convention: InputConvention,
    ) -> None:
        self.records = list(records)
        self.flips = (False, True) if flip else (False,)
        self.scales, self.max_size = tuple(scales), max_size
        self.rois_per_image, self.fg_fraction = rois_per_image, fg_fraction
        self.fg_thresh, self.bg_hi, self.bg_lo = fg_thresh, bg_thresh_hi, bg_thresh_lo
        self.use_difficult = use_difficult
        self.means, self.stds = bbox_means, bbox_stds
        self.seed = seed
        self.convention = convention

    @property
    def num_entries(self) -> int:
        return len(self.records) * len(self.flips)

    def __len__(self) -> int:
        return self.num_entries

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        entry, k = item  # (entry, sample number) from the loop's IterationSampler
        rec = self.records[entry % len(self.records)]
        flip = self.flips[entry // len(self.records)]
        rng = np.random.default_rng([self.seed, 1, k])
        target = self.scales[int(rng.integers(len(self.scales)))]
        scale = image_scale(rec.height, rec.width, target, self.max_size)
        rl = roi_labels(rec, flip, self.use_difficult, self.fg_thresh)
        idx = sample_rois(
            rl, self.rois_per_image, self.fg_fraction, self.fg_thresh, self.bg_hi, self.bg_lo, rng
        )
        labels = rl.labels[idx].copy()
        labels[rl.max_overlap[idx] < self.fg_thresh] = 0
        targets = (rl.targets[idx] - self.means[labels]) / self.stds[labels]
        targets[labels == 0] = 0.0
        return {
            "image": prepare_image(rec.path, scale, flip, self.convention),
            "rois": torch.from_numpy(rl.boxes[idx] * scale).float(),
            "labels": torch.from_numpy(labels),
            "targets": torch.from_numpy(targets.astype(np.float32)),
        }


def bbox_normalisation(
    records: Sequence[DetRecord],
    mode: str,
    stds: Sequence[float],
    flip: bool,
    use_difficult: bool,
    fg_thresh: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(21, 4) means and stds of the regression targets: fixed (means 0, `stds`) or, with
    mode "data", measured on the training RoIs as Fast R-CNN's roidb code does."""
    if mode == "fixed":
        return np.zeros((21, 4), np.float32), np.tile(np.float32(stds), (21, 1))
    flips = (False, True) if flip else (False,)
    rois = [roi_labels(r, f, use_difficult, fg_thresh) for r in records for f in flips]
    return target_stats(rois, 20, fg_thresh)


def usable_for_training(
    rec: DetRecord, use_difficult: bool, fg_thresh: float, bg_hi: float, bg_lo: float
) -> bool:
    """Fast R-CNN's filter_roidb: at least one foreground or background RoI."""
    ov = roi_labels(rec, False, use_difficult, fg_thresh).max_overlap
    return bool(((ov >= fg_thresh) | ((ov < bg_hi) & (ov >= bg_lo))).any())


def pad_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Zero-pad (after normalisation, as Fast R-CNN's im_list_to_blob: with the mean colour)
    to one (B, 3, H, W)."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    out = images[0].new_zeros((len(images), 3, h, w))
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
    return out


def collate_train(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    rois = [
        torch.cat([torch.full((len(it["rois"]), 1), float(i)), it["rois"]], dim=1)
        for i, it in enumerate(items)
    ]
    return {
        "images": pad_images([it["image"] for it in items]),
        "rois": torch.cat(rois),
        "labels": torch.cat([it["labels"] for it in items]),
        "targets": torch.cat([it["targets"] for it in items]),
    }


class TestSet(Dataset):
    """One unflipped image at the test scale, in the encoder's input `convention`, with all
    of its proposals."""

    def __init__(
        self,
        records: Sequence[DetRecord],
        scale: int,
        max_size: int,
        convention: InputConvention,
    ) -> None:
        self.records, self.scale, self.max_size = list(records), scale, max_size
        self.convention = convention

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        scale = image_scale(rec.height, rec.width, self.scale, self.max_size)
        props = rec.proposals if rec.proposals is not None else np.zeros((0, 4), np.float32)
        return {
            "index": i,
            "image": prepare_image(rec.path, scale, False, self.convention),
            "scale": scale,
            "proposals": props,
        }


def collate_one(items: Sequence[dict]) -> dict:
    return items[0]
