"""Object proposals: selective search (computed once and cached) or precomputed files.

Boxes everywhere in this package are float32 (P, 4) arrays of 0-based inclusive pixel
coordinates (x1, y1, x2, y2), Fast R-CNN's convention (width = x2 - x1 + 1).

Precomputed files:
- Fast R-CNN's selective-search `.mat` (`boxes`: cell array of (P, 4) 1-based
  (y1, x1, y2, x2) arrays, one per image; `images`: the image ids, in the split's order);
- detectron2 proposal pickles (`ids`, `boxes` in XYXY_ABS, `objectness_logits`,
  `bbox_mode`), where a VOC box (xmin, ymin, xmax, ymax) appears as
  (xmin - 1, ymin - 1, xmax, ymax) (detectron2's VOC loader).
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import pickle
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmark.errors import BenchError, printable
from benchmark.runs import atomic_write_bytes, default_results_root, remove_stale_temporaries_of
from benchmark.safe_pickle import safe_load

CACHE_VERSION = 1
log = logging.getLogger("bench")
XYXY_ABS = 0  # detectron2.structures.BoxMode.XYXY_ABS


def unique_boxes(boxes: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct box, in original order."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    _, index = np.unique(np.round(boxes).astype(np.int64), axis=0, return_index=True)
    return np.sort(index)


def _seed_c_rand(seed: int) -> None:
    """OpenCV's selective search ranks regions with C's rand(), whose state carries over from
    call to call: without a reseed the same image gets other proposals depending on what the
    process searched before, and cached proposals would differ from fresh ones."""
    try:
        ctypes.CDLL(None).srand(seed)
    except (OSError, AttributeError):  # no C runtime to reach (e.g. some Windows builds)
        pass


def selective_search(
    image_rgb: np.ndarray,
    mode: str = "fast",
    max_boxes: int = 2000,
    image_width: int = 500,
    min_box: int = 20,
) -> np.ndarray:
    """Selective search boxes (P, 4) for one (H, W, 3) uint8 image, best-ranked first.

    As in R-CNN's selective_search_boxes.m, the image is resized to `image_width` columns
    (only when wider: a small image is searched as it is), boxes with a side below
    `min_box` pixels of that image are dropped, duplicates removed, and the result is
    mapped back to the original pixels.
    """
    import cv2

    cv2.setNumThreads(1)
    h, w = image_rgb.shape[:2]
    scale = min(1.0, image_width / w) if image_width > 0 else 1.0
    img = np.ascontiguousarray(image_rgb[:, :, ::-1])
    if scale < 1.0:
        img = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(img)
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    _seed_c_rand(0)
    rects = np.asarray(ss.process(), dtype=np.float64).reshape(-1, 4)  # x, y, w, h
    keep = (rects[:, 2] >= min_box) & (rects[:, 3] >= min_box)
    if not keep.any():  # a tiny image: keep what there is rather than nothing
        keep = np.ones(len(rects), dtype=bool)
    rects = rects[keep]
    boxes = np.stack(
        [rects[:, 0], rects[:, 1], rects[:, 0] + rects[:, 2] - 1, rects[:, 1] + rects[:, 3] - 1],
        axis=1,
    )
    boxes = boxes / scale
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w - 1)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h - 1)
    boxes = boxes[unique_boxes(boxes)][:max_boxes]
    return boxes.astype(np.float32)


def _search_file(args: tuple[str, str, int, int, int]) -> np.ndarray:
    from benchmark.datasets.folder import load_rgb

    path, mode, max_boxes, width, min_box = args
    return selective_search(np.asarray(load_rgb(Path(path))), mode, max_boxes, width, min_box)


def cache_key(image_paths: Sequence[Path], params: dict[str, Any]) -> str:
    """Hash of the image files (path, size, mtime) and the search settings."""
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **params}, sort_keys=True).encode())
    for p in image_paths:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def save_npz(path: Path, ids: Sequence[str], boxes: Sequence[np.ndarray]) -> None:
    """Proposals of a split as one .npz (ids, concatenated boxes, per-image offsets), atomically."""
    counts = np.array([len(b) for b in boxes], dtype=np.int64)
    flat = np.concatenate(
        [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes] or [np.zeros((0, 4), np.float32)]
    )
    buf = io.BytesIO()
    np.savez(
        buf, ids=np.array(list(ids)), boxes=flat, offsets=np.concatenate([[0], np.cumsum(counts)])
    )
    remove_stale_temporaries_of(path)  # what a killed earlier write of this file left
    atomic_write_bytes(path, buf.getvalue())


def load_npz(path: Path) -> tuple[list[str], list[np.ndarray]]:
    """(ids, per-image boxes) of a `save_npz` file; BenchError naming the file and the field
    when an array is missing, of the wrong kind or shape, or its offsets do not cut `boxes`
    into one run per id (a truncated or foreign file)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, flat, off = z["ids"], z["boxes"], z["offsets"]
    except FileNotFoundError:
        raise BenchError(f"{printable(path)}: proposal file not found") from None
    except KeyError as exc:
        raise BenchError(f"{printable(path)}: {exc.args[0]}: missing from the .npz") from None
    except Exception as exc:  # noqa: BLE001 - zipfile, numpy and OS errors of a bad file
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise BenchError(f"{printable(path)}: unreadable .npz ({reason})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "US":
        raise BenchError(f"{printable(path)}: ids: expected a 1-D array of strings")
    if flat.ndim != 2 or flat.shape[1] != 4 or flat.dtype.kind not in "fiu":
        raise BenchError(f"{printable(path)}: boxes: expected a (N, 4) array of numbers, got "
                         f"{flat.shape} {flat.dtype}")  # fmt: skip
    if (off.ndim != 1 or off.dtype.kind not in "iu" or len(off) != len(ids) + 1
            or (len(off) and (off[0] != 0 or off[-1] != len(flat)))
            or (np.diff(off) < 0).any()):  # fmt: skip
        raise BenchError(f"{printable(path)}: offsets: do not cut boxes into one run per id")
    runs = [flat[off[i] : off[i + 1]] for i in range(len(ids))]
    return _checked(path, [str(i) for i in ids], runs)


def _checked(path: Path, ids: list[str], boxes: list[Any]) -> tuple[list[str], list[np.ndarray]]:
    """The one check of every proposal source: (P, 4) finite boxes per id (float32)."""
    out = []
    for image_id, b in zip(ids, boxes):
        array = np.asarray(b) if isinstance(b, (np.ndarray, list, tuple)) else None
        if array is None or array.dtype.kind not in "fiu" or array.size % 4:
            raise BenchError(f"{printable(path)}: boxes of image {printable(image_id)!r}: "
                             "expected a (P, 4) array of numbers")  # fmt: skip
        array = array.astype(np.float32).reshape(-1, 4)
        if not np.isfinite(array).all():
            raise BenchError(f"{printable(path)}: boxes of image {printable(image_id)!r}: NaN "
                             "or infinite coordinates")  # fmt: skip
        out.append(array)
    return ids, out


def selective_search_cached(
    ids: Sequence[str],
    image_paths: Sequence[Path],
    cache_dir: Path,
    *,
    mode: str = "fast",
    max_boxes: int = 2000,
    image_width: int = 500,
    min_box: int = 20,
    workers: int = 1,
    desc: str = "selective search",
) -> list[np.ndarray]:
    """Selective search for every image, computed once per dataset split and then reused."""
    params = {"mode": mode, "max_boxes": max_boxes, "width": image_width, "min_box": min_box}
    path = Path(cache_dir) / f"{cache_key(image_paths, params)}.npz"
    if path.is_file():
        try:
            cached_ids, boxes = load_npz(path)
        except BenchError as exc:  # a cache is only a copy: compute it again
            log.warning(f"{exc}; searching again")
        else:
            if cached_ids == list(ids):
                return boxes
    jobs = [(str(p), mode, max_boxes, image_width, min_box) for p in image_paths]
    bar = dict(total=len(jobs), desc=desc, unit="img", disable=None)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            boxes = list(tqdm(pool.map(_search_file, jobs, chunksize=4), **bar))
    else:
        boxes = [_search_file(j) for j in tqdm(jobs, **bar)]
    save_npz(path, ids, boxes)
    return boxes


# ------------------------------------------------------------------ precomputed proposal files


def _mismatch(path: Path, expected: Sequence[str], found: Sequence[str]) -> BenchError:
    for i, want in enumerate(expected):
        got = found[i] if i < len(found) else None
        if got != want:
            what = f"has {got!r}" if got is not None else "has no entry"
            return BenchError(
                f"{path}: proposals do not match the image list (position {i}: expected image "
                f"{want!r}, file {what}; {len(found)} entries for {len(expected)} images)"
            )
    return BenchError(
        f"{path}: proposals do not match the image list ({len(found)} entries for "
        f"{len(expected)} images; first extra id {found[len(expected)]!r})"
    )


def load_mat(path: Path, ids: Sequence[str]) -> list[np.ndarray]:
    """Fast R-CNN selective-search .mat: 1-based (y1, x1, y2, x2) -> 0-based (x1, y1, x2, y2)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for a bad file
        raise BenchError(f"{path}: unreadable .mat proposal file ({exc})") from None
    if "boxes" not in mat:
        raise BenchError(f"{path}: no 'boxes' variable (not a selective-search .mat file)")
    raw = np.asarray(mat["boxes"]).ravel()
    if "images" in mat:
        names = np.asarray(mat["images"]).ravel()
        if not all(np.asarray(x).size for x in names):
            raise BenchError(f"{printable(path)}: images: an entry is empty")
        found = [str(np.asarray(x).ravel()[0]) for x in names]
    else:  # without names only the count can be checked
        found = list(ids[: len(raw)]) + [f"<entry {i}>" for i in range(len(ids), len(raw))]
    if found != list(ids) or len(raw) != len(ids):
        raise _mismatch(path, ids, found)
    _, boxes = _checked(path, list(ids), [np.asarray(b) for b in raw])
    return [b[:, [1, 0, 3, 2]] - 1 for b in boxes]


def load_pickle(path: Path, ids: Sequence[str]) -> list[np.ndarray]:
    """detectron2 proposal pickle (any order of ids; every image must be present), read by a
    restricted unpickler that allows only containers and numpy arrays."""
    data = safe_load(path)  # only containers and numpy arrays: a pickle never runs code
    if not isinstance(data, dict) or "ids" not in data or "boxes" not in data:
        raise BenchError(f"{path}: expected a dict with 'ids' and 'boxes' (detectron2 proposals)")
    mode = data.get("bbox_mode", XYXY_ABS)
    if isinstance(mode, bool) or not isinstance(mode, (int, np.integer)) or mode != XYXY_ABS:
        raise BenchError(f"{printable(path)}: bbox_mode: {printable(repr(mode))[:40]} is not "
                         "supported (expected XYXY_ABS = 0)")  # fmt: skip
    found_ids, found_boxes = data["ids"], data["boxes"]
    if isinstance(found_ids, np.ndarray) and found_ids.ndim == 1:
        found_ids = found_ids.tolist()
    if not isinstance(found_ids, (list, tuple)) or not all(
        isinstance(i, (str, int, np.integer)) and not isinstance(i, bool) for i in found_ids
    ):
        raise BenchError(f"{printable(path)}: ids: expected a list of image ids")
    if not isinstance(found_boxes, (list, tuple)) or len(found_boxes) != len(found_ids):
        raise BenchError(f"{printable(path)}: boxes: expected a list of one (P, 4) array per "
                         f"id ({len(found_ids)} ids)")  # fmt: skip
    found_ids, found_boxes = _checked(path, [str(i) for i in found_ids], list(found_boxes))
    by_id = dict(zip(found_ids, found_boxes))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise BenchError(
            f"{path}: proposals do not match the image list (first missing image id "
            f"{missing[0]!r}; {len(missing)} of {len(ids)} images missing)"
        )
    out = []
    for i in ids:
        b = by_id[i].copy()
        b[:, 2:] -= 1  # continuous (x2, y2) -> inclusive pixel index
        out.append(b)
    return out


def write_detectron2_pickle(
    path: Path,
    ids: Sequence[str],
    boxes: Sequence[np.ndarray],
    scores: Sequence[np.ndarray] | None = None,
) -> None:
    """Proposals in detectron2's format. Selective search has no objectness, so the logits
    decrease with rank (detectron2 keeps the top-k by logit)."""
    logits = scores or [-np.arange(len(b), dtype=np.float32) for b in boxes]
    conv = []
    for b in boxes:
        b = np.asarray(b, np.float32).copy()
        b[:, 2:] += 1
        conv.append(b)
    blob = pickle.dumps(
        {"ids": list(ids), "boxes": conv, "objectness_logits": list(logits), "bbox_mode": XYXY_ABS}
    )
    atomic_write_bytes(Path(path), blob)


def load_proposal_file(path: str | Path, ids: Sequence[str]) -> list[np.ndarray]:
    """Proposals for `ids` from a .mat, .pkl or our own .npz file."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{path}: proposal file not found")
    suffix = path.suffix.lower()
    if suffix == ".mat":
        return load_mat(path, ids)
    if suffix in (".pkl", ".pickle"):
        return load_pickle(path, ids)
    if suffix == ".npz":
        found, boxes = load_npz(path)
        if found != list(ids):
            raise _mismatch(path, ids, found)
        return boxes
    raise BenchError(f"{path}: unknown proposal file type (expected .mat, .pkl or .npz)")


def proposal_cache_dir() -> Path:
    """Where selective-search proposals are cached: <results>/cache/proposals."""
    return default_results_root() / "cache" / "proposals"


def attach_proposals(records: Sequence[Any], source: str | None, cfg: Any, split: str) -> None:
    """Fill `records[i].proposals` from `source` (a file) or cached selective search, clipped
    to the image and without empty boxes."""
    ids = [r.image_id for r in records]
    if source:
        boxes = load_proposal_file(source, ids)
    else:
        boxes = selective_search_cached(
            ids,
            [r.path for r in records],
            proposal_cache_dir(),
            mode=cfg.ss_mode,
            max_boxes=cfg.ss_max_boxes,
            image_width=cfg.ss_image_width,
            min_box=cfg.ss_min_box,
            workers=cfg.ss_workers,
            desc=f"selective search ({split})",
        )
    for rec, b in zip(records, boxes):
        b = np.asarray(b, np.float32).reshape(-1, 4)
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, rec.width - 1)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, rec.height - 1)
        rec.proposals = b[(b[:, 2] >= b[:, 0]) & (b[:, 3] >= b[:, 1])]
