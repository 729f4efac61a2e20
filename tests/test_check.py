"""`bench data check`: clean datasets pass; every planted problem is reported by file name."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.datasets.check import check_path, main_check
from benchmark.datasets.preflight import box_problem
from benchmark.datasets.voc import VOCObject
from benchmark.errors import DatasetError


def test_synthetic_tree_passes(synth_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main_check(synth_root) == 0
    out = capsys.readouterr().out
    assert "VOC2007 Main/trainval: 12 images" in out
    assert "VOC2012 Segmentation/val" in out and "SBD train" in out
    assert "objects per class:" in out and "no problems found" in out
    for sub in ("VOCdevkit", "VOCdevkit/VOC2007", "VOCdevkit/VOC2012", "SBD/dataset", "unlabelled"):
        report = check_path(synth_root / sub)
        assert report.ok and report.summary, (sub, report.problems)


@pytest.fixture
def broken(synth_root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(synth_root, copy)
    return copy


def _first_objects_xml(root: Path, skip: int = 0) -> Path:
    return sorted((root / "Annotations").glob("*.xml"))[skip]


def test_deleted_image_broken_xml_unknown_class_all_named(
    broken: Path, capsys: pytest.CaptureFixture
) -> None:
    v07 = broken / "VOCdevkit" / "VOC2007"
    deleted = v07 / "JPEGImages" / "000003.jpg"
    deleted.unlink()
    bad_xml = v07 / "Annotations" / "000005.xml"
    bad_xml.write_text(bad_xml.read_text()[:-30])
    unknown = v07 / "Annotations" / "000007.xml"
    text = unknown.read_text()
    name = text.split("<name>")[1].split("</name>")[0]
    unknown.write_text(text.replace(f"<name>{name}</name>", "<name>unicorn</name>", 1))

    assert main_check(broken) == 1
    err = capsys.readouterr().err
    assert "000003.xml: annotation without image" in err and "000003.jpg" in err
    assert "000005.xml: malformed XML" in err
    assert "000007.xml: unknown class name 'unicorn'" in err


def test_class_file_disagreeing_with_annotations(broken: Path) -> None:
    main = broken / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    path = main / "dog_test.txt"
    lines = path.read_text().splitlines()
    image, value = lines[0].split()
    lines[0] = f"{image} {'-1' if value == '1' else ' 1'}"
    path.write_text("\n".join(lines) + "\n")
    problems = check_path(broken).problems
    expected = f"{path}: disagrees with the annotations for 1 of 12 images (first: {image})"
    assert problems == [expected]


def test_every_other_problem_is_named(broken: Path) -> None:
    v07 = broken / "VOCdevkit" / "VOC2007"
    v12 = broken / "VOCdevkit" / "VOC2012"
    outside = v07 / "Annotations" / "000002.xml"
    text = outside.read_text()
    xmax = text.split("<xmax>")[1].split("</xmax>")[0]
    outside.write_text(text.replace(f"<xmax>{xmax}</xmax>", "<xmax>999</xmax>", 1))
    (v07 / "JPEGImages" / "000004.jpg").write_bytes(b"\xff\xd8 truncated")
    missing_ann = (v07 / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    (v07 / "Annotations" / f"{missing_ann}.xml").unlink()

    masks = sorted((v12 / "SegmentationClass").glob("*.png"))
    Image.open(masks[0]).convert("RGB").save(masks[0])  # not a palette PNG
    small = Image.open(masks[1])
    small.crop((0, 0, small.width - 5, small.height)).save(masks[1])  # size mismatch
    sbd_mat = sorted((broken / "SBD" / "dataset" / "cls").glob("*.mat"))[0]
    sbd_mat.write_bytes(b"not a mat file")

    problems = "\n".join(check_path(broken).problems)
    assert "000002.xml: object 1 (" in problems and "lies outside the" in problems
    assert "000004.jpg: unreadable image" in problems
    assert f"test.txt: image {missing_ann} listed without annotation" in problems
    assert f"{masks[0].name}: mask is not an 8-bit palette or greyscale PNG (mode RGB" in problems
    assert f"{masks[1].name}: mask size" in problems
    assert f"{sbd_mat.name}: unreadable .mat" in problems


def test_image_folder_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(tmp_path / "imgs" / "sub" / "a.png")
    (tmp_path / "imgs" / "b.jpg").write_bytes(b"garbage")
    report = check_path(tmp_path / "imgs")
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{tmp_path / 'imgs' / 'b.jpg'}: unreadable image")
    assert "2 images" in report.summary[0]
    with pytest.raises(DatasetError, match="nope: dataset folder not found"):
        check_path(tmp_path / "nope")


def test_real_samples_pass(shared_data: Path) -> None:
    devkit = shared_data / "VOCdevkit"
    if not devkit.is_dir():
        pytest.skip("no VOCdevkit sample")
    report = check_path(devkit)
    assert report.problems == []
    assert "VOC2007 Main/train: 579 images" in report.summary
    assert "VOC2012 Segmentation/train: 37 images" in report.summary


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((1, 1, 10, 20), None),  # the whole 10x20 image, VOC's 1-based inclusive pixels
        ((2.5, 3, 4, 5), None),
        ((-1, 3, 4, 5), "object 3 (dog): box (-1, 3, 4, 5) has a negative coordinate"),
        ((5, 3, 4, 5), "object 3 (dog): box (5, 3, 4, 5) has xmin 5 > xmax 4"),
        ((1, 6, 4, 5), "object 3 (dog): box (1, 6, 4, 5) has ymin 6 > ymax 5"),
        ((0, 1, 4, 5), "object 3 (dog): box (0, 1, 4, 5) lies outside the 10x20 image"),
        ((1, 1, 11, 5), "object 3 (dog): box (1, 1, 11, 5) lies outside the 10x20 image"),
        ((1, 1, 4, 21), "object 3 (dog): box (1, 1, 4, 21) lies outside the 10x20 image"),
    ],
)
def test_box_rules(box: tuple[float, float, float, float], message: str | None) -> None:
    found = box_problem(2, VOCObject("dog", box), 10, 20)
    assert found == message or (message is not None and found.startswith(message))
