"""Read a Caffe prototxt and check that its conv1-pool5 is a network bench can represent.

The text is parsed by protobuf's text_format into the schema of `schema.py`, skipping every
field the schema does not declare (fillers, lr multipliers, data sources...). Both the
current `layer { type: "Convolution" }` and the V1 `layers { type: CONVOLUTION }` forms are
read. Layers without inputs (data/input layers) are sources: their `transform_param` gives
the input mean and scale; layers excluded from the TEST phase are dropped, as Caffe's deploy
net would. From the first layer after the sources to pool5 the net must be exactly

    conv ReLU {pool LRN | LRN pool} conv ReLU {same order} conv ReLU conv ReLU conv ReLU pool

with CaffeNet's kernels, strides, pads, groups, widths, MAX pooling rounding up, and LRN
(ACROSS_CHANNELS, local_size 5, alpha 1e-4, beta 0.75, k 1): LRN's parameters are fixed by
the arch because the model card stores only the arch name. Pool-then-LRN is `caffenet`,
LRN-then-pool `bvlc-alexnet`. Anything else (another layer between convs, conv1 with
kernel 7, a leaky ReLU) is refused naming the layer. After pool5 an InnerProduct (or a
6x6 convolution, FCN style) reading pool5 is fc6 and the next one fc7; the rest is ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from benchmark.errors import BenchError, printable
from benchmark.input_convention import CAFFE
from encoders.alexnet import ARCHS, CAFFE_LRN, LRNSpec
from weights.caffe.schema import messages

# Caffe's usual ImageNet mean per BGR channel, used when the prototxt names none.
DEFAULT_MEAN_BGR = CAFFE.mean
# V1 enum names -> current type strings (the others keep their V1 name in messages).
V1_TYPES = {
    "CONVOLUTION": "Convolution", "POOLING": "Pooling", "LRN": "LRN", "RELU": "ReLU",
    "INNER_PRODUCT": "InnerProduct", "DROPOUT": "Dropout", "DATA": "Data",
    "IMAGE_DATA": "ImageData", "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "ACCURACY": "Accuracy", "SPLIT": "Split", "CONCAT": "Concat",
}  # fmt: skip
CONV_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
PATTERNS = {
    "caffenet": "C R P N C R P N C R C R C R P".split(),
    "bvlc-alexnet": "C R N P C R N P C R C R C R P".split(),
}
_LETTER = {"Convolution": "C", "ReLU": "R", "Pooling": "P", "LRN": "N"}
_WORD = {"C": "Convolution", "R": "ReLU", "P": "Pooling", "N": "LRN"}


@dataclass(frozen=True)
class LayerSpec:
    """One layer of the prototxt: name, type (current spelling), blobs, parsed message."""

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    message: Any = field(repr=False, compare=False)


@dataclass(frozen=True)
class NetSpec:
    """What the importer needs from a prototxt; built only for a representable net."""

    path: Path
    name: str
    arch: str  # "caffenet" (pool, then LRN) or "bvlc-alexnet" (LRN, then pool)
    encoder: tuple[str, ...]  # Caffe layer names of conv1..conv5
    head: tuple[str, ...]  # names of fc6 (and fc7) when the net has them after pool5
    head_kinds: tuple[str, ...]  # "InnerProduct" or "Convolution" for each head layer
    mean_bgr: tuple[float, float, float]
    mean_source: str  # "prototxt" or "default"
    input_scale: float  # Caffe's transform_param scale, applied after the mean
    lrn: LRNSpec
    layers: tuple[LayerSpec, ...]  # every layer kept (TEST phase), file order


def read_prototxt(path: Path) -> NetSpec:
    """Parse `path` and check its encoder; BenchError naming the file or layer otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchError(f"{printable(path)}: cannot read prototxt ({exc})") from None
    net = messages()["NetParameter"]()
    try:
        text_format.Parse(text, net, allow_unknown_field=True)
    except text_format.ParseError as exc:
        msg = " ".join(str(exc).split())
        raise BenchError(f"{printable(path)}: not a Caffe prototxt ({msg})") from None
    layers = net_layers(net, path)
    if not layers:
        raise BenchError(f"{printable(path)}: prototxt has no layers")
    return _net_spec(path, net.name, layers)


