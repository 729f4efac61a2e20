"""The mmsegmentation backend: trained by bench's loop, faithful to the native FCN-32s.

Without mmseg: a clean one-line error, an import that needs no OpenMMLab package, weights
loading that never runs code. With it (make mmseg): the same scores / loss / rescaling as the
native model on the same weights, a pipeline that never enlarges, mmseg's IoUMetric agreeing
with our confusion matrix, and a run that resumes bit-identically after an interruption.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.errors import BenchError, ConfigError
from benchmark.metrics import confusion_matrix
from benchmark.runs import mark_folder, open_run
from transfer.segmentation import mmseg_backend
from transfer.segmentation.config import SegmentationConfig, SegmentationTrainConfig
from transfer.segmentation.data import CLASSES
from transfer.segmentation.evaluate import NUM_CLASSES, scores_from_hist
from transfer.segmentation.train import main

MODULE = Path(mmseg_backend.__file__)


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


def tiny(root: Path, train: dict | None = None, **kw) -> SegmentationConfig:
    """Seconds-sized settings on the synthetic data (images 96-128 px, shrunk to 64)."""
    t = dict(iterations=4, iter_size=2, batch_size=1, lr=1e-3, solver="adam", log_every=1,
             checkpoint_every=100, workers=0, precision="fp32")  # fmt: skip
    t.update(train or {})
    base = dict(data=str(root), backend="mmseg", device="cpu", fc_dim=16, max_size=64,
                eval_images=3)  # fmt: skip
    base.update(kw)
    return SegmentationConfig(train=SegmentationTrainConfig(**t), **base)


# ---------------------------------------------------------------- without mmseg


def test_without_mmseg_the_backend_says_what_to_install(tmp_path, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_openmmlab(name: str, *args, **kwargs):
        if name.split(".")[0] in ("mmseg", "mmcv", "mmengine"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openmmlab)
    monkeypatch.setattr(mmseg_backend, "_REGISTERED", False)
    cfg = SegmentationConfig(backend="mmseg", train=SegmentationTrainConfig(iterations=1))
    run = open_run(tmp_path / "run", cfg)
    with pytest.raises(BenchError) as err:
        main(cfg, run)
    run.close()
    message = str(err.value)
    assert "\n" not in message and "make mmseg" in message and "mmsegmentation" in message
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_module_imports_without_openmmlab_and_without_the_native_trainer(monkeypatch) -> None:
    """mmseg / mmcv / mmengine only inside functions; no import of train.py (which imports
    this module): checked on the source and by importing with the packages blocked."""
    tree = ast.parse(MODULE.read_text())
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        assert not any(n.split(".")[0] in ("mmseg", "mmcv", "mmengine") for n in names), names
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module not in ("train", "transfer.segmentation.train"), node.module
            assert not (node.level and node.module == "train")
    for m in ("mmseg", "mmcv", "mmengine"):  # `import mmseg` now raises ImportError
        monkeypatch.setitem(sys.modules, m, None)
    for name, path in (("_mmseg_probe", MODULE), ("_train_probe", MODULE.with_name("train.py"))):
        spec = importlib.util.spec_from_file_location(f"transfer.segmentation.{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # a fresh copy, executed with the packages blocked
        assert hasattr(module, "run_mmseg" if name == "_mmseg_probe" else "main")


def test_nothing_is_unpickled_with_code() -> None:
    """The backend has no way left to load a file with weights_only=False."""
    source = MODULE.read_text()
    for needle in ("weights_only=False", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "trusted_checkpoints",
                   "import pickle", "CheckpointLoader", "init_cfg=dict(type"):  # fmt: skip
        assert needle not in source, needle
    assert "weights_only=True" in source


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_weights_and_checkpoint_never_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = tmp_path / "encoder_mmseg.pth"
    torch.save({"state_dict": {"backbone.features.0.weight": _Hostile(marker)}}, hostile)
    with pytest.raises(BenchError, match=r"encoder_mmseg\.pth: unreadable torch file") as err:
        mmseg_backend.load_mmseg_encoder(str(hostile), "caffenet")
    assert "\n" not in str(err.value)
    # a run folder whose checkpoint is hostile: resuming refuses it
    cfg = SegmentationConfig(backend="mmseg")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    mark_folder(tmp_path / "run", "run")  # a folder bench made, so that it is opened at all
    torch.save({"format": "bench-checkpoint/1", "x": _Hostile(marker)},
               tmp_path / "run" / "checkpoints" / "last.pt")  # fmt: skip
    with pytest.raises(BenchError, match="unreadable checkpoint"):
        open_run(tmp_path / "run", cfg, resume=True)
    assert not marker.exists()


def test_mmseg_export_is_checked_and_loaded_by_us(tmp_path: Path) -> None:
    """`bench export --format mmseg` files: arch from the card / tensors, keys, shapes."""
    from encoders.alexnet import AlexNetEncoder

    enc = AlexNetEncoder("torchvision")
    state = {f"backbone.{k}": v for k, v in enc.state_dict().items()}
    good = tmp_path / "encoder_mmseg.pth"
    torch.save({"state_dict": state, "meta": {"method": "context-encoder"}}, good)
    loaded, card = mmseg_backend.load_mmseg_encoder(str(good), "caffenet")
    assert (card["arch"], card["method"], card["source"]) == ("torchvision", "context-encoder",
                                                              str(good))  # fmt: skip
    for k, v in enc.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    grouped = AlexNetEncoder("caffenet")  # no card: the grouped conv2 says caffenet
    path = tmp_path / "caffenet_mmseg.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in grouped.state_dict().items()}},
               path)  # fmt: skip
    assert mmseg_backend.load_mmseg_encoder(str(path), "torchvision")[1]["arch"] == "caffenet"

    bad = tmp_path / "bad_mmseg.pth"
    state["backbone.features.3.weight"] = torch.zeros(1, 2, 3, 3)
    torch.save({"state_dict": state, "meta": {}}, bad)
    with pytest.raises(BenchError, match=r"bad_mmseg\.pth: features\.3\.weight has shape"):
        mmseg_backend.load_mmseg_encoder(str(bad), "caffenet")


def test_unsupported_settings_are_one_line_errors(tmp_path, monkeypatch) -> None:
    cfg = SegmentationConfig(backend="mmseg", variant="fcn8s")
    with pytest.raises(ConfigError, match="native-only") as err:
        mmseg_backend.check_supported(cfg)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="one process") as err:
        mmseg_backend.check_supported(SegmentationConfig(backend="mmseg"))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- with mmseg


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

    mmseg_backend.register()
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": CLASSES}
    hist = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for pred, label in _random_maps(0):
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
    exact = mmseg_backend.scores_from_areas(cols[0], cols[1], cols[3], CLASSES)
    assert exact["mean_iu"] == pytest.approx(ours["mean_iu"], abs=1e-12)
    for name, iu in ours["per_class"].items():
        other = exact["per_class"][name]
        assert (iu is None and other is None) or other == pytest.approx(iu, abs=1e-12), name


def _pair(cfg: SegmentationConfig, arch: str = "caffenet"):
    """An mmseg segmentor and the native FCN-32s with the same (random) weights."""
    from encoders.alexnet import AlexNetEncoder
    from transfer.segmentation.model import FCN

    torch.manual_seed(0)
    model = mmseg_backend.build_model(cfg, arch, False)
    head = model.decode_head
    torch.nn.init.normal_(head.conv_seg.weight, 0, 0.1)  # zero-initialised, as FCN's
    torch.nn.init.normal_(head.conv_seg.bias, 0, 0.1)
    fcn = FCN(AlexNetEncoder(arch), NUM_CLASSES, "fcn32s", cfg.fc_dim, cfg.dropout, cfg.pad,
              cfg.upsample)  # fmt: skip
    fcn.encoder.load_state_dict(model.backbone.state_dict())
    for ours, theirs in ((fcn.fc6, head.fc6), (fcn.fc7, head.fc7), (fcn.score_fr, head.conv_seg)):
        ours.load_state_dict(theirs.state_dict())
    return model.eval(), fcn.eval()


def _packed(cfg: SegmentationConfig, sample, train: bool = True, number: int = 0):
    steps = mmseg_backend.pipeline_config(cfg.max_size, cfg.mirror, train)
    return mmseg_backend.MMSegTrainSet([sample], steps, cfg.seed)[(0, number)]


def _data(cfg: SegmentationConfig, tmp_path: Path):
    from transfer.segmentation.data import prepare_data

    run = open_run(tmp_path / "data-run", cfg)
    try:
        return prepare_data(cfg, run)[0]
    finally:
        run.close()


@pytest.mark.mmseg
@needs_mmseg
@pytest.mark.parametrize("arch,upsample", [("caffenet", "deconv"), ("torchvision", "interpolate")])
def test_scores_and_losses_are_the_native_fcn32s(synth_root, tmp_path, arch, upsample) -> None:
    """Same weights, same unshrunk image: mmseg's scores at every pixel are the native
    FCN's (either edge rule); its loss is native `pixel_loss`, the mean or the sum."""
    from transfer.segmentation.data import load_pair, to_input
    from transfer.segmentation.train import pixel_loss

    cfg = tiny(synth_root, max_size=None, dropout=0.0, upsample=upsample)
    sample = _data(cfg, tmp_path).train[0]
    model, fcn = _pair(cfg, arch)
    image, label = load_pair(sample, None)
    data = model.data_preprocessor(mmseg_backend.one_image(_packed(cfg, sample)), True)
    with torch.no_grad():
        ours = model.decode_head(model.backbone(data["inputs"]))
        native = fcn(to_input(image, torch.device("cpu"), fcn.encoder.convention),
                     out_size=label.shape)  # fmt: skip
        assert ours.shape == native.shape == (1, NUM_CLASSES, *label.shape)
        torch.testing.assert_close(ours, native, rtol=1e-4, atol=1e-4)
        y = torch.from_numpy(label.copy()).long()[None]
        mean = model.parse_losses(model(**data, mode="loss"))[0]
        torch.testing.assert_close(mean, pixel_loss(native, y, True), rtol=1e-4, atol=0)
        total_model = mmseg_backend.build_model(
            tiny(synth_root, max_size=None, dropout=0.0, normalize_loss=False, upsample=upsample),
            arch,
            False,
        )
        total_model.load_state_dict(model.state_dict())
        data = model.data_preprocessor(mmseg_backend.one_image(_packed(cfg, sample)), True)
        total = total_model.parse_losses(total_model(**data, mode="loss"))[0]
        torch.testing.assert_close(total, pixel_loss(native, y, False), rtol=1e-4, atol=0)
    valid = int((label != 255).sum())
    assert float(total / mean) == pytest.approx(valid, rel=1e-4) and valid > 1000


