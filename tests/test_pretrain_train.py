"""The pretraining stage end to end on tiny images, the loop's resume, and the methods."""

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

import pretrain.train as train
from bench.stages import pretrain_stage
from benchmark.distributed import DistEnv
from benchmark.errors import BenchError, ConfigError
from benchmark.loop import IterationSampler, LoopConfig, Precision, fit
from benchmark.runs import open_run
from pretrain.config import LossConfig, ModelConfig, PretrainConfig, TrainConfig
from weights.native import load_native

SIZE = 67  # the smallest input AlexNet takes (pool5 is 1 x 1): seconds per test on CPU


def _pretrain(cfg, run):
    """What `bench pretrain` runs: the stage table's main for the config's method."""
    return pretrain_stage(cfg.method).main(cfg, run)


pytestmark = pytest.mark.usefixtures("one_thread")  # every test here on one thread


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Bright flat-coloured images with a soft gradient, far from the normalisation mean,
    so that a few dozen steps visibly lower the loss."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    ramp = np.linspace(-20, 20, 80)[None, :, None]
    for i in range(10):
        colour = rng.integers(180, 230, size=3)[None, None, :]
        pixels = np.clip(colour + ramp + np.zeros((72, 80, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
    return root


def tiny(images, **kw) -> PretrainConfig:
    train_kw = dict(
        iterations=30,
        batch_size=4,
        workers=0,
        lr=1e-3,
        log_every=5,
        sample_every=15,
        checkpoint_every=15,
    )
    train_kw.update(kw.pop("train", {}))
    return PretrainConfig(
        data=str(images), model=ModelConfig(input_size=SIZE), train=TrainConfig(**train_kw), **kw
    )


def history(run_dir):
    return [json.loads(line)["train/loss"] for line in open(run_dir / "scalars.jsonl")]


def test_context_encoder_lowers_the_masked_loss_and_writes_the_run(images, tmp_path):
    cfg = tiny(images, mask="central")
    metrics = _pretrain(cfg, open_run(tmp_path / "run", cfg))
    assert metrics["method"] == "context-encoder" and metrics["mask"] == "central"
    assert metrics["iterations"] == 30 and metrics["export"] == "encoder.safetensors"
    assert metrics["final_loss"] < 0.5 * metrics["initial_loss"]
    losses = history(tmp_path / "run")
    assert losses[-1] < losses[0]
    for name in (
        "encoder.safetensors",
        "encoder.card.json",
        "metrics.json",
        "samples/iter_0000015.png",
        "samples/iter_0000030.png",
        "checkpoints/last.pt",
    ):
        assert (tmp_path / "run" / name).is_file(), name
    grid = Image.open(tmp_path / "run/samples/iter_0000030.png")
    assert grid.size[1] > 4 * SIZE  # input / masked / prediction / pasted rows
    state, card = load_native(tmp_path / "run")
    assert card["method"] == "context-encoder" and card["iterations"] == 30
    assert set(state) == {f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")}


def test_autoencoder_lowers_its_reconstruction_loss(images, tmp_path):
    cfg = tiny(images, method="autoencoder")
    metrics = _pretrain(cfg, open_run(tmp_path / "run", cfg))
    assert metrics["mask"] is None
    assert metrics["final_loss"] < 0.5 * metrics["initial_loss"]


def test_random_region_from_voc_shapes_and_the_hint_without_them(images, tmp_path, monkeypatch):
    voc = tmp_path / "VOC2012"
    (voc / "SegmentationObject").mkdir(parents=True)
    labels = np.zeros((50, 60), np.uint8)
    labels[10:30, 5:40] = 1
    labels[35:45, 20:50] = 2
    Image.fromarray(labels, mode="P").save(voc / "SegmentationObject" / "a.png")
    cfg = tiny(images, shapes=str(voc), train={"iterations": 2, "sample_every": 0})
    assert _pretrain(cfg, open_run(tmp_path / "a", cfg))["mask"] == "random-region"
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["shapes"] == str(voc)
    assert load_native(tmp_path / "a")[1]["shapes"] == str(voc)
    # an image folder without shapes: an error that says how to give them, never a silent
    # switch to the released code's noise masks
    cfg = tiny(images, train={"iterations": 2, "sample_every": 0})
    with pytest.raises(ConfigError) as err:
        _pretrain(cfg, open_run(tmp_path / "b", cfg))
    assert "shapes=" in str(err.value) and "noise-region" in str(err.value)
    assert "\n" not in str(err.value)
    made = []  # the training sets the stage builds

    class Recorded(train.PretrainImages):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(train, "PretrainImages", Recorded)
    cfg = tiny(images, mask="noise-region", train={"iterations": 2, "sample_every": 0})
    assert _pretrain(cfg, open_run(tmp_path / "c", cfg))["mask"] == "noise-region"
    # one noise mask per batch, as the released train_random.lua L330 (random-region: per image)
    assert [d.mask_batch for d in made] == [cfg.train.batch_size]


def test_resume_after_a_stop_gives_bit_identical_weights(images, tmp_path, monkeypatch):
    cfg = tiny(
        images,
        mask="noise-region",
        train={"iterations": 8, "sample_every": 5, "checkpoint_every": 3},
    )
    whole = _pretrain(cfg, open_run(tmp_path / "whole", cfg))

    real_save_grid, calls = train.save_grid, []

    def stop_once(*args, **kw):  # the process "dies" at iteration 5, after the checkpoint at 3
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt
        return real_save_grid(*args, **kw)

    monkeypatch.setattr(train, "save_grid", stop_once)
    with pytest.raises(KeyboardInterrupt):
        _pretrain(cfg, open_run(tmp_path / "cut", cfg))
    resumed = _pretrain(cfg, open_run(tmp_path / "cut", cfg, resume=True))

    a = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=True)["state"]
    b = torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)["state"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert resumed["final_loss"] == whole["final_loss"]
    assert resumed["initial_loss"] == whole["initial_loss"]


def test_sampler_started_mid_way_continues_the_same_stream():
    full = [k for b in itertools.islice(iter(IterationSampler(10, 3, seed=3)), 9) for k in b]
    tail = [k for b in itertools.islice(iter(IterationSampler(10, 3, seed=3, start=4)), 5)
            for k in b]  # fmt: skip
    assert tail == full[12:]
    assert sorted(i for i, _ in full[:10]) == list(range(10))  # a permutation per epoch
    assert [k for _, k in full] == list(range(27))  # every sample has its own number


def test_non_finite_loss_stops_before_the_update(tmp_path):
    cfg = PretrainConfig()
    run = open_run(tmp_path / "run", cfg)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    prec = Precision("fp32", env.device)

    def step(batch, iteration):
        loss = (w * (float("nan") if iteration == 2 else 1.0)).sum()
        opt.zero_grad()
        prec.backward(loss)
        prec.step(opt)
        return {"loss": loss}

    loop = LoopConfig(iterations=10, checkpoint_every=2)
    with pytest.raises(BenchError, match="iteration 3: loss is nan; stopped before the update"):
        fit(
            run,
            env,
            loop,
            stage="test",
            config=cfg,
            seed=0,
            step=step,
            batches=lambda start: itertools.repeat(None),
            state={"w": opt},
            precision=prec,
        )
    assert torch.allclose(w.detach(), torch.full((2,), 0.8))  # two updates, not three


def test_random_method_writes_gaussian_weights(tmp_path):
    cfg = PretrainConfig(method="random")
    metrics = _pretrain(cfg, open_run(tmp_path / "run", cfg))
    assert metrics["iterations"] == 0 and metrics["train_seconds"] < 30
    state, card = load_native(tmp_path / "run")
    w = state["features.3.weight"]
    assert abs(w.std().item() - 0.01) < 0.001 and state["features.3.bias"].abs().max() == 0
    assert card["method"] == "random" and card["arch"] == "caffenet"


def test_imagenet_imports_a_torchvision_alexnet_file(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(net.state_dict(), path)
    cfg = PretrainConfig(
        method="imagenet", weights=str(path), model=ModelConfig(arch="torchvision")
    )
    _pretrain(cfg, open_run(tmp_path / "run", cfg))
    state, card = load_native(tmp_path / "run")
    assert card["arch"] == "torchvision" and card["method"] == "imagenet"
    for key, value in state.items():
        assert torch.equal(value, net.state_dict()[key])


def test_imagenet_errors_name_the_problem(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    sd = torchvision.models.alexnet(weights=None).state_dict()
    sd["features.99.weight"] = sd.pop("features.10.weight")
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    cfg = PretrainConfig(method="imagenet", weights=str(bad), model=ModelConfig(arch="torchvision"))
    with pytest.raises(BenchError) as err:
        _pretrain(cfg, open_run(tmp_path / "a", cfg))
    msg = str(err.value)
    assert "\n" not in msg and "features.10.weight" in msg and "features.99.weight" in msg
    cfg = PretrainConfig(
        method="imagenet", weights=str(tmp_path / "none.pth"), model=ModelConfig(arch="torchvision")
    )
    with pytest.raises(BenchError, match="none.pth: ImageNet weights file not found"):
        _pretrain(cfg, open_run(tmp_path / "b", cfg))
    cfg = PretrainConfig(method="imagenet", weights=str(bad))
    with pytest.raises(ConfigError, match="model.arch"):
        _pretrain(cfg, open_run(tmp_path / "c", cfg))


def test_paper_learning_rates_and_names():
    assert train.learning_rate(PretrainConfig(mask="central")) == 1e-3
    assert train.learning_rate(PretrainConfig(mask="random-region")) == 1e-4
    assert train.learning_rate(PretrainConfig(train=TrainConfig(lr=5e-4))) == 5e-4
    assert train.default_name(PretrainConfig()) == "pretrain-context-encoder-random-region-s0"
    assert train.default_name(PretrainConfig(method="random", seed=2)) == "pretrain-random-s2"
    assert LossConfig().adversarial_weight == 0.0 and TrainConfig().iterations == 100_000


def test_joint_adversarial_option_trains_a_discriminator(images, tmp_path):
    cfg = tiny(
        images,
        mask="central",
        loss=LossConfig(adversarial_weight=0.001),
        train={"iterations": 3, "log_every": 1, "sample_every": 0},
    )
    _pretrain(cfg, open_run(tmp_path / "run", cfg))
    rows = [json.loads(line) for line in open(tmp_path / "run/scalars.jsonl")]
    assert all({"train/loss", "train/d_loss", "train/adv_loss"} <= set(r) for r in rows)
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["state"]
    assert "discriminator" in state and "optimizer_d" in state
    lr_d = state["optimizer_d"]["param_groups"][0]["lr"]
    assert lr_d == pytest.approx(state["optimizer"]["param_groups"][0]["lr"] / 10)
