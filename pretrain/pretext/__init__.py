"""AlexNet-era pretext methods that need only unlabelled images, each sharing the project's
AlexNetEncoder (conv1..pool5) as `model.encoder`:

- `relative-position` (Doersch et al., ICCV 2015): which of 8 neighbours a patch is;
- `rotation` (Gidaris et al., ICLR 2018, RotNet): which of 4 rotations an image shows;
- `jigsaw` (Noroozi and Favaro, ECCV 2016): which permutation shuffled 9 tiles.

Every method module has the same parts: a config dataclass whose defaults are the paper's
(or its released code's) values; a model `Net(arch, pool_free, cfg)`; a dataset
`Images(paths, cfg, seed, convention)` over the loop's (index, sample) keys (images in the
encoder's input convention), every random choice drawn from the key's generator;
`make_step(model, optimizer, device, *, precision=None, channels_last=False) -> step(batch,
iteration) -> {"loss", "accuracy"}` (the loop calls
`precision.update()` after it); `make_optimizer(model, cfg)` and `learning_rate(cfg,
iteration, iterations_per_epoch)`, to be applied with `set_learning_rate(optimizer, lr)`
(it keeps Caffe's per-group lr_mult); `total_iterations(cfg, num_images)`;
`forward_batch(model, batch, device, channels_last=False) -> (logits, labels)` as the
step computes them; and `sample_figure(batch, logits, path, *, cfg=None, convention=CAFFE)`.
`PRETEXT_METHODS` maps each `--method` name to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pretrain.pretext import jigsaw, relative_position, rotation
from pretrain.pretext.common import set_learning_rate


@dataclass(frozen=True)
class Pretext:
    """One method's parts, by role."""

    name: str
    config: type
    model: type
    dataset: type
    make_step: Callable[..., Any]
    make_optimizer: Callable[..., Any]
    learning_rate: Callable[..., float]
    total_iterations: Callable[..., int]
    forward_batch: Callable[..., Any]
    sample_figure: Callable[..., Any]


def _parts(name: str, module: Any, config: type, model: type, dataset: type) -> Pretext:
    return Pretext(
        name,
        config,
        model,
        dataset,
        module.make_step,
        module.make_optimizer,
        module.learning_rate,
        module.total_iterations,
        module.forward_batch,
        module.sample_figure,
    )


PRETEXT_METHODS: dict[str, Pretext] = {
    "relative-position": _parts(
        "relative-position",
        relative_position,
        relative_position.RelativePositionConfig,
        relative_position.RelativePositionNet,
        relative_position.RelativePositionImages,
    ),
    "rotation": _parts(
        "rotation",
        rotation,
        rotation.RotationConfig,
        rotation.RotationNet,
        rotation.RotationImages,
    ),
    "jigsaw": _parts("jigsaw", jigsaw, jigsaw.JigsawConfig, jigsaw.JigsawNet, jigsaw.JigsawImages),
}

__all__ = [
    "PRETEXT_METHODS",
    "Pretext",
    "jigsaw",
    "relative_position",
    "rotation",
    "set_learning_rate",
]
