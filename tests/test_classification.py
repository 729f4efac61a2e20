"""VOC2007 classification transfer: metric, crops, freezing, init, loop, resume."""

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from benchmark.config import from_dict
from benchmark.datasets.synth import make_synthetic
from benchmark.datasets.voc import VOC_CLASSES
from benchmark.distributed import DistEnv
from benchmark.errors import ConfigError
from benchmark.input_convention import CAFFE, TORCHVISION
from benchmark.loop import IterationSampler, Precision
from benchmark.metrics import classification_ap
from benchmark.runs import open_run
from transfer.backbone import check_frozen_unchanged, freeze, snapshot_frozen
from transfer.classification import train as train_mod
from transfer.classification.config import (
    AugmentConfig,
    ClassificationConfig,
    EvalConfig,
    TrainConfig,
)
from transfer.classification.data import EvalCrops, TrainCrops, VOCImages
from transfer.classification.evaluate import evaluate
from transfer.classification.model import (
    FROZEN_PREFIXES,
    ClassificationNet,
    sigmoid_cross_entropy,
)
from transfer.classification.presets import (
    center_crop,
    random_crop,
    window,
    window_crop,
)
from transfer.classification.train import default_name, main, make_optimizer, make_step
from weights.encoder import load_encoder

CPU = DistEnv(0, 1, 0, torch.device("cpu"))
MEAN_PIXEL = CAFFE.mean_rgb8()  # the default CaffeNet's padding colour: (123, 117, 104) RGB
SMALL = 67  # smallest crop the encoder takes: pool5 is 1x1, so tests run in seconds


@pytest.fixture(scope="module")
def voc07(tmp_path_factory):
    root = make_synthetic(tmp_path_factory.mktemp("synth"), images=32, min_size=96, max_size=128)
    return root / "VOCdevkit" / "VOC2007"


def tiny_net(seed=0, arch="caffenet", **kw):
    torch.manual_seed(seed)
    encoder = load_encoder(None, arch)[0]
    return ClassificationNet(encoder, crop=SMALL, hidden=kw.pop("hidden", 32), **kw)


def tiny_cfg(voc07, **over):
    base = {
        "data": str(voc07), "hidden": 64, "dropout": 0.0,
        "augment": {"crop": SMALL, "scale": [0.5, 0.7]},
        "train": {"iterations": 4, "batch_size": 4, "workers": 0, "log_every": 1,
                  "checkpoint_every": 2, "lr": 0.01},
        "test": {"mode": "center", "batch_size": 8},
    }  # fmt: skip
    for key, value in over.items():
        node = base
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return from_dict(ClassificationConfig, base)


# ------------------------------------------------------------------------------- metric


def test_map_equals_independent_sklearn_computation():
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 20)) < 0.3).astype(np.float32)
    labels[0] = 1  # every class has a positive
    difficult = (rng.random((60, 20)) < 0.15) & (labels == 0)
    scores = rng.normal(size=(60, 20)) + labels
    per_class, mean = classification_ap(scores, labels, difficult)
    keep = [~difficult[:, c] for c in range(20)]
    expected = [  # the reference's tie-break: scr - 1e-5 * gts (train_cls.py L151-157)
        average_precision_score(labels[k, c], scores[k, c] - 1e-5 * labels[k, c])
        for c, k in enumerate(keep)
    ]
    np.testing.assert_allclose(per_class, expected, rtol=1e-12)
    assert mean == pytest.approx(np.mean(expected), rel=1e-12)
    # difficult images really are excluded: scoring them highest changes nothing
    cheat = scores.copy()
    cheat[difficult] = 100.0
    assert classification_ap(cheat, labels, difficult)[1] == pytest.approx(mean, rel=1e-12)