def net_layers(net: Any, path: Path) -> list[LayerSpec]:
    """Layers of a NetParameter (current `layer` first, then V1 `layers`), TEST phase only."""
    out: list[LayerSpec] = []
    v1_enum = messages()["V1LayerParameter"].DESCRIPTOR.enum_types_by_name["LayerType"]
    for i, layer in enumerate([*net.layer, *net.layers]):
        if layer.DESCRIPTOR.name == "V1LayerParameter":
            v1 = v1_enum.values_by_number[layer.type].name
            type_ = V1_TYPES.get(v1, v1)
            if not layer.name and layer.type == 0:
                raise BenchError(
                    f"{printable(path)}: layer #{i} has no name or type (a V0 net? upgrade it "
                    "with Caffe's upgrade_net_proto_text / upgrade_net_proto_binary)"
                )
        else:
            type_ = layer.type
        if not _in_test_phase(layer):
            continue
        out.append(LayerSpec(layer.name, type_, tuple(layer.bottom), tuple(layer.top), layer))
    names = [x.name for x in out]
    for name in names:
        if names.count(name) > 1:
            raise BenchError(f"{printable(path)}: layer name {name!r} is used twice")
    return out


def _in_test_phase(layer: Any) -> bool:
    test = messages()["NetStateRule"].DESCRIPTOR.fields_by_name["phase"].enum_type
    test_phase = test.values_by_name["TEST"].number
    if layer.include:
        return any(not r.HasField("phase") or r.phase == test_phase for r in layer.include)
    return not any(r.HasField("phase") and r.phase == test_phase for r in layer.exclude)


def _net_spec(path: Path, name: str, layers: list[LayerSpec]) -> NetSpec:
    sources = []
    for layer in layers:
        if layer.bottoms:
            break
        sources.append(layer)
    chain = layers[len(sources) :]
    arch = _match_pattern(path, chain)
    encoder_layers = chain[: len(PATTERNS[arch])]
    _check_connected(path, encoder_layers)
    convs = [x for x in encoder_layers if x.type == "Convolution"]
    spec = ARCHS[arch]
    for i, conv in enumerate(convs):
        kernel, pad = (11, spec.conv1_pad) if i == 0 else ((5, 2) if i == 1 else (3, 1))
        _check_conv(path, conv, spec.widths[i], kernel, 4 if i == 0 else 1, pad, spec.groups[i])
    for layer in encoder_layers:
        if layer.type == "Pooling":
            _check_pool(path, layer)
        elif layer.type == "LRN":
            _check_lrn(path, layer, CAFFE_LRN)
        elif layer.type == "ReLU":
            slope = layer.message.relu_param.negative_slope
            if slope != 0:
                raise BenchError(f"{_where(path, layer)}: leaky ReLU (negative_slope {slope})")
    mean, source, scale = _input_transform(path, sources)
    head, kinds = _head(chain[len(encoder_layers) :], encoder_layers[-1].tops[0])
    return NetSpec(
        path=path, name=name, arch=arch, encoder=tuple(c.name for c in convs), head=head,
        head_kinds=kinds, mean_bgr=mean, mean_source=source, input_scale=scale,
        lrn=CAFFE_LRN, layers=tuple(layers),
    )  # fmt: skip


def _where(path: Path, layer: LayerSpec) -> str:
    return f"{printable(path)}: layer {layer.name!r} ({layer.type})"


