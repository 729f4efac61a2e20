"""The mmsegmentation backend: a clean one-line error without mmseg; with it (make mmseg),
the same mean IU as ours on the same predictions, and a short run through mmengine."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.errors import BenchError
from benchmark.metrics import confusion_matrix
from benchmark.runs import open_run
from transfer.segmentation import SegmentationConfig, main
from transfer.segmentation.engine import NUM_CLASSES, scores_from_hist
from transfer.segmentation.main import CLASSES


def _mmseg_importable() -> bool:
    try:
        import mmcv.ops  # noqa: F401
        import mmseg  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


needs_mmseg = pytest.mark.skipif(
    not _mmseg_importable(), reason="mmsegmentation / mmcv ops not installed (make mmseg)"
)


def test_without_mmseg_the_backend_says_what_to_install(tmp_path, monkeypatch) -> None:
    from transfer.segmentation import mmseg_backend

    real_import = builtins.__import__

    def no_openmmlab(name: str, *args, **kwargs):
        if name.split(".")[0] in ("mmseg", "mmcv", "mmengine"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openmmlab)
    monkeypatch.setattr(mmseg_backend, "_REGISTERED", False)
    cfg = SegmentationConfig(backend="mmseg", iterations=1)
    with pytest.raises(BenchError) as err:
        main(cfg, open_run(tmp_path / "run", cfg))
    message = str(err.value)
    assert "\n" not in message and "make mmseg" in message and "mmsegmentation" in message
    assert not (tmp_path / "run" / "metrics.json").exists()


def _random_maps(seed: int, n: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = rng.integers(8, 40, size=2)
        label = rng.integers(0, 12, size=(h, w)).astype(np.uint8)
        label[rng.random((h, w)) < 0.25] = 255
        pred = np.where(rng.random((h, w)) < 0.5, label, rng.integers(0, 14, size=(h, w)))
        out.append((np.where(pred == 255, 3, pred).astype(np.uint8), label))
    return out


@pytest.mark.mmseg
@needs_mmseg
def test_same_mean_iu_as_mmseg_iou_metric_on_same_predictions() -> None:
    from mmseg.evaluation import IoUMetric

    from transfer.segmentation.mmseg_backend import register, scores_from_areas

    register()
    pairs = _random_maps(0)
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": CLASSES}
    hist = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for pred, label in pairs:
        sample = {
            "pred_sem_seg": {"data": torch.from_numpy(pred.astype(np.int64))[None]},
            "gt_sem_seg": {"data": torch.from_numpy(label.astype(np.int64))[None]},
        }
        metric.process({}, [sample])
        hist += confusion_matrix(pred, label, NUM_CLASSES)
    ours = scores_from_hist(hist, CLASSES)
    theirs = metric.compute_metrics(metric.results)  # percent, rounded to 2 decimals
    assert theirs["mIoU"] == pytest.approx(round(100 * ours["mean_iu"], 2), abs=1e-9)
    assert theirs["aAcc"] == pytest.approx(round(100 * ours["pixel_acc"], 2), abs=1e-9)
    assert theirs["mAcc"] == pytest.approx(round(100 * ours["mean_acc"], 2), abs=1e-9)
    # unrounded: the areas mmseg sums give our numbers exactly
    cols = [torch.stack(list(c)).double().sum(0).numpy() for c in zip(*metric.results)]
    exact = scores_from_areas(cols[0], cols[1], cols[3], CLASSES)
    assert exact["mean_iu"] == pytest.approx(ours["mean_iu"], abs=1e-12)
    for name, iu in ours["per_class"].items():
        other = exact["per_class"][name]
        assert (iu is None and other is None) or other == pytest.approx(iu, abs=1e-12), name


@pytest.mark.mmseg
@needs_mmseg
def test_backbone_loads_mmseg_export_and_keeps_alignment(tmp_path: Path) -> None:
    from mmseg.registry import MODELS

    from pretrain.alexnet import AlexNetEncoder
    from transfer.segmentation.mmseg_backend import register

    register()
    enc = AlexNetEncoder("caffenet")
    ckpt = tmp_path / "enc_mmseg.pth"
    state = {f"backbone.{k}": v for k, v in enc.state_dict().items()}
    torch.save({"state_dict": state, "meta": {"method": "test"}}, ckpt)
    backbone = MODELS.build(
        dict(
            type="BenchAlexNet",
            init_cfg=dict(type="Pretrained", checkpoint=str(ckpt), prefix="backbone."),
        )
    )
    backbone.init_weights()
    for k, v in enc.state_dict().items():
        assert torch.equal(backbone.state_dict()[k], v), k
    (out,) = backbone(torch.randn(1, 3, 97, 131))
    assert out.shape[-2:] == (4, 5)  # ceil(97 / 32), ceil(131 / 32)


@pytest.mark.mmseg
@needs_mmseg
def test_short_mmseg_run_writes_metrics(synth_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = SegmentationConfig(
        data=str(synth_root), backend="mmseg", iterations=4, fc_dim=16, max_size=64,
        log_every=2, checkpoint_every=2, save_overlays=2, device="cpu",
    )  # fmt: skip
    m = main(cfg, open_run(tmp_path / "run", cfg))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["backend"] == "mmseg" and saved["task"] == "segmentation"
    assert 0.0 <= m["mean_iu"] <= 1.0 and saved["split"] == m["split"]
    assert len(m["overlays"]) == 2 and (tmp_path / "run" / m["overlays"][0]).is_file()


def test_mmseg_export_is_checked_and_used_as_is(tmp_path: Path) -> None:
    """`bench export --format mmseg` files feed init_cfg directly, after a key/shape check."""
    from pretrain.alexnet import AlexNetEncoder
    from transfer.segmentation.mmseg_backend import mmseg_weights

    enc = AlexNetEncoder("torchvision")
    state = {f"backbone.{k}": v for k, v in enc.state_dict().items()}
    good = tmp_path / "encoder_mmseg.pth"
    torch.save({"state_dict": state, "meta": {"method": "context-encoder"}}, good)
    cfg = SegmentationConfig(weights=str(good), backend="mmseg")
    run = open_run(tmp_path / "run", cfg)
    path, card, arch = mmseg_weights(cfg, run)
    assert path == good and arch == "torchvision" and card["method"] == "context-encoder"

    bad = tmp_path / "bad_mmseg.pth"
    state["backbone.features.3.weight"] = torch.zeros(1, 2, 3, 3)
    torch.save({"state_dict": state, "meta": {}}, bad)
    cfg = SegmentationConfig(weights=str(bad), backend="mmseg")
    with pytest.raises(BenchError, match=r"bad_mmseg\.pth: features\.3\.weight has shape"):
        mmseg_weights(cfg, open_run(tmp_path / "run2", cfg))
