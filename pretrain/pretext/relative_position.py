"""`relative-position`: Doersch, Gupta and Efros, ICCV 2015, "Unsupervised Visual
Representation Learning by Context Prediction".

A patch and one of its eight neighbours on a 3x3 grid with gaps and jitter go through one
shared (siamese) encoder; the concatenated fc6 features are classified into the eight
relative positions. Anti-shortcut measures (Section 3.1 and the released code): the gap and
the jitter keep edges and textures from continuing between the patches; chromatic aberration
is removed by projecting out the green-magenta axis or by dropping two of three colour
channels; some patches are pixelated; each patch is normalised on its own.

Sources: the paper (Sections 3, 3.1, 4) and its released code, cdoersch/deepcontext
`train.py` (patch_sz, gap, noise, prep_image, sample_patch, gen_net, pos2lbl) and
`solver_mko.prototxt`. Where they differ, the default follows the released code and the
paper's value is named in the comment.

Differences from the paper forced by the shared encoder: the released network has
BatchNorm after conv3-conv5 (the shared AlexNetEncoder has none) and conv1 padded by 5
(applied here by setting conv1's padding while pretraining; the exported weights are the
plain encoder's). The paper trains on pairs drawn from grids of every image (several
pairs per patch); here one sample is one pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from benchmark.input_convention import CAFFE, InputConvention
from benchmark.loop import Precision, sgd
from encoders.alexnet import AlexNetEncoder, Arch
from pretrain.data import SeededImages
from pretrain.pretext.common import (
    caffe_xavier_,
    chw,
    cross_entropy_step,
    display,
    images_to,
    pool5_shape,
    save_captioned_grid,
    set_learning_rate,
    sgd_groups,
)

ColourMode = Literal["drop", "project", "none"]

# (dy, dx) grid steps of the second patch relative to the first; the label is the index.
# Doersch et al. number them 1..8 row by row (Fig. 2; pos2lbl in train.py): 1 2 3 / 4 . 5 /
# 6 7 8; label = their number - 1.
NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = (
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, -1),
    (0, 1),
    (1, -1),
    (1, 0),
    (1, 1),
)
NEIGHBOUR_NAMES = ("up-left", "up", "up-right", "left", "right", "down-left", "down", "down-right")
NUM_CLASSES = len(NEIGHBOUR_OFFSETS)
# Section 3.1: the green-magenta colour axis a = [-1, 2, -1]; projection B = I - a^T a / (a a^T).
GREEN_MAGENTA = np.array([-1.0, 2.0, -1.0])
PROJECTION = np.eye(3) - np.outer(GREEN_MAGENTA, GREEN_MAGENTA) / GREEN_MAGENTA.dot(GREEN_MAGENTA)


@dataclass
class RelativePositionConfig:
    # --- sampling (Section 3 "patches of 96x96 ... gap of 48 ... jitter up to 7 pixels";
    # train.py: patch_sz=(96, 96), gap=48, noise=7)
    patch_size: int = 96
    gap: int = 48
    jitter: int = 7  # each patch's location moves by up to this many px in x and in y
    # Images are resized to between 150K and 450K pixels, aspect kept (Section 4; train.py
    # get_resized_image gri_targpixels=randint(150000, 450000)). One whose shorter side is
    # below the 3x3 grid's span plus jitter (3*96 + 2*48 + 2*7 = 398 px) is scaled up to
    # it: the first patch is drawn so that all eight neighbours fit, which keeps its
    # position independent of the label (an absolute-position shortcut otherwise).
    min_pixels: int = 150_000
    max_pixels: int = 450_000
    # --- anti-shortcut measures
    # Chromatic aberration (Section 3.1): "project" removes the green-magenta axis from
    # every pixel; "drop" keeps one random channel and replaces the other two by Gaussian
    # noise of `drop_noise` x the kept channel's std ("~1/100"). The paper shows both in
    # its detection results; its qualitative results and the released code use dropping.
    colour: ColourMode = "drop"
    drop_noise: float = 0.01
    # Pixelation (Section 4 "downsample some patches to as little as 100 total pixels,
    # then upsample"; train.py prep_image: a third of the patches, to a side drawn as
    # sqrt(U(10^2, 95^2))).
    pixelate_prob: float = 0.33
    pixelate_min_side: int = 10
    pixelate_max_side: int = 95
    # Each patch: channel means removed, scaled to unit RMS (prep_image: "so that gradients
    # are a less useful cue", RMS 50 at Caffe's 0-255 scale, i.e. about unit scale here).
    # False: the project's ImageNet normalisation instead.
    normalise_patches: bool = True
    # --- network (train.py caffenet_stack / gen_net)
    conv1_pad: int = 5  # conv1 11x11 stride 4 pad 5: pool5 is 3x3 at 96 px (ceil pooling)
    fc6: int = 4096  # per patch, shared (siamese), BatchNorm + ReLU
    fc7: int = 4096  # on the two concatenated fc6 vectors, BatchNorm + ReLU
    fc8: int = 4096  # ReLU
    batch_norm: bool = True  # Caffe BatchNorm (no scale/shift) after fc6 and fc7
    # --- optimisation (train.py + solver_mko.prototxt: SGD, base_lr 1e-5 fixed, no
    # momentum, weight_decay 0, SoftmaxWithLoss normalization NONE = summed over pairs;
    # README: "For our experiments, we ran for 1.7M iterations")
    batch_size: int = 256  # pairs = 512 patches, the released code's batch_sz of patches
    lr: float = 1e-5
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss_reduction: Literal["sum", "mean"] = "sum"
    iterations: int = 1_700_000


# ---------------------------------------------------------------- geometry


class PairGeometry(NamedTuple):
    first: tuple[int, int]  # (y, x) of the first patch's top-left corner
    second: tuple[int, int]  # (y, x) of the second patch's top-left corner
    label: int  # index into NEIGHBOUR_OFFSETS


def grid_pitch(cfg: RelativePositionConfig) -> int:
    """Distance between the top-left corners of neighbouring grid cells (96 + 48)."""
    return cfg.patch_size + cfg.gap


def grid_span(cfg: RelativePositionConfig) -> int:
    """Side of the 3x3 grid with its jitter margin: the smallest image side that fits."""
    return 3 * cfg.patch_size + 2 * cfg.gap + 2 * cfg.jitter


def resize_for_pairs(
    im: Image.Image, rng: np.random.Generator, cfg: RelativePositionConfig
) -> Image.Image:
    """Resize to a random total pixel count in [min_pixels, max_pixels] (aspect kept), then
    up to the grid's span if the shorter side is below it."""
    w, h = im.size
    target = int(rng.integers(cfg.min_pixels, cfg.max_pixels + 1))
    scale = math.sqrt(target / (w * h))
    scale = max(scale, grid_span(cfg) / min(w, h))
    nw, nh = max(grid_span(cfg), round(w * scale)), max(grid_span(cfg), round(h * scale))
    return im.resize((nw, nh), Image.BILINEAR)


