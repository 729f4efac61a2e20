"""`jigsaw`: Noroozi and Favaro, ECCV 2016, "Unsupervised Learning of Visual Representations
by Solving Jigsaw Puzzles" (the context-free network, CFN).

A crop is cut into a 3x3 grid, one tile is taken at a random place in each cell, the nine
tiles are shuffled by one permutation of a fixed maximal-Hamming set (`permutations.py`,
Algorithm 1) and a siamese-ennead network (one shared encoder + fc6 per tile, then fc7 and
fc8 over the nine concatenated fc6 vectors) classifies which permutation it was.

Sources: the paper (Fig. 3 caption, Sections 3.1-3.3, Algorithm 1, Table 3) and the
authors' released Caffe code, MehdiNoroozi/JigsawPuzzleSolver: `train_val_cfn_jps.prototxt`
(conv1 stride 2, fc6 1024 per tile, fc7 4096, fc8 = number of permutations, dropout 0.5,
initialisation, lr_mult/decay_mult, batch 256) and `solver_cfn_jps.prototxt` (SGD base_lr
0.01, momentum 0.9, weight_decay 5e-4, step x0.1 every 100K, 350K iterations).

Anti-shortcut measures (Section 3.3): each tile normalised to zero mean and unit standard
deviation on its own (low-level statistics); random tile placement inside each cell
(edge continuity); a share of the puzzles in greyscale and the colour channels of every
colour tile jittered by up to 2 px (chromatic aberration).

The encoder runs with conv1 at stride 2 while pretraining (the CFN's setting; Fig. 3 caption:
"during the training on the puzzle task, we set the stride of the first layer of the CFN to
2 instead of 4"); the exported weights are used at stride 4, as the paper transfers them.
Tiles are normalised per tile, in the channel order of the encoder's input convention
(BGR for CaffeNet, as the released Caffe code reads images), not with the convention's mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from benchmark.input_convention import CAFFE, InputConvention
from benchmark.loop import Precision, sgd
from encoders.alexnet import CONV_INDICES, AlexNetEncoder, Arch
from pretrain.data import SeededImages
from pretrain.dropout import Dropout
from pretrain.pretext.common import (
    chw,
    cross_entropy_step,
    display,
    images_to,
    pool5_shape,
    save_captioned_grid,
    set_learning_rate,
    sgd_groups,
    standardise,
)
from pretrain.pretext.permutations import Criterion, permutation_set

GRID = 3
TILES = GRID * GRID


@dataclass
class JigsawConfig:
    # --- puzzles (Fig. 3 caption: "We randomly crop a 225x225 pixel window from an image,
    # divide it into a 3x3 grid, and randomly pick a 64x64 pixel tile from each 75x75
    # pixel cell". Section 3.3 and the released prototxt use 85 px cells instead
    # (crop_size 255, jitter_size 21, a 21 px gap on average): set crop_size 255.)
    resize: int = 256  # shorter side before the crop (the 256 px ImageNet images Caffe reads)
    crop_size: int = 225
    tile_size: int = 64
    # Table 3: the best transfer came from 1000 permutations of maximal average Hamming
    # distance (8.00; minimum 2). The released prototxt uses a 100-permutation file.
    permutations: int = 1000
    permutation_seed: int = 0
    permutation_criterion: Criterion = "mean"  # Algorithm 1 (line 9 sums the distances)
    # --- anti-shortcut measures (Section 3.3)
    normalise_tiles: bool = True  # zero mean, unit std per tile; False: the input convention
    gray_prob: float = 0.3  # "a mix of grayscale (30%) and color (70%) images"
    channel_jitter: int = 2  # colour channels of colour tiles shifted by 0, +-1, +-2 px
    # --- network (train_val_cfn_jps.prototxt)
    conv1_stride: int = 2  # pool5 is 3x3 at 64 px with Caffe's ceil pooling
    fc6: int = 1024  # per tile, shared; ReLU, dropout
    fc7: int = 4096  # on the 9 x 1024 concatenation; ReLU, dropout
    dropout: float = 0.5
    # --- optimisation (solver_cfn_jps.prototxt; batch_size in the data layer)
    batch_size: int = 256
    lr: float = 0.01
    lr_step: int = 100_000  # lr_policy "step", stepsize 100000
    lr_gamma: float = 0.1
    iterations: int = 350_000
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bias_lr_mult: float = 2.0  # every bias: lr_mult 2, decay_mult 0
    bias_decay: bool = False


def cell_size(cfg: JigsawConfig) -> int:
    """Side of one grid cell (75 px for a 225 crop)."""
    return cfg.crop_size // GRID


def check_config(cfg: JigsawConfig) -> None:
    if cfg.tile_size > cell_size(cfg):
        raise ValueError(
            f"tile_size {cfg.tile_size} does not fit a {cell_size(cfg)} px cell "
            f"(crop_size {cfg.crop_size} / {GRID})"
        )
    if not 0.0 <= cfg.gray_prob <= 1.0:
        raise ValueError(f"gray_prob {cfg.gray_prob}: must be in [0, 1]")
    if cfg.channel_jitter < 0:
        raise ValueError(f"channel_jitter {cfg.channel_jitter}: must be >= 0")


# ---------------------------------------------------------------- puzzles


def crop_image(im: Image.Image, rng: np.random.Generator, cfg: JigsawConfig) -> np.ndarray:
    """Shorter side to `resize`, random crop_size x crop_size window: (C, C, 3) uint8."""
    w, h = im.size
    s = max(cfg.resize, cfg.crop_size) / min(w, h)
    nw, nh = max(cfg.crop_size, round(w * s)), max(cfg.crop_size, round(h * s))
    im = im.resize((nw, nh), Image.BILINEAR)
    top = int(rng.integers(0, nh - cfg.crop_size + 1))
    left = int(rng.integers(0, nw - cfg.crop_size + 1))
    return np.array(im)[top : top + cfg.crop_size, left : left + cfg.crop_size]


def to_gray(crop: np.ndarray) -> np.ndarray:
    """Equal-weight grey replicated over the three channels (the released data
    transformer's 0.3333 r + 0.3333 g + 0.3333 b): (C, C, 3) float32."""
    g = crop.astype(np.float32).mean(axis=2, keepdims=True)
    return np.repeat(g, 3, axis=2)


def tile_origins(rng: np.random.Generator, cfg: JigsawConfig) -> np.ndarray:
    """(9, 2) (y, x) top-left corners, row-major over the grid: cell origin plus a uniform
    offset in [0, cell - tile] per axis."""
    cell, t = cell_size(cfg), cfg.tile_size
    offsets = rng.integers(0, cell - t + 1, size=(TILES, 2))
    cells = np.array([(r * cell, c * cell) for r in range(GRID) for c in range(GRID)])
    return cells + offsets


def cut_tiles(
    crop: np.ndarray, origins: np.ndarray, rng: np.random.Generator, cfg: JigsawConfig, jitter: bool
) -> np.ndarray:
    """The nine tiles at `origins`: (9, T, T, 3) float32 in 0-255. With `jitter`, each
    channel of each tile is cut `channel_jitter` px or less away from the tile in y and x
    (clamped to the crop)."""
    t, size, j = cfg.tile_size, crop.shape[0], cfg.channel_jitter
    out = np.empty((TILES, t, t, 3), dtype=np.float32)
    for i, (y, x) in enumerate(origins):
        if not jitter or j == 0:
            out[i] = crop[y : y + t, x : x + t]
            continue
        shifts = rng.integers(-j, j + 1, size=(3, 2))
        for c in range(3):
            yc = int(np.clip(y + shifts[c, 0], 0, size - t))
            xc = int(np.clip(x + shifts[c, 1], 0, size - t))
            out[i, :, :, c] = crop[yc : yc + t, xc : xc + t, c]
    return out


def shuffle_tiles(tiles: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Input position i gets the tile of grid cell perm[i] (the released data transformer:
    dst_rcts[i] = src_rcts[H[i]])."""
    return tiles[np.asarray(perm)]


def unshuffle_tiles(tiles: torch.Tensor, perm: Sequence[int]) -> torch.Tensor:
    """Inverse of `shuffle_tiles`: the tiles back in grid order (9, ...)."""
    out = torch.empty_like(tiles)
    out[torch.as_tensor(list(perm))] = tiles
    return out


def normalise_tiles(tiles: np.ndarray) -> np.ndarray:
    """Each tile (over its pixels and channels) to zero mean and unit standard deviation:
    (9, T, T, 3) -> same, float32."""
    return standardise(tiles, axes=(1, 2, 3))


class JigsawImages(SeededImages):
    """Image folder -> {"tiles": (9, 3, T, T) float32 in input (shuffled) order, "label": ()
    int64 index into `permutations`}. Every random choice comes from the key's generator.
    `convention`: the encoder's input convention (the default arch's by default)."""

    def __init__(
        self,
        paths: Sequence[Path],
        cfg: JigsawConfig | None = None,
        seed: int = 0,
        convention: InputConvention = CAFFE,
    ) -> None:
        super().__init__(paths, flip=False)  # the released data layer has mirror: false
        self.seed = seed  # the run seed SeededImages.load keys samples with
        self.cfg = cfg or JigsawConfig()
        self.convention = convention
        check_config(self.cfg)
        self.permutations = permutation_set(
            self.cfg.permutations, self.cfg.permutation_seed, self.cfg.permutation_criterion
        )

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        image, rng = self.load(key)
        crop = crop_image(image, rng, cfg)
        gray = rng.random() < cfg.gray_prob
        if gray:
            crop = to_gray(crop)
        label = int(rng.integers(len(self.permutations)))
        origins = tile_origins(rng, cfg)
        tiles = cut_tiles(crop, origins, rng, cfg, jitter=not gray)
        tiles = shuffle_tiles(tiles, self.permutations[label])
        conv = self.convention
        if cfg.normalise_tiles:
            x = chw(conv.order_channels(normalise_tiles(tiles)))
        else:
            x = torch.stack(
                [conv.normalise_hwc(np.clip(t + 0.5, 0, 255).astype(np.uint8)) for t in tiles]
            )
        return {"tiles": x, "label": torch.tensor(label, dtype=torch.int64)}


# ---------------------------------------------------------------- model


class JigsawNet(nn.Module):
    """The CFN: each tile -> conv1..pool5 -> fc6 (shared); the nine fc6 vectors in input order
    -> fc7 -> fc8 (one logit per permutation). (B, 9, 3, T, T) -> (B, permutations)."""

    def __init__(
        self, arch: Arch = "caffenet", pool_free: bool = False, cfg: JigsawConfig | None = None
    ) -> None:
        super().__init__()
        cfg = cfg or JigsawConfig()
        check_config(cfg)
        self.cfg = cfg
        self.encoder = AlexNetEncoder(arch, pool_free)
        conv1 = self.encoder.features[0]
        conv1.stride = (cfg.conv1_stride, cfg.conv1_stride)  # weights unchanged
        c, h, w = pool5_shape(self.encoder, cfg.tile_size)
        self.pool5_shape = (c, h, w)
        self.fc6 = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, cfg.fc6),
            nn.ReLU(inplace=True),
            Dropout(cfg.dropout),
        )
        self.fc7 = nn.Sequential(
            nn.Linear(TILES * cfg.fc6, cfg.fc7), nn.ReLU(inplace=True), Dropout(cfg.dropout)
        )
        self.fc8 = nn.Linear(cfg.fc7, cfg.permutations)
        self._init_as_released()

    def _init_as_released(self) -> None:
        """train_val_cfn_jps.prototxt: conv weights N(0, 0.01), biases 0 (conv1, conv3) or 1
        (conv2, conv4, conv5); fc6 and fc7 N(0, 0.005) with bias 1; fc8 N(0, 0.01), bias 0."""
        conv_bias = dict(zip(CONV_INDICES, (0.0, 1.0, 0.0, 1.0, 1.0)))
        for i, value in conv_bias.items():
            conv = self.encoder.features[i]
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.constant_(conv.bias, value)
        for layer, std, bias in (
            (self.fc6[1], 0.005, 1.0),
            (self.fc7[0], 0.005, 1.0),
            (self.fc8, 0.01, 0.0),
        ):
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.constant_(layer.bias, bias)

    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, T) -> fc6 features (N, fc6)."""
        return self.fc6(self.encoder(tiles))

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, 9, 3, T, T) or (9B, 3, T, T) with each puzzle's tiles adjacent -> logits."""
        x = tiles.flatten(0, 1) if tiles.dim() == 5 else tiles
        f = self.embed(x)
        f = f.reshape(f.shape[0] // TILES, TILES * f.shape[1])
        return self.fc8(self.fc7(f))


# ---------------------------------------------------------------- training


def forward_batch(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, permutations), labels (B,)) for a collated batch."""
    x = images_to(batch["tiles"].flatten(0, 1), device, channels_last)  # (9B, 3, T, T)
    return model(x), batch["label"].to(device, non_blocking=True)


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    precision: Precision | None = None,
    channels_last: bool = False,
) -> Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]:
    """One step: softmax cross-entropy over the permutations, averaged over the batch
    (SoftmaxWithLoss). Returns {"loss", "accuracy"} (detached)."""
    return cross_entropy_step(model, optimizer, device, forward_batch, precision, channels_last)


def make_optimizer(model: nn.Module, cfg: JigsawConfig) -> torch.optim.SGD:
    """SGD with momentum; biases at 2x the rate and without weight decay (the prototxt)."""
    groups = sgd_groups(model, cfg.weight_decay, cfg.bias_lr_mult, cfg.bias_decay)
    opt = sgd(groups, cfg.lr, cfg.momentum)
    set_learning_rate(opt, cfg.lr)
    return opt


def learning_rate(
    cfg: JigsawConfig, iteration: int, iterations_per_epoch: int | None = None
) -> float:
    """lr_policy "step": lr x gamma^(iteration // stepsize)."""
    return cfg.lr * cfg.lr_gamma ** (iteration // cfg.lr_step)


def total_iterations(cfg: JigsawConfig, num_images: int) -> int:
    return cfg.iterations


# ---------------------------------------------------------------- figures


def puzzle_canvas(
    tiles: torch.Tensor, gap: int = 4, convention: InputConvention = CAFFE
) -> np.ndarray:
    """Nine tiles (9, 3, T, T) laid out row-major in a 3x3 grid with white gaps."""
    t = tiles.shape[-1]
    side = GRID * t + (GRID - 1) * gap
    canvas = np.ones((side, side, 3), dtype=np.float32)
    for i in range(TILES):
        r, c = divmod(i, GRID)
        y, x = r * (t + gap), c * (t + gap)
        canvas[y : y + t, x : x + t] = display(tiles[i], convention)
    return canvas


def sample_figure(
    batch: dict[str, torch.Tensor],
    logits: torch.Tensor,
    path: Path,
    *,
    cfg: JigsawConfig | None = None,
    permutations: np.ndarray | None = None,
    max_items: int = 8,
    convention: InputConvention = CAFFE,
) -> Path:
    """PNG: top row the puzzles as the network sees them (shuffled), captioned with the
    true and predicted permutation index; bottom row the tiles put back by the predicted
    permutation (a solved puzzle where the prediction is right).

    The labels index `permutations`, by default the set of `cfg` (default: JigsawConfig()).
    """
    if permutations is None:
        cfg = cfg or JigsawConfig()
        permutations = permutation_set(
            cfg.permutations, cfg.permutation_seed, cfg.permutation_criterion
        )
    n = min(max_items, batch["tiles"].shape[0])
    pred = logits.detach().argmax(dim=1).cpu()
    shuffled, solved, captions = [], [], []
    for i in range(n):
        tiles = batch["tiles"][i].cpu()
        label, guess = int(batch["label"][i]), int(pred[i])
        shuffled.append(puzzle_canvas(tiles, convention=convention))
        put_back = unshuffle_tiles(tiles, permutations[guess].tolist())
        solved.append(puzzle_canvas(put_back, convention=convention))
        mark = "ok" if guess == label else "wrong"
        captions.append(f"true {label} / pred {guess} ({mark})")
    return save_captioned_grid(
        path, [shuffled, solved], [captions], row_labels=["input", "solved by pred"]
    )
