"""Which dataset folder a command uses: the user's, or the embedded synthetic default.

Every stage takes `data: str | None`; None means the synthetic dataset, generated once
under `<results>/data/` and reused by every later command (its `synth.json` marker says it
is complete and with which parameters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from benchmark.datasets.folder import IMAGE_EXTENSIONS
from benchmark.datasets.synth import GENERATOR_VERSION, is_complete, make_synthetic
from benchmark.errors import DatasetError
from benchmark.runs import default_results_root

DataKind = Literal["voc2007", "voc2012", "sbd", "images"]

# Small enough that the whole demo suite (pretraining plus the three transfer tasks) runs
# in minutes on a CPU; large enough that every class has positives in every split.
DEFAULT_IMAGES = 400
DEFAULT_SEED = 0
DEFAULT_MIN_SIZE = 128
DEFAULT_MAX_SIZE = 192

# Layout each kind must have (relative paths), as in the real datasets.
REQUIRED: dict[str, tuple[str, ...]] = {
    "voc2007": ("JPEGImages", "Annotations", "ImageSets/Main"),
    "voc2012": ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"),
    "sbd": ("cls", "img", "train.txt"),
}
# Where each kind sits inside the synthetic tree (`bench data synth OUT`).
SYNTH_CHILD: dict[str, str] = {
    "voc2007": "VOCdevkit/VOC2007",
    "voc2012": "VOCdevkit/VOC2012",
    "sbd": "SBD/dataset",
    "images": "unlabelled",
}


def synthetic_root(results_root: Path | None = None) -> Path:
    """The default synthetic dataset's folder, generating it on first use."""
    base = Path(results_root) if results_root is not None else default_results_root()
    out = base / "data" / f"synthetic-n{DEFAULT_IMAGES}-s{DEFAULT_SEED}"
    # bench's own cache written by an older generator is replaced, never reported as foreign
    stale = is_complete(out) and not is_complete(out, {"generator_version": GENERATOR_VERSION})
    return make_synthetic(
        out,
        images=DEFAULT_IMAGES,
        seed=DEFAULT_SEED,
        min_size=DEFAULT_MIN_SIZE,
        max_size=DEFAULT_MAX_SIZE,
        force=stale,
    )


def _candidates(path: Path, kind: str) -> list[Path]:
    """Folders a user may reasonably mean by `path` for `kind`, most specific first."""
    if kind in ("voc2007", "voc2012"):
        year = "VOC2007" if kind == "voc2007" else "VOC2012"
        return [path, path / year, path / "VOCdevkit" / year]
    if kind == "sbd":
        release = path / "benchmark_RELEASE"
        return [path, path / "dataset", release / "dataset", path / "SBD" / "dataset"]
    return [path / "unlabelled"] if (path / "VOCdevkit").is_dir() else [path]


def _has_image(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*"))


def resolve_data(data: str | Path | None, kind: DataKind, results_root: Path | None = None) -> Path:
    """The folder holding `kind` data: VOC2007/VOC2012 year folder, SBD `dataset/`, or an
    image folder. None gives the synthetic default's; a VOCdevkit root (or a synthetic
    tree) gives its matching child; anything else must already have the layout.
    """
    if kind not in SYNTH_CHILD:
        raise DatasetError(f"data kind {kind!r} is not one of {', '.join(SYNTH_CHILD)}")
    if data is None or str(data) == "":
        return synthetic_root(results_root) / SYNTH_CHILD[kind]
    path = Path(data).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{path}: dataset folder not found")
    if kind == "images":
        folder = _candidates(path, kind)[0]
        if not _has_image(folder):
            raise DatasetError(f"{folder}: no images found for the unlabelled pool")
        return folder
    for cand in _candidates(path, kind):
        if all((cand / r).exists() for r in REQUIRED[kind]):
            return cand
    missing = [r for r in REQUIRED[kind] if not (path / r).exists()]
    raise DatasetError(
        f"{path}: not a {kind} dataset folder (missing {', '.join(missing)}; "
        f"a VOCdevkit root or a `bench data synth` folder also works)"
    )
