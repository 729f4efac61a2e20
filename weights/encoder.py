"""The one weight loader of every stage that takes an encoder.

`load_encoder` turns whatever the user passes as `--weights` into an encoder plus its model
card: an `AlexNetEncoder`, or a ResNet / ViT of the encoder contract (`encoders/`) for the
tasks that take them (`families`):

- nothing (None): the 'random Gaussian' baseline, N(0, 0.01) weights, zero biases;
- a pretraining run folder: its `encoder.safetensors`;
- a native export (`.safetensors`, card in the metadata key `card` or beside it as
  `<name>.card.json`);
- a torchvision AlexNet state dict (`.pth`/`.pt`, e.g. `alexnet-owt-7be5be79.pth`): the
  ImageNet-supervised row of Table 2; its `classifier.*` tensors are ignored;
- a Caffe `.caffemodel` with its `.prototxt` beside it (same stem), converted in memory by
  `weights.caffe` (`bench import caffe` writes the same conversion as a native file);
- a ResNet-50 or ViT checkpoint as another tool wrote it (torchvision, timm, MoCo v1/v2/v3,
  DINO, SwAV, BYOL/SimCLR conversions, VISSL, MMPretrain, solo-learn, lightly, MAE,
  detectron2 `.pkl`): read without running its code and imported on the fly by `weights/`
  (format detected from the file's keys, or named by `fmt`, `--weights-format`), exactly as
  `bench import --format F FILE` imports it once into a native file;
- a native ResNet / ViT file (`bench import` writes them): the card's `family` and `config`
  rebuild the network, the tensors must match it exactly.

The architecture (arch, pool_free) comes from the card, else from the tensors' shapes; files
written before the encoder followed Caffe say "caffenet" for the ungrouped, LRN-free network
and load as `alexnet-plain` (see `resolve_arch`). The loaded encoder always takes its arch's
input convention (`benchmark.input_convention`): weights made for another (the card's
`input_convention`; files without one were made for torchvision's) get the conversion
folded into conv1, and the card records what they were made for (`input_convention_loaded`)
and says so in the log (see `adopt_convention`). Any tensor that the encoder does not
expect, or that it needs and the file lacks, is an error that lists both sets (STYLE.md
"guard transfer"): a silently half-loaded encoder would report random-init numbers under a
pretrained method's name. A NaN or infinite weight is an error naming the tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import encoders
from benchmark.errors import BenchError, printable
from benchmark.input_convention import InputConvention, saved_convention
from encoders.alexnet import ARCHS, AlexNetEncoder, refold_conv1

ENCODER_FILE = "encoder.safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin")
# Other suffixes the checkpoint importer reads (weights/files.py): Lightning's, VISSL's and
# detectron2's pickles. A file with any other suffix is read when --weights-format names it.
CHECKPOINT_SUFFIXES = (*TORCH_SUFFIXES, ".ckpt", ".torch", ".pkl", ".pickle")
CAFFE_SUFFIX = ".caffemodel"
ALEXNET = "alexnet"
FAMILIES = (ALEXNET, "resnet", "vit")  # every encoder family a transfer task may take
FAMILY_NAMES = {ALEXNET: "AlexNet", "resnet": "ResNet", "vit": "ViT"}
# Keys of a torchvision AlexNet that are not part of the encoder and are dropped on import.
IGNORED_TORCH_PREFIXES = ("classifier.",)
log = logging.getLogger("bench")


def random_card(arch: str = "caffenet", pool_free: bool = False) -> dict[str, Any]:
    """Model card of the 'random Gaussian initialization' row (pretraining time < 1 minute);
    for a ResNet / ViT arch (`encoders.ARCHS`), its library's own random initialisation."""
    convention = ARCHS[arch].convention.as_dict() if arch in ARCHS else None
    return {
        "method": "random", "mask": None, "iterations": 0, "data": None, "config_hash": None,
        "arch": arch, "pool_free": pool_free, "pretrain_seconds": 0.0,
        "input_convention": convention,
    }  # fmt: skip


def family_of(encoder: Any) -> str:
    """"alexnet", "resnet" or "vit": contract encoders say it, AlexNet's predates the key."""
    return str(getattr(encoder, "family", ALEXNET))


