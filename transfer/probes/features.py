"""Frozen features of the AlexNet encoder, pooled per layer as Goyal et al. pool them, cached.

Layers (`tap_indices`): conv1..conv5 are read after their ReLU and pool5 after the last
pooling, as the reference reads its Caffe2 blobs (`conv1` etc. are ReLU'd in place there).
Each conv map is average-pooled to about 9k values with the reference's fixed windows
(fair_self_supervision_benchmark, modeling/supervised/caffenet_bvlc_supervised_finetune_linear.py,
the `*_resize` AveragePool blobs that configs/.../voc07/caffenet_bvlc_*_extract_features.yaml
extract), which at a 227 input give

    conv1 96x55x55 -> avg 19/4 -> 96x10x10 = 9600     conv4 384x13x13 -> avg 9/1 -> 9600
    conv2 256x27x27 -> avg 12/3 -> 256x6x6 = 9216     conv5 256x13x13 -> avg 8/1 -> 9216
    conv3 384x13x13 -> avg 9/1 -> 384x5x5 = 9600      pool5 256x6x6 (as is)       = 9216

Where a map has another side (another input size or arch) it is adaptively average-pooled
to the grid g = round(sqrt(9216 / C)), which gives the same grids (10, 6, 5, 5, 6) for
CaffeNet's widths. The flattening order is (C, h, w), as the reference's reshape(N, -1).

Images (tools/extract_features.py with `DATA_TRANSFORMS: [scale, global_resize]`,
data/data_input.py `transform_image`, the same for the train and test split): shorter side
resized to 256 (longer side floored), then the whole image resized to 227x227 (aspect ratio
not kept, no crop; the test split's 227 centre crop of a 227 image is a no-op), both with
cv2.resize's bilinear interpolation on float pixels. Then the encoder's input convention
(`benchmark.input_convention`): for CaffeNet Caffe's, BGR 0-255 minus (104, 117, 123), as the
reference feeds its Caffe models (it subtracts (103.53, 116.28, 123.675), data_input.py
L34, L205-206; docs/reference-values.md section 8), torchvision's for its AlexNet.

Encoders of the contract (`encoders/`: ResNet-50, ViT) name and pool their own layers
(`encoder.taps`, read in one pass by `encoder.extract`): Goyal et al.'s ResNet-50 windows at
224 (conv1, res2-res5 to about 9k values; res5avg, the 2048-d average), DINO's ViT features
(cls, cls4, cls+avg). The images are prepared as above, at the encoder's `input_size`
(Goyal et al.'s ResNet-50 configs resize globally to 224), in its `input_convention`.

Cache: `<results root>/cache/features/<key>.npz`, written atomically, where the key hashes
the encoder (its architecture as printed and every tensor's bytes, so any change of the
weights or of the network invalidates it), the layers and their pooling, the image list
(ids, absolute paths, sizes and modification times), the preprocessing (input size, resize,
input convention) and the precision the encoder ran in.

Precision: the forward pass runs in channels_last under autocast at the resolved precision
(`benchmark.loop.resolve_precision`: `auto` is bf16 on a GPU or a CPU with native bf16
matmuls, fp32 elsewhere); the features are stored in float32 either way. The reference
extracted in fp32 (Caffe2); bf16 features differ from fp32 ones by bf16's rounding (about
0.4% of a value), so the precision is part of the cache key and of the run's settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from benchmark.datasets.folder import load_rgb
from benchmark.datasets.preflight import checked_voc_ids
from benchmark.datasets.voc import VOC_CLASSES, classification_targets, parse_voc_xml
from benchmark.errors import BenchError, ConfigError, DatasetError
from benchmark.input_convention import InputConvention
from benchmark.loop import Precision, nhwc
from benchmark.runs import atomic_write_bytes, default_results_root, remove_stale_temporaries_of
from encoders.alexnet import CONV_INDICES, POOL_INDICES

from .config import ALL_LAYERS, LAYERS

log = logging.getLogger("bench")

CACHE_VERSION = 3  # bump when the extraction or the file layout changes meaning
TARGET_DIM = 9216  # "about 9k": 256 x 6 x 6, pool5's size
# layer: (map side at a 227 input for CaffeNet, avg-pool kernel, stride); None = no pooling.
REFERENCE_POOLING: dict[str, tuple[int, int | None, int | None]] = {
    "conv1": (55, 19, 4),  # conv1_s4k19_resize
    "conv2": (27, 12, 3),  # conv2_s3k12_resize
    "conv3": (13, 9, 1),  # conv3_s1k9_resize
    "conv4": (13, 9, 1),  # conv4_s1k9_resize
    "conv5": (13, 8, 1),  # conv5_s1k8_resize
    "pool5": (6, None, None),  # pool5, 9216 as it is
}


# --------------------------------------------------------------------------- images and labels


@dataclass
class SplitImages:
    """One split in the reference's order (sorted image ids, create_voc_data_files.py).

    labels: float32 (N, C) in {0, 1} (a non-difficult object of the class is present);
    difficult: bool (N, C), the class is present only through difficult objects (the
    devkit's "0" in <class>_<split>.txt, the reference's target -1).
    """

    split: str
    ids: list[str]
    paths: list[Path]
    labels: np.ndarray
    difficult: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray) -> SplitImages:
        index = np.asarray(index, dtype=np.int64)
        return SplitImages(
            self.split,
            [self.ids[i] for i in index],
            [self.paths[i] for i in index],
            self.labels[index],
            self.difficult[index],
        )

    def targets(self) -> np.ndarray:
        """int8 (N, C) in the reference's coding: 1 present, 0 absent, -1 difficult only."""
        t = self.labels.astype(np.int8)
        t[self.difficult] = -1
        return t


