"""Checks shared by the validators of every input kind (card, checkpoint, metrics, YAML,
proposals, caches): a field read from a file is used only after its type, range and shape
were checked, and a bad one is a one-line error naming the file and the field.

Each input kind has one validator, beside its reader (`checkpoint.validate_checkpoint`,
`runs.read_metrics`, `config.read_yaml`, `export.validate_card`, ...); these helpers only
keep their messages alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from benchmark.errors import BenchError, printable

# Deeper than any file bench writes (a config is 4 levels, a metrics.json 5): a deeper one is
# refused before anything recurses over it.
MAX_DEPTH = 40


def fail(where: object, field: str, what: str, error: type[BenchError] = BenchError) -> BenchError:
    """The one-line error "<file>: <field>: what is wrong" (`field` may be empty)."""
    return error(f"{printable(where)}: {field + ': ' if field else ''}{what}")


MAX_NODES = 1_000_000  # values once YAML aliases are expanded (a "billion laughs" file)


def measure(obj: Any) -> tuple[float, float]:
    """(nesting depth, number of values) of `obj` as plain data, counted without recursion.

    Containers shared through YAML aliases are measured once but counted every time they
    appear, as every reader that walks the value would meet them; a container that holds
    itself is infinitely deep.
    """
    memo: dict[int, tuple[float, float]] = {}
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        node, done = stack.pop()
        if not isinstance(node, (dict, list, tuple)) or (id(node) in memo and not done):
            continue
        children = [c for c in (node.values() if isinstance(node, dict) else node)
                    if isinstance(c, (dict, list, tuple))]  # fmt: skip
        if done:
            active.discard(id(node))
            sub = [memo[id(c)] for c in children]
            leaves = len(node) - len(children)
            memo[id(node)] = (1 + max((d for d, _ in sub), default=0),
                              1 + leaves + sum(n for _, n in sub))  # fmt: skip
            continue
        if id(node) in active:
            return math.inf, math.inf
        active.add(id(node))
        stack.append((node, True))
        for c in children:
            if id(c) in active:
                return math.inf, math.inf
            stack.append((c, False))
    return memo.get(id(obj), (0, 1))


def check_depth(obj: Any, where: object, what: str = "file",
                error: type[BenchError] = BenchError) -> Any:  # fmt: skip
    """`obj` unless it nests deeper than MAX_DEPTH or holds more than MAX_NODES values."""
    levels, values = measure(obj)
    if levels > MAX_DEPTH:
        raise fail(where, "", f"{what} nests deeper than {MAX_DEPTH} levels", error)
    if values > MAX_NODES:
        raise fail(where, "", f"{what} holds more than {MAX_NODES:,} values once its "
                   "aliases are expanded", error)  # fmt: skip
    return obj


def decode_text(data: bytes, where: object, what: str = "file",
                error: type[BenchError] = BenchError) -> str:  # fmt: skip
    """`data` as UTF-8 text (a byte-order mark dropped), or one line naming the file."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise fail(where, "", f"{what} is not UTF-8 text (line {line})", error) from None


def parse_json(data: bytes | str, where: object, what: str = "JSON file",
               error: type[BenchError] = BenchError) -> Any:  # fmt: skip
    """JSON text (or bytes) -> value, with a one-line error for bytes that are not UTF-8,
    text that is not JSON, and nesting too deep to walk."""
    text = decode_text(data, where, what, error) if isinstance(data, bytes) else data
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(where, "", f"{what} is not valid JSON ({exc.msg} at line {exc.lineno})",
                   error) from None  # fmt: skip
    except RecursionError:
        raise fail(where, "", f"{what} nests deeper than {MAX_DEPTH} levels", error) from None
    return check_depth(value, where, what, error)


_TYPE_NAMES = {dict: "an object", list: "a list", tuple: "a list", str: "a string",
               bool: "true/false", int: "an integer", float: "a number", type(None): "null"}


def type_name(tp: type) -> str:
    """How messages name a type: `int` -> "an integer"."""
    return _TYPE_NAMES.get(tp, tp.__name__)


def get(
    obj: Mapping[str, Any],
    key: str,
    types: type | tuple[type, ...],
    where: object,
    *,
    prefix: str = "",
    required: bool = True,
    check: Callable[[Any], str | None] | None = None,
    error: type[BenchError] = BenchError,
) -> Any:
    """`obj[key]` if it is one of `types` (bool never counts as a number) and `check` finds
    nothing wrong with it; None when absent and not `required`; else one line naming it."""
    field = prefix + key
    if key not in obj or (obj[key] is None and type(None) not in _tuple(types)):
        if required:
            raise fail(where, field, "missing", error)
        return None
    value = obj[key]
    wanted = _tuple(types)
    if isinstance(value, bool) and bool not in wanted or not isinstance(value, wanted):
        names = " or ".join(dict.fromkeys(type_name(t) for t in wanted))
        raise fail(where, field, f"expected {names}, got {type_name(type(value))}", error)
    problem = check(value) if check is not None and value is not None else None
    if problem:
        raise fail(where, field, problem, error)
    return value


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def non_negative(value: float) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    return f"{value} is negative" if value < 0 else None


def finite(value: float) -> str | None:
    return None if math.isfinite(value) else f"{value} is not a finite number"
