"""`bench inpaint figures`: the paper's Figure 6 and Figure 8 as PNG files.

- `figure6.png`: one row per held-out image; columns: input (hole filled with the mean),
  then each run's inpainting (sorted L2, adversarial, joint), then NN-HOG and NN-CE (the
  joint run's features, else the last run's). Predictions are pasted into the context.
  `figure6.json` names the columns.
- `figure8_<feature>.png`: context nearest neighbours: one row per query; column 0 is the
  query's true centre patch, then the centre patches of the k training images whose
  contexts are closest under that feature (ce, hog, and alexnet when a supervised AlexNet
  state dict is given).
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
from pretrain.inpainting.model import central_hole, centre_patch, mask_context
from pretrain.inpainting.nearest import build_index, context_features, load_alexnet, training_crops
from pretrain.inpainting.train import paste
from pretrain.inpainting.weights import load_generator
from pretrain.losses import OVERLAP_PAPER
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
    overlap = int(ce_run[2].get("overlap", OVERLAP_PAPER))
    queries = load_eval_images(held_out_paths(data, images))
    pool = training_crops(list_images(Path(resolve_data(train_data, "images"))))
    hole = central_hole(overlap)
    context = mask_context(queries, hole)
    out = Path(out)
    written = []

    columns = ["input"]
    cells = [context]
    for path, gen, card in loaded:
        ov = int(card.get("overlap", overlap))
        pred = predict(gen, queries, ov)
        cells.append(paste(mask_context(queries, central_hole(ov)), pred, central_hole(ov)))
        columns.append(f"{card.get('loss', '?')} ({path.name})")
    for kind in ("hog", "ce"):
        index = build_index(pool, kind, overlap, ce_run[1])
        q = context_features(kind, queries, overlap, ce_run[1])
        fill = index.centres[index.nearest(q, 1)[:, 0]]
        cells.append(paste(context, fill, hole))
        columns.append(f"nn-{kind}")
    rows = [to_pixels(torch.stack([c[i] for c in cells])) for i in range(len(queries))]
    written.append(save_grid(out / "figure6.png", rows))
    atomic_write_json(out / "figure6.json", {"columns": columns, "rows": len(rows)})

    features: dict[str, dict] = {"ce": {"generator": ce_run[1]}, "hog": {}}
    if alexnet is not None:
        features["alexnet"] = {"alexnet": load_alexnet(alexnet)}
    truth = centre_patch(queries)
    for kind, extra in features.items():
        index = build_index(pool, kind, overlap, **extra)
        nearest = index.nearest(context_features(kind, queries, overlap, **extra), k)
        rows = [
            to_pixels(torch.cat([truth[i : i + 1], index.centres[nearest[i]]]))
            for i in range(len(queries))
        ]
        written.append(save_grid(out / f"figure8_{kind}.png", rows))
    return written
