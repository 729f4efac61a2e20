"""Which images FCN trains and is judged on, and how one image becomes network input.

Training set: VOC2012 `train` plus SBD's additional annotations (`cls/*.mat`, SBD train and
val), minus every evaluation image. Evaluation: `seg11valid` = VOC2011 seg val minus SBD
train (FCN's 736-image split) derived from the files the user has:

- `ImageSets/Segmentation/seg11valid.txt` when present (FCN's own list);
- else `VOC2011/ImageSets/Segmentation/val.txt` beside VOC2012, minus SBD train;
- else VOC2012 val minus SBD train, *named* `voc2012-val-minus-sbd-train` in the results,
  since it is a different (larger) set; without SBD it is plain `voc2012-val`.

Any other split name is `ImageSets/Segmentation/<name>.txt` of VOC2012.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from benchmark.datasets.folder import load_rgb
from benchmark.datasets.resolve import resolve_data
from benchmark.datasets.voc import (
    VOC_CLASSES,
    Problem,
    SegSample,
    load_sbd,
    read_id_list,
    read_label,
    read_split,
)
from benchmark.errors import DatasetError
from benchmark.input_convention import InputConvention
from benchmark.runs import Run
from encoders.alexnet import INPUT_SIZE
from transfer import common

log = logging.getLogger("bench")
SEG11VALID = "seg11valid"
CLASSES: tuple[str, ...] = ("background", *VOC_CLASSES)


@dataclass
class SegmentationData:
    train: list[SegSample]
    eval: list[SegSample]
    split: str  # honest name of the evaluation set, recorded in metrics.json
    voc_root: Path
    sbd_root: Path | None
    notes: list[str] = field(default_factory=list)

    @property
    def train_sources(self) -> dict[str, int]:
        mats = sum(s.mask_path.suffix.lower() == ".mat" for s in self.train)
        return {"voc": len(self.train) - mats, "sbd": mats}


def find_sbd(data: str | None, sbd: str | None, voc_root: Path, use_sbd: bool) -> Path | None:
    """SBD's `dataset/` folder: the given one (must exist), else one beside the VOCdevkit."""
    from benchmark.datasets.resolve import resolve_data

    if not use_sbd:
        return None
    if sbd is not None:
        return Path(resolve_data(sbd, "sbd"))
    if data is None:
        return Path(resolve_data(None, "sbd"))
    # VOCdevkit/VOC2012 -> look in VOCdevkit's parent and in VOCdevkit for SBD folders.
    for base in (voc_root.parent.parent, voc_root.parent, Path(data)):
        for cand in (base / "benchmark_RELEASE" / "dataset", base / "SBD" / "dataset",
                     base / "SBD", base / "sbd"):  # fmt: skip
            if (cand / "cls").is_dir() and (cand / "train.txt").is_file():
                return cand
    return None


def _sbd_ids(sbd_root: Path, split: str) -> list[str]:
    path = sbd_root / f"{split}.txt"
    if not path.is_file():
        return []
    return read_id_list(path, "SBD split file", problems=[])  # only to leave ids out


def _voc_samples(root: Path, ids: list[str]) -> list[SegSample]:
    out = []
    for i in ids:
        image = root / "JPEGImages" / f"{i}.jpg"
        mask = root / "SegmentationClass" / f"{i}.png"
        for path, what in ((image, "image"), (mask, "segmentation mask")):
            if not path.is_file():
                raise DatasetError(f"{path}: {what} not found")
        out.append(SegSample(i, image, mask))
    return out