def _match_pattern(path: Path, chain: list[LayerSpec]) -> str:
    """The arch whose layer pattern the chain follows; BenchError at the first misfit."""
    letters = [_LETTER.get(x.type, "?") for x in chain]
    best, best_len = "caffenet", -1
    for arch, pattern in PATTERNS.items():
        n = 0
        while n < len(pattern) and n < len(letters) and letters[n] == pattern[n]:
            n += 1
        if n == len(pattern):
            return arch
        if n > best_len:
            best, best_len = arch, n
    pattern = PATTERNS[best]
    expected = _WORD[pattern[best_len]]
    if pattern[best_len] in "PN" and pattern[best_len - 1] == "R" and best_len < 5:
        expected = "Pooling or LRN"
    after = f"after {chain[best_len - 1].name!r}" if best_len > 0 else "first"
    if best_len >= len(chain):
        raise BenchError(
            f"{printable(path)}: the net ends {after}; the encoder needs conv1-conv5 and pool5"
        )
    layer = chain[best_len]
    raise BenchError(
        f"{_where(path, layer)}: the encoder cannot represent this layer here "
        f"(expected {expected} {after}; bench's encoders are CaffeNet and BVLC AlexNet)"
    )


def _check_connected(path: Path, layers: list[LayerSpec]) -> None:
    for prev, layer in zip(layers[:-1], layers[1:]):
        if len(layer.bottoms) != 1 or len(layer.tops) != 1 or layer.bottoms[0] != prev.tops[0]:
            want = prev.tops[0] if prev.tops else None
            raise BenchError(
                f"{_where(path, layer)}: reads {list(layer.bottoms)} and writes "
                f"{list(layer.tops)}; the encoder needs one input, {want!r} (the output of "
                f"{prev.name!r}), and one output"
            )


def _square(path: Path, layer: LayerSpec, what: str, values: list[int], h: int | None,
            w: int | None, default: int | None) -> int:  # fmt: skip
    """One side of a square kernel/stride/pad from Caffe's repeated or _h/_w fields."""
    if h is not None or w is not None:
        values = [v for v in (h, w) if v is not None]
    if not values:
        if default is None:
            raise BenchError(f"{_where(path, layer)}: no {what}")
        return default
    if len(set(values)) != 1:
        raise BenchError(f"{_where(path, layer)}: {what} {values} is not square")
    return values[0]


def _opt(msg: Any, name: str) -> int | None:
    return getattr(msg, name) if msg.HasField(name) else None


def _check_conv(path: Path, layer: LayerSpec, width: int, kernel: int, stride: int, pad: int,
                group: int) -> None:  # fmt: skip
    p = layer.message.convolution_param
    got = {
        "num_output": p.num_output,
        "kernel_size": _square(path, layer, "kernel_size", list(p.kernel_size),
                               _opt(p, "kernel_h"), _opt(p, "kernel_w"), None),
        "stride": _square(path, layer, "stride", list(p.stride), _opt(p, "stride_h"),
                          _opt(p, "stride_w"), 1),
        "pad": _square(path, layer, "pad", list(p.pad), _opt(p, "pad_h"), _opt(p, "pad_w"), 0),
        "group": p.group,
        "dilation": _square(path, layer, "dilation", list(p.dilation), None, None, 1),
        "axis": p.axis,
    }  # fmt: skip
    want = {"num_output": width, "kernel_size": kernel, "stride": stride, "pad": pad,
            "group": group, "dilation": 1, "axis": 1}  # fmt: skip
    for key, value in want.items():
        if got[key] != value:
            why = " (Caffe's input offset is folded into conv1, exact only without padding)"
            raise BenchError(
                f"{_where(path, layer)}: {key} {got[key]}, the encoder's layer has {value}"
                + (why if key == "pad" and width == 96 and kernel == 11 else "")
            )


def _check_pool(path: Path, layer: LayerSpec) -> None:
    p = layer.message.pooling_param
    method = p.DESCRIPTOR.fields_by_name["pool"].enum_type.values_by_number[p.pool].name
    rounding = p.DESCRIPTOR.fields_by_name["round_mode"].enum_type.values_by_number
    got = {
        "pool": method,
        "kernel_size": _square(path, layer, "kernel_size",
                               [p.kernel_size] if p.HasField("kernel_size") else [],
                               _opt(p, "kernel_h"), _opt(p, "kernel_w"), None),
        "stride": _square(path, layer, "stride", [p.stride], _opt(p, "stride_h"),
                          _opt(p, "stride_w"), 1),
        "pad": _square(path, layer, "pad", [p.pad], _opt(p, "pad_h"), _opt(p, "pad_w"), 0),
        "global_pooling": p.global_pooling,
        "round_mode": rounding[p.round_mode].name,
    }  # fmt: skip
    want = {"pool": "MAX", "kernel_size": 3, "stride": 2, "pad": 0, "global_pooling": False,
            "round_mode": "CEIL"}  # fmt: skip
    for key, value in want.items():
        if got[key] != value:
            raise BenchError(
                f"{_where(path, layer)}: {key} {got[key]}, the encoder pools with {value}"
            )


