"""`bench inpaint evaluate`: Table 1's metrics on held-out images.

Each held-out image is reduced to 128x128 (`eval_crop`: by default the public evaluation's
resize to 128 + centre crop, which takes all of a 227x227 Paris StreetView image; or the
centre 128 crop at native resolution), the centre hole is filled with the mean colour, and
the centre patch is predicted by a trained inpainting generator (`--weights RUN`) or by a
nearest-neighbour baseline (`--baseline nn-hog | nn-ce`, searching `train_data`).

Where the hole and the prediction lie is the generator card's `hole` / `overlap`
(`model.HoleGeometry`; without a generator, the paper's; `hole` and `overlap` here override
them, see `weights.card_geometry`). Errors are taken over the 64x64 region Table 1 scores
(`scored_region` in metrics.json, and the report labels each row with it): for the paper's
geometry the 64x64 hole, the centre of the 78x78 prediction; for the released code's
("code") the whole 64x64 prediction, its ring of visible context included, as the public
port's test.py L107-109 does.
Pixels in [-1, 1] (`benchmark.metrics.inpainting_errors`: mean L1, mean L2, PSNR per image
on 0-255), averaged over images; per-image values go to `per_image.csv`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from benchmark.datasets.folder import list_images
from benchmark.datasets.resolve import resolve_data
from benchmark.distributed import pick_device
from benchmark.errors import BenchError, ConfigError
from benchmark.metrics import inpainting_errors, mean_inpainting_errors
from benchmark.protocol import departures, is_synthetic, settings
from benchmark.runs import Run, atomic_write_text
from pretrain.inpainting.config import EVAL_CROPS, InpaintEvalConfig
from pretrain.inpainting.data import load_eval_images
from pretrain.inpainting.model import (
    HOLE_MODES,
    ContextEncoderGenerator,
    HoleGeometry,
    mask_context,
)
from pretrain.inpainting.nearest import build_index, nn_inpaint, training_crops
from pretrain.inpainting.weights import card_geometry, load_generator

PER_IMAGE_FILE = "per_image.csv"
def default_name(cfg: InpaintEvalConfig) -> str:
    if cfg.baseline is not None:
        return f"inpaint-eval-{cfg.baseline}-s{cfg.seed}"
    return f"inpaint-eval-{Path(cfg.weights or 'none').name}-s{cfg.seed}"


def held_out_paths(data: str | None, max_images: int) -> list[Path]:
    """The first `max_images` images (sorted) of the folder, or of the synthetic default."""
    root = Path(resolve_data(data, "voc2007")) / "JPEGImages" if data is None else Path(data)
    return list_images(root)[:max_images]


@torch.no_grad()
def predict(
    generator: ContextEncoderGenerator,
    images: torch.Tensor,
    geometry: HoleGeometry,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(N, 3, 128, 128) in [-1, 1] -> predicted patches (N, 3, P, P) (the geometry's
    prediction box), eval mode."""
    generator = generator.to(device).eval()
    if generator.output_size != geometry.prediction.size:
        raise ValueError(
            f"generator outputs {generator.output_size} px, {geometry.describe()} needs "
            f"{geometry.prediction.size}"
        )
    hole = geometry.hole_mask(device)
    out = [generator(mask_context(b.to(device), hole)).cpu() for b in images.split(batch_size)]
    return torch.cat(out)


def check(cfg: InpaintEvalConfig) -> None:
    if cfg.baseline is None and cfg.weights is None:
        raise ConfigError("weights: give an inpainting run folder, or a baseline (nn-hog, nn-ce)")
    if cfg.baseline == "nn-ce" and cfg.weights is None:
        raise ConfigError("weights: baseline nn-ce needs the context encoder's run folder")
    if cfg.max_images < 1 or cfg.batch_size < 1 or cfg.train_crops < 1:
        raise ConfigError("max_images, batch_size and train_crops must be >= 1")
    if cfg.overlap is not None and not 0 <= cfg.overlap < 32:
        raise ConfigError(f"overlap: must be in [0, 31], got {cfg.overlap}")
    if cfg.hole is not None and cfg.hole not in HOLE_MODES:
        raise ConfigError(f"hole: must be one of {', '.join(HOLE_MODES)}, got {cfg.hole!r}")


