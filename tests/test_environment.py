"""`bench env`: every section present, failures reported instead of raised, GPUs described."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from bench import environment
from bench.cli import main
from benchmark import __version__

CPUINFO = """processor\t: 0
model name\t: Example CPU 9000
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile
processor\t: 1
model name\t: Example CPU 9000
flags\t\t: fpu
"""


def test_env_prints_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    headings = [line for line in out.splitlines() if not line.startswith(" ")]
    assert headings == ["bench", "system", "torch", "GPUs", "backends", "packages"]
    items = dict(line.strip().split(": ", 1) for line in out.splitlines() if line[:1] == " ")
    items = {k.rstrip(":"): v.strip() for k, v in items.items()}
    assert items["version"] == __version__
    assert items["torch"] == torch.__version__
    assert items["threads"].startswith(f"torch {torch.get_num_threads()} intra-op")
    for name in ("detectron2", "mmcv", "mmengine", "mmseg", "OMP_NUM_THREADS", "bf16 on this CPU"):
        assert items[name]


def test_env_json_is_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bench"]["version"] == __version__
    assert data["torch"]["CUDA build"] == (torch.version.cuda or "none (CPU-only build)")


def test_cpu_flags_read_from_cpuinfo() -> None:
    info = environment.cpu_info(CPUINFO)
    assert info == {"model": "Example CPU 9000", "flags": "avx2 avx512f avx512_bf16 amx_tile"}
    assert environment.cpu_info("")["flags"].startswith("none of avx2")


def test_backend_failures_are_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nosuchlib", None)  # import raises ModuleNotFoundError
    assert environment.backend_status(("nosuchlib",)) == "not installed"

    class Broken(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)

    monkeypatch.setitem(sys.modules, "halflib", Broken("halflib"))
    monkeypatch.setitem(sys.modules, "halflib.ops", None)  # compiled ops missing
    assert environment.backend_status(("halflib", "halflib.ops")).startswith(
        "broken (ModuleNotFoundError"
    )
    ok = types.ModuleType("goodlib")
    ok.__version__ = "1.2.3"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "goodlib", ok)
    assert environment.backend_status(("goodlib",)) == "1.2.3"

    def explode(name: str) -> None:
        raise RuntimeError("CUDA version mismatch\nsecond line")

    monkeypatch.setattr(environment.importlib, "import_module", explode)
    assert environment.backend_status(("x",)) == "broken (RuntimeError: CUDA version mismatch)"


def test_gpus_are_described(monkeypatch: pytest.MonkeyPatch) -> None:
    props = [
        types.SimpleNamespace(name="Tesla V100", total_memory=16 * 2**30, major=7, minor=0),
        types.SimpleNamespace(name="H100", total_memory=80 * 2**30, major=9, minor=0),
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    sections = environment.collect()
    gpus = dict(sections["GPUs"])
    assert gpus["cuda:0"] == ("Tesla V100, 16.0 GiB, compute capability 7.0, no native bf16 "
                              "(fp16 under auto)")  # fmt: skip
    assert gpus["cuda:1"] == "H100, 80.0 GiB, compute capability 9.0, bf16 native"
    assert dict(sections["torch"])["precision auto"].startswith("bf16 on cuda, ")

    def fail(i: int) -> None:
        raise RuntimeError("device lost")

    monkeypatch.setattr(torch.cuda, "get_device_properties", fail)
    gpus = dict(environment.collect()["GPUs"])
    assert gpus["cuda:0"] == "unavailable (RuntimeError: device lost)"
