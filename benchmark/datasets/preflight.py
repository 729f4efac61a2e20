"""Preflight: check exactly the files a run will read, before its first training step.

Training must never run silently on data that `bench data check` flags, and a bad file
found at iteration 30k wastes the run. These functions read every file a run will use
once, in threads (PIL and libjpeg release the GIL), and return problems whose text is the
same as `bench data check`'s: check.py is built on the per-item functions here.
`enforce` then stops the run, or lets the caller drop the bad items (`on_bad_data: skip`).

Measured: `check_detection` on the real VOC2007 sample (579 annotations and JPEGs, files in
the page cache) on this project's 2-core CPU: 0.8-1.0 s with the machine lightly used (1.0 s
item by item in one thread: two cores leave the pool little to gain), 1.2-3.4 s while other
jobs kept the load average at 8-10.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from tqdm import tqdm

from benchmark.datasets.folder import verify_image
from benchmark.datasets.voc import (
    VOC_CLASSES,
    Problem,
    SegSample,
    VOCAnnotation,
    VOCObject,
    id_problem,
    object_label,
    parse_voc_xml,
    read_label,
    read_split,
)
from benchmark.errors import ConfigError, DatasetError, file_message, printable

T = TypeVar("T")
R = TypeVar("R")
Size = tuple[int, int]


def _threaded(fn: Callable[[T], R], items: Sequence[T], desc: str) -> list[R]:
    """`[fn(x) for x in items]` in order, on a thread pool, with a progress bar on a TTY."""
    workers = min(16, (os.cpu_count() or 1) + 4, max(1, len(items)))
    with ThreadPoolExecutor(workers) as pool:
        results: Iterable[R] = pool.map(fn, items)
        return list(tqdm(results, total=len(items), desc=desc, disable=None, leave=False))


def name_problem(path: Path, item: str) -> Problem | None:
    """A file name that is not valid UTF-8 cannot be listed in a split file, and breaks the
    run's text outputs (logs, CSV, JSON) that would name it."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        return Problem(item, file_message(path, "file name is not valid UTF-8 (rename it)"))
    return None


def image_problems(path: Path, item: str) -> tuple[Size | None, list[Problem]]:
    """(width, height) of a decodable image (None if not), and what is wrong with it."""
    bad_name = name_problem(path, item)
    problems = [bad_name] if bad_name else []
    try:
        return verify_image(path), problems
    except DatasetError as exc:
        return None, [*problems, Problem(item, str(exc))]


def scan_images(paths: Sequence[Path], desc: str) -> tuple[list[Size | None], list[Problem]]:
    found = _threaded(lambda p: image_problems(Path(p), Path(p).stem), paths, desc)
    return [size for size, _ in found], [p for _, problems in found for p in problems]


def check_images(paths: Sequence[Path], *, desc: str = "images") -> list[Problem]:
    """Every image must have a UTF-8 name, a readable header and decode fully."""
    return scan_images(paths, desc)[1]


def check_image_folder(paths: Sequence[Path], *, desc: str = "images") -> list[Problem]:
    """`check_images` for an unlabelled folder, whose items are the full paths (stems may
    repeat across its subfolders)."""
    found = _threaded(lambda p: image_problems(Path(p), str(p)), paths, desc)
    return [p for _, problems in found for p in problems]


