"""`bench data check PATH`: say what a dataset holds and list every problem, file by file.

Training code stops at the first bad file; this reads everything first so that a user can
fix a whole dataset in one pass. Accepts a `bench data synth` tree, a VOCdevkit root, a
VOC2007/VOC2012 folder, an SBD `dataset/` folder or a plain image folder.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from benchmark.datasets.folder import IMAGE_EXTENSIONS
from benchmark.datasets.voc import (
    IGNORE_INDEX,
    VOC_CLASSES,
    VOCAnnotation,
    classification_targets,
    parse_voc_xml,
    read_sbd_mat,
)
from benchmark.errors import DatasetError


@dataclass
class CheckReport:
    summary: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def extend(self, other: CheckReport) -> None:
        self.summary += other.summary
        self.problems += other.problems

    @property
    def ok(self) -> bool:
        return not self.problems


def _image_size(path: Path, report: CheckReport) -> tuple[int, int] | None:
    """(width, height) of a fully decodable image, or None after recording the problem."""
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))  # faster decode
            im.load()
        return size
    except FileNotFoundError:
        report.problems.append(f"{path}: image file not found")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        report.problems.append(f"{path}: unreadable image ({exc})")
    return None


def _split_files(folder: Path) -> dict[str, list[str]]:
    """Plain split lists (train.txt, val.txt, ...) of an ImageSets folder, not `<cls>_<split>`."""
    splits = {}
    if folder.is_dir():
        for f in sorted(folder.glob("*.txt")):
            if "_" not in f.stem:
                splits[f.stem] = [ln.split()[0] for ln in f.read_text().splitlines() if ln.strip()]
    return splits


def _class_summary(annotations: list[VOCAnnotation]) -> str:
    total = Counter(o.name for a in annotations for o in a.objects)
    hard = Counter(o.name for a in annotations for o in a.objects if o.difficult)
    parts = [f"{c} {total[c]} ({hard[c]} difficult)" for c in VOC_CLASSES if total[c]]
    parts += [f"{c} {total[c]} (unknown class)" for c in sorted(set(total) - set(VOC_CLASSES))]
    return "objects per class: " + (", ".join(parts) if parts else "none")


def _check_annotations(root: Path, report: CheckReport) -> dict[str, VOCAnnotation]:
    """Parse every Annotations/*.xml; check class names, boxes, image presence and size."""
    annotations: dict[str, VOCAnnotation] = {}
    xmls = sorted((root / "Annotations").glob("*.xml"))
    for xml in tqdm(xmls, desc=f"{root.name} annotations", disable=None, leave=False):
        try:
            ann = parse_voc_xml(xml, classes=None)
        except DatasetError as exc:
            report.problems.append(str(exc))
            continue
        annotations[ann.image_id] = ann
        for k, obj in enumerate(ann.objects):
            if obj.name not in VOC_CLASSES:
                report.problems.append(f"{xml}: unknown class name {obj.name!r} (object {k + 1})")
            xmin, ymin, xmax, ymax = obj.box
            if not (1 <= xmin <= xmax <= ann.width and 1 <= ymin <= ymax <= ann.height):
                report.problems.append(
                    f"{xml}: box {obj.box} of object {k + 1} ({obj.name}) lies outside the "
                    f"{ann.width}x{ann.height} image or is empty"
                )
        image = root / "JPEGImages" / ann.filename
        if not image.is_file():
            report.problems.append(f"{xml}: annotation without image ({image} not found)")
            continue
        size = _image_size(image, report)
        if size is not None and size != (ann.width, ann.height):
            report.problems.append(
                f"{xml}: <size> {ann.width}x{ann.height} differs from {image.name} "
                f"({size[0]}x{size[1]})"
            )
    report.summary.append(f"{root.name}: {len(xmls)} annotations, {len(annotations)} parsed")
    if annotations:
        report.summary.append(f"{root.name} " + _class_summary(list(annotations.values())))
    return annotations


def _check_main(root: Path, annotations: dict[str, VOCAnnotation], report: CheckReport) -> None:
    """ImageSets/Main: every listed id has an annotation; per-class files agree with it."""
    main = root / "ImageSets" / "Main"
    xml_names = {p.stem for p in (root / "Annotations").glob("*.xml")}
    for split, ids in _split_files(main).items():
        report.summary.append(f"{root.name} Main/{split}: {len(ids)} images")
        for i in ids:
            if i not in xml_names:
                report.problems.append(
                    f"{main / (split + '.txt')}: image {i} listed without annotation "
                    f"({root / 'Annotations' / (i + '.xml')} not found)"
                )
        # Compare the per-class files with what the readable annotations say (unknown
        # classes and unparsable files are reported elsewhere, once).
        known = [i for i in ids if i in annotations]
        if not known:
            continue
        parsed = [
            replace(a, objects=[o for o in a.objects if o.name in VOC_CLASSES])
            for a in (annotations[i] for i in known)
        ]
        labels, difficult = classification_targets(parsed)
        expected = np.where(difficult, 0, np.where(labels > 0, 1, -1))
        for c, cls in enumerate(VOC_CLASSES):
            path = main / f"{cls}_{split}.txt"
            if not path.is_file():
                continue
            rows = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
            try:
                found = {r[0]: int(r[1]) for r in rows}
            except (IndexError, ValueError):
                report.problems.append(f"{path}: each line must be '<image id> <1|-1|0>'")
                continue
            if set(found) != set(ids):
                report.problems.append(f"{path}: image ids differ from {split}.txt")
                continue
            wrong = [i for n, i in enumerate(known) if found[i] != expected[n, c]]
            if wrong:
                report.problems.append(
                    f"{path}: disagrees with the annotations for {len(wrong)} of {len(known)} "
                    f"images (first: {wrong[0]})"
                )


def _check_mask(mask: Path, image: Path, report: CheckReport) -> None:
    try:
        with Image.open(mask) as im:
            mode, size = im.mode, im.size
            values = np.unique(np.asarray(im)) if mode in ("P", "L") else None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        report.problems.append(f"{mask}: unreadable mask ({exc})")
        return
    if values is None:
        report.problems.append(f"{mask}: mask is not a palette PNG (mode {mode})")
        return
    bad = [int(v) for v in values if v > len(VOC_CLASSES) and v != IGNORE_INDEX]
    if bad:
        report.problems.append(f"{mask}: label values {bad[:5]} are neither 0-20 nor 255")
    img_size = _image_size(image, report) if image.is_file() else None
    if img_size is not None and img_size != size:
        report.problems.append(
            f"{mask}: mask size {size[0]}x{size[1]} differs from {image.name} "
            f"({img_size[0]}x{img_size[1]})"
        )


def _check_segmentation(root: Path, report: CheckReport) -> None:
    seg = root / "ImageSets" / "Segmentation"
    checked: set[str] = set()
    for split, ids in _split_files(seg).items():
        report.summary.append(f"{root.name} Segmentation/{split}: {len(ids)} images")
        for i in tqdm(ids, desc=f"{root.name} masks/{split}", disable=None, leave=False):
            if i in checked:
                continue
            checked.add(i)
            image = root / "JPEGImages" / f"{i}.jpg"
            mask = root / "SegmentationClass" / f"{i}.png"
            if not image.is_file():
                report.problems.append(f"{seg / (split + '.txt')}: image {image} not found")
            if not mask.is_file():
                report.problems.append(f"{seg / (split + '.txt')}: mask {mask} not found")
                continue
            _check_mask(mask, image, report)


def check_voc_year(root: Path) -> CheckReport:
    """A VOC2007 or VOC2012 folder: annotations, Main splits, segmentation masks."""
    report = CheckReport()
    images = [p for p in (root / "JPEGImages").glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
    report.summary.append(f"{root.name}: {len(images)} images in JPEGImages")
    if not any((root / d).is_dir() for d in ("Annotations", "ImageSets", "JPEGImages")):
        report.problems.append(f"{root}: no JPEGImages, Annotations or ImageSets folder")
        return report
    annotations = _check_annotations(root, report) if (root / "Annotations").is_dir() else {}
    if (root / "ImageSets" / "Main").is_dir():
        _check_main(root, annotations, report)
    if (root / "ImageSets" / "Segmentation").is_dir():
        _check_segmentation(root, report)
    return report


def check_sbd(root: Path) -> CheckReport:
    """An SBD `dataset/` folder: split lists, cls/*.mat files and their images."""
    report = CheckReport()
    mats = sorted((root / "cls").glob("*.mat"))
    report.summary.append(f"SBD {root}: {len(mats)} cls/*.mat files")
    listed: set[str] = set()
    for split in ("train", "val"):
        path = root / f"{split}.txt"
        if not path.is_file():
            report.problems.append(f"{path}: SBD split file not found")
            continue
        ids = [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]
        report.summary.append(f"SBD {split}: {len(ids)} images")
        listed.update(ids)
    for i in tqdm(sorted(listed), desc="SBD", disable=None, leave=False):
        mat, image = root / "cls" / f"{i}.mat", root / "img" / f"{i}.jpg"
        if not image.is_file():
            report.problems.append(f"{image}: image listed in SBD splits not found")
        if not mat.is_file():
            report.problems.append(f"{mat}: class file listed in SBD splits not found")
            continue
        try:
            labels = read_sbd_mat(mat)
        except DatasetError as exc:
            report.problems.append(str(exc))
            continue
        size = _image_size(image, report) if image.is_file() else None
        if size is not None and size != (labels.shape[1], labels.shape[0]):
            report.problems.append(
                f"{mat}: label map {labels.shape[1]}x{labels.shape[0]} differs from "
                f"{image.name} ({size[0]}x{size[1]})"
            )
    return report


def check_images(root: Path) -> CheckReport:
    """An unlabelled image folder: every image must decode."""
    report = CheckReport()
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        report.problems.append(f"{root}: no images found")
        return report
    sizes = []
    for p in tqdm(paths, desc=f"{root.name} images", disable=None, leave=False):
        size = _image_size(p, report)
        if size is not None:
            sizes.append(min(size))
    if sizes:
        report.summary.append(
            f"{root}: {len(paths)} images, shorter side {min(sizes)}-{max(sizes)} px"
        )
    return report


def _is_voc_year(path: Path) -> bool:
    return any((path / d).is_dir() for d in ("Annotations", "ImageSets", "SegmentationClass"))


def check_path(path: Path) -> CheckReport:
    """Check whatever dataset `path` holds (see the module docstring for what is accepted)."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: dataset folder not found")
    report = CheckReport()
    devkit = path / "VOCdevkit" if (path / "VOCdevkit").is_dir() else path
    years = [devkit / y for y in ("VOC2007", "VOC2012") if (devkit / y).is_dir()]
    if years:  # a VOCdevkit root or a `bench data synth` tree
        for year in years:
            report.extend(check_voc_year(year))
        for sbd in (path / "SBD" / "dataset", path / "benchmark_RELEASE" / "dataset"):
            if sbd.is_dir():
                report.extend(check_sbd(sbd))
        if (path / "unlabelled").is_dir():
            report.extend(check_images(path / "unlabelled"))
    elif _is_voc_year(path):
        report.extend(check_voc_year(path))
    elif (path / "cls").is_dir():
        report.extend(check_sbd(path))
    else:
        report.extend(check_images(path))
    return report


def main_check(path: Path) -> int:
    """Print the summary and every problem; exit code 0 when clean, 1 otherwise."""
    report = check_path(path)
    for line in report.summary:
        print(line)
    if report.problems:
        print(f"{len(report.problems)} problem(s):", file=sys.stderr)
        for line in report.problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print("no problems found")
    return 0
