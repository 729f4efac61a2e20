"""benchmark.input_convention: the two conventions by hand, every fold to 1e-5 in float64,
old-convention weights, and what Caffe's scale changes on real VOC images."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.checkpoint import check_checkpoint, make_checkpoint
from benchmark.errors import BenchError
from benchmark.input_convention import (
    CAFFE,
    TORCHVISION,
    InputConvention,
    caffe_transform,
    saved_convention,
)
from encoders.alexnet import ARCHS, AlexNetEncoder, refold_conv1
from pretrain.context_encoder import ContextEncoder
from pretrain.data import PretrainImages
from pretrain.losses import masked_l1, masked_l2
from weights.encoder import load_encoder
from weights.native import export, write_native

TV_MEAN, TV_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
OTHERS = [
    CAFFE,
    TORCHVISION,
    caffe_transform((100.0, 110.0, 120.0), 0.5),  # a prototxt's own mean and scale
    InputConvention("odd", "RGB", (10.0, 20.0, 30.0), (2.0, 3.0, 4.0)),
]
CARD = {
    "method": "context-encoder", "mask": None, "iterations": 1, "data": None,
    "config_hash": None, "arch": "caffenet", "pool_free": False, "pretrain_seconds": 1.0,
}  # fmt: skip


def pixels(n: int = 2, size: int = 67, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size) RGB images whose channels differ."""
    return torch.from_numpy(
        np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    )


def he_caffenet(seed: int = 0) -> AlexNetEncoder:
    """A CaffeNet as pretraining starts it (He init): at Caffe's scale its LRN acts."""
    torch.manual_seed(seed)
    return ContextEncoder("caffenet", input_size=67).encoder.eval()


def close(got: torch.Tensor, want: torch.Tensor, rel: float) -> bool:
    return float((got - want).abs().max()) <= rel * float(want.abs().max())


# ------------------------------------------------------------------------------ by hand


def test_caffe_and_torchvision_inputs_by_hand():
    img = pixels(1)[0].permute(1, 2, 0).numpy()  # (H, W, 3) RGB
    caffe = CAFFE.normalise_hwc(img)
    hand = (img[:, :, ::-1].astype(np.float32) - [104, 117, 123]).transpose(2, 0, 1)
    assert caffe.dtype == torch.float32 and np.array_equal(caffe.numpy(), hand)
    tv = TORCHVISION.normalise_hwc(img)
    np.testing.assert_allclose(tv.numpy(), ((img / 255 - TV_MEAN) / TV_STD).transpose(2, 0, 1),
                               atol=1e-5)  # fmt: skip
    # the batch path (uint8 on the device) equals the worker path, also in NHWC memory
    batch = pixels(3)
    for conv in (CAFFE, TORCHVISION):
        per_image = torch.stack([conv.normalise_hwc(b.permute(1, 2, 0).numpy()) for b in batch])
        assert torch.equal(conv.normalise(batch), per_image)
        nhwc = conv.normalise(batch.contiguous(memory_format=torch.channels_last))
        assert nhwc.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(nhwc, per_image)
        assert conv.normalise(batch.double()).dtype == torch.float64


def test_denormalise_colour_and_mean_pixel():
    batch = pixels(2)
    for conv in OTHERS:
        back = conv.denormalise(conv.normalise(batch)) * 255
        assert float((back - batch.float()).abs().max()) < 1e-3
        rgb = [0.2, 0.5, 0.9]
        one = torch.tensor([[[255 * v]] for v in rgb], dtype=torch.float64)
        torch.testing.assert_close(conv.colour(rgb), conv.normalise(one).flatten().float())
    # Caffe's integer mean is a pixel: padding with it is exactly Caffe's zero padding
    assert CAFFE.mean_rgb8().tolist() == [123, 117, 104]
    assert float(CAFFE.normalise_hwc(CAFFE.mean_rgb8()[None, None]).abs().max()) == 0.0
    assert TORCHVISION.mean_rgb8().tolist() == [124, 116, 104]
    # per channel, a difference of inputs on the [-1, 1] pixel scale
    torch.testing.assert_close(CAFFE.unit_scale(), torch.full((3,), 1 / 127.5))
    torch.testing.assert_close(TORCHVISION.unit_scale(), torch.tensor(TV_STD * 2).float())


