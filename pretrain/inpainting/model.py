"""The inpainting context encoder of Section 5.1 (Table 1, Figures 4 and 6).

A DCGAN-style encoder-decoder that sees a 128x128 image whose centre hole is filled with
the dataset mean and predicts a centre patch slightly larger than the hole; the
discriminator that judges predicted patches alone (not conditioned on the context) is
`pretrain.adversarial.DCGANDiscriminator`. Layer widths, kernel sizes and the N(0, 0.02)
initialisation follow PROTOCOL.md "Inpainting context encoder"; like the released code, the
4000-d bottleneck is followed by BatchNorm and LeakyReLU before the decoder (train.lua L126),
and no convolution has a bias: train.lua zeroes every conv and up-conv bias of G and D before
each step (L274-275, L344-345), so the released networks train without any (BatchNorm's
scale and shift stay).

Where the hole and the predicted patch lie (`HoleGeometry`), two geometries, each with its
own overlap (`OVERLAPS`):

- "paper" (the default; Section 5.1: "we predict a slightly larger patch that overlaps with
  the context (by 7px)"): the hole is the 64x64 centre; the prediction extends 7 px past it
  into the context, a 78x78 patch whose ring is weighted 10x. The DCGAN decoder still ends
  at 64x64 and a parameter-free bilinear resize brings its output to the prediction size
  (see `ContextEncoderGenerator`).
- "code" (the released code, pathak22/context-encoder@68abd11 train.lua L282-285, L380-389,
  README L75 `overlapPred=4`, and the public PyTorch port): the prediction is the 64x64 centre
  patch; the mean-filled hole is its inner 56x56 square, so the prediction's 4-px ring is
  visible context, weighted 10x in the loss.

Another overlap with either hole is a mixed geometry that neither ran (`HoleGeometry.mixed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.adversarial import dcgan_init_
from pretrain.losses import OVERLAP_CODE, OVERLAP_PAPER, OVERLAP_WEIGHT, loss_weights

IMAGE_SIZE = 128
PATCH_SIZE = 64
PATCH_START = (IMAGE_SIZE - PATCH_SIZE) // 2  # 32: the centre patch is [32, 96) x [32, 96)
HoleMode = Literal["paper", "code"]
HOLE_MODES: tuple[HoleMode, ...] = ("paper", "code")
# Each geometry's own overlap: the paper's 7 px (Section 5.1), the released code's 4
# (README L75 `overlapPred=4`; train.lua L16 defaults to 0).
OVERLAPS: dict[str, int] = {"paper": OVERLAP_PAPER, "code": OVERLAP_CODE}
BOTTLENECK = 4000
# The released code fills dropped pixels with the training mean (117, 104, 123) in [-1, 1].
FILL_RGB = (117.0, 104.0, 123.0)
FILL = tuple(2.0 * v / 255.0 - 1.0 for v in FILL_RGB)


class BottleneckConv(nn.Conv2d):
    """The 4x4 conv from (B, 512, 4, 4) to the (B, 4000, 1, 1) bottleneck.

    Its kernel covers the whole input, so it is one fully connected layer; it is computed
    as a matrix product on the same `weight` (state dict unchanged), which CPU BLAS runs
    several times faster than the convolution kernels do for this shape (1x1 output).
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 4, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != self.weight.shape[-2:]:
            return super().forward(x)
        # reshape (not view): a channels_last input is read back in (C, H, W) order.
        return F.linear(x.reshape(len(x), -1), self.weight.flatten(1))[..., None, None]


