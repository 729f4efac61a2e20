"""The embedded synthetic dataset: real formats, determinism, learnability; and resolve_data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.datasets import resolve, synth
from benchmark.datasets.folder import list_images, load_rgb
from benchmark.datasets.synth import make_synthetic
from benchmark.datasets.voc import (
    VOC_CLASSES,
    VOC_PALETTE,
    classification_targets,
    load_detection,
    load_sbd,
    load_segmentation,
    read_class_files,
    read_mask,
    read_sbd_mat,
    read_split,
)
from benchmark.errors import DatasetError


def _tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_same_seed_gives_byte_identical_trees(tmp_path: Path) -> None:
    kw = dict(images=10, min_size=64, max_size=80, unlabelled=3)
    a = _tree(make_synthetic(tmp_path / "a", seed=5, **kw))
    b = _tree(make_synthetic(tmp_path / "b", seed=5, **kw))
    c = _tree(make_synthetic(tmp_path / "c", seed=6, **kw))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert any(k.endswith(".mat") for k in a)
    images = [k for k in a if k.endswith(".jpg")]
    assert images and all(a[k] != c[k] for k in images if k in c)


def test_layout_and_formats(synth_root: Path) -> None:
    v07 = synth_root / "VOCdevkit" / "VOC2007"
    v12 = synth_root / "VOCdevkit" / "VOC2012"
    sizes = {s: len(read_split(v07, s)) for s in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 6, "val": 6, "trainval": 12, "test": 12}
    assert set(read_split(v07, "train")) | set(read_split(v07, "val")) == set(
        read_split(v07, "trainval")
    )
    for split in ("trainval", "test"):
        annotations = load_detection(v07, split)
        ids, official = read_class_files(v07, split)
        assert ids == [a.image_id for a in annotations]
        labels, difficult = classification_targets(annotations)
        np.testing.assert_array_equal(np.where(difficult, 0, np.where(labels > 0, 1, -1)), official)
        for a in annotations:
            assert Image.open(v07 / "JPEGImages" / a.filename).size == (a.width, a.height)
            assert 96 <= a.width <= 128 and 96 <= a.height <= 128
            assert a.objects
            for o in a.objects:
                xmin, ymin, xmax, ymax = o.box
                assert 1 <= xmin <= xmax <= a.width and 1 <= ymin <= ymax <= a.height

    seg = load_segmentation(v12, "trainval")
    assert {s.image_id for s in seg} == set(read_split(v12, "train", "Segmentation")) | set(
        read_split(v12, "val", "Segmentation")
    )
    for s in seg:
        mask = read_mask(s.mask_path)
        assert mask.shape == load_rgb(s.image_path).size[::-1]
        assert set(np.unique(mask).tolist()) <= set(range(21)) | {255}
        palette = Image.open(s.mask_path).getpalette()
        assert palette[:768] == VOC_PALETTE.flatten().tolist()
        objects = read_mask(v12 / "SegmentationObject" / f"{s.image_id}.png")
        assert ((objects == 255) == (mask == 255)).mean() > 0.9

    sbd_root = synth_root / "SBD" / "dataset"
    sbd_train = load_sbd(sbd_root, "train")
    seg_val = set(read_split(v12, "val", "Segmentation"))
    assert seg_val & {s.image_id for s in sbd_train}, "SBD train overlaps VOC2012 val, as real"
    for s in sbd_train + load_sbd(sbd_root, "val"):
        labels = read_sbd_mat(s.mask_path)
        assert labels.shape == load_rgb(s.image_path).size[::-1]
        assert labels.max() <= 20
        voc_mask = v12 / "SegmentationClass" / f"{s.image_id}.png"
        if voc_mask.is_file():  # same scene: SBD agrees with VOC away from the void band
            voc = read_mask(voc_mask)
            np.testing.assert_array_equal(labels[voc != 255], voc[voc != 255])
    assert len(list_images(synth_root / "unlabelled")) == 24
    meta = json.loads((synth_root / "synth.json").read_text())
    assert meta["images"] == 24 and meta["classes"] == list(VOC_CLASSES)


@pytest.fixture(scope="module")
def learn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("learn") / "data"
    return make_synthetic(out, images=200, seed=1, min_size=96, max_size=128, unlabelled=0)


def test_difficult_truncated_and_void_occur(learn_root: Path) -> None:
    annotations = load_detection(learn_root / "VOCdevkit" / "VOC2007", "trainval") + load_detection(
        learn_root / "VOCdevkit" / "VOC2007", "test"
    )
    objects = [o for a in annotations for o in a.objects]
    assert 0.03 < np.mean([o.difficult for o in objects]) < 0.3
    assert 0.05 < np.mean([o.truncated for o in objects]) < 0.6
    assert np.mean([len(a.objects) > 1 for a in annotations]) > 0.4
    assert {o.name for o in objects} == set(VOC_CLASSES)
    labels, difficult = classification_targets(annotations)
    assert difficult.any()


def _colour_histograms(root: Path, annotations) -> np.ndarray:
    feats = []
    for a in annotations:
        x = np.asarray(load_rgb(root / "JPEGImages" / a.filename)) // 32
        idx = (x[..., 0].astype(np.int64) * 64 + x[..., 1] * 8 + x[..., 2]).ravel()
        h = np.bincount(idx, minlength=512).astype(np.float64)
        feats.append(np.sqrt(h / h.sum()))
    return np.stack(feats)


def test_learnable_small_classifier_beats_chance(learn_root: Path) -> None:
    """Logistic regression on colour histograms, VOC2007 trainval -> test, per-class AP."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from threadpoolctl import threadpool_limits

    root = learn_root / "VOCdevkit" / "VOC2007"
    train, test = load_detection(root, "trainval"), load_detection(root, "test")
    x_train, x_test = _colour_histograms(root, train), _colour_histograms(root, test)
    y_train, d_train = classification_targets(train)
    y_test, d_test = classification_targets(test)
    aps, chance = [], []
    for c in range(len(VOC_CLASSES)):
        keep, k_test = ~d_train[:, c], ~d_test[:, c]
        if y_train[keep, c].min() == y_train[keep, c].max() or y_test[k_test, c].sum() == 0:
            continue
        with threadpool_limits(1):  # tiny problem: threads only add contention
            model = LogisticRegression(C=10, max_iter=300).fit(x_train[keep], y_train[keep, c])
        scores = model.decision_function(x_test[k_test])
        aps.append(average_precision_score(y_test[k_test, c], scores))
        chance.append(y_test[k_test, c].mean())  # AP of a random ranking
    assert len(aps) >= 15
    assert np.mean(aps) > 0.3 and np.mean(aps) > 3 * np.mean(chance)