def eval_split(
    voc_root: Path, sbd_root: Path | None, split: str, problems: list[Problem] | None = None
) -> tuple[list[SegSample], str]:
    """(samples, honest split name) of the evaluation set. Ids that are not plain names or
    repeat: an error, or left out and added to `problems` when it is given."""
    if split != SEG11VALID:
        return _voc_samples(voc_root, read_split(voc_root, split, "Segmentation", problems)), (
            f"voc2012-{split}"
        )
    seg_sets = voc_root / "ImageSets" / "Segmentation"
    if (seg_sets / f"{SEG11VALID}.txt").is_file():
        ids = read_split(voc_root, SEG11VALID, "Segmentation", problems)
        return _voc_samples(voc_root, ids), SEG11VALID
    sbd_train = set(_sbd_ids(sbd_root, "train")) if sbd_root else set()
    voc2011 = voc_root.parent / "VOC2011"
    if (voc2011 / "ImageSets" / "Segmentation" / "val.txt").is_file():
        ids = [i for i in read_split(voc2011, "val", "Segmentation", problems)
               if i not in sbd_train]  # fmt: skip
        return _voc_samples(voc2011, ids), SEG11VALID if sbd_root else "voc2011-val"
    if not (seg_sets / "val.txt").is_file():
        raise DatasetError(
            f"{seg_sets / 'val.txt'}: split file not found (seg11valid is derived from VOC2012 "
            "or VOC2011 val; set `split` to a split this dataset has)"
        )
    ids = [i for i in read_split(voc_root, "val", "Segmentation", problems) if i not in sbd_train]
    if not ids:
        raise DatasetError(f"{seg_sets / 'val.txt'}: every val image is in SBD train")
    name = "voc2012-val-minus-sbd-train" if sbd_root else "voc2012-val"
    return _voc_samples(voc_root, ids), name


def build_data(
    voc_root: Path,
    sbd_root: Path | None,
    train_split: str,
    split: str,
    train_set: str = "sbd-train",
    problems: list[Problem] | None = None,
) -> SegmentationData:
    """Training and evaluation samples; evaluation images never enter training.

    train_set "sbd-train": SBD's train split alone, FCN-AlexNet's training set
    (shelhamer/fcn.berkeleyvision.org@1305c73 voc-fcn-alexnet/train.prototxt: SBDDSegDataLayer,
    split train; data/pascal/README.md: "the 8,498 images of SBD train"); "voc+sbd": VOC2012
    `train_split` plus SBD train and val (the larger set of later FCN papers).
    """
    evaluation, name = eval_split(voc_root, sbd_root, split, problems)
    held_out = {s.image_id for s in evaluation}
    notes = []
    if train_set == "sbd-train":
        if sbd_root is None:
            raise DatasetError(
                f"{voc_root}: train_set sbd-train needs SBD's cls/*.mat annotations (give them "
                "with --set sbd=<benchmark_RELEASE/dataset>, or choose train_set: voc+sbd)"
            )
        train = [s for s in load_sbd(sbd_root, "train", problems) if s.image_id not in held_out]
        if not train:
            raise DatasetError(f"{sbd_root}: no SBD train image left after removing {name}")
        return SegmentationData(train, evaluation, name, voc_root, sbd_root, notes)
    train = [
        s
        for s in _voc_samples(voc_root, read_split(voc_root, train_split, "Segmentation",
                                                   problems))  # fmt: skip
        if s.image_id not in held_out
    ]
    if sbd_root is None:
        notes.append("no SBD annotations found: training on VOC2012 only")
    else:
        have = {s.image_id for s in train}
        for sbd_split in ("train", "val"):
            if not (sbd_root / f"{sbd_split}.txt").is_file():
                continue
            for s in load_sbd(sbd_root, sbd_split, problems):
                # VOC's own masks win where both exist (they carry the 255 border band).
                if s.image_id not in held_out and s.image_id not in have:
                    train.append(s)
                    have.add(s.image_id)
    if not train:
        raise DatasetError(f"{voc_root}: no training images left after removing the {name} set")
    return SegmentationData(train, evaluation, name, voc_root, sbd_root, notes)