def convention_of(encoder: Any) -> InputConvention:
    """The input convention an encoder takes (AlexNet's `convention`, the contract's
    `input_convention`)."""
    found = getattr(encoder, "input_convention", None) or getattr(encoder, "convention", None)
    if not isinstance(found, InputConvention):
        raise TypeError(f"{type(encoder).__name__} has no input convention")
    return found


def load_encoder(
    weights: str | Path | None,
    arch: str = "caffenet",
    pool_free: bool = False,
    *,
    fmt: str | None = None,
    families: tuple[str, ...] = (ALEXNET,),
    input_size: int | None = None,
    task: str = "this task",
) -> tuple[Any, dict[str, Any]]:
    """Build the encoder described by `weights` and load it; returns (encoder, card).

    `arch` and `pool_free` only choose the architecture of the random baseline (an AlexNet
    arch, or "resnet50" / "vit_small_patch16_224" / "vit_base_patch16_224") and of AlexNet
    files whose card does not say. `fmt` names a foreign checkpoint's format (weights/
    FORMATS; None detects it). `families`: the encoder families the caller can run
    ("alexnet", "resnet", "vit"); another is a one-line error naming `task`. `input_size`:
    a ResNet's taps are pooled for it (the reference windows at 224, adaptive elsewhere); a
    ViT takes only its own. Raises BenchError naming the file when it is missing,
    unreadable, or its tensors do not match the encoder (missing / unexpected / shape).
    """
    if weights is None or str(weights) == "":
        if fmt:
            raise BenchError(f"--weights-format {fmt}: no --weights file to read")
        encoder, card = _random_encoder(arch, pool_free)
        where = f"arch {arch}"
    else:
        path = resolve_weights_path(weights)
        encoder, card = _load_file(path, arch, fmt)
        where = printable(path)
    family = family_of(encoder)
    if family not in families:
        takes = ", ".join(FAMILY_NAMES[f] for f in families)
        raise BenchError(f"{where}: a {FAMILY_NAMES[family]} encoder ({encoder.arch}); {task} "
                         f"takes {takes} encoders")  # fmt: skip
    if input_size is not None:
        encoder, card = at_input_size(encoder, card, input_size)
    return encoder, card


def _random_encoder(arch: str, pool_free: bool) -> tuple[Any, dict[str, Any]]:
    if arch in encoders.ARCHS:
        encoder = encoders.build(arch)
        card = {**random_card(arch), **encoders.card_fields(encoder), "pool_free": None}
        card["input_convention"] = card["input"]
        return encoder, card
    if arch not in ARCHS:
        choices = ", ".join([*sorted(ARCHS), *encoders.ARCHS])
        raise BenchError(f"arch: unknown encoder arch {arch!r} (choose from {choices})")
    return AlexNetEncoder(arch, pool_free), random_card(arch, pool_free)  # type: ignore[arg-type]


def at_input_size(encoder: Any, card: dict[str, Any], size: int) -> tuple[Any, dict[str, Any]]:
    """The encoder for `size` x `size` inputs: AlexNet and a ResNet at its own size as they
    are; a ResNet rebuilt with its taps pooled for `size` (same tensors); a ViT only at the
    size of its position embedding (one-line error otherwise)."""
    family = family_of(encoder)
    if family == ALEXNET or size == encoder.input_size:
        return encoder, card
    if family == "vit":
        side = encoder.input_size
        raise BenchError(f"input_size: {size}, but the {encoder.arch} encoder takes {side} x "
                         f"{side} images (its position embedding)")  # fmt: skip
    if size < 32:
        raise BenchError(f"input_size: {size} is too small for a ResNet (>= 32)")
    resized = encoders.ResNetEncoder(encoder.layers, encoder.width_per_group, size)
    resized.load_state_dict(encoder.state_dict())
    resized.train(encoder.training)
    card = {**card, **encoders.card_fields(resized)}
    card["input_convention"] = card["input"]
    return resized, card