def test_cards_name_their_convention_and_old_cards_mean_torchvision():
    assert saved_convention({}, "f") is TORCHVISION  # written before cards said
    old_import = "bench: RGB (x/255 - PIXEL_MEAN)/PIXEL_STD; Caffe's BGR ... folded into conv1"
    assert saved_convention({"input_convention": old_import}, "f") is TORCHVISION
    for conv in OTHERS:
        card = json.loads(json.dumps({"input_convention": conv.as_dict()}))  # through a file
        assert saved_convention(card, "f") == conv
    assert saved_convention({"input_convention": "caffe"}, "f") is CAFFE
    for bad in ("bgr", {"name": "x", "channels": "GBR", "mean": [0, 0, 0], "std": [1, 1, 1]},
                {"name": "x", "channels": "RGB", "mean": [0, 0], "std": [1, 1, 1]},
                {"name": "x", "channels": "RGB", "mean": [0, 0, 0], "std": [1, 0, 1]}):  # fmt: skip
        with pytest.raises(BenchError, match="w.safetensors: model card's input_convention"):
            saved_convention({"input_convention": bad}, "w.safetensors")
    # which arch takes which: Caffe's for the Caffe-era nets
    assert {a: s.convention.name for a, s in ARCHS.items()} == {
        "caffenet": "caffe", "bvlc-alexnet": "caffe", "alexnet-plain": "torchvision",
        "torchvision": "torchvision",
    }  # fmt: skip


# -------------------------------------------------------------------------------- folds


@pytest.mark.parametrize(
    "source,target",
    [(s, t) for s, t in itertools.permutations(OTHERS, 2)],
    ids=lambda c: c.name,
)
def test_every_fold_gives_the_same_encoder_float64(source, target):
    """The encoder with conv1 folded, on `target` input, equals the original on `source`
    input of the same pixels (through LRN, groups and ceil pooling), to 1e-5 in float64."""
    enc = he_caffenet().double()
    folded = AlexNetEncoder("caffenet").double().eval()
    folded.load_state_dict(refold_conv1(enc.state_dict(), "caffenet", source, target))
    px = pixels(2).double()
    with torch.no_grad():
        want = enc(source.normalise(px))
        got = folded(target.normalise(px))
    assert float(want.abs().max()) > 0
    assert close(got, want, 1e-5), float((got - want).abs().max() / want.abs().max())
    for key, value in enc.state_dict().items():  # only conv1 moves
        if not key.startswith("features.0."):
            assert torch.equal(folded.state_dict()[key], value)


def test_the_fold_matters_and_padded_conv1_refuses():
    enc, px = he_caffenet().double(), pixels(2).double()
    with torch.no_grad():
        right = enc(CAFFE.normalise(px))
        assert not close(enc(TORCHVISION.normalise(px)), right, 0.1)
        assert not close(enc(CAFFE.normalise(px.flip(1))), right, 0.01)  # RGB fed as BGR
    state = AlexNetEncoder("torchvision").state_dict()
    assert refold_conv1(state, "torchvision", TORCHVISION, TORCHVISION).keys() == state.keys()
    with pytest.raises(ValueError, match="pads conv1 by 2"):
        refold_conv1(state, "torchvision", TORCHVISION, CAFFE)


# ------------------------------------------------------------------- old weights, exports


