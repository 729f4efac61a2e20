"""Encoder weights (conv1-pool5) out of a run, in our format or a framework's.

The native file, `encoder.safetensors`, holds torchvision key names (`features.N.weight`)
and the model card as JSON in its metadata; a card is also written beside every export as
`<stem>.card.json`. Every card says which input convention conv1 takes (`input_convention`,
`benchmark.input_convention`; cards older than that key mean torchvision's). The other
formats are converted from the native file:

- torchvision: a plain state dict (`features.N.*`), loadable into torchvision's AlexNet
  features when the encoder was trained with arch "torchvision" (CaffeNet widths differ).
  A torchvision file carries no card for its reader, so it takes torchvision's input: an
  encoder made for another convention (CaffeNet's Caffe input) has the conversion folded
  into conv1, exactly (CaffeNet's conv1 has no padding);
- detectron2: a pickled {"model": {name: numpy array}, "__author__", "matching_heuristics":
  False} with names `backbone.features.N.*` (our backbone registered as `features`);
- mmseg: a torch file {"state_dict": {"backbone.features.N.*": tensor}, "meta": card}.

detectron2 and mmseg configure the input in their own config keys, so their files keep the
encoder's convention, and the card says the keys that feed it (`framework_input`:
detectron2's INPUT.FORMAT / MODEL.PIXEL_MEAN / MODEL.PIXEL_STD, mmseg's data_preprocessor
mean / std / bgr_to_rgb), which bench's own backends set the same way.

Every card that bench reads (in a native file's metadata, beside an export, in a generator
file) goes through `validate_card`. An export never replaces an existing weights file or
card without `force`, refuses weights holding NaN or infinite values, and first removes the
temporary files a killed export left beside its outputs.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from benchmark.errors import BenchError, printable
from benchmark.input_convention import TORCHVISION, InputConvention, saved_convention
from benchmark.runs import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temporaries_of,
)
from benchmark.validate import finite, get, parse_json
from encoders.alexnet import ARCHS, refold_conv1

Format = Literal["native", "torchvision", "detectron2", "mmseg"]
NATIVE_FILE = "encoder.safetensors"
CARD_KEYS = (
    "method",
    "mask",
    "iterations",
    "data",
    "config_hash",
    "arch",
    "pool_free",
    "pretrain_seconds",
)  # + `input_convention`, which every stage writes; a card without it means torchvision's
DEFAULT_NAMES: dict[str, str] = {
    "native": NATIVE_FILE,
    "torchvision": "encoder_torchvision.pth",
    "detectron2": "encoder_detectron2.pkl",
    "mmseg": "encoder_mmseg.pth",
}
FRAMEWORK_PREFIX = "backbone."
_TEXT = (str, type(None))
# The card fields bench reads, by type (any may be absent; other fields are kept as they are).
CARD_FIELDS: dict[str, tuple[type, ...]] = {
    "method": (str,), "mask": _TEXT, "iterations": (int, type(None)), "data": _TEXT,
    "config_hash": _TEXT, "arch": _TEXT, "pool_free": (bool, type(None)),
    "pretrain_seconds": (int, float, type(None)), "pretrain_key": _TEXT,
    "departures": (list, type(None)), "synthetic": (bool, type(None)),
    "imported": (bool, type(None)), "source": _TEXT, "format": _TEXT, "arch_note": _TEXT,
    "hole": _TEXT, "overlap": (int, type(None)), "shapes": _TEXT,
    # benchmark.input_convention: {name, channels, mean, std} (a sentence in old imports)
    "input_convention": (dict, str, type(None)), "input_convention_loaded": _TEXT,
    "convention_note": _TEXT, "folded_from_convention": _TEXT,
    "framework_input": (dict, type(None)),
}  # fmt: skip


def validate_card(card: Any, where: object) -> dict[str, Any]:
    """A model card (JSON text, bytes or an already parsed value) as a dict whose fields
    have their types (`CARD_FIELDS`); one line naming the file and the field otherwise."""
    if isinstance(card, (str, bytes)):
        card = parse_json(card, where, "model card")
    if not isinstance(card, dict):
        raise BenchError(f"{printable(where)}: model card must be a JSON object")
    for key, types in CARD_FIELDS.items():
        number = types[0] in (int, float)
        get(card, key, types, where, prefix="card.", required=False,
            check=finite if number else None)  # fmt: skip
    return card


def read_card(path: Path) -> dict[str, Any]:
    """A `<stem>.card.json` file, validated."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BenchError(f"{printable(path)}: cannot read model card ({exc.strerror})") from None
    return validate_card(data, path)


