"""Unlabelled image folders (ImageNet, Paris StreetView style) for pretraining, and the one
place that turns whatever PIL raises for a bad file into a DatasetError naming that file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import (  # noqa: F401 - imported to register the IMAGE_FORMATS decoders
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from benchmark.errors import DatasetError, file_message

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)
# The decoders PIL may use: a hostile ".jpg" must not reach a plugin such as EPS, which runs
# Ghostscript. Their plugins are imported here, once, so that `Image.open(formats=...)` never
# calls `Image.init()` (plugin registration) from several threads at a time.
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP", "GIF")

_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def image_error(path: Path, exc: BaseException, what: str = "image") -> DatasetError:
    """The one-line DatasetError for an exception raised while opening or decoding `path`.

    PIL raises many types for corrupt files (OSError, SyntaxError, ValueError, struct.error,
    IndexError, EOFError, ZeroDivisionError, DecompressionBombError, ...), so callers catch
    `Exception` and let this name the file.
    """
    if isinstance(exc, FileNotFoundError):
        return DatasetError(file_message(path, f"{what} file not found"))
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        m = _BOMB.search(str(exc))
        size = f"{m[1]} pixels, limit {m[2]}" if m else str(exc)
        return DatasetError(
            file_message(
                path,
                f"image too large ({size}; a decompression bomb, or raise "
                "PIL.Image.MAX_IMAGE_PIXELS if it is genuine)",
            )
        )
    if isinstance(exc, UnidentifiedImageError):
        return DatasetError(
            file_message(path, f"unreadable {what} (not a supported image format, or corrupt)")
        )
    return DatasetError(file_message(path, f"unreadable {what} ({type(exc).__name__}: {exc})"))


def verify_image(path: Path) -> tuple[int, int]:
    """(width, height) of an image after decoding every byte of it; DatasetError if bad.

    JPEGs decode in draft mode at 1/8 scale: libjpeg still reads all entropy-coded data
    (a truncated file fails) at a fraction of the cost of a full decode.
    """
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            size = im.size
            if im.format in ("JPEG", "MPO"):  # MPO: a camera JPEG with extra pictures
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
        return size
    except Exception as exc:  # noqa: BLE001 - see image_error
        raise image_error(path, exc) from None


def list_images(root: Path) -> list[Path]:
    """Every image below `root` (recursive, case-insensitive extensions), sorted by path.

    Sorted so that a seed gives the same order on every machine.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(file_message(root, "image folder not found"))
    paths = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not paths:
        raise DatasetError(
            file_message(
                root, f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)} recursively)"
            )
        )
    return paths


def load_rgb(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB; greyscale, CMYK, palette and alpha images are converted.

    ImageNet holds a few greyscale and CMYK JPEGs; models expect three channels.
    """
    path = Path(path)
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            im.load()
            if im.mode == "RGB":
                return im.copy()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                # Composite on black instead of dropping alpha's meaning silently.
                rgba = im.convert("RGBA")
                out = Image.new("RGB", rgba.size, (0, 0, 0))
                out.paste(rgba, mask=rgba.getchannel("A"))
                return out
            if im.mode.startswith("I") or im.mode == "F":
                # 16-bit / float greyscale: rescale to 8 bits rather than clip.
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - see image_error
        raise image_error(path, exc) from None