@pytest.mark.parametrize("saved", [None, TORCHVISION.as_dict()], ids=["no-key", "torchvision"])
def test_old_convention_caffenet_weights_load_folded(tmp_path, caplog, saved):
    """A CaffeNet file made when every stage fed torchvision's input (its card has no
    input_convention, or says torchvision's) loads with the conversion folded into conv1:
    on Caffe's input it computes what it computed on torchvision's, and it says so."""
    src = he_caffenet()
    card = dict(CARD) if saved is None else {**CARD, "input_convention": saved}
    path = write_native(tmp_path / "encoder.safetensors", src.state_dict(), card)
    with caplog.at_level(logging.INFO, logger="bench"):
        enc, got = load_encoder(path)
    assert got["input_convention"] == CAFFE.as_dict()
    assert got["input_convention_loaded"] == "torchvision"
    assert "folded into conv1" in got["convention_note"] and "folded into conv1" in caplog.text
    px = pixels(2)
    with torch.no_grad():
        assert close(enc.eval()(CAFFE.normalise(px)), src(TORCHVISION.normalise(px)), 1e-4)
    # a file that says Caffe's loads untouched
    path = write_native(tmp_path / "new.safetensors", src.state_dict(),
                        {**CARD, "input_convention": CAFFE.as_dict()})  # fmt: skip
    enc, got = load_encoder(path)
    assert got["input_convention_loaded"] == "caffe" and "convention_note" not in got
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in enc.state_dict().items())


def test_torchvision_export_takes_torchvision_input_and_loads_back(tmp_path):
    src = he_caffenet()
    run = tmp_path / "run"
    run.mkdir()
    write_native(run / "encoder.safetensors", src.state_dict(),
                 {**CARD, "input_convention": CAFFE.as_dict()})  # fmt: skip
    out = export(run, "torchvision")
    tv = AlexNetEncoder("caffenet").double().eval()
    tv.load_state_dict(torch.load(out, weights_only=True))
    px = pixels(2).double()
    with torch.no_grad():
        want = src.double()(CAFFE.normalise(px))
        assert close(tv(TORCHVISION.normalise(px)), want, 1e-5)
    # bench reads the .pth as torchvision's (no card travels with it) and folds it back
    enc, card = load_encoder(out)
    assert enc.arch == "caffenet" and card["input_convention_loaded"] == "torchvision"
    with torch.no_grad():
        assert close(enc.double().eval()(CAFFE.normalise(px)), want, 1e-5)


# -------------------------------------------------------------------- checkpoints, losses


def test_a_checkpoint_made_for_another_input_is_not_resumed():
    old = make_checkpoint(stage="s", config={}, iteration=3, seconds=1.0, state={})
    assert "input_convention" not in old  # as every checkpoint before conventions
    with pytest.raises(BenchError, match="'torchvision' input, this run feeds 'caffe'"):
        check_checkpoint(old, "s", "last.pt", "caffe")
    assert check_checkpoint(old, "s", "last.pt", "torchvision") is old
    new = make_checkpoint(stage="s", config={}, iteration=3, seconds=1.0, state={},
                          input_convention="caffe")  # fmt: skip
    assert check_checkpoint(new, "s", "last.pt", "caffe") is new
    assert check_checkpoint(new, "s", "last.pt") is new  # stages without an encoder


def test_reconstruction_loss_reads_unit_range_pixels_whatever_the_convention():
    torch.manual_seed(0)
    px, pred_px = pixels(2, 12, 1).double(), pixels(2, 12, 2).double()
    mask = (torch.rand(2, 1, 12, 12) < 0.3).float()
    unit = (px / 127.5 - 1, pred_px / 127.5 - 1)
    for loss in (masked_l2, masked_l1):
        want = loss(unit[1], unit[0], mask, 2, 10.0)
        for conv in (CAFFE, TORCHVISION):
            got = loss(conv.normalise(pred_px), conv.normalise(px), mask, 2, 10.0,
                       conv.unit_scale())  # fmt: skip
            assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_pretraining_images_and_fill_are_in_the_encoders_convention(tmp_path):
    colour = (200, 100, 50)
    Image.new("RGB", (80, 70), colour).save(tmp_path / "a.png")
    for conv, want in ((CAFFE, [50 - 104, 100 - 117, 200 - 123]),
                       (TORCHVISION, (np.array(colour) / 255 - TV_MEAN) / TV_STD)):  # fmt: skip
        item = PretrainImages([tmp_path / "a.png"], 64, conv, seed=0)[(0, 0)]
        assert item["image"].shape == (3, 64, 64)
        np.testing.assert_allclose(item["image"][:, 10, 10].numpy(), want, atol=1e-4)
        fill = conv.colour([c / 255 for c in colour])  # the dataset mean of a one-colour set
        np.testing.assert_allclose(fill.numpy(), want, atol=1e-4)


