"""AlexNet for VOC classification: the transferred encoder up to pool5, new fc6-fc8."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.errors import ConfigError
from encoders.alexnet import AlexNetEncoder
from pretrain.dropout import Dropout

NUM_CLASSES = 20
HIDDEN = 4096

# Parameter-name prefixes that `train_from` freezes ("all" trains every layer; "pool5" trains
# fc6-fc8 on a fixed encoder; "fc7" trains fc8 only, a linear classifier on fc7 features).
FROZEN_PREFIXES: dict[str, tuple[str, ...]] = {
    "all": (),
    "pool5": ("encoder.",),
    "fc7": ("encoder.", "fc6.", "fc7."),
}


def pool5_size(encoder: AlexNetEncoder, crop: int) -> int:
    """Side of the pool5 map for a `crop` x `crop` input (6 for the protocol's 227)."""
    with torch.no_grad():
        try:
            out = encoder(torch.zeros(1, 3, crop, crop))
        except RuntimeError:
            raise ConfigError(f"augment.crop: {crop} is too small for the encoder") from None
    return int(out.shape[-1])


class ClassificationNet(nn.Module):
    """(B, 3, crop, crop) images in the encoder's input convention -> (B, 20) logits.

    encoder (conv1..pool5) -> fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8.
    At the protocol's 227 crop fc6 sees 256 * 6 * 6 = 9216 features; a smaller crop (demo
    runs) gives a smaller pool5 map and fc6 is sized to it.
    """

    def __init__(
        self,
        encoder: AlexNetEncoder,
        num_classes: int = NUM_CLASSES,
        crop: int = 227,
        dropout: float = 0.5,
        hidden: int = HIDDEN,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        side = pool5_size(encoder, crop)
        self.fc6 = nn.Linear(encoder.out_channels * side * side, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, num_classes)
        self.dropout = Dropout(dropout)
        reinit_head_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(x).flatten(1)
        x = self.dropout(F.relu(self.fc6(x)))
        x = self.dropout(F.relu(self.fc7(x)))
        return self.fc8(x)

    def head(self) -> list[nn.Linear]:
        return [self.fc6, self.fc7, self.fc8]


class EncoderClassifier(nn.Module):
    """A ResNet / ViT of the encoder contract with one new linear layer on its head input
    (`encoder.head_input`: the 2048-d average torchvision's fc reads, the [CLS] token timm's
    head reads), in the place of their own classifiers: (B, 3, S, S) -> (B, 20) logits.

    `frozen_encoder` (train_from "pool5": a linear classifier on fixed features) also keeps
    the encoder's BatchNorm statistics fixed (eval mode), so that nothing of it moves.
    """

    def __init__(
        self, encoder: nn.Module, num_classes: int = NUM_CLASSES, frozen_encoder: bool = False
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.frozen_encoder = frozen_encoder
        self.fc = nn.Linear(encoder.head_input.dim, num_classes)  # type: ignore[union-attr]
        reinit_head_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x).flatten(1))

    def head(self) -> list[nn.Linear]:
        return [self.fc]

    def train(self, mode: bool = True) -> EncoderClassifier:
        super().train(mode)
        if self.frozen_encoder:
            self.encoder.eval()
        return self


def reinit_head_(
    model: ClassificationNet | EncoderClassifier, std: float = 0.01, bias: float = 0.1
) -> None:
    """The protocol's fresh fc6-fc8 (a ResNet's / ViT's one linear layer): N(0, 0.01)
    weights, biases 0.1."""
    for layer in model.head():
        nn.init.normal_(layer.weight, 0.0, std)
        nn.init.constant_(layer.bias, bias)


def sigmoid_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Sum over kept (image, class) pairs of binary cross-entropy, divided by the batch size.

    logits, targets (B, C); keep (B, C) bool, False where the label is 'difficult' (ignored,
    contributes neither loss nor gradient). Normalised per image like Caffe's sigmoid loss
    in Krähenbühl et al.'s code.
    """
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return (loss * keep).sum() / logits.shape[0]
