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
from typing import TextIO

import numpy as np

from benchmark.datasets.folder import IMAGE_EXTENSIONS
from benchmark.datasets.preflight import (
    check_segmentation,
    name_problem,
    scan_detection,
    scan_images,
)
from benchmark.datasets.voc import (
    CLASS_LINE_FORMAT,
    VOC_CLASSES,
    Problem,
    SegSample,
    VOCAnnotation,
    classification_targets,
    read_id_list,
    read_rows,
)
from benchmark.errors import DatasetError, file_message, printable


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


def _split_ids(path: Path, report: CheckReport, what: str = "split file") -> list[str] | None:
    """The usable ids of one split file, every problem of it reported: an unreadable file,
    ids that are not plain names or repeat (file and line), a split with no id. Runs refuse
    (or skip) exactly these; None when the file cannot be read."""
    problems: list[Problem] = []
    try:
        ids = read_id_list(path, what, problems)
    except DatasetError as exc:
        report.problems.append(str(exc))
        return None
    report.problems += [p.message for p in problems]
    if not ids and not problems:
        report.problems.append(file_message(path, f"{what} lists no image id"))
    return ids


def _split_files(folder: Path, report: CheckReport) -> dict[str, list[str]]:
    """Plain split lists (train.txt, val.txt, ...) of an ImageSets folder, not `<cls>_<split>`."""
    splits = {}
    if folder.is_dir():
        for f in sorted(folder.glob("*.txt")):
            if "_" not in f.stem:
                ids = _split_ids(f, report)
                if ids is not None:
                    splits[f.stem] = ids
    return splits


def _class_summary(annotations: list[VOCAnnotation]) -> str:
    total = Counter(o.name for a in annotations for o in a.objects)
    hard = Counter(o.name for a in annotations for o in a.objects if o.difficult)
    parts = [f"{c} {total[c]} ({hard[c]} difficult)" for c in VOC_CLASSES if total[c]]
    parts += [f"{c} {total[c]} (unknown class)" for c in sorted(set(total) - set(VOC_CLASSES))]
    return "objects per class: " + (", ".join(parts) if parts else "none")


def _check_annotations(root: Path, report: CheckReport) -> dict[str, VOCAnnotation]:
    """Parse every Annotations/*.xml; check class names, boxes, image presence and size."""
    xmls = sorted((root / "Annotations").glob("*.xml"))
    annotations, problems = scan_detection(
        root, [x.stem for x in xmls], desc=f"{printable(root.name)} annotations"
    )
    report.problems += [p.message for p in problems]
    report.summary.append(f"{root.name}: {len(xmls)} annotations, {len(annotations)} parsed")
    if annotations:
        report.summary.append(f"{root.name} " + _class_summary(list(annotations.values())))
    return annotations


