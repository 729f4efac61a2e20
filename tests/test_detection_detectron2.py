"""The detectron2 backend. Without detectron2: the module imports, `backend: detectron2` is a
one-line install hint, unsupported options are one-line errors, and a hostile weights pickle
runs no code. With detectron2 (the `detectron2`-marked tests, which skip without it):
exported weights load with only the new head's tensors missing, the detectron2 config the
backend writes loads with plain `get_cfg()`, a tiny run completes through `loop.fit`, and a
run interrupted and resumed ends with bit-identical weights and metrics."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from benchmark.errors import BenchError, ConfigError
from benchmark.runs import open_run
from transfer import common
from transfer.detection import detectron2_backend as backend
from transfer.detection.config import DetectionConfig, DetectionTrainConfig
from transfer.detection.train import main

REPO = Path(__file__).resolve().parent.parent
# Image sizes and widths small enough for a CPU test run; "fixed" box-target scaling and the
# coco branch's test post-processing, the only ones detectron2 can express.
TINY = dict(
    bbox_normalize="fixed", test_postprocess="coco",
    scales=(96,), max_size=160, test_scale=96, test_max_size=160, fc_dim=64, ss_min_box=8,
    ss_max_boxes=300,
)  # fmt: skip
TINY_TRAIN = dict(iterations=4, rois_per_batch=32, workers=0, log_every=2, precision="fp32",
                  threads=1)


def tiny_config(data: Path, train: dict | None = None, **kw) -> DetectionConfig:
    t = DetectionTrainConfig(**{**TINY_TRAIN, **(train or {})})
    return DetectionConfig(backend="detectron2", data=str(data), train=t, **{**TINY, **kw})


@pytest.fixture
def results(tmp_path_factory, monkeypatch) -> Path:
    """One results root (and so one selective-search cache) for every test of the module."""
    root = tmp_path_factory.getbasetemp() / "d2-results"
    monkeypatch.setenv("BENCH_RESULTS", str(root))
    return root


@pytest.fixture
def d2():
    """detectron2, or a skip where it is not importable (it is not on PyPI)."""
    pytest.importorskip("detectron2")
    pytest.importorskip("detectron2.modeling")
    return backend.require_detectron2()


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------ without detectron2


def test_module_imports_without_detectron2():
    code = (
        "import sys; sys.modules['detectron2'] = None\n"
        "import transfer.detection.detectron2_backend as b\n"
        "import transfer.detection.train\n"
        "assert 'detectron2' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
        "try:\n    b.require_detectron2()\nexcept Exception as e:\n    print(type(e).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "BenchError"


def test_missing_detectron2_is_one_line_with_install_hint(monkeypatch, synth_root, tmp_path):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # import fails as if not installed
    with pytest.raises(BenchError) as err:
        backend.require_detectron2()
    assert "pip install" in one_line_error(err) and "detectron2" in str(err.value)
    cfg = tiny_config(synth_root)
    run = open_run(tmp_path / "run", cfg)
    with pytest.raises(BenchError) as err:
        main(cfg, run)
    run.close()
    assert "pip install" in one_line_error(err) and "backend: native" in str(err.value)


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"rescale": True}, "rescale"),
        ({"test_postprocess": "master"}, "backend: native"),
        ({"bbox_normalize": "data"}, "BBOX_REG_WEIGHTS"),
        ({"train": {"compile": True}}, "train.compile"),
        ({"bg_thresh_hi": 0.6, "fg_thresh": 0.5}, "bg_thresh_hi"),
    ],
)
def test_unsupported_options_are_one_line_config_errors(kw, words, synth_root, tmp_path):
    cfg = tiny_config(synth_root, **kw)
    run = open_run(tmp_path / "run", cfg)
    with pytest.raises(ConfigError) as err:
        main(cfg, run)  # before detectron2 is even imported
    run.close()
    assert words in one_line_error(err)


def test_torchrun_is_refused(monkeypatch, synth_root):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BenchError) as err:
        backend.check_supported(tiny_config(synth_root))
    assert "torchrun" in one_line_error(err) and "WORLD_SIZE" in str(err.value)


def test_iou_bands_are_fast_rcnns():
    cfg = DetectionConfig()
    assert backend.iou_bands(cfg) == ([0.1, 0.5], [-1, 0, 1])
    cfg = DetectionConfig(bg_thresh_lo=0.0, bg_thresh_hi=0.3, fg_thresh=0.5)
    assert backend.iou_bands(cfg) == ([0.3, 0.5], [0, -1, 1])


def test_lr_schedule_is_multistep_without_warmup():
    t = DetectionTrainConfig(lr=1e-3, lr_steps=(3, 5), gamma=0.1)
    lrs = [backend.lr_at(t, i) for i in range(7)]
    assert lrs[:3] == [1e-3] * 3 and lrs[3:5] == [pytest.approx(1e-4)] * 2
    assert lrs[5:] == [pytest.approx(1e-5)] * 2


class _Hostile:
    """Unpickling this calls `func(*args)`: what a malicious weights file does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("kind", ["system", "open"])