def test_loss_ignores_difficult_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    keep = torch.tensor([[True, True], [True, False]])
    loss = sigmoid_cross_entropy(logits, targets, keep)
    expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0)) + np.log1p(np.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[1, 1] == 0 and (logits.grad[keep] != 0).all()


# -------------------------------------------------------------------------------- crops


def test_window_pads_with_the_mean_pixel():
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    out = window(img, -2, -1, 8, MEAN_PIXEL)
    assert (out[1:5, 2:8] == img).all()
    assert (out[0] == MEAN_PIXEL).all() and (out[:, :2] == MEAN_PIXEL).all()
    assert (window(img, 1, 1, 3, MEAN_PIXEL) == img[1:4, 1:4]).all()
    small = Image.fromarray(img)
    assert (center_crop(small, 8, MEAN_PIXEL)[2:6, 1:7] == img).all()
    # Caffe pads mean-subtracted data with zeros: the padding is exactly 0 in its units
    x = CAFFE.normalise_hwc(out)
    assert x.shape == (3, 8, 8) and (x[:, 0] == 0).all() and (x[:, :, :2] == 0).all()
    assert (TORCHVISION.normalise_hwc(window(img, -2, -1, 8, TORCHVISION.mean_rgb8()))[:, 0]
            .abs().max() < 0.01)  # fmt: skip


def test_datasets_pad_with_the_encoders_mean_pixel(voc07):
    images = VOCImages(voc07, "test")
    aug = AugmentConfig(crop=400, scale=(0.5, 0.5), mode="rescale")  # larger than any image
    for conv in (CAFFE, TORCHVISION):
        pad = torch.from_numpy(conv.mean_rgb8())[:, None, None]
        crop = TrainCrops(images, aug, 0, conv)[(0, 0)][0]
        centre = EvalCrops(images, aug, EvalConfig(mode="center"), 0, conv)[0][0][0]
        assert (crop == pad).all(0).float().mean() > 0.5  # a ~60 px image in a 400 crop
        assert (centre[:, 0, 0] == pad[:, 0, 0]).all()


def test_random_crop_scales_pads_and_is_seeded():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    a = random_crop(img, np.random.default_rng(5), 67, (0.5, 2.0), True, MEAN_PIXEL)
    b = random_crop(img, np.random.default_rng(5), 67, (0.5, 2.0), True, MEAN_PIXEL)
    assert a.shape == (67, 67, 3) and a.dtype == np.uint8 and (a == b).all()
    # at scale <= 1 the 40x60 image is smaller than the crop: there is mean padding
    pad = random_crop(img, np.random.default_rng(1), 67, (0.5, 1.0), False, MEAN_PIXEL)
    assert (pad == MEAN_PIXEL).all(axis=-1).any()


def test_window_crop_is_the_reference_data_layer():
    """A window of s x crop original pixels, s in [0.5, min(2, H/crop, W/crop)], inside the
    image (never padded), resampled to crop x crop; seeded."""
    rng0 = np.random.default_rng(0)
    img_np = rng0.integers(0, 255, (90, 140, 3), dtype=np.uint8)
    img = Image.fromarray(img_np)
    a = window_crop(img, np.random.default_rng(3), 67, (0.5, 2.0), True, MEAN_PIXEL)
    again = window_crop(img, np.random.default_rng(3), 67, (0.5, 2.0), True, MEAN_PIXEL)
    assert a.shape == (67, 67, 3) and (a == again).all()
    # scale fixed at 1 and no mirror: the crop is an exact 67x67 window of the image
    w = window_crop(img, np.random.default_rng(5), 67, (1.0, 1.0), False, MEAN_PIXEL)
    hits = [(y, x) for y in range(90 - 66) for x in range(140 - 66)
            if (img_np[y : y + 67, x : x + 67] == w).all()]  # fmt: skip
    assert len(hits) == 1
    # the largest window is clamped to the image's shorter side (90 < 2 x 67): no padding
    big = window_crop(img, np.random.default_rng(1), 67, (1.9, 2.0), False, MEAN_PIXEL)
    assert not (big == MEAN_PIXEL).all(axis=-1).all(axis=0).any()


def test_ten_crop_test_is_reproducible_and_differs_from_centre(voc07):
    images = VOCImages(voc07, "test")
    aug = AugmentConfig(crop=SMALL, scale=(0.5, 2.0))
    ten = EvalCrops(images, aug, EvalConfig(mode="ten-random", crops=10), 0, CAFFE)
    crops, idx = ten[3]
    assert crops.shape == (10, 3, SMALL, SMALL) and idx == 3
    assert torch.equal(crops, ten[3][0])  # same seed, same image: same crops
    assert not torch.equal(crops[0], crops[1])
    assert not torch.equal(crops, EvalCrops(images, aug, ten.test, 1, CAFFE)[3][0])
    centre = EvalCrops(images, aug, EvalConfig(mode="center"), 0, CAFFE)
    assert centre[3][0].shape == (1, 3, SMALL, SMALL)

    model = tiny_net()
    s1 = evaluate(model, ten, ten.test, CPU)
    s2 = evaluate(model, EvalCrops(images, aug, ten.test, 0, CAFFE), ten.test, CPU)
    sc = evaluate(model, centre, centre.test, CPU)
    assert s1.shape == (len(images), 20)
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1, sc)  # a random N(0, 0.01) net: tiny differences


