"""The one training loop of every stage: sampler, precision, NaN policy, checkpoints, logs.

A stage gives `fit` a step function and a batch source; `fit` owns everything around them:

- the iteration budget and its position, restored from the run's checkpoint on resume;
- batches from `IterationSampler`, a pure function of (seed, iteration), so a resumed run
  sees exactly the batches it would have seen, whatever the number of workers;
- torch's global generator reseeded per (seed, rank, iteration), so dropout masks are a
  function of the iteration too (and differ between torchrun processes);
- mixed precision (`Precision`: autocast, fp16 loss scaling) and one NaN policy: a
  non-finite loss stops the run *before* its update with a one-line error naming the
  iteration, leaving the last checkpoint as it was;
- a tqdm bar, scalars (scalars.jsonl + TensorBoard) and a log line per window;
- checkpoints (`benchmark.checkpoint` layout) every `checkpoint_every` iterations and at the
  end, recording the log sizes so that a resumed run rewinds its logs to them.

The step function does one optimisation step and returns its scalars:

    def step(batch, iteration) -> {"loss": tensor, ...}:
        with amp.autocast():
            loss = criterion(model(batch))
        amp.backward(loss)           # raises NonFinite before any gradient is computed
        amp.step(optimizer, clip=10) # unscale (fp16), clip, update
        return {"loss": loss}

Devices and processes are set up once, outside the loop (`prepare_model`, `to_device`): DDP
when torchrun's variables are set, channels_last (`nhwc`), pinned memory for CUDA loaders.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from benchmark import distributed, faults, host_memory
from benchmark.checkpoint import check_checkpoint, make_checkpoint, set_rng_state
from benchmark.config import to_dict
from benchmark.distributed import DistEnv
from benchmark.errors import BenchError, ConfigError, printable
from benchmark.runs import CHECKPOINT, Run

PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class LoopConfig:
    """The loop's settings, the base of every stage's `train:` section."""

    iterations: int = 1000
    log_every: int = 20
    checkpoint_every: int = 1000
    workers: int = 4  # DataLoader processes (0: load in the training process)
    # CPU intra-op threads (0: torch's default).
    threads: int = 0
    # auto: bf16 autocast where the device runs it fast (a CUDA GPU with bf16, a CPU with
    # AMX or AVX-512 BF16), fp32 elsewhere. Losses, metrics and optimiser state stay fp32.
    precision: PrecisionName = "auto"
    # NHWC activations (`nhwc`): cuDNN's and oneDNN's fast layout; weights too on CUDA only.
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (pays only on long runs)
    # Keep freed host memory for the next step instead of unmapping it (glibc; see
    # benchmark.host_memory): up to 1.5x on bf16 CPU steps; resident memory stays at its peak.
    keep_host_memory: bool = True


def check_loop(cfg: LoopConfig, key: str = "train") -> None:
    """One-line errors for loop settings no run can use."""
    bad = {
        "iterations": cfg.iterations >= 0,
        "log_every": cfg.log_every >= 1,
        "checkpoint_every": cfg.checkpoint_every >= 1,
        "workers": cfg.workers >= 0,
        "threads": cfg.threads >= 0,
    }
    for name, ok in bad.items():
        if not ok:
            raise ConfigError(f"{key}.{name}: invalid value {getattr(cfg, name)!r}")


def positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    """A one-line ConfigError unless `value` is a finite number > 0 (>= 0 with allow_zero)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        need = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be a number {need}, got {value!r}")