def test_hostile_pickle_runs_no_code(kind, tmp_path):
    marker = tmp_path / "pwned"
    payload = (
        _Hostile(os.system, f"touch {marker}")
        if kind == "system"
        else _Hostile(open, str(marker), "w")
    )
    path = tmp_path / "encoder_detectron2.pkl"
    path.write_bytes(pickle.dumps({"model": {"backbone.features.0.weight": payload}}))
    with pytest.raises(BenchError) as err:
        backend.load_weights(str(path), "caffenet")
    assert "not allowed" in one_line_error(err) and str(path) in str(err.value)
    assert not marker.exists()


def test_malformed_pickles_are_one_line_errors(tmp_path):
    cases = {
        "list.pkl": [1, 2, 3],
        "scalar.pkl": {"model": {"backbone.features.0.weight": 3}},
        "head.pkl": {"model": {"roi_heads.box_predictor.cls_score.weight": np.zeros((2, 2))}},
        "shape.pkl": {"model": {"backbone.features.0.weight": np.zeros((96, 3, 3, 3), np.float32)}},
        "object.pkl": {"model": {"backbone.features.0.weight": np.array([None, 1], object)}},
    }
    for name, blob in cases.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps(blob))
        with pytest.raises(BenchError) as err:
            backend.load_weights(str(path), "caffenet")
        assert str(path) in one_line_error(err), name


def _export(tmp_path: Path, arch: str = "caffenet", pool_free: bool = False):
    """A finished pretraining run folder exported with `bench export --format detectron2`."""
    from encoders.alexnet import AlexNetEncoder
    from weights.encoder import random_card
    from weights.native import export, write_native

    torch.manual_seed(1)
    encoder = AlexNetEncoder(arch, pool_free)  # type: ignore[arg-type]
    card = {**random_card(arch, pool_free), "method": "context-encoder", "pretrain_seconds": 12.5}
    run_dir = tmp_path / f"pretrain-{arch}-{pool_free}"
    write_native(run_dir / "encoder.safetensors", encoder.state_dict(), card)
    return encoder, export(run_dir, "detectron2")


def test_exported_pickle_reads_as_its_encoder(tmp_path):
    encoder, pkl = _export(tmp_path, "alexnet-plain", pool_free=True)
    state, card = backend.load_weights(str(pkl), "caffenet")
    assert (card["arch"], card["pool_free"], card["method"]) == (
        "alexnet-plain",
        True,
        "context-encoder",
    )
    expected = {f"backbone.{k}" for k in encoder.state_dict() if not k.startswith("features.12.")}
    assert set(state) == expected  # pool5's conv is not part of the stride-16 backbone
    assert torch.equal(state["backbone.features.3.weight"], encoder.features[3].weight)


# ------------------------------------------------------------------ with detectron2


def _d2cfg(cfg: DetectionConfig, tmp_path: Path, arch: str, pool_free: bool, device: str = "cpu"):
    return backend.fast_rcnn_config(
        cfg, arch=arch, pool_free=pool_free, train_dataset="unused_train",
        test_dataset="unused_test", output_dir=tmp_path / "d2", device=device,
    )  # fmt: skip


