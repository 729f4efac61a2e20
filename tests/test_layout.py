"""`train.channels_last`: every stage's step feeds its model NHWC batches when it is on (on
CPU too) and plain NCHW ones when it is off; the probes extract features from NHWC batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from benchmark.input_convention import TORCHVISION
from benchmark.loop import Precision, nhwc, to_device

CPU = torch.device("cpu")
FP32 = Precision("fp32", CPU)


def _is_nhwc(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class Recorder(nn.Module):
    """Records the memory layout of its image input; outputs `out(x)` of a learnable scale."""

    def __init__(self, out):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.out = out
        self.layouts: list[bool] = []

    def forward(self, x: torch.Tensor, *rest, **kw):
        self.layouts.append(_is_nhwc(x))
        return self.out(x * self.scale, *rest, **kw)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": model.parameters(), "lr_mult": 1.0}], lr=0.01)


def test_nhwc_is_channels_last_or_plain_and_leaves_other_tensors():
    x = torch.randn(2, 3, 5, 7)
    assert _is_nhwc(nhwc(x))
    back = nhwc(nhwc(x), channels_last=False)
    assert back.is_contiguous() and torch.equal(back, x)
    v = torch.randn(4, 5)
    assert nhwc(v) is v
    batch = to_device({"image": x, "rois": v, "ids": ["a"]}, CPU, channels_last=True)
    assert _is_nhwc(batch["image"]) and batch["rois"].is_contiguous() and batch["ids"] == ["a"]
    # the values are the same whatever the layout
    assert torch.equal(nhwc(x), x)


@pytest.mark.parametrize("channels_last", [True, False])
def test_pretraining_step_feeds_its_layout(channels_last):
    from pretrain.train import make_step

    model = Recorder(lambda x: x)
    step = make_step(model, _sgd(model), FP32, CPU, fill=torch.zeros(3),
                     channels_last=channels_last)  # fmt: skip
    mask = torch.zeros(2, 1, 9, 9)
    mask[..., 3:6, 3:6] = 1
    step({"image": torch.randn(2, 3, 9, 9), "mask": mask}, 0)
    assert model.layouts == [channels_last]


@pytest.mark.parametrize("channels_last", [True, False])
def test_classification_step_feeds_its_layout(channels_last):
    from transfer.classification.config import TrainConfig
    from transfer.classification.train import make_step

    model = Recorder(lambda x: x.mean((2, 3)).repeat(1, 7)[:, :20])
    step = make_step(model, _sgd(model), TrainConfig(channels_last=channels_last), FP32, CPU,
                     TORCHVISION)  # fmt: skip
    images = torch.randint(0, 256, (2, 3, 11, 11), dtype=torch.uint8)
    step((images, torch.ones(2, 20), torch.ones(2, 20, dtype=torch.bool)), 0)
    assert model.layouts == [channels_last]


@pytest.mark.parametrize("channels_last", [True, False])
def test_detection_step_feeds_its_layout(channels_last):
    from transfer.detection.config import DetectionTrainConfig
    from transfer.detection.train import make_step

    def heads(x, rois):
        s = x.mean() * torch.ones(len(rois), 1)
        return s.repeat(1, 21), s.repeat(1, 84)

    model = Recorder(heads)
    step = make_step(model, _sgd(model), DetectionTrainConfig(channels_last=channels_last),
                     FP32, CPU)  # fmt: skip
    batch = {
        "images": torch.randn(1, 3, 16, 16),
        "rois": torch.tensor([[0.0, 1, 1, 8, 8], [0, 2, 2, 12, 12]]),
        "labels": torch.tensor([0, 3]),
        "targets": torch.zeros(2, 4),
    }
    step(batch, 0)
    assert model.layouts == [channels_last]


@pytest.mark.parametrize("channels_last", [True, False])
def test_segmentation_step_feeds_its_layout(channels_last):
    from transfer.segmentation.config import SegmentationTrainConfig
    from transfer.segmentation.train import make_step

    def scores(x, out_size):
        return x.mean(1, keepdim=True).repeat(1, 21, 1, 1)

    model = Recorder(scores)
    t = SegmentationTrainConfig(iter_size=1, channels_last=channels_last)
    step = make_step(model, _sgd(model), t, True, FP32, CPU, TORCHVISION)
    image = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    step([(image, np.ones((8, 10), dtype=np.uint8))], 0)
    assert model.layouts == [channels_last]


def test_probe_features_are_extracted_from_nhwc_batches(monkeypatch):
    """The probes' forward gets NHWC batches and gives the features NCHW gives."""
    from benchmark.loop import Precision
    from encoders.alexnet import AlexNetEncoder
    from transfer.probes import features as F

    torch.manual_seed(0)
    enc = AlexNetEncoder("caffenet").eval()
    specs = F.layer_specs(enc, ("conv3", "pool5"), 99)
    taps = F.LayerTaps(enc.features, specs)
    seen: list[bool] = []
    taps.register_forward_pre_hook(lambda m, args: seen.append(_is_nhwc(args[0])))
    x = torch.randn(2, 3, 99, 99)
    loader = [(x, torch.arange(2), ["", ""])]
    arrays = {n: np.zeros((2, s.dim), np.float32) for n, s in specs.items()}
    F._run(taps, loader, CPU, specs, arrays, np.ones(2, bool), [], "error", Precision("fp32", CPU))
    assert seen == [True]
    with torch.no_grad():
        plain = {n: v.numpy() for n, v in taps(x).items()}
    for name in specs:
        np.testing.assert_allclose(arrays[name], plain[name], rtol=1e-4, atol=1e-4)