def main(cfg: InpaintEvalConfig, run: Run) -> dict[str, Any]:
    """Evaluate one method on the held-out images; writes per_image.csv then metrics.json."""
    check(cfg)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    paths = held_out_paths(cfg.data, cfg.max_images)
    images = load_eval_images(paths, mode=cfg.eval_crop)
    generator, card = load_generator(cfg.weights) if cfg.weights else (None, None)
    try:
        geometry = card_geometry(card, cfg.hole, cfg.overlap)
    except BenchError as exc:
        raise ConfigError(str(exc)) from None
    if generator is not None and generator.output_size != geometry.prediction.size:
        # hole / overlap set against the card: the parameter-free output resize follows
        run.logger.info(f"generator card {card_geometry(card).describe()}; evaluating as "
                        f"{geometry.describe()}")  # fmt: skip
        generator.output_size = geometry.prediction.size
    run.logger.info(f"{geometry.describe()}; scoring the 64x64 {geometry.scored_region}")
    if cfg.baseline is None:
        method = f"context-encoder-{(card or {}).get('loss', 'joint')}"
        pred = predict(generator, images, geometry, cfg.batch_size, device)
    else:
        method = cfg.baseline
        train_root = Path(resolve_data(cfg.train_data, "images"))
        pool = training_crops(
            list_images(train_root), cfg.train_load_size, cfg.train_crops, cfg.seed
        )
        kind = "hog" if cfg.baseline == "nn-hog" else "ce"
        index = build_index(pool, kind, geometry, generator)
        pred = nn_inpaint(index, images, kind, geometry, generator)
        run.logger.info(f"{cfg.baseline}: searched {len(pool)} contexts from {train_root}")
    scored = geometry.score_crop_of_prediction(pred)
    errors = inpainting_errors(scored.numpy(), geometry.score_crop(images).numpy())
    table = pd.DataFrame(
        {"image": [p.name for p in paths], **{k: np.asarray(v) for k, v in errors.items()}}
    )
    buf = io.StringIO()
    table.to_csv(buf, index=False, float_format="%.6f")
    if run.is_main:
        atomic_write_text(run.file(PER_IMAGE_FILE), buf.getvalue())
    means = mean_inpainting_errors(errors)
    run.logger.info(
        f"{method} on {means['images']} images ({EVAL_CROPS[cfg.eval_crop]}): "
        f"L1 {100 * means['mean_l1']:.2f}% "
        f"L2 {100 * means['mean_l2']:.2f}% PSNR {means['psnr']:.2f} dB"
    )
    metrics = {
        "stage": "inpaint-eval",
        "seed": cfg.seed,
        "command": run.command(),
        "method": method,
        **means,
        # how the row relates to Table 1's protocol (benchmark.protocol)
        "synthetic": is_synthetic(paths[0].parent if paths else cfg.data),
        "departures": departures(cfg),
        "pretrain_departures": (card or {}).get("departures") if cfg.weights else [],
        "settings": settings(cfg, device=device),
        "pretrain_settings": (card or {}).get("settings") if cfg.weights else None,
        "crop": EVAL_CROPS[cfg.eval_crop],
        "eval_crop": cfg.eval_crop,
        "hole": geometry.mode,
        "overlap": geometry.overlap,
        "prediction_size": geometry.prediction.size,
        "scored_region": geometry.scored_region,
        "geometry": geometry.label(),
        "weights": cfg.weights,
        "data": str(paths[0].parent) if paths else cfg.data,
        "per_image": PER_IMAGE_FILE,
    }
    run.write_metrics(metrics)
    return metrics