def shrink(im: Image.Image, max_size: int | None) -> np.ndarray:
    """(H, W, 3) uint8, the longer side shrunk to `max_size` when it is larger."""
    if max_size is not None and max(im.size) > max_size:
        s = max_size / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def to_input(
    image: np.ndarray, device: torch.device, convention: InputConvention
) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float in the encoder's input `convention`, like
    every stage. FCN subtracts (104.00699, 116.66877, 122.67892) BGR (voc_layers.py); the
    encoder's convention is used instead, Caffe's (104, 117, 123) for CaffeNet
    (docs/reference-values.md section 8)."""
    x = torch.from_numpy(np.array(image, copy=True)).to(device).permute(2, 0, 1)[None]
    return convention.normalise(x)


def load_pair(sample: SegSample, max_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(network image, full-size label map); the label keeps its own resolution."""
    im = load_rgb(sample.image_path)
    label = read_label(sample.mask_path)
    if label.shape != (im.height, im.width):
        raise DatasetError(
            f"{sample.mask_path}: label is {label.shape[1]}x{label.shape[0]}, "
            f"its image {sample.image_path.name} is {im.width}x{im.height}"
        )
    return shrink(im, max_size), label


class SegTrainSet(Dataset):
    """Item (index, sample number) -> (image (H, W, 3) uint8, label (H, W) uint8), mirrored
    with probability 1/2 when `mirror` (drawn from the sample number, so resumes repeat it)."""

    def __init__(self, samples: Sequence[SegSample], max_size: int | None, mirror: bool,
                 seed: int) -> None:  # fmt: skip
        self.samples, self.max_size, self.mirror, self.seed = list(samples), max_size, mirror, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        index, sample = item
        image, label = load_pair(self.samples[index], self.max_size)
        if self.mirror and np.random.default_rng([self.seed, 7, sample]).random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


def prepare_data(cfg: Any, run: Run) -> tuple[SegmentationData, list[str]]:
    """Resolve VOC2012 and SBD folders, build the train / evaluation lists, check every image
    and label map they name (before training), log what was found; also the skipped ids."""
    voc = Path(resolve_data(cfg.data, "voc2012"))
    sbd = find_sbd(cfg.data, cfg.sbd, voc, cfg.use_sbd)
    listed: list[Problem] = []  # ids that are not plain names, or repeated: never paths
    data = build_data(voc, sbd, cfg.train_split, cfg.split, cfg.train_set, listed)
    skip_ids = sorted(common.enforce(listed, cfg.on_bad_data, what=f"{data.split} split files",
                                     logger=run.logger))  # fmt: skip
    if cfg.eval_images is not None:
        data.eval = data.eval[: cfg.eval_images]
    data.train, skip_train = common.checked_segmentation(
        data.train, cfg.on_bad_data, run.logger, f"{data.split} training set"
    )
    data.eval, skip_eval = common.checked_segmentation(
        data.eval, cfg.on_bad_data, run.logger, f"{data.split} evaluation set"
    )
    for note in data.notes:
        run.logger.info(note)
    src = data.train_sources
    run.logger.info(
        f"segmentation data ({cfg.train_set}): train {len(data.train)} images ({src['voc']} "
        f"VOC2012 {cfg.train_split}, {src['sbd']} SBD) from {voc}"
        + (f" + {sbd}" if sbd else "")
        + f"; evaluation on {data.split} ({len(data.eval)} images)"
    )
    return data, [*skip_ids, *skip_train, *skip_eval]


def rescale_batch(
    samples: list, device: torch.device, convention: InputConvention
) -> torch.Tensor:
    """Training images resized to the encoder's 227x227 input, in its input `convention` as
    every stage: the batch the data-dependent init measures (magic_init warps images to the
    net's input)."""
    size = (INPUT_SIZE, INPUT_SIZE)
    return torch.cat(
        [
            to_input(np.asarray(load_rgb(s.image_path).resize(size)), device, convention)
            for s in samples
        ]
    )
