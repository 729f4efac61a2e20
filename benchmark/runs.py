"""Self-describing run folders: resolved config, metrics, log, scalars, checkpoints.

A run folder is `<runs root>/<name>`, where the name is a single path component. Every
file is written atomically (temporary file in the same folder, then `os.replace`), with the
permissions the umask gives, so a killed process leaves either the old file or the new one,
never half of one. While a process works in a run folder it holds an exclusive lock on
`<run>/.lock` (released by the kernel if the process dies), so two processes can never
write one run.

bench deletes only what it can prove it made. When it creates a run folder (or takes an
empty one) it writes the marker `.bench.json` (`{"kind": "run"}`) first; a suite's folder
gets `{"kind": "suite"}`. A folder without a run marker is never cleared, with or without
`force`: a user's folder that happens to have the run's name, a suite's folder, or a run
folder of a bench version older than the marker (remove those by hand; `resume` still
continues or reuses them, which deletes nothing). Nor is a folder that holds another bench
folder. No file in a run folder is written through a symbolic link: a run folder holding
one is refused.

Opening an existing folder:

- finished (`metrics.json` present): `resume` reuses it as it is, `force` redoes it, a plain
  rerun is an error;
- unfinished with a checkpoint: `resume` continues it (same stage and config, runtime keys
  such as `device` or `workers` excepted), `force` starts over, a plain rerun is an error;
- unfinished without a checkpoint (it failed before saving one): there is nothing to
  continue, so it starts over under the new config, with or without `resume`.

On resume the checkpoint is loaded once (`torch.load(weights_only=True)`: a file never runs
code) and validated field by field (`checkpoint.validate_checkpoint`), `log.txt` and
`scalars.jsonl` are cut back to the sizes it recorded for them, and temporary files left by
a killed writer are removed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark import faults
from benchmark.config import RUNTIME_KEYS, dump_yaml, to_dict
from benchmark.errors import BenchError, ConfigError, printable

try:  # POSIX advisory locks; elsewhere runs are simply not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.txt"
SCALARS_FILE = "scalars.jsonl"
CKPT_DIR = "checkpoints"
CHECKPOINT = "last.pt"
LOCK_FILE = ".lock"
MARKER_FILE = ".bench.json"  # what bench writes into every folder it makes (see above)
MARKER_FORMAT = "bench-folder/1"
FOLDER_KINDS = ("run", "suite")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
TMP_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # what `atomic_write_bytes` leaves
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")

_UMASK = os.umask(0)
os.umask(_UMASK)


def default_results_root() -> Path:
    """Where runs go unless told otherwise: $BENCH_RESULTS or ./results."""
    return Path(os.environ.get("BENCH_RESULTS", "results"))


def check_run_name(name: str) -> str:
    """A run name is one folder name: letters, digits and `._+=-`, not starting with a dot."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in (".", ".."):
        raise ConfigError(
            f"name: {printable(str(name))!r} is not a valid run name (one folder name of "
            "letters, digits, '.', '_', '+', '=', '-', not starting with '.' or '-')"
        )
    return name


# ------------------------------------------------------------------ atomic writers


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            faults.reach(f"write:{path.name}")
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def torch_load_safe(path: Path, what: str = "file", allow: Sequence[type] = ()) -> Any:
    """`torch.load` that can never run code from the file (weights only, tensors on CPU; the
    classes in `allow` are trusted too, e.g. argparse.Namespace, which MoCo's and DINO's
    checkpoints carry). Every failure is one line naming the file: a class the file needs is
    named ("refused to load"), any other failure is "unreadable <what>" with torch's first
    sentence."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BenchError(f"{printable(path)}: {what} not found") from None
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise BenchError(
                f"{printable(path)}: unreadable {what}, refused to load: it needs the Python "
                f"object '{found[1]}', which could run code (bench reads tensors and plain "
                "containers only)"
            ) from None
        raise BenchError(f"{printable(path)}: unreadable {what} ({first_sentence(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise BenchError(f"{printable(path)}: unreadable {what} ({first_sentence(exc)})") from None


def first_sentence(exc: BaseException) -> str:
    """The exception's type and first sentence (torch appends paragraphs of advice)."""
    lines = str(exc).strip().splitlines()
    first = lines[0].split(". ")[0][:200] if lines else ""
    return printable(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)