@pytest.mark.detectron2
@pytest.mark.parametrize(
    "arch, pool_free", [("caffenet", False), ("alexnet-plain", False), ("caffenet", True)]
)
def test_exported_weights_load_with_only_the_new_head_missing(d2, tmp_path, arch, pool_free):
    encoder, pkl = _export(tmp_path, arch, pool_free)
    with open(pkl, "rb") as f:  # our own export, read plainly to compare
        exported = pickle.load(f)["model"]
    state, card = backend.load_weights(str(pkl), "caffenet")
    assert (card["arch"], card["pool_free"]) == (arch, pool_free)
    d2cfg = _d2cfg(DetectionConfig(fc_dim=64), tmp_path, arch, pool_free)
    assert d2cfg.MODEL.BACKBONE.NAME == backend.backbone_name(arch, pool_free)
    assert d2cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == "ROIPool"
    assert d2cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION == 6
    assert d2cfg.MODEL.PROPOSAL_GENERATOR.NAME == "PrecomputedProposals"
    assert d2cfg.MODEL.WEIGHTS == ""  # detectron2 never opens a weights file
    model = backend.build_fast_rcnn(d2cfg)
    backend.load_into_model(model, state, pkl)
    model_state = model.state_dict()
    missing = set(model_state) - set(state)
    assert missing and all(k.startswith(backend.NEW_HEAD_PREFIXES) for k in missing)
    assert {k.split(".")[1] for k in missing} == {"box_head", "box_predictor"}
    backbone = {k for k in model_state if k.startswith("backbone.")}
    assert backbone == set(state) and backbone <= set(exported)
    pool5 = {"backbone.features.12.weight", "backbone.features.12.bias"}
    assert set(exported) - backbone == (pool5 if pool_free else set())
    for key in backbone:
        assert np.array_equal(model_state[key].numpy(), exported[key]), key
    assert torch.equal(model_state["backbone.features.0.weight"], encoder.features[0].weight)
    assert not model.backbone.features[0].weight.requires_grad  # freeze_at=1: conv1 fixed
    assert model.backbone.features[3].weight.requires_grad
    assert model.backbone.output_shape()["conv5"].stride == 16
    head = model.roi_heads.box_head
    assert head.fc6.in_features == 256 * 6 * 6 and head.fc7.out_features == 64
    assert head.dropout.p == 0.5
    # An encoder of another arch does not fit: one line naming the tensors.
    other, _ = backend.load_weights(None, "torchvision")
    with pytest.raises(BenchError) as err:
        backend.load_into_model(model, other, "tv")
    assert "detectron2 model" in one_line_error(err) and "backbone.features." in str(err.value)


PLAIN_LOAD = """
import json, sys
from detectron2.config import get_cfg
cfg = get_cfg()
cfg.merge_from_file(sys.argv[1])
print(json.dumps({"device": cfg.MODEL.DEVICE, "backbone": cfg.MODEL.BACKBONE.NAME,
                  "head": cfg.MODEL.ROI_BOX_HEAD.NAME, "fc_dim": cfg.MODEL.ROI_BOX_HEAD.FC_DIM,
                  "weights": list(cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS),
                  "bench": [m for m in sys.modules if m.startswith(("transfer", "pretrain"))]}))
"""


@pytest.mark.detectron2
def test_config_yaml_loads_with_plain_detectron2(d2, tmp_path):
    from detectron2.config import get_cfg

    cfg = DetectionConfig(dropout=0.25, fc_dim=128)
    d2cfg = _d2cfg(cfg, tmp_path, "alexnet-plain", True, device="cuda:1")
    path = tmp_path / "config.yaml"
    path.write_text(d2cfg.dump())
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(path)], capture_output=True, text=True, timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["device"] == "cuda:1"  # the index is kept
    assert loaded["backbone"] == "BenchAlexNet_alexnet_plain_poolfree"
    assert loaded["head"] == "BenchAlexNetFCHead_dropout0.25" and loaded["fc_dim"] == 128
    assert loaded["weights"] == [10.0, 10.0, 5.0, 5.0] and loaded["bench"] == []
    # The file round-trips in full, and a model built from it has what the config encodes.
    again = get_cfg()
    again.merge_from_file(str(path))
    assert yaml.safe_load(again.dump()) == yaml.safe_load(d2cfg.dump())
    again.defrost()
    again.MODEL.DEVICE = "cpu"
    model = backend.build_fast_rcnn(again)
    assert model.backbone.features[2].__class__.__name__ == "Conv2d"  # pool-free
    assert model.backbone.features[3].groups == 1  # alexnet-plain: ungrouped conv2
    assert model.roi_heads.box_head.dropout.p == 0.25
    assert model.roi_heads.box_head.fc7.out_features == 128


