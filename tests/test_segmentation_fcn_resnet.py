"""FCN on a dilated ResNet for ResNet encoders: output stride 8 with the encoder's own
tensors, mmseg's schedule, loss, resizing and crops, the aug list, and a whole run on the
synthetic VOC2012 + aug killed and resumed bit-identically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_detection_faster_rcnn import straight_killed_resumed

from benchmark.config import from_dict
from encoders.resnet import ResNetEncoder
from transfer.segmentation.config import FCNResNetConfig, SegmentationConfig
from transfer.segmentation.fcn_resnet import FCNResNet, dilated_resnet, poly_lr, seg_loss
from transfer.segmentation.fcn_resnet_train import (
    CropSet,
    aug_ids,
    crop_box,
    rescale_size,
    train_samples,
)
from transfer.segmentation.train import check


def tiny_encoder() -> ResNetEncoder:
    torch.manual_seed(0)
    return ResNetEncoder((1, 1, 1, 1), 8)


def test_dilated_backbone_keeps_stride_8_and_the_encoders_tensors():
    enc = tiny_encoder().eval()
    net = dilated_resnet(enc).eval()
    assert net.layer3[0].conv2.stride == (1, 1) and net.layer4[0].conv2.dilation == (2, 2)
    for k, v in net.state_dict().items():
        assert torch.equal(v, enc.state_dict()[k]), k
    model = FCNResNet(enc, 16, 8).eval()
    res4, res5 = model.features(torch.zeros(1, 3, 64, 64))
    assert res4.shape[-2:] == res5.shape[-2:] == (8, 8)
    # up to res3 the dilated network computes what the encoder computes
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = enc.layer2(enc.layer1(enc.maxpool(enc.relu(enc.bn1(enc.conv1(x))))))
        b = net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))
    assert torch.equal(a, b)
    assert model(x, out_size=(50, 70)).shape == (1, 21, 50, 70)


def test_poly_schedule_and_loss_over_every_pixel():
    assert poly_lr(0.01, 1e-4, 0.9, 20000, 0) == pytest.approx(0.01)
    assert poly_lr(0.01, 1e-4, 0.9, 20000, 10000) == pytest.approx(0.0099 * 0.5**0.9 + 1e-4)
    logits = torch.zeros(1, 21, 2, 2)
    labels = torch.tensor([[[0, 255], [255, 255]]])
    assert seg_loss(logits, labels) == pytest.approx(np.log(21) / 4)  # avg_non_ignore False


def test_rescale_and_crop_follow_mmcv_and_mmseg():
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)
    assert rescale_size(100, 3000, (2048, 512)) == (68, 2048)  # the long bound wins
    label = np.zeros((100, 100), np.uint8)
    label[:, 50:] = 1

    def balanced(ratio: float) -> int:
        rng, good = np.random.default_rng(0), 0
        for _ in range(40):
            y, x = crop_box(label, 40, ratio, rng)
            assert 0 <= y <= 60 and 0 <= x <= 60
            cnt = np.bincount(label[y : y + 40, x : x + 40].ravel(), minlength=2)
            good += int(cnt.max() / cnt.sum() < 0.75)
        return good

    # one draw is balanced about a third of the time; up to 11 draws almost always
    assert balanced(0.75) >= 36 and balanced(1.0) <= 24


def test_aug_list_is_derived_from_sbd_as_voc_aug_does(synth_root, tmp_path):
    voc = synth_root / "VOCdevkit" / "VOC2012"
    sbd = synth_root / "SBD" / "dataset"
    given = aug_ids(voc, sbd)
    copy = tmp_path / "VOC2012"
    shutil.copytree(voc / "ImageSets", copy / "ImageSets")
    (copy / "ImageSets" / "Segmentation" / "aug.txt").unlink()
    assert aug_ids(copy, sbd) == given and given
    samples = train_samples(voc, sbd, ("train", "aug"), [])
    assert len(samples) == len(set(s.image_id for s in samples))  # aug excludes VOC train
    assert {s.mask_path.parent.name for s in samples} == {"SegmentationClass",
                                                          "SegmentationClassAug"}  # fmt: skip


def test_crops_are_a_function_of_the_sample(synth_root):
    voc = synth_root / "VOCdevkit" / "VOC2012"
    samples = train_samples(voc, None, ("train",), [])
    c = from_dict(FCNResNetConfig, {"crop_size": 160, "scale": [128, 64]})
    ds = CropSet(samples, c, 0, ResNetEncoder.input_convention)
    img, lab = ds[(0, 5)]
    assert img.shape == (3, 160, 160) and lab.shape == (160, 160)
    assert (lab == 255).any()  # padded past the resized image
    img2, lab2 = ds[(0, 5)]
    assert torch.equal(img, img2) and torch.equal(lab, lab2)
    assert not torch.equal(ds[(0, 6)][0], img)


def test_vit_is_refused_in_one_line(tmp_path):
    pytest.importorskip("timm")
    from encoders import vit_module

    enc = vit_module().from_config({"embed_dim": 48, "depth": 1, "num_heads": 3,
                                    "patch_size": 16, "img_size": 32})  # fmt: skip
    torch.save(enc.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(Exception, match="no reference protocol for ViT"):
        check(SegmentationConfig(weights=str(tmp_path / "vit.pth")))


@pytest.mark.slow
def test_run_resumes_bit_identically(synth_root: Path, tmp_path: Path):
    torch.save(tiny_encoder().state_dict(), tmp_path / "tiny-r50.pth")
    sets = {
        "crop_size": 64, "scale": [128, 64], "channels": 16, "aux_channels": 8,
        "train.iterations": 4, "train.batch_size": 2, "train.checkpoint_every": 2,
        "train.log_every": 1, "train.workers": 0, "train.threads": 1,
    }  # fmt: skip
    args = ["transfer", "--task", "segmentation", "--data", str(synth_root), "--device", "cpu",
            "--weights", str(tmp_path / "tiny-r50.pth")]  # fmt: skip
    for k, v in sets.items():
        args += ["--set", f"fcn_resnet.{k}={json.dumps(v)}"]
    a, b = straight_killed_resumed(args, tmp_path / "results")
    runs = tmp_path / "results" / "runs"
    skip = {"command", "train_seconds", "eval_seconds", "seconds"}
    assert {k: v for k, v in a.items() if k not in skip} == {
        k: v for k, v in b.items() if k not in skip}  # fmt: skip
    assert a["model"] == "fcn-resnet-d8" and a["split"] == "voc2012-val"
    hist = np.array(a["confusion_matrix"])
    with np.errstate(invalid="ignore"):  # classes absent from the tiny val set: NaN
        iu = np.diag(hist) / (hist.sum(0) + hist.sum(1) - np.diag(hist))
    assert a["mean_iu"] == pytest.approx(float(np.nanmean(iu)))
    wa, wb = (torch.load(runs / n / "checkpoints" / "last.pt", weights_only=True)["state"]["model"]
              for n in ("straight", "cut"))  # fmt: skip
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _mmseg_pair():
    """A native FCNResNet and mmseg's fcn_r50-d8 on the same encoder, heads copied over."""
    pytest.importorskip("mmseg")
    from transfer.segmentation.mmseg_resnet import build

    torch.manual_seed(0)
    enc = ResNetEncoder((1, 1, 1, 1), 64)
    c = from_dict(FCNResNetConfig, {"channels": 16, "aux_channels": 8, "crop_size": 64})
    theirs = build(c, enc).eval()
    ours = FCNResNet(enc, 16, 8).eval()
    state = {}
    for k, v in theirs.state_dict().items():
        k = k.replace(".conv.", ".0.").replace(".bn.", ".1.")
        state[k] = v
    missing, unexpected = ours.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("data_preprocessor")}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ours, theirs


