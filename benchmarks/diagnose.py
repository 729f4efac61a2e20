"""What an encoder hands to transfer: activation scale per layer, dead units, and what its
inputs look like, with and without the data-dependent init (`rescale`).

    python -m benchmarks.diagnose RUN [RUN ...] [--data VOCdevkit] [--crop 67] [--images 64]

RUN is a pretraining run folder or weights file (none: the random baseline). For each encoder
it feeds a batch of VOC2007 trainval crops, drawn exactly as classification fine-tuning draws
them (`transfer.classification.data.TrainCrops`), and prints per layer (after its ReLU; pool5
after pooling): the mean activation, its standard deviation, the share of dead channels (never
positive on the batch), then the same after `rescale_for_transfer_`. A last table compares the
pixels the encoder saw in pretraining (its own data pipeline) with those transfer feeds it.
Used by docs/diagnosis.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmark.datasets.resolve import resolve_data
from benchmark.input_convention import InputConvention
from benchmarks.common import markdown_table
from encoders.alexnet import ARCHS, CONV_INDICES
from transfer.classification.config import AugmentConfig
from transfer.classification.data import TrainCrops, VOCImages
from transfer.classification.evaluate import to_input
from transfer.classification.model import ClassificationNet
from transfer.rescale import rescale_for_transfer_
from weights.encoder import load_encoder

LAYERS = {0: "conv1", 3: "conv2", 6: "conv3", 8: "conv4", 10: "conv5"}


def transfer_batch(
    voc: Path, crop: int, n: int, convention: InputConvention, seed: int = 0
) -> torch.Tensor:
    """`n` uint8 training crops of VOC2007 trainval, as fine-tuning draws them."""
    images = VOCImages(voc, "trainval")
    ds = TrainCrops(images, AugmentConfig(crop=crop, scale=(1.4, 2.0)), seed, convention)
    order = np.random.default_rng(seed).permutation(len(images))
    return torch.stack([ds[(int(order[i % len(images)]), i)][0] for i in range(n)])


@torch.no_grad()
def layer_stats(encoder: torch.nn.Module, x: torch.Tensor) -> list[dict[str, float | str]]:
    """Per conv layer (after ReLU) and pool5: mean, std, share of dead channels."""
    rows, y = [], x
    features = encoder.features
    for i, layer in enumerate(features):
        y = layer(y)
        name = LAYERS.get(i - 1) if i - 1 in CONV_INDICES else ("pool5" if i == 12 else None)
        if name is None:
            continue
        alive = (y > 0).flatten(2).any(-1).any(0)  # channel positive anywhere in the batch
        rows.append({"layer": name, "mean": float(y.mean()), "std": float(y.std()),
                     "dead %": 100.0 * float((~alive).float().mean())})  # fmt: skip
    return rows


def diagnose(weights: str | None, raw: torch.Tensor, crop: int, seed: int) -> list[dict]:
    encoder, card = load_encoder(weights)
    x = to_input(raw, torch.device("cpu"), encoder.convention)
    before = layer_stats(encoder.eval(), x)
    net = ClassificationNet(encoder, crop=crop, hidden=512, dropout=0.0)
    rescale_for_transfer_(net, lambda: net(x), "encoder.", card["method"] != "random", seed)
    after = layer_stats(net.encoder.eval(), x)
    label = card.get("method", "?") + (f" ({Path(weights).name})" if weights else "")
    return [
        {"encoder": label, **b, "mean rescaled": a["mean"], "std rescaled": a["std"],
         "dead % rescaled": a["dead %"]}
        for b, a in zip(before, after)
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="pretraining run folders or weights (none: random)")
    p.add_argument("--data", help="VOCdevkit (default: the synthetic dataset)")
    p.add_argument("--crop", type=int, default=67)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    voc = Path(resolve_data(args.data, "voc2007"))
    convention = ARCHS["caffenet"].convention  # the main job's encoder
    raw = transfer_batch(voc, args.crop, args.images, convention, args.seed)
    rows = []
    for weights in args.runs or [None]:
        rows += diagnose(weights, raw, args.crop, args.seed)
    print(markdown_table(rows))
    print()
    x = to_input(raw, torch.device("cpu"), convention)
    print(markdown_table(input_stats(x, args.images, convention, args.seed)))


def _stats(label: str, x: torch.Tensor, channels: str) -> dict[str, float | str]:
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    return {"input": label, "size": x.shape[-1],
            **{f"mean {c}": float(m) for c, m in zip(channels, mean)},
            **{f"std {c}": float(v) for c, v in zip(channels, std)}}  # fmt: skip


def input_stats(
    transfer_x: torch.Tensor, n: int, convention: InputConvention, seed: int
) -> list[dict[str, float | str]]:
    """Encoder inputs per channel (in `convention`): what pretraining fed the encoder (the
    pipeline of the main job's context encoder: synthetic unlabelled images, 99 px,
    random-region masks filled with the dataset's mean colour) against what classification
    fine-tuning feeds."""
    from benchmark.datasets.folder import list_images
    from pretrain.data import PretrainImages, dataset_mean
    from pretrain.masks import apply_mask, load_voc_shapes, make_mask_fn

    paths = list_images(resolve_data(None, "images"))
    shapes = load_voc_shapes(resolve_data(None, "voc2012"))
    mask_fn = make_mask_fn("random-region", (99, 99), shapes=shapes)
    ds = PretrainImages(paths, 99, convention, mask_fn, seed=seed)
    items = [ds[(i % len(paths), i)] for i in range(n)]
    image = torch.stack([it["image"] for it in items])
    mask = torch.stack([it["mask"] for it in items])
    masked = apply_mask(image, mask, convention.colour(dataset_mean(paths)))
    c = convention.channels
    return [
        _stats("pretraining crop (as the autoencoder sees it)", image, c),
        _stats("pretraining crop, masked region filled (context encoder)", masked, c),
        _stats("classification fine-tuning crop", transfer_x, c),
    ]


if __name__ == "__main__":
    main()