def test_iteration_batches_resume_and_cover_each_epoch():
    def take(sampler, n):
        return list(itertools.islice(iter(sampler), n))

    full = take(IterationSampler(10, 4, seed=3, start=0), 10)
    tail = take(IterationSampler(10, 4, seed=3, start=6), 4)
    assert tail == full[6:]
    samples = [s for batch in full for s in batch]
    assert [k for _, k in samples] == list(range(40))
    for e in range(4):  # each epoch is a permutation of the 10 images
        assert sorted(i for i, k in samples if k // 10 == e) == list(range(10))
    halves = [take(IterationSampler(10, 4, 3, 0, rank=r, world=2), 10) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == full


# -------------------------------------------------------------------- model and freezing


@pytest.mark.parametrize("train_from", ["all", "pool5", "fc7"])
def test_train_from_freezes_the_right_layers(train_from):
    model = tiny_net()
    prefixes = FROZEN_PREFIXES[train_from]
    freeze(model, prefixes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snap = snapshot_frozen(model, prefixes)
    train = TrainConfig(lr=0.1, weight_decay=0.1)
    opt = make_optimizer(model, train)
    step = make_step(model, opt, train, Precision("fp32", CPU.device), CPU.device, CAFFE)
    gen = torch.Generator().manual_seed(0)
    for it in range(3):
        batch = (
            torch.randint(0, 256, (4, 3, SMALL, SMALL), dtype=torch.uint8, generator=gen),
            (torch.rand(4, 20, generator=gen) < 0.3).float(),
            torch.ones(4, 20, dtype=torch.bool),
        )
        step(batch, it)
    check_frozen_unchanged(model, snap)
    after = model.state_dict()
    moved = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    expected = {"all": {"encoder", "fc6", "fc7", "fc8"}, "pool5": {"fc6", "fc7", "fc8"},
                "fc7": {"fc8"}}[train_from]  # fmt: skip
    assert moved == expected


def test_head_is_reinitialised_and_sized_to_the_crop():
    torch.manual_seed(0)
    net = ClassificationNet(load_encoder(None)[0])  # protocol: 227 crop, 4096 hidden
    assert net.fc6.in_features == 9216 and net.fc8.out_features == 20
    assert (net.fc7.bias == 0.1).all() and abs(net.fc7.weight.std().item() - 0.01) < 1e-3
    assert tiny_net().fc6.in_features == 256
    with pytest.raises(ConfigError, match="augment.crop"):
        ClassificationNet(load_encoder(None)[0], crop=20)


def test_rescale_is_magic_init_on_the_new_layers_and_calibrates_all():
    """`rescale: true` (transfer.rescale.rescale_for_transfer_): the new fc6-fc8 are drawn
    again, a pretrained encoder's layers are only scaled (directions unchanged), and the
    between-layer step runs over every layer."""
    from transfer.rescale import rescale_for_transfer_

    x = torch.randn(16, 3, SMALL, SMALL)
    net = tiny_net(seed=1, arch="alexnet-plain")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = rescale_for_transfer_(net, lambda: net(x), "encoder.", True, seed=0)
    assert net.training  # left as it was found
    steps = {e["name"]: e["step"] for e in report}
    assert steps["encoder.features.0"] == "pretrained" and steps["fc6"] == "gaussian"
    assert report[-1]["step"] == "summary" and report[-1]["iterations"] >= 1
    after = net.state_dict()
    for i in (0, 3, 6, 8, 10):
        w0, w1 = before[f"encoder.features.{i}.weight"], after[f"encoder.features.{i}.weight"]
        cos = torch.nn.functional.cosine_similarity(w0.flatten(), w1.flatten(), dim=0)
        assert cos > 1 - 1e-5  # only scaled
    assert not torch.equal(before["fc6.weight"], after["fc6.weight"])
    # the same seed gives the same network; a random encoder is drawn again as well
    again = tiny_net(seed=1, arch="alexnet-plain")
    rescale_for_transfer_(again, lambda: again(x), "encoder.", True, seed=0)
    assert all(torch.equal(after[k], again.state_dict()[k]) for k in after)
    rand = tiny_net(seed=1)
    report = rescale_for_transfer_(rand, lambda: rand(x), "encoder.", False, seed=0)
    steps = {e["name"]: e["step"] for e in report}
    assert steps["encoder.features.0"] == "gaussian"


# ---------------------------------------------------------------------- main, end to end


def test_default_name_and_config_checks(voc07, tmp_path):
    assert default_name(ClassificationConfig()) == "cls-random-s0"
    assert default_name(ClassificationConfig(seed=2, train_from="pool5", rescale=True)) == (
        "cls-random-pool5-rescaled-s2"
    )
    cfg = tiny_cfg(voc07, **{"train.batch_size": 0})
    with pytest.raises(ConfigError, match="train.batch_size"):
        main(cfg, open_run(tmp_path / "r", cfg))


def _official_map(voc07, split, scores_csv):
    """Independent check: the devkit's per-class files (1 / -1 / 0 = difficult) + sklearn."""
    lines = scores_csv.read_text().splitlines()
    header = lines[0].split(",")
    rows = {ln.split(",")[0]: np.array(ln.split(",")[1:], float) for ln in lines[1:]}
    aps = {}
    for c, cls in enumerate(VOC_CLASSES):
        assert header[c + 1] == cls
        pairs = [ln.split() for ln in (voc07 / "ImageSets/Main" / f"{cls}_{split}.txt").open()]
        kept = [(i, int(v)) for i, v in pairs if int(v) != 0]
        y = np.array([v == 1 for _, v in kept])
        if y.any():
            aps[cls] = average_precision_score(
                y, np.array([rows[i][c] for i, _ in kept]) - 1e-5 * y
            )
    return aps


def test_short_training_learns_above_chance(voc07, tmp_path):
    cfg = tiny_cfg(
        voc07, rescale=True, rescale_images=16, test_split="trainval",
        **{"train.iterations": 20, "train.batch_size": 8, "train.lr": 0.01,
           "train.log_every": 10, "train.checkpoint_every": 1000},
    )  # fmt: skip
    run = open_run(tmp_path / "run", cfg)
    metrics = main(cfg, run)
    assert metrics["final_loss"] < 0.8 * metrics["initial_loss"]
    images = VOCImages(voc07, "trainval")
    rng = np.random.default_rng(0)
    chance = np.mean(
        [classification_ap(rng.normal(size=(len(images), 20)), images.labels,
                           images.difficult)[1] for _ in range(50)]
    )  # fmt: skip
    assert metrics["map"] > chance + 0.1
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["stage"] == "transfer" and written["task"] == "classification"
    assert written["method"] == "random" and written["backend"] == "native"
    assert written["test_crops"] == 1 and written["seed"] == 0
    official = _official_map(voc07, "trainval", tmp_path / "run" / "scores.csv")
    assert written["map"] == pytest.approx(np.mean(list(official.values())), rel=1e-4)
    for cls, ap in official.items():
        assert written["per_class"][cls] == pytest.approx(ap, rel=1e-4)


def test_resume_after_a_crash_gives_identical_weights(voc07, tmp_path, monkeypatch):
    cfg = tiny_cfg(voc07, dropout=0.5, **{"train.iterations": 4, "train.checkpoint_every": 2})
    reference = main(cfg, open_run(tmp_path / "straight", cfg))

    real_make_step, calls = train_mod.make_step, []

    def crashing_make_step(*args, **kwargs):
        step = real_make_step(*args, **kwargs)

        def crash_on_third(batch, iteration):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt  # killed after the checkpoint at iteration 2
            return step(batch, iteration)

        return crash_on_third

    monkeypatch.setattr(train_mod, "make_step", crashing_make_step)
    with pytest.raises(KeyboardInterrupt):
        main(cfg, open_run(tmp_path / "crashed", cfg))
    monkeypatch.setattr(train_mod, "make_step", real_make_step)
    assert not (tmp_path / "crashed" / "metrics.json").exists()

    def crash_in_test(*args, **kwargs):
        raise KeyboardInterrupt  # killed while testing: training must not be redone

    monkeypatch.setattr(train_mod, "evaluate", crash_in_test)
    with pytest.raises(KeyboardInterrupt):
        main(cfg, open_run(tmp_path / "crashed", cfg, resume=True))
    monkeypatch.undo()

    def no_training(*args, **kwargs):
        return lambda batch, iteration: pytest.fail("retrained")

    monkeypatch.setattr(train_mod, "make_step", no_training)
    resumed = main(cfg, open_run(tmp_path / "crashed", cfg, resume=True))

    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["state"]
    b = torch.load(tmp_path / "crashed/checkpoints/last.pt", weights_only=True)["state"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["map"] == reference["map"] and resumed["final_loss"] == reference["final_loss"]