def _load_file(path: Path, default_arch: str, fmt: str | None) -> tuple[Any, dict[str, Any]]:
    """The encoder of one weights file, whatever family and layout it holds."""
    if fmt:
        return import_foreign(path, fmt=fmt)
    if path.suffix == CAFFE_SUFFIX:
        state, card = read_caffe(path)
        return encoder_from_state(state, card, path, default_arch)
    if path.suffix == ".safetensors":
        state, card = read_native(path)
        if card.get("family") in encoders_families():
            return contract_from_state(state, card, path)
        if "features.0.weight" not in state:  # a foreign safetensors (timm, Hugging Face)
            return import_foreign(path, tree=state)
        return encoder_from_state(state, card, path, default_arch)
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise BenchError(
            f"{path}: unknown weights format '{path.suffix}' (expected .safetensors, "
            f"{', '.join(CHECKPOINT_SUFFIXES)}, {CAFFE_SUFFIX} or a pretraining run folder; "
            "or name the checkpoint's layout with --weights-format)"
        )
    from weights import read_checkpoint

    tree = read_checkpoint(path)
    alexnet = _alexnet_state(tree)
    if alexnet is not None:
        return encoder_from_state(alexnet, _imagenet_card(), path, default_arch)
    return import_foreign(path, tree=tree)


def encoders_families() -> tuple[str, ...]:
    return tuple(f for f in FAMILIES if f != ALEXNET)


def method_from_path(path: Path) -> str:
    """A method name for reports from a checkpoint's file name: `moco_v2_800ep.pth.tar` ->
    `moco_v2_800ep` (letters, digits, '_' and '-' only)."""
    stem = Path(path).name.split(".")[0]
    name = "".join(c if c.isalnum() or c in "_-" else "-" for c in stem).strip("-")
    return name or "imported"


def import_foreign(
    path: Path,
    *,
    fmt: str | None = None,
    tree: Any = None,
    method: str | None = None,
    **options: Any,
) -> tuple[Any, dict[str, Any]]:
    """A ResNet / ViT checkpoint of another tool -> (encoder, card), through `weights/`
    (no code run from the file; only a head's keys may be missing or left over). `options`
    are `weights.import_tree`'s (family, branch, num_heads, input_convention, input_size)."""
    from weights import import_tree, read_checkpoint

    if tree is None:
        tree = read_checkpoint(path)
    imported = import_tree(tree, path, fmt=fmt, **options)
    card = dict(imported.card)
    card.update({
        "method": method or method_from_path(path), "mask": None, "iterations": None,
        "data": None, "config_hash": None, "pool_free": None, "pretrain_seconds": None,
        "imported": True, "input_convention": card["input"],
        "input_convention_loaded": card["input"]["name"],
    })  # fmt: skip
    log.info("%s: %s format, %s encoder (%d tensors; dropped %d head, %d other keys)",
             printable(path), card["format"], card["arch"], card["keys"]["encoder"],
             card["keys"]["head"], card["keys"]["not_encoder"])  # fmt: skip
    return imported.encoder, card


def contract_from_state(
    state: Mapping[str, torch.Tensor], card: Mapping[str, Any], path: Path
) -> tuple[Any, dict[str, Any]]:
    """A native ResNet / ViT file: the card's family and config rebuild the network, the
    tensors must fill it exactly (load_state_checked)."""
    encoder = encoders.from_card(card)
    load_state_checked(encoder, state, path)
    encoder.eval()
    card = {**card, **encoders.card_fields(encoder), "source": str(path)}
    card["input_convention"] = card["input"]
    card.setdefault("input_convention_loaded", card["input"]["name"])
    return encoder, card


def _alexnet_state(tree: Any) -> dict[str, torch.Tensor] | None:
    """The AlexNet state dict (`features.N.*`, `classifier.*` dropped) a torchvision-layout
    file holds, or None when it holds another network."""
    obj = tree
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        return None
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    if "features.0.weight" not in state:
        return None
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_TORCH_PREFIXES)}


def _imagenet_card() -> dict[str, Any]:
    return {"method": "imagenet", "mask": None, "iterations": None, "data": "imagenet",
            "config_hash": None, "pretrain_seconds": None}  # fmt: skip