@pytest.mark.mmseg
@needs_mmseg
def test_pipeline_only_shrinks_keeps_full_labels_and_flips_by_sample(synth_root, tmp_path):
    from benchmark.datasets.voc import read_label
    from transfer.segmentation.data import load_pair

    cfg = tiny(synth_root, max_size=1000)
    samples = _data(cfg, tmp_path).train[:4]
    for s in samples:  # never enlarged
        image, label = load_pair(s, None)
        item = _packed(cfg, s)
        assert tuple(item["inputs"].shape) == (3, *image.shape[:2])
        assert tuple(item["data_samples"].gt_sem_seg.data.shape) == (1, *label.shape)
    cfg = tiny(synth_root, max_size=64)
    for s in samples:  # shrunk as native (same pixels), label at full size
        image, label = load_pair(s, 64)
        item = _packed(cfg, s)
        assert max(item["inputs"].shape[1:]) == 64 and max(label.shape) > 64
        rgb = item["inputs"].permute(1, 2, 0).numpy()[..., ::-1]
        assert np.array_equal(rgb, image)
        assert np.array_equal(item["data_samples"].gt_sem_seg.data[0].numpy(), label)
    cfg = tiny(synth_root, mirror=True)
    s = samples[0]
    label = read_label(s.mask_path)
    flips = []
    for number in range(8):
        a, b = _packed(cfg, s, number=number), _packed(cfg, s, number=number)
        assert torch.equal(a["inputs"], b["inputs"])  # a function of the sample number
        flipped = bool(a["data_samples"].metainfo["flip"])
        want = label[:, ::-1] if flipped else label
        assert np.array_equal(a["data_samples"].gt_sem_seg.data[0].numpy(), want)
        flips.append(flipped)
    assert any(flips) and not all(flips)
    state = np.random.get_state()[1].copy()
    _packed(cfg, s, number=3)
    assert np.array_equal(np.random.get_state()[1], state)  # global generators restored


