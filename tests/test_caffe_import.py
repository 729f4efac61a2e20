"""weights.caffe: Caffe nets written here through the same schema import to the same pool5.

The reference forward pass below is written independently of bench's encoder: float64,
Caffe's input convention (BGR, 0-255, minus the mean), grouped convolutions done group by
group, Caffe's LRN formula and Caffe's ceil pooling loop written out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from benchmark.errors import BenchError
from benchmark.input_convention import CAFFE, TORCHVISION, caffe_transform, fold_conv1
from weights.caffe import caffe_weights, import_caffe, read_caffemodel, read_prototxt
from weights.caffe.schema import messages
from weights.encoder import load_encoder, peek_card

# name, type, kernel, stride, pad, group, outputs (CaffeNet's train_val names)
CONVS = [
    ("conv1", 11, 4, 0, 1, 96),
    ("conv2", 5, 1, 2, 2, 256),
    ("conv3", 3, 1, 1, 1, 384),
    ("conv4", 3, 1, 1, 2, 384),
    ("conv5", 3, 1, 1, 2, 256),
]
FC = (("fc6", 24), ("fc7", 16), ("fc8", 10))  # small fc layers keep the files small
V1 = {"Convolution": "CONVOLUTION", "ReLU": "RELU", "Pooling": "POOLING", "LRN": "LRN",
      "InnerProduct": "INNER_PRODUCT", "Dropout": "DROPOUT", "Softmax": "SOFTMAX",
      "Data": "DATA"}  # fmt: skip
MEAN = (104.0, 117.0, 123.0)


# ------------------------------------------------------------------------- writing nets


def caffenet_layers(lrn_first: bool = False, extra_after: str | None = None) -> list[dict]:
    """Layer dicts (name, type, bottom, top, params text) of a CaffeNet deploy net."""
    layers: list[dict] = []
    blob = "data"

    def add(name: str, type_: str, params: str = "", inplace: bool = False) -> None:
        nonlocal blob
        top = blob if inplace else name
        layers.append({"name": name, "type": type_, "bottom": blob, "top": top, "params": params})
        blob = top

    lrn = "lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }"
    pool = "pooling_param { pool: MAX kernel_size: 3 stride: 2 }"
    for i, (name, k, s, p, g, n) in enumerate(CONVS, start=1):
        conv = (
            f"param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }} "
            f"convolution_param {{ num_output: {n} kernel_size: {k} stride: {s} "
            + (f"pad: {p} " if p else "")
            + (f"group: {g} " if g > 1 else "")
            + 'weight_filler { type: "gaussian" std: 0.01 } '
            'bias_filler { type: "constant" value: 0 } }'
        )
        add(name, "Convolution", conv)
        add(f"relu{i}", "ReLU", inplace=True)
        if extra_after == name:
            add("weird", "Sigmoid")
        if i in (1, 2):
            steps = [("norm", "LRN", lrn), ("pool", "Pooling", pool)]
            for prefix, type_, params in steps if lrn_first else steps[::-1]:
                add(f"{prefix}{i}", type_, params)
    add("pool5", "Pooling", pool)
    for i, (name, n) in enumerate(FC, start=6):
        add(name, "InnerProduct", f"inner_product_param {{ num_output: {n} }}")
        if name != "fc8":
            add(f"relu{i}", "ReLU", inplace=True)
            add(f"drop{i}", "Dropout", "dropout_param { dropout_ratio: 0.5 }", inplace=True)
    add("prob", "Softmax")
    return layers


def prototxt_text(layers: list[dict], v1: bool = False, mean: tuple | None = None) -> str:
    lines = ['name: "CaffeNet"']
    if mean is not None:  # train_val-style data layers, the TEST one with the mean
        t = "DATA" if v1 else '"Data"'
        for phase, values in (("TRAIN", (0.0,)), ("TEST", mean)):
            transform = " ".join(f"mean_value: {m}" for m in values)
            lines.append(
                ("layers" if v1 else "layer")
                + f' {{ name: "data_{phase.lower()}" type: {t} top: "data" top: "label" '
                f"include {{ phase: {phase} }} "
                f"transform_param {{ mirror: false crop_size: 227 {transform} }} "
                'data_param { source: "val_lmdb" batch_size: 50 backend: LMDB } }'
            )
    else:
        lines.append('input: "data" input_dim: 1 input_dim: 3 input_dim: 227 input_dim: 227')
    for x in layers:
        type_ = V1.get(x["type"], x["type"].upper()) if v1 else f'"{x["type"]}"'
        params = x["params"]
        if v1:  # V1 nets spell lr multipliers differently
            params = params.replace("param { lr_mult: 1 decay_mult: 1 } ", "blobs_lr: 1 ")
            params = params.replace("param { lr_mult: 2 decay_mult: 0 } ", "blobs_lr: 2 ")
        lines.append(
            ("layers" if v1 else "layer")
            + f' {{\n  name: "{x["name"]}"\n  type: {type_}\n  bottom: "{x["bottom"]}"\n'
            f'  top: "{x["top"]}"\n  {params}\n}}'
        )
    return "\n".join(lines) + "\n"


def random_weights(seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Weights scaled so that activations stay O(100) at Caffe's 0-255 input scale, where
    LRN (alpha 1e-4) changes the result noticeably."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    cin = 3
    for name, k, _s, _p, g, n in CONVS:
        fan_in = cin // g * k * k
        scale = 3.0 / math.sqrt(fan_in) if name == "conv1" else 1.6 / math.sqrt(fan_in)
        w = (rng.standard_normal((n, cin // g, k, k)) * scale).astype(np.float32)
        b = (rng.standard_normal(n) * 5).astype(np.float32)
        out[name] = [w, b]
        cin = n
    fan_in = 256 * 36
    for name, n in FC:
        w = (rng.standard_normal((n, fan_in)) / math.sqrt(fan_in)).astype(np.float32)
        out[name] = [w, rng.standard_normal(n).astype(np.float32)]
        fan_in = n
    return out


def write_caffemodel(path: Path, layers: list[dict], weights: dict[str, list[np.ndarray]],
                     v1: bool = False, legacy: bool = False) -> Path:  # fmt: skip
    """Serialise a NetParameter (current or V1 layers; blobs with `shape` or legacy dims)."""
    m = messages()
    net = m["NetParameter"](name="CaffeNet")
    enum = m["V1LayerParameter"].DESCRIPTOR.enum_types_by_name["LayerType"]
    for x in layers:
        if v1:
            layer = net.layers.add(name=x["name"], type=enum.values_by_name[V1[x["type"]]].number)
        else:
            layer = net.layer.add(name=x["name"], type=x["type"])
        layer.bottom.append(x["bottom"])
        layer.top.append(x["top"])
        for array in weights.get(x["name"], []):
            blob = layer.blobs.add()
            if legacy:  # Caffe's old 4-D form: a bias is (1, 1, 1, N), an fc weight (1, 1, N, K)
                dims = (1,) * (4 - array.ndim) + array.shape
                blob.num, blob.channels, blob.height, blob.width = dims
            else:
                blob.shape.dim.extend(array.shape)
            blob.data.extend(array.ravel().tolist())
    path.write_bytes(net.SerializeToString())
    return path


def write_net(tmp: Path, stem: str = "net", *, lrn_first: bool = False, v1: bool = False,
              legacy: bool = False, mean: tuple | None = None, seed: int = 0,
              weights: dict | None = None) -> tuple[Path, Path, dict]:  # fmt: skip
    layers = caffenet_layers(lrn_first)
    weights = weights if weights is not None else random_weights(seed)
    proto = tmp / f"{stem}.prototxt"
    proto.write_text(prototxt_text(layers, v1=v1, mean=mean))
    model = write_caffemodel(tmp / f"{stem}.caffemodel", layers, weights, v1=v1, legacy=legacy)
    return proto, model, weights


# ------------------------------------------------------------- the independent reference


def caffe_conv(x: torch.Tensor, w: np.ndarray, b: np.ndarray, stride: int, pad: int,
               group: int) -> torch.Tensor:  # fmt: skip
    """Caffe's grouped convolution: group g maps input channels [g*C/G, (g+1)*C/G) to output
    channels [g*N/G, (g+1)*N/G)."""
    wt, bt = torch.from_numpy(w).double(), torch.from_numpy(b).double()
    cin, n = x.shape[1] // group, wt.shape[0] // group
    parts = [
        F.conv2d(x[:, g * cin : (g + 1) * cin], wt[g * n : (g + 1) * n], bt[g * n : (g + 1) * n],
                 stride=stride, padding=pad)
        for g in range(group)
    ]  # fmt: skip
    return torch.cat(parts, 1)


def caffe_max_pool(x: torch.Tensor, k: int = 3, s: int = 2, pad: int = 0) -> torch.Tensor:
    """pooling_layer.cpp's MAX: ceil output size, each window's max over its in-image part
    (done here as the max over the k*k window offsets of a -inf padded map)."""
    h, w = x.shape[-2:]
    sizes = []
    for n in (h, w):
        out = int(math.ceil((n + 2 * pad - k) / s)) + 1
        if pad and (out - 1) * s >= n + pad:
            out -= 1
        sizes.append(out)
    oh, ow = sizes
    extra_h, extra_w = (oh - 1) * s + k - h - pad, (ow - 1) * s + k - w - pad
    padded = F.pad(x, (pad, max(extra_w, 0), pad, max(extra_h, 0)), value=-math.inf)
    y = torch.full((*x.shape[:2], oh, ow), -math.inf, dtype=x.dtype)
    for di in range(k):
        for dj in range(k):
            window = padded[:, :, di : di + (oh - 1) * s + 1 : s, dj : dj + (ow - 1) * s + 1 : s]
            y = torch.maximum(y, window)
    return y


def caffe_lrn(x: torch.Tensor, n: int = 5, alpha: float = 1e-4, beta: float = 0.75,
              k: float = 1.0) -> torch.Tensor:  # fmt: skip
    """lrn_layer.cpp ACROSS_CHANNELS: x * (k + alpha/n * sum of x^2 over channels
    c - (n-1)/2 .. c + (n-1)/2, zero outside)^-beta."""
    half = (n - 1) // 2
    sq = F.pad(x**2, (0, 0, 0, 0, half, half))  # zeros beyond the first and last channel
    window = sum(sq[:, i : i + x.shape[1]] for i in range(n))
    return x * (k + alpha / n * window) ** -beta


def caffe_pool5(rgb: np.ndarray, weights: dict, mean_bgr=MEAN, lrn_first=False,
                use_lrn=True) -> torch.Tensor:  # fmt: skip
    """CaffeNet's pool5 on an (H, W, 3) uint8 RGB image, the way Caffe computes it."""
    bgr = rgb[:, :, ::-1].astype(np.float64) - np.asarray(mean_bgr)
    x = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))[None]
    for i, (name, _k, s, p, g, _n) in enumerate(CONVS, start=1):
        x = torch.relu(caffe_conv(x, *weights[name], stride=s, pad=p, group=g))
        if i in (1, 2):
            if lrn_first:
                x = caffe_max_pool(caffe_lrn(x) if use_lrn else x)
            else:
                x = caffe_max_pool(x)
                x = caffe_lrn(x) if use_lrn else x
    return caffe_max_pool(x)