class BottleneckUpConv(nn.ConvTranspose2d):
    """The up-convolution from the (B, 4000, 1, 1) bottleneck to (B, 512, 4, 4): a matrix
    product on the same `weight` (see `BottleneckConv`)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 4, 1, 0, bias=False)

    def forward(self, z: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if z.shape[-2:] != (1, 1) or output_size is not None:
            return super().forward(z, output_size)
        k = self.weight.shape[-2:]
        out = z.reshape(len(z), -1) @ self.weight.flatten(1)
        return out.view(len(z), self.out_channels, *k)


def _down(cin: int, cout: int, bn: bool, bias: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, 2, 1, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def _up(cin: int, cout: int, stride: int, padding: int) -> list[nn.Module]:
    if stride == 1:
        conv: nn.Module = BottleneckUpConv(cin, cout)
    else:
        conv = nn.ConvTranspose2d(cin, cout, 4, stride, padding, bias=False)
    return [
        conv,
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class InpaintingEncoder(nn.Module):
    """(B, 3, 128, 128) context -> (B, 4000, 1, 1) bottleneck (before its BatchNorm).

    conv1_bias: only to load generators saved when bench gave the first conv a bias; the
    released encoder has none (train.lua L88, zeroed every step)."""

    def __init__(self, bottleneck: int = BOTTLENECK, conv1_bias: bool = False) -> None:
        super().__init__()
        widths = (64, 64, 128, 256, 512)
        layers: list[nn.Module] = _down(3, widths[0], bn=False, bias=conv1_bias)
        for cin, cout in zip(widths, widths[1:]):
            layers += _down(cin, cout, bn=True)
        layers.append(BottleneckConv(widths[-1], bottleneck))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class InpaintingDecoder(nn.Module):
    """(B, 4000, 1, 1) -> (B, 3, 64, 64) patch in [-1, 1]."""

    def __init__(self, bottleneck: int = BOTTLENECK) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm2d(bottleneck),
            nn.LeakyReLU(0.2, inplace=True),
            *_up(bottleneck, 512, 1, 0),  # 4x4
            *_up(512, 256, 2, 1),  # 8x8
            *_up(256, 128, 2, 1),  # 16x16
            *_up(128, 64, 2, 1),  # 32x32
            nn.ConvTranspose2d(64, 3, 4, 2, 1, bias=False),  # 64x64
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ContextEncoderGenerator(nn.Module):
    """Context (B, 3, 128, 128), hole filled, -> predicted centre patch (B, 3, S, S).

    S = `output_size`: 64 for the released code's geometry, 64 + 2 overlap for the paper's
    (`HoleGeometry.prediction`). The decoder always ends at 64x64, as the paper describes
    it; any other size is reached by a parameter-free bilinear resize of the tanh output,
    like the final resize of the feature-learning context encoder's decoder
    (`pretrain.context_encoder.Decoder`). That is the least invasive way to a 78x78 patch:
    the layers, their shapes and the state dict stay exactly the paper's (one generator
    file format for both geometries, the parameter count of PROTOCOL.md), no layer is added
    that neither the paper nor the code has, and a convex combination of tanh outputs stays
    in [-1, 1]. (A 64 + 2 overlap side is no power of two, so the stride-2 up-convolutions
    cannot reach it themselves.)
    """

    def __init__(
        self, bottleneck: int = BOTTLENECK, output_size: int = PATCH_SIZE, conv1_bias: bool = False
    ) -> None:
        super().__init__()
        if output_size < 1:
            raise ValueError(f"output_size must be >= 1, got {output_size}")
        self.output_size = output_size
        self.encoder = InpaintingEncoder(bottleneck, conv1_bias)
        self.decoder = InpaintingDecoder(bottleneck)
        dcgan_init_(self)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        y = self.decoder(self.encoder(context))
        if y.shape[-1] != self.output_size or y.shape[-2] != self.output_size:
            size = (self.output_size, self.output_size)
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y

    @torch.no_grad()
    def features(self, context: torch.Tensor) -> torch.Tensor:
        """The 4000-d bottleneck code (B, 4000): the 'context encoder features' of NN-CE."""
        return self.encoder(context).flatten(1)


# ---------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Box:
    """A square [start, start + size)^2 of the image."""

    start: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size

    def crop(self, images: torch.Tensor) -> torch.Tensor:
        """(..., H, W) -> the box (..., size, size) (a view)."""
        return images[..., self.start : self.stop, self.start : self.stop]

    def within(self, outer: Box) -> Box:
        """This box in the coordinates of `outer` (which must contain it)."""
        if self.start < outer.start or self.stop > outer.stop:
            raise ValueError(f"{self} is not inside {outer}")
        return Box(self.start - outer.start, self.size)


@dataclass(frozen=True)
class HoleGeometry:
    """Where the hole and the predicted patch lie in the 128x128 image, for a hole mode
    ("paper" or "code", see the module docstring) and an overlap in px (None: the mode's
    own, `OVERLAPS`).

    hole: the central box filled with the mean (random holes are drawn inside it);
    prediction: the patch the generator outputs and the discriminator judges, the hole box
    grown by `overlap` on each side; its ring outside the hole is context weighted
    `overlap_weight` in the loss. scored: the 64x64 region Table 1 scores (code: the whole
    prediction, ring included, as the public port's test.py L107-109; paper: the hole).
    """

    mode: HoleMode = "paper"
    overlap: int | None = None  # None: the mode's own (`OVERLAPS`), set by __post_init__
    image_size: int = IMAGE_SIZE

    def __post_init__(self) -> None:
        if self.mode not in HOLE_MODES:
            raise ValueError(f"hole mode must be one of {HOLE_MODES}, got {self.mode!r}")
        if self.overlap is None:
            object.__setattr__(self, "overlap", OVERLAPS[self.mode])
        if not 0 <= self.overlap < PATCH_SIZE // 2:
            raise ValueError(f"overlap must be in [0, {PATCH_SIZE // 2 - 1}], got {self.overlap}")
        if self.prediction.start < 0 or self.prediction.stop > self.image_size:
            raise ValueError(f"prediction {self.prediction} does not fit a {self.image_size} image")

    @property
    def mixed(self) -> bool:
        """An overlap other than the mode's own: a geometry neither the paper nor the
        released code ran."""
        return self.overlap != OVERLAPS[self.mode]

    @property
    def _centre(self) -> int:
        return (self.image_size - PATCH_SIZE) // 2

    @property
    def hole(self) -> Box:
        if self.mode == "code":
            return Box(self._centre + self.overlap, PATCH_SIZE - 2 * self.overlap)
        return Box(self._centre, PATCH_SIZE)

    @property
    def prediction(self) -> Box:
        if self.mode == "code":
            return Box(self._centre, PATCH_SIZE)
        return Box(self._centre - self.overlap, PATCH_SIZE + 2 * self.overlap)

    @property
    def scored(self) -> Box:
        return self.prediction if self.mode == "code" else self.hole

    @property
    def scored_region(self) -> str:
        """Which region Table 1 scores, by name: "prediction" (code) or "hole" (paper)."""
        return "prediction" if self.mode == "code" else "hole"

    def describe(self) -> str:
        h, p = self.hole, self.prediction
        mixed = f", mixed: the {self.mode} geometry's own is {OVERLAPS[self.mode]}px"
        return (
            f"hole {self.mode}: {h.size}x{h.size} hole at {h.start}, {p.size}x{p.size} "
            f"prediction at {p.start} (overlap {self.overlap}px{mixed if self.mixed else ''})"
        )

    def label(self) -> str:
        """How a Table 1 row names its geometry and the region it scores."""
        name = {"paper": "paper geometry", "code": "released code's geometry"}[self.mode]
        if self.mixed:
            name = f"mixed geometry ({self.mode} hole with another overlap)"
        h, p = self.hole.size, self.prediction.size
        return (
            f"{name}: {h}x{h} hole, {p}x{p} prediction (overlap {self.overlap} px); scored on "
            f"the 64x64 {self.scored_region}"
        )

    # -- masks and crops

    def hole_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(1, 1, H, W) bool, True on the central hole (the dropped pixels)."""
        mask = torch.zeros(1, 1, self.image_size, self.image_size, dtype=torch.bool)
        self.hole.crop(mask).fill_(True)
        return mask.to(device)

    def place(self, region: torch.Tensor) -> torch.Tensor:
        """A (w, w) hole shape, w = the hole box's side, placed in the hole box:
        (1, H, W) float 0/1 (random-region and noise-region holes)."""
        w = self.hole.size
        if tuple(region.shape) != (w, w):
            raise ValueError(f"hole region must be {w}x{w}, got {tuple(region.shape)}")
        hole = torch.zeros(1, self.image_size, self.image_size)
        self.hole.crop(hole)[0] = region.float()
        return hole

    def predicted(self, images: torch.Tensor) -> torch.Tensor:
        """(..., H, W) image-sized tensor -> its prediction box (a view): the real patch
        the generator is trained to output (and the discriminator's real input)."""
        return self.prediction.crop(images)

    def score_crop(self, images: torch.Tensor) -> torch.Tensor:
        """(..., H, W) image-sized tensor -> the scored 64x64 box (a view)."""
        return self.scored.crop(images)

    def score_crop_of_prediction(self, pred: torch.Tensor) -> torch.Tensor:
        """(..., P, P) predictions -> the scored 64x64 box within them (a view)."""
        return self.scored.within(self.prediction).crop(pred)

    def loss_weights(
        self, hole: torch.Tensor | None = None, overlap_weight: float = OVERLAP_WEIGHT
    ) -> torch.Tensor:
        """Per-pixel loss weights over the whole image (B|1, 1, H, W): 1 on the dropped
        pixels, `overlap_weight` on the `overlap`-px ring of context around them, 0 elsewhere.
        `hole`: (B, 1, H, W) dropped pixels (default: the central hole). For the central hole
        the ring is exactly the prediction box minus the hole box; random holes lie inside
        the hole box, so their ring stays inside the prediction box too."""
        mask = self.hole_mask() if hole is None else hole
        return loss_weights(mask.float(), self.overlap, overlap_weight)

    def paste(self, context: torch.Tensor, pred: torch.Tensor, hole: torch.Tensor | None = None):
        """The prediction (B, 3, P, P) written into the dropped pixels of the context
        (B, 3, H, W); the ring (and any context outside the hole) keeps the real context,
        as in the paper's figures. Returns a new tensor."""
        mask = self.hole_mask(context.device) if hole is None else hole.bool()
        full = context.clone()
        self.predicted(full).copy_(pred)
        return torch.where(mask, full, context)


def centre_patch(images: torch.Tensor) -> torch.Tensor:
    """(B, C, 128, 128) -> the (B, C, 64, 64) centre patch (a view): the released code's
    prediction, the paper's hole, and in both the region Table 1 scores."""
    s, e = PATCH_START, PATCH_START + PATCH_SIZE
    return images[..., s:e, s:e]


def fill_value(device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 3, 1, 1) mean colour in [-1, 1] written into dropped pixels."""
    return torch.tensor(FILL, device=device).view(1, 3, 1, 1)


def mask_context(images: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Context input: `images` (B, 3, H, W) with pixels where `hole` (B|1, 1, H, W) is true
    replaced by the mean colour. Returns a new tensor; `images` is left unchanged."""
    fill = fill_value(images.device).to(images.dtype)
    return torch.where(hole, fill, images)
