"""PASCAL VOC in its own formats: Annotations XML, ImageSets split files, palette PNG masks,
and the SBD (Hariharan et al.) `cls/*.mat` files.

Boxes are kept exactly as written in the XML (1-based, inclusive pixel coordinates); the
detection code decides how to convert them.
"""

from __future__ import annotations

import math
import struct
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from benchmark.datasets.folder import IMAGE_FORMATS, image_error
from benchmark.errors import DatasetError, file_message, printable

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


def _text(
    node: ET.Element, tag: str, path: Path, default: str | None = None, where: str = ""
) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if default is not None:
            return default
        raise DatasetError(file_message(path, f"{where}missing <{tag}> in <{node.tag}>"))
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path, where: str = "") -> float:
    """A finite number: float() also accepts "nan" and "inf", which no box or size can be."""
    value = _text(node, tag, path, where=where)
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise DatasetError(file_message(path, f"{where}<{tag}> is not a number ({value!r})"))
    return number


def _flag(node: ET.Element, tag: str, path: Path, where: str = "") -> bool:
    # VOC2012 omits <difficult>/<truncated> on some objects; the devkit reads absent as 0.
    value = _text(node, tag, path, default="0")
    if value not in ("0", "1"):
        raise DatasetError(file_message(path, f"{where}<{tag}> must be 0 or 1, got {value!r}"))
    return value == "1"


def object_label(k: int, name: str) -> str:
    """How messages name the k-th (0-based) <object> of an annotation: 'object 2 (dog)'."""
    return f"object {k + 1} ({name})"


def parse_voc_xml(path: Path, classes: Sequence[str] | None = VOC_CLASSES) -> VOCAnnotation:
    """Read one Annotations/*.xml file; any malformed or unknown content names the file.

    `classes=None` accepts any object name (the checker reports unknown names itself).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DatasetError(file_message(path, "annotation file not found")) from None
    except OSError as exc:
        raise DatasetError(file_message(path, f"unreadable annotation ({exc})")) from None
    except Exception as exc:  # noqa: BLE001 - ParseError, or ValueError for odd encodings
        raise DatasetError(file_message(path, f"malformed XML ({exc})")) from None
    if root.tag != "annotation":
        raise DatasetError(
            file_message(path, f"root element is <{root.tag}>, expected <annotation>")
        )
    filename = _text(root, "filename", path)
    size = root.find("size")
    if size is None:
        raise DatasetError(file_message(path, "missing <size>"))
    width, height = int(_number(size, "width", path)), int(_number(size, "height", path))
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name", path, where=f"object {k + 1}: ")
        where = f"{object_label(k, name)}: "
        if classes is not None and name not in classes:
            raise DatasetError(file_message(path, f"unknown class name {name!r} (object {k + 1})"))
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(file_message(path, f"{where}has no <bndbox>"))
        box = tuple(_number(bb, c, path, where) for c in ("xmin", "ymin", "xmax", "ymax"))
        objects.append(
            VOCObject(
                name=name,
                box=box,  # type: ignore[arg-type]
                difficult=_flag(obj, "difficult", path, where),
                truncated=_flag(obj, "truncated", path, where),
            )
        )
    return VOCAnnotation(path.stem, filename, width, height, objects)


@dataclass(frozen=True)
class Problem:
    """What is wrong with one item of a dataset (an image id, a file stem, a file)."""

    item: str  # the item id the problem belongs to (what `on_bad_data: skip` drops)
    message: str  # one line: "<printable path>: what is wrong"


def id_problem(name: str) -> str | None:
    """Why `name` cannot be an image id or a file name inside a dataset folder (None when
    it can): ids become paths (JPEGImages/<id>.jpg, overlays/<id>.png), so one must be a
    plain name: not empty, '.' or '..', and without '/', '\\', NUL or control characters."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"{name!r} is not a file name"
    if "/" in name or "\\" in name:
        return f"{printable(name)!r} is a path, not a plain name"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        return f"{printable(name)!r} holds a control character"
    return None


def read_rows(path: Path, what: str = "split file") -> list[list[str]]:
    """The whitespace-separated fields of each non-blank line of a VOC/SBD list file."""
    return [row for _, row in numbered_rows(path, what)]


