"""What a pretraining run reads, checked before its run folder exists.

`bench.stages.run_stage` calls a stage's `preflight(cfg)` after the config check and
before it opens the run folder, so a run that cannot start (a missing or empty image folder,
an image that does not decode under `on_bad_data: error`, no segmentation shapes for
random-region masks) stops with a one-line error and leaves nothing behind. What the
preflight read is handed to the stage's `main`, which logs and drops the images
`on_bad_data: skip` let through into the run's own log: nothing is decoded twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmark.datasets.folder import list_images
from benchmark.datasets.preflight import Problem, check_image_folder, enforce
from benchmark.datasets.resolve import resolve_data
from pretrain.masks import load_voc_shapes


@dataclass(frozen=True)
class ImageFolder:
    """An unlabelled image folder, every image decoded once; `problems` are the bad images
    (always empty under `on_bad_data: error`, which stops at the first)."""

    root: Path
    paths: list[Path]
    problems: list[Problem]

    @property
    def what(self) -> str:
        return f"{self.root} images"

    def usable(self, policy: str, logger: logging.Logger) -> tuple[list[Path], list[str]]:
        """(usable paths, skipped paths): the bad images logged into the run and left out."""
        bad = enforce(self.problems, policy, what=self.what, logger=logger)  # type: ignore[arg-type]
        return [p for p in self.paths if str(p) not in bad], sorted(bad)


@dataclass(frozen=True)
class PretrainData:
    """What a pretraining run reads: its images and, for random-region masks, the
    segmentation shapes and their folder."""

    images: ImageFolder
    shapes: list[np.ndarray] | None = None
    shapes_root: Path | None = None


def image_folder(data: str | None, policy: str) -> ImageFolder:
    """The run's image folder (None: the synthetic unlabelled pool), listed and decoded;
    a DatasetError naming the file at the first problem under `on_bad_data: error`."""
    root = Path(resolve_data(data, "images"))
    paths = list_images(root)
    problems = check_image_folder(paths, desc=f"{root} images")
    if policy == "error":
        enforce(problems, "error", what=f"{root} images")
    return ImageFolder(root, paths, problems)


def pretrain_data(
    data: str | None, policy: str, shapes: str | Path | None = None, seed: int = 0
) -> PretrainData:
    """`image_folder`, plus the VOC2012 segmentation shapes of folder `shapes` when given."""
    images = image_folder(data, policy)
    if shapes is None:
        return PretrainData(images)
    root = Path(shapes)
    return PretrainData(images, load_voc_shapes(root, seed=seed), root)