def card_path(weights: Path) -> Path:
    """`encoder.safetensors` -> `encoder.card.json`."""
    return weights.with_name(weights.name.split(".")[0] + ".card.json")


def write_safetensors(
    path: Path, state_dict: dict[str, torch.Tensor], card: dict[str, Any]
) -> Path:
    """Tensors + card (in the safetensors metadata and as `<stem>.card.json` beside it),
    each written atomically: the one writer of encoder and generator weights."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    data = save(tensors, metadata={"card": json.dumps(card, sort_keys=True, default=str)})
    atomic_write_bytes(Path(path), data)
    atomic_write_json(card_path(Path(path)), card)
    return Path(path)


def read_safetensors(
    path: Path, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(tensors, the card in the metadata, validated, or None) of a safetensors file; an
    unreadable file is one line naming it and `what` it should have been."""
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise BenchError(f"{printable(path)}: unreadable {what} ({exc})") from None
    card = validate_card(meta["card"], f"{path} metadata") if "card" in meta else None
    return state, card


def write_native(path: Path, state_dict: dict[str, torch.Tensor], card: dict[str, Any]) -> Path:
    """Save encoder weights + card (in the metadata and beside the file), atomically."""
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise ValueError(f"model card lacks {missing}")
    return write_safetensors(path, state_dict, card)


def native_file(source: Path) -> Path:
    """A run folder or a weights file -> the native safetensors file."""
    source = Path(source)
    path = source / NATIVE_FILE if source.is_dir() else source
    if not path.is_file():
        where = (
            f"{source}: run folder has no {NATIVE_FILE}"
            if source.is_dir()
            else (f"{source}: weights file not found")
        )
        raise BenchError(where + " (did the pretrain run finish?)")
    return path


def load_native(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict with `features.N.*` keys, model card) from a native file or run folder;
    the card from the file's metadata, else from `<stem>.card.json` beside it, else {}."""
    path = native_file(path)
    state, card = read_safetensors(path, "safetensors file")
    if card is None:  # a file written without one: the card beside it, if any
        card = read_card(card_path(path)) if card_path(path).is_file() else {}
    return state, card


def check_finite(state: dict[str, torch.Tensor], where: object) -> None:
    """One line naming the first tensor with a NaN or infinite value (a diverged run)."""
    for key in sorted(state):
        tensor = state[key]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise BenchError(f"{printable(where)}: {key} has {bad} NaN or infinite value(s) of "
                             f"{tensor.numel()} (a diverged or corrupt run)")  # fmt: skip


def export(run_dir: Path, fmt: Format, out: Path | None = None, *, force: bool = False) -> Path:
    """Write the run's encoder in format `fmt` (default path inside the run folder). An
    existing file is only replaced with `force`."""
    if fmt not in DEFAULT_NAMES:
        raise BenchError(f"--format: {fmt!r} is not one of {', '.join(DEFAULT_NAMES)}")
    src = native_file(Path(run_dir))
    state, card = load_native(src)
    check_finite(state, src)
    card = {**card, "input_convention": saved_convention(card, src).as_dict()}
    out = Path(out) if out is not None else src.parent / DEFAULT_NAMES[fmt]
    if out.is_dir():
        raise BenchError(f"{printable(out)}: --out is a folder; give a file name")
    if not out.parent.is_dir():
        what = "is a file" if out.parent.exists() else "does not exist"
        raise BenchError(f"{printable(out)}: its folder {what}; give a file in a folder")
    same = out.exists() and out.resolve() == src.resolve()
    if fmt == "native" and same:
        return out
    for target in (out, card_path(out)):
        remove_stale_temporaries_of(target)  # what a killed export left
        if (target.exists() or target.is_symlink()) and not force:
            raise BenchError(f"{printable(target)}: file exists; pass --force to overwrite it")
        if target.is_dir() and not target.is_symlink():
            raise BenchError(f"{printable(target)}: is a folder; bench will not replace it")
    if fmt == "native":
        write_native(out, state, card)
        return out
    if fmt == "torchvision":
        state, card = to_convention(state, card, TORCHVISION, src)
        atomic_torch_save(out, dict(state))
    elif fmt == "detectron2":
        card["framework_input"] = framework_input(fmt, saved_convention(card, src))
        model = {theirs: state[ours].numpy() for ours, theirs in key_map(state, fmt)}
        blob = {"model": model, "__author__": "bench", "matching_heuristics": False}
        atomic_write_bytes(out, pickle.dumps(blob, protocol=pickle.HIGHEST_PROTOCOL))
    elif fmt == "mmseg":
        card["framework_input"] = framework_input(fmt, saved_convention(card, src))
        sd = {theirs: state[ours] for ours, theirs in key_map(state, fmt)}
        atomic_torch_save(out, {"state_dict": sd, "meta": card})
    atomic_write_json(card_path(out), {**card, "format": fmt})
    return out


