"""YAML files and `--set key=value` overrides mapped onto typed dataclasses.

Each stage owns a config dataclass whose defaults are the paper's values; YAML files hold only
the differences. Unknown keys and wrongly typed values are errors naming the dotted key, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from benchmark.errors import BenchError, ConfigError

T = TypeVar("T")


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, arg, value)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            pairs = enumerate(zip(args, value))
            return tuple(_check_value(f"{key}[{i}]", a, v) for i, (a, v) in pairs)
        item = args[0] if args else Any
        items = [_check_value(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, checking every key and type. A class may
    define `check_given(data)`, which sees which keys were given (type-checked, before the
    defaults fill the rest) for rules about keys set together."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})"
        )
    kwargs = {k: _check_value(prefix + k, hints[k], v) for k, v in data.items()}
    check_given = getattr(cls, "check_given", None)
    if check_given is not None:
        check_given(data)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-safe dict of a config dataclass (paths as strings, tuples as lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested config dict keyed by dotted paths."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'a.b.c=value' into (['a','b','c'], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ConfigError(f"override '{text}': value is not valid YAML ({first})") from None
    except RecursionError:
        raise ConfigError(f"override '{key}': value nests too deeply") from None
    from benchmark.validate import check_depth

    check_depth(value, f"override '{key}'", "value", ConfigError)
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is not a section")
        node = nxt
    node[path[-1]] = value


def read_yaml(path: Path, what: str = "YAML file", error: type[BenchError] = ConfigError) -> Any:
    """The value of a YAML file (every reader of one goes through here): one line naming the
    file for a missing or unreadable file, bytes that are not UTF-8, invalid YAML, and
    nesting too deep to walk. Only plain data is built (`yaml.safe_load`)."""
    from benchmark.validate import check_depth, decode_text, fail

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise fail(path, "", f"{what} not found", error) from None
    except IsADirectoryError:
        raise fail(path, "", f"{what} is a folder", error) from None
    except OSError as exc:
        raise fail(path, "", f"cannot read {what} ({exc.strerror})", error) from None
    text = decode_text(data, path, what, error)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise fail(path, "", f"invalid YAML{where}", error) from None
    except RecursionError:
        raise fail(path, "", f"{what} nests too deeply", error) from None
    return check_depth(value, path, what, error)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error naming the file when it is not one."""
    path = Path(path)
    data = read_yaml(path, "config file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return data


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values in `extra` win."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    cls: type[T],
    yaml_path: Path | None = None,
    overrides: typing.Sequence[str] = (),
    base: dict[str, Any] | None = None,
) -> T:
    """Defaults of `cls` <- `base` dict <- YAML file <- `--set` overrides, then type-checked."""
    data: dict[str, Any] = dict(base or {})
    if yaml_path is not None:
        data = merge(data, load_yaml(yaml_path))
    for text in overrides:
        path, value = parse_override(text)
        apply_override(data, path, value)
    return from_dict(cls, data)


# Config keys that change how a run executes but not what it computes: a run may be resumed
# with other values of these (a crash on `--device cuda` resumed with `--device cpu`), and
# they never make two runs different experiments. (`svm_solver`: the probes' SVM solver, torch
# or liblinear, reaches the same optimum of the same problem.)
RUNTIME_KEYS = frozenset(
    {"name", "device", "workers", "threads", "log_every", "checkpoint_every", "sample_every",
     "ss_workers", "n_jobs", "progress", "eval_batch_size", "keep_host_memory",
     "svm_solver"}
)  # fmt: skip


def config_hash(cfg: Any) -> str:
    """Short stable hash of a resolved config, for model cards and run identity."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _without(d: Any, ignore: frozenset[str]) -> Any:
    if isinstance(d, dict):
        return {k: _without(v, ignore) for k, v in d.items() if str(k) not in ignore}
    return d


def identity_hash(cfg: Any, ignore: frozenset[str] = RUNTIME_KEYS | {"seed", "data"}) -> str:
    """Hash of what a run computes, leaving out its seed (and data path and runtime keys):
    runs with equal identity are seeds of one experiment, which a report may average."""
    blob = json.dumps(_without(to_dict(cfg), ignore), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
