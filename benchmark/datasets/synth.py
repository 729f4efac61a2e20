"""The embedded default dataset: a small synthetic VOCdevkit written in the real formats.

Every command runs on it when no dataset is given, so the whole pipeline (pretraining,
classification, detection, segmentation, SBD) can be exercised on a laptop. Scenes hold
objects of twenty classes, each with its own shape, colour pair and texture family, on
textured muted backgrounds, at varied scales, partly occluding each other and cut by the
image border. Tiny or mostly hidden objects are marked difficult, as VOC annotators do.

Layout under OUT (the same as the real datasets, so the same readers are used):

    VOCdevkit/VOC2007/  JPEGImages, Annotations, ImageSets/Main/{train,val,trainval,test}.txt
                        and the 20 `<class>_<split>.txt` files (1 / -1 / 0 = difficult only)
    VOCdevkit/VOC2012/  JPEGImages, Annotations, SegmentationClass (palette PNG, 255 = void
                        band at object borders and difficult objects), SegmentationObject,
                        ImageSets/Segmentation/{train,val,trainval}.txt,
                        ImageSets/Main/{train,val,trainval}.txt and their class files,
                        SegmentationClassAug (greyscale PNG of each SBD map) with
                        ImageSets/Segmentation/{aug,trainaug}.txt, as mmsegmentation's
                        tools/dataset_converters/voc_aug.py writes them
    SBD/dataset/        cls/*.mat (GTcls: Boundaries, Segmentation, CategoriesPresent),
                        img/*.jpg, train.txt, val.txt
    unlabelled/         *.jpg, an unlabelled pool for pretraining
    synth.json          the parameters; written last, so its presence means "complete"

VOC2012 and SBD share their image ids like the real ones: SBD train adds scenes that have
no VOC2012 segmentation and also covers some VOC2012 val images (the reason the FCN
protocol validates on val minus SBD train); SBD val covers some VOC2012 train images.
`aug.txt` is SBD train + val minus VOC2012 train and val, `trainaug.txt` VOC2012 train plus
`aug.txt` (voc_aug.py's two lists: the "aug" training set of mmsegmentation's VOC configs).
VOC2012's detection lists (ImageSets/Main) name the scenes of VOC2007 train / val under
their 2012 ids, so a VOC07+12 detection run sees no VOC2007 test scene in training (the real
VOC2012 holds no VOC2007 image either); each trainval scene is there twice, once per year.

Determinism: each image draws from its own `numpy.random.Generator` seeded by
(seed, stream, index); JPEGs use a fixed quality and carry no metadata; the .mat header's
timestamp is replaced by a constant. The same seed gives byte-identical trees.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from benchmark.datasets.voc import IGNORE_INDEX, VOC_CLASSES, VOC_PALETTE
from benchmark.errors import DatasetError, printable

GENERATOR_VERSION = 2  # 2: VOC2012 ImageSets/Main, SegmentationClassAug, aug lists
JPEG_QUALITY = 90
MARKER = "synth.json"
_STREAM_SCENE, _STREAM_UNLABELLED, _STREAM_SPLITS, _STREAM_NOISE = 1, 2, 3, 4

# ------------------------------------------------------------------------------ shapes
# Each takes normalised coordinates (u, v) in about [-1.1, 1.1] (v grows downwards) and
# returns the inside of the shape. Twenty distinct silhouettes, one per class.

Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _polygon(n: int, radius: float = 0.95, phase: float = 0.0) -> Shape:
    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        r = np.hypot(u, v)
        t = np.mod(np.arctan2(v, u) + phase, 2 * np.pi / n) - np.pi / n
        return r * np.cos(t) < radius * np.cos(np.pi / n)

    return inside


def _star(points: int, inner: float) -> Shape:
    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        r = np.hypot(u, v)
        t = np.arctan2(v, u) + np.pi / 2
        # Radius oscillates between `inner` and 1 with `points` tips.
        edge = inner + (1 - inner) * np.abs(np.cos(points * t / 2)) ** 2
        return r < edge

    return inside


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = u * 1.15, -v * 1.15 + 0.15
    return (x * x + y * y - 1) ** 3 - x * x * y**3 < 0


def _arrow(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    shaft = (np.abs(v) < 0.22) & (u > -0.95) & (u < 0.2)
    head = (u >= 0.2) & (u < 0.95) & (np.abs(v) < (0.95 - u) * 1.2)
    return shaft | head


SHAPES: dict[str, Shape] = {
    "disk": lambda u, v: u * u + v * v < 0.95**2,
    "square": lambda u, v: (np.abs(u) < 0.8) & (np.abs(v) < 0.8),
    "triangle": lambda u, v: (v < 0.8) & (np.abs(u) < (v + 0.95) * 0.55),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) < 0.98,
    "star5": _star(5, 0.45),
    "hexagon": _polygon(6),
    "plus": lambda u, v: (
        ((np.abs(u) < 0.3) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.3) & (np.abs(u) < 0.95))
    ),
    "ring": lambda u, v: (u * u + v * v < 0.95**2) & (u * u + v * v > 0.5**2),
    "xcross": lambda u, v: (
        (np.abs(u - v) < 0.4) & (np.abs(u + v) < 1.3)
        | (np.abs(u + v) < 0.4) & (np.abs(u - v) < 1.3)
    ),
    "crescent": lambda u, v: (u * u + v * v < 0.95**2) & ((u - 0.45) ** 2 + v * v > 0.7**2),
    "heart": _heart,
    "arrow": _arrow,
    "ell": lambda u, v: (
        ((np.abs(u + 0.55) < 0.35) & (np.abs(v) < 0.95))
        | ((np.abs(v - 0.6) < 0.35) & (np.abs(u) < 0.9))
    ),
    "tee": lambda u, v: (
        ((np.abs(v + 0.6) < 0.32) & (np.abs(u) < 0.95)) | ((np.abs(u) < 0.3) & (np.abs(v) < 0.95))
    ),
    "pentagon": _polygon(5, phase=np.pi / 2),
    "trapezoid": lambda u, v: (np.abs(v) < 0.6) & (np.abs(u) < 0.45 + 0.5 * (v + 0.6)),
    "halfdisk": lambda u, v: (u * u + (v - 0.45) ** 2 < 0.95**2) & (v < 0.45),
    "star4": _star(4, 0.3),
    "frame": lambda u, v: (
        (np.maximum(np.abs(u), np.abs(v)) < 0.9) & (np.maximum(np.abs(u), np.abs(v)) > 0.5)
    ),
    "aitch": lambda u, v: (
        ((np.abs(np.abs(u) - 0.65) < 0.28) & (np.abs(v) < 0.95))
        | ((np.abs(v) < 0.22) & (np.abs(u) < 0.9))
    ),
}

# ---------------------------------------------------------------------------- textures
# Each maps local pixel coordinates (x, y), the period p and angle a to a mix weight in
# [0, 1] between the class's two colours.

Texture = Callable[[np.ndarray, np.ndarray, float, float], np.ndarray]

TEXTURES: dict[str, Texture] = {
    "stripes": lambda x, y, p, a: (
        np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / p) > 0
    ).astype(np.float32),
    "checker": lambda x, y, p, a: ((np.floor(x / p) + np.floor(y / p)) % 2).astype(np.float32),
    "dots": lambda x, y, p, a: (
        (np.mod(x, p) - p / 2) ** 2 + (np.mod(y, p) - p / 2) ** 2 < (p / 3.2) ** 2
    ).astype(np.float32),
    "waves": lambda x, y, p, a: 0.5 + 0.5 * np.sin(2 * np.pi * x / p + 2.0 * np.sin(y / p)),
    "rings": lambda x, y, p, a: 0.5 + 0.5 * np.cos(2 * np.pi * np.hypot(x, y) / p),
    "gradient": lambda x, y, p, a: np.clip((x * np.cos(a) + y * np.sin(a)) / (8 * p) % 1.0, 0, 1),
}


@dataclass(frozen=True)
class ClassStyle:
    shape: str
    primary: tuple[float, float, float]
    secondary: tuple[float, float, float]
    texture: str
    period: float
    angle: float


def _class_styles() -> dict[str, ClassStyle]:
    """A fixed look per class: a unique shape, a hue of its own and a texture family."""
    shapes = list(SHAPES)
    textures = list(TEXTURES)
    styles = {}
    for k, name in enumerate(VOC_CLASSES):
        hue = (k * 7 % 20) / 20.0  # neighbours in class order get far-apart hues
        sat = (0.95, 0.7, 0.55)[k % 3]
        val = (0.95, 0.8)[k % 2]
        primary = colorsys.hsv_to_rgb(hue, sat, val)
        secondary = colorsys.hsv_to_rgb((hue + 0.04 * ((k % 3) - 1)) % 1.0, sat * 0.8, val * 0.45)
        styles[name] = ClassStyle(
            shape=shapes[k],
            primary=tuple(255 * c for c in primary),  # type: ignore[arg-type]
            secondary=tuple(255 * c for c in secondary),  # type: ignore[arg-type]
            texture=textures[(k * 5) % len(textures)],
            period=3.0 + (k % 4) * 1.5,
            angle=(k * 37 % 180) * np.pi / 180,
        )
    return styles


CLASS_STYLES: dict[str, ClassStyle] = _class_styles()
# Rough VOC2007 object frequencies (person dominates), so chance AP differs by class.
_CLASS_WEIGHTS = np.array(
    [3, 3, 4, 3, 4, 2, 8, 3, 6, 2, 2, 4, 3, 3, 20, 4, 3, 2, 2, 3], dtype=np.float64
)
_CLASS_WEIGHTS /= _CLASS_WEIGHTS.sum()

# ------------------------------------------------------------------------------ scenes


@dataclass
class SceneObject:
    name: str
    instance: int  # index in the instance map (1-based)
    box: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax, 1-based inclusive (VOC)
    difficult: bool
    truncated: bool


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    instances: np.ndarray  # (H, W) int16, 0 = background, k = objects[k-1]'s instance
    objects: list[SceneObject]


def _background(rng: np.random.Generator, h: int, w: int, grain: np.ndarray) -> np.ndarray:
    """Muted two-colour blotches plus one of three texture families (grain, stripes, ramp).

    The blotches are blended on a coarse grid and upsampled (smooth by construction, and
    much cheaper than blending at full size); `grain` is a (h, w, 1) unit-noise crop.
    """
    grey = rng.uniform(60, 190, size=2)
    c1 = grey[0] + rng.uniform(-22, 22, size=3)
    c2 = grey[1] + rng.uniform(-22, 22, size=3)
    cell = int(rng.integers(12, 40))
    t = rng.random((h // cell + 2, w // cell + 2, 1))
    small = np.clip(c1 * (1 - t) + c2 * t, 0, 255).astype(np.uint8)
    bg = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    kind = rng.integers(3)
    if kind == 0:
        bg += 9 * grain
    elif kind == 1:
        a, p = rng.uniform(0, np.pi), rng.uniform(5, 18)
        xx = np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(a) * 2 * np.pi / p)
        yy = np.arange(h, dtype=np.float32)[:, None] * np.float32(np.sin(a) * 2 * np.pi / p)
        bg += (10 * np.sin(xx + yy))[..., None]
    else:
        yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None, None]
        bg += np.float32(25 * rng.choice([-1, 1])) * yy
    return bg


def noise_tile(seed: int, size: int) -> np.ndarray:
    """(2*size, 2*size, 3) float32 unit Gaussian noise; scenes take random crops of it.

    Drawing fresh noise for every pixel of every image is the slowest step of generation;
    crops of one seeded tile look the same and keep the output a function of the seed.
    """
    rng = np.random.default_rng([seed, _STREAM_NOISE])
    return rng.standard_normal(size=(2 * size, 2 * size, 3), dtype=np.float32)


def _crop(rng: np.random.Generator, tile: np.ndarray, h: int, w: int) -> np.ndarray:
    if tile.shape[0] < h or tile.shape[1] < w:
        raise ValueError(f"noise tile {tile.shape[:2]} smaller than image {(h, w)}")
    y = int(rng.integers(tile.shape[0] - h + 1))
    x = int(rng.integers(tile.shape[1] - w + 1))
    return tile[y : y + h, x : x + w]


def render_scene(
    rng: np.random.Generator, width: int, height: int, noise: np.ndarray | None = None
) -> Scene:
    """Draw one scene: background, then objects from large to small (so most stay visible).

    `noise` is a `noise_tile` at least as large as the image (drawn here when None). Like
    every VOC image, a scene has at least one annotated object (redrawn otherwise).
    """
    for _ in range(100):  # almost always the first try; bounded for tiny image sizes
        scene = _draw_scene(rng, width, height, noise)
        if scene.objects:
            break
    return scene


def _draw_scene(
    rng: np.random.Generator, width: int, height: int, noise: np.ndarray | None
) -> Scene:
    if noise is None:
        noise = rng.standard_normal(size=(height, width, 3), dtype=np.float32)
    sensor = _crop(rng, noise, height, width)
    img = _background(rng, height, width, _crop(rng, noise, height, width)[..., :1])
    inst = np.zeros((height, width), dtype=np.int16)
    n_obj = int(rng.choice([1, 2, 3, 4, 5], p=[0.3, 0.3, 0.2, 0.12, 0.08]))
    names: list[str] = []
    for _ in range(n_obj):
        if names and rng.random() < 0.25:  # repeats, like several persons in one photo
            names.append(names[int(rng.integers(len(names)))])
        else:
            names.append(VOC_CLASSES[int(rng.choice(len(VOC_CLASSES), p=_CLASS_WEIGHTS))])
    short = min(width, height)
    scales = np.where(
        rng.random(n_obj) < 0.1,
        rng.uniform(0.05, 0.1, n_obj),  # tiny ones: mostly difficult
        np.exp(rng.uniform(np.log(0.18), np.log(0.8), n_obj)),
    )
    order = np.argsort(-scales, kind="stable")
    drawn: list[tuple[str, int, bool, int, tuple[int, int, int, int]]] = []
    for rank, j in enumerate(order, start=1):
        name, style = names[j], CLASS_STYLES[names[j]]
        size = scales[j] * short
        aspect = np.exp(rng.uniform(-0.35, 0.35))
        bw = max(3, int(round(size * np.sqrt(aspect))))
        bh = max(3, int(round(size / np.sqrt(aspect))))
        x0 = int(round(rng.uniform(-0.2 * bw, width - 0.8 * bw)))
        y0 = int(round(rng.uniform(-0.2 * bh, height - 0.8 * bh)))
        v = ((np.arange(bh, dtype=np.float32) + 0.5) / bh * 2.2 - 1.1)[:, None]
        u = ((np.arange(bw, dtype=np.float32) + 0.5) / bw * 2.2 - 1.1)[None, :]
        theta = rng.uniform(-0.3, 0.3)
        c, s = np.cos(theta), np.sin(theta)
        ur, vr = c * u + s * v, -s * u + c * v
        if rng.random() < 0.5:
            ur = -ur
        mask = SHAPES[style.shape](ur, vr)
        full = int(mask.sum())
        if full == 0:
            continue
        period = style.period * rng.uniform(0.85, 1.2) * max(1.0, size / 60)
        angle = style.angle + rng.uniform(-0.2, 0.2)
        yy = np.arange(bh, dtype=np.float32)[:, None]
        xx = np.arange(bw, dtype=np.float32)[None, :]
        t = TEXTURES[style.texture](xx, yy, period, angle)[..., None]
        jitter = rng.uniform(-14, 14, size=3)
        primary = np.asarray(style.primary, np.float32) + jitter
        secondary = np.asarray(style.secondary, np.float32) + jitter * 0.5
        shade = (1.0 + 0.12 * (-ur - vr) / 2.2) * rng.uniform(0.85, 1.1)
        colour = (primary * (1 - t) + secondary * t) * shade[..., None]
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + bw, width), min(y0 + bh, height)
        if ix1 <= ix0 or iy1 <= iy0:
            continue
        sub = mask[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
        if not sub.any():
            continue
        img[iy0:iy1, ix0:ix1][sub] = colour[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0][sub]
        inst[iy0:iy1, ix0:ix1][sub] = rank
        painted = int(sub.sum())
        drawn.append((name, rank, painted < full, painted, (ix0, iy0, ix1, iy1)))
    img += 3 * sensor
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    # Annotate from what is visible after occlusion, as annotators do.
    visible = np.bincount(inst.ravel(), minlength=n_obj + 1)
    objects: list[SceneObject] = []
    relabel = np.zeros(n_obj + 1, dtype=np.int16)
    for name, rank, truncated, painted, (ix0, iy0, ix1, iy1) in drawn:
        ys, xs = np.nonzero(inst[iy0:iy1, ix0:ix1] == rank)
        if len(ys) < 4:  # all but hidden: drop it and void its pixels below
            relabel[rank] = -1
            continue
        box = (ix0 + int(xs.min()) + 1, iy0 + int(ys.min()) + 1,
               ix0 + int(xs.max()) + 1, iy0 + int(ys.max()) + 1)  # fmt: skip
        hidden = visible[rank] < 0.35 * painted  # mostly occluded by later objects
        tiny = max(box[2] - box[0], box[3] - box[1]) + 1 < max(10, 0.08 * short)
        relabel[rank] = len(objects) + 1
        objects.append(SceneObject(name, len(objects) + 1, box, bool(hidden or tiny), truncated))
    inst = relabel[inst]  # instance ids follow annotation order; -1 marks dropped pixels
    return Scene(image, inst, objects)


# ----------------------------------------------------------------------------- writing


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _palette_png(labels: np.ndarray) -> bytes:
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(VOC_PALETTE.flatten().tolist())
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _edges(labels: np.ndarray) -> np.ndarray:
    """Pixels on either side of a change of label (a band two pixels wide)."""
    band = np.zeros(labels.shape, dtype=bool)
    dx = labels[:, 1:] != labels[:, :-1]
    dy = labels[1:, :] != labels[:-1, :]
    band[:, 1:] |= dx
    band[:, :-1] |= dx
    band[1:, :] |= dy
    band[:-1, :] |= dy
    return band


def segmentation_maps(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(SegmentationClass, SegmentationObject, SBD class map) as uint8 (H, W) arrays.

    VOC marks a thin void band (255) along object outlines and voids difficult objects; SBD
    has neither, so its map keeps every visible object's class.
    """
    n = len(scene.objects)
    cls_of = np.zeros(n + 2, dtype=np.uint8)  # index -1 (dropped pixels) -> last entry
    void_of = np.zeros(n + 2, dtype=bool)
    void_of[-1] = True
    for obj in scene.objects:
        cls_of[obj.instance] = VOC_CLASSES.index(obj.name) + 1
        void_of[obj.instance] = obj.difficult
    inst = scene.instances
    sbd = cls_of[inst]
    band = _edges(inst)
    seg_cls = np.where(void_of[inst] | band, IGNORE_INDEX, sbd).astype(np.uint8)
    seg_obj = np.where((inst < 0) | band, IGNORE_INDEX, inst).astype(np.uint8)
    return seg_cls, seg_obj, sbd