# ---------------------------------------------------------------- precision


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16 in /proc/cpuinfo: bf16 matmuls run natively (else emulated,
    slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision a run actually uses: fp32, bf16 or fp16."""
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision: {name!r} is not one of auto, fp32, bf16, fp16")
    if name != "auto":
        if name == "fp16" and device.type != "cuda":
            raise ConfigError("precision: fp16 needs a CUDA device (use bf16 or fp32)")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


class NonFinite(Exception):
    """A loss that is NaN or infinite, caught before its backward pass."""

    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"{what} is {value}")
        self.what, self.value = what, value


class Precision:
    """Autocast, loss scaling and the NaN guard of one run (see the module docstring)."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.device = device
        self.name = resolve_precision(name, device)
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]
        # bf16 has fp32's range, so only fp16 needs loss scaling.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.name == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def check(self, loss: torch.Tensor, what: str = "loss") -> None:
        """Raise NonFinite unless `loss` is finite on every process."""
        ok = bool(torch.isfinite(loss.detach()).all())
        if not distributed.all_true(ok, loss.device):
            raise NonFinite(what, float(loss.detach().float().sum()) if not ok else math.nan)

    def backward(self, loss: torch.Tensor, what: str = "loss") -> None:
        """Check `loss`, then backward (scaled for fp16)."""
        self.check(loss, what)
        self.scaler.scale(loss).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, clip: float | None = None
    ) -> float | None:
        """Unscale (fp16), clip the global gradient norm to `clip` if given, update.
        Returns the gradient norm before clipping (None without clipping)."""
        norm = None
        if clip is not None:
            self.scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"]]
            norm = grad_norm(params)
            # clip_grad_norm_ scales every gradient by min(1, clip / (norm + 1e-6)): a pass
            # over all of them (~5 ms for classification's 57M) that only matters below 1.
            # Written negated so that a NaN norm still goes to clip_grad_norm_, as before.
            if not clip / (norm + 1e-6) >= 1.0:
                norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        self.scaler.step(optimizer)
        return norm

    def update(self) -> None:
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def grad_norm(params: list[torch.Tensor]) -> float:
    """The global L2 norm of the gradients, as `clip_grad_norm_` computes it."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = [torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]
    return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))


# ---------------------------------------------------------------- devices and models


# torch's intra-op thread count when this process started (OMP_NUM_THREADS or the cores)
DEFAULT_THREADS = torch.get_num_threads()


def setup(device: str, loop: LoopConfig | None = None) -> DistEnv:
    """The process's device and rank (torchrun or one process), threads and host memory as
    configured."""
    if loop is not None:
        # 0 is torch's default for this process, restored when an earlier step of a
        # sequential suite (same process) set another count
        torch.set_num_threads(loop.threads if loop.threads > 0 else DEFAULT_THREADS)
    if loop is not None and loop.keep_host_memory:
        host_memory.keep_freed_memory()
    return distributed.setup(device)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers (state dicts never carry them)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def prepare_model(
    model: nn.Module, env: DistEnv, loop: LoopConfig | None = None, *, ddp: bool = True
) -> nn.Module:
    """Move to the device; channels_last weights on CUDA (on CPU they stay NCHW: fused Adam
    runs ~5x slower over NHWC weights, and oneDNN follows the input's layout anyway);
    torch.compile if asked; DDP when torchrun started several processes."""
    model = model.to(env.device)
    if loop is not None and loop.channels_last and env.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if loop is not None and loop.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    if ddp and env.distributed and any(p.requires_grad for p in model.parameters()):
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


# ---------------------------------------------------------------- optimisers


def _fusable(params: Any) -> tuple[list[Any], bool]:
    """(params as a list, whether torch's fused kernels take all of them: CPU and CUDA)."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return params, all(t.device.type in ("cpu", "cuda") for t in tensors)


def sgd(params: Any, lr: float, momentum: float = 0.0, **kw: Any) -> torch.optim.SGD:
    """torch.optim.SGD with its fused kernel where torch has one: the same update, in one
    pass over all tensors instead of torch's per-tensor Python loop on CPU (measured 5x
    faster over AlexNet's 57M classification parameters: 28 vs 135 ms a step)."""
    params, fused = _fusable(params)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, fused=fused or None, **kw)


def adam(params: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """torch.optim.Adam with its fused kernel where torch has one: on CPU the per-tensor
    loop spends about as long on elementwise updates as the convolutions' backward pass
    (measured ~14x slower than fused for the 4.6M-parameter context encoder)."""
    params, fused = _fusable(params)
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused or None)


def nhwc(x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """A 4-d batch in channels_last memory when asked, else in plain NCHW (other tensors as
    they are).

    Why on every device: convolutions, pooling and ReLU then run NHWC end to end (cuDNN,
    and oneDNN on CPU, which follows its input's layout) instead of reordering activations
    around each kernel; the values are the same, only their order in memory differs."""
    if x.dim() != 4:
        return x
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move a tensor / dict / list / tuple of tensors; 4-d tensors optionally channels_last."""
    if isinstance(batch, torch.Tensor):
        return nhwc(batch.to(device, non_blocking=True), channels_last)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def keyed_seed(*key: int) -> int:
    """A 63-bit seed derived from integers (seed, stream, ...), the same on every machine."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's global generators seeded with `seed` inside, restored
    after: for one sample of a framework whose transforms draw from the global generators
    (detectron2's augmentations, mmcv's), so that a sample's draw depends on its key only."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


# ---------------------------------------------------------------- data


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of `n` items in epoch `epoch`: a permutation keyed by both."""
    return np.random.default_rng([seed, 1, epoch]).permutation(n)


class IterationSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches from iteration `start`: lists of (item index, sample number).

    The global batch of iteration t holds sample numbers t*B .. t*B+B-1; sample k is item
    `epoch_order(k // n)[k % n]`, so each epoch is a full pass in a fresh order. Process
    `rank` of `world` takes its contiguous B / world share. A dataset draws every random
    choice of a sample (crop, flip, mask) from its sample number, never from a stream.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1
    ) -> None:
        super().__init__()
        if n < 1:
            raise BenchError("the training set is empty")
        if batch_size < 1 or batch_size % world:
            raise ConfigError(
                f"train.batch_size: {batch_size} must be a positive multiple of the {world} "
                "processes"
            )
        self.n, self.batch, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.local = rank, batch_size // world

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))
        it = self.start
        while True:
            first = it * self.batch + self.rank * self.local
            batch = []
            for k in range(first, first + self.local):
                epoch = k // self.n
                if cached[0] != epoch:
                    cached = (epoch, epoch_order(self.n, self.seed, epoch))
                batch.append((int(cached[1][k % self.n]), k))
            yield batch
            it += 1


BatchesFn = Callable[[int], Iterator[Any]]


def loader_batches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    env: DistEnv,
    workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> BatchesFn:
    """For `fit`: start iteration -> iterator of batches of `dataset` (indexed by
    (index, sample) keys) through a DataLoader, pinned for CUDA."""

    def batches(start: int) -> Iterator[Any]:
        sampler = IterationSampler(
            len(dataset), batch_size, seed, start, env.rank, env.world_size  # type: ignore[arg-type]
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate_fn,
            pin_memory=env.device.type == "cuda",
            # Its own generator: making the iterator must not draw from the global one.
            generator=torch.Generator().manual_seed(seed),
            prefetch_factor=4 if workers > 0 else None,
            persistent_workers=False,
        )
        return iter(loader)

    return batches


def list_collate(items: list[Any]) -> list[Any]:
    """Keep a batch as a list (images of different sizes)."""
    return list(items)


# ---------------------------------------------------------------- the loop


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any], /) -> Any: ...


StepFn = Callable[[Any, int], Mapping[str, torch.Tensor | float]]


@dataclass
class Hook:
    """`fn(iteration)` every `every` iterations (and at the end when `at_end`)."""

    every: int
    fn: Callable[[int], None]
    at_end: bool = True


@dataclass
class FitResult:
    """What a finished (or resumed-and-finished) loop reports."""

    iterations: int  # iterations completed in total
    seconds: float  # training time over all sessions (hooks and checkpoints excluded)
    first: dict[str, float]  # scalars of iteration 1
    last: dict[str, float]  # mean scalars over the last logging window
    start: int = 0  # iteration this session started from (0 unless resumed)
    history: list[dict[str, float]] = field(default_factory=list)  # logged windows
    precision: str = "fp32"


def fit_fields(
    result: FitResult | None, device: torch.device | str | None = None
) -> dict[str, Any]:
    """The fields every training stage's metrics.json gives its loop, in one shape and one
    rounding (a stage that trains nothing, e.g. the random baseline, passes None)."""
    fields: dict[str, Any] = {
        "iterations": result.iterations if result else 0,
        "train_seconds": round(result.seconds, 3) if result else None,
        "precision": result.precision if result else None,
        "initial_loss": result.first.get("loss") if result else None,
        "final_loss": result.last.get("loss") if result else None,
    }
    if device is not None:
        fields["device"] = str(device)
    return fields


def _scalars(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    return {
        k: float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v)
        for k, v in values.items()
    }


def _mean_over_processes(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    names = sorted(values)
    if not distributed.initialized() or not names:
        return dict(values)
    packed = torch.tensor([values[k] for k in names], dtype=torch.float64, device=device)
    return dict(zip(names, distributed.all_reduce_mean(packed).tolist()))


def _state_of(obj: Any) -> dict[str, Any]:
    return (unwrap(obj) if isinstance(obj, nn.Module) else obj).state_dict()


def fit(
    run: Run,
    env: DistEnv,
    loop: LoopConfig,
    *,
    stage: str,
    config: Any,
    seed: int,
    step: StepFn,
    batches: BatchesFn,
    state: Mapping[str, Stateful],
    precision: Precision,
    hooks: Sequence[Hook] = (),
    loss_key: str = "loss",
    desc: str | None = None,
    input_convention: str | None = None,
) -> FitResult:
    """Run `step` until `loop.iterations` are done, resuming from the run's checkpoint.

    stage: the checkpoint's stage name (a checkpoint of another stage is an error).
    config: the resolved config, saved in every checkpoint.
    state: name -> model / optimiser / scheduler, saved in every checkpoint (DDP unwrapped);
        `precision` is saved with them.
    input_convention: the encoder's input convention (name), saved in every checkpoint; a
        checkpoint made feeding another one is not resumed.
    hooks: sample figures, interim evaluations: called after the step, before the
        checkpoint of the same iteration.
    """
    state = {**state, "precision": precision}
    start, seconds, first, history = 0, 0.0, {}, []
    ckpt = run.take_checkpoint()
    if ckpt is not None:
        where = run.checkpoint_dir / CHECKPOINT
        check_checkpoint(ckpt, stage, where, input_convention)
        missing = sorted(set(state) - set(ckpt["state"]))
        if missing:
            raise BenchError(f"{where}: checkpoint lacks state for {', '.join(missing)}")
        for name, obj in state.items():
            target = unwrap(obj) if isinstance(obj, nn.Module) else obj
            try:
                target.load_state_dict(ckpt["state"][name])
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
                reason = " ".join(str(exc).split())[:200] or type(exc).__name__
                raise BenchError(f"{printable(where)}: state.{name} does not fit this run "
                                 f"({reason})") from None  # fmt: skip
        start, seconds = int(ckpt["iteration"]), float(ckpt["seconds"])
        if start > loop.iterations:
            raise BenchError(f"{printable(where)}: iteration: {start} is past the run's "
                             f"{loop.iterations} iterations")  # fmt: skip
        first = dict(ckpt.get("scalars", {}).get("first", {}))
        history = list(ckpt.get("scalars", {}).get("history", []))
        set_rng_state(ckpt["rng"])
        del ckpt
        run.logger.info(f"resumed from iteration {start} of {loop.iterations}")
    if run.is_main:
        run.tensorboard(purge_step=start + 1 if start else None)
    last_saved = start

    def save(iteration: int) -> None:
        payload = make_checkpoint(
            stage=stage,
            config=to_dict(config),
            iteration=iteration,
            seconds=seconds,
            state={k: _state_of(v) for k, v in state.items()},
            scalars={"first": first, "history": history},
            logs=run.log_sizes(),
            input_convention=input_convention,
        )
        run.save_checkpoint(payload, CHECKPOINT)

    bar = tqdm(
        total=loop.iterations, initial=start, desc=desc or stage, unit="it",
        dynamic_ncols=True, disable=None if run.is_main else True, leave=False,
    )  # fmt: skip
    window: dict[str, float] = {}
    count, iteration = 0, start
    tic = time.perf_counter()
    window_tic = tic
    try:
        data = batches(start) if start < loop.iterations else iter(())
        while iteration < loop.iterations:
            batch = next(data)
            torch.manual_seed(keyed_seed(seed, 11, env.rank, iteration))
            try:
                values = _scalars(step(batch, iteration))
            except NonFinite as exc:
                raise BenchError(
                    f"iteration {iteration + 1}: {exc}; stopped before the update (the last "
                    f"checkpoint, iteration {last_saved}, is intact; lower the learning rate "
                    "and start over with --force)"
                ) from None
            precision.update()
            iteration += 1
            loss = values.get(loss_key)
            if loss is not None and not math.isfinite(loss):
                raise BenchError(
                    f"iteration {iteration}: {loss_key} is {loss}; training stopped (the last "
                    f"checkpoint, iteration {last_saved}, is intact)"
                )
            if not first:
                first = _mean_over_processes(values, env.device)
            for k, v in values.items():
                window[k] = window.get(k, 0.0) + v
            count += 1
            bar.update(1)
            at_end = iteration == loop.iterations
            if iteration % loop.log_every == 0 or at_end:
                means = _mean_over_processes({k: v / count for k, v in window.items()}, env.device)
                history.append({"iteration": iteration, **means})
                run.log_scalars(iteration, means, prefix="train/")
                per_it = (time.perf_counter() - window_tic) / count
                run.logger.info(
                    f"{desc or stage} it {iteration}/{loop.iterations} "
                    + " ".join(f"{k} {v:.4g}" for k, v in means.items())
                    + f" ({per_it:.3f} s/it)"
                )
                bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()})
                window, count = {}, 0
            seconds += time.perf_counter() - tic
            for hook in hooks:
                if hook.every and (iteration % hook.every == 0 or (at_end and hook.at_end)):
                    hook.fn(iteration)
            if iteration % loop.checkpoint_every == 0 or at_end:
                save(iteration)
                last_saved = iteration
            faults.reach(f"step:{iteration}")
            tic = time.perf_counter()
            if count == 0:
                window_tic = tic
    finally:
        bar.close()
    last = {k: v for k, v in history[-1].items() if k != "iteration"} if history else {}
    return FitResult(loop.iterations, seconds, first, last, start, history, precision.name)
