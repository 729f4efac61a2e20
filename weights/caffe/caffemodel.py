"""Read the weights of a binary `.caffemodel` (a serialised NetParameter).

Each layer's `blobs` become numpy arrays (float32, or float64 for `double_data`) in the
blob's own shape: `shape.dim` when present, else the legacy 4-D (num, channels, height,
width), so a legacy bias reads as (1, 1, 1, N); `fit_blob` accepts both forms, as Caffe's
Blob::ShapeEquals does. Both the current `layer` and the V1 `layers` fields are read.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from benchmark.errors import BenchError, printable
from weights.caffe.schema import messages


def read_caffemodel(
    path: Path, layers: Collection[str] | None = None
) -> dict[str, list[np.ndarray]]:
    """{layer name: [blob arrays]} for every layer with blobs (or only those in `layers`).

    BenchError naming the file when it is not a NetParameter (random bytes, a truncated
    download, a prototxt) and naming the layer when a blob's data and shape disagree.
    """
    net = parse_net(path)
    out: dict[str, list[np.ndarray]] = {}
    for layer in [*net.layer, *net.layers]:
        if layers is not None and layer.name not in layers:
            continue
        if layer.name in out:
            raise BenchError(f"{printable(path)}: layer name {layer.name!r} is used twice")
        if layer.blobs:
            out[layer.name] = [
                _blob_array(path, layer.name, i, b) for i, b in enumerate(layer.blobs)
            ]
    return out


def parse_net(path: Path) -> Any:
    """The NetParameter in `path`; BenchError unless it parses and names its layers."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BenchError(f"{printable(path)}: cannot read caffemodel ({exc.strerror})") from None
    net = messages()["NetParameter"]()
    try:
        net.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise BenchError(
            f"{printable(path)}: not a Caffe NetParameter (truncated or corrupt file: "
            f"{' '.join(str(exc).split()) or type(exc).__name__})"
        ) from None
    layers = [*net.layer, *net.layers]
    # Random bytes can happen to parse as unknown fields; a real net has named layers.
    if not layers or not all(layer.name for layer in layers):
        raise BenchError(
            f"{printable(path)}: not a Caffe NetParameter (no named layers; truncated, "
            "corrupt or another kind of file)"
        )
    return net


def _blob_array(path: Path, layer: str, index: int, blob: Any) -> np.ndarray:
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    if len(blob.double_data):
        values = np.asarray(blob.double_data, dtype=np.float64)
    else:
        values = np.asarray(blob.data, dtype=np.float32)
    # math.prod on Python ints: numpy's int64 product of huge dimensions wraps around (to 0
    # for two dimensions of 2**32), which an empty blob would then match.
    count = math.prod(shape)
    if any(d < 0 for d in shape) or len(shape) > 32 or values.size != count:
        raise BenchError(
            f"{printable(path)}: layer {layer!r} blob {index} holds {values.size} values for "
            f"shape {list(shape)} (truncated or corrupt file)"
        )
    return values.reshape(shape)


def fit_blob(source: str, layer: str, index: int, array: np.ndarray,
             shape: tuple[int, ...]) -> np.ndarray:  # fmt: skip
    """`array` in `shape`, accepting Caffe's legacy 4-D form (leading 1s); else BenchError."""
    legacy = (1,) * (4 - len(shape)) + tuple(shape) if len(shape) <= 4 else None
    if tuple(array.shape) == tuple(shape) or (legacy is not None and array.shape == legacy):
        return array.reshape(shape)
    raise BenchError(
        f"{printable(source)}: layer {layer!r} blob {index} has shape {list(array.shape)}, "
        f"the encoder expects {list(shape)}"
    )