def encoder_from_state(
    state: Mapping[str, torch.Tensor], card: Mapping[str, Any], path: Path, default_arch: str
) -> tuple[AlexNetEncoder, dict[str, Any]]:
    """The encoder of a file's tensors and card (every weights format ends here): arch
    resolved and checked, tensors checked and loaded, conv1 in the arch's convention."""
    card = resolve_arch(state, card, path, default=default_arch)
    card["source"] = str(path)
    encoder = AlexNetEncoder(card["arch"], bool(card["pool_free"]))
    load_state_checked(encoder, state, path)
    return encoder, adopt_convention(encoder, card, path)


def adopt_convention(
    encoder: AlexNetEncoder, card: Mapping[str, Any], path: Path
) -> dict[str, Any]:
    """Fold into the loaded encoder's conv1 the conversion from the input its weights were
    made for (the card's) to the input its arch takes; the card that says both.

    Files written before cards named a convention were made for torchvision's, which every
    stage fed then: a CaffeNet among them now gets Caffe's input through a folded conv1, and
    computes what it computed before. `input_convention_loaded` names what the file was made
    for; a fold is logged."""
    card = dict(card)
    source = saved_convention(card, path)
    target = encoder.convention
    card["input_convention"] = target.as_dict()
    card["input_convention_loaded"] = source.name
    if source != target:
        try:
            state = refold_conv1(encoder.state_dict(), encoder.arch, source, target)
        except ValueError as exc:
            raise BenchError(f"{path}: {exc}") from None
        encoder.load_state_dict(state)
        card["convention_note"] = (
            f"weights made for {source.name} input; the conversion to the {encoder.arch} "
            f"encoder's {target.name} input is folded into conv1"
        )
        log.info("%s: %s", path, card["convention_note"])
    return card


def peek_card(weights: str | Path | None) -> dict[str, Any]:
    """The card of `weights` without building the encoder (for run names); never raises.

    Falls back to {"method": <file stem>} when the file cannot be read: the error is
    reported properly by `load_encoder` once the run starts.
    """
    if weights is None or str(weights) == "":
        return random_card()
    try:
        path = resolve_weights_path(weights)
        if path.suffix == CAFFE_SUFFIX:  # converting a caffemodel only for its name is slow
            from weights.caffe import default_method

            return {"method": default_method(path), "imported": True}
        if path.suffix == ".safetensors":
            card = read_native(path)[1]
            if card.get("method") == "unknown" and not card.get("family"):
                card["method"] = method_from_path(path)  # a foreign safetensors file
            return card
        from weights import read_checkpoint

        if _alexnet_state(read_checkpoint(path)) is not None:
            return _imagenet_card()
        return {"method": method_from_path(path), "imported": True}
    except (BenchError, OSError, ValueError):
        return {"method": Path(weights).stem}


def resolve_weights_path(weights: str | Path) -> Path:
    """A run folder means its native export; anything else must be an existing file."""
    path = Path(weights).expanduser()
    if path.is_dir():
        inner = path / ENCODER_FILE
        if not inner.is_file():
            raise BenchError(
                f"{path}: folder has no {ENCODER_FILE} (is it a finished pretraining run?)"
            )
        return inner
    if not path.is_file():
        raise BenchError(f"{path}: weights file not found")
    return path


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, card) of an AlexNet file: a native export, a torchvision-layout torch
    file or a caffemodel (the other families go through `load_encoder`)."""
    if path.suffix == ".safetensors":
        return read_native(path)
    if path.suffix in TORCH_SUFFIXES:
        return read_torchvision(path)
    if path.suffix == CAFFE_SUFFIX:
        return read_caffe(path)
    raise BenchError(
        f"{path}: unknown weights format '{path.suffix}' (expected .safetensors, "
        f"{', '.join(TORCH_SUFFIXES)}, {CAFFE_SUFFIX} or a pretraining run folder)"
    )


def read_caffe(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Caffe model, converted in memory; its prototxt must sit beside it (same stem)."""
    from weights.caffe import caffe_weights

    prototxt = path.with_suffix(".prototxt")
    if not prototxt.is_file():
        raise BenchError(
            f"{path}: a caffemodel needs its architecture: put {prototxt.name} beside it, or "
            f"run `bench import caffe PROTOTXT {path.name}` and pass the .safetensors it writes"
        )
    weights = caffe_weights(prototxt, path)
    return weights.state, weights.card


