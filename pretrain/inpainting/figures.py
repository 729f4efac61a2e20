"""`bench inpaint figures`: the paper's Figure 6 and Figure 8 as PNG files.

- `figure6.png`: one row per held-out image; columns: input (hole filled with the mean),
  then each run's inpainting (sorted L2, adversarial, joint), then NN-HOG and NN-CE (the
  joint run's features, else the last run's). Predictions are pasted into the hole of
  each run's own geometry (`model.HoleGeometry`, from its card), the ring keeping the real
  context; the input column and the baselines use the NN-CE run's geometry. `figure6.json`
  names the columns.
- `figure8_<feature>.png`: context nearest neighbours: one row per query; column 0 is the
  query's true 64x64 scored patch, then that patch of the k training images whose contexts
  are closest under that feature (ce, hog, and alexnet when a supervised AlexNet state dict
  is given).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from benchmark.datasets.folder import list_images
from benchmark.datasets.resolve import resolve_data
from benchmark.errors import BenchError
from benchmark.runs import atomic_write_json
from pretrain.inpainting.data import load_eval_images, to_pixels
from pretrain.inpainting.evaluate import held_out_paths, predict
from pretrain.inpainting.model import mask_context
from pretrain.inpainting.nearest import build_index, context_features, load_alexnet, training_crops
from pretrain.inpainting.weights import card_geometry, load_generator
from pretrain.samples import save_grid

LOSS_ORDER = {"l2": 0, "adversarial": 1, "joint": 2}
NEIGHBOURS = 5


def make_figures(
    runs: Sequence[Path],
    data: str | None,
    train_data: str | None,
    alexnet: str | None,
    images: int,
    out: Path,
    k: int = NEIGHBOURS,
) -> list[Path]:
    """Write Figure 6 and Figure 8 PNGs into `out`; returns their paths."""
    if not runs:
        raise BenchError("--runs: give at least one inpainting run folder")
    if images < 1:
        raise BenchError(f"--images: must be >= 1, got {images}")
    loaded = [(Path(r), *load_generator(r)) for r in runs]
    loaded.sort(key=lambda t: LOSS_ORDER.get(t[2].get("loss"), 9))
    ce_run = next((t for t in loaded if t[2].get("loss") == "joint"), loaded[-1])
    geometry = card_geometry(ce_run[2])
    queries = load_eval_images(held_out_paths(data, images))
    pool = training_crops(list_images(Path(resolve_data(train_data, "images"))))
    context = mask_context(queries, geometry.hole_mask())
    out = Path(out)
    written = []

    columns = ["input"]
    cells = [context]
    for path, gen, card in loaded:
        geo = card_geometry(card)
        pred = predict(gen, queries, geo)
        cells.append(geo.paste(mask_context(queries, geo.hole_mask()), pred))
        columns.append(f"{card.get('loss', '?')} ({path.name})")
    for kind in ("hog", "ce"):
        index = build_index(pool, kind, geometry, ce_run[1])
        q = context_features(kind, queries, geometry, ce_run[1])
        fill = index.centres[index.nearest(q, 1)[:, 0]]
        cells.append(geometry.paste(context, fill))
        columns.append(f"nn-{kind}")
    rows = [to_pixels(torch.stack([c[i] for c in cells])) for i in range(len(queries))]
    written.append(save_grid(out / "figure6.png", rows))
    atomic_write_json(out / "figure6.json", {"columns": columns, "rows": len(rows)})

    features: dict[str, dict] = {"ce": {"generator": ce_run[1]}, "hog": {}}
    if alexnet is not None:
        features["alexnet"] = {"alexnet": load_alexnet(alexnet)}
    truth = geometry.score_crop(queries)
    for kind, extra in features.items():
        index = build_index(pool, kind, geometry, **extra)
        nearest = index.nearest(context_features(kind, queries, geometry, **extra), k)
        centres = geometry.score_crop_of_prediction(index.centres)
        rows = [
            to_pixels(torch.cat([truth[i : i + 1], centres[nearest[i]]]))
            for i in range(len(queries))
        ]
        written.append(save_grid(out / f"figure8_{kind}.png", rows))
    return written
