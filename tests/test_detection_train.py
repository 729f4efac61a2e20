"""End to end on CPU: Fast R-CNN learns to detect on tiny synthetic data, writes the run
folder (metrics, VOC results files, checkpoint), is not redone once finished, and checks
every annotation and image before training."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from bench.stages import run_stage, transfer_stage
from benchmark.config import from_dict
from benchmark.datasets.voc import VOC_CLASSES
from benchmark.errors import DatasetError
from benchmark.runs import open_run
from transfer.detection import train as train_mod
from transfer.detection.config import DetectionConfig
from transfer.detection.data import load_records
from transfer.detection.evaluate import voc07_scores
from transfer.detection.proposals import attach_proposals
from transfer.detection.train import default_name, main

# Three classes told apart by colour, as the synthetic VOC's classes are (among other cues).
SHAPES = {"bus": (220, 40, 40), "dog": (40, 200, 60), "tvmonitor": (50, 70, 230)}


def _xml(image_id: str, w: int, h: int, objects: list[tuple[str, tuple[int, ...]]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><truncated>0</truncated><bndbox>"
        f"<xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax>"
        "</bndbox></object>"
        for n, b in objects
    )
    return (
        f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width>"
        f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>"
    )


def make_shapes_voc(root, n_train: int = 16, n_test: int = 8, size: int = 96, seed: int = 0):
    """A VOC2007 folder of textured backgrounds holding 1-2 coloured rectangles each."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(1, n_train + n_test + 1)]
    for image_id in ids:
        img = rng.normal(128, 20, (size, size, 3))
        objects = []
        for _ in range(int(rng.integers(1, 3))):
            name = list(SHAPES)[int(rng.integers(len(SHAPES)))]
            w, h = (int(v) for v in rng.integers(28, 52, 2))
            x, y = (int(v) for v in rng.integers(0, size - 52, 2))
            if any(min(x + w, b[2]) > max(x, b[0] - 1) and min(y + h, b[3]) > max(y, b[1] - 1)
                   for _, b in objects):  # fmt: skip
                continue  # keep objects apart
            img[y : y + h, x : x + w] = np.array(SHAPES[name]) + rng.normal(0, 10, (h, w, 3))
            objects.append((name, (x + 1, y + 1, x + w, y + h)))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            root / "JPEGImages" / f"{image_id}.jpg", quality=95
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, size, size, objects))
    (root / "ImageSets/Main/trainval.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (root / "ImageSets/Main/test.txt").write_text("\n".join(ids[n_train:]) + "\n")
    return root


def tiny_config(data, train=None, **kw) -> DetectionConfig:
    base = dict(
        data=str(data), rescale=True, fc_dim=128, scales=[160], max_size=256, test_scale=160,
        test_max_size=256, ss_min_box=8,
    )  # fmt: skip
    loop = dict(
        iterations=80, lr=0.003, lr_steps=[60], rois_per_batch=64, workers=0, log_every=20,
        checkpoint_every=40,
    )  # fmt: skip
    return from_dict(DetectionConfig, {**base, **kw, "train": {**loop, **(train or {})}})


def chance_map(voc, cfg, rng) -> float:
    """mAP of detections that score proposals at random: what "learned nothing" looks like."""
    records = load_records(voc, "test")
    attach_proposals(records, None, cfg, "test")
    dets = {c: [] for c in VOC_CLASSES}
    for r in records:
        for b in r.proposals[:20]:
            cls = list(SHAPES)[int(rng.integers(len(SHAPES)))]
            dets[cls].append((r.image_id, float(rng.random()), tuple(float(v) + 1 for v in b)))
    return voc07_scores(dets, records)[1]


@pytest.mark.slow  # about 40 s on two free cores, minutes on a loaded machine
def test_short_cpu_run_learns_and_writes_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path / "results"))
    voc = make_shapes_voc(tmp_path / "VOC2007")
    cfg = tiny_config(voc)
    assert default_name(cfg) == "det-random-s0"
    folder = tmp_path / "runs" / default_name(cfg)
    run = open_run(folder, cfg)
    metrics = main(cfg, run)
    run.close()
    chance = chance_map(voc, cfg, np.random.default_rng(0))
    assert chance < 0.25
    assert metrics["map"] > max(0.5, 3 * chance), (metrics["per_class"], chance)
    assert set(k for k, v in metrics["per_class"].items() if v is not None) == set(SHAPES)
    assert 0 < metrics["coco_ap"] < metrics["map"]
    saved = json.loads((folder / "metrics.json").read_text())
    for key in ("stage", "task", "method", "pretrain_seconds", "weights", "backend", "map",
                "coco_ap", "per_class", "seed", "skipped"):  # fmt: skip
        assert key in saved, key
    assert saved["stage"] == "transfer" and saved["task"] == "detection"
    assert saved["method"] == "random" and saved["backend"] == "native"
    assert saved["iterations"] == 80 and saved["skipped"] == {"count": 0, "items": []}
    files = sorted(p.name for p in (folder / "detections").iterdir())
    assert len(files) == len(VOC_CLASSES) and files[0] == "comp4_det_test_aeroplane.txt"
    line = (folder / "detections" / "comp4_det_test_bus.txt").read_text().split("\n")[0]
    assert len(line.split()) == 6
    assert list((tmp_path / "results" / "cache" / "proposals").glob("*.npz"))
    # One checkpoint layout: the loop's last.pt holds the final weights (no final.pt).
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["last.pt"]
    ckpt = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["format"] == "bench-checkpoint/1" and ckpt["stage"] == "transfer/detection"
    assert ckpt["iteration"] == 80 and ckpt["config"]["train"]["iterations"] == 80
    assert set(ckpt["state"]) >= {"model", "optimizer"}
    weights = ckpt["state"]["model"]
    assert "fc6.weight" in weights and "bbox_pred.weight" in weights

    # Resuming a finished run trains nothing more and reports the same detections.
    monkeypatch.setattr(
        train_mod, "make_step", lambda *a, **k: pytest.fail("a finished run was retrained")
    )
    path, again = run_stage(transfer_stage("detection"), cfg, tmp_path / "runs", resume=True)
    assert path == folder and again["map"] == pytest.approx(metrics["map"])
    after = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["state"]["model"]
    assert all(torch.equal(weights[k], after[k]) for k in weights)


