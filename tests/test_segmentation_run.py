"""`main` end to end on the synthetic default: run folder, resume, overlays, learning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.runs import open_run
from transfer.segmentation import SegmentationConfig, default_name, main
from transfer.segmentation import engine as seg_engine

TINY = dict(fc_dim=8, max_size=48, eval_images=2, log_every=1, device="cpu")


def test_run_folder_metrics_checkpoint_and_overlays(synth_root: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = SegmentationConfig(data=str(synth_root), iterations=2, save_overlays=2, **TINY)
    assert default_name(cfg) == "seg-random-s0"
    m = main(cfg, open_run(tmp_path / "run", cfg))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    for key in ("stage", "task", "method", "pretrain_seconds", "weights", "backend"):
        assert key in saved
    assert (saved["stage"], saved["task"], saved["backend"]) == (
        "transfer",
        "segmentation",
        "native",
    )
    assert saved["split"] == "voc2012-val-minus-sbd-train" and saved["seed"] == 0
    assert set(saved["per_class"]) >= {"background", "aeroplane", "tvmonitor"}
    for key in ("mean_iu", "pixel_acc", "mean_acc"):
        assert 0.0 <= saved[key] <= 1.0
    assert (tmp_path / "run" / "checkpoints" / "final.pt").is_file()
    assert len(saved["overlays"]) == 2
    with Image.open(tmp_path / "run" / saved["overlays"][0]) as im:
        assert im.mode == "RGB" and im.width > 3 * im.height * 0.5
    assert (tmp_path / "run" / "scalars.jsonl").is_file()


def test_pretrained_weights_are_recorded(synth_root: Path, tmp_path: Path) -> None:
    from pretrain.alexnet import AlexNetEncoder

    weights = tmp_path / "alexnet_tv.pth"
    torch.save(AlexNetEncoder("torchvision").state_dict(), weights)
    cfg = SegmentationConfig(data=str(synth_root), weights=str(weights), iterations=1, **TINY)
    assert default_name(cfg) == "seg-imagenet-s0"
    m = main(cfg, open_run(tmp_path / "run", cfg))
    assert (m["method"], m["arch"], m["weights"]) == ("imagenet", "torchvision", str(weights))


def test_interrupted_run_resumes_from_its_checkpoint(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    cfg = SegmentationConfig(data=str(synth_root), iterations=3, checkpoint_every=1, **TINY)
    real, calls = seg_engine.load_pair, []

    def crash_on_third(sample, max_size):
        calls.append(sample.image_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(sample, max_size)

    monkeypatch.setattr(seg_engine, "load_pair", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        main(cfg, open_run(tmp_path / "run", cfg))
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    monkeypatch.setattr(seg_engine, "load_pair", real)
    run = open_run(tmp_path / "run", cfg, resume=True)
    m = main(cfg, run)
    assert m["iterations"] == 3
    assert "resuming segmentation at iteration 2" in (tmp_path / "run" / "log.txt").read_text()


def constant_background_mean_iu(hist: np.ndarray) -> float:
    """Mean IU of predicting background everywhere, on the same confusion matrix's pixels:
    IU(background) = its pixel share, 0 for every other class present in the ground truth."""
    rows = hist.sum(axis=1)
    return float(rows[0] / rows.sum()) / int((rows > 0).sum())


# Demo-sized settings: FCN-8s (the conv2 skip gives stride-8 detail on small images), the
# Krähenbühl rescaling of the random encoder, SGD at 3e-3, narrow fc6/fc7, no dropout and the
# minimum padding; ~10 s on two idle cores (minutes when the machine is busy).
DEMO = dict(
    variant="fcn8s", rescale=True, lr=3e-3, fc_dim=64, dropout=0.0, pad=0,
    iterations=150, log_every=50, device="cpu",
)  # fmt: skip


def test_short_cpu_run_beats_constant_predictor(synth_root: Path, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    cfg = SegmentationConfig(data=str(synth_root), **DEMO)
    m = main(cfg, open_run(tmp_path / "run", cfg))
    constant = constant_background_mean_iu(np.array(m["confusion_matrix"]))
    assert m["final_loss"] < m["initial_loss"]
    assert m["mean_iu"] > 1.5 * constant and m["mean_iu"] > constant + 0.03, (m, constant)
