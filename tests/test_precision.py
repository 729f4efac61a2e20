"""The one precision setting: a short run in bf16 and in fp32 from one seed end within a stated
tolerance of each other's loss, on every stage, and the run records what ran."""

from __future__ import annotations

import pytest
import torch

from benchmark.config import from_dict
from benchmark.loop import Precision, resolve_precision
from benchmark.runs import open_run

# bf16 keeps 8 bits of mantissa (~3 significant digits): after a few steps from the same
# weights and batches the losses agree to about 1% (measured: < 1.5% on every stage here).
TOLERANCE = 0.05


pytestmark = pytest.mark.usefixtures("one_thread")  # every test here on one thread


def _stages(synth):
    import pretrain.inpainting.train as inpainting
    import pretrain.train as pretraining
    import transfer.classification.train as classification
    import transfer.detection.train as detection
    import transfer.segmentation.train as segmentation
    from pretrain.config import PretrainConfig
    from pretrain.inpainting.config import InpaintingConfig
    from transfer.classification.config import ClassificationConfig
    from transfer.detection.config import DetectionConfig
    from transfer.segmentation.config import SegmentationConfig

    loop = {"iterations": 3, "workers": 0, "log_every": 1}
    images, voc = str(synth / "unlabelled"), str(synth)
    return {
        "pretrain": (pretraining.main_context_encoder, PretrainConfig, {
            "data": images, "mask": "central", "model": {"input_size": 67},
            "train": {**loop, "batch_size": 4, "sample_every": 0, "lr": 1e-3}}),
        "inpainting": (inpainting.main, InpaintingConfig, {
            "data": images, "bottleneck": 16,
            "train": {**loop, "batch_size": 4, "load_size": 0, "sample_every": 0}}),
        "classification": (classification.main, ClassificationConfig, {
            "data": voc, "hidden": 16, "augment": {"crop": 67}, "test": {"mode": "center"},
            "train": {**loop, "batch_size": 4}}),
        "detection": (detection.main, DetectionConfig, {
            "data": voc, "fc_dim": 16, "scales": [96], "max_size": 160, "test_scale": 96,
            "test_max_size": 160, "train": {**loop, "rois_per_batch": 16}}),
        "segmentation": (segmentation.main, SegmentationConfig, {
            "data": voc, "fc_dim": 16, "pad": 0, "max_size": 64,
            "train": {**loop, "iter_size": 2}}),
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage", ["pretrain", "inpainting", "classification", "detection", "segmentation"]
)
def test_bf16_and_fp32_runs_agree(stage, synth_root, tmp_path):
    main, cls, base = _stages(synth_root)[stage]
    results = {}
    for precision in ("fp32", "bf16"):
        data = {**base, "train": {**base["train"], "precision": precision}}
        cfg = from_dict(cls, data)
        results[precision] = main(cfg, open_run(tmp_path / precision, cfg))
    a, b = results["fp32"], results["bf16"]
    assert a["precision"] == "fp32" and b["precision"] == "bf16"
    assert abs(a["final_loss"] - b["final_loss"]) <= TOLERANCE * abs(a["final_loss"])
    assert abs(a["initial_loss"] - b["initial_loss"]) <= TOLERANCE * abs(a["initial_loss"])


def test_auto_precision_follows_the_device():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    from benchmark.loop import cpu_has_fast_bf16

    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    from benchmark.errors import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    prec = Precision("bf16", cpu)
    w = torch.nn.Linear(4, 4)
    with prec.autocast():
        y = w(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16 and w.weight.dtype == torch.float32  # fp32 master weights
