"""A pretraining run that cannot start fails before its run folder exists (run_stage calls
the stage's `check`, then its `preflight`), and what the preflight read reaches the run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import pretrain.preflight as preflight
from bench.stages import pretrain_stage, run_stage
from benchmark.errors import BenchError, ConfigError, DatasetError
from pretrain.config import ModelConfig, PretrainConfig, TrainConfig
from pretrain.inpainting.config import InpaintingConfig
from pretrain.pretext.config import RotationStageConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def tiny(images, **kw) -> PretrainConfig:
    train = TrainConfig(iterations=1, batch_size=2, workers=0, sample_every=0, log_every=1)
    return PretrainConfig(data=str(images), model=ModelConfig(input_size=67), train=train, **kw)


def refuse(cfg, tmp_path, error, match):
    runs = tmp_path / "runs"
    with pytest.raises(error, match=match) as err:
        run_stage(pretrain_stage(cfg.method), cfg, runs)
    assert "\n" not in str(err.value)
    assert not runs.exists()  # no run folder, not even an empty one


def test_random_region_without_shapes_fails_before_the_folder(images, tmp_path):
    refuse(tiny(images), tmp_path, ConfigError, "shapes=")
    inpainting = InpaintingConfig(data=str(images), mask="random-region")
    refuse(inpainting, tmp_path, ConfigError, "shapes=")


def test_a_shapes_folder_without_shapes_fails_before_the_folder(images, tmp_path):
    empty = tmp_path / "VOC2012"
    empty.mkdir()
    refuse(tiny(images, shapes=str(empty)), tmp_path, DatasetError, "SegmentationObject")
    inpainting = InpaintingConfig(data=str(images), mask="random-region", shapes=str(empty))
    refuse(inpainting, tmp_path, DatasetError, "VOC2012: not a voc2012 dataset folder")


def test_unreadable_data_fails_before_the_folder(images, tmp_path):
    refuse(tiny(tmp_path / "nowhere", mask="central"), tmp_path, DatasetError, "not found")
    refuse(RotationStageConfig(data=str(tmp_path / "nowhere")), tmp_path, DatasetError,
           "not found")  # fmt: skip
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    refuse(tiny(images, mask="central"), tmp_path, DatasetError, "broken.jpg")
    refuse(InpaintingConfig(data=str(images)), tmp_path, DatasetError, "broken.jpg")
    refuse(RotationStageConfig(data=str(images)), tmp_path, DatasetError, "broken.jpg")
    weights = tiny(images, method="imagenet", weights=str(tmp_path / "alexnet.pth"))
    weights.model.arch = "torchvision"
    refuse(weights, tmp_path, BenchError, "alexnet.pth: ImageNet weights file not found")


def test_skipped_images_are_logged_into_the_run_and_decoded_once(images, tmp_path, monkeypatch):
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    scans = []
    real = preflight.check_image_folder

    def counted(paths, **kw):
        scans.append(len(paths))
        return real(paths, **kw)

    monkeypatch.setattr(preflight, "check_image_folder", counted)
    cfg = tiny(images, mask="noise-region", on_bad_data="skip")
    path, metrics = run_stage(pretrain_stage(cfg.method), cfg, tmp_path / "runs")
    assert scans == [7]  # every image decoded once, before the folder was made
    assert metrics["skipped"]["count"] == 1 and metrics["iterations"] == 1
    assert "skipping" in (path / "log.txt").read_text()


def test_a_finished_run_is_reused_without_reading_its_data_again(images, tmp_path):
    data = tmp_path / "copy"
    shutil.copytree(images, data)
    cfg = tiny(data, mask="noise-region")
    path, metrics = run_stage(pretrain_stage(cfg.method), cfg, tmp_path / "runs")
    shutil.rmtree(data)
    again = run_stage(pretrain_stage(cfg.method), cfg, tmp_path / "runs", resume=True)[1]
    assert again == metrics == json.loads((path / "metrics.json").read_text())
    with pytest.raises(BenchError, match="finished run"):  # the folder's state, not the data
        run_stage(pretrain_stage(cfg.method), cfg, tmp_path / "runs")