def _sbd_mat(sbd: np.ndarray) -> bytes:
    """An SBD `cls/*.mat` file: struct GTcls with Boundaries, Segmentation, CategoriesPresent."""
    import scipy.sparse
    from scipy.io import savemat

    boundaries = np.empty((len(VOC_CLASSES), 1), dtype=object)
    present = [int(c) for c in np.unique(sbd) if c != 0]
    empty = scipy.sparse.csc_matrix(sbd.shape, dtype=bool)
    for k in range(len(VOC_CLASSES)):
        if k + 1 in present:
            region = sbd == k + 1
            boundaries[k, 0] = scipy.sparse.csc_matrix(region & _edges(region))
        else:
            boundaries[k, 0] = empty
    buf = io.BytesIO()
    gt = {
        "Boundaries": boundaries,
        "Segmentation": sbd.astype(np.uint8),
        "CategoriesPresent": np.array(present, dtype=np.uint8).reshape(-1, 1),
    }
    savemat(buf, {"GTcls": gt}, do_compression=True)
    data = bytearray(buf.getvalue())
    # The 116-byte text header carries a creation time; make it constant.
    header = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: bench synthetic VOC"
    data[:116] = header.ljust(116, b" ")
    return bytes(data)


def _grey_png(labels: np.ndarray) -> bytes:
    """A greyscale class-index PNG, as voc_aug.py writes SBD maps into SegmentationClassAug."""
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def aug_lists(splits: dict[str, np.ndarray], ids: list[str]) -> dict[str, list[str]]:
    """mmsegmentation's voc_aug.py lists: aug = SBD train + val minus VOC2012 train and val;
    trainaug = VOC2012 train plus aug (sorted ids: voc_aug.py writes set differences)."""
    sbd = set(splits["sbd/train"].tolist()) | set(splits["sbd/val"].tolist())
    train, val = set(splits["12/train"].tolist()), set(splits["12/val"].tolist())
    aug = sbd - train - val
    return {"aug": sorted(ids[i] for i in aug),
            "trainaug": sorted(ids[i] for i in (train | sbd) - val)}  # fmt: skip


