"""Unlabelled image folders (ImageNet, Paris StreetView style) for pretraining."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from benchmark.errors import DatasetError

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


def list_images(root: Path) -> list[Path]:
    """Every image below `root` (recursive, case-insensitive extensions), sorted by path.

    Sorted so that a seed gives the same order on every machine.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found")
    paths = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not paths:
        raise DatasetError(
            f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} recursively)"
        )
    return paths


def load_rgb(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB; greyscale, CMYK, palette and alpha images are converted.

    ImageNet holds a few greyscale and CMYK JPEGs; models expect three channels.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
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
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable image ({exc})") from None