def _fmt_box(box: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def box_problem(k: int, obj: VOCObject, width: int, height: int) -> str | None:
    """What is wrong with the k-th (0-based) object's box, under the VOC convention
    (1-based inclusive pixels: 1 <= xmin <= xmax <= width, same for y), or None."""
    xmin, ymin, xmax, ymax = obj.box
    label, box = object_label(k, obj.name), _fmt_box(obj.box)
    if min(obj.box) < 0:
        return f"{label}: box {box} has a negative coordinate"
    if xmin > xmax:
        return f"{label}: box {box} has xmin {xmin:g} > xmax {xmax:g}"
    if ymin > ymax:
        return f"{label}: box {box} has ymin {ymin:g} > ymax {ymax:g}"
    if xmin < 1 or ymin < 1 or xmax > width or ymax > height:
        return (
            f"{label}: box {box} lies outside the {width}x{height} image "
            "(VOC boxes are 1-based: 1 <= x <= width, 1 <= y <= height)"
        )
    return None


def annotation_problems(
    voc_root: Path, image_id: str, *, boxes: bool = True
) -> tuple[VOCAnnotation | None, list[Problem]]:
    """Annotations/<id>.xml parses, names known classes and valid boxes, and its image is
    present, decodes and has the <size> the XML says. The annotation is returned even when
    it has problems (the checker summarises it), None when it does not parse."""
    root = Path(voc_root)
    xml = root / "Annotations" / f"{image_id}.xml"
    try:
        ann = parse_voc_xml(xml, classes=None)
    except DatasetError as exc:
        return None, [Problem(image_id, str(exc))]
    messages = [
        f"unknown class name {o.name!r} (object {k + 1})"
        for k, o in enumerate(ann.objects)
        if o.name not in VOC_CLASSES
    ]
    if boxes:
        found = (box_problem(k, o, ann.width, ann.height) for k, o in enumerate(ann.objects))
        messages += [m for m in found if m]
    problems = [Problem(image_id, file_message(xml, m)) for m in messages]
    bad_name = id_problem(ann.filename)
    if bad_name:
        # A path would make the run read a file outside JPEGImages.
        what = f"<filename> {bad_name} (not a file name inside JPEGImages)"
        return ann, [*problems, Problem(image_id, file_message(xml, what))]
    image = root / "JPEGImages" / ann.filename
    if not image.is_file():
        what = f"annotation without image ({printable(image)} not found)"
        return ann, [*problems, Problem(image_id, file_message(xml, what))]
    size, image_bad = image_problems(image, image_id)
    problems += image_bad
    if size is not None and size != (ann.width, ann.height):
        what = (
            f"<size> {ann.width}x{ann.height} differs from {printable(image.name)} "
            f"({size[0]}x{size[1]})"
        )
        problems.append(Problem(image_id, file_message(xml, what)))
    return ann, problems


def scan_detection(
    voc_root: Path, ids: Sequence[str], *, boxes: bool = True, desc: str = "annotations"
) -> tuple[dict[str, VOCAnnotation], list[Problem]]:
    """The parsed annotations by id, and every problem of `annotation_problems`."""
    found = _threaded(lambda i: annotation_problems(voc_root, i, boxes=boxes), ids, desc)
    annotations = {i: ann for i, (ann, _) in zip(ids, found, strict=True) if ann is not None}
    return annotations, [p for _, problems in found for p in problems]


def check_detection(voc_root: Path, ids: Sequence[str], *, boxes: bool = True) -> list[Problem]:
    """Problems of the annotations and images of `ids` (see `annotation_problems`)."""
    return scan_detection(voc_root, ids, boxes=boxes)[1]


def segmentation_problems(sample: SegSample) -> list[Problem]:
    """Image decodable; mask (or SBD .mat) readable by `read_label`'s rules (8-bit P or L,
    values 0-20 or 255) and of the image's size."""
    item = sample.image_id
    size, problems = image_problems(sample.image_path, item)
    try:
        labels = read_label(sample.mask_path)
    except DatasetError as exc:
        return [*problems, Problem(item, str(exc))]
    if size is not None and (labels.shape[1], labels.shape[0]) != size:
        what = (
            f"mask size {labels.shape[1]}x{labels.shape[0]} differs from "
            f"{printable(sample.image_path.name)} ({size[0]}x{size[1]})"
        )
        problems.append(Problem(item, file_message(sample.mask_path, what)))
    return problems


def check_segmentation(samples: Sequence[SegSample], *, desc: str = "masks") -> list[Problem]:
    """Problems of every image/label pair (see `segmentation_problems`)."""
    return [p for found in _threaded(segmentation_problems, samples, desc) for p in found]


def enforce(
    problems: Sequence[Problem],
    policy: Literal["error", "skip"],
    *,
    what: str,
    logger: logging.Logger | None = None,
) -> set[str]:
    """Apply `on_bad_data`: "error" raises DatasetError with the first problem; "skip" logs
    each problem and returns the bad item ids for the caller to drop (and count)."""
    if policy not in ("error", "skip"):
        raise ConfigError(f"on_bad_data must be 'error' or 'skip', got {policy!r}")
    if not problems:
        return set()
    if policy == "error":
        raise DatasetError(
            f"{problems[0].message} ({len(problems)} problems in {what}; `bench data check` "
            "lists them all, or set on_bad_data: skip)"
        )
    log = logger or logging.getLogger("bench")
    for p in problems:
        log.warning("skipping %s: %s", printable(p.item), p.message)
    return {p.item for p in problems}


# ---------------------------------------------------------------- a run's policy


def checked_voc_ids(
    voc_root: Path, split: str, policy: str, logger: logging.Logger
) -> tuple[list[str], list[str]]:
    """(usable ids, skipped ids) of ImageSets/Main/<split>.txt after checking every id,
    annotation (boxes included) and image as `bench data check` does, before training
    starts: every task that reads VOC2007 refuses what the check reports.
    policy "error": the first problem is a one-line DatasetError; "skip": bad ids dropped."""
    listed: list[Problem] = []  # ids that are not plain names, or repeated: never paths
    ids = read_split(voc_root, split, "Main", listed)
    problems = listed + check_detection(voc_root, ids)
    bad = enforce(problems, policy, what=f"{voc_root} {split}", logger=logger)  # type: ignore[arg-type]
    usable = [i for i in ids if i not in bad]
    if not usable:
        raise DatasetError(f"{printable(voc_root)}: split {split}: no usable image left "
                           f"({len(bad)} skipped)")  # fmt: skip
    return usable, sorted(bad)


def checked_segmentation(
    samples: Sequence[SegSample], policy: str, logger: logging.Logger, what: str
) -> tuple[list[SegSample], list[str]]:
    """(usable samples, skipped ids) after checking every image and label map."""
    problems = check_segmentation(samples, desc=what)
    bad = enforce(problems, policy, what=what, logger=logger)  # type: ignore[arg-type]
    return [s for s in samples if s.image_id not in bad], sorted(bad)


def skipped_field(*skipped: Sequence[str]) -> dict[str, Any]:
    """metrics.json's record of the items `on_bad_data: skip` dropped."""
    items = sorted({i for group in skipped for i in group})
    return {"count": len(items), "items": items[:100]}