# ------------------------------------------------------------------------ real VOC images


def _voc_paths(shared_data, n: int = 12):
    paths = sorted((shared_data / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:n]
    if len(paths) < n:
        pytest.skip("too few VOC2007 JPEGs in the shared data")
    return paths


def lrn_ratios(encoder: AlexNetEncoder, x: torch.Tensor) -> tuple[float, float]:
    """Mean LRN output / input over the positive inputs of LRN1 and LRN2 (the divisor LRN
    applies, averaged), on one batch."""
    ratios = []

    def hook(module, inputs, output):
        pos = inputs[0] > 0
        ratios.append(float((output[pos] / inputs[0][pos]).mean()))

    handles = [encoder.features[i].norm.register_forward_hook(hook) for i in (2, 5)]
    with torch.no_grad():
        encoder(x)
    for h in handles:
        h.remove()
    return ratios[0], ratios[1]


def test_caffenet_lrn_acts_as_in_caffe_on_real_voc_images(shared_data):
    """The default CaffeNet as pretraining starts it, fed real VOC crops by the pretraining
    pipeline: its LRN layers divide their input as at Caffe's scale (about 0.67 and 0.77),
    where torchvision's scale made them the identity (0.9998)."""
    paths = _voc_paths(shared_data)
    torch.manual_seed(0)
    encoder = ContextEncoder("caffenet").encoder.eval()

    def batch(conv: InputConvention) -> torch.Tensor:
        ds = PretrainImages(paths, 227, conv, flip=False, seed=0)
        return torch.stack([ds[(i, i)]["image"] for i in range(len(paths))])

    lrn1, lrn2 = lrn_ratios(encoder, batch(encoder.convention))
    assert encoder.convention is CAFFE
    assert 0.6 < lrn1 < 0.75 and 0.7 < lrn2 < 0.85, (lrn1, lrn2)
    old1, old2 = lrn_ratios(encoder, batch(TORCHVISION))
    assert old1 > 0.999 and old2 > 0.999, (old1, old2)


def test_random_baseline_pool5_has_caffes_scale_on_real_voc_images(shared_data):
    """The N(0, 0.01) baseline, fed real VOC images by the probes' pipeline: its pool5 is
    ~56x what torchvision's scale gave (the equality with Caffe's own forward pass is in
    test_caffe_import.py)."""
    from transfer.probes.features import preprocess

    paths = _voc_paths(shared_data)
    torch.manual_seed(0)
    encoder, card = load_encoder(None)
    assert card["input_convention"] == CAFFE.as_dict()
    with torch.no_grad():
        new = encoder(torch.stack([preprocess(p, 227, 256, CAFFE) for p in paths])).mean()
        old = encoder(torch.stack([preprocess(p, 227, 256, TORCHVISION) for p in paths])).mean()
    assert 0.05 < float(new) < 0.5, float(new)
    assert 40 < float(new / old) < 75, float(new / old)


def test_framework_backends_are_configured_with_the_encoders_convention():
    """mmseg loads images BGR and detectron2 reads them in INPUT.FORMAT: both are told the
    encoder's convention in their own keys (built without either installed)."""
    from transfer.segmentation.config import SegmentationConfig
    from transfer.segmentation.mmseg_backend import model_config

    pre = model_config(SegmentationConfig(), "caffenet", False)["data_preprocessor"]
    assert (pre["mean"], pre["std"], pre["bgr_to_rgb"]) == ([104, 117, 123], [1, 1, 1], False)
    pre = model_config(SegmentationConfig(), "torchvision", False)["data_preprocessor"]
    assert pre["bgr_to_rgb"] is True
    np.testing.assert_allclose(pre["mean"], 255 * TV_MEAN)
    np.testing.assert_allclose(pre["std"], 255 * TV_STD)