def numbered_rows(path: Path, what: str = "split file") -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line of a VOC/SBD list file.

    Decoded as `utf-8-sig`: a file saved by an editor that writes a byte-order mark must not
    give a first id of "\ufeff000005", which matches no file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(file_message(path, f"{what} not found")) from None
    except OSError as exc:
        raise DatasetError(file_message(path, f"unreadable {what} ({exc.strerror})")) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DatasetError(
            file_message(path, f"{what} is not valid UTF-8 text (line {line})")
        ) from None
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise DatasetError(file_message(path, f"{what} holds a NUL byte (line {line})"))
    lines = text.split("\n")  # the numbering editors and `check` show
    return [(n + 1, line.split()) for n, line in enumerate(lines) if line.strip()]


def read_id_list(
    path: Path, what: str = "split file", problems: list[Problem] | None = None
) -> list[str]:
    """The ids (first field of each line) of a split file (ImageSets/*/*.txt, SBD train.txt),
    each once, in file order.

    An id that is not a plain name (`id_problem`) or that repeats an earlier line is a
    DatasetError naming the file and the line; when `problems` is given it is appended
    there instead and left out (what `bench data check` and `on_bad_data: skip` need).
    """
    found: list[Problem] = []
    first: dict[str, int] = {}
    for line, row in numbered_rows(path, what):
        image_id = row[0]
        bad = id_problem(image_id)
        if bad:
            found.append(Problem(image_id, file_message(path, f"line {line}: image id {bad}")))
        elif image_id in first:
            what_ = f"line {line}: image id {image_id} repeats line {first[image_id]}"
            found.append(Problem(f"{image_id} (line {line})", file_message(path, what_)))
        else:
            first[image_id] = line
    if found and problems is None:
        raise DatasetError(found[0].message)
    if problems is not None:
        problems += found
    return list(first)


def read_split(
    voc_root: Path,
    split: str,
    kind: Literal["Main", "Segmentation"] = "Main",
    problems: list[Problem] | None = None,
) -> list[str]:
    """Image ids of ImageSets/<kind>/<split>.txt, in file order (see `read_id_list`); a
    split without any is an error."""
    path = Path(voc_root) / "ImageSets" / kind / f"{split}.txt"
    ids = read_id_list(path, problems=problems)
    if not ids:
        raise DatasetError(file_message(path, "split file lists no usable image id"))
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


CLASS_LINE_FORMAT = "each line must be '<image id> <1|-1|0>'"


def read_class_files(
    voc_root: Path, split: str, classes: Sequence[str] = VOC_CLASSES
) -> tuple[list[str], np.ndarray]:
    """The official ImageSets/Main/<class>_<split>.txt files: ids and int8 (N, C) in {1,-1,0}."""
    main = Path(voc_root) / "ImageSets" / "Main"
    ids: list[str] | None = None
    columns = []
    for cls in classes:
        path = main / f"{cls}_{split}.txt"
        rows = read_rows(path, "per-class split file")
        try:
            file_ids, values = [r[0] for r in rows], [int(r[1]) for r in rows]
        except (IndexError, ValueError):
            raise DatasetError(file_message(path, CLASS_LINE_FORMAT)) from None
        if any(v not in (1, -1, 0) for v in values):
            raise DatasetError(file_message(path, "labels must be 1, -1 or 0"))
        if ids is None:
            ids = file_ids
        elif file_ids != ids:
            raise DatasetError(
                file_message(path, f"image ids differ from {classes[0]}_{split}.txt")
            )
        columns.append(values)
    labels = np.array(columns, dtype=np.int8).T.reshape(len(ids or []), len(classes))
    return ids or [], labels


# ---------------------------------------------------------------- segmentation (VOC2012, SBD)


@dataclass(frozen=True)
class SegSample:
    image_id: str
    image_path: Path
    mask_path: Path  # SegmentationClass/*.png (VOC) or cls/*.mat (SBD)


# What a missing file of each kind is called, by the loaders here and by every check.
IMAGE_MISSING = "image file not found"
MASK_MISSING = "segmentation mask not found"
MAT_MISSING = "SBD class file not found"


def _existing(path: Path, missing: str) -> Path:
    if not path.is_file():
        raise DatasetError(file_message(path, missing))
    return path


def load_segmentation(voc2012_root: Path, split: str) -> list[SegSample]:
    """Image/mask pairs of ImageSets/Segmentation/<split>.txt; every file must exist."""
    root = Path(voc2012_root)
    return [
        SegSample(
            i,
            _existing(root / "JPEGImages" / f"{i}.jpg", IMAGE_MISSING),
            _existing(root / "SegmentationClass" / f"{i}.png", MASK_MISSING),
        )
        for i in read_split(root, split, "Segmentation")
    ]


