"""VOC parsing: hand-written XML and split files, masks, SBD .mat, and the real samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from benchmark.datasets.voc import (
    VOC_CLASSES,
    VOC_PALETTE,
    VOCAnnotation,
    VOCObject,
    classification_targets,
    load_detection,
    load_segmentation,
    parse_voc_xml,
    read_class_files,
    read_id_list,
    read_label,
    read_mask,
    read_rows,
    read_sbd_mat,
    read_split,
)
from benchmark.errors import DatasetError

XML = """<annotation>
  <folder>VOC2007</folder>
  <filename>000042.jpg</filename>
  <size><width>353</width><height>500</height><depth>3</depth></size>
  <object>
    <name>dog</name><pose>Left</pose><truncated>1</truncated><difficult>0</difficult>
    <bndbox><xmin>12</xmin><ymin>34</ymin><xmax>300</xmax><ymax>480</ymax></bndbox>
  </object>
  <object>
    <name>person</name><difficult>1</difficult>
    <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3.0</xmax><ymax>4</ymax></bndbox>
  </object>
</annotation>
"""


def _xml(tmp_path: Path, text: str, name: str = "000042.xml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_classes_and_palette_are_the_standard_ones() -> None:
    assert len(VOC_CLASSES) == 20 and len(set(VOC_CLASSES)) == 20
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[14] == "person"
    assert VOC_CLASSES[-1] == "tvmonitor"
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    # Values from the devkit's colour map: background, aeroplane, person, void.
    assert VOC_PALETTE[0].tolist() == [0, 0, 0]
    assert VOC_PALETTE[1].tolist() == [128, 0, 0]
    assert VOC_PALETTE[15].tolist() == [192, 128, 128]
    assert VOC_PALETTE[255].tolist() == [224, 224, 192]


def test_parse_hand_written_xml(tmp_path: Path) -> None:
    ann = parse_voc_xml(_xml(tmp_path, XML))
    assert ann == VOCAnnotation(
        image_id="000042",
        filename="000042.jpg",
        width=353,
        height=500,
        objects=[
            VOCObject("dog", (12, 34, 300, 480), difficult=False, truncated=True),
            VOCObject("person", (1, 2, 3, 4), difficult=True, truncated=False),
        ],
    )


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("</annotation>", "", "malformed XML"),
        ("<name>dog</name>", "<name>dragon</name>", "unknown class name 'dragon'"),
        ("<width>353</width>", "", "missing <width>"),
        ("<xmin>12</xmin>", "<xmin>twelve</xmin>", "<xmin> is not a number"),
        ("<difficult>0</difficult>", "<difficult>2</difficult>", "<difficult> must be 0 or 1"),
        ("<filename>000042.jpg</filename>", "", "missing <filename>"),
        (
            "<bndbox><xmin>12</xmin><ymin>34</ymin><xmax>300</xmax><ymax>480</ymax></bndbox>",
            "",
            "has no <bndbox>",
        ),
    ],
)
def test_parse_errors_name_the_file(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = _xml(tmp_path, XML.replace(old, new), "bad_one.xml")
    with pytest.raises(DatasetError, match="bad_one.xml") as exc:
        parse_voc_xml(path)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_parse_accepts_any_class_when_asked(tmp_path: Path) -> None:
    path = _xml(tmp_path, XML.replace("<name>dog</name>", "<name>dragon</name>"))
    assert parse_voc_xml(path, classes=None).objects[0].name == "dragon"


def test_classification_targets_follow_the_devkit_rules() -> None:
    def ann(*objs: tuple[str, bool]) -> VOCAnnotation:
        return VOCAnnotation("x", "x.jpg", 10, 10, [VOCObject(n, (1, 1, 2, 2), d) for n, d in objs])

    anns = [
        ann(("dog", False), ("dog", True)),  # dog present: 1
        ann(("cat", True), ("cat", True)),  # cat only difficult: 0 (ignored)
        ann(("car", False)),  # dog absent: -1
    ]
    labels, difficult = classification_targets(anns)
    assert labels.dtype == np.float32 and difficult.dtype == bool
    dog, cat, car = (VOC_CLASSES.index(c) for c in ("dog", "cat", "car"))
    assert labels[:, dog].tolist() == [1, 0, 0] and difficult[:, dog].tolist() == [0, 0, 0]
    assert labels[:, cat].tolist() == [0, 0, 0] and difficult[:, cat].tolist() == [0, 1, 0]
    assert labels[:, car].tolist() == [0, 0, 1]
    assert labels.sum() == 2 and difficult.sum() == 1


def test_read_split_and_class_files(tmp_path: Path) -> None:
    main = tmp_path / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "train.txt").write_text("000001\n000002\n\n")
    assert read_split(tmp_path, "train") == ["000001", "000002"]
    for k, cls in enumerate(VOC_CLASSES):
        (main / f"{cls}_train.txt").write_text(f"000001 {1 if k == 3 else -1}\n000002  0\n")
    ids, labels = read_class_files(tmp_path, "train")
    assert ids == ["000001", "000002"] and labels.dtype == np.int8 and labels.shape == (2, 20)
    assert labels[0, 3] == 1 and labels[0, 4] == -1 and (labels[1] == 0).all()
    (main / "dog_train.txt").write_text("000009 1\n000002 0\n")
    with pytest.raises(DatasetError, match="dog_train.txt"):
        read_class_files(tmp_path, "train")
    with pytest.raises(DatasetError, match="val.txt"):
        read_split(tmp_path, "val")


def test_load_detection_names_missing_annotation(tmp_path: Path) -> None:
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("000042\n000043\n")
    (tmp_path / "Annotations" / "000042.xml").write_text(XML)
    with pytest.raises(DatasetError, match="000043.xml"):
        load_detection(tmp_path, "test")


def _palette_png(path: Path, labels: np.ndarray) -> None:
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(VOC_PALETTE.flatten().tolist())
    im.save(path)


def test_read_mask_palette_and_refuses_rgb(tmp_path: Path) -> None:
    labels = np.array([[0, 15, 255], [20, 1, 0]], dtype=np.uint8)
    _palette_png(tmp_path / "m.png", labels)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), labels)
    np.testing.assert_array_equal(read_label(tmp_path / "m.png"), labels)
    Image.open(tmp_path / "m.png").convert("RGB").save(tmp_path / "rgb_mask.png")
    with pytest.raises(DatasetError, match="rgb_mask.png.*palette"):
        read_mask(tmp_path / "rgb_mask.png")


def test_read_sbd_mat(tmp_path: Path) -> None:
    seg = np.array([[0, 3], [15, 15]], dtype=np.uint8)
    cell = np.empty((20, 1), dtype=object)
    for k in range(20):
        cell[k, 0] = np.zeros((2, 2))
    gt = {"Segmentation": seg, "Boundaries": cell, "CategoriesPresent": np.array([[3], [15]])}
    savemat(tmp_path / "a.mat", {"GTcls": gt})
    out = read_sbd_mat(tmp_path / "a.mat")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, seg)
    np.testing.assert_array_equal(read_label(tmp_path / "a.mat"), seg)
    savemat(tmp_path / "inst.mat", {"GTinst": {"Segmentation": seg}})
    with pytest.raises(DatasetError, match="inst.mat.*GTcls"):
        read_sbd_mat(tmp_path / "inst.mat")
    (tmp_path / "junk.mat").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="junk.mat"):
        read_sbd_mat(tmp_path / "junk.mat")


def test_load_segmentation_names_missing_mask(tmp_path: Path) -> None:
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    for i in "ab":
        Image.new("RGB", (3, 2)).save(tmp_path / "JPEGImages" / f"{i}.jpg")
    _palette_png(tmp_path / "SegmentationClass" / "a.png", np.zeros((2, 3)))
    with pytest.raises(DatasetError, match=r"SegmentationClass/b\.png"):
        load_segmentation(tmp_path, "val")


# ------------------------------------------------------------------ real samples (skip if absent)


def _voc(shared_data: Path, year: str) -> Path:
    root = shared_data / "VOCdevkit" / year
    if not root.is_dir():
        pytest.skip(f"{root} not available")
    return root


def test_real_voc2007_matches_official_class_files(shared_data: Path) -> None:
    root = _voc(shared_data, "VOC2007")
    annotations = load_detection(root, "train")
    assert len(annotations) == 579
    ids, official = read_class_files(root, "train")
    assert ids == [a.image_id for a in annotations]
    labels, difficult = classification_targets(annotations)
    ours = np.where(difficult, 0, np.where(labels > 0, 1, -1))
    np.testing.assert_array_equal(ours, official)
    assert (official == 0).any(), "the sample has difficult-only classes"
    for a in annotations:
        for o in a.objects:
            xmin, ymin, xmax, ymax = o.box
            assert 1 <= xmin <= xmax <= a.width and 1 <= ymin <= ymax <= a.height


def test_real_voc2012_segmentation(shared_data: Path) -> None:
    root = _voc(shared_data, "VOC2012")
    samples = load_segmentation(root, "train")
    assert len(samples) == 37
    seen = set()
    for s in samples:
        mask = read_mask(s.mask_path)
        assert mask.shape == Image.open(s.image_path).size[::-1]
        seen |= set(np.unique(mask).tolist())
        assert Image.open(s.mask_path).getpalette()[: 3 * 21] == VOC_PALETTE[:21].flatten().tolist()
    assert 255 in seen and 0 in seen
    assert seen <= set(range(21)) | {255}


# ------------------------------------------------------------------ hostile inputs


def test_read_id_list_bom_encoding_and_nul(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_bytes(b"\xef\xbb\xbf000005 1\r\n000007\n\n")
    assert read_id_list(path) == ["000005", "000007"]
    assert read_rows(path) == [["000005", "1"], ["000007"]]
    path.write_bytes(b"000005\n000007\n00\xe9009\n")  # Latin-1, not UTF-8
    with pytest.raises(
        DatasetError, match=r"train\.txt: split file is not valid UTF-8 text \(line 3\)"
    ):
        read_id_list(path)
    path.write_bytes(b"000005\n\x00\x00\n")
    with pytest.raises(DatasetError, match=r"train\.txt: split file holds a NUL byte \(line 2\)"):
        read_id_list(path)
    with pytest.raises(DatasetError, match=r"nope\.txt: SBD split file not found"):
        read_id_list(tmp_path / "nope.txt", "SBD split file")
    with pytest.raises(DatasetError, match=r": unreadable split file \(Is a directory\)"):
        read_id_list(tmp_path)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("<width>353</width>", "<width>nan</width>", "<width> is not a number ('nan')"),
        ("<xmax>300</xmax>", "<xmax>1e999</xmax>", "object 1 (dog): <xmax> is not a number"),
        ("<difficult>0</difficult>", "<difficult>x</difficult>", "object 1 (dog): <difficult>"),
        ("<name>dog</name>", "<name></name>", "object 1: missing <name> in <object>"),
        ("<annotation>", '<?xml version="1.0" encoding="shift_jis"?><annotation>', "malformed"),
        ("<annotation>", "<annotation>\x00", "malformed XML"),
    ],
)
def test_parse_hostile_values(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = _xml(tmp_path, XML.replace(old, new), "odd.xml")
    with pytest.raises(DatasetError) as exc:
        parse_voc_xml(path)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)


def test_read_mask_refuses_16_bit_out_of_range_and_missing(tmp_path: Path) -> None:
    grey = np.array([[0, 20], [255, 3]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")  # mode L is fine
    np.testing.assert_array_equal(read_mask(tmp_path / "grey.png"), grey)
    Image.fromarray(grey.astype(np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(DatasetError, match=r"deep\.png: .*\(mode I;16, 16-bit\)"):
        read_mask(tmp_path / "deep.png")
    _palette_png(tmp_path / "odd.png", np.array([[0, 21], [254, 100]]))
    with pytest.raises(DatasetError, match=r"odd\.png: label values \[21, 100, 254\] are neither"):
        read_mask(tmp_path / "odd.png")
    with pytest.raises(DatasetError, match=r"gone\.png: segmentation mask not found"):
        read_mask(tmp_path / "gone.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "odd.png").read_bytes()[:60])
    with pytest.raises(DatasetError, match=r"cut\.png: unreadable mask \("):
        read_mask(tmp_path / "cut.png")


def _sbd(path: Path, seg: np.ndarray, compress: bool = False) -> Path:
    savemat(path, {"GTcls": {"Segmentation": seg}}, do_compression=compress)
    return path


@pytest.mark.parametrize(
    ("seg", "message"),
    [
        (np.array([[0.0, np.nan], [1, 2]]), "non-integer values"),
        (np.array([[0.5, 1], [1, 2]]), "non-integer values"),
        (np.array([[-1, 1], [1, 2]]), "label values -1..2 are not 0-20 or 255"),
        (np.array([[0, 300], [1, 2]]), "label values 0..300 are not 0-20 or 255"),
        (np.array([[0, 100], [1, 2]]), "label values [100] are neither 0-20 nor 255"),
        (np.array([[{"a": 1}, {"a": 2}], [{"a": 3}, {"a": 4}]]), "not a real numeric array"),
        (np.array([[1 + 2j, 0], [1, 2]]), "not a real numeric array"),
        (np.zeros((2, 3, 4)), "is not a 2-D label map"),
    ],
)
def test_read_sbd_mat_checks_values(tmp_path: Path, seg: np.ndarray, message: str) -> None:
    path = _sbd(tmp_path / "bad.mat", seg)
    with pytest.raises(DatasetError) as exc:
        read_sbd_mat(path)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)


def test_read_sbd_mat_damaged_files(tmp_path: Path) -> None:
    seg = (np.arange(400).reshape(20, 20) % 21).astype(np.uint8)
    packed = _sbd(tmp_path / "ok.mat", seg, compress=True).read_bytes()
    np.testing.assert_array_equal(read_sbd_mat(tmp_path / "ok.mat"), seg)
    plain = _sbd(tmp_path / "plain.mat", seg).read_bytes()
    np.testing.assert_array_equal(read_sbd_mat(tmp_path / "plain.mat"), seg)
    cases = {
        "cut.mat": (packed[:-9], "truncated (an element runs past the end of its data)"),
        "flip.mat": (packed[:150] + bytes([packed[150] ^ 0xFF]) + packed[151:], "compressed"),
        "short.mat": (packed[:120], "not a MATLAB v5 MAT-file"),
        # 64 junk bytes inside the uncompressed struct: scipy's loadmat crashed on this kind
        "junk.mat": (plain[:300] + bytes(range(200, 255)) * 2 + plain[300:], "truncated"),
    }
    for name, (raw, message) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(DatasetError) as exc:
            read_sbd_mat(tmp_path / name)
        assert str(exc.value).startswith(f"{tmp_path / name}: unreadable .mat file (")
        assert message in str(exc.value), str(exc.value)
