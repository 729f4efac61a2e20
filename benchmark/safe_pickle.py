"""Reading pickle files that someone else made, without letting them run code.

`pickle.load` calls whatever callable a file names, so a crafted file runs arbitrary code on
load. Proposal files (detectron2's format) and exported detectron2 weights are pickles of
plain containers and numpy arrays, so `safe_load` allows exactly those: builtin containers
and scalars, and the few numpy functions that rebuild arrays and dtypes. Anything else is a
one-line error naming the file and the global it asked for.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from benchmark.errors import BenchError, printable

ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
        ("builtins", "frozenset"), ("builtins", "int"), ("builtins", "float"),
        ("builtins", "complex"), ("builtins", "str"), ("builtins", "bytes"),
        ("builtins", "bytearray"), ("builtins", "bool"), ("collections", "OrderedDict"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }
)  # fmt: skip
# numpy pickles dtypes by class in numpy 2 (numpy.dtypes.Float32DType, ...).
_NUMPY_DTYPES_MODULE = "numpy.dtypes"


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose `find_class` only returns the globals in `ALLOWED`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED or (
            module == _NUMPY_DTYPES_MODULE and name.endswith("DType") and name.isidentifier()
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def safe_loads(data: bytes, where: object = "<bytes>") -> Any:
    """Unpickle `data` allowing only containers, scalars and numpy arrays."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise BenchError(f"{printable(where)}: refused to unpickle ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or garbled file
        raise BenchError(
            f"{printable(where)}: unreadable pickle ({type(exc).__name__}: {exc})"
        ) from None
    _refuse_object_arrays(obj, where)
    return obj


def safe_load(path: Path) -> Any:
    """`safe_loads` of a file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BenchError(f"{printable(path)}: file not found") from None
    return safe_loads(data, path)


def _refuse_object_arrays(obj: Any, where: object, depth: int = 0) -> None:
    """Object arrays hold pickled Python objects of their own; refuse them outright."""
    import numpy as np

    if depth > 50:
        raise BenchError(f"{printable(where)}: pickle nests too deeply")
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise BenchError(f"{printable(where)}: object arrays are not allowed in pickles")
    if isinstance(obj, dict):
        for v in obj.values():
            _refuse_object_arrays(v, where, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _refuse_object_arrays(v, where, depth + 1)