def load_sbd(sbd_root: Path, split: str, problems: list[Problem] | None = None) -> list[SegSample]:
    """SBD pairs (dataset/img/*.jpg, dataset/cls/*.mat) of dataset/<split>.txt.

    `sbd_root` is the folder holding `cls/`, `img/` and the split lists (SBD's `dataset/`).
    Bad ids: see `read_id_list`.
    """
    root = Path(sbd_root)
    ids = read_id_list(root / f"{split}.txt", "SBD split file", problems)
    return [
        SegSample(
            i,
            _existing(root / "img" / f"{i}.jpg", IMAGE_MISSING),
            _existing(root / "cls" / f"{i}.mat", MAT_MISSING),
        )
        for i in ids
    ]


_MODE_NOTES = {
    "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit", "F": "float",
    "1": "1-bit", "RGB": "colour", "RGBA": "colour", "LA": "with alpha", "PA": "with alpha",
}  # fmt: skip


def check_label_values(path: Path, labels: np.ndarray) -> np.ndarray:
    """`labels` as uint8 class indices if every value is 0-20 or 255, else DatasetError.

    Any other value would train on a class that does not exist (or index past the loss).
    """
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise DatasetError(file_message(path, f"label map holds {labels.dtype} values"))
    if labels.size and (not np.isfinite(labels).all() or (labels != np.round(labels)).any()):
        raise DatasetError(file_message(path, "label map holds non-integer values"))
    if labels.size and (labels.min() < 0 or labels.max() > IGNORE_INDEX):
        lo, hi = int(labels.min()), int(labels.max())
        raise DatasetError(file_message(path, f"label values {lo}..{hi} are not 0-20 or 255"))
    labels = labels.astype(np.uint8, copy=False)
    counts = np.bincount(labels.ravel(), minlength=256)
    bad = np.flatnonzero(counts[len(VOC_CLASSES) + 1 : IGNORE_INDEX]) + len(VOC_CLASSES) + 1
    if bad.size:
        raise DatasetError(
            file_message(path, f"label values {bad[:5].tolist()} are neither 0-20 nor 255")
        )
    return labels


def read_mask(path: Path) -> np.ndarray:
    """Class indices (H, W) uint8 from a palette (or L) PNG; 255 marks ignored pixels.

    An RGB mask would silently give colour values, and a 16-bit one values above 255, instead
    of class indices, so both are refused, as are values 21-254.
    """
    path = Path(path)
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            if im.mode not in ("P", "L"):
                note = _MODE_NOTES.get(im.mode)
                raise DatasetError(
                    file_message(
                        path,
                        f"mask is not an 8-bit palette or greyscale PNG (mode {im.mode}"
                        + (f", {note}" if note else "")
                        + "); masks hold class indices 0-20 and 255",
                    )
                )
            labels = np.array(im, dtype=np.uint8)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(file_message(path, MASK_MISSING)) from None
    except Exception as exc:  # noqa: BLE001 - see folder.image_error
        raise image_error(path, exc, "mask") from None
    return check_label_values(path, labels)


MAT_INFLATE_LIMIT = 256 << 20  # bytes; an SBD label file inflates to well under 10 MB
_MI_DTYPES = {  # MAT v5 data types -> numpy
    1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8",
}  # fmt: skip
_MI_MATRIX, _MI_COMPRESSED, _MX_STRUCT, _MX_NUMERIC = 14, 15, 2, range(6, 16)


class _MatError(ValueError):
    """A MAT file that is damaged or not laid out as an SBD cls file."""


