"""Losses of Section 3.2: masked reconstruction and the joint weighting (the adversarial
terms are in `pretrain.adversarial`).

Masks are (B, 1, H, W) with 1 where the input was dropped. The reconstruction is scored on
the dropped region only, extended outward by an `overlap` band of context pixels that the
network also predicts and that weighs `overlap_weight` times more (paper: 7 px, released
code: 4 px, weight 10), which pushes the fill to agree with its surroundings. Pixels
outside the extended region get weight exactly 0, so they receive no gradient at all.

`scale` (per channel, `InputConvention.unit_scale()`) measures the error on the [-1, 1] pixel
scale whatever units the network works in (Caffe's 0-255 or torchvision's), so the loss reads
alike for every encoder and the joint loss keeps the balance the released code set on [-1, 1]
pixels. It weights per-channel sums, costing no pass over the images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REC_WEIGHT = 0.999  # lambda_rec of the joint loss
ADV_WEIGHT = 0.001  # lambda_adv of the joint loss
OVERLAP_PAPER = 7
OVERLAP_CODE = 4
OVERLAP_WEIGHT = 10.0


def extend_mask(mask: torch.Tensor, overlap: int) -> torch.Tensor:
    """Dilate a (B, 1, H, W) 0/1 mask by `overlap` pixels (square neighbourhood).

    For the central square this is exactly the released code's larger predicted patch.
    """
    if overlap <= 0:
        return mask
    k = 2 * overlap + 1
    return F.max_pool2d(mask.float(), kernel_size=k, stride=1, padding=overlap)


def loss_weights(
    mask: torch.Tensor, overlap: int = 0, overlap_weight: float = OVERLAP_WEIGHT
) -> torch.Tensor:
    """Per-pixel weights (B, 1, H, W): 1 on the dropped region, `overlap_weight` on the
    band of `overlap` context pixels around it, 0 elsewhere."""
    mask = mask.float()
    if overlap <= 0:
        return mask
    band = extend_mask(mask, overlap) - mask
    return mask + overlap_weight * band


def _masked_mean(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    overlap: int,
    overlap_weight: float,
    squared: bool,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum(w * err) / (C * #pixels with w > 0): the mean over the predicted region, with
    the band's errors counted `overlap_weight` times (normalised like the released code's
    weighted MSE over the predicted patch). err is |pred - target| (times `scale` per
    channel when given), squared for L2.

    Computed in float32 even under autocast: squared errors of half-precision outputs lose
    the small differences late in training."""
    d = pred.float() - target.float()
    err = d * d if squared else d.abs()
    w = loss_weights(mask, overlap, overlap_weight).to(err.dtype)
    count = (w > 0).sum() * err.shape[1]
    if scale is None:
        total = (err * w).sum()
    else:  # per-channel sums, then the channel weights: no extra full-size pass
        c = scale.to(err.device, err.dtype)
        total = (err * w).sum(dim=(0, 2, 3)) @ (c * c if squared else c)
    return total / count.clamp(min=1)


def masked_l2(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    overlap: int = 0,
    overlap_weight: float = OVERLAP_WEIGHT,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised masked L2 (Eq. 1): pred, target (B, C, H, W); mask (B, 1, H, W) -> scalar
    (float32 even under autocast); `scale` (C,) as in the module docstring."""
    return _masked_mean(pred, target, mask, overlap, overlap_weight, True, scale)


def masked_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    overlap: int = 0,
    overlap_weight: float = OVERLAP_WEIGHT,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked L1, the paper's equally good alternative to L2 (same shapes as `masked_l2`)."""
    return _masked_mean(pred, target, mask, overlap, overlap_weight, False, scale)


RECONSTRUCTION_LOSSES = {"l2": masked_l2, "l1": masked_l1}


def joint_loss(
    rec: torch.Tensor,
    adv: torch.Tensor | None = None,
    rec_weight: float = REC_WEIGHT,
    adv_weight: float = ADV_WEIGHT,
) -> torch.Tensor:
    """L = lambda_rec * L_rec + lambda_adv * L_adv (Eq. 3); without `adv`, just L_rec."""
    if adv is None or adv_weight == 0:
        return rec
    return rec_weight * rec + adv_weight * adv