def bench_pool5(weights_path: Path, rgb: np.ndarray) -> torch.Tensor:
    """pool5 of the loaded encoder on the image fed in its own input convention."""
    enc, _ = load_encoder(weights_path)
    with torch.no_grad():
        return enc.eval()(enc.convention.normalise_hwc(rgb)[None]).double()


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


def make_image(size: int = 227) -> np.ndarray:
    """A deterministic image whose three channels differ (so a missed BGR flip shows)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(5)
    img = np.stack([255 * xx, 255 * yy, 128 + 100 * np.sin(9 * xx * yy)], -1)
    img = img + rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def voc_image(shared_data: Path) -> np.ndarray:
    jpgs = sorted((shared_data / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))
    if not jpgs:
        pytest.skip("no VOC2007 JPEGs in the shared data")
    with Image.open(jpgs[0]) as im:
        return np.array(im.convert("RGB").resize((227, 227), Image.BILINEAR))


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("v1", [False, True], ids=["layer", "v1-layers"])
@pytest.mark.parametrize("lrn_first", [False, True], ids=["caffenet", "bvlc-alexnet"])
def test_import_gives_caffes_pool5(tmp_path, v1, lrn_first):
    proto, model, weights = write_net(tmp_path, v1=v1, lrn_first=lrn_first)
    out = import_caffe(proto, model, tmp_path / "out" / "encoder.safetensors")
    card = json.loads((tmp_path / "out" / "encoder.card.json").read_text())
    assert card["arch"] == ("bvlc-alexnet" if lrn_first else "caffenet")
    assert card["imported"] is True and card["method"] == "net"
    assert card["caffe_mean_bgr"] == list(MEAN) and card["caffe_mean_source"] == "default"
    img = make_image()
    got = bench_pool5(out, img)
    want = caffe_pool5(img, weights, lrn_first=lrn_first)
    assert got.shape == (1, 256, 6, 6)
    assert close(got, want), float((got - want).abs().max() / want.abs().max())


def test_the_comparison_can_fail():
    """LRN, its order and the channel order each move pool5 far beyond the tolerance, so a
    wrong import of any of them would fail the test above."""
    weights, img = random_weights(0), make_image()
    want = caffe_pool5(img, weights)
    assert not close(want, caffe_pool5(img, weights, lrn_first=True), 1e-2)
    assert not close(want, caffe_pool5(img, weights, use_lrn=False), 1e-2)
    assert not close(want, caffe_pool5(img[:, :, ::-1], weights), 1e-2)


def test_real_voc_image(tmp_path, voc_image):
    proto, model, weights = write_net(tmp_path, seed=3)
    out = import_caffe(proto, model, tmp_path / "e.safetensors", method="imagenet")
    got, want = bench_pool5(out, voc_image), caffe_pool5(voc_image, weights)
    assert close(got, want), float((got - want).abs().max() / want.abs().max())
    assert json.loads((tmp_path / "e.card.json").read_text())["method"] == "imagenet"


def test_random_baseline_on_a_real_voc_image_is_caffes_forward_pass(shared_data):
    """The N(0, 0.01) baseline, fed a real VOC image by the probes' pipeline in its input
    convention, gives the pool5 of Caffe's forward pass with the same weights on Caffe's input
    (so its scale is Caffe's: tests/test_input_convention.py measures how far it moved)."""
    import cv2

    from benchmark.datasets.folder import load_rgb
    from transfer.probes.features import preprocess, scale_shorter

    jpgs = sorted((shared_data / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:2]
    if not jpgs:
        pytest.skip("no VOC2007 JPEGs in the shared data")
    torch.manual_seed(0)
    enc, _ = load_encoder(None)
    state = {k: v.numpy() for k, v in enc.state_dict().items()}
    weights = {name: [state[f"features.{i}.weight"], state[f"features.{i}.bias"]]
               for (name, *_), i in zip(CONVS, (0, 3, 6, 8, 10))}  # fmt: skip
    for path in jpgs:
        rgb = scale_shorter(np.asarray(load_rgb(path), dtype=np.float32), 256)
        rgb = cv2.resize(rgb, (227, 227))
        with torch.no_grad():
            got = enc.eval()(preprocess(path, 227, 256, enc.convention)[None]).double()
        want = caffe_pool5(rgb, weights)
        assert close(got, want), float((got - want).abs().max() / want.abs().max())


def test_ceil_pooling_at_231_matches_caffe(tmp_path):
    # At 231 px conv1 gives 56 columns: Caffe pools them to 28 (floor rounding: 27).
    proto, model, weights = write_net(tmp_path, seed=1)
    out = import_caffe(proto, model, tmp_path / "e.safetensors")
    img = make_image(231)
    got, want = bench_pool5(out, img), caffe_pool5(img, weights)
    assert want.shape == (1, 256, 7, 7)
    assert close(got, want)


def test_mean_value_from_the_prototxt_is_folded(tmp_path):
    mean = (110.0, 100.0, 90.0)
    proto, model, weights = write_net(tmp_path, mean=mean, seed=2)
    spec = read_prototxt(proto)
    assert spec.mean_bgr == mean and spec.mean_source == "prototxt"
    assert [x.name for x in spec.layers][:2] == [
        "data_test",
        "conv1",
    ]  # the TRAIN data layer dropped
    out = import_caffe(proto, model, tmp_path / "e.safetensors")
    img = make_image()
    assert close(bench_pool5(out, img), caffe_pool5(img, weights, mean_bgr=mean))
    assert not close(caffe_pool5(img, weights), caffe_pool5(img, weights, mean_bgr=mean), 1e-3)


def test_v1_prototxt_with_data_layers(tmp_path):
    proto, model, weights = write_net(tmp_path, v1=True, mean=(1.0, 2.0, 3.0))
    spec = read_prototxt(proto)
    assert spec.arch == "caffenet" and spec.mean_bgr == (1.0, 2.0, 3.0)
    assert spec.encoder == ("conv1", "conv2", "conv3", "conv4", "conv5")
    assert spec.head == ("fc6", "fc7")


def test_legacy_blob_dims_read_the_same_as_shape(tmp_path):
    weights = random_weights(4)
    layers = caffenet_layers()
    a = read_caffemodel(write_caffemodel(tmp_path / "a.caffemodel", layers, weights))
    b = read_caffemodel(write_caffemodel(tmp_path / "b.caffemodel", layers, weights, legacy=True))
    assert a.keys() == b.keys() == weights.keys()
    assert a["conv2"][0].shape == (256, 48, 5, 5) and b["conv2"][1].shape == (1, 1, 1, 256)
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert np.array_equal(x.ravel(), y.ravel())
    proto, model, _ = write_net(tmp_path, "legacy", legacy=True, weights=weights)
    legacy = caffe_weights(proto, model)
    current = caffe_weights(*write_net(tmp_path, "current", weights=weights)[:2])
    for key, value in current.state.items():
        assert torch.equal(value, legacy.state[key])
    for key, value in current.head.items():
        assert torch.equal(value, legacy.head[key])


def test_fc6_fc7_are_returned_separately(tmp_path):
    proto, model, weights = write_net(tmp_path)
    w = caffe_weights(proto, model)
    assert set(w.head) == {"fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias"}
    assert np.array_equal(w.head["fc6.weight"].numpy(), weights["fc6"][0])
    assert np.array_equal(w.head["fc7.bias"].numpy(), weights["fc7"][1])
    out = import_caffe(proto, model, tmp_path / "out.safetensors")
    from safetensors.torch import load_file

    head = load_file(str(tmp_path / "out-fc.safetensors"))
    assert torch.equal(head["fc6.weight"], w.head["fc6.weight"])
    assert json.loads((tmp_path / "out.card.json").read_text())["head_file"] == "out-fc.safetensors"
    enc, card = load_encoder(out)
    # Caffe's fc6 on flattened pool5, in torch layout
    img = make_image()
    fc6 = torch.relu(F.linear(bench_pool5(out, img).flatten(1), w.head["fc6.weight"].double(),
                              w.head["fc6.bias"].double()))  # fmt: skip
    want = torch.relu(caffe_pool5(img, weights).flatten(1) @ torch.from_numpy(weights["fc6"][0])
                      .double().T + torch.from_numpy(weights["fc6"][1]).double())  # fmt: skip
    assert close(fc6, want)


def test_fc_layers_stored_as_convolutions(tmp_path):
    """FCN-style nets hold fc6 as a 6x6 convolution and fc7 as a 1x1 one."""
    layers = caffenet_layers()
    for x in layers:
        if x["name"] in ("fc6", "fc7"):
            n = dict(FC)[x["name"]]
            k = 6 if x["name"] == "fc6" else 1
            x["type"] = "Convolution"
            x["params"] = f"convolution_param {{ num_output: {n} kernel_size: {k} }}"
    weights = random_weights()
    conv_weights = dict(weights)
    conv_weights["fc6"] = [weights["fc6"][0].reshape(24, 256, 6, 6), weights["fc6"][1]]
    conv_weights["fc7"] = [weights["fc7"][0].reshape(16, 24, 1, 1), weights["fc7"][1]]
    proto = tmp_path / "fcn.prototxt"
    proto.write_text(prototxt_text(layers))
    model = write_caffemodel(tmp_path / "fcn.caffemodel", layers, conv_weights)
    spec = read_prototxt(proto)
    assert spec.head == ("fc6", "fc7") and spec.head_kinds == ("Convolution", "Convolution")
    head = caffe_weights(proto, model).head
    assert np.array_equal(head["fc6.weight"].numpy(), weights["fc6"][0])
    assert np.array_equal(head["fc7.weight"].numpy(), weights["fc7"][0])


def test_card_records_sources_and_convention(tmp_path):
    proto, model, _ = write_net(tmp_path, "ce_features")
    out = import_caffe(proto, model, tmp_path)  # a folder: encoder.safetensors inside
    assert out == tmp_path / "encoder.safetensors"
    enc, card = load_encoder(tmp_path)
    assert card["method"] == "ce_features" and enc.arch == "caffenet"
    import hashlib

    assert card["source_files"]["caffemodel"] == {
        "name": "ce_features.caffemodel", "sha256": hashlib.sha256(model.read_bytes()).hexdigest()
    }  # fmt: skip
    assert card["source_files"]["prototxt"]["name"] == "ce_features.prototxt"
    assert card["input_convention"] == CAFFE.as_dict() and card["pool_free"] is False
    assert card["input_convention_loaded"] == "caffe" and "convention_note" not in card
    with pytest.raises(BenchError, match="exists"):
        import_caffe(proto, model, tmp_path)
    import_caffe(proto, model, tmp_path, method="context-encoder", force=True)
    assert load_encoder(tmp_path)[1]["method"] == "context-encoder"


def test_load_encoder_reads_a_caffemodel_beside_its_prototxt(tmp_path):
    proto, model, weights = write_net(tmp_path, "bvlc_reference_caffenet")
    enc, card = load_encoder(model)
    assert card["method"] == "bvlc_reference_caffenet" and card["imported"] is True
    assert peek_card(model)["method"] == "bvlc_reference_caffenet"
    img = make_image()
    with torch.no_grad():
        got = enc.eval()(CAFFE.normalise_hwc(img)[None]).double()
    assert close(got, caffe_pool5(img, weights))
    proto.unlink()
    with pytest.raises(BenchError, match="bench import caffe") as err:
        load_encoder(model)
    assert "bvlc_reference_caffenet.prototxt" in str(err.value)


@pytest.mark.parametrize("target", [CAFFE, TORCHVISION], ids=lambda c: c.name)
def test_fold_is_exact_on_a_conv1_alone(target):
    """A prototxt's (p - mean) * scale input folded into a conv1 taking `target`'s input,
    checked against the input written out by hand."""
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 3, 11, 11)), rng.standard_normal(4)
    fw, fb = fold_conv1(w, b, caffe_transform((100.0, 110.0, 120.0), 0.5), target)
    img = rng.integers(0, 256, (23, 23, 3)).astype(np.uint8)
    x_caffe = (img[:, :, ::-1].astype(np.float64) - [100.0, 110.0, 120.0]) * 0.5
    want = F.conv2d(torch.from_numpy(x_caffe.transpose(2, 0, 1).copy())[None],
                    torch.from_numpy(w), torch.from_numpy(b), stride=4)  # fmt: skip
    x = target.normalise_hwc(img.astype(np.float64))[None]
    got = F.conv2d(x, torch.from_numpy(fw), torch.from_numpy(fb), stride=4)
    assert close(got, want, 1e-12)


