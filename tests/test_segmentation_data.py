"""Which images segmentation trains and is judged on: VOC2012 + SBD .mat, seg11valid."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmark.datasets.voc import read_sbd_mat, read_split
from benchmark.errors import DatasetError
from benchmark.loop import IterationSampler
from transfer.segmentation.data import SegTrainSet, build_data, find_sbd, load_pair


def _roots(synth_root: Path) -> tuple[Path, Path]:
    return synth_root / "VOCdevkit" / "VOC2012", synth_root / "SBD" / "dataset"


def _ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def test_voc_plus_sbd_training_and_val_minus_sbd_train(synth_root: Path) -> None:
    voc, sbd = _roots(synth_root)
    data = build_data(voc, sbd, "train", "seg11valid", train_set="voc+sbd")
    sbd_train = set(_ids(sbd / "train.txt"))
    val = read_split(voc, "val", "Segmentation")
    assert data.split == "voc2012-val-minus-sbd-train"  # no VOC2011 here: named honestly
    assert [s.image_id for s in data.eval] == [i for i in val if i not in sbd_train]
    eval_ids = {s.image_id for s in data.eval}
    train_ids = [s.image_id for s in data.train]
    assert len(train_ids) == len(set(train_ids)) and not eval_ids & set(train_ids)
    assert data.train_sources["sbd"] > 0 and data.train_sources["voc"] > 0
    # an SBD sample is read through the .mat path
    mat = next(s for s in data.train if s.mask_path.suffix == ".mat")
    image, label = load_pair(mat, None)
    assert np.array_equal(label, read_sbd_mat(mat.mask_path))
    assert label.shape == image.shape[:2] and label.max() <= 20


def test_sbd_train_is_the_default_training_set(synth_root: Path) -> None:
    """FCN-AlexNet trained on SBD train alone; without SBD that default names the fix."""
    voc, sbd = _roots(synth_root)
    data = build_data(voc, sbd, "train", "seg11valid")
    assert data.train and all(s.mask_path.suffix == ".mat" for s in data.train)
    sbd_train = set(_ids(sbd / "train.txt"))
    assert {s.image_id for s in data.train} <= sbd_train
    assert not {s.image_id for s in data.train} & {s.image_id for s in data.eval}
    with pytest.raises(DatasetError, match="train_set sbd-train needs SBD"):
        build_data(voc, None, "train", "seg11valid")


def test_named_split_and_no_sbd(synth_root: Path) -> None:
    voc, _ = _roots(synth_root)
    data = build_data(voc, None, "train", "seg11valid", train_set="voc+sbd")
    assert data.split == "voc2012-val" and data.train_sources["sbd"] == 0
    assert any("no SBD" in n for n in data.notes)
    assert build_data(voc, None, "train", "val", train_set="voc+sbd").split == "voc2012-val"


def test_sbd_is_found_beside_the_vocdevkit_or_absent(synth_root: Path, tmp_path: Path) -> None:
    voc, sbd = _roots(synth_root)
    assert find_sbd(str(synth_root), None, voc, True) == sbd
    assert find_sbd(str(synth_root), None, voc, False) is None
    alone = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(voc, alone)
    assert find_sbd(str(tmp_path), None, alone, True) is None


def test_seg11valid_from_voc2011_or_its_own_list(synth_root: Path, tmp_path: Path) -> None:
    voc, sbd = _roots(synth_root)
    devkit = tmp_path / "VOCdevkit"
    shutil.copytree(voc, devkit / "VOC2012")
    # a VOC2011 folder: seg11valid = its val minus SBD train
    shutil.copytree(voc, devkit / "VOC2011")
    val11 = (
        read_split(voc, "val", "Segmentation")[:-3] + read_split(voc, "train", "Segmentation")[:2]
    )
    (devkit / "VOC2011" / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(val11))
    data = build_data(devkit / "VOC2012", sbd, "train", "seg11valid")
    sbd_train = set(_ids(sbd / "train.txt"))
    assert data.split == "seg11valid"
    assert [s.image_id for s in data.eval] == [i for i in val11 if i not in sbd_train]
    assert not {s.image_id for s in data.eval} & {s.image_id for s in data.train}
    # FCN's own list wins when present
    own = read_split(voc, "val", "Segmentation")[:3]
    (devkit / "VOC2012" / "ImageSets" / "Segmentation" / "seg11valid.txt").write_text(
        "\n".join(own)
    )
    data = build_data(devkit / "VOC2012", sbd, "train", "seg11valid")
    assert data.split == "seg11valid" and [s.image_id for s in data.eval] == own


def test_real_sample_without_val_split_fails_cleanly(shared_data: Path) -> None:
    voc = shared_data / "VOCdevkit" / "VOC2012"
    with pytest.raises(DatasetError, match=r"val\.txt: split file not found"):
        build_data(voc, None, "train", "seg11valid", train_set="voc+sbd")
    with pytest.raises(DatasetError, match="no training images left"):
        build_data(voc, None, "train", "train", train_set="voc+sbd")


def test_missing_mask_is_named(synth_root: Path, tmp_path: Path) -> None:
    voc, _ = _roots(synth_root)
    copy = tmp_path / "VOC2012"
    shutil.copytree(voc, copy)
    first = read_split(copy, "train", "Segmentation")[0]
    (copy / "SegmentationClass" / f"{first}.png").unlink()
    with pytest.raises(DatasetError, match=f"{first}.png: segmentation mask not found"):
        build_data(copy, None, "train", "val", train_set="voc+sbd")


def test_training_order_is_a_seeded_shuffle_per_epoch() -> None:
    """FCN's images come from the loop's IterationSampler (batch iter_size x batch_size):
    every epoch visits each image once, in an order drawn from (seed, epoch), so a resumed
    run sees the images it would have seen."""

    def order(seed: int, start: int, batches: int, batch: int = 1) -> list[int]:
        got = itertools.islice(iter(IterationSampler(7, batch, seed, start)), batches)
        return [i for b in got for i, _ in b]

    first, second = order(3, 0, 7), order(3, 7, 7)
    assert sorted(first) == list(range(7)) and sorted(second) == list(range(7))
    assert first != second and first == order(3, 0, 7)
    assert order(3, 0, 14)[9:] == order(3, 9, 5)  # resumed mid-epoch: the same tail
    assert order(3, 0, 7, batch=2)[:14] == order(3, 0, 14)  # sample numbers ignore batching
    assert order(4, 0, 7) != first


def test_train_set_mirrors_by_sample_number(synth_root: Path) -> None:
    voc, _ = _roots(synth_root)
    data = build_data(voc, None, "train", "val", train_set="voc+sbd")
    sample = data.train[0]
    image, label = load_pair(sample, 48)
    plain = SegTrainSet(data.train, 48, mirror=False, seed=0)
    assert len(plain) == len(data.train)
    assert all(np.array_equal(a, b) for a, b in zip(plain[(0, 5)], (image, label)))
    mirrored = SegTrainSet(data.train, 48, mirror=True, seed=0)
    draws = [mirrored[(0, k)] for k in range(16)]
    flipped = [np.array_equal(im, image[:, ::-1]) for im, _ in draws]
    kept = [np.array_equal(im, image) for im, _ in draws]
    assert all(f != k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 16
    for (im, lab), f in zip(draws, flipped):  # the label is mirrored with its image
        assert np.array_equal(lab, label[:, ::-1] if f else label)
        assert im.flags.c_contiguous and lab.flags.c_contiguous
    again = [np.array_equal(mirrored[(0, k)][0], image[:, ::-1]) for k in range(16)]
    assert again == flipped  # a pure function of the sample number: resumes repeat it
