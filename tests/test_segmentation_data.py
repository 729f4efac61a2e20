"""Which images segmentation trains and is judged on: VOC2012 + SBD .mat, seg11valid."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmark.datasets.voc import read_sbd_mat, read_split
from benchmark.errors import DatasetError
from transfer.segmentation.data import build_data, find_sbd, load_pair, train_order


def _roots(synth_root: Path) -> tuple[Path, Path]:
    return synth_root / "VOCdevkit" / "VOC2012", synth_root / "SBD" / "dataset"


def _ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def test_voc_plus_sbd_training_and_val_minus_sbd_train(synth_root: Path) -> None:
    voc, sbd = _roots(synth_root)
    data = build_data(voc, sbd, "train", "seg11valid")
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


def test_named_split_and_no_sbd(synth_root: Path) -> None:
    voc, _ = _roots(synth_root)
    data = build_data(voc, None, "train", "seg11valid")
    assert data.split == "voc2012-val" and data.train_sources["sbd"] == 0
    assert any("no SBD" in n for n in data.notes)
    assert build_data(voc, None, "train", "val").split == "voc2012-val"


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
        build_data(voc, None, "train", "seg11valid")
    with pytest.raises(DatasetError, match="no training images left"):
        build_data(voc, None, "train", "train")


def test_missing_mask_is_named(synth_root: Path, tmp_path: Path) -> None:
    voc, _ = _roots(synth_root)
    copy = tmp_path / "VOC2012"
    shutil.copytree(voc, copy)
    first = read_split(copy, "train", "Segmentation")[0]
    (copy / "SegmentationClass" / f"{first}.png").unlink()
    with pytest.raises(DatasetError, match=f"{first}.png: segmentation mask not found"):
        build_data(copy, None, "train", "val")


def test_training_order_is_a_seeded_shuffle_per_epoch() -> None:
    first = [train_order(7, 3, i) for i in range(7)]
    second = [train_order(7, 3, i) for i in range(7, 14)]
    assert sorted(first) == list(range(7)) and sorted(second) == list(range(7))
    assert first != second and first == [train_order(7, 3, i) for i in range(7)]