def test_the_usual_mean_and_scale_import_conv1_unchanged(tmp_path):
    """A prototxt with Caffe's (104, 117, 123) and scale 1 is the encoder's own convention:
    conv1 is Caffe's blob, bit for bit."""
    proto, model, weights = write_net(tmp_path)
    state = caffe_weights(proto, model).state
    assert np.array_equal(state["features.0.weight"].numpy(), weights["conv1"][0])
    assert np.array_equal(state["features.0.bias"].numpy(), weights["conv1"][1])


# ------------------------------------------------------------------------ refusals


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_unknown_layer_between_convs_is_refused(tmp_path):
    layers = caffenet_layers(extra_after="conv3")
    proto = tmp_path / "x.prototxt"
    proto.write_text(prototxt_text(layers))
    with pytest.raises(BenchError) as err:
        read_prototxt(proto)
    msg = _one_line(err)
    assert "'weird'" in msg and "Sigmoid" in msg and "x.prototxt" in msg


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("num_output: 96 kernel_size: 11", "num_output: 96 kernel_size: 7", "'conv1'"),
        ("kernel_size: 11 stride: 4", "kernel_size: 11 stride: 4 pad: 2", "'conv1'"),
        ("num_output: 256 kernel_size: 5 stride: 1 pad: 2 group: 2",
         "num_output: 256 kernel_size: 5 stride: 1 pad: 2", "'conv2'"),
        ("local_size: 5 alpha: 0.0001", "local_size: 3 alpha: 0.0001", "'norm1'"),
        ("pool: MAX kernel_size: 3 stride: 2 }", "pool: AVE kernel_size: 3 stride: 2 }", "'pool1'"),
    ],
)  # fmt: skip
def test_unrepresentable_parameters_are_refused(tmp_path, old, new, named):
    text = prototxt_text(caffenet_layers())
    assert old in text
    proto = tmp_path / "x.prototxt"
    proto.write_text(text.replace(old, new, 1))
    with pytest.raises(BenchError) as err:
        read_prototxt(proto)
    assert named in _one_line(err)


