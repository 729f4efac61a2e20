"""Freed host memory kept for reuse: a reallocated large tensor no longer page-faults."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from benchmark import host_memory
from benchmark.config import identity_hash
from benchmark.loop import LoopConfig
from benchmark.protocol import departures
from transfer.classification.config import ClassificationConfig
from transfer.svm.config import SVMConfig

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# Page faults over 24 allocations of a fresh 64 MiB tensor, after 4 while the heap settles.
FAULTS = """
import resource, sys, torch
from benchmark import loop
loop.setup("cpu", loop.LoopConfig(keep_host_memory=sys.argv[1] == "1"))
def fill():
    torch.empty(16 * 2**20).fill_(1.0)
for _ in range(4):
    fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(24):
    fill()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: bool) -> int:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, "1" if keep else "0"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.split()[-1])


@glibc
def test_kept_memory_is_not_faulted_in_again():
    pages = 24 * 64 * 2**20 // 4096
    assert _faults(keep=False) > pages // 2  # glibc unmaps each and faults it in again
    assert _faults(keep=True) < pages // 4  # reused: few new faults once the heap settled


@glibc
def test_keep_freed_memory_is_idempotent():
    assert host_memory.keep_freed_memory()
    assert host_memory.keep_freed_memory()
    assert host_memory.applied()


def test_a_runtime_setting_not_a_protocol_departure():
    off = ClassificationConfig()
    off.train.keep_host_memory = False
    assert departures(off) == departures(ClassificationConfig())
    assert identity_hash(off) == identity_hash(ClassificationConfig())
    svm = SVMConfig(keep_host_memory=False)
    assert departures(svm) == departures(SVMConfig())
    assert LoopConfig().keep_host_memory