@pytest.mark.mmseg
@needs_mmseg
def test_rescale_is_the_native_data_dependent_init(synth_root, tmp_path, monkeypatch) -> None:
    """The same call as the native backend (transfer.rescale, same seed, same batch): a
    pretrained encoder and new fc6 / fc7 / score layers get the native FCN's weights."""
    from transfer.segmentation.train import rescale_ as native_rescale_

    fast_magic_init(monkeypatch)
    cfg = tiny(synth_root, pad=0)  # 227 px inputs unpadded: pool5 is fc6's 6x6
    samples = _data(cfg, tmp_path).train[:1]
    model, fcn = _pair(cfg)
    ours = mmseg_backend.rescale_(model, samples, True, seed=3, convention=fcn.encoder.convention)
    theirs = native_rescale_(fcn, samples, True, seed=3)
    assert len(ours) == len(theirs) and "conv_seg" in str(ours[-1]) + str(ours)
    head = model.decode_head
    pairs = [(head.fc6, fcn.fc6), (head.fc7, fcn.fc7), (head.conv_seg, fcn.score_fr)]
    pairs += [(model.backbone.features[i], fcn.encoder.features[i]) for i in (0, 3, 6, 8, 10)]
    for a, b in pairs:
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.bias, b.bias, rtol=1e-4, atol=1e-6)
    assert not model.training  # left in the mode it was in