# Beyond `transfer.common.metrics_head`'s keys: what the native backend writes, and detectron2's.
METRIC_KEYS = {
    "map", "coco_ap", "per_class", "bbox_normalize", "rescale", "iterations", "train_seconds",
    "test_seconds", "precision", "device", "initial_loss", "final_loss", "train_images",
    "test_images", "skipped", "mean_proposals", "detectron2_ap50", "detectron2_ap75",
    "detectron2_ap", "detectron2_version",
}  # fmt: skip


@pytest.mark.detectron2
def test_tiny_detectron2_run(d2, tmp_path, synth_root, results):
    from detectron2.config import get_cfg

    _, pkl = _export(tmp_path)
    cfg = tiny_config(synth_root, weights=str(pkl))
    run = open_run(tmp_path / "run", cfg)
    metrics = main(cfg, run)
    run.close()
    _, card = backend.load_weights(str(pkl), "caffenet")
    head = common.metrics_head("detection", "detectron2", cfg, run, card, "caffenet")
    assert set(metrics) == set(head) | METRIC_KEYS
    assert {k: metrics[k] for k in head} == head
    assert "bbox_normalize" in metrics["departures"]  # detectron2 cannot run 'data'
    assert metrics["backend"] == "detectron2" and metrics["method"] == "context-encoder"
    assert metrics["arch"] == "caffenet" and metrics["pretrain_seconds"] == 12.5
    assert metrics["iterations"] == 4 and metrics["device"] == "cpu"
    assert 0.0 <= metrics["map"] <= 1.0 and metrics["detectron2_ap50"] is not None
    assert np.isfinite(metrics["initial_loss"]) and np.isfinite(metrics["final_loss"])
    folder = tmp_path / "run"
    assert json.loads((folder / "metrics.json").read_text())["map"] == metrics["map"]
    assert (folder / "detections" / "comp4_det_test_dog.txt").is_file()
    ckpt = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["stage"] == "transfer/detection/detectron2" and ckpt["iteration"] == 4
    assert set(ckpt["state"]) == {"model", "optimizer", "precision"}
    rows = [json.loads(line) for line in (folder / "scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert {"train/loss", "train/loss_cls", "train/loss_box", "train/lr"} <= set(rows[0])
    plain = get_cfg()
    plain.merge_from_file(str(folder / "detectron2" / "config.yaml"))
    assert plain.MODEL.BACKBONE.NAME == "BenchAlexNet_caffenet"
    assert plain.MODEL.ROI_BOX_HEAD.NAME == "BenchAlexNetFCHead_dropout0.5"
    assert plain.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 16 and plain.SOLVER.MAX_ITER == 4


@pytest.mark.detectron2
def test_hostile_pickle_through_the_backend_runs_no_code(d2, tmp_path, synth_root, results):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": _Hostile(os.system, f"touch {marker}")}))
    cfg = tiny_config(synth_root, weights=str(path))
    run = open_run(tmp_path / "run", cfg)
    with pytest.raises(BenchError) as err:
        main(cfg, run)
    run.close()
    assert "refused to unpickle" in one_line_error(err)
    assert not marker.exists()


def _final(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["state"]["model"]


SAME_METRICS = ("map", "coco_ap", "per_class", "initial_loss", "final_loss", "detectron2_ap50",
                "detectron2_ap", "iterations", "train_images", "test_images")  # fmt: skip


@pytest.mark.detectron2
def test_interrupted_run_resumes_bit_identical(d2, tmp_path, synth_root, results, monkeypatch):
    torch.set_num_threads(1)
    cfg = tiny_config(synth_root, train={"iterations": 6, "checkpoint_every": 6})
    run = open_run(tmp_path / "straight", cfg)
    reference = main(cfg, run)
    run.close()

    # Two loader processes here, none in the straight run: a sample's scale and flip are a
    # function of its number, not of the process or the stream that drew it.
    cut = tiny_config(synth_root, train={"iterations": 6, "checkpoint_every": 2, "workers": 2})
    real_make_step, calls = backend.make_step, []

    def crashing_make_step(*args, **kwargs):
        step = real_make_step(*args, **kwargs)

        def crash_after_three(batch, iteration):
            calls.append(iteration)
            if len(calls) == 4:
                raise KeyboardInterrupt  # killed after iteration 3; last checkpoint: 2
            return step(batch, iteration)

        return crash_after_three

    monkeypatch.setattr(backend, "make_step", crashing_make_step)
    run = open_run(tmp_path / "cut", cut)
    with pytest.raises(KeyboardInterrupt):
        main(cut, run)
    run.close()
    monkeypatch.setattr(backend, "make_step", real_make_step)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)["iteration"] == 2

    run = open_run(tmp_path / "cut", cut, resume=True)
    resumed = main(cut, run)
    run.close()
    assert "resumed from iteration 2" in (tmp_path / "cut" / "log.txt").read_text()
    a, b = _final(tmp_path / "straight"), _final(tmp_path / "cut")
    torch.manual_seed(cfg.seed)
    initial, _ = backend.load_weights(None, cfg.arch)  # the run's random init
    assert torch.equal(initial["backbone.features.0.weight"], a["backbone.features.0.weight"])
    assert not torch.equal(initial["backbone.features.3.weight"], a["backbone.features.3.weight"])
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    for key in SAME_METRICS:
        assert resumed[key] == reference[key], key


KILLED = """
import sys
from benchmark.runs import open_run
from transfer.detection.config import DetectionConfig, DetectionTrainConfig
from transfer.detection.train import main
cfg = DetectionConfig(**{**eval(sys.argv[2]), "train": DetectionTrainConfig(**eval(sys.argv[3]))})
main(cfg, open_run(sys.argv[1], cfg, resume=True))
"""


@pytest.mark.detectron2
@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_bit_identical(d2, tmp_path, synth_root, results):
    """kill -9 after iteration 3 (benchmark.faults), resume in-process: same weights."""
    torch.set_num_threads(1)
    train = {**TINY_TRAIN, "iterations": 6, "checkpoint_every": 2}
    top = {**TINY, "backend": "detectron2", "data": str(synth_root)}
    cfg = DetectionConfig(**top, train=DetectionTrainConfig(**train))
    env = {**os.environ, "BENCH_FAULT": "step:3", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED), str(tmp_path / "killed"), repr(top),
         repr(train)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == -9, out.stderr[-2000:]
    run = open_run(tmp_path / "killed", cfg, resume=True)
    resumed = main(cfg, run)
    run.close()
    run = open_run(tmp_path / "straight", cfg)
    reference = main(cfg, run)
    run.close()
    a, b = _final(tmp_path / "straight"), _final(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in SAME_METRICS:
        assert resumed[key] == reference[key], key


def _inputs(n: int = 2, size: int = 96) -> list[dict]:
    """Mapped detectron2 inputs: an image, 16 proposals and 2 ground-truth boxes each."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        xy = torch.randint(0, size // 2, (16, 2), generator=g).float()
        props = Instances((size, size))
        props.proposal_boxes = Boxes(torch.cat([xy, xy + size // 3], 1))
        props.objectness_logits = -torch.arange(16).float()
        gt = Instances((size, size))
        gt.gt_boxes = Boxes(torch.tensor([[4.0, 4.0, 40.0, 50.0], [30.0, 20.0, 90.0, 80.0]]))
        gt.gt_classes = torch.tensor([3, 11])
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        out.append({"image": image, "proposals": props, "instances": gt})
    return out


@pytest.mark.detectron2
def test_bf16_autocast_trains_and_infers_on_cpu(d2, tmp_path):
    """`train.precision: auto` is bf16 on CPUs with AMX / AVX-512 BF16."""
    from detectron2.utils.events import EventStorage

    model = backend.build_fast_rcnn(_d2cfg(DetectionConfig(fc_dim=32), tmp_path, "caffenet", False))
    with EventStorage(0), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(_inputs())
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_inputs(1))
    assert "instances" in out[0]


@pytest.mark.detectron2
def test_nan_loss_stops_with_one_line_naming_the_iteration(
    d2, tmp_path, synth_root, results, monkeypatch
):
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    real = FastRCNNOutputLayers.losses

    def nan_losses(self, predictions, proposals):
        return {k: v * float("nan") for k, v in real(self, predictions, proposals).items()}

    monkeypatch.setattr(FastRCNNOutputLayers, "losses", nan_losses)
    cfg = tiny_config(synth_root)
    run = open_run(tmp_path / "run", cfg)
    with pytest.raises(BenchError) as err:
        main(cfg, run)
    run.close()
    msg = one_line_error(err)
    assert msg.startswith("iteration 1: loss is nan") and "before the update" in msg
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