def load_split(
    voc_root: Path, split: str, on_bad_data: str = "error", logger: logging.Logger = log
) -> SplitImages:
    """Labels of ImageSets/Main/<split>.txt from the annotations. Every id, annotation and
    image is checked first as `bench data check` checks them (`checked_voc_ids`): a
    problem is an error, or (on_bad_data="skip") its image is left out with a warning."""
    voc_root = Path(voc_root)
    ids, _ = checked_voc_ids(voc_root, split, on_bad_data, logger)
    annotations = sorted(
        (parse_voc_xml(voc_root / "Annotations" / f"{i}.xml") for i in ids),
        key=lambda a: a.image_id,
    )
    labels, difficult = classification_targets(annotations, VOC_CLASSES)
    paths = [voc_root / "JPEGImages" / a.filename for a in annotations]
    images = SplitImages(split, [a.image_id for a in annotations], paths, labels, difficult)
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        first = paths[missing[0]]
        what = f"image file not found ({len(missing)} of split '{split}' missing)"
        if on_bad_data == "error":
            raise DatasetError(f"{first}: {what}")
        logger.warning(f"{first}: {what}; skipping them (on_bad_data=skip)")
        images = images.subset(np.setdiff1d(np.arange(len(paths)), missing))
    if not len(images):
        raise DatasetError(f"{voc_root}: split '{split}' has no usable image")
    return images


def scale_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """data_transformation.scale: shorter side to `size`, the other floored to keep the
    aspect ratio; unchanged when the shorter side already is `size`."""
    h, w = image.shape[:2]
    if (w <= h and w == size) or (h <= w and h == size):
        return image
    new_w, new_h = size, size
    if w < h:
        new_h = int(math.floor(float(h) / w * size))
    else:
        new_w = int(math.floor(float(w) / h * size))
    return cv2.resize(image, (new_w, new_h))


def preprocess(
    path: Path, input_size: int, resize_shorter: int | None, convention: InputConvention
) -> torch.Tensor:
    """(3, S, S) float32 encoder input of one image file (see the module docstring)."""
    image = np.asarray(load_rgb(path), dtype=np.float32)
    if resize_shorter:
        image = scale_shorter(image, resize_shorter)
    image = cv2.resize(image, (input_size, input_size))  # global_resize, INTER_LINEAR
    return convention.normalise_hwc(image).contiguous()


