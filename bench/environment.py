"""`bench env`: what a bug report needs to know about this installation and machine.

Every probe is guarded: an optional library that fails to import, or a GPU query that fails,
is reported as such and never raised, so the command works on a broken installation too,
where it is needed most. Precision and bf16 are judged by the same functions the runs use
(`benchmark.loop`), so the report says what `precision: auto` will pick here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Section = list[tuple[str, str]]

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# distributions every run uses; versions from their metadata (nothing imported)
PACKAGES = ("torchvision", "numpy", "scipy", "scikit-learn", "pandas", "pillow",
            "opencv-contrib-python-headless", "safetensors", "submitit")  # fmt: skip
# optional backends: imported, since an installed but broken one (missing compiled ops, a
# version assert) is exactly what a bug report must show
BACKENDS = {
    "detectron2": ("detectron2", "detectron2.modeling"),
    "mmcv": ("mmcv", "mmcv.ops"),
    "mmengine": ("mmengine",),
    "mmseg": ("mmseg",),
}


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _guard(probe: Callable[[], str]) -> str:
    try:
        return probe()
    except Exception as exc:  # noqa: BLE001 - a report, not a run: show what failed
        return f"unavailable ({_reason(exc)})"


def cpu_info(text: str) -> dict[str, str]:
    """The model name and the bf16-relevant flags of a /proc/cpuinfo text."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    present = [f for f in CPU_FLAGS if f in flags]
    none = "none of " + ", ".join(CPU_FLAGS)
    return {"model": model or "unknown", "flags": " ".join(present) or none}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _memory() -> str:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def _system() -> Section:
    cpu = cpu_info(_read("/proc/cpuinfo"))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        ("platform", platform.platform()),
        ("cpu", cpu["model"] or platform.processor() or "unknown"),
        ("cpu flags", cpu["flags"]),
        ("cores", f"{os.cpu_count()} ({usable} usable by this process)"),
        ("memory", _memory()),
    ]


def _distribution(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _bench() -> Section:
    import benchmark

    return [
        ("version", benchmark.__version__),
        ("location", str(Path(benchmark.__file__).resolve().parent)),
        ("python", f"{platform.python_version()} ({sys.executable})"),
    ]


def _torch() -> tuple[Section, Section]:
    """(torch and precision lines, one line per GPU)."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return [("torch", f"unavailable ({_reason(exc)})")], []
    from benchmark.loop import cpu_has_fast_bf16, resolve_precision

    cuda = _guard(lambda: "yes" if torch.cuda.is_available() else "no")
    native = "native (AMX or AVX-512 BF16)"
    emulated = "emulated (no AMX / AVX-512 BF16 flag): slower than fp32"
    lines = [
        ("torch", torch.__version__),
        ("CUDA build", torch.version.cuda or "none (CPU-only build)"),
        ("cuDNN", _guard(lambda: str(torch.backends.cudnn.version() or "none"))),
        ("CUDA available", cuda),
        ("bf16 on this CPU", native if cpu_has_fast_bf16() else emulated),
    ]
    gpus: Section = []
    auto = f"{resolve_precision('auto', torch.device('cpu'))} on cpu"
    if cuda == "yes":
        for i in range(_guard_int(torch.cuda.device_count)):
            gpus.append((f"cuda:{i}", _guard(lambda i=i: _gpu(torch, i))))
        on_gpu = _guard(lambda: resolve_precision("auto", torch.device("cuda")))
        auto = f"{on_gpu} on cuda, {auto}"
    lines.append(("precision auto", auto))
    threads = (
        f"torch {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"
    )
    lines.append(("threads", threads))
    lines += [(name, os.environ.get(name, "unset")) for name in THREAD_VARIABLES]
    return lines, gpus


def _guard_int(probe: Callable[[], int]) -> int:
    try:
        return int(probe())
    except Exception:  # noqa: BLE001
        return 0


def _gpu(torch: Any, index: int) -> str:
    p = torch.cuda.get_device_properties(index)
    major, minor = p.major, p.minor
    bf16 = "bf16 native" if (major, minor) >= (8, 0) else "no native bf16 (fp16 under auto)"
    return (f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {major}.{minor}, "
            f"{bf16}")  # fmt: skip


def backend_status(modules: tuple[str, ...]) -> str:
    """'<version>' when every module imports, else why not ('not installed' or the error)."""
    try:
        first = importlib.import_module(modules[0])
        for name in modules[1:]:
            importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == modules[0]:
            return "not installed"
        return f"broken ({_reason(exc)})"
    except Exception as exc:  # noqa: BLE001 - missing .so, version asserts, CUDA mismatch
        return f"broken ({_reason(exc)})"
    return str(getattr(first, "__version__", "installed (no version)"))


def collect() -> dict[str, Section]:
    """Every section of the report: name -> [(key, value)], all values strings."""
    torch_lines, gpus = _torch()
    return {
        "bench": _bench(),
        "system": _system(),
        "torch": torch_lines,
        "GPUs": gpus or [("none", "no CUDA device visible")],
        "backends": [(name, backend_status(mods)) for name, mods in BACKENDS.items()],
        "packages": [(name, _distribution(name)) for name in PACKAGES],
    }


def render(sections: dict[str, Section]) -> str:
    """Plain text, one `key: value` line per item under each section's name."""
    out = []
    for name, items in sections.items():
        width = max((len(k) for k, _ in items), default=0)
        out.append(name)
        out += [f"  {k + ':':<{width + 1}} {v}" for k, v in items]
    return "\n".join(out) + "\n"


def main(as_json: bool = False) -> str:
    sections = collect()
    if as_json:
        return json.dumps({n: dict(items) for n, items in sections.items()}, indent=2) + "\n"
    return render(sections)
