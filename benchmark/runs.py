"""Self-describing run folders: resolved config, metrics, log, scalars, checkpoints.

Every file is written atomically (temporary file in the same folder, then `os.replace`), so a
killed process leaves either the old file or the new one, never half of one. An existing run
is only continued with `resume=True` or replaced with `force=True`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmark.config import dump_yaml, to_dict
from benchmark.errors import BenchError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.txt"
SCALARS_FILE = "scalars.jsonl"
CKPT_DIR = "checkpoints"


def default_results_root() -> Path:
    """Where runs go unless told otherwise: $BENCH_RESULTS or ./results."""
    return Path(os.environ.get("BENCH_RESULTS", "results"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return prefix.rstrip(".") if a != b else None


@dataclass
class Run:
    """An open run folder. Only the main process (rank 0) writes to it."""

    path: Path
    resumed: bool = False
    is_main: bool = True
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("bench"))
    _tb: Any = None

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CKPT_DIR

    def save_config(self, cfg: Any) -> None:
        if self.is_main:
            atomic_write_text(self.file(CONFIG_FILE), dump_yaml(cfg))

    def write_json(self, name: str, obj: Any) -> None:
        if self.is_main:
            atomic_write_json(self.file(name), obj)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Final results; its presence marks the run as complete."""
        self.write_json(METRICS_FILE, metrics)

    @property
    def complete(self) -> bool:
        return self.file(METRICS_FILE).is_file()

    def metrics(self) -> dict[str, Any]:
        return read_json(self.file(METRICS_FILE))

    def save_checkpoint(self, state: dict[str, Any], name: str = "last.pt") -> Path:
        path = self.checkpoint_dir / name
        if self.is_main:
            atomic_torch_save(path, state)
        return path

    def load_checkpoint(self, name: str = "last.pt") -> dict[str, Any] | None:
        import torch

        path = self.checkpoint_dir / name
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
            raise BenchError(f"{path}: unreadable checkpoint ({exc})") from None

    def log_scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """One JSON line per call in scalars.jsonl, mirrored to TensorBoard."""
        if not self.is_main:
            return
        scalars = {prefix + k: float(v) for k, v in values.items()}
        row = {"step": step, "time": time.time(), **scalars}
        with open(self.file(SCALARS_FILE), "a") as f:
            f.write(json.dumps(row) + "\n")
        tb = self.tensorboard()
        if tb is not None:
            for k, v in values.items():
                tb.add_scalar(prefix + k, float(v), step)

    def tensorboard(self) -> Any:
        if self._tb is None and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                self._tb = False
            else:
                self._tb = SummaryWriter(str(self.path / "tensorboard"))
        return self._tb or None

    def close(self) -> None:
        if self._tb:
            self._tb.close()
        for h in list(self.logger.handlers):
            if getattr(h, "_bench_run", None) == str(self.path):
                self.logger.removeHandler(h)
                h.close()


def _setup_logger(path: Path, is_main: bool) -> logging.Logger:
    logger = logging.getLogger("bench")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    if not any(getattr(h, "_bench_console", False) for h in logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        console._bench_console = True  # type: ignore[attr-defined]
        logger.addHandler(console)
    if is_main:
        fh = logging.FileHandler(path / LOG_FILE)
        fh.setFormatter(fmt)
        fh._bench_run = str(path)  # type: ignore[attr-defined]
        logger.addHandler(fh)
    return logger


def open_run(
    path: Path,
    cfg: Any,
    *,
    force: bool = False,
    resume: bool = False,
    command: str | None = None,
    is_main: bool = True,
) -> Run:
    """Create (or, with `resume`, reopen) a run folder and save the resolved config.

    A resumed run must have been made with the same config: continuing a run under other
    settings would give results that no config file describes.
    """
    path = Path(path)
    existing = path.exists() and any(path.iterdir())
    if existing and force:
        if is_main:
            shutil.rmtree(path)
        existing = False
    elif existing and not resume:
        raise BenchError(
            f"{path}: run folder already exists; "
            "pass --resume to continue it or --force to replace it"
        )
    if existing and resume and (path / CONFIG_FILE).is_file():
        old = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
        key = _first_difference(old, to_dict(cfg))
        if key:
            raise BenchError(
                f"{path / CONFIG_FILE}: cannot resume, config differs at '{key}' "
                "(use --force to start over)"
            )
    if is_main:
        path.mkdir(parents=True, exist_ok=True)
    run = Run(path=path, resumed=existing, is_main=is_main, logger=_setup_logger(path, is_main))
    run.save_config(cfg)
    if command and is_main:
        atomic_write_text(path / "command.txt", command + "\n")
    return run