class _Images(Dataset):
    """Item i -> (input (3, S, S), i, error message or "")."""

    def __init__(
        self,
        paths: Sequence[Path],
        input_size: int,
        resize_shorter: int | None,
        convention: InputConvention,
    ) -> None:
        self.paths, self.input_size, self.resize_shorter = list(paths), input_size, resize_shorter
        self.convention = convention

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            x = preprocess(self.paths[i], self.input_size, self.resize_shorter, self.convention)
        except (DatasetError, cv2.error, ValueError) as exc:
            blank = torch.zeros(3, self.input_size, self.input_size)
            return blank, i, str(exc) or f"{self.paths[i]}: unreadable image"
        return x, i, ""


def _worker_init(_: int) -> None:
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- layer taps


def tap_indices() -> dict[str, int]:
    """Index in `AlexNetEncoder.features` after which each probe layer is read.

    The one place that knows the layer layout: convK is read at CONV_INDICES[K-1] + 1 (its
    ReLU), pool5 at the last pooling index. Adapt here if `features` changes.
    """
    taps = {f"conv{k + 1}": i + 1 for k, i in enumerate(CONV_INDICES)}
    taps["pool5"] = POOL_INDICES[-1]
    return taps


def check_layers(
    layers: Sequence[str], key: str = "layers", known: Sequence[str] = LAYERS
) -> tuple[str, ...]:
    """`layers` in `known`'s order (AlexNet's by default; `ALL_LAYERS` before the encoder
    is known); an unknown, missing or repeated name is a one-line error naming `key`."""
    unknown = [name for name in layers if name not in known]
    if unknown or not layers:
        raise ConfigError(
            f"{key}: unknown layer {unknown[0]!r} (choose from {', '.join(known)})"
            if unknown else f"{key}: name at least one layer"
        )  # fmt: skip
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{key}: a layer is listed twice ({', '.join(layers)})")
    return tuple(sorted(layers, key=list(known).index))


def is_contract(encoder: nn.Module) -> bool:
    """Whether `encoder` names its own taps (the encoder contract) rather than being an
    AlexNet whose `features` the probes tap here."""
    return hasattr(encoder, "taps") and hasattr(encoder, "extract")


def encoder_layers(encoder: nn.Module) -> tuple[str, ...]:
    """Every layer a probe can read in `encoder`, in network order."""
    return tuple(encoder.taps) if is_contract(encoder) else LAYERS  # type: ignore[arg-type]


def default_input_size(encoder: nn.Module) -> int:
    """The input side the encoder's reference protocol feeds it: AlexNet 227 (Goyal et
    al.'s CaffeNet configs), a contract encoder its own `input_size` (224)."""
    return int(getattr(encoder, "input_size", 227)) if is_contract(encoder) else 227


def check_known_layers(layers: Sequence[str], key: str = "layers") -> tuple[str, ...]:
    """Before the encoder is loaded: every name must be some family's layer."""
    return check_layers(layers, key, ALL_LAYERS)


def _check_taps(features: nn.Sequential) -> None:
    taps = tap_indices()
    for k, index in enumerate(CONV_INDICES):
        conv, relu = features[index], features[taps[f"conv{k + 1}"]]
        if not isinstance(conv, nn.Conv2d) or not isinstance(relu, nn.ReLU):
            raise RuntimeError(
                f"encoder.features[{index}] / [{index + 1}] are {type(conv).__name__} / "
                f"{type(relu).__name__}, expected Conv2d / ReLU: update tap_indices()"
            )
    if taps["pool5"] != len(features) - 1:
        raise RuntimeError("pool5 is not the last module of encoder.features: update tap_indices()")