# What readers of metrics.json (the report, the suite, `resume`) take from it, by type; other
# keys are kept as they are. Numbers may be null (an AP of a class with no positives).
_TEXT = (str, type(None))
_NUMBER = (int, float, type(None))
METRICS_FIELDS: dict[str, tuple[type, ...]] = {
    "stage": (str,), "task": _TEXT, "method": _TEXT, "mask": _TEXT, "arch": _TEXT,
    "weights": _TEXT, "pretrain_key": _TEXT, "data": _TEXT, "backend": _TEXT,
    "best_layer": _TEXT, "eval_crop": _TEXT, "hole": _TEXT, "scored_region": _TEXT,
    "seed": (int, type(None)), "imported": (bool, type(None)), "synthetic": (bool, type(None)),
    "pretrain_synthetic": (bool, type(None)), "departures": (list, type(None)),
    "pretrain_departures": (list, type(None)), "train_seconds": _NUMBER,
    "pretrain_seconds": _NUMBER, "images": _NUMBER, "map": _NUMBER, "mean_iu": _NUMBER,
    "mean_l1": _NUMBER, "mean_l2": _NUMBER, "psnr": _NUMBER,
    "per_class": (dict, type(None)), "per_layer": (dict, type(None)),
    "low_shot": (dict, type(None)), "command": _TEXT, "device": _TEXT, "precision": _TEXT,
}  # fmt: skip


def read_metrics(path: Path) -> dict[str, Any]:
    """A run's metrics.json: a JSON object whose fields that readers use have their types
    (`METRICS_FIELDS`); otherwise one line naming the file and the field."""
    from benchmark.validate import get, parse_json

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BenchError(f"{printable(path)}: file not found") from None
    except OSError as exc:
        raise BenchError(f"{printable(path)}: cannot read ({exc.strerror})") from None
    metrics = parse_json(data, path, "metrics file")
    if not isinstance(metrics, dict):
        raise BenchError(f"{printable(path)}: expected a JSON object of metrics")
    for key, types in METRICS_FIELDS.items():
        get(metrics, key, types, path, required=False)
    for name, value in (metrics.get("per_class") or {}).items():
        get({name: value}, name, _NUMBER, path, prefix="per_class.")
    for name, value in (metrics.get("per_layer") or {}).items():
        get({name: value}, name, dict, path, prefix="per_layer.")
        get(value, "map", _NUMBER, path, prefix=f"per_layer.{name}.", required=False)
    for layer, table in (metrics.get("low_shot") or {}).items():
        get({layer: table}, layer, (dict, type(None)), path, prefix="low_shot.")
        for k, entry in (table or {}).items():
            get({k: entry}, k, dict, path, prefix=f"low_shot.{layer}.")
            get(entry, "mean", _NUMBER, path, prefix=f"low_shot.{layer}.{k}.", required=False)
    return metrics


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed atomic writer left below `folder`."""
    removed = []
    for p in Path(folder).rglob(".*.tmp"):
        if p.is_file() and TMP_PATTERN.match(p.name):
            p.unlink()
            removed.append(p)
    return removed


def remove_stale_temporaries_of(path: Path) -> list[Path]:
    """Delete the temporary files a killed `atomic_write_bytes(path, ...)` left beside
    `path` (`.<name>.<random>.tmp`), and nothing else of its folder."""
    path = Path(path)
    return remove_stale_temporaries_in(path.parent, re.escape(path.name))


def remove_stale_temporaries_in(folder: Path, names: str) -> list[Path]:
    """Delete the temporary files `.<name>.<random>.tmp` in `folder` (not below it) of the
    files whose names match the regular expression `names`: what killed atomic writes of
    those files left."""
    pattern = re.compile(r"\.(?:" + names + r")\.[A-Za-z0-9_]+\.tmp")
    removed = []
    if Path(folder).is_dir():
        for p in Path(folder).iterdir():
            if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
    return removed


def first_difference(old: Any, new: Any, prefix: str = "", ignore=RUNTIME_KEYS) -> str | None:
    """Dotted key of the first difference between two plain config dicts (None: same),
    leaving out keys whose last part is in `ignore`."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            if str(k) in ignore:
                continue
            d = first_difference(old.get(k), new.get(k), f"{prefix}{k}.", ignore)
            if d:
                return d
        return None
    return prefix.rstrip(".") if old != new else None


# ------------------------------------------------------------------ what bench made