def test_reuse_refuse_and_no_half_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kw = dict(images=8, min_size=32, max_size=40, unlabelled=0)
    out = make_synthetic(tmp_path / "d", **kw)
    stamp = (out / "synth.json").stat().st_mtime_ns
    assert make_synthetic(tmp_path / "d", **kw) == out
    assert (out / "synth.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(DatasetError, match=r"/d: exists"):
        make_synthetic(tmp_path / "d", seed=1, **kw)
    assert make_synthetic(tmp_path / "d", seed=1, force=True, **kw) == out

    def killed(root: Path, params: dict) -> None:
        (root / "VOCdevkit").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_build", killed)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(tmp_path / "e", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with pytest.raises(DatasetError, match="at least 8"):
        make_synthetic(tmp_path / "f", images=3)


def test_resolve_default_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolve, "DEFAULT_IMAGES", 8)
    monkeypatch.setattr(resolve, "DEFAULT_MIN_SIZE", 32)
    monkeypatch.setattr(resolve, "DEFAULT_MAX_SIZE", 40)
    v07 = resolve.resolve_data(None, "voc2007", results_root=tmp_path)
    assert v07 == tmp_path / "data" / "synthetic-n8-s0" / "VOCdevkit" / "VOC2007"
    stamp = (v07.parent.parent / "synth.json").stat().st_mtime_ns
    assert resolve.resolve_data(None, "voc2012", results_root=tmp_path) == v07.parent / "VOC2012"
    assert resolve.resolve_data(None, "sbd", results_root=tmp_path).name == "dataset"
    assert resolve.resolve_data(None, "images", results_root=tmp_path).name == "unlabelled"
    assert (v07.parent.parent / "synth.json").stat().st_mtime_ns == stamp
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path))
    assert resolve.synthetic_root() == v07.parent.parent


def test_resolve_user_paths(synth_root: Path, tmp_path: Path) -> None:
    devkit = synth_root / "VOCdevkit"
    assert resolve.resolve_data(devkit, "voc2007") == devkit / "VOC2007"
    assert resolve.resolve_data(str(devkit / "VOC2012"), "voc2012") == devkit / "VOC2012"
    assert resolve.resolve_data(synth_root, "voc2012") == devkit / "VOC2012"
    assert resolve.resolve_data(synth_root, "sbd") == synth_root / "SBD" / "dataset"
    assert resolve.resolve_data(synth_root / "SBD", "sbd") == synth_root / "SBD" / "dataset"
    assert resolve.resolve_data(synth_root, "images") == synth_root / "unlabelled"
    assert resolve.resolve_data(devkit / "VOC2007", "images") == devkit / "VOC2007"
    with pytest.raises(DatasetError, match=r"VOC2007: not a voc2012 .*SegmentationClass"):
        resolve.resolve_data(devkit / "VOC2007", "voc2012")
    with pytest.raises(DatasetError, match="nowhere: dataset folder not found"):
        resolve.resolve_data(tmp_path / "nowhere", "voc2007")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no images"):
        resolve.resolve_data(tmp_path / "empty", "images")