def _check_main(root: Path, annotations: dict[str, VOCAnnotation], report: CheckReport) -> None:
    """ImageSets/Main: every listed id has an annotation; per-class files agree with it."""
    main = root / "ImageSets" / "Main"
    xml_names = {p.stem for p in (root / "Annotations").glob("*.xml")}
    for split, ids in _split_files(main, report).items():
        report.summary.append(f"{root.name} Main/{split}: {len(ids)} images")
        for i in ids:
            if i not in xml_names:
                xml = root / "Annotations" / f"{i}.xml"
                report.problems.append(
                    file_message(
                        main / f"{split}.txt",
                        f"image {i} listed without annotation ({printable(xml)} not found)",
                    )
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
            try:
                found = {r[0]: int(r[1]) for r in read_rows(path, "per-class split file")}
            except DatasetError as exc:
                report.problems.append(str(exc))
                continue
            except (IndexError, ValueError):
                report.problems.append(file_message(path, CLASS_LINE_FORMAT))
                continue
            if set(found) != set(ids):
                report.problems.append(file_message(path, f"image ids differ from {split}.txt"))
                continue
            wrong = [i for n, i in enumerate(known) if found[i] != expected[n, c]]
            if wrong:
                report.problems.append(
                    file_message(
                        path,
                        f"disagrees with the annotations for {len(wrong)} of {len(known)} "
                        f"images (first: {wrong[0]})",
                    )
                )


# mmsegmentation's VOC "aug" layout (tools/dataset_converters/voc_aug.py): the lists with SBD
# images take their masks from SegmentationClassAug, where a VOC train image's is there too
AUG_SPLITS = ("aug", "trainaug")
AUG_MASKS = "SegmentationClassAug"


def _check_segmentation(root: Path, report: CheckReport) -> None:
    """Every image listed in ImageSets/Segmentation has a decodable image and a valid mask."""
    samples: dict[str, SegSample] = {}
    for split, ids in _split_files(root / "ImageSets" / "Segmentation", report).items():
        report.summary.append(f"{root.name} Segmentation/{split}: {len(ids)} images")
        aug = split in AUG_SPLITS
        for i in ids:
            image = root / "JPEGImages" / f"{i}.jpg"
            mask = root / "SegmentationClass" / f"{i}.png"
            if aug and ((root / AUG_MASKS / f"{i}.png").is_file() or not mask.is_file()):
                mask = root / AUG_MASKS / f"{i}.png"
            samples.setdefault(i, SegSample(i, image, mask))
    found = check_segmentation(list(samples.values()), desc=f"{printable(root.name)} masks")
    report.problems += [p.message for p in found]


def check_voc_year(root: Path) -> CheckReport:
    """A VOC2007 or VOC2012 folder: annotations, Main splits, segmentation masks."""
    report = CheckReport()
    images = sorted(
        p for p in (root / "JPEGImages").glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
    )
    report.summary.append(f"{root.name}: {len(images)} images in JPEGImages")
    report.problems += [bad.message for p in images if (bad := name_problem(p, p.stem))]
    if not any((root / d).is_dir() for d in ("Annotations", "ImageSets", "JPEGImages")):
        report.problems.append(file_message(root, "no JPEGImages, Annotations or ImageSets folder"))
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
        ids = _split_ids(root / f"{split}.txt", report, "SBD split file")
        if ids is None:
            continue
        report.summary.append(f"SBD {split}: {len(ids)} images")
        listed.update(ids)
    samples = [
        SegSample(i, root / "img" / f"{i}.jpg", root / "cls" / f"{i}.mat") for i in sorted(listed)
    ]
    report.problems += [p.message for p in check_segmentation(samples, desc="SBD")]
    return report


def check_image_folder(root: Path) -> CheckReport:
    """An unlabelled image folder: every image must decode (what pretraining will read)."""
    report = CheckReport()
    paths = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not paths:
        report.problems.append(file_message(root, "no images found"))
        return report
    sizes, problems = scan_images(paths, f"{printable(root.name)} images")
    report.problems += [p.message for p in problems]
    shorter = [min(s) for s in sizes if s is not None]
    if shorter:
        report.summary.append(
            f"{root}: {len(paths)} images, shorter side {min(shorter)}-{max(shorter)} px"
        )
    return report


def _is_voc_year(path: Path) -> bool:
    return any((path / d).is_dir() for d in ("Annotations", "ImageSets", "SegmentationClass"))


def check_path(path: Path) -> CheckReport:
    """Check whatever dataset `path` holds (see the module docstring for what is accepted)."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(file_message(path, "dataset folder not found"))
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
            report.extend(check_image_folder(path / "unlabelled"))
    elif _is_voc_year(path):
        report.extend(check_voc_year(path))
    elif (path / "cls").is_dir():
        report.extend(check_sbd(path))
    else:
        report.extend(check_image_folder(path))
    report.summary = [printable(line) for line in report.summary]
    return report


def _say(line: str, stream: TextIO) -> None:
    """Print `line` so that neither a bad file name nor the stream's encoding can raise."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    text = printable(line).encode(encoding, "backslashreplace").decode(encoding)
    print(text, file=stream)


def main_check(path: Path) -> int:
    """Print the summary and every problem; exit code 0 when clean, 1 otherwise."""
    report = check_path(path)
    for line in report.summary:
        _say(line, sys.stdout)
    if report.problems:
        _say(f"{len(report.problems)} problem(s):", sys.stderr)
        for line in report.problems:
            _say(f"  {line}", sys.stderr)
        return 1
    _say("no problems found", sys.stdout)
    return 0