def _voc_xml(folder: str, filename: str, scene: Scene, segmented: bool) -> str:
    h, w = scene.image.shape[:2]
    parts = [
        "<annotation>",
        f"\t<folder>{folder}</folder>",
        f"\t<filename>{filename}</filename>",
        "\t<source>",
        "\t\t<database>bench synthetic VOC</database>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{w}</width>",
        f"\t\t<height>{h}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        f"\t<segmented>{int(segmented)}</segmented>",
    ]
    for obj in scene.objects:
        xmin, ymin, xmax, ymax = obj.box
        parts += [
            "\t<object>",
            f"\t\t<name>{obj.name}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{int(obj.truncated)}</truncated>",
            f"\t\t<difficult>{int(obj.difficult)}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def _write(path: Path, data: bytes | str) -> None:
    # Plain writes: atomicity is provided by renaming the whole tree at the end.
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _image_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    w, h = rng.integers(min_size, max_size + 1, size=2)
    return int(w), int(h)


def _class_file_lines(ids: list[str], scenes: dict[str, list[SceneObject]], cls: str) -> str:
    lines = []
    for i in ids:
        objs = [o for o in scenes[i] if o.name == cls]
        value = 1 if any(not o.difficult for o in objs) else (0 if objs else -1)
        lines.append(f"{i} {value:2d}")
    return "\n".join(lines) + "\n"


def _split_indices(n: int, seed: int) -> dict[str, np.ndarray]:
    """VOC2007: test half, trainval half (train/val quarters). VOC2012 and SBD: see module."""
    rng = np.random.default_rng([seed, _STREAM_SPLITS])
    p07 = rng.permutation(n)
    test, trainval = p07[: n // 2], p07[n // 2 :]
    train, val = trainval[: len(trainval) // 2], trainval[len(trainval) // 2 :]
    p12 = rng.permutation(n)
    k = max(1, int(round(0.3 * n)))
    seg_train, seg_val, extra = p12[:k], p12[k : 2 * k], p12[2 * k :]
    cut = (3 * len(extra)) // 4
    sbd_train = np.concatenate([extra[:cut], seg_val[: max(1, len(seg_val) // 6)]])
    sbd_val = np.concatenate([extra[cut:], seg_train[: max(1, len(seg_train) // 6)]])
    return {
        "07/train": train, "07/val": val, "07/trainval": trainval, "07/test": test,
        "12/train": seg_train, "12/val": seg_val,
        "12/trainval": np.concatenate([seg_train, seg_val]),
        "sbd/train": sbd_train, "sbd/val": sbd_val,
    }  # fmt: skip


def _params(images: int, seed: int, min_size: int, max_size: int, unlabelled: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "images": images,
        "seed": seed,
        "min_size": min_size,
        "max_size": max_size,
        "unlabelled": unlabelled,
    }


def is_complete(out: Path, params: dict | None = None) -> bool:
    """True when `out` holds a finished synthetic dataset (made with `params`, if given)."""
    marker = Path(out) / MARKER
    if not marker.is_file():
        return False
    if params is None:
        return True
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(found, dict) and all(found.get(k) == v for k, v in params.items())


def check_replaceable(out: Path) -> None:
    """`--force` replaces only a dataset this command made (its synth.json is there) or an
    empty folder: never '.', '..', the current folder or one above it, a link, or a folder
    of anything else."""
    cwd = Path.cwd().resolve()
    if out.is_symlink():
        raise DatasetError(f"{printable(out)}: is a symbolic link; bench will not replace it")
    resolved = out.resolve()
    if resolved == cwd or resolved in cwd.parents or out.name in ("", ".", ".."):
        raise DatasetError(f"{printable(out)}: is the current folder or one above it; bench "
                           "never replaces it, even with --force")  # fmt: skip
    if out.is_dir() and any(out.iterdir()) and not is_complete(out):
        raise DatasetError(
            f"{printable(out)}: was not made by `bench data synth` (it has no {MARKER}), so "
            "bench will not replace it, even with --force; choose another folder"
        )
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{printable(out)}: is a file; bench will not replace it, even "
                           "with --force")  # fmt: skip


def make_synthetic(
    out: Path,
    images: int = 1000,
    seed: int = 0,
    min_size: int = 128,
    max_size: int = 256,
    unlabelled: int | None = None,
    force: bool = False,
) -> Path:
    """Write the synthetic VOCdevkit, SBD and unlabelled pool under `out`; returns `out`.

    An `out` already holding the same dataset is reused; any other non-empty `out` is an
    error unless `force`. The tree is built beside `out` and renamed into place at the end,
    so an interrupted run never leaves half a dataset.
    """
    out = Path(out)
    unlabelled = images if unlabelled is None else unlabelled
    if images < 8:
        raise DatasetError(f"{out}: --images must be at least 8 to fill every split, got {images}")
    if not 16 <= min_size <= max_size:
        raise DatasetError(f"{out}: need 16 <= min_size <= max_size, got {min_size}, {max_size}")
    if unlabelled < 0:
        raise DatasetError(f"{out}: unlabelled must be >= 0, got {unlabelled}")
    params = _params(images, seed, min_size, max_size, unlabelled)
    if is_complete(out, params) and not force:
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise DatasetError(
            f"{out}: exists and is not this synthetic dataset (images={images}, seed={seed}); "
            "choose another folder or pass --force"
        )
    if out.exists() or out.is_symlink() or out.name in ("", ".", ".."):
        check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _build(tmp, params)
        if out.exists():
            if is_complete(out, params) and not force:  # another process finished first
                shutil.rmtree(tmp)
                return out
            check_replaceable(out)  # again: it may have changed while this one was built
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_complete(out, params):
                raise
            shutil.rmtree(tmp)  # lost a race with an identical build: keep the winner's
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _build(root: Path, params: dict) -> None:
    n, seed = params["images"], params["seed"]
    lo, hi = params["min_size"], params["max_size"]
    v07 = root / "VOCdevkit" / "VOC2007"
    v12 = root / "VOCdevkit" / "VOC2012"
    sbd = root / "SBD" / "dataset"
    dirs = [
        v07 / "JPEGImages", v07 / "Annotations", v07 / "ImageSets" / "Main",
        v12 / "JPEGImages", v12 / "Annotations", v12 / "SegmentationClass",
        v12 / "SegmentationObject", v12 / "ImageSets" / "Segmentation",
        v12 / "ImageSets" / "Main", v12 / "SegmentationClassAug",
        sbd / "cls", sbd / "img",
    ]  # fmt: skip
    if params["unlabelled"]:
        dirs.append(root / "unlabelled")
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    splits = _split_indices(n, seed)
    seg_set = set(splits["12/trainval"].tolist())
    sbd_set = set(splits["sbd/train"].tolist()) | set(splits["sbd/val"].tolist())
    id07 = [f"{i + 1:06d}" for i in range(n)]
    id12 = [f"2012_{i + 1:06d}" for i in range(n)]
    objects07: dict[str, list[SceneObject]] = {}
    noise = noise_tile(seed, hi)

    for i in tqdm(range(n), desc="synthetic VOC", unit="img", disable=None, leave=False):
        rng = np.random.default_rng([seed, _STREAM_SCENE, i])
        scene = render_scene(rng, *_image_size(rng, lo, hi), noise=noise)
        jpg = _jpeg(scene.image)
        objects07[id07[i]] = scene.objects
        _write(v07 / "JPEGImages" / f"{id07[i]}.jpg", jpg)
        _write(v07 / "Annotations" / f"{id07[i]}.xml",
               _voc_xml("VOC2007", f"{id07[i]}.jpg", scene, segmented=False))  # fmt: skip
        _write(v12 / "JPEGImages" / f"{id12[i]}.jpg", jpg)
        _write(v12 / "Annotations" / f"{id12[i]}.xml",
               _voc_xml("VOC2012", f"{id12[i]}.jpg", scene, segmented=i in seg_set))  # fmt: skip
        if i in seg_set or i in sbd_set:
            seg_cls, seg_obj, sbd_map = segmentation_maps(scene)
            if i in seg_set:
                _write(v12 / "SegmentationClass" / f"{id12[i]}.png", _palette_png(seg_cls))
                _write(v12 / "SegmentationObject" / f"{id12[i]}.png", _palette_png(seg_obj))
            if i in sbd_set:
                _write(sbd / "cls" / f"{id12[i]}.mat", _sbd_mat(sbd_map))
                _write(sbd / "img" / f"{id12[i]}.jpg", jpg)
                _write(v12 / "SegmentationClassAug" / f"{id12[i]}.png", _grey_png(sbd_map))

    def ids_of(key: str, ids: list[str]) -> list[str]:
        return [ids[i] for i in sorted(splits[key].tolist())]

    main = v07 / "ImageSets" / "Main"
    for split in ("train", "val", "trainval", "test"):
        ids = ids_of(f"07/{split}", id07)
        _write(main / f"{split}.txt", "\n".join(ids) + "\n")
        for cls in VOC_CLASSES:
            _write(main / f"{cls}_{split}.txt", _class_file_lines(ids, objects07, cls))
    objects12 = {id12[i]: objects07[id07[i]] for i in range(n)}
    for split in ("train", "val", "trainval"):
        ids = ids_of(f"12/{split}", id12)
        _write(v12 / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(ids) + "\n")
        ids = ids_of(f"07/{split}", id12)  # detection: VOC2007's trainval scenes, no test one
        _write(v12 / "ImageSets" / "Main" / f"{split}.txt", "\n".join(ids) + "\n")
        for cls in VOC_CLASSES:
            _write(v12 / "ImageSets" / "Main" / f"{cls}_{split}.txt",
                   _class_file_lines(ids, objects12, cls))  # fmt: skip
    for name, ids in aug_lists(splits, id12).items():
        _write(v12 / "ImageSets" / "Segmentation" / f"{name}.txt", "\n".join(ids) + "\n")
    for split in ("train", "val"):
        _write(sbd / f"{split}.txt", "\n".join(ids_of(f"sbd/{split}", id12)) + "\n")

    for i in tqdm(range(params["unlabelled"]), desc="unlabelled pool", unit="img",
                  disable=None, leave=False):  # fmt: skip
        rng = np.random.default_rng([seed, _STREAM_UNLABELLED, i])
        scene = render_scene(rng, *_image_size(rng, lo, hi), noise=noise)
        _write(root / "unlabelled" / f"{i + 1:06d}.jpg", _jpeg(scene.image))

    counts = {k: int(len(v)) for k, v in splits.items()}
    meta = {**params, "classes": list(VOC_CLASSES), "split_sizes": counts}
    _write(root / MARKER, json.dumps(meta, indent=2, sort_keys=True) + "\n")
