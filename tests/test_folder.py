"""Image folders: listing, and conversion of every image mode to RGB."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from benchmark.datasets.folder import list_images, load_rgb, verify_image
from benchmark.errors import DatasetError


def test_list_images_is_sorted_recursive_and_skips_other_files(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    for name in ("b/z.JPEG", "a.png", "b/c.jpg"):
        Image.new("RGB", (4, 4)).save(tmp_path / name, "PNG" if name.endswith("png") else "JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    expected = [tmp_path / "a.png", tmp_path / "b/c.jpg", tmp_path / "b/z.JPEG"]
    assert list_images(tmp_path) == expected


def test_list_images_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="missing-folder"):
        list_images(tmp_path / "missing-folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty.*no images"):
        list_images(tmp_path / "empty")


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("RGB", (1, 2, 3), (1, 2, 3)),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("I;16", 65535, (255, 255, 255)),
    ],
)
def test_load_rgb_converts_modes(tmp_path: Path, mode: str, value, expected) -> None:
    path = tmp_path / ("im.tif" if mode in ("CMYK", "I;16") else "im.png")
    Image.new(mode, (5, 3), value).save(path)
    im = load_rgb(path)
    assert im.mode == "RGB" and im.size == (5, 3)
    assert tuple(np.asarray(im)[1, 2]) == expected


def test_load_rgb_palette(tmp_path: Path) -> None:
    im = Image.new("P", (2, 2), 1)
    im.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    im.save(tmp_path / "p.png")
    assert tuple(np.asarray(load_rgb(tmp_path / "p.png"))[0, 0]) == (200, 100, 50)


def test_load_rgb_unreadable_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(DatasetError, match="broken.jpg"):
        load_rgb(bad)
    with pytest.raises(DatasetError, match="absent.png"):
        load_rgb(tmp_path / "absent.png")


def test_imagenet_sample_loads_with_greyscale_converted(shared_data: Path) -> None:
    folder = shared_data / "ImageNet-sample"
    if not folder.is_dir():
        pytest.skip("ImageNet-sample not in shared data")
    paths = list_images(folder)
    assert len(paths) == 250
    grey = [p for p in paths if Image.open(p).mode != "RGB"]
    assert grey, "the sample is documented to hold greyscale images"
    for p in grey + paths[:10]:
        im = load_rgb(p)
        assert im.mode == "RGB" and im.size == Image.open(p).size


def test_paris_streetview_sample_loads(shared_data: Path) -> None:
    folder = shared_data / "ParisStreetView"
    if not folder.is_dir():
        pytest.skip("ParisStreetView not in shared data")
    paths = list_images(folder)
    assert [p.name for p in paths[:2]] == ["001_im.png", "002_im.png"]
    assert all(load_rgb(p).size == (227, 227) for p in paths)


@pytest.mark.parametrize("error", [struct.error, IndexError, EOFError, ZeroDivisionError, OSError])
def test_any_decoder_failure_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    path = tmp_path / "fuzzed.png"
    Image.new("RGB", (4, 4)).save(path)

    def fail(self: ImageFile.ImageFile) -> None:
        raise error("decoder gave up")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    expected = rf"fuzzed\.png: unreadable image \({error.__name__}: decoder gave up\)$"
    for reader in (load_rgb, verify_image):
        with pytest.raises(DatasetError, match=expected):
            reader(path)


def test_only_the_listed_formats_are_decoded(tmp_path: Path) -> None:
    # An EPS file would make PIL run Ghostscript; as a ".jpg" it is just unreadable.
    path = tmp_path / "script.jpg"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(DatasetError, match=r"script\.jpg: unreadable image \(not a supported"):
        load_rgb(path)


def test_verify_image_reads_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(path, quality=95)
    assert verify_image(path) == (80, 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(DatasetError, match=r"cut\.jpg: unreadable image \(OSError: image file is"):
        verify_image(path)