def test_mean_file_is_refused(tmp_path):
    text = prototxt_text(caffenet_layers(), mean=MEAN)
    proto = tmp_path / "x.prototxt"
    proto.write_text(text.replace("mean_value: 104.0", 'mean_file: "mean.binaryproto"'))
    with pytest.raises(BenchError, match="mean_file") as err:
        read_prototxt(proto)
    _one_line(err)


def test_bad_prototxt_syntax(tmp_path):
    proto = tmp_path / "x.prototxt"
    proto.write_text("layer { name: 'conv1' ")
    with pytest.raises(BenchError, match="x.prototxt") as err:
        read_prototxt(proto)
    _one_line(err)


def test_truncated_caffemodel(tmp_path):
    proto, model, _ = write_net(tmp_path)
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    with pytest.raises(BenchError) as err:
        caffe_weights(proto, model)
    assert "net.caffemodel" in _one_line(err)


def test_random_bytes_are_not_a_caffemodel(tmp_path):
    path = tmp_path / "noise.caffemodel"
    for seed in range(5):
        path.write_bytes(np.random.default_rng(seed).bytes(5000))
        with pytest.raises(BenchError) as err:
            read_caffemodel(path)
        assert "noise.caffemodel" in _one_line(err)
    path.write_bytes(b"")
    with pytest.raises(BenchError, match="not a Caffe NetParameter"):
        read_caffemodel(path)