def sample_pair(
    rng: np.random.Generator, height: int, width: int, cfg: RelativePositionConfig
) -> PairGeometry:
    """Draw a 3x3 grid position uniformly, its centre cell as the first patch and one of the
    eight neighbours as the second, each patch jittered by up to `jitter` px per axis.

    Both patches lie inside the (height, width) image.
    """
    span, pitch, j = grid_span(cfg), grid_pitch(cfg), cfg.jitter
    if height < span or width < span:
        raise ValueError(f"image {height}x{width} is smaller than the grid's span {span}")
    gy = int(rng.integers(j, height - span + j + 1))
    gx = int(rng.integers(j, width - span + j + 1))
    label = int(rng.integers(NUM_CLASSES))
    dy, dx = NEIGHBOUR_OFFSETS[label]
    jit = rng.integers(-j, j + 1, size=4)
    first = (gy + pitch + int(jit[0]), gx + pitch + int(jit[1]))
    second = (gy + (1 + dy) * pitch + int(jit[2]), gx + (1 + dx) * pitch + int(jit[3]))
    return PairGeometry(first, second, label)


# ---------------------------------------------------------------- patch preprocessing


def pixelate(patch: np.ndarray, side: int) -> np.ndarray:
    """Down to side x side and back up (bilinear): (P, P, 3) uint8 -> same."""
    p = patch.shape[0]
    im = Image.fromarray(patch).resize((side, side), Image.BILINEAR)
    return np.array(im.resize((p, p), Image.BILINEAR))


