"""Region masks of Section 3.3: which pixels a context encoder must fill in.

Every mask is a boolean array of shape (H, W) with True where a pixel is dropped. Each
strategy is a plain function `fn(size, rng, **state) -> np.ndarray` listed in `MASKS`
under its `--mask` name; `make_mask_fn` binds the state a strategy needs (segmentation
shapes, a noise pattern) so that the result only takes a `numpy.random.Generator`. All the
randomness comes from that generator, so the same seed gives the same masks anywhere
(in the main process or in any DataLoader worker).

- `central`: the central square (half the side, 1/4 of the area).
- `random-block`: several smaller, possibly overlapping squares covering up to 1/4.
- `random-region`: PASCAL VOC 2012 segmentation shapes, randomly deformed (scale, aspect,
  rotation, flip) and pasted at random places, covering up to 1/4 (the paper's choice for
  all feature-learning results).
- `noise-region`: the released code's variant: a large pattern of bicubically upsampled
  uniform noise thresholded at a density of 0.25, from which windows with 20-30% dropped
  pixels are cut. Used when no segmentation shapes are available. Like the released code,
  the stages draw ONE such window per batch and give it to every image of the batch
  (`PER_BATCH`; `pretrain.data.SeededImages.mask_rng`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from benchmark.errors import DatasetError

Size = tuple[int, int]
MaskFn = Callable[[np.random.Generator], np.ndarray]

MAX_COVERAGE = 0.25  # "covering up to 1/4 of the image" (random block and random region)
NOISE_RES = 0.06  # released code: noise cells of 1/0.06 ~ 17 px before thresholding
NOISE_DENSITY = 0.25  # released code: keep upsampled noise < 0.25
NOISE_WINDOW = (0.2, 0.3)  # released code: accept windows with 20-30% of pixels dropped
# Masks drawn once per batch and repeated over it: pathak22/context-encoder@68abd11
# train_random.lua L316-330 cuts one noise window per batch (`torch.repeatTensor(mask_global,
# mask, opt.batchSize, 1, 1)`, L330). The paper's own masks (Section 3.3) are per image.
PER_BATCH = frozenset({"noise-region"})


def central_mask(size: Size, rng: np.random.Generator | None = None, fraction: float = 0.5):
    """The central square whose side is `fraction` of the image side: (H, W) bool."""
    h, w = size
    mh, mw = round(h * fraction), round(w * fraction)
    top, left = (h - mh) // 2, (w - mw) // 2
    mask = np.zeros((h, w), dtype=bool)
    mask[top : top + mh, left : left + mw] = True
    return mask


def random_block_mask(
    size: Size,
    rng: np.random.Generator,
    max_coverage: float = MAX_COVERAGE,
    side_range: tuple[float, float] = (0.1, 0.25),
    max_blocks: int = 32,
) -> np.ndarray:
    """Possibly overlapping squares (side a random fraction of the image side) until a
    random target coverage in [max_coverage/2, max_coverage] is reached: (H, W) bool.

    A block that would push the coverage above `max_coverage` is skipped, so the bound holds.
    """
    h, w = size
    limit = max_coverage * h * w
    target = rng.uniform(0.5, 1.0) * limit
    mask = np.zeros((h, w), dtype=bool)
    covered = 0
    for _ in range(max_blocks):
        side = max(1, round(rng.uniform(*side_range) * min(h, w)))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        block = mask[top : top + side, left : left + side]
        new = covered + side * side - int(block.sum())
        if new > limit:
            continue
        block[...] = True
        covered = new
        if covered >= target:
            break
    return mask


def deform_shape(shape: np.ndarray, area: float, rng: np.random.Generator) -> np.ndarray:
    """Random flip, aspect change, rotation and a scale giving about `area` pixels.

    shape: (h, w) bool, cropped to its bounding box. Returns a new bool array cropped to the
    deformed shape's bounding box.
    """
    if rng.random() < 0.5:
        shape = shape[:, ::-1]
    aspect = math.exp(rng.uniform(-0.3, 0.3))
    scale = math.sqrt(area / max(1, int(shape.sum())))
    sx, sy = scale * math.sqrt(aspect), scale / math.sqrt(aspect)
    angle = rng.uniform(0.0, 360.0)
    h, w = shape.shape
    centre = (w / 2.0, h / 2.0)
    rot = cv2.getRotationMatrix2D(centre, angle, 1.0)
    affine = rot @ np.array([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], dtype=np.float64)
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], dtype=np.float64)
    moved = corners @ affine.T
    lo = moved.min(axis=0)
    out_w = max(1, math.ceil(moved[:, 0].max() - lo[0]))
    out_h = max(1, math.ceil(moved[:, 1].max() - lo[1]))
    affine[:, 2] -= lo
    warped = cv2.warpAffine(
        np.ascontiguousarray(shape, dtype=np.uint8),
        affine,
        (out_w, out_h),
        flags=cv2.INTER_NEAREST,
        borderValue=0,
    )
    ys, xs = np.nonzero(warped)
    if len(ys) == 0:
        return np.ones((1, 1), dtype=bool)
    return warped[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(bool)


def random_region_mask(
    size: Size,
    rng: np.random.Generator,
    shapes: Sequence[np.ndarray],
    max_coverage: float = MAX_COVERAGE,
    max_tries: int = 20,
) -> np.ndarray:
    """Segmentation shapes, deformed and pasted at random places, covering up to
    `max_coverage` of the image (target drawn in [max_coverage/2, max_coverage]): (H, W) bool.
    """
    if not shapes:
        raise ValueError("random_region_mask needs at least one shape")
    h, w = size
    limit = max_coverage * h * w
    target = rng.uniform(0.5, 1.0) * limit
    mask = np.zeros((h, w), dtype=bool)
    covered = 0
    for _ in range(max_tries):
        remaining = target - covered
        if remaining < 0.1 * target:
            break
        shape = shapes[int(rng.integers(len(shapes)))]
        piece = deform_shape(shape, remaining * rng.uniform(0.5, 1.0), rng)
        ph, pw = min(piece.shape[0], h), min(piece.shape[1], w)
        # A piece larger than the image is cut at a random offset rather than rejected.
        oy = int(rng.integers(0, piece.shape[0] - ph + 1))
        ox = int(rng.integers(0, piece.shape[1] - pw + 1))
        piece = piece[oy : oy + ph, ox : ox + pw]
        top, left = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        window = mask[top : top + ph, left : left + pw]
        new = covered + int((piece & ~window).sum())
        if new > limit:
            continue
        window |= piece
        covered = new
    return mask


def noise_pattern(
    rng: np.random.Generator,
    size: int = 1024,
    res: float = NOISE_RES,
    density: float = NOISE_DENSITY,
) -> np.ndarray:
    """The released code's mask source: uniform noise of side res*size, bicubically
    upsampled to (size, size), thresholded below `density`: (size, size) bool.

    The released code uses 600 px of noise up to 10000 px; the blob scale only depends on
    `res`, so a smaller pattern gives the same kind of regions at a fraction of the memory.
    """
    cells = max(2, round(res * size))
    noise = rng.random((cells, cells), dtype=np.float32)
    up = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    return up < density


def noise_region_mask(
    size: Size,
    rng: np.random.Generator,
    pattern: np.ndarray,
    window: tuple[float, float] = NOISE_WINDOW,
    max_tries: int = 100,
) -> np.ndarray:
    """A random window of `pattern` whose dropped fraction lies strictly inside `window`
    (train_random.lua L323-324: `area>20 and area<30`, in percent), or the best of
    `max_tries` windows when none does (the released code tries until one does): (H, W)
    bool."""
    h, w = size
    ph, pw = pattern.shape
    if ph < h or pw < w:
        raise ValueError(f"noise pattern {pattern.shape} is smaller than the image {size}")
    lo, hi = window
    best, best_gap = None, math.inf
    for _ in range(max_tries):
        top, left = int(rng.integers(0, ph - h + 1)), int(rng.integers(0, pw - w + 1))
        cut = pattern[top : top + h, left : left + w]
        frac = float(cut.mean())
        if lo < frac < hi:
            return cut.copy()
        gap = lo - frac if frac < lo else frac - hi
        if gap < best_gap:
            best, best_gap = cut, gap
    return best.copy()


MASKS: dict[str, Callable[..., np.ndarray]] = {
    "central": central_mask,
    "random-block": random_block_mask,
    "random-region": random_region_mask,
    "noise-region": noise_region_mask,
}


def _shapes_from_label_png(path: Path, min_area: int) -> list[np.ndarray]:
    try:
        with Image.open(path) as im:
            labels = np.asarray(im)  # palette PNG: indices, 0 background, 255 boundary
    except OSError as exc:
        raise DatasetError(f"{path}: unreadable segmentation PNG ({exc})") from None
    if labels.ndim != 2:
        raise DatasetError(f"{path}: expected a palette (indexed) segmentation PNG")
    out = []
    for value in np.unique(labels):
        if value in (0, 255):
            continue
        shape = labels == value
        if int(shape.sum()) < min_area:
            continue
        ys, xs = np.nonzero(shape)
        out.append(shape[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].copy())
    return out


def load_voc_shapes(
    voc2012: Path, max_files: int = 1000, min_area: int = 64, seed: int = 0
) -> list[np.ndarray]:
    """Object shapes (bool arrays cropped to their bounding boxes) from a VOC2012 folder.

    `voc2012` may also be a VOCdevkit root. Reads SegmentationObject (one shape per
    instance) or, if absent, SegmentationClass (one per class present). At most
    `max_files` files, picked with `seed`, keep start-up short.
    """
    voc2012 = Path(voc2012)
    # The VOC2012 folder itself, or a VOCdevkit root / its parent.
    roots = [voc2012, voc2012 / "VOC2012", voc2012 / "VOCdevkit" / "VOC2012"]
    folders = [r / sub for sub in ("SegmentationObject", "SegmentationClass") for r in roots]
    for folder in folders:
        files = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if files:
            break
    else:
        raise DatasetError(
            f"{voc2012}: no SegmentationObject/*.png or SegmentationClass/*.png for "
            "random-region masks"
        )
    if len(files) > max_files:
        pick = np.random.default_rng(seed).choice(len(files), max_files, replace=False)
        files = [files[i] for i in sorted(pick)]
    shapes = [s for f in files for s in _shapes_from_label_png(f, min_area)]
    if not shapes:
        raise DatasetError(f"{folder}: no object shapes of at least {min_area} pixels")
    return shapes


def make_mask_fn(
    name: str,
    size: Size,
    *,
    shapes: Sequence[np.ndarray] | None = None,
    seed: int = 0,
) -> MaskFn:
    """Bind strategy `name` to an image size (and its shapes / noise pattern): rng -> mask.

    random-region without shapes raises; the caller decides whether to fall back to
    noise-region (see `pretrain.train`). The result is picklable for DataLoader workers.
    """
    if name not in MASKS:
        raise ValueError(f"unknown mask {name!r}; choose from {', '.join(MASKS)}")
    if name == "random-region":
        if not shapes:
            raise ValueError("random-region masks need segmentation shapes")
        return functools.partial(_call, random_region_mask, size, shapes=list(shapes))
    if name == "noise-region":
        side = max(1024, 4 * max(size))
        pattern = noise_pattern(np.random.default_rng(seed), size=side)
        return functools.partial(_call, noise_region_mask, size, pattern=pattern)
    return functools.partial(_call, MASKS[name], size)


def _call(fn: Callable[..., np.ndarray], size: Size, rng: np.random.Generator, **kw):
    return fn(size, rng, **kw)


def apply_mask(
    images: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Set dropped pixels to `fill` (the dataset mean in the encoder's input convention: (3,)
    or scalar).

    images: (B, 3, H, W); mask: (B, 1, H, W) with 1 = dropped. Returns a new tensor.
    """
    if isinstance(fill, torch.Tensor):
        fill = fill.to(images).view(1, -1, 1, 1)
    return torch.where(mask.bool(), fill, images)
