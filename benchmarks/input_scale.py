"""What the encoder's input convention changes: LRN ratios and the random baseline's pool5.

    python -m benchmarks.input_scale [--data VOCdevkit] [--images 32] [--seed 0]

On VOC2007 images (default: the synthetic set; the real samples: --data
../shared/data/VOCdevkit) it
feeds two CaffeNets the same pixels in Caffe's convention (BGR, 0-255, minus (104, 117, 123))
and in torchvision's ((x / 255 - mean) / std), and prints per network and convention:

- LRN1 / LRN2: the mean of LRN's output / input over its positive inputs (the divisor LRN
  applies; 1 = LRN does nothing);
- pool5 mean and standard deviation.

The networks: the CaffeNet as pretraining starts it (`ContextEncoder`'s He init), fed crops by
the pretraining pipeline (`pretrain.data.PretrainImages`), and the random Gaussian baseline
(N(0, 0.01), zero biases), fed by the probes' pipeline (`transfer.probes.features.preprocess`).
Used by docs/input-convention.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmark.datasets.resolve import resolve_data
from benchmark.input_convention import CAFFE, TORCHVISION, InputConvention
from benchmarks.common import markdown_table
from encoders.alexnet import AlexNetEncoder
from pretrain.context_encoder import ContextEncoder
from pretrain.data import PretrainImages
from transfer.probes.features import preprocess


def lrn_ratios(encoder: AlexNetEncoder, x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(LRN1 ratio, LRN2 ratio, pool5) of one batch (ratios as in the module docstring)."""
    ratios: list[float] = []

    def hook(module, inputs, output):
        pos = inputs[0] > 0
        ratios.append(float((output[pos] / inputs[0][pos]).mean()))

    handles = [encoder.features[i].norm.register_forward_hook(hook) for i in (2, 5)]
    with torch.no_grad():
        pool5 = encoder(x)
    for h in handles:
        h.remove()
    return ratios[0], ratios[1], pool5


def pretraining_batch(paths: list[Path], conv: InputConvention, seed: int) -> torch.Tensor:
    ds = PretrainImages(paths, 227, conv, flip=False, seed=seed)
    return torch.stack([ds[(i, i)]["image"] for i in range(len(paths))])


def probe_batch(paths: list[Path], conv: InputConvention) -> torch.Tensor:
    return torch.stack([preprocess(p, 227, 256, conv) for p in paths])


def measure(paths: list[Path], seed: int) -> list[dict[str, float | str]]:
    torch.manual_seed(seed)
    start = ContextEncoder("caffenet").encoder.eval()
    torch.manual_seed(seed)
    random = AlexNetEncoder("caffenet").eval()  # gaussian_init_: the baseline's N(0, 0.01)
    nets = (
        ("CaffeNet at pretraining start (He init)", start,
         lambda c: pretraining_batch(paths, c, seed)),
        ("random baseline N(0, 0.01)", random, lambda c: probe_batch(paths, c)),
    )  # fmt: skip
    rows = []
    for label, net, batch in nets:
        for conv in (CAFFE, TORCHVISION):
            lrn1, lrn2, pool5 = lrn_ratios(net, batch(conv))
            rows.append({"network": label, "convention": conv.name, "LRN1 out/in": lrn1,
                         "LRN2 out/in": lrn2, "pool5 mean": float(pool5.mean()),
                         "pool5 std": float(pool5.std())})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="VOCdevkit (default: the synthetic dataset)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    voc = Path(resolve_data(args.data, "voc2007"))
    paths = sorted((voc / "JPEGImages").glob("*.jpg"))[: args.images]
    print(f"{len(paths)} images from {voc}")
    print(markdown_table(measure(paths, args.seed)))


if __name__ == "__main__":
    main()