@dataclass(frozen=True)
class PoolSpec:
    """How one layer's (C, size, size) map becomes a vector of `dim` values."""

    layer: str
    channels: int
    size: int  # side of the map
    kind: str  # "none", "avg" (reference kernel/stride) or "adaptive" (to `grid`)
    grid: int  # side after pooling
    kernel: int | None = None
    stride: int | None = None

    @property
    def dim(self) -> int:
        return self.channels * self.grid * self.grid

    def describe(self) -> str:
        head = f"{self.channels}x{self.size}x{self.size}"
        if self.kind == "avg":
            how = f"avg k{self.kernel} s{self.stride}"
        elif self.kind == "adaptive":
            how = f"adaptive avg to {self.grid}x{self.grid}"
        else:
            how = "as is"
        return f"{head} -> {how} -> {self.dim}"

    def module(self) -> nn.Module:
        if self.kind == "avg":
            return nn.AvgPool2d(self.kernel, self.stride, padding=0)  # type: ignore[arg-type]
        if self.kind == "adaptive":
            return nn.AdaptiveAvgPool2d(self.grid)
        return nn.Identity()

    def as_dict(self) -> dict[str, Any]:
        return {"shape": [self.channels, self.size, self.size], "pooling": self.describe(),
                "dim": self.dim}  # fmt: skip


def pool_spec(layer: str, channels: int, size: int) -> PoolSpec:
    """The reference's pooling where the map has the reference's side, else an adaptive
    average pooling to the grid that brings C * g * g closest to 9216."""
    ref_size, kernel, stride = REFERENCE_POOLING[layer]
    if size == ref_size:
        if kernel is None:
            return PoolSpec(layer, channels, size, "none", size)
        assert stride is not None
        return PoolSpec(layer, channels, size, "avg", (size - kernel) // stride + 1, kernel, stride)
    grid = max(1, min(size, round(math.sqrt(TARGET_DIM / channels))))
    return PoolSpec(layer, channels, size, "none" if grid == size else "adaptive", grid)


@dataclass(frozen=True)
class TapSpec:
    """A contract encoder's layer as the probes record it (PoolSpec's interface): the
    encoder's `Tap` says what it reads, how it pools and the vector's size."""

    layer: str
    shape: tuple[int, ...]
    pooling: str
    dim: int
    reads: str
    source: str

    def describe(self) -> str:
        return f"{'x'.join(map(str, self.shape))} -> {self.pooling} -> {self.dim}"

    def as_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "pooling": self.describe(), "dim": self.dim,
                "reads": self.reads, "source": self.source}  # fmt: skip


def tap_specs(encoder: nn.Module, layers: Sequence[str]) -> dict[str, TapSpec]:
    taps = encoder.taps  # type: ignore[attr-defined]
    return {n: TapSpec(n, tuple(taps[n].shape), taps[n].pooling, taps[n].dim, taps[n].reads,
                       taps[n].source) for n in layers}  # fmt: skip