def drop_colours(x: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Keep one random channel; the other two become Gaussian noise around its mean with
    `noise` x its standard deviation (Section 3.1). (P, P, 3) float."""
    keep = int(rng.integers(3))
    kept = x[..., keep]
    out = np.empty_like(x)
    std = float(kept.std())
    for c in range(3):
        if c == keep:
            out[..., c] = kept
        else:
            out[..., c] = rng.normal(float(kept.mean()), noise * std, size=kept.shape)
    return out


def project_colours(x: np.ndarray) -> np.ndarray:
    """Remove the green-magenta component of every pixel (Section 3.1): (P, P, 3) float."""
    return (x @ PROJECTION.T).astype(np.float32)


def prepare_patch(
    patch: np.ndarray,
    rng: np.random.Generator,
    cfg: RelativePositionConfig,
    convention: InputConvention = CAFFE,
) -> torch.Tensor:
    """(P, P, 3) uint8 -> (3, P, P) float32: pixelation, colour handling, normalisation
    (per patch, in `convention`'s channel order, or else by `convention`)."""
    if cfg.pixelate_prob > 0 and rng.random() < cfg.pixelate_prob:
        lo, hi = cfg.pixelate_min_side**2, cfg.pixelate_max_side**2
        side = int(math.sqrt(rng.random() * (hi - lo) + lo))
        patch = pixelate(patch, side)
    if not cfg.normalise_patches and cfg.colour == "none":
        return convention.normalise_hwc(patch)
    x = patch.astype(np.float32) / 255.0
    if cfg.colour == "drop":
        x = drop_colours(x, rng, cfg.drop_noise)
    elif cfg.colour == "project":
        x = project_colours(x)
    if cfg.normalise_patches:
        x = x - x.mean(axis=(0, 1), keepdims=True)
        x = x / max(float(np.sqrt(np.mean(x * x))), 1e-6)
        return chw(convention.order_channels(x))
    return convention.normalise_hwc(np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8))


class RelativePositionImages(SeededImages):
    """Image folder -> {"patches": (2, 3, P, P) float32 (first, second), "label": () int64,
    "positions": (2, 2) int64 (y, x) top-left corners, "image_size": (2,) int64 (H, W) of
    the resized image}. Every random choice comes from the key's generator. `convention`:
    the encoder's input convention (the default arch's by default)."""

    def __init__(
        self,
        paths: Sequence[Path],
        cfg: RelativePositionConfig | None = None,
        seed: int = 0,
        convention: InputConvention = CAFFE,
    ) -> None:
        super().__init__(paths, flip=False)  # the released code does not mirror
        self.seed = seed  # the run seed SeededImages.load keys samples with
        self.cfg = cfg or RelativePositionConfig()
        self.convention = convention

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        image, rng = self.load(key)
        image = resize_for_pairs(image, rng, cfg)
        pixels = np.array(image)  # writable: torch.from_numpy warns on read-only
        h, w = pixels.shape[:2]
        pair = sample_pair(rng, h, w, cfg)
        p = cfg.patch_size
        patches = [
            prepare_patch(pixels[y : y + p, x : x + p], rng, cfg, self.convention)
            for y, x in (pair.first, pair.second)
        ]
        return {
            "patches": torch.stack(patches),
            "label": torch.tensor(pair.label, dtype=torch.int64),
            "positions": torch.tensor([pair.first, pair.second], dtype=torch.int64),
            "image_size": torch.tensor([h, w], dtype=torch.int64),
        }


# ---------------------------------------------------------------- model


class RelativePositionNet(nn.Module):
    """Siamese AlexNet: each patch -> conv1..pool5 -> fc6; [fc6 first, fc6 second] -> fc7 ->
    fc8 -> fc9 (8 relative positions). (B, 2, 3, P, P) -> (B, 8) logits.

    With the CaffeNet encoder at 96 px and conv1 padded by 5, pool5 is 256 x 3 x 3 as in the
    released network; other encoders get the fc6 input their pool5 has.
    """

    def __init__(
        self,
        arch: Arch = "caffenet",
        pool_free: bool = False,
        cfg: RelativePositionConfig | None = None,
    ) -> None:
        super().__init__()
        cfg = cfg or RelativePositionConfig()
        self.cfg = cfg
        self.encoder = AlexNetEncoder(arch, pool_free)
        conv1 = self.encoder.features[0]
        conv1.padding = (cfg.conv1_pad, cfg.conv1_pad)  # weights unchanged: transfer as usual
        c, h, w = pool5_shape(self.encoder, cfg.patch_size)
        self.pool5_shape = (c, h, w)

        def bn(n: int) -> list[nn.Module]:
            return [nn.BatchNorm1d(n, affine=False)] if cfg.batch_norm else []

        self.fc6 = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, cfg.fc6), *bn(cfg.fc6), nn.ReLU(inplace=True)
        )
        self.fc7 = nn.Sequential(
            nn.Linear(2 * cfg.fc6, cfg.fc7), *bn(cfg.fc7), nn.ReLU(inplace=True)
        )
        self.fc8 = nn.Sequential(nn.Linear(cfg.fc7, cfg.fc8), nn.ReLU(inplace=True))
        self.fc9 = nn.Linear(cfg.fc8, NUM_CLASSES)
        caffe_xavier_(self)  # every layer of gen_net uses weight_filler xavier

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, 3, P, P) -> fc6 features (N, fc6)."""
        return self.fc6(self.encoder(patches))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        """(B, 2, 3, P, P) or (2B, 3, P, P) with pairs adjacent -> (B, 8) logits."""
        x = pairs.flatten(0, 1) if pairs.dim() == 5 else pairs
        f = self.embed(x)
        f = f.reshape(f.shape[0] // 2, 2 * f.shape[1])  # [first | second] per pair
        return self.fc9(self.fc8(self.fc7(f)))


# ---------------------------------------------------------------- training


def forward_batch(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, 8), labels (B,)) for a collated batch."""
    pairs = batch["patches"]
    x = images_to(pairs.flatten(0, 1), device, channels_last)  # (2B, 3, P, P)
    return model(x), batch["label"].to(device, non_blocking=True)


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    precision: Precision | None = None,
    channels_last: bool = False,
    loss_reduction: Literal["sum", "mean"] = "sum",
) -> Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]:
    """One SGD step on a batch of pairs: 8-way softmax cross-entropy, summed over the pairs
    by default as the released solver does (it sets the learning rate's scale).

    Returns {"loss": mean cross-entropy per pair, "accuracy"} (detached).
    """
    return cross_entropy_step(
        model, optimizer, device, forward_batch, precision, channels_last, loss_reduction
    )