def _break_first_box(voc, image_id: str) -> None:
    """xmin > xmax in the first object of `image_id`'s annotation, which `bench data check`
    flags."""
    xml = voc / "Annotations" / f"{image_id}.xml"
    text = xml.read_text()
    xmin = int(re.search(r"<xmin>(\d+)</xmin>", text).group(1))
    xmax = int(re.search(r"<xmax>(\d+)</xmax>", text).group(1))
    text = text.replace(f"<xmin>{xmin}</xmin>", f"<xmin>{xmax + 5}</xmin>", 1)
    xml.write_text(text)


def test_bad_box_stops_the_run_before_training_or_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path / "results"))
    torch.set_num_threads(1)
    voc = make_shapes_voc(tmp_path / "VOC2007", n_train=6, n_test=3, size=64)
    bad = "000002"
    _break_first_box(voc, bad)
    tiny = dict(
        rescale=False, fc_dim=16, scales=[64], max_size=96, test_scale=64, test_max_size=96,
        train={"iterations": 2, "rois_per_batch": 16, "log_every": 1, "checkpoint_every": 2},
    )  # fmt: skip
    cfg = tiny_config(voc, **tiny)
    real_make_step = train_mod.make_step
    monkeypatch.setattr(train_mod, "make_step", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(DatasetError) as err:
        main(cfg, open_run(tmp_path / "strict", cfg))
    msg = str(err.value)
    assert f"{bad}.xml" in msg and "xmin" in msg and "xmax" in msg and "\n" not in msg, msg
    assert not (tmp_path / "strict" / "checkpoints").exists()

    monkeypatch.setattr(train_mod, "make_step", real_make_step)
    cfg = tiny_config(voc, on_bad_data="skip", **tiny)
    m = main(cfg, open_run(tmp_path / "lenient", cfg))
    assert m["skipped"] == {"count": 1, "items": [bad]}
    assert m["iterations"] == 2 and m["train_images"] == 5 and m["test_images"] == 3
    assert json.loads((tmp_path / "lenient" / "metrics.json").read_text())["skipped"]["count"] == 1
    assert (tmp_path / "lenient" / "checkpoints" / "last.pt").is_file()