class EncoderTaps(nn.Module):
    """A contract encoder's `extract` of the requested layers, as LayerTaps' forward."""

    def __init__(self, encoder: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.layers = list(layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encoder.extract(x, self.layers)  # type: ignore[operator]


class LayerTaps(nn.Module):
    """encoder.features run once, each requested layer pooled and flattened on the way."""

    def __init__(self, features: nn.Sequential, specs: dict[str, PoolSpec]) -> None:
        super().__init__()
        _check_taps(features)
        taps = tap_indices()
        self.features = features
        self.pools = nn.ModuleDict({name: spec.module() for name, spec in specs.items()})
        self.at: dict[int, list[str]] = {}
        for name in specs:
            self.at.setdefault(taps[name], []).append(name)
        self.last = max(self.at)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i in range(self.last + 1):
            x = self.features[i](x)
            for name in self.at.get(i, ()):  # pooled now, before any in-place layer runs
                out[name] = self.pools[name](x).flatten(1)
        return out


def _pair(v: int | tuple[int, ...]) -> int:
    return int(v[0]) if isinstance(v, tuple) else int(v)


def _output_side(module: nn.Module, size: int) -> int:
    """Side of `module`'s output for a square input of side `size`, as torch computes it."""
    inner = getattr(module, "pool", None)  # a pooling + LRN block: its pooling decides
    if isinstance(inner, nn.Module):
        return _output_side(inner, size)
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        k, st, p = _pair(module.kernel_size), _pair(module.stride), _pair(module.padding)
        d = _pair(getattr(module, "dilation", 1))
        ceil = bool(getattr(module, "ceil_mode", False))
        out = (size + 2 * p - d * (k - 1) - 1 + (st - 1 if ceil else 0)) // st + 1
        if ceil and (out - 1) * st >= size + p:
            out -= 1
        return out
    if any(hasattr(module, a) for a in ("kernel_size", "stride", "output_size")):
        raise RuntimeError(f"cannot size {type(module).__name__} in encoder.features")
    return size  # point-wise: ReLU, LRN


def layer_specs(encoder: nn.Module, layers: Sequence[str], input_size: int) -> dict[str, PoolSpec]:
    """Pooling of every layer from the map sizes at `input_size`, computed from the layers'
    geometry (no forward pass)."""
    features: nn.Sequential = encoder.features  # type: ignore[assignment]
    _check_taps(features)
    taps = tap_indices()
    wanted = {taps[name]: name for name in layers}
    specs: dict[str, PoolSpec] = {}
    size, channels = input_size, 3
    for i in range(max(wanted) + 1):
        module = features[i]
        size = _output_side(module, size)
        conv = getattr(module, "pool", module)
        if isinstance(conv, nn.Conv2d):
            channels = conv.out_channels
        if size < 1:
            raise ConfigError(f"input_size: {input_size} is too small for the encoder")
        if i in wanted:
            specs[wanted[i]] = pool_spec(wanted[i], channels, size)
    return {name: specs[name] for name in layers}


# --------------------------------------------------------------------------- cache


def encoder_fingerprint(encoder: nn.Module) -> str:
    """sha256 of the encoder's printed architecture and of every tensor's name, dtype,
    shape and bytes: equal exactly when the same network holds the same weights."""
    h = hashlib.sha256(repr(encoder).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _image_list_digest(paths: Sequence[Path], ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for image_id, path in zip(ids, paths):
        path = Path(path).resolve()
        try:
            st = path.stat()
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{image_id}|{path}|{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def cache_key(
    encoder_hash: str,
    specs: dict[str, Any],
    images: SplitImages,
    input_size: int,
    resize_shorter: int | None,
    convention: InputConvention,
    precision: str = "fp32",
) -> tuple[str, dict[str, Any]]:
    """(hex key, the JSON payload it hashes)."""
    payload = {
        "version": CACHE_VERSION,
        "encoder": encoder_hash,
        "layers": {name: spec.as_dict() for name, spec in specs.items()},
        "images": _image_list_digest(images.paths, images.ids),
        "num_images": len(images),
        "input_size": input_size,
        "resize_shorter": resize_shorter,
        "input_convention": convention.as_dict(),
        "precision": precision,
    }
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32], payload


def default_cache_dir() -> Path:
    return default_results_root() / "cache" / "features"


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez written atomically (never half a file), after removing the temporary files
    a killed earlier write of the same cache left."""
    remove_stale_temporaries_of(path)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


@dataclass
class Features:
    """Features of the images of a split that could be read, in the split's order.

    arrays: {layer: float32 (N, D)}; keep: indices of these N images in the split given.
    """

    ids: list[str]
    keep: np.ndarray
    arrays: dict[str, np.ndarray]
    specs: dict[str, PoolSpec | TapSpec]
    key: str
    path: Path | None
    from_cache: bool
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    precision: str = "fp32"  # the forward pass's, as resolved


def _read_cache(
    path: Path, key: str, layers: Sequence[str], specs: dict[str, Any], num_images: int
) -> dict[str, np.ndarray] | None:
    """The cached arrays when the file is this key's and every array has the kind and shape
    the extraction writes; None (extract again, with a warning when the file is damaged)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if not isinstance(meta, dict) or meta.get("key") != key:
                return None
            if any(f"feat_{n}" not in data for n in layers):
                return None
            out = {n: data[f"feat_{n}"] for n in layers}
            out["__ids"], out["__keep"] = data["ids"], data["keep"]
            out["__skipped"] = data["skipped"]
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a truncated zip, a foreign file: extract again
        log.warning(f"{path}: unreadable feature cache ({exc}); extracting again")
        return None
    problem = _cache_problem(out, layers, specs, num_images)
    if problem:
        log.warning(f"{path}: feature cache {problem}; extracting again")
        return None
    return out


def _cache_problem(
    arrays: dict[str, np.ndarray], layers: Sequence[str], specs: dict[str, Any], n: int
) -> str | None:
    """What makes a feature cache unusable (None when nothing): ids, keep and skipped must
    be 1-D, keep strictly increasing indices below the split's size, one feature row per
    kept image with each layer's width."""
    ids, keep, skipped = arrays["__ids"], arrays["__keep"], arrays["__skipped"]
    if ids.ndim != 1 or ids.dtype.kind != "U" or skipped.ndim != 1 or skipped.dtype.kind != "U":
        return "ids: not 1-D arrays of text"
    if keep.ndim != 1 or keep.dtype.kind not in "iu" or len(keep) != len(ids):
        return "keep: not one index per id"
    if len(keep) and (keep[0] < 0 or keep[-1] >= n or (np.diff(keep) <= 0).any()):
        return f"keep: indices outside 0..{n - 1} or not increasing"
    for name in layers:
        a = arrays[name]
        if a.dtype != np.float32 or a.shape != (len(ids), specs[name].dim):
            return f"feat_{name}: shape {a.shape} {a.dtype}, expected ({len(ids)}, " \
                   f"{specs[name].dim}) float32"  # fmt: skip
    return None


def _run(
    taps: nn.Module,
    loader: DataLoader,
    device: torch.device,
    specs: dict[str, Any],
    arrays: dict[str, np.ndarray],
    ok: np.ndarray,
    errors: list[str],
    on_bad_data: str,
    precision: Precision,
) -> None:
    """Forward every batch of `loader`, filling `arrays` rows; unreadable images flagged."""
    with torch.inference_mode(), precision.autocast():
        for x, index, messages in loader:
            bad = [m for m in messages if m]
            if bad:
                if on_bad_data == "error":
                    raise DatasetError(bad[0])
                errors.extend(bad)
                for i, m in zip(index.tolist(), messages):
                    if m:
                        ok[i] = False
            out = taps(nhwc(x.to(device, non_blocking=True)))  # oneDNN's fast layout
            rows = index.numpy()
            for name, value in out.items():
                if value.shape[1] != specs[name].dim:
                    raise RuntimeError(
                        f"{name}: {value.shape[1]} values, expected "
                        f"{specs[name].describe()}: update layer_specs()"
                    )
                arrays[name][rows] = value.float().cpu().numpy()


def extract_features(
    encoder: nn.Module,
    images: SplitImages,
    layers: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    input_size: int = 227,
    resize_shorter: int | None = 256,
    batch_size: int = 64,
    workers: int = 0,
    cache_dir: Path | str | None = None,
    use_cache: bool = True,
    on_bad_data: str = "error",
    precision: str = "fp32",
    logger: logging.Logger = log,
) -> Features:
    """Pooled features of `layers` for every image of `images` (cached, see module doc).

    The encoder runs in eval mode under torch.inference_mode, `batch_size` images at a time
    on `device`, fed in its input convention (`encoder.convention`, a contract encoder's
    `input_convention`), under autocast at `precision` (auto, fp32, bf16, fp16; see the module
    docstring). An unreadable image is a DatasetError, or with on_bad_data="skip"
    it is left out (`Features.keep` / `skipped` say which). A contract encoder reads its
    own taps (`layers` among `encoder.taps`) at its own `input_size`.
    """
    contract = is_contract(encoder)
    layers = check_layers(layers, known=encoder_layers(encoder))
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    if contract and input_size != encoder.input_size:
        raise ConfigError(f"input_size: {input_size}, but the {encoder.arch} encoder's taps "
                          f"are pooled for {encoder.input_size}")  # fmt: skip
    device = torch.device(device)
    amp = Precision(precision, device)
    was_training = encoder.training
    encoder.eval()
    encoder.to(device)
    specs: dict[str, Any]
    if contract:
        specs = tap_specs(encoder, layers)
        convention: InputConvention = encoder.input_convention  # type: ignore[assignment]
    else:
        specs = layer_specs(encoder, layers, input_size)
        convention = encoder.convention  # type: ignore[assignment]
    key, payload = cache_key(encoder_fingerprint(encoder), specs, images, input_size,
                             resize_shorter, convention, amp.name)  # fmt: skip
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"{key}.npz"
    if use_cache:
        cached = _read_cache(path, key, layers, specs, len(images))
        if cached is not None:
            ids = [str(i) for i in cached.pop("__ids")]
            keep = cached.pop("__keep").astype(np.int64)
            skipped = [str(s) for s in cached.pop("__skipped")]
            logger.info(f"features of {len(ids)} {images.split} images from cache {path}")
            encoder.train(was_training)
            return Features(ids, keep, cached, specs, key, path, True, 0.0, skipped, amp.name)

    tick = time.perf_counter()
    taps: nn.Module
    if contract:
        taps = EncoderTaps(encoder, layers)
    else:
        taps = LayerTaps(encoder.features, specs)  # type: ignore[arg-type]
    n = len(images)
    arrays = {name: np.zeros((n, spec.dim), dtype=np.float32) for name, spec in specs.items()}
    ok = np.ones(n, dtype=bool)
    errors: list[str] = []
    loader = DataLoader(
        _Images(images.paths, input_size, resize_shorter, convention),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=_worker_init if workers > 0 else None,
        pin_memory=device.type == "cuda",
    )
    logger.info(
        f"extracting {', '.join(layers)} of {n} {images.split} images on {device} "
        f"({input_size}x{input_size}, batch {batch_size})"
    )
    # OpenCV's thread pool does not survive fork: a worker forked after the parent used it
    # waits forever in cv2.resize. Single-threaded OpenCV while the loader runs.
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(0)
    try:
        _run(taps, loader, device, specs, arrays, ok, errors, on_bad_data, amp)
    finally:
        cv2.setNumThreads(cv2_threads)
        encoder.train(was_training)
    for message in errors:
        logger.warning(f"{message}; skipping the image (on_bad_data=skip)")
    keep = np.flatnonzero(ok)
    if not keep.size:
        raise DatasetError(f"split '{images.split}': no image could be read")
    if errors:
        arrays = {name: a[keep] for name, a in arrays.items()}
    ids = [images.ids[i] for i in keep]
    seconds = time.perf_counter() - tick
    logger.info(f"extracted in {seconds:.1f}s: " + "; ".join(
        f"{name} {spec.describe()}" for name, spec in specs.items()))  # fmt: skip
    if use_cache:
        meta = {"key": key, **payload, "device": str(device), "seconds": seconds}
        try:
            _atomic_savez(path, {
                **{f"feat_{name}": a for name, a in arrays.items()},
                "ids": np.asarray(ids, dtype=str), "keep": keep,
                "skipped": np.asarray(errors, dtype=str), "meta": np.asarray(json.dumps(meta)),
            })  # fmt: skip
        except OSError as exc:
            raise BenchError(f"{path}: cannot write the feature cache ({exc})") from None
    return Features(ids, keep, arrays, specs, key, path if use_cache else None, False, seconds,
                    errors, amp.name)  # fmt: skip
