"""Hostile and broken datasets: each planted fault is one named line in `bench data check`,
the same line from the preflight functions, and nothing but DatasetError from the readers."""

from __future__ import annotations

import io
import os
import shutil
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.datasets.check import check_path, main_check
from benchmark.datasets.folder import load_rgb, verify_image
from benchmark.datasets.preflight import (
    Problem,
    check_detection,
    check_images,
    check_segmentation,
    enforce,
)
from benchmark.datasets.voc import (
    VOC_PALETTE,
    SegSample,
    load_sbd,
    load_segmentation,
    parse_voc_xml,
    read_class_files,
    read_id_list,
    read_mask,
    read_sbd_mat,
    read_split,
)
from benchmark.errors import DatasetError, printable

V07, V12, SBD = "VOCdevkit/VOC2007", "VOCdevkit/VOC2012", "SBD/dataset"
BAD_NAME = os.fsdecode(b"bad\xff")  # "bad\udcff": how Linux hands Python a non-UTF-8 name


@pytest.fixture
def tree(synth_root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(synth_root, copy)
    return copy


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data: a bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _edit_xml(path: Path, tag: str, value: str) -> None:
    """Replace the first <tag> of the first <object>'s box."""
    text = path.read_text()
    old = text.split(f"<{tag}>")[1].split(f"</{tag}>")[0]
    path.write_text(text.replace(f"<{tag}>{old}</{tag}>", f"<{tag}>{value}</{tag}>", 1))


def _save_labels(path: Path, labels: np.ndarray) -> None:
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(VOC_PALETTE.flatten().tolist())
    im.save(path)


def _first_mask(root: Path) -> tuple[Path, str]:
    i = read_split(root / V12, "train", "Segmentation")[0]
    return root / V12 / "SegmentationClass" / f"{i}.png", i


def _first_mat(root: Path) -> tuple[Path, str]:
    i = read_id_list(root / SBD / "train.txt")[0]
    return root / SBD / "cls" / f"{i}.mat", i


# ------------------------------------------------------------------ planted faults


def plant_bomb(root: Path) -> tuple[Path, str]:
    path = root / V07 / "JPEGImages" / "000003.jpg"
    path.write_bytes(huge_png())
    return path, "000003"


def plant_truncated_jpeg(root: Path) -> tuple[Path, str]:
    path = root / V07 / "JPEGImages" / "000004.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path, "000004"


def plant_random_jpeg(root: Path) -> tuple[Path, str]:
    path = root / "unlabelled" / "000005.jpg"
    path.write_bytes(np.random.default_rng(0).bytes(3000))
    return path, "000005"


def plant_bad_name(folder: str) -> Callable[[Path], tuple[Path, str]]:
    def plant(root: Path) -> tuple[Path, str]:
        path = root / folder / f"{BAD_NAME}.jpg"
        shutil.copy(root / folder / "000001.jpg", path)
        return path, BAD_NAME

    return plant


def plant_bad_split(root: Path) -> tuple[Path, str]:
    path = root / V07 / "ImageSets" / "Main" / "train.txt"
    path.write_bytes(b"000001\n0000\xff2\n")
    return path, ""


def plant_box(tag: str, value: Callable[[Path], str]) -> Callable[[Path], tuple[Path, str]]:
    def plant(root: Path) -> tuple[Path, str]:
        path = root / V07 / "Annotations" / "000002.xml"
        _edit_xml(path, tag, value(path))
        return path, "000002"

    return plant


def _xmax_of(path: Path) -> str:
    return path.read_text().split("<xmax>")[1].split("</xmax>")[0]


def _beyond_width(path: Path) -> str:
    return str(int(path.read_text().split("<width>")[1].split("</width>")[0]) + 10)


def plant_rgb_mask(root: Path) -> tuple[Path, str]:
    path, i = _first_mask(root)
    Image.open(path).convert("RGB").save(path)
    return path, i


def plant_16bit_mask(root: Path) -> tuple[Path, str]:
    path, i = _first_mask(root)
    Image.fromarray(np.asarray(Image.open(path)).astype(np.uint16)).save(path)
    return path, i


def plant_mask_value(root: Path) -> tuple[Path, str]:
    path, i = _first_mask(root)
    labels = np.array(Image.open(path))
    labels[:3, :3] = 100
    _save_labels(path, labels)
    return path, i


def plant_small_mask(root: Path) -> tuple[Path, str]:
    path, i = _first_mask(root)
    _save_labels(path, np.array(Image.open(path))[:, :-5])
    return path, i


def plant_missing_mask(root: Path) -> tuple[Path, str]:
    path, i = _first_mask(root)
    path.unlink()
    return path, i


def plant_truncated_mat(root: Path) -> tuple[Path, str]:
    path, i = _first_mat(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, i


def plant_garbage_mat(root: Path) -> tuple[Path, str]:
    path, i = _first_mat(root)
    path.write_bytes(np.random.default_rng(1).bytes(700))
    return path, i


@dataclass(frozen=True)
class Case:
    name: str
    plant: Callable[[Path], tuple[Path, str]]
    kind: str  # which preflight call reads the file: detection, segmentation, sbd, split, or
    # "images:<folder>"
    expect: str


def _past_xmax(path: Path) -> str:
    return str(int(_xmax_of(path)) + 5)


BOMB_LIMIT = 2 * Image.MAX_IMAGE_PIXELS  # where PIL's warning becomes an error

CASES = [
    Case("bomb", plant_bomb, "detection", f"too large (10000000000 pixels, limit {BOMB_LIMIT}; "),
    Case("truncated-jpeg", plant_truncated_jpeg, "detection", "unreadable image (OSError: "),
    Case("random-bytes-jpg", plant_random_jpeg, "images:unlabelled", "unreadable image ("),
    Case("name-folder", plant_bad_name("unlabelled"), "images:unlabelled", "not valid UTF-8"),
    Case("name-jpegimages", plant_bad_name(f"{V07}/JPEGImages"), f"images:{V07}/JPEGImages", "UTF"),
    Case("split-not-utf8", plant_bad_split, "split", "split file is not valid UTF-8 text (line 2)"),
    Case("xmin>xmax", plant_box("xmin", _past_xmax), "detection", "> xmax"),
    Case("negative", plant_box("ymin", lambda p: "-3"), "detection", "has a negative coordinate"),
    Case("outside", plant_box("xmax", _beyond_width), "detection", "lies outside the"),
    Case("non-numeric", plant_box("ymin", lambda p: "abc"), "detection", "<ymin> is not a number"),
    Case("rgb-mask", plant_rgb_mask, "segmentation", "(mode RGB, colour)"),
    Case("16-bit-mask", plant_16bit_mask, "segmentation", "(mode I;16, 16-bit)"),
    Case("mask-value-100", plant_mask_value, "segmentation", "label values [100] are neither"),
    Case("wrong-size-mask", plant_small_mask, "segmentation", "mask size"),
    Case("missing-mask", plant_missing_mask, "segmentation", "segmentation mask not found"),
    Case("truncated-mat", plant_truncated_mat, "sbd", "unreadable .mat file"),
    Case("garbage-mat", plant_garbage_mat, "sbd", "unreadable .mat file"),
]


def _seg_samples(root: Path) -> list[SegSample]:
    """Every VOC2012 segmentation pair the splits list, built without existence checks; the
    aug lists' masks from SegmentationClassAug where there is one (mmseg's layout, as
    `bench data check` reads it)."""
    split_dir = root / "ImageSets" / "Segmentation"
    samples: dict[str, SegSample] = {}
    for f in sorted(split_dir.glob("*.txt")):
        for i in read_id_list(f):
            mask = root / "SegmentationClass" / f"{i}.png"
            aug = root / "SegmentationClassAug" / f"{i}.png"
            if f.stem in ("aug", "trainaug") and (aug.is_file() or not mask.is_file()):
                mask = aug
            samples.setdefault(i, SegSample(i, root / "JPEGImages" / f"{i}.jpg", mask))
    return list(samples.values())


def preflight(root: Path, kind: str) -> list[Problem]:
    if kind == "detection":
        ids = [p.stem for p in sorted((root / V07 / "Annotations").glob("*.xml"))]
        return check_detection(root / V07, ids)
    if kind == "segmentation":
        return check_segmentation(_seg_samples(root / V12))
    if kind == "sbd":
        d = root / SBD
        ids = sorted({i for s in ("train", "val") for i in read_id_list(d / f"{s}.txt")})
        pairs = [SegSample(i, d / "img" / f"{i}.jpg", d / "cls" / f"{i}.mat") for i in ids]
        return check_segmentation(pairs)
    folder = root / kind.removeprefix("images:")
    return check_images(sorted(p for p in folder.iterdir() if p.is_file()))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_planted_fault_is_one_named_line_everywhere(
    tree: Path, case: Case, capsys: pytest.CaptureFixture
) -> None:
    bad, item = case.plant(tree)

    assert main_check(tree) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "1 problem(s):", err
    message = err[1].removeprefix("  ")
    assert message.startswith(printable(bad) + ": "), message
    assert case.expect in message and len(err) == 2
    message.encode("utf-8")  # no surrogate left: printing cannot raise

    if case.kind == "split":  # split files are read by the loaders, not by preflight
        with pytest.raises(DatasetError) as exc:
            read_split(tree / V07, "train")
        assert str(exc.value) == message
        return
    found = preflight(tree, case.kind)
    assert found == [Problem(item, message)]
    with pytest.raises(DatasetError) as exc:
        enforce(found, "error", what="the test set")
    assert str(exc.value) == (
        f"{message} (1 problems in the test set; `bench data check` lists them all, "
        "or set on_bad_data: skip)"
    )
    assert enforce(found, "skip", what="the test set") == {item}


def test_bad_names_print_as_escapes_on_any_stream(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tree / "unlabelled"
    (folder / f"{BAD_NAME}.jpg").write_bytes(b"not an image")
    (folder / "café\nx.jpg").write_bytes(b"not an image either")
    streams = {n: io.TextIOWrapper(io.BytesIO(), encoding="ascii") for n in ("stdout", "stderr")}
    for name, stream in streams.items():
        monkeypatch.setattr(sys, name, stream)
    assert main_check(folder) == 1
    streams["stderr"].flush()
    err = streams["stderr"].buffer.getvalue().decode("ascii")
    assert "3 problem(s):" in err
    assert f"{printable(folder)}/bad\\xff.jpg: file name is not valid UTF-8" in err
    assert "/bad\\xff.jpg: unreadable image (" in err
    assert "/caf\\xe9\\x0ax.jpg: unreadable image (" in err  # one line, ASCII stream


def test_printable() -> None:
    assert printable(Path(f"/d/{BAD_NAME}.jpg")) == "/d/bad\\xff.jpg"
    assert printable(b"a\xffb") == "a\\xffb"
    assert printable("tab\there\x1b[31m") == "tab\\x09here\\x1b[31m"
    assert printable("café ✓") == "café ✓"
    assert printable("lone \ud800") == "lone \\ud800"


def test_enforce_keeps_every_bad_item_and_logs_each(caplog: pytest.LogCaptureFixture) -> None:
    problems = [Problem("a", "x/a.jpg: bad"), Problem("b", "x/b.jpg: bad"), Problem("a", "x: 2")]
    assert enforce([], "error", what="train") == set()
    with caplog.at_level("WARNING", logger="bench"):
        assert enforce(problems, "skip", what="train") == {"a", "b"}
    assert [r.getMessage() for r in caplog.records] == [
        "skipping a: x/a.jpg: bad",
        "skipping b: x/b.jpg: bad",
        "skipping a: x: 2",
    ]
    with pytest.raises(DatasetError, match=r"^x/a\.jpg: bad \(3 problems in train; "):
        enforce(problems, "error", what="train")


def test_bom_split_files_are_read(tree: Path) -> None:
    bom = b"\xef\xbb\xbf"
    files = [
        tree / V07 / "ImageSets" / "Main" / "train.txt",
        tree / V07 / "ImageSets" / "Main" / "dog_train.txt",
        tree / V12 / "ImageSets" / "Segmentation" / "train.txt",
        tree / SBD / "train.txt",
    ]
    firsts = [f.read_text().split()[0] for f in files]
    for f in files:
        f.write_bytes(bom + f.read_bytes())
    assert check_path(tree).problems == []
    assert read_split(tree / V07, "train")[0] == firsts[0]
    ids, _ = read_class_files(tree / V07, "train")
    assert ids[0] == firsts[1]
    assert load_segmentation(tree / V12, "train")[0].image_id == firsts[2]
    assert load_sbd(tree / SBD, "train")[0].image_id == firsts[3]


def test_loaders_name_a_missing_mask_as_the_checks_do(tree: Path) -> None:
    path, i = plant_missing_mask(tree)
    with pytest.raises(DatasetError) as exc:
        load_segmentation(tree / V12, "train")
    assert [str(exc.value)] == check_path(tree).problems


def test_bomb_warning_raised_as_error_is_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.png"
    _save_labels(path, np.zeros((10, 20)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 200 pixels: a warning, not an error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for reader in (load_rgb, verify_image, read_mask):
            with pytest.raises(DatasetError, match=r"m\.png: .*too large \(200 pixels, limit 150;"):
                reader(path)
    path.write_bytes(huge_png())
    for reader in (load_rgb, verify_image, read_mask):
        with pytest.raises(DatasetError, match=r"m\.png: .*too large \(10000000000 pixels"):
            reader(path)


# ------------------------------------------------------------------ random-bytes fuzzing


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """Truncate, flip bytes, insert junk, or replace everything, as a broken copy might."""
    how = rng.integers(4) if data else 3
    if how == 0:
        return data[: rng.integers(len(data))]
    if how == 1:
        out = bytearray(data)
        for pos in rng.integers(len(out), size=int(rng.integers(1, 9))):
            out[pos] = int(rng.integers(256))
        return bytes(out)
    if how == 2:
        pos = int(rng.integers(len(data)))
        return data[:pos] + rng.bytes(int(rng.integers(1, 64))) + data[pos:]
    return rng.bytes(int(rng.integers(0, 2 * len(data) + 64)))


def _sample(kind: str, root: Path, synth: Path) -> tuple[Path, bytes]:
    """Where a fuzzed file of `kind` goes under `root`, and a small valid original."""
    png = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 60)).save(png, "PNG")
    v07 = synth / V07
    dog = (v07 / "ImageSets/Main/dog_train.txt").read_bytes()
    return {
        "jpeg": (root / "x.jpg", (v07 / "JPEGImages" / "000001.jpg").read_bytes()),
        "png": (root / "x.png", png.getvalue()),
        "mask": (root / "m.png", _first_mask(synth)[0].read_bytes()),
        "xml": (root / "Annotations/000001.xml", (v07 / "Annotations/000001.xml").read_bytes()),
        "mat": (root / "x.mat", _first_mat(synth)[0].read_bytes()),
        "txt": (root / "ImageSets/Main/dog_x.txt", dog),
    }[kind]  # fmt: skip


def _readers(kind: str, path: Path, root: Path) -> list[Callable[[], object]]:
    """Every reader and check of a file of `kind` (the image beside it is valid)."""
    image = root / "JPEGImages" / "000001.jpg"
    pair = [SegSample("x", image, path)]
    return {
        "jpeg": [lambda: load_rgb(path), lambda: verify_image(path), lambda: check_images([path])],
        "png": [lambda: load_rgb(path), lambda: read_mask(path), lambda: check_images([path])],
        "mask": [lambda: read_mask(path), lambda: check_segmentation(pair)],
        "xml": [lambda: parse_voc_xml(path), lambda: check_detection(root, ["000001"])],
        "mat": [lambda: read_sbd_mat(path), lambda: check_segmentation(pair)],
        "txt": [lambda: read_id_list(path), lambda: read_class_files(root, "x", ["dog"])],
    }[kind]


@pytest.mark.parametrize("kind", ["jpeg", "png", "mask", "xml", "mat", "txt"])
def test_only_dataset_errors_escape_on_fuzzed_files(
    kind: str, synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A flipped size byte must not make the test allocate gigabytes: bombs start at 0.5 Mpx.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500_000)
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / folder).mkdir(parents=True)
    shutil.copy(synth_root / V07 / "JPEGImages" / "000001.jpg", tmp_path / "JPEGImages")
    path, data = _sample(kind, tmp_path, synth_root)
    outcomes = set()
    for seed in range(50):
        path.write_bytes(_mutate(data, np.random.default_rng([seed, len(kind)])))
        for read in _readers(kind, path, tmp_path):
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                try:
                    result = read()
                except DatasetError as exc:
                    messages, outcome = [str(exc)], "error"
                except Exception as exc:  # noqa: BLE001 - the point of the test
                    pytest.fail(f"seed {seed}, {kind}: {type(exc).__name__}: {exc} escaped")
                else:
                    found = result if isinstance(result, list) else []
                    problems = [p for p in found if isinstance(p, Problem)]
                    messages = [p.message for p in problems]
                    outcome = "problem" if problems else "ok"
            outcomes.add(outcome)
            for m in messages:
                assert "\n" not in m and m.startswith(f"{tmp_path}/"), (seed, m)
    assert outcomes & {"error", "problem"}


# ------------------------------------------------------------------ the real sample


def test_real_voc2007_sample_passes_preflight(shared_data: Path) -> None:
    root = shared_data / "VOCdevkit" / "VOC2007"
    if not root.is_dir():
        pytest.skip(f"{root} not available")
    ids = read_split(root, "train")
    assert len(ids) == 579
    assert check_detection(root, ids) == []
    voc12 = shared_data / "VOCdevkit" / "VOC2012"
    if voc12.is_dir():
        assert check_segmentation(load_segmentation(voc12, "train")) == []