@pytest.mark.mmseg
@needs_mmseg
def test_optimizer_groups_are_the_native_ones(synth_root) -> None:
    """FCN-AlexNet's multipliers: only the score layer's bias at 2x lr without decay."""
    cfg = tiny(synth_root, train=dict(solver="sgd", lr=0.01, weight_decay=5e-4))
    model = mmseg_backend.build_model(cfg, "caffenet", False)
    rest, score_bias = mmseg_backend.make_optimizer(model, cfg.train).param_groups
    assert score_bias["params"] == [model.decode_head.conv_seg.bias]
    assert (score_bias["lr"], score_bias["weight_decay"]) == (0.02, 0.0)
    assert (rest["lr"], rest["weight_decay"]) == (0.01, 5e-4)
    assert len(rest["params"]) == len(list(model.parameters())) - 1
    assert isinstance(mmseg_backend.make_optimizer(model, tiny(synth_root).train), torch.optim.Adam)


def fast_magic_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """One between-layer iteration instead of the reference's 10 (seconds, not a minute, on
    two CPU cores); both backends call transfer.rescale.magic_init_ through the same entry."""
    import functools

    from transfer import rescale

    monkeypatch.setattr(
        rescale, "magic_init_", functools.partial(rescale.magic_init_, iterations=1)
    )


def _final_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["stage"] == "transfer/segmentation/mmseg"
    return ckpt


