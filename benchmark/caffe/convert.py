"""Caffe prototxt + caffemodel -> bench's native encoder file, same pool5 on the same image.

Caffe nets take BGR, 0-255, mean-subtracted (then scaled) input; bench feeds RGB
(x / 255 - PIXEL_MEAN) / PIXEL_STD. Per Caffe channel c' (BGR) with RGB channel c = 2 - c':

    x_caffe[c'] = scale * (255 * (PIXEL_STD[c] * x_bench[c] + PIXEL_MEAN[c]) - mean_bgr[c'])

which is affine in x_bench, so conv1 of the imported encoder gets Caffe's weights with the
channel axis reversed and multiplied by scale * 255 * PIXEL_STD, and a bias that absorbs the
constant. The fold is exact because CaffeNet's conv1 has no padding (padded zeros would be
bench zeros, not Caffe zeros, at the borders); the prototxt check refuses any conv1 pad.
Weights are folded in float64 and stored as float32, as Caffe holds them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.caffe.caffemodel import fit_blob, read_caffemodel
from benchmark.caffe.prototxt import NetSpec, read_prototxt
from benchmark.errors import BenchError, printable
from pretrain.alexnet import ARCHS, CONV_INDICES, PIXEL_MEAN, PIXEL_STD, pool5_size

CAFFEMODEL_SUFFIX = ".caffemodel"
PROTOTXT_SUFFIX = ".prototxt"
INPUT_CONVENTION = (
    "bench: RGB (x/255 - PIXEL_MEAN)/PIXEL_STD; Caffe's BGR, 0-255, mean-subtracted input "
    "folded into conv1"
)
HEAD_SUFFIX = "-fc.safetensors"


@dataclass
class CaffeWeights:
    """An imported net: encoder state dict, fc6/fc7 (empty without them), model card."""

    state: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    card: dict[str, Any]


def fold_input_convention(
    weight: np.ndarray, bias: np.ndarray, mean_bgr: tuple[float, float, float], scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Caffe's conv1 (out, 3 BGR, k, k) -> the conv1 giving the same output on bench input."""
    w_rgb = np.asarray(weight, np.float64)[:, ::-1]  # RGB channel c is Caffe's channel 2 - c
    std, mean = np.asarray(PIXEL_STD), np.asarray(PIXEL_MEAN)
    folded = w_rgb * (scale * 255.0 * std)[None, :, None, None]
    offset = scale * (255.0 * mean - np.asarray(mean_bgr, np.float64)[::-1])  # per RGB channel
    new_bias = np.asarray(bias, np.float64) + w_rgb.sum(axis=(2, 3)) @ offset
    return folded, new_bias