def test_blob_of_the_wrong_shape_names_the_layer(tmp_path):
    weights = random_weights()
    weights["conv4"][0] = weights["conv4"][0][:, :96].copy()  # ungrouped layout cut short
    proto, model, _ = write_net(tmp_path, weights=weights)
    with pytest.raises(BenchError) as err:
        caffe_weights(proto, model)
    msg = _one_line(err)
    assert "'conv4'" in msg and "[384, 192, 3, 3]" in msg


def test_missing_layer_in_the_caffemodel(tmp_path):
    weights = random_weights()
    del weights["conv3"]
    proto, model, _ = write_net(tmp_path, weights=weights)
    with pytest.raises(BenchError, match="'conv3'") as err:
        caffe_weights(proto, model)
    _one_line(err)


def test_nan_in_a_caffemodel_is_named(tmp_path):
    weights = random_weights()
    weights["conv5"][1][7] = np.nan
    _, model, _ = write_net(tmp_path, weights=weights)
    with pytest.raises(BenchError, match="features.10.bias") as err:
        load_encoder(model)
    _one_line(err)


@pytest.mark.slow
def test_an_imported_caffemodel_transfers_to_every_task_and_exports(tmp_path, synth_root):
    """`bench import caffe` output is weights like any other: one iteration of
    classification, detection and segmentation on the synthetic data, and the exports to
    detectron2 and mmseg, all from the imported file."""
    import json

    from bench import cli
    from benchmark.safe_pickle import safe_load

    (tmp_path / "src").mkdir()
    proto, model, _ = write_net(tmp_path / "src", "ce_features")
    imported = tmp_path / "imported"
    argv = ["import", "caffe", "--prototxt", str(proto), "--caffemodel", str(model),
            "--method", "context-encoder", "--out", str(imported)]  # fmt: skip
    assert cli.main(argv) == 0
    weights = imported / "encoder.safetensors"
    small = {
        "classification": ["--set", "hidden=16", "--set", "augment.crop=67",
                           "--set", "augment.scale=[0.5,0.7]", "--set", "train.batch_size=2"],
        "detection": ["--set", "fc_dim=16", "--set", "scales=[160]", "--set", "max_size=256",
                      "--set", "test_scale=160", "--set", "test_max_size=256",
                      "--set", "ss_min_box=8", "--set", "train.rois_per_batch=16"],
        "segmentation": ["--set", "fc_dim=8", "--set", "max_size=48", "--set", "eval_images=2"],
    }  # fmt: skip
    for task, extra in small.items():
        argv = ["transfer", "--task", task, "--weights", str(weights), "--data", str(synth_root),
                "--iterations", "1", "--device", "cpu", "--name", task, "--set", "train.workers=0",
                "--out", str(tmp_path / "out"), *extra]  # fmt: skip
        assert cli.main(argv) == 0, task
        metrics = json.loads((tmp_path / "out" / "runs" / task / "metrics.json").read_text())
        assert metrics["method"] == "context-encoder" and metrics["imported"] is True, task
    encoder = load_encoder(weights)[0].state_dict()
    for fmt, suffix in (("detectron2", "pkl"), ("mmseg", "pth")):
        out = tmp_path / f"encoder_{fmt}.{suffix}"  # its own card: encoder_<fmt>.card.json
        assert cli.main(["export", str(imported), "--format", fmt, "--out", str(out)]) == 0
        if fmt == "detectron2":
            model = safe_load(out)["model"]  # detectron2's pickle: numpy arrays only
            got = torch.from_numpy(model["backbone.features.0.weight"])
        else:
            got = torch.load(out, weights_only=True)["state_dict"]["backbone.features.0.weight"]
        assert torch.equal(got, encoder["features.0.weight"]), fmt