def read_native(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A `bench export --format native` file; the card from its metadata or its sidecar."""
    from weights.native import load_native

    state, card = load_native(path)
    card = dict(card)
    card.setdefault("method", "unknown")
    return state, card


def read_torchvision(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torchvision AlexNet state dict (ImageNet-supervised); `classifier.*` is dropped."""
    from weights import read_checkpoint

    obj = read_checkpoint(path)
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BenchError(f"{path}: not a state dict (a mapping of names to tensors)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_TORCH_PREFIXES)}
    return state, _imagenet_card()


def infer_arch(state: Mapping[str, torch.Tensor], path: Path) -> str | None:
    """The arch the tensors' shapes fit, None when there is no `features.0.weight`.

    conv1's width separates torchvision (64) from the CaffeNet widths (96); conv2's input
    channels then separate the grouped nets (48 per group) from `alexnet-plain` (96).
    Weights cannot tell CaffeNet's LRN order from BVLC AlexNet's: grouped means `caffenet`.
    """
    conv1 = state.get("features.0.weight")
    if conv1 is None:
        return None
    candidates = [a for a, spec in ARCHS.items() if spec.widths[0] == conv1.shape[0]]
    if not candidates:
        widths = ", ".join(f"{a}: {s.widths[0]}" for a, s in ARCHS.items())
        raise BenchError(
            f"{path}: features.0.weight has {conv1.shape[0]} filters, which matches no known "
            f"encoder ({widths})"
        )
    conv2 = state.get("features.3.weight")
    for arch in candidates:
        spec = ARCHS[arch]
        if conv2 is None or conv2.dim() < 2 or conv2.shape[1] * spec.groups[1] == spec.widths[0]:
            return arch
    return candidates[0]  # shapes fit none: load_state_checked names the tensor


def resolve_arch(
    state: Mapping[str, torch.Tensor], card: Mapping[str, Any], path: Path, default: str
) -> dict[str, Any]:
    """The card with `arch` and `pool_free` set and checked against the tensors.

    A card saying "caffenet" over an ungrouped conv2 ((256, 96, 5, 5)) was written before
    `caffenet` meant Caffe's grouped LRN network: that file is `alexnet-plain`, and the card
    says so in `arch_note`. Pool-free files have `features.2.weight` (no LRN) or
    `features.2.pool.weight` (LRN archs).
    """
    card = dict(card)
    if "pool_free" not in card:
        card["pool_free"] = "features.2.weight" in state or "features.2.pool.weight" in state
    arch = card.get("arch")
    if arch is None:
        card["arch"] = infer_arch(state, path) or default
    elif arch == "caffenet" and _ungrouped_conv2(state):
        card["arch"] = "alexnet-plain"
        card["arch_note"] = (
            "card says 'caffenet' but conv2 is ungrouped (256, 96, 5, 5): the LRN-free "
            "network bench trained before issue 11, loaded as 'alexnet-plain'"
        )
        log.info("%s: %s", path, card["arch_note"])
    if card["arch"] not in ARCHS:
        raise BenchError(f"{path}: model card names unknown arch {card['arch']!r}")
    return card


def _ungrouped_conv2(state: Mapping[str, torch.Tensor]) -> bool:
    conv2 = state.get("features.3.weight")
    return conv2 is not None and tuple(conv2.shape) == (256, 96, 5, 5)


def _key_list(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "") if keys else "none"


def load_state_checked(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load `state` into `module` only if the key sets and every shape match exactly."""
    expected = module.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise BenchError(
            f"{path}: tensors do not match the {_describe(module)}: "
            f"missing [{_key_list(missing)}]; unexpected [{_key_list(unexpected)}]"
        )
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise BenchError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, the {_describe(module)} "
                f"expects {tuple(value.shape)}"
            )
    from weights.native import check_finite

    check_finite(dict(state), path)
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def _describe(module: nn.Module) -> str:
    if isinstance(module, AlexNetEncoder):
        return f"{module.arch} encoder (pool_free={module.pool_free})"
    if hasattr(module, "family"):
        return f"{module.arch} encoder"
    return type(module).__name__
