"""A format applied to a file: every key's fate, printable, and the guard on the result.

`map_keys` finds the format (or uses the one named), the family (ResNet or ViT) and the
encoder's prefix, and sorts each key of the state dict into one row: mapped to a canonical
key, dropped as the head, dropped as not the encoder, or unknown. `format_key_map` prints
the rows (`bench import --show-keys`), as MoCo's converter prints each renaming.
`check_keys` is the guard: no unknown key, no canonical key missing or left over, every
shape as the encoder's, every value finite; each failure one line naming (a few of) the keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from benchmark.errors import BenchError, printable

from .formats import (
    FAMILIES,
    FAMILY_HEADS,
    FAMILY_MARKERS,
    FAMILY_NAMES,
    Format,
    candidates,
    container,
    flatten,
    get_format,
)
from .renames import TABLES, rename

ENCODER, HEAD, OTHER, UNKNOWN = "encoder", "head", "not the encoder", "unknown"
# BatchNorm's update counter: read by nothing at inference, absent from many conversions.
OPTIONAL_SUFFIX = "num_batches_tracked"


@dataclass(frozen=True)
class KeyRow:
    """One key of the file: `target` is its canonical name when `kind` is ENCODER, else ""."""

    source: str
    target: str
    kind: str


@dataclass
class KeyMap:
    """The rows of one file under one format, with the values they carry."""

    where: str
    format: Format
    family: str
    branch: str | None
    container: str
    prefix: str
    rows: list[KeyRow]
    values: dict[str, Any]  # source key -> tensor (or whatever the file holds there)

    def pairs(self) -> list[tuple[str, str]]:
        """(source key, canonical key) of every key that goes into the encoder."""
        return [(r.source, r.target) for r in self.rows if r.kind == ENCODER]

    def keys_of(self, kind: str) -> list[str]:
        return [r.source for r in self.rows if r.kind == kind]

    def state(self) -> dict[str, Any]:
        """{canonical key: value} of the encoder rows (unchecked: see `check_keys`)."""
        return {r.target: self.values[r.source] for r in self.rows if r.kind == ENCODER}


def few(keys: list[str], limit: int = 6) -> str:
    """A short printable list: the first `limit` keys and how many there are in all."""
    shown = ", ".join(printable(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _strip(flat: Mapping[str, Any], fmt: Format, prefix: str, family: str) -> dict[str, str]:
    """{source key: renamed key} of the keys under `prefix` that are not head or other."""
    table = fmt.renames.get(family)
    out = {}
    for key in flat:
        if key.startswith(prefix) and not key.startswith(fmt.heads + fmt.others):
            rest = key[len(prefix) :]
            out[key] = rename(rest, table) if table else rest
    return out


def _find_prefix(flat: Mapping[str, Any], fmt: Format, family: str) -> str | None:
    for prefix in fmt.prefixes:
        if FAMILY_MARKERS[family] in _strip(flat, fmt, prefix, family).values():
            return prefix
    return None


def map_keys(
    tree: Any,
    where: object,
    family: str | None = None,
    fmt: str | None = None,
    branch: str | None = None,
) -> KeyMap:
    """The key map of a read checkpoint (`files.read_checkpoint`); see the module docstring.

    family: "resnet" / "vit" to insist on one (a file of the other family is a one-line
    error), None to take what the file holds. fmt: a format name, None to detect it.
    branch: which network of a file that holds several (DINO's "teacher" or "student").
    """
    where = printable(where)
    if family is not None and family not in FAMILIES:
        raise BenchError(f"family: unknown encoder family {family!r} ({', '.join(FAMILIES)})")
    if not isinstance(tree, Mapping):
        raise BenchError(f"{where}: holds a {type(tree).__name__}, not a mapping of names to "
                         "tensors (a state dict or a checkpoint)")  # fmt: skip
    formats = [get_format(fmt)] if fmt else candidates(tree)
    if branch is not None:
        formats = [f for f in formats if f.branches]
        if not formats:
            raise BenchError(f"{where}: --branch {branch!r} given, but the file holds one network")
        if branch not in formats[0].branches:
            raise BenchError(f"{where}: --branch {branch!r} is not one of "
                             f"{', '.join(formats[0].branches)}")  # fmt: skip
    other_family: tuple[Format, str] | None = None
    for f in formats:
        found = container(tree, f, branch)
        if found is None:
            continue
        flat = flatten(found[1])
        for fam in f.families:
            prefix = _find_prefix(flat, f, fam)
            if prefix is None:
                continue
            if family is not None and fam != family:
                other_family = other_family or (f, fam)
                continue
            chosen = branch or (f.branches[0] if f.branches else None)
            return _rows(where, f, fam, chosen, found[0], prefix, flat)
    if other_family is not None and family is not None:
        f, fam = other_family
        raise BenchError(
            f"{where}: a {FAMILY_NAMES[fam]} checkpoint ({f.name} format), not a "
            f"{FAMILY_NAMES[family]}: it has {FAMILY_MARKERS[fam]} and no "
            f"{FAMILY_MARKERS[family]}"
        )
    keys = list(flatten(tree))
    tried = ", ".join(f.name for f in formats)
    raise BenchError(f"{where}: no ResNet or ViT encoder found under the {tried} layouts "
                     f"(its keys: {few(keys)})")  # fmt: skip


def _rows(
    where: str, fmt: Format, family: str, branch: str | None, path: str, prefix: str,
    flat: dict[str, Any],
) -> KeyMap:  # fmt: skip
    renamed = _strip(flat, fmt, prefix, family)
    rows = []
    for key in flat:
        if key.startswith(fmt.others):
            rows.append(KeyRow(key, "", OTHER))
        elif key.startswith(fmt.heads):
            rows.append(KeyRow(key, "", HEAD))
        elif key in renamed:
            target = renamed[key]
            if target.startswith(FAMILY_HEADS[family]):
                rows.append(KeyRow(key, "", HEAD))
            else:
                rows.append(KeyRow(key, target, ENCODER))
        else:
            rows.append(KeyRow(key, "", UNKNOWN))
    return KeyMap(where, fmt, family, branch, path, prefix, rows, flat)


def check_keys(km: KeyMap, expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's state dict from `km`, or a one-line BenchError (module docstring).

    `expected` is the encoder's own `state_dict()`: it gives the key set, the shapes and
    the dtypes; a BatchNorm counter (`num_batches_tracked`) the file lacks is taken from it.
    """
    where, name = km.where, f"the {km.format.name} key map"
    unknown = km.keys_of(UNKNOWN)
    if unknown:
        raise BenchError(f"{where}: keys that are neither the {FAMILY_NAMES[km.family]} "
                         f"encoder's nor a known head's under {name}: {few(unknown)}")  # fmt: skip
    state: dict[str, Any] = {}
    for source, target in km.pairs():
        if target in state:
            raise BenchError(f"{where}: two keys map to {target} under {name} ({source})")
        state[target] = km.values[source]
    left_over = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_SUFFIX)]
    if left_over or missing:
        parts = [f"missing {few(missing)}"] if missing else []
        parts += [f"left over (not a head) {few(left_over)}"] if left_over else []
        raise BenchError(f"{where}: after {name}, the encoder's keys do not match: "
                         + "; ".join(parts))  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for key, want in expected.items():
        if key not in state:  # an optional counter: the module's initial value
            out[key] = torch.zeros_like(want, device="cpu")
            continue
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise BenchError(f"{where}: {key} holds a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(want.shape):
            raise BenchError(f"{where}: {key} has shape {tuple(value.shape)}, the encoder "
                             f"expects {tuple(want.shape)}")  # fmt: skip
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise BenchError(f"{where}: {key} has {bad} NaN or infinite value(s) of "
                             f"{value.numel()} (a diverged or corrupt checkpoint)")  # fmt: skip
        out[key] = value.to(want.dtype)
    return out


def _row_text(row: KeyRow, width: int) -> str:
    source = printable(row.source).ljust(width)
    if row.kind == ENCODER:
        return f"{source} -> {row.target}"
    return f"{source}    [{'UNKNOWN' if row.kind == UNKNOWN else 'dropped: ' + row.kind}]"


def format_key_map(km: KeyMap) -> str:
    """The rows as text: a header, a count line, then `source -> target` or
    `source  [dropped: head]` per key, in the file's order."""
    counts = {kind: len(km.keys_of(kind)) for kind in (ENCODER, HEAD, OTHER, UNKNOWN)}
    where = f"container: {km.container or '(top level)'}; prefix: {km.prefix or '(none)'}"
    lines = [
        f"{km.where}: {km.format.name} format, {FAMILY_NAMES[km.family]} encoder",
        f"  {km.format.about}",
        f"  {where}" + (f"; branch: {km.branch}" if km.branch else ""),
        f"  {counts[ENCODER]} keys -> encoder, {counts[HEAD]} dropped as head, "
        f"{counts[OTHER]} dropped as not the encoder, {counts[UNKNOWN]} unknown",
    ]
    width = min(60, max((len(r.source) for r in km.rows), default=0))
    lines += [_row_text(r, width) for r in km.rows]
    return "\n".join(lines)


def _names(items: tuple[str, ...]) -> str:
    return ", ".join(item or "(none)" for item in items)


def describe_format(fmt: Format) -> str:
    """A format's rules as text (what `--show-keys` says before any file is read)."""
    family_heads = "; ".join(
        f"{FAMILY_NAMES[f]} {', '.join(FAMILY_HEADS[f])}" for f in fmt.families
    )
    lines = [
        f"{fmt.name}: {fmt.about}",
        f"  families: {', '.join(FAMILY_NAMES[f] for f in fmt.families)}",
        f"  state dict at: {_names(fmt.branches or fmt.containers)} ('(none)': top level)",
        f"  encoder prefix (the first that holds one): {_names(fmt.prefixes)}",
        f"  dropped as the family's head: {family_heads}",
    ]
    if fmt.heads:
        lines.append(f"  dropped as head: {_names(fmt.heads)}")
    if fmt.others:
        lines.append(f"  dropped as not the encoder: {_names(fmt.others)}")
    for family, table in fmt.renames.items():
        rules = "; ".join(f"{p} -> {r or '(nothing)'}" for p, r in TABLES[table])
        lines.append(f"  {FAMILY_NAMES[family]} renames: {rules}")
    if fmt.vit_heads:
        heads = ", ".join(f"width {w}: {h}" for w, h in fmt.vit_heads.items())
        lines.append(f"  ViT attention heads as the writer builds them: {heads}")
    return "\n".join(lines)
