"""The adversarial half of Section 3.2, shared by every model that uses it.

One DCGAN discriminator (`DCGANDiscriminator`) and one update (`Adversary`) serve both the
feature-learning context encoder's optional joint loss and the inpainting model of Section
5.1. The discriminator sees only real or predicted content, never the context (the paper's
unconditioned discriminator). An iteration is the released code's sequential update: one
discriminator step on real vs (detached) predicted content, then the generator's adversarial
term through the *updated* discriminator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GENERATOR_LR_RATIO = 10.0  # the context encoder learns 10x faster than the discriminator


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02), shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANDiscriminator(nn.Module):
    """Real / predicted content (B, 3, S, S) -> one logit per image (B,).

    4x4 stride-2 convolutions with 64, 128, 256, 512 channels (BatchNorm on all but the
    first, LeakyReLU 0.2) down to 4 x 4 for a 64 px input (the inpainting patch), then a
    4x4 convolution to one logit; the paper's sigmoid is folded into the loss. Larger inputs
    get more stride-2 layers (512 channels) until the side is at most 4. No convolution has
    a bias: the released code zeroes them all before every step (pathak22/context-encoder
    @68abd11 train.lua L180-193, L274, L344).
    """

    def __init__(self, input_size: int = 64, widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        layers: list[nn.Module] = []
        cin, size, i = 3, input_size, 0
        while size > 4 or i < len(widths):
            cout = widths[min(i, len(widths) - 1)]
            layers.append(nn.Conv2d(cin, cout, 4, 2, 1, bias=False))
            if i > 0:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            cin, size, i = cout, size // 2, i + 1
            if size < 1:
                raise ValueError(f"discriminator input {input_size} is too small")
        layers.append(nn.Conv2d(cin, 1, kernel_size=size, bias=False))
        self.net = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1).mean(1)

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) in (0, 1): the paper's sigmoid output."""
        return torch.sigmoid(self(x))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-[log D(x) + log(1 - D(F(context)))], averaged; from logits, in float32."""
    real = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits))
    return real + fake


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(F(context)): the non-saturating generator side of Eq. 2."""
    return F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits))


def discriminator_lr(generator_lr: float, ratio: float = GENERATOR_LR_RATIO) -> float:
    """The discriminator's learning rate: the generator's divided by 10 (Section 5.1)."""
    return generator_lr / ratio


class Adversary:
    """The discriminator and its optimiser, and the two halves of an adversarial iteration.

    precision: the loop's `Precision` (autocast, NaN guard, loss scaling).
    fused: one discriminator batch for real and fake content (faster, but its BatchNorm
        then normalises them together, unlike the released code): an option, off by default.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision,
        fused: bool = False,
    ) -> None:
        self.discriminator, self.optimizer = discriminator, optimizer
        self.precision, self.fused = precision, fused
        # Under DDP a parameter must not change requires_grad between iterations, so there
        # the discriminator's weight gradients of the generator step are computed and dropped.
        ddp = isinstance(discriminator, nn.parallel.DistributedDataParallel)
        self._params = [] if ddp else list(discriminator.parameters())

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One discriminator step on real content vs detached predictions; its loss."""
        d, prec = self.discriminator, self.precision
        self.optimizer.zero_grad(set_to_none=True)
        with prec.autocast():
            if self.fused:
                logits = d(torch.cat([real, fake.detach()]))
                real_logits, fake_logits = logits[: len(real)], logits[len(real) :]
            else:
                real_logits, fake_logits = d(real), d(fake.detach())
        loss = discriminator_loss(real_logits, fake_logits)
        prec.backward(loss, "discriminator loss")
        prec.step(self.optimizer)
        return loss.detach()

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        """-log D(fake) through the updated discriminator. Its own weight gradients would be
        zeroed before its next step, so they are not computed."""
        for p in self._params:
            p.requires_grad_(False)
        try:
            with self.precision.autocast():
                logits = self.discriminator(fake)
            return generator_adversarial_loss(logits)
        finally:
            for p in self._params:
                p.requires_grad_(True)