def default_method(caffemodel: Path) -> str:
    """Method name from the file name: `ce_features.caffemodel` -> `ce_features`."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", Path(caffemodel).stem.lower()).strip("-.")
    return name or "caffe"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def caffe_weights(prototxt: Path, caffemodel: Path, method: str | None = None) -> CaffeWeights:
    """Read, check and convert a Caffe net; BenchError naming the file or layer on failure."""
    prototxt, caffemodel = Path(prototxt), Path(caffemodel)
    spec = read_prototxt(prototxt)
    blobs = read_caffemodel(caffemodel, layers={*spec.encoder, *spec.head})
    state = _encoder_state(spec, blobs, caffemodel)
    head = _head_state(spec, blobs, caffemodel)
    card = _card(spec, prototxt, caffemodel, method, head)
    return CaffeWeights(state, head, card)


def import_caffe(
    prototxt: Path, caffemodel: Path, out: Path, method: str | None = None, *, force: bool = False
) -> Path:
    """Write the net's encoder as a native safetensors file (+ card); returns its path.

    `out` may be a folder, existing or not when it has no suffix (the file is then
    `encoder.safetensors` inside it, so the folder works as `--weights`). fc6/fc7, when
    the net has them, go beside it as `<stem>-fc.safetensors` (keys fc6.*, fc7.*; Caffe's
    layout, which is torch's (out, in) Linear layout on flattened pool5).
    """
    from benchmark.runs import remove_stale_temporaries_of
    from pretrain.export import NATIVE_FILE, card_path, write_native

    out = Path(out)
    if out.is_dir() or not out.suffix:
        out = out / NATIVE_FILE
    if out.suffix != ".safetensors":
        raise BenchError(f"{printable(out)}: output must be a .safetensors file")
    head_path = out.with_name(out.name.split(".")[0] + HEAD_SUFFIX)
    for path in (out, card_path(out), head_path):
        if path.exists() and not force:
            raise BenchError(f"{printable(path)}: exists (pass --force to overwrite)")
        remove_stale_temporaries_of(path)  # what a killed import left
    weights = caffe_weights(prototxt, caffemodel, method)
    card = dict(weights.card)
    if weights.head:
        card["head_file"] = head_path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    if weights.head:
        _write_head(head_path, weights.head, card)
    return write_native(out, weights.state, card)


def _write_head(path: Path, head: dict[str, torch.Tensor], card: dict[str, Any]) -> None:
    from safetensors.torch import save

    from benchmark.runs import atomic_write_bytes

    meta = {"source": card["source_files"]["caffemodel"]["name"], "layers": card["head_layers"]}
    atomic_write_bytes(path, save(head, metadata={k: str(v) for k, v in meta.items()}))


def _encoder_state(
    spec: NetSpec, blobs: dict[str, list[np.ndarray]], source: Path
) -> dict[str, torch.Tensor]:
    arch = ARCHS[spec.arch]
    widths, groups = arch.widths, arch.groups
    in_channels = (3, *widths[:-1])
    kernels = (11, 5, 3, 3, 3)
    state: dict[str, torch.Tensor] = {}
    for i, (name, index) in enumerate(zip(spec.encoder, CONV_INDICES)):
        w_shape = (widths[i], in_channels[i] // groups[i], kernels[i], kernels[i])
        weight, bias = _weight_and_bias(blobs, name, source, w_shape, widths[i])
        if i == 0:
            weight, bias = fold_input_convention(weight, bias, spec.mean_bgr, spec.input_scale)
        state[f"features.{index}.weight"] = _tensor(weight)
        state[f"features.{index}.bias"] = _tensor(bias)
    return state


def _weight_and_bias(
    blobs: dict[str, list[np.ndarray]], name: str, source: Path, w_shape: tuple[int, ...],
    n_out: int, transpose: bool = False,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    layer_blobs = blobs.get(name)
    if not layer_blobs:
        raise BenchError(f"{printable(source)}: caffemodel has no weights for layer {name!r}")
    if len(layer_blobs) > 2:
        raise BenchError(
            f"{printable(source)}: layer {name!r} has {len(layer_blobs)} blobs, expected "
            "weight and bias"
        )
    stored = (w_shape[1], w_shape[0], *w_shape[2:]) if transpose else w_shape
    weight = fit_blob(source, name, 0, layer_blobs[0], stored)
    if transpose:
        weight = weight.T
    if len(layer_blobs) == 2:
        bias = fit_blob(source, name, 1, layer_blobs[1], (n_out,))
    else:  # bias_term: false
        bias = np.zeros(n_out, np.float32)
    return weight, bias


def _head_state(
    spec: NetSpec, blobs: dict[str, list[np.ndarray]], source: Path
) -> dict[str, torch.Tensor]:
    """fc6/fc7 as (out, in) matrices on flattened pool5, whichever form Caffe stored."""
    head: dict[str, torch.Tensor] = {}
    fan_in = ARCHS[spec.arch].widths[-1] * pool5_size(227, spec.arch) ** 2  # type: ignore[arg-type]
    layers = {x.name: x for x in spec.layers}
    for key, name, kind in zip(("fc6", "fc7"), spec.head, spec.head_kinds):
        msg = layers[name].message
        transpose = False
        if kind == "Convolution":
            n_out = msg.convolution_param.num_output
            side = 6 if key == "fc6" else 1
            shape: tuple[int, ...] = (n_out, fan_in // side**2, side, side)
        else:
            n_out = msg.inner_product_param.num_output
            transpose = msg.inner_product_param.transpose
            shape = (n_out, fan_in)
        weight, bias = _weight_and_bias(blobs, name, source, shape, n_out, transpose)
        head[f"{key}.weight"] = _tensor(weight.reshape(n_out, -1))
        head[f"{key}.bias"] = _tensor(bias)
        fan_in = n_out
    return head


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _card(
    spec: NetSpec, prototxt: Path, caffemodel: Path, method: str | None,
    head: dict[str, torch.Tensor],
) -> dict[str, Any]:  # fmt: skip
    return {
        "method": method or default_method(caffemodel),
        "mask": None,
        "iterations": None,
        "data": None,
        "config_hash": None,
        "arch": spec.arch,
        "pool_free": False,
        "pretrain_seconds": None,
        "imported": True,
        "source_files": {
            "prototxt": {"name": prototxt.name, "sha256": sha256(prototxt)},
            "caffemodel": {"name": caffemodel.name, "sha256": sha256(caffemodel)},
        },
        "caffe_net": spec.name,
        "caffe_layers": list(spec.encoder),
        "head_layers": list(spec.head) if head else [],
        "input_convention": INPUT_CONVENTION,
        "caffe_mean_bgr": list(spec.mean_bgr),
        "caffe_mean_source": spec.mean_source,
        "caffe_input_scale": spec.input_scale,
    }