def test_mmseg_fcn_r50_d8_is_the_native_network():
    """Same weights, same logits: mmseg's ResNet (dilations 1 1 2 4, contract_dilation) and
    FCNHead / auxiliary head compute what the torchvision-built native model computes."""
    ours, theirs = _mmseg_pair()
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        feats = theirs.extract_feat(x)
        a = theirs.decode_head(feats)
        aux = theirs.auxiliary_head.forward(feats)
        ours.train(False)
        res4, res5 = ours.features(x)
        b = ours.decode_head(res5)
    assert torch.allclose(feats[2], res4, atol=1e-5) and torch.allclose(feats[3], res5, atol=1e-5)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(aux, ours.auxiliary_head(res4), atol=1e-5)


@pytest.mark.slow
def test_mmseg_backend_run_resumes_bit_identically(synth_root: Path, tmp_path: Path):
    pytest.importorskip("mmseg")
    torch.manual_seed(0)
    torch.save(ResNetEncoder((1, 1, 1, 1), 64).state_dict(), tmp_path / "r50-1111.pth")
    sets = {
        "crop_size": 64, "scale": [128, 64], "channels": 16, "aux_channels": 8,
        "train.iterations": 4, "train.batch_size": 2, "train.checkpoint_every": 2,
        "train.log_every": 1, "train.workers": 0, "train.threads": 1,
    }  # fmt: skip
    weights = str(tmp_path / "r50-1111.pth")
    args = ["transfer", "--task", "segmentation", "--backend", "mmseg", "--data",
            str(synth_root), "--device", "cpu", "--weights", weights]  # fmt: skip
    for k, v in sets.items():
        args += ["--set", f"fcn_resnet.{k}={json.dumps(v)}"]
    a, b = straight_killed_resumed(args, tmp_path / "results")
    skip = {"command", "train_seconds", "eval_seconds", "seconds"}
    assert {k: v for k, v in a.items() if k not in skip} == {
        k: v for k, v in b.items() if k not in skip}  # fmt: skip
    assert a["backend"] == "mmseg" and a["family"] == "resnet"
    assert a["mean_iu"] == pytest.approx(a["mmseg_iou_metric"]["mean_iu_exact"], abs=1e-9)
