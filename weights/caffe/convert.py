"""Caffe prototxt + caffemodel -> bench's native encoder file, same pool5 on the same image.

A Caffe net takes BGR, 0-255 pixels minus its data layer's `mean_value`, times its `scale`
(`input_convention.caffe_transform`). The imported encoder takes its arch's convention
(`caffenet`, `bvlc-alexnet`: Caffe's, BGR minus (104, 117, 123), scale 1); where the prototxt's
mean or scale differ, the difference is folded into conv1 (`input_convention.fold_conv1`:
weights times the ratio of scales, a bias absorbing the mean difference), so the encoder
gives Caffe's pool5 on its own input. A prototxt with the usual mean and scale 1 is copied
unchanged. The fold is exact because CaffeNet's conv1 has no padding (padded zeros would be
each convention's own mean at the borders); the prototxt check refuses any conv1 pad.
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

from benchmark.errors import BenchError, printable
from benchmark.input_convention import caffe_transform, fold_conv1
from encoders.alexnet import ARCHS, CONV_INDICES, pool5_size
from weights.caffe.caffemodel import fit_blob, read_caffemodel
from weights.caffe.prototxt import NetSpec, read_prototxt

CAFFEMODEL_SUFFIX = ".caffemodel"
PROTOTXT_SUFFIX = ".prototxt"
HEAD_SUFFIX = "-fc.safetensors"


@dataclass
class CaffeWeights:
    """An imported net: encoder state dict, fc6/fc7 (empty without them), model card."""

    state: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    card: dict[str, Any]


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
    from weights.native import NATIVE_FILE, card_path, write_native

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
            source = caffe_transform(spec.mean_bgr, spec.input_scale)
            weight, bias = fold_conv1(weight, bias, source, arch.convention)
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
        "input_convention": ARCHS[spec.arch].convention.as_dict(),
        "caffe_mean_bgr": list(spec.mean_bgr),
        "caffe_mean_source": spec.mean_source,
        "caffe_input_scale": spec.input_scale,
    }
