"""Nearest-neighbour inpainting (Table 1's baselines) and context nearest neighbours (Fig. 8).

A query's hole is filled with the centre patch (the geometry's prediction box, as the
generator would predict it) of the training image whose *context* (the image with the hole
masked out) is closest. The hole and prediction boxes come from a `model.HoleGeometry`.
Context features:

- `hog`: scikit-image HOG of the grey image (8x8 cells, 2x2 blocks, 9 orientations), keeping
  only the blocks that do not touch the hole box, so the hole's content never counts;
- `ce`: the context encoder's own 4000-d bottleneck of the hole-filled context;
- `alexnet`: pool5 of a user-supplied supervised AlexNet (torchvision state dict, or any
  weights `weights.encoder.load_encoder` reads) on the hole-filled context resized to 227,
  fed in the encoder's input convention (Figure 8's comparison).

Every feature is L2-normalised and neighbours are ranked by Euclidean distance (= cosine).
Images are (N, 3, 128, 128) tensors in [-1, 1] throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from skimage.feature import hog

from benchmark.datasets.folder import load_rgb
from encoders.alexnet import AlexNetEncoder
from pretrain.inpainting.data import resize_shorter, to_unit_range, train_crop
from pretrain.inpainting.model import (
    IMAGE_SIZE,
    ContextEncoderGenerator,
    HoleGeometry,
    mask_context,
)

FeatureName = Literal["hog", "ce", "alexnet"]
HOG_CELL = 8
HOG_BLOCK = 2


def hog_features(images: torch.Tensor, geometry: HoleGeometry) -> torch.Tensor:
    """(N, 3, 128, 128) in [-1, 1] -> (N, D) HOG of the context: blocks touching the hole
    box (code: [32 + overlap, 96 - overlap); paper: [32, 96)) are dropped. The hole is
    mean-filled first: HOG's central-difference gradients at a kept cell's edge read one
    pixel past it, which for a hole on the 8-px cell grid (paper, overlap 0) is a hole pixel."""
    context = mask_context(images.detach().float().cpu(), geometry.hole_mask())
    grey = ((context + 1.0) / 2.0).clamp(0, 1)
    grey = (0.299 * grey[:, 0] + 0.587 * grey[:, 1] + 0.114 * grey[:, 2]).numpy()
    size = images.shape[-1]
    blocks = size // HOG_CELL - HOG_BLOCK + 1
    start = np.arange(blocks) * HOG_CELL  # first pixel of each block
    lo, hi = geometry.hole.start, geometry.hole.stop
    touches = (start + HOG_BLOCK * HOG_CELL > lo) & (start < hi)
    keep = ~(touches[:, None] & touches[None, :])  # (blocks, blocks)
    out = []
    for g in grey:
        h = hog(
            g,
            orientations=9,
            pixels_per_cell=(HOG_CELL, HOG_CELL),
            cells_per_block=(HOG_BLOCK, HOG_BLOCK),
            block_norm="L2-Hys",
            feature_vector=False,
        )  # (blocks, blocks, 2, 2, 9)
        out.append(h[keep].reshape(-1))
    return torch.from_numpy(np.stack(out)).float()


@torch.no_grad()
def ce_features(
    generator: ContextEncoderGenerator,
    images: torch.Tensor,
    geometry: HoleGeometry,
    batch_size: int = 32,
) -> torch.Tensor:
    """(N, 4000) bottleneck of the hole-filled contexts (generator in eval mode)."""
    hole = geometry.hole_mask()
    was_training = generator.training
    generator.eval()
    device = next(generator.parameters()).device
    feats = [
        generator.features(mask_context(b.to(device), hole.to(device))).cpu()
        for b in images.split(batch_size)
    ]
    generator.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def alexnet_features(
    encoder: AlexNetEncoder, images: torch.Tensor, geometry: HoleGeometry, batch_size: int = 32
) -> torch.Tensor:
    """(N, 9216) pool5 of the hole-filled contexts, upsampled to 227 and fed in the encoder's
    input convention (torchvision's ImageNet statistics for torchvision's AlexNet)."""
    hole = geometry.hole_mask()
    encoder.eval()
    out = []
    for b in images.split(batch_size):
        x = (mask_context(b, hole) + 1.0) * 127.5  # [-1, 1] -> 0-255
        x = F.interpolate(x, size=(227, 227), mode="bilinear", align_corners=False)
        out.append(encoder(encoder.convention.normalise(x)).flatten(1))
    return torch.cat(out)


def load_alexnet(path: str | Path) -> AlexNetEncoder:
    """A supervised torchvision AlexNet state dict (file) -> its conv1-pool5 encoder."""
    from weights.encoder import load_encoder

    encoder, _ = load_encoder(path, "torchvision")
    return encoder.eval()


def context_features(
    kind: FeatureName,
    images: torch.Tensor,
    geometry: HoleGeometry,
    generator: ContextEncoderGenerator | None = None,
    alexnet: AlexNetEncoder | None = None,
) -> torch.Tensor:
    """L2-normalised (N, D) context features of one kind."""
    if kind == "hog":
        feats = hog_features(images, geometry)
    elif kind == "ce":
        if generator is None:
            raise ValueError("ce features need the context encoder (generator)")
        feats = ce_features(generator, images, geometry)
    elif kind == "alexnet":
        if alexnet is None:
            raise ValueError("alexnet features need a supervised AlexNet")
        feats = alexnet_features(alexnet, images, geometry)
    else:
        raise ValueError(f"unknown feature {kind!r}")
    return F.normalize(feats.float(), dim=1)


@dataclass
class ContextIndex:
    """Training contexts' features and their centre patches, searched by distance."""

    features: torch.Tensor  # (N, D), L2-normalised
    centres: torch.Tensor  # (N, 3, P, P) in [-1, 1]: the prediction box of each image

    def nearest(self, query: torch.Tensor, k: int = 1) -> torch.Tensor:
        """(M, D) normalised query features -> (M, k) indices, closest first."""
        k = min(k, len(self.features))
        dist = torch.cdist(query.double(), self.features.double())
        return dist.topk(k, dim=1, largest=False).indices