def key_map(state_dict: dict[str, torch.Tensor], fmt: Format) -> list[tuple[str, str]]:
    """(our key, exported key) pairs: what `export` writes and `--show-keys` prints."""
    prefix = FRAMEWORK_PREFIX if fmt in ("detectron2", "mmseg") else ""
    return [(k, prefix + k) for k in state_dict]


def show_export_keys(run_dir: Path, fmt: Format) -> str:
    """What `bench export --format fmt` would write for the run's encoder, key by key and
    with each tensor's shape (`bench export --show-keys`): nothing is written."""
    if fmt not in DEFAULT_NAMES:
        raise BenchError(f"--format: {fmt!r} is not one of {', '.join(DEFAULT_NAMES)}")
    src = native_file(Path(run_dir))
    state, card = load_native(src)
    source = saved_convention(card, src)
    lines = [f"{printable(src)} -> {fmt} ({len(state)} tensors)"]
    if fmt == "torchvision" and source != TORCHVISION:
        lines.append(f"conv1 refolded from the {source.name} input convention to torchvision's")
    width = max((len(k) for k in state), default=0)
    for ours, theirs in key_map(state, fmt):
        shape = "x".join(str(d) for d in state[ours].shape)
        lines.append(f"  {ours:<{width}}  ->  {theirs}  [{shape}]")
    return "\n".join(lines)


def to_convention(
    state: dict[str, torch.Tensor], card: dict[str, Any], target: InputConvention, where: Path
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state, card) with conv1 folded from the card's convention to `target`'s; the card
    then says `target` and, where it moved, which convention the weights were made for."""
    source = saved_convention(card, where)
    if source == target:
        return state, {**card, "input_convention": target.as_dict()}
    arch = card.get("arch")
    if arch not in ARCHS:  # a card without an arch: torchvision's widths are the padded one
        arch = "torchvision" if state["features.0.weight"].shape[0] == 64 else "alexnet-plain"
    try:
        state = refold_conv1(state, arch, source, target)
    except ValueError as exc:
        raise BenchError(f"{printable(where)}: {exc}") from None
    card = {**card, "input_convention": target.as_dict(), "folded_from_convention": source.name}
    return state, card


def framework_input(fmt: str, convention: InputConvention) -> dict[str, Any]:
    """The detectron2 / mmseg config values that feed an encoder `convention`'s input
    (detectron2 reads images in INPUT.FORMAT and computes (x - MEAN) / STD; mmseg loads BGR,
    converts when bgr_to_rgb, then (x - mean) / std)."""
    mean, std = list(convention.mean), list(convention.std)
    if fmt == "detectron2":
        return {"INPUT.FORMAT": convention.channels, "MODEL.PIXEL_MEAN": mean,
                "MODEL.PIXEL_STD": std}  # fmt: skip
    if fmt == "mmseg":
        return {"mean": mean, "std": std, "bgr_to_rgb": convention.channels == "RGB"}
    raise ValueError(f"no framework input settings for format {fmt!r}")