def make_optimizer(model: nn.Module, cfg: RelativePositionConfig) -> torch.optim.SGD:
    """SGD as in solver_mko.prototxt (momentum only if configured)."""
    groups = sgd_groups(model, cfg.weight_decay)
    opt = sgd(groups, cfg.lr, cfg.momentum)
    set_learning_rate(opt, cfg.lr)
    return opt


def learning_rate(
    cfg: RelativePositionConfig, iteration: int, iterations_per_epoch: int | None = None
) -> float:
    """lr_policy "fixed"."""
    return cfg.lr


def total_iterations(cfg: RelativePositionConfig, num_images: int) -> int:
    return cfg.iterations


# ---------------------------------------------------------------- figures


def pair_canvas(
    first: torch.Tensor,
    second: torch.Tensor,
    label: int,
    gap: int = 8,
    convention: InputConvention = CAFFE,
) -> np.ndarray:
    """The first patch in the centre of a 3x3 layout and the second at `label`'s place."""
    p = first.shape[-1]
    side = 3 * p + 2 * gap
    canvas = np.ones((side, side, 3), dtype=np.float32)
    dy, dx = NEIGHBOUR_OFFSETS[label]
    for img, (gy, gx) in ((first, (1, 1)), (second, (1 + dy, 1 + dx))):
        y, x = gy * (p + gap), gx * (p + gap)
        canvas[y : y + p, x : x + p] = display(img, convention)
    return canvas


def sample_figure(
    batch: dict[str, torch.Tensor],
    logits: torch.Tensor,
    path: Path,
    *,
    cfg: RelativePositionConfig | None = None,
    max_items: int = 8,
    convention: InputConvention = CAFFE,
) -> Path:
    """PNG: each pair laid out at its true relative position, captioned with the true and
    the predicted position. (`cfg` is accepted for a uniform signature; unused.)"""
    n = min(max_items, batch["patches"].shape[0])
    pred = logits.detach().argmax(dim=1).cpu()
    images, captions = [], []
    for i in range(n):
        label = int(batch["label"][i])
        first, second = batch["patches"][i]
        images.append(pair_canvas(first, second, label, convention=convention))
        captions.append(f"true {NEIGHBOUR_NAMES[label]}\npred {NEIGHBOUR_NAMES[int(pred[i])]}")
    return save_captioned_grid(path, [images], [captions])