def folder_kind(path: Path) -> str | None:
    """"run" or "suite" when `path` carries the marker bench writes into the folders it
    makes; None otherwise (no marker, or one bench did not write)."""
    marker = Path(path) / MARKER_FILE
    try:
        if not stat.S_ISREG(marker.lstat().st_mode) or marker.lstat().st_size > 4096:
            return None
        data = json.loads(marker.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if isinstance(data, dict) and data.get("format") == MARKER_FORMAT:
        kind = data.get("kind")
        return kind if kind in FOLDER_KINDS else None
    return None


def mark_folder(path: Path, kind: str) -> None:
    """Write the marker that lets bench clear `path` later (a run) or never (a suite)."""
    assert kind in FOLDER_KINDS
    remove_stale_temporaries_of(Path(path) / MARKER_FILE)  # a write killed half-way
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(Path(path) / MARKER_FILE,
                      {"format": MARKER_FORMAT, "kind": kind, "created": created})  # fmt: skip


_MARKER_TMP = re.compile(re.escape(f".{MARKER_FILE}.") + r"[A-Za-z0-9_]+\.tmp")


def is_empty_folder(path: Path) -> bool:
    """True for a folder that holds nothing but a lock, a marker or half a marker (what a
    process killed right after creating it leaves); bench takes such a folder without
    losing anything."""
    if not Path(path).is_dir():
        return False
    left = set(os.listdir(path)) - {LOCK_FILE, MARKER_FILE}
    return all(_MARKER_TMP.fullmatch(name) for name in left)


def not_made_by_bench(path: Path, what: str = "--name") -> BenchError:
    return BenchError(
        f"{printable(path)}: bench did not make this folder (it has no {MARKER_FILE} marker; "
        "run folders of older bench versions lack it too), so it will not clear or reuse it, "
        f"with or without --force: remove it by hand or choose another {what}"
    )


def nested_bench_folder(path: Path) -> Path | None:
    """The first folder below `path` that bench marked as its own (a run, a suite's folder)."""
    for folder, dirs, files in os.walk(path):
        if MARKER_FILE in files and Path(folder) != Path(path):
            return Path(folder)
        dirs.sort()
    return None


def symbolic_link_inside(path: Path) -> Path | None:
    """The first symbolic link below `path` (links are never followed)."""
    for folder, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            if os.path.islink(os.path.join(folder, name)):
                return Path(folder) / name
    return None


def refuse_links(path: Path, what: str = "run folder") -> None:
    """BenchError when anything below `path` is a symbolic link: bench made none there, and
    writing through one would change a file outside the folder."""
    link = symbolic_link_inside(path)
    if link is not None:
        raise BenchError(
            f"{printable(link)}: a symbolic link inside the {what}; bench writes only "
            "through paths it made (remove the link, or the folder with --force)"
        )


def refuse_linked_folders(root: Path, target: Path) -> None:
    """BenchError when a folder between `root` and `target` (root excluded) is a symbolic
    link: a file written to `target` would land outside `root`."""
    root, target = Path(root), Path(target)
    for folder in reversed(target.relative_to(root).parents[:-1]):
        if (root / folder).is_symlink():
            raise BenchError(f"{printable(root / folder)}: is a symbolic link; bench writes "
                             "only through folders it made")  # fmt: skip


def open_no_follow(path: Path, flags: int, mode: int = 0o666) -> int:
    """`os.open` that refuses a symbolic link or anything but a regular file at `path`."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BenchError(f"{printable(path)}: is a symbolic link; bench writes only "
                             "through paths it made") from None  # fmt: skip
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BenchError(f"{printable(path)}: not a regular file")
    return fd


def open_append(path: Path, encoding: str = "utf-8", errors: str = "strict") -> Any:
    """A text file opened for appending, never through a symbolic link."""
    fd = open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return open(fd, "a", encoding=encoding, errors=errors)


# ------------------------------------------------------------------ the run folder


@dataclass
class Run:
    """An open run folder. Only the main process (rank 0) writes to it."""

    path: Path
    resumed: bool = False
    is_main: bool = True
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("bench"))
    checkpoint: dict[str, Any] | None = None  # loaded on resume; the loop takes it
    _tb: Any = None
    _lock: Any = None

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
        return read_metrics(self.file(METRICS_FILE))

    def command(self) -> str | None:
        """The command line the run folder was opened with (command.txt), if recorded."""
        path = self.file("command.txt")
        return path.read_text().strip() if path.is_file() else None

    def take_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint loaded at resume, handed over once (its memory is freed here)."""
        ckpt, self.checkpoint = self.checkpoint, None
        return ckpt

    def save_checkpoint(self, state: dict[str, Any], name: str = CHECKPOINT) -> Path:
        path = self.checkpoint_dir / name
        if self.is_main:
            atomic_torch_save(path, state)
        return path

    def load_checkpoint(self, name: str = CHECKPOINT) -> dict[str, Any] | None:
        """The checkpoint, validated field by field (`checkpoint.validate_checkpoint`)."""
        from benchmark.checkpoint import validate_checkpoint

        path = self.checkpoint_dir / name
        if not path.is_file():
            return None
        return validate_checkpoint(torch_load_safe(path, "checkpoint"), path)

    def log_sizes(self) -> dict[str, int]:
        """Byte sizes of the append-only logs, recorded in every checkpoint."""
        return {n: self.file(n).stat().st_size if self.file(n).exists() else 0
                for n in (LOG_FILE, SCALARS_FILE)}  # fmt: skip

    def rewind_logs(self, sizes: Mapping[str, int]) -> None:
        """Cut log.txt and scalars.jsonl back to `sizes` (what they held at a checkpoint).

        Only these two files, by their own names: `sizes` comes from a checkpoint, which
        is a file, so it only supplies the sizes (validated as non-negative integers).
        """
        if not self.is_main:
            return
        for name in (LOG_FILE, SCALARS_FILE):
            size = sizes.get(name)
            if size is None:
                continue
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BenchError(f"{printable(self.path)}: log size {size!r} of {name} is not "
                                 "a non-negative integer")  # fmt: skip
            try:
                fd = open_no_follow(self.file(name), os.O_WRONLY)
            except FileNotFoundError:
                continue
            try:
                if os.fstat(fd).st_size > size:
                    os.ftruncate(fd, size)
            finally:
                os.close(fd)

    def log_scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """One JSON line per call in scalars.jsonl, mirrored to TensorBoard."""
        if not self.is_main:
            return
        scalars = {prefix + k: float(v) for k, v in values.items()}
        row = {"step": step, "time": time.time(), **scalars}
        with open_append(self.file(SCALARS_FILE)) as f:
            f.write(json.dumps(row) + "\n")
        tb = self.tensorboard()
        if tb is not None:
            for k, v in scalars.items():
                tb.add_scalar(k, v, step)

    def tensorboard(self, purge_step: int | None = None) -> Any:
        """A TensorBoard writer when tensorboard is installed (it is optional), else None.
        `purge_step` hides events a resumed run logged after its checkpoint."""
        if self._tb is None and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = False
            else:
                self._tb = SummaryWriter(str(self.path / "tensorboard"), purge_step=purge_step)
        return self._tb or None

    def close(self) -> None:
        if self._tb:
            self._tb.close()
            self._tb = None
        for h in list(self.logger.handlers):
            if getattr(h, "_bench_run", None) == str(self.path):
                self.logger.removeHandler(h)
                h.close()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None


class _LogFile(logging.FileHandler):
    """log.txt, opened for appending without following a symbolic link."""

    def _open(self) -> Any:
        return open_append(Path(self.baseFilename), self.encoding or "utf-8",
                           self.errors or "strict")  # fmt: skip


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
        fh = _LogFile(path / LOG_FILE, encoding="utf-8", errors="backslashreplace")
        fh.setFormatter(fmt)
        fh._bench_run = str(path)  # type: ignore[attr-defined]
        logger.addHandler(fh)
    return logger


def _lock(path: Path) -> Any:
    """Hold an exclusive lock on <run>/.lock, or fail at once if another process holds it."""
    f = open(open_no_follow(path / LOCK_FILE, os.O_RDWR | os.O_CREAT), "a+")  # noqa: SIM115
    if fcntl is None:
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise BenchError(
            f"{printable(path)}: run folder is in use by another bench process (wait for it, "
            "or stop it before resuming)"
        ) from None
    return f


def _clear(path: Path) -> None:
    """Remove everything in the run folder but its lock and marker; only a folder bench
    marked as a run, holding no other bench folder, and never following a link outside."""
    if folder_kind(path) != "run":
        raise not_made_by_bench(path)
    inner = nested_bench_folder(path)
    if inner is not None:
        raise BenchError(
            f"{printable(path)}: holds another bench folder ({printable(inner)}), so bench "
            "will not clear it; move that folder out or choose another --name"
        )
    for child in path.iterdir():
        if child.name in (LOCK_FILE, MARKER_FILE):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _check_location(path: Path) -> None:
    check_run_name(path.name)
    if path.is_symlink():
        raise BenchError(f"{printable(path)}: run folder is a symbolic link; refusing to use it")
    if path.exists() and not path.is_dir():
        raise BenchError(f"{printable(path)}: exists and is not a run folder")


def _claim(path: Path, *, force: bool, resume: bool) -> str:
    """Whose folder `path` is, before bench writes anything into it: "run" (bench made
    it: it may be cleared), "new" (absent or empty: bench takes it) or "legacy" (a run
    folder of an older bench, to be continued or reused as it is). Anything else is an
    error that says why: a suite's folder, or a folder bench did not make."""
    if not path.exists():
        return "new"
    kind = folder_kind(path)
    if kind == "suite":
        raise BenchError(
            f"{printable(path)}: is a suite's folder (it holds the suite's runs), not a run "
            "folder; bench never clears it: choose another --name"
        )
    if kind == "run":
        return "run"
    if is_empty_folder(path):
        return "new"
    finished = (path / METRICS_FILE).is_file() or (path / CKPT_DIR / CHECKPOINT).is_file()
    if resume and not force and finished and (path / CONFIG_FILE).is_file():
        return "legacy"
    raise not_made_by_bench(path)


def open_run(
    path: Path,
    cfg: Any,
    *,
    force: bool = False,
    resume: bool = False,
    command: str | None = None,
    is_main: bool = True,
) -> Run:
    """Create (or continue) the run folder `path` = <runs root>/<name> and save the config.

    See the module docstring for what happens to an existing folder. Ranks other than 0
    (`is_main=False`) attach to the folder rank 0 prepared and only read the checkpoint.
    """
    path = Path(path)
    _check_location(path)
    if not is_main:
        run = Run(path=path, resumed=True, is_main=False, logger=_setup_logger(path, False))
        run.checkpoint = run.load_checkpoint() if resume else None
        return run
    _claim(path, force=force, resume=resume)  # before the lock file is made in it
    path.mkdir(parents=True, exist_ok=True)
    lock = _lock(path)
    try:
        if _claim(path, force=force, resume=resume) == "new":  # again, under the lock
            mark_folder(path, "run")
        run = _prepare(path, cfg, force=force, resume=resume, lock=lock)
    except BaseException:
        lock.close()
        raise
    run.save_config(cfg)
    if command:
        atomic_write_text(path / "command.txt", command + "\n")
    return run


def _prepare(path: Path, cfg: Any, *, force: bool, resume: bool, lock: Any) -> Run:
    where = printable(path)
    has_metrics = (path / METRICS_FILE).is_file()
    ckpt_path = path / CKPT_DIR / CHECKPOINT
    if force:
        _clear(path)
    elif has_metrics and not resume:
        raise BenchError(
            f"{where}: run folder holds a finished run; pass --force to redo it "
            "(or --resume to reuse its results)"
        )
    elif ckpt_path.is_file() and not resume:
        raise BenchError(
            f"{where}: run folder holds an unfinished run with a checkpoint; pass --resume "
            "to continue it or --force to start over"
        )
    elif not has_metrics and not ckpt_path.is_file():
        _clear(path)  # a failed attempt with nothing to continue from: start over
    refuse_links(path)
    remove_stale_temporaries(path)
    if has_metrics and resume and not force:
        _check_same_config(path / CONFIG_FILE, cfg)
        read_metrics(path / METRICS_FILE)
        run = Run(path=path, is_main=True, logger=_setup_logger(path, True), _lock=lock)
        run.resumed = True
        return run
    ckpt = None
    if ckpt_path.is_file() and not force:
        ckpt = Run(path=path).load_checkpoint()
        assert ckpt is not None
        key = first_difference(ckpt["config"], to_dict(cfg))
        if key is not None:
            raise BenchError(
                f"{printable(ckpt_path)}: cannot resume, the config differs at '{key}' "
                "(use --force to start over)"
            )
    run = Run(path=path, is_main=True, logger=_setup_logger(path, True), _lock=lock)
    if ckpt is not None:
        run.rewind_logs(ckpt.get("logs", {}))
        run.checkpoint = ckpt
        run.resumed = True
    return run


def _check_same_config(config_file: Path, cfg: Any) -> None:
    from benchmark.config import read_yaml

    try:
        old = read_yaml(config_file, "run config", BenchError) or {}
    except BenchError:
        return  # a finished run whose config is unreadable is judged by its metrics
    key = first_difference(old, to_dict(cfg))
    if key is not None:
        raise BenchError(
            f"{printable(config_file)}: the finished run was made with another config "
            f"(differs at '{key}'); use --force to redo it or another --name"
        )