@pytest.mark.mmseg
@needs_mmseg
def test_tiny_run_metrics_overlays_and_both_mean_ius(synth_root, tmp_path, monkeypatch) -> None:
    torch.set_num_threads(1)
    fast_magic_init(monkeypatch)
    cfg = tiny(synth_root, save_overlays=2, rescale=True, rescale_images=1, eval_every=2)
    run = open_run(tmp_path / "run", cfg)
    m = main(cfg, run)
    run.close()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    assert (saved["stage"], saved["task"], saved["backend"]) == ("transfer", "segmentation",
                                                                 "mmseg")  # fmt: skip
    assert (saved["device"], saved["iterations"], saved["iter_size"]) == ("cpu", 4, 2)
    assert saved["rescale"] and saved["arch"] == "caffenet" and saved["method"] == "random"
    assert "data-dependent init" in (tmp_path / "run" / "log.txt").read_text()
    native_keys = {"mean_iu", "pixel_acc", "mean_acc", "fw_iu", "per_class", "split",
                   "eval_images", "train_images", "train_sources", "train_seconds",
                   "eval_seconds", "precision", "initial_loss", "final_loss", "skipped",
                   "confusion_matrix", "overlays", "variant", "weights", "seed"}  # fmt: skip
    assert native_keys <= set(saved)
    assert saved["eval_images"] == 3 and 0.0 <= saved["mean_iu"] <= 1.0
    mm = saved["mmseg_iou_metric"]
    assert mm["mean_iu_exact"] == pytest.approx(saved["mean_iu"], abs=1e-12)
    assert mm["mIoU"] == pytest.approx(round(100 * saved["mean_iu"], 2), abs=1e-9)
    assert mm["aAcc"] == pytest.approx(round(100 * saved["pixel_acc"], 2), abs=1e-9)
    hist = np.array(saved["confusion_matrix"])
    assert scores_from_hist(hist, CLASSES)["mean_iu"] == saved["mean_iu"]
    assert len(saved["overlays"]) == 2 and (tmp_path / "run" / saved["overlays"][0]).is_file()
    assert _final_state(tmp_path / "run")["iteration"] == 4
    rows = [json.loads(r) for r in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/mean_iu" in r] == [2, 4]  # eval_every, the end


@pytest.mark.mmseg
@needs_mmseg
def test_interrupted_run_resumes_bit_identically(synth_root, tmp_path, monkeypatch) -> None:
    """5 iterations straight == checkpoint every 2, interrupted during the 4th (1 DataLoader
    worker), resumed (none): same final weights, optimiser state, losses and mean IU."""
    torch.set_num_threads(1)
    straight = tiny(synth_root, train=dict(iterations=5), mirror=True, dropout=0.5)
    run = open_run(tmp_path / "straight", straight)
    m_straight = main(straight, run)
    run.close()

    cfg = tiny(synth_root, train=dict(iterations=5, checkpoint_every=2, workers=1),
               mirror=True, dropout=0.5)  # fmt: skip
    real = mmseg_backend.make_step

    def crashing(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(batch, iteration):
            if iteration == 3:
                raise KeyboardInterrupt
            return step(batch, iteration)

        return wrapped

    monkeypatch.setattr(mmseg_backend, "make_step", crashing)
    run = open_run(tmp_path / "resumed", cfg)
    with pytest.raises(KeyboardInterrupt):
        main(cfg, run)
    run.close()
    assert _final_state(tmp_path / "resumed")["iteration"] == 2
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    monkeypatch.setattr(mmseg_backend, "make_step", real)
    cfg = tiny(synth_root, train=dict(iterations=5, checkpoint_every=2, workers=0),
               mirror=True, dropout=0.5)  # fmt: skip
    run = open_run(tmp_path / "resumed", cfg, resume=True)
    assert run.resumed
    m_resumed = main(cfg, run)
    run.close()

    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    assert a["iteration"] == b["iteration"] == 5
    assert a["state"]["model"].keys() == b["state"]["model"].keys()
    for k, v in a["state"]["model"].items():
        assert torch.equal(v, b["state"]["model"][k]), k
    for (ka, va), (kb, vb) in zip(a["state"]["optimizer"]["state"].items(),
                                  b["state"]["optimizer"]["state"].items()):  # fmt: skip
        assert ka == kb and all(torch.equal(va[n], vb[n]) for n in va), ka
    assert m_straight["mean_iu"] == m_resumed["mean_iu"]
    assert m_straight["confusion_matrix"] == m_resumed["confusion_matrix"]
    assert m_straight["final_loss"] == m_resumed["final_loss"]
    assert a["scalars"]["history"] == b["scalars"]["history"]
    assert "resumed from iteration 2" in (tmp_path / "resumed" / "log.txt").read_text()


KILLED = """
import sys
from benchmark.runs import open_run
from transfer.segmentation.config import SegmentationConfig, SegmentationTrainConfig
from transfer.segmentation.train import main
top, train = eval(sys.argv[2]), eval(sys.argv[3])
cfg = SegmentationConfig(**top, train=SegmentationTrainConfig(**train))
main(cfg, open_run(sys.argv[1], cfg))
"""


@pytest.mark.mmseg
@pytest.mark.slow
@needs_mmseg
def test_kill_9_then_resume_is_bit_identical(synth_root, tmp_path) -> None:
    """A real SIGKILL right after step 3 (benchmark.faults; the checkpoint is at 2), in a
    process with one DataLoader worker, then resumed here: the straight run's weights and
    metrics. (A process import of torch + mmseg takes seconds: hence `slow`.)"""
    train = dict(iterations=4, checkpoint_every=2, threads=1)  # as the killed process's
    cfg = tiny(synth_root, train=train, mirror=True)
    run = open_run(tmp_path / "straight", cfg)
    reference = main(cfg, run)
    run.close()
    top = dict(data=str(synth_root), backend="mmseg", device="cpu", fc_dim=16, max_size=64,
               eval_images=3, mirror=True)  # fmt: skip
    assert tiny(synth_root, train=train, **top) == cfg
    killed_train = {**cfg.train.__dict__, "workers": 1}
    env = {**os.environ, "BENCH_FAULT": "step:3", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", KILLED, str(tmp_path / "killed"), repr(top), repr(killed_train)],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert not (tmp_path / "killed" / "metrics.json").exists()
    run = open_run(tmp_path / "killed", cfg, resume=True)
    resumed = main(cfg, run)
    run.close()
    assert "resumed from iteration 2" in (tmp_path / "killed" / "log.txt").read_text()
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")
    assert all(torch.equal(v, b["state"]["model"][k]) for k, v in a["state"]["model"].items())
    for key in ("mean_iu", "confusion_matrix", "initial_loss", "final_loss"):
        assert resumed[key] == reference[key], key


@pytest.mark.mmseg
@needs_mmseg
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_is_honoured(synth_root, tmp_path) -> None:
    cfg = tiny(synth_root, device="cuda")
    run = open_run(tmp_path / "run", cfg)
    with pytest.raises(ConfigError, match="no usable CUDA GPU") as err:
        main(cfg, run)
    run.close()
    assert "\n" not in str(err.value)