def _check_lrn(path: Path, layer: LayerSpec, spec: LRNSpec) -> None:
    p = layer.message.lrn_param
    region = p.DESCRIPTOR.fields_by_name["norm_region"].enum_type.values_by_number
    if region[p.norm_region].name != "ACROSS_CHANNELS":
        raise BenchError(f"{_where(path, layer)}: norm_region WITHIN_CHANNEL is not supported")
    got = {"local_size": p.local_size, "alpha": p.alpha, "beta": p.beta, "k": p.k}
    for key, value in got.items():
        want = getattr(spec, key)
        if not math.isclose(value, want, rel_tol=1e-6):  # stored as float32
            raise BenchError(
                f"{_where(path, layer)}: {key} {value:g}, the encoder's LRN has {want:g} "
                "(LRN parameters are fixed by the arch)"
            )


def _input_transform(
    path: Path, sources: list[LayerSpec]
) -> tuple[tuple[float, float, float], str, float]:
    """(mean per BGR channel, where it came from, scale) from the data layers' transforms."""
    found: set[tuple[tuple[float, ...], float]] = set()
    for layer in sources:
        msg = layer.message
        if not msg.HasField("transform_param"):
            continue
        t = msg.transform_param
        if t.mean_file:
            raise BenchError(
                f"{_where(path, layer)}: mean_file {t.mean_file!r} is a per-pixel mean image, "
                "which cannot be folded into conv1; give mean_value per channel instead"
            )
        values = tuple(float(v) for v in t.mean_value)
        if len(values) not in (0, 1, 3):
            raise BenchError(
                f"{_where(path, layer)}: {len(values)} mean_value entries for 3 channels"
            )
        found.add((values * 3 if len(values) == 1 else values, float(t.scale)))
    if len(found) > 1:
        raise BenchError(f"{printable(path)}: data layers disagree on mean_value / scale")
    if not found:
        return DEFAULT_MEAN_BGR, "default", 1.0
    values, scale = found.pop()
    if not scale > 0:
        raise BenchError(f"{printable(path)}: transform_param scale {scale:g} must be > 0")
    if not values:
        return DEFAULT_MEAN_BGR, "default", scale
    return (values[0], values[1], values[2]), "prototxt", scale


def _head(rest: list[LayerSpec], pool5: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """fc6 (and fc7): fully-connected layers fed by pool5 through ReLU/Dropout only."""
    names: list[str] = []
    kinds: list[str] = []
    current = pool5
    for layer in rest:
        if current not in layer.bottoms:
            continue
        if layer.type in ("ReLU", "Dropout") and layer.bottoms == (current,):
            current = layer.tops[0] if layer.tops else current
            continue
        if not _is_fc(layer, first=not names) or layer.bottoms != (current,):
            break
        names.append(layer.name)
        kinds.append(layer.type)
        current = layer.tops[0]
        if len(names) == 2:
            break
    return tuple(names), tuple(kinds)


def _is_fc(layer: LayerSpec, first: bool) -> bool:
    if layer.type == "InnerProduct":
        p = layer.message.inner_product_param
        return p.axis == 1
    if layer.type == "Convolution":  # FCN's fc6 (6x6) / fc7 (1x1) as convolutions
        p = layer.message.convolution_param
        kernel = list(p.kernel_size) or [p.kernel_h]
        return (
            p.group == 1 and kernel == [6 if first else 1] and not list(p.pad)
            and list(p.stride) in ([], [1]) and not list(p.dilation)
        )  # fmt: skip
    return False
