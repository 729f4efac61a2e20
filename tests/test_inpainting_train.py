"""Training runs of the inpainting context encoder: loss goes down, weights, resume, holes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmark.faults
from benchmark.checkpoint import FORMAT
from benchmark.distributed import DistEnv
from benchmark.errors import BenchError
from benchmark.loop import Precision
from benchmark.runs import open_run
from pretrain.inpainting.config import InpaintingConfig, InpaintLossConfig, InpaintTrainConfig
from pretrain.inpainting.train import build_nets, main, make_hole_fn, make_step
from pretrain.inpainting.weights import load_generator

CPU = DistEnv(0, 1, 0, torch.device("cpu"))


def run_main(path: Path, cfg: InpaintingConfig, **open_args) -> dict:
    run = open_run(path, cfg, **open_args)
    try:
        return main(cfg, run)
    finally:
        run.close()


def _small_folder(src: Path, dst: Path, n: int) -> Path:
    dst.mkdir()
    for p in sorted(src.iterdir(), key=lambda p: p.stat().st_size)[:n]:
        shutil.copy(p, dst / p.name)
    return dst


@pytest.mark.parametrize("hole, size, overlap", [("code", 64, 4), ("paper", 78, 7)])
def test_training_run_lowers_masked_l2_and_writes_generator(
    tmp_path, synth_root, hole, size, overlap
):
    torch.manual_seed(0)
    cfg = InpaintingConfig(
        data=str(synth_root / "unlabelled"),
        device="cpu",
        hole=hole,
        bottleneck=64,
        loss=InpaintLossConfig(kind="l2"),  # each geometry's own overlap
        train=InpaintTrainConfig(
            iterations=12,
            batch_size=8,
            workers=0,
            log_every=4,
            sample_every=12,
            checkpoint_every=100,
            load_size=0,
        ),
    )
    metrics = run_main(tmp_path / "run", cfg)
    assert metrics["stage"] == "pretrain" and metrics["method"] == "inpainting"
    assert metrics["final_loss"] < metrics["initial_loss"]
    run = tmp_path / "run"
    assert (run / "samples" / "iter_0000012.png").is_file()
    gen, card = load_generator(run)
    assert card["loss"] == "l2" and card["overlap"] == overlap and card["iterations"] == 12
    assert card["bottleneck"] == 64 and card["hole"] == hole and card["prediction_size"] == size
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["export"] == "generator.safetensors" and saved["hole"] == hole
    assert gen(torch.zeros(1, 3, 128, 128)).shape == (1, 3, size, size)
    assert ("hole" in saved["departures"]) == (hole == "code")  # the paper's is the default
    assert "loss.overlap" not in saved["departures"]


def test_joint_run_on_real_images_lowers_masked_l2(tmp_path, shared_data):
    folder = _small_folder(shared_data / "ImageNet-sample", tmp_path / "imgs", 16)
    torch.manual_seed(0)
    cfg = InpaintingConfig(
        data=str(folder),
        device="cpu",
        bottleneck=256,
        loss=InpaintLossConfig(kind="joint", overlap=4),
        train=InpaintTrainConfig(
            iterations=10,
            batch_size=8,
            workers=0,
            log_every=5,
            sample_every=0,
            checkpoint_every=100,
            load_size=160,
        ),
    )
    metrics = run_main(tmp_path / "run", cfg)
    assert metrics["final_loss"] < metrics["initial_loss"]


@pytest.mark.parametrize(
    "mask, hole_mode, box", [("random-region", "code", (36, 92)),
                             ("random-region", "paper", (32, 96)),
                             ("noise-region", "paper", (32, 96))]
)  # fmt: skip
def test_random_holes_stay_in_the_hole_box(tmp_path, synth_root, mask, hole_mode, box):
    cfg = InpaintingConfig(
        mask=mask,
        hole=hole_mode,
        shapes=str(synth_root / "VOCdevkit/VOC2012"),
        loss=InpaintLossConfig(kind="l2", overlap=4),
        bottleneck=32,
    )
    fn = make_hole_fn(cfg)
    hole = fn(np.random.default_rng(0))
    assert hole.shape == (1, 128, 128) and hole.sum() > 0
    outside = hole.clone()
    outside[:, box[0] : box[1], box[0] : box[1]] = 0
    assert outside.sum() == 0
    precision = Precision("fp32", CPU.device)
    g, opt_g, adversary = build_nets(cfg, CPU, precision)
    assert adversary is None  # l2: no discriminator
    step = make_step(g, opt_g, adversary, precision, CPU.device, cfg.loss, geometry=cfg.geometry())
    holes = torch.stack([fn(np.random.default_rng(i)) for i in range(4)])
    out = step({"image": torch.rand(4, 3, 128, 128) * 2 - 1, "hole": holes}, 0)
    assert torch.isfinite(out["loss"])


class Stop(Exception):
    """Stands in for a kill right after the step of a given iteration."""


@pytest.mark.slow
def test_resume_continues_bit_exact(tmp_path, synth_root, monkeypatch):
    cfg = InpaintingConfig(
        data=str(synth_root / "unlabelled"),
        device="cpu",
        bottleneck=32,
        loss=InpaintLossConfig(kind="joint", overlap=4),
        train=InpaintTrainConfig(
            iterations=4,
            batch_size=4,
            workers=0,
            log_every=1,
            sample_every=0,
            checkpoint_every=2,
            load_size=0,
        ),
    )
    run_main(tmp_path / "a", cfg)

    def stop_after(point: str) -> None:
        if point == "step:3":  # the checkpoint of iteration 2 is written, 3 is not
            raise Stop(point)

    monkeypatch.setattr(benchmark.faults, "reach", stop_after)
    with pytest.raises(Stop):
        run_main(tmp_path / "b", cfg)
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["format"] == FORMAT and ckpt["stage"] == "pretrain/inpainting"
    assert ckpt["iteration"] == 2 and ckpt["config"]["train"]["iterations"] == 4
    assert set(ckpt["state"]) == {"generator", "opt_g", "discriminator", "opt_d", "precision"}
    assert not (tmp_path / "b" / "metrics.json").exists()
    with pytest.raises(BenchError, match="--resume"):
        open_run(tmp_path / "b", cfg)  # an unfinished run with a checkpoint
    metrics = run_main(tmp_path / "b", cfg, resume=True)
    assert metrics["iterations"] == 4
    a, _ = load_generator(tmp_path / "a")
    b, _ = load_generator(tmp_path / "b")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    # The resumed log holds each iteration once (rewound to the checkpoint, then continued).
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "scalars.jsonl").open()]
    assert steps == [1, 2, 3, 4]
