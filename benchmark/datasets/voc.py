"""PASCAL VOC in its own formats: Annotations XML, ImageSets split files, palette PNG masks,
and the SBD (Hariharan et al.) `cls/*.mat` files.

Boxes are kept exactly as written in the XML (1-based, inclusive pixel coordinates); the
detection code decides how to convert them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from benchmark.errors import DatasetError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

IGNORE_INDEX = 255


def _voc_colormap(n: int = 256) -> np.ndarray:
    """The devkit's `labelcolormap`: bits of the label index spread over R, G, B."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


VOC_PALETTE: np.ndarray = _voc_colormap()
"""(256, 3) uint8; `VOC_PALETTE.flatten().tolist()` is what `Image.putpalette` takes."""


@dataclass(frozen=True)
class VOCObject:
    name: str
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax as in the XML (1-based)
    difficult: bool = False
    truncated: bool = False


@dataclass
class VOCAnnotation:
    image_id: str
    filename: str
    width: int
    height: int
    objects: list[VOCObject] = field(default_factory=list)


def _text(node: ET.Element, tag: str, path: Path, default: str | None = None) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if default is not None:
            return default
        raise DatasetError(f"{path}: missing <{tag}> in <{node.tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path) -> float:
    value = _text(node, tag, path)
    try:
        return float(value)
    except ValueError:
        raise DatasetError(f"{path}: <{tag}> is not a number ({value!r})") from None


def _flag(node: ET.Element, tag: str, path: Path) -> bool:
    # VOC2012 omits <difficult>/<truncated> on some objects; the devkit reads absent as 0.
    value = _text(node, tag, path, default="0")
    if value not in ("0", "1"):
        raise DatasetError(f"{path}: <{tag}> must be 0 or 1, got {value!r}")
    return value == "1"


def parse_voc_xml(path: Path, classes: Sequence[str] | None = VOC_CLASSES) -> VOCAnnotation:
    """Read one Annotations/*.xml file; any malformed or unknown content names the file.

    `classes=None` accepts any object name (the checker reports unknown names itself).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except ET.ParseError as exc:
        raise DatasetError(f"{path}: malformed XML ({exc})") from None
    if root.tag != "annotation":
        raise DatasetError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    filename = _text(root, "filename", path)
    size = root.find("size")
    if size is None:
        raise DatasetError(f"{path}: missing <size>")
    width, height = int(_number(size, "width", path)), int(_number(size, "height", path))
    objects = []
    for obj in root.findall("object"):
        name = _text(obj, "name", path)
        if classes is not None and name not in classes:
            raise DatasetError(f"{path}: unknown class name {name!r}")
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"{path}: object {name!r} has no <bndbox>")
        box = tuple(_number(bb, k, path) for k in ("xmin", "ymin", "xmax", "ymax"))
        objects.append(
            VOCObject(
                name=name,
                box=box,  # type: ignore[arg-type]
                difficult=_flag(obj, "difficult", path),
                truncated=_flag(obj, "truncated", path),
            )
        )
    return VOCAnnotation(path.stem, filename, width, height, objects)


def read_split(
    voc_root: Path, split: str, kind: Literal["Main", "Segmentation"] = "Main"
) -> list[str]:
    """Image ids of ImageSets/<kind>/<split>.txt, in file order."""
    path = Path(voc_root) / "ImageSets" / kind / f"{split}.txt"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path}: split file not found") from None
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: split file is empty")
    return ids


def load_detection(
    voc_root: Path, split: str, classes: Sequence[str] = VOC_CLASSES
) -> list[VOCAnnotation]:
    """Annotations of every image in ImageSets/Main/<split>.txt."""
    voc_root = Path(voc_root)
    return [
        parse_voc_xml(voc_root / "Annotations" / f"{i}.xml", classes)
        for i in read_split(voc_root, split, "Main")
    ]


def classification_targets(
    annotations: Sequence[VOCAnnotation], classes: Sequence[str] = VOC_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Image-level labels as in the official per-class files.

    Returns `labels` float32 (N, C) in {0, 1} and `difficult` bool (N, C). A class present
    only through difficult objects is labels=0, difficult=True: the devkit's "0" entries,
    which classification training and AP ignore.
    """
    index = {c: k for k, c in enumerate(classes)}
    labels = np.zeros((len(annotations), len(classes)), dtype=np.float32)
    any_difficult = np.zeros_like(labels, dtype=bool)
    for n, ann in enumerate(annotations):
        for obj in ann.objects:
            if obj.difficult:
                any_difficult[n, index[obj.name]] = True
            else:
                labels[n, index[obj.name]] = 1.0
    return labels, any_difficult & (labels == 0)


def read_class_files(
    voc_root: Path, split: str, classes: Sequence[str] = VOC_CLASSES
) -> tuple[list[str], np.ndarray]:
    """The official ImageSets/Main/<class>_<split>.txt files: ids and int8 (N, C) in {1,-1,0}."""
    main = Path(voc_root) / "ImageSets" / "Main"
    ids: list[str] | None = None
    columns = []
    for cls in classes:
        path = main / f"{cls}_{split}.txt"
        try:
            rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            raise DatasetError(f"{path}: per-class split file not found") from None
        try:
            file_ids, values = [r[0] for r in rows], [int(r[1]) for r in rows]
        except (IndexError, ValueError):
            raise DatasetError(f"{path}: each line must be '<image id> <1|-1|0>'") from None
        if any(v not in (1, -1, 0) for v in values):
            raise DatasetError(f"{path}: labels must be 1, -1 or 0")
        if ids is None:
            ids = file_ids
        elif file_ids != ids:
            raise DatasetError(f"{path}: image ids differ from {classes[0]}_{split}.txt")
        columns.append(values)
    labels = np.array(columns, dtype=np.int8).T.reshape(len(ids or []), len(classes))
    return ids or [], labels


# ---------------------------------------------------------------- segmentation (VOC2012, SBD)


@dataclass(frozen=True)
class SegSample:
    image_id: str
    image_path: Path
    mask_path: Path  # SegmentationClass/*.png (VOC) or cls/*.mat (SBD)


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: {what} not found")
    return path


def load_segmentation(voc2012_root: Path, split: str) -> list[SegSample]:
    """Image/mask pairs of ImageSets/Segmentation/<split>.txt; every file must exist."""
    root = Path(voc2012_root)
    return [
        SegSample(
            i,
            _existing(root / "JPEGImages" / f"{i}.jpg", "image"),
            _existing(root / "SegmentationClass" / f"{i}.png", "segmentation mask"),
        )
        for i in read_split(root, split, "Segmentation")
    ]


def load_sbd(sbd_root: Path, split: str) -> list[SegSample]:
    """SBD pairs (dataset/img/*.jpg, dataset/cls/*.mat) of dataset/<split>.txt.

    `sbd_root` is the folder holding `cls/`, `img/` and the split lists (SBD's `dataset/`).
    """
    root = Path(sbd_root)
    path = root / f"{split}.txt"
    try:
        ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise DatasetError(f"{path}: SBD split file not found") from None
    return [
        SegSample(
            i,
            _existing(root / "img" / f"{i}.jpg", "image"),
            _existing(root / "cls" / f"{i}.mat", "SBD class file"),
        )
        for i in ids
    ]


def read_mask(path: Path) -> np.ndarray:
    """Class indices (H, W) uint8 from a palette (or L) PNG; 255 marks ignored pixels.

    An RGB mask would silently give colour values instead of class indices, so it is refused.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DatasetError(
                    f"{path}: segmentation mask must be a palette or greyscale PNG, "
                    f"got mode {im.mode}"
                )
            return np.array(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable mask ({exc})") from None


def read_sbd_mat(path: Path) -> np.ndarray:
    """Class indices (H, W) uint8 from an SBD `cls/*.mat` file (GTcls.Segmentation)."""
    from scipy.io import loadmat

    path = Path(path)
    try:
        mat = loadmat(path, squeeze_me=True, struct_as_record=False)
    except FileNotFoundError:
        raise DatasetError(f"{path}: SBD file not found") from None
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for a bad file
        raise DatasetError(f"{path}: unreadable .mat file ({exc})") from None
    gt = mat.get("GTcls")
    seg = getattr(gt, "Segmentation", None)
    if seg is None:
        raise DatasetError(f"{path}: no GTcls.Segmentation field (not an SBD cls file)")
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.min(initial=0) < 0 or seg.max(initial=0) > 255:
        raise DatasetError(f"{path}: GTcls.Segmentation is not a 2-D label map")
    return seg.astype(np.uint8)


def read_label(path: Path) -> np.ndarray:
    """A segmentation target from either source: `.png` (VOC) or `.mat` (SBD)."""
    return read_sbd_mat(path) if Path(path).suffix.lower() == ".mat" else read_mask(path)
