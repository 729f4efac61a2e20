"""torchrun or one process, chosen once at start.

Models and losses never call `torch.distributed` or `.cuda()`; the loop asks this module
for the device and wraps models in DDP only when `world_size > 1`. Without a GPU everything
runs in one CPU process (or several gloo processes under torchrun).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from benchmark.errors import ConfigError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str = "auto") -> torch.device:
    """'auto' takes the GPU when there is one; an explicit device that this machine does not
    have is an error rather than a silent fall-back (the config would record a lie)."""
    if not isinstance(preference, str) or not DEVICE_PATTERN.match(preference):
        raise ConfigError(
            f"device: {preference!r} is not a device (auto, cpu, cuda, cuda:N or mps)"
        )
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: {preference} asked for, but this machine has no usable CUDA GPU "
                "(use --device cpu or auto)"
            )
        device = torch.device(preference)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {preference} asked for, but there are only "
                f"{torch.cuda.device_count()} CUDA devices"
            )
        return device
    if preference == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: mps asked for, but it is not available here")
    return torch.device(preference)


def torchrun_world() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(preference: str = "auto") -> DistEnv:
    """Read torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) or fall back to one process."""
    world = torchrun_world()
    device = pick_device(preference)
    if world <= 1:
        return DistEnv(0, 1, 0, device)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local, device)


def teardown() -> None:
    """Leave the process group (torchrun): NCCL warns, and may hang at exit, otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over processes (identity in one process)."""
    if initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity in one process)."""
    if initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def all_true(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every process (one tiny collective when distributed)."""
    if not initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order ([obj] in one process)."""
    if not initialized():
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def barrier() -> None:
    if initialized():
        dist.barrier()
