"""How pixels become encoder input: the one place that knows the input conventions.

A convention maps an RGB pixel p on 0-255 to the encoder's input: channels reordered to
`channels`, then (p - mean) / std per channel (mean and std on the 0-255 scale, in the
convention's channel order). Two are in use (`encoders.alexnet.ARCHS` says which arch takes
which):

- `CAFFE`: Caffe's, in which the paper's encoder was trained and released and its transfer
  experiments ran: BGR, 0-255, minus the mean (104, 117, 123), no division (PROTOCOL.md;
  philkr/voc-classification train_cls.py L60, magic_init.py L420). Fast R-CNN and FCN
  subtract the same mean with other decimals, (102.9801, 115.9465, 122.7717) and
  (104.00699, 116.66877, 122.67892) (docs/reference-values.md section 8); the encoder's own
  convention is used in every task, as the paper transferred one released model to all.
  At this scale CaffeNet's LRN (alpha 1e-4) divides its input by about 1.3-1.5 and N(0, 0.01)
  weights give the random baseline Caffe's activation scale; on [0, 1]-like inputs LRN is
  the identity and the random net's pool5 ~56x smaller.
- `TORCHVISION`: torchvision's ImageNet statistics, RGB, (p / 255 - mean) / std, which its
  AlexNet file was trained with (and the ResNets and ViTs of `encoders/`; `INCEPTION` is
  timm's other one).

A convention travels in model cards (`input_convention`: `as_dict()`), and weights made for
one are moved to another by `fold_conv1`, exactly, as long as conv1 has no zero padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from benchmark.errors import BenchError, printable

Channels = Literal["RGB", "BGR"]
UNIT_RANGE_HALF = 127.5  # a 0-255 difference d is d / 127.5 on [-1, 1] (Table 1's scale)


@dataclass(frozen=True)
class InputConvention:
    """x[c] = (p[channel c of `channels`] - mean[c]) / std[c], p an RGB pixel on 0-255."""

    name: str
    channels: Channels
    mean: tuple[float, float, float]  # 0-255 scale, in `channels` order
    std: tuple[float, float, float]  # 0-255 scale, in `channels` order; 1 = no division

    def _rgb(self, values: Sequence[float]) -> tuple[float, float, float]:
        """Per-channel values in this convention's order -> in RGB order."""
        v = tuple(float(x) for x in values)
        return (v[2], v[1], v[0]) if self.channels == "BGR" else (v[0], v[1], v[2])

    def _view(self, values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        """(3, 1, 1) on `like`'s device, float64 for float64 input (exact tests), else float32."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return torch.tensor(values, dtype=dtype, device=like.device).view(3, 1, 1)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) RGB pixels on 0-255 (uint8 or float) -> float encoder input
        (float32; float64 stays float64).

        One full-size float pass for Caffe (uint8 - mean promotes to float32), two with a
        std; a BGR reorder is a copy of the uint8 input, a quarter of a float pass."""
        if self.channels == "BGR":
            images = images.flip(-3)
        x = torch.sub(images, self._view(self.mean, images))
        if self.std != (1.0, 1.0, 1.0):
            x = x.div_(self._view(self.std, images))
        return x

    def order_channels(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        """RGB channels along `axis` -> this convention's order (and back: a reorder is its
        own inverse); for methods that scale pixels their own way (per-patch statistics)."""
        return np.flip(x, axis=axis) if self.channels == "BGR" else x

    def normalise_hwc(self, pixels: np.ndarray) -> torch.Tensor:
        """(H, W, 3) RGB array on 0-255 (a loader's image) -> (3, H, W) float32 input."""
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
        return self.normalise(x)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) encoder input -> RGB pixels in [0, 1] (clamped), for figures."""
        x = x.float() * self._view(self.std, x) + self._view(self.mean, x)
        if self.channels == "BGR":
            x = x.flip(-3)
        return x.div_(255.0).clamp_(0.0, 1.0)

    def colour(self, rgb: Sequence[float]) -> torch.Tensor:
        """An RGB colour in [0, 1] (e.g. a dataset's mean, the mask fill) -> (3,) input."""
        order = (2, 1, 0) if self.channels == "BGR" else (0, 1, 2)
        p = torch.tensor([255.0 * float(rgb[i]) for i in order], dtype=torch.float64)
        mean = torch.tensor(self.mean, dtype=torch.float64)
        return ((p - mean) / torch.tensor(self.std, dtype=torch.float64)).float()

    def mean_rgb8(self) -> np.ndarray:
        """The convention's mean as an RGB uint8 pixel: the padding colour that normalises
        to ~0 (exactly 0 for Caffe's integer mean), as Caffe pads mean-subtracted data."""
        return np.array([round(v) for v in self._rgb(self.mean)], dtype=np.uint8)

    def unit_scale(self) -> torch.Tensor:
        """(3,) per channel: a difference of inputs times this is the same difference on
        the [-1, 1] pixel scale (so losses read alike whatever the convention)."""
        return torch.tensor(self.std, dtype=torch.float32) / UNIT_RANGE_HALF

    def as_dict(self) -> dict[str, Any]:
        """The model-card entry: self-describing, so any file says what it was made for."""
        return {
            "name": self.name,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }


CAFFE = InputConvention("caffe", "BGR", (104.0, 117.0, 123.0), (1.0, 1.0, 1.0))
# torchvision's ImageNet statistics (torchvision.transforms.Normalize in its AlexNet recipe),
# on the 0-255 scale: (p - 255 m) / (255 s) = (p / 255 - m) / s.
TORCHVISION = InputConvention(
    "torchvision",
    "RGB",
    (255 * 0.485, 255 * 0.456, 255 * 0.406),
    (255 * 0.229, 255 * 0.224, 255 * 0.225),
)
# timm's IMAGENET_INCEPTION_MEAN/STD, (p / 255 - 0.5) / 0.5: its own supervised ViT weights
# (augreg) expect these (`encoders/`).
INCEPTION = InputConvention("inception", "RGB", (127.5, 127.5, 127.5), (127.5, 127.5, 127.5))
CONVENTIONS: dict[str, InputConvention] = {c.name: c for c in (CAFFE, TORCHVISION, INCEPTION)}
# What `bench import caffe` wrote into cards before the encoder took Caffe's input: its
# weights were folded to take torchvision's convention.
LEGACY_IMPORT_NOTE = "bench: RGB (x/255 - PIXEL_MEAN)/PIXEL_STD"


def caffe_transform(mean_bgr: Sequence[float], scale: float) -> InputConvention:
    """The input of a Caffe data layer with `mean_value` (BGR) and `scale`: (p - m) * scale."""
    if not scale > 0:
        raise ValueError(f"input scale must be > 0, got {scale}")
    mean = tuple(float(v) for v in mean_bgr)
    if (mean, scale) == (CAFFE.mean, 1.0):
        return CAFFE
    return InputConvention("caffe-transform", "BGR", mean, (1.0 / scale,) * 3)  # type: ignore[arg-type]


def saved_convention(card: Mapping[str, Any], where: object) -> InputConvention:
    """The convention a weights file's card says its conv1 takes. Files written before cards
    carried one (no `input_convention`, or the old importer's sentence) were made for
    torchvision's: every stage fed that one then."""
    value = card.get("input_convention")
    if value is None or (isinstance(value, str) and value.startswith(LEGACY_IMPORT_NOTE)):
        return TORCHVISION
    if isinstance(value, str) and value in CONVENTIONS:
        return CONVENTIONS[value]
    if isinstance(value, Mapping):
        try:
            conv = InputConvention(
                str(value["name"]),
                value["channels"],
                _triple(value["mean"]),
                _triple(value["std"]),
            )
        except (KeyError, TypeError, ValueError):
            conv = None
        if conv is not None and conv.channels in ("RGB", "BGR") and min(conv.std) > 0:
            known = CONVENTIONS.get(conv.name)
            return known if known == conv else conv
    raise BenchError(
        f"{printable(where)}: model card's input_convention {printable(str(value))} is not "
        f"one of {', '.join(CONVENTIONS)} nor a {{name, channels, mean, std}} object"
    )


def _triple(values: Any) -> tuple[float, float, float]:
    v = [float(x) for x in values]
    if len(v) != 3 or not all(np.isfinite(v)):
        raise ValueError("need 3 finite values")
    return v[0], v[1], v[2]


def fold_conv1(
    weight: np.ndarray | torch.Tensor,
    bias: np.ndarray | torch.Tensor,
    source: InputConvention,
    target: InputConvention,
) -> tuple[np.ndarray, np.ndarray]:
    """conv1 (out, 3, k, k) + bias made for `source` input -> the conv1 (float64) giving the
    same outputs on `target` input of the same pixels.

    With r the RGB channel that source channel d and target channel c both hold,
    x_s[d] = (std_t[c] x_t[c] + mean_t[c] - mean_s[d]) / std_s[d], which is affine in x_t:
    W'[:, c] = W[:, d] std_t[c] / std_s[d] and b' = b + sum_d sum_k W[:, d] (mean_t[c] -
    mean_s[d]) / std_s[d]. Exact only without zero padding (a padded zero is the mean colour
    of each convention, which differ); callers check conv1's padding."""
    w = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"conv1 weight must be (out, 3, k, k), got {w.shape}")
    perm = [c if source.channels == target.channels else 2 - c for c in range(3)]
    w_src = w[:, perm]  # column c: the source channel holding target channel c's colour
    s_src = np.asarray(source.std, np.float64)[perm]
    m_src = np.asarray(source.mean, np.float64)[perm]
    s_tgt, m_tgt = np.asarray(target.std, np.float64), np.asarray(target.mean, np.float64)
    folded = w_src * (s_tgt / s_src)[None, :, None, None]
    new_bias = b + w_src.sum(axis=(2, 3)) @ ((m_tgt - m_src) / s_src)
    return folded, new_bias