def build_index(
    train_images: torch.Tensor,
    kind: FeatureName,
    geometry: HoleGeometry,
    generator: ContextEncoderGenerator | None = None,
    alexnet: AlexNetEncoder | None = None,
) -> ContextIndex:
    """Index (N, 3, 128, 128) training images by their context features; each keeps its
    prediction box (64x64 for hole "code", (64 + 2 overlap)^2 for "paper")."""
    feats = context_features(kind, train_images, geometry, generator, alexnet)
    return ContextIndex(feats, geometry.predicted(train_images).clone())


def nn_inpaint(
    index: ContextIndex,
    queries: torch.Tensor,
    kind: FeatureName,
    geometry: HoleGeometry,
    generator: ContextEncoderGenerator | None = None,
    alexnet: AlexNetEncoder | None = None,
) -> torch.Tensor:
    """(M, 3, 128, 128) queries -> (M, 3, P, P): each nearest context's prediction box."""
    q = context_features(kind, queries, geometry, generator, alexnet)
    return index.centres[index.nearest(q, 1)[:, 0]]


def training_crops(
    paths: Sequence[Path],
    load_size: int = 0,
    crops_per_image: int = 1,
    seed: int = 0,
    size: int = IMAGE_SIZE,
) -> torch.Tensor:
    """The NN database: per training image, its centre 128 crop after resizing the shorter
    side to `load_size` (0: at its own resolution, like the evaluation crops), plus
    `crops_per_image - 1` random crops of the training pipeline (seeded): (N, 3, 128, 128).
    """
    rng = np.random.default_rng(seed)
    out = []
    for p in paths:
        im = resize_shorter(load_rgb(p), load_size)
        if min(im.size) < size:
            im = resize_shorter(im, size)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        out.append(to_unit_range(np.asarray(im)[top : top + size, left : left + size]))
        for _ in range(crops_per_image - 1):
            out.append(to_unit_range(train_crop(im, rng, load_size=0, size=size)))
    return torch.stack(out)