def _mat_elements(buf: bytes, order: str, pad: bool) -> list[tuple[int, bytes]]:
    """(type, data) of the consecutive data elements in `buf` (MAT v5 tags, small or not)."""
    out, pos = [], 0
    while pos < len(buf):
        if pos + 8 > len(buf):
            raise _MatError("truncated (an element tag is cut off)")
        word, nbytes = struct.unpack_from(order + "II", buf, pos)
        if word >> 16:  # small element: size and type share 4 bytes, data the next 4
            out.append((word & 0xFFFF, buf[pos + 4 : pos + 4 + min(word >> 16, 4)]))
            pos += 8
            continue
        if pos + 8 + nbytes > len(buf):
            raise _MatError("truncated (an element runs past the end of its data)")
        out.append((word, buf[pos + 8 : pos + 8 + nbytes]))
        pos += 8 + (-(-nbytes // 8) * 8 if pad else nbytes)
    return out


def _inflate(data: bytes) -> bytes:
    """A miCOMPRESSED element's content; zlib's checksum must hold and the size stay sane."""
    inflate = zlib.decompressobj()
    try:
        out = inflate.decompress(data, MAT_INFLATE_LIMIT + 1)
    except zlib.error as exc:
        raise _MatError(f"corrupt compressed data ({exc})") from None
    if len(out) > MAT_INFLATE_LIMIT:
        raise _MatError(f"compressed data inflates past {MAT_INFLATE_LIMIT >> 20} MiB")
    if not inflate.eof:
        raise _MatError("compressed data is cut short")
    return out


def _mat_array(data: bytes, order: str) -> tuple[str, int, tuple[int, ...], list]:
    """(name, class, dims, remaining sub-elements) of a miMATRIX element's content."""
    subs = _mat_elements(data, order, pad=True)
    if len(subs) < 3 or subs[0][0] != 6 or len(subs[0][1]) != 8 or subs[1][0] != 5:
        raise _MatError("malformed array header")
    klass = struct.unpack_from(order + "I", subs[0][1])[0]
    dims = tuple(int(d) for d in np.frombuffer(subs[1][1], order + "i4"))
    return subs[2][1].decode("latin-1"), klass, dims, subs[3:]


def _sbd_segmentation(raw: bytes) -> np.ndarray | None:
    """GTcls.Segmentation of a MAT v5 file as stored, or None when the file has no such field.

    Read here rather than by scipy.io.loadmat, which parses every field and crashes the
    process (segmentation fault) on some damaged files; this reads only the one array, with
    every length checked, and inflates compressed data completely (checksum included).
    """
    if len(raw) < 128 or raw[126:128] not in (b"IM", b"MI"):
        raise _MatError("not a MATLAB v5 MAT-file (SBD cls files are)")
    order = "<" if raw[126:128] == b"IM" else ">"
    for kind, data in _mat_elements(raw[128:], order, pad=False):
        if kind == _MI_COMPRESSED:
            inner = _mat_elements(_inflate(data), order, pad=False)
            if len(inner) != 1:
                raise _MatError("compressed element does not hold one variable")
            kind, data = inner[0]
        if kind != _MI_MATRIX or not data:
            continue
        name, klass, dims, subs = _mat_array(data, order)
        if name != "GTcls":
            continue
        if klass & 0xFF != _MX_STRUCT or math.prod(dims) != 1 or len(subs) < 2:
            raise _MatError("GTcls is not a 1x1 struct")
        width = struct.unpack_from(order + "i", subs[0][1].ljust(4, b"\0"))[0]
        names = subs[1][1]
        if width <= 0 or len(names) % width:
            raise _MatError("malformed GTcls field names")
        fields = [names[k : k + width].split(b"\0")[0] for k in range(0, len(names), width)]
        if len(subs) != 2 + len(fields):
            raise _MatError(f"GTcls names {len(fields)} fields but holds {len(subs) - 2}")
        if b"Segmentation" not in fields:
            return None
        kind, field = subs[2 + fields.index(b"Segmentation")]
        if kind != _MI_MATRIX or not field:
            return None
        _, klass, dims, parts = _mat_array(field, order)
        if klass & 0xFF not in _MX_NUMERIC or klass & 0x800 or not parts:
            raise _MatError("GTcls.Segmentation is not a real numeric array")
        mi, values = parts[0]
        if mi not in _MI_DTYPES:
            raise _MatError(f"GTcls.Segmentation has data type {mi}")
        array = np.frombuffer(values, order + _MI_DTYPES[mi])
        if any(d < 0 for d in dims) or array.size != math.prod(dims):
            raise _MatError("GTcls.Segmentation holds fewer values than its size says")
        return array.reshape(dims, order="F")
    return None


def read_sbd_mat(path: Path) -> np.ndarray:
    """Class indices (H, W) uint8 from an SBD `cls/*.mat` file (GTcls.Segmentation)."""
    path = Path(path)
    try:
        seg = _sbd_segmentation(path.read_bytes())
    except FileNotFoundError:
        raise DatasetError(file_message(path, MAT_MISSING)) from None
    except (OSError, _MatError, struct.error) as exc:
        raise DatasetError(file_message(path, f"unreadable .mat file ({exc})")) from None
    if seg is None:
        raise DatasetError(file_message(path, "no GTcls.Segmentation field (not an SBD cls file)"))
    if seg.ndim != 2 or seg.size == 0:
        raise DatasetError(file_message(path, "GTcls.Segmentation is not a 2-D label map"))
    return check_label_values(path, seg)


def read_label(path: Path) -> np.ndarray:
    """A segmentation target from either source: `.png` (VOC) or `.mat` (SBD)."""
    return read_sbd_mat(path) if Path(path).suffix.lower() == ".mat" else read_mask(path)
