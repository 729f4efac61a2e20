"""`bench`: one command line for pretraining, transfer, reports and whole suites.

Every subcommand builds a typed config (defaults <- --config YAML <- flags <- --set) and
calls a stage's `main`. User mistakes (`BenchError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import errno
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmark import __version__
from benchmark.errors import BenchError, printable

EXIT_USER_ERROR = 2


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that writes a run folder."""
    p.add_argument("--config", type=Path, help="YAML file with config keys (differences only)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set train.lr=1e-4 (repeatable)",
    )
    p.add_argument("--data", help="dataset path (default: the embedded synthetic dataset)")
    p.add_argument("--name", help="run folder name (default: derived from the config)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--iterations", type=int, help="shortcut for --set train.iterations=N")
    p.add_argument(
        "--out", type=Path, help="results root; runs go to OUT/runs/NAME (default: ./results)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="replace an existing run folder")
    mode.add_argument("--resume", action="store_true", help="continue an existing run folder")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench",
        description="Self-supervised representation benchmark (Context Encoders, PASCAL VOC).",
    )
    parser.add_argument("--version", action="version", version=f"bench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pretrain an encoder (context encoder and baselines)")
    p.add_argument(
        "--method",
        default=None,
        help="context-encoder (default), autoencoder, random, imagenet, inpainting, "
        "relative-position, rotation, jigsaw",
    )
    p.add_argument("--mask", help="central, random-block, random-region, noise-region")
    p.add_argument("--weights", help="for --method imagenet: a torchvision AlexNet state dict")
    _add_run_options(p)

    p = sub.add_parser("transfer", help="fine-tune pretrained weights on a PASCAL VOC task")
    p.add_argument(
        "--task",
        required=True,
        choices=["classification", "detection", "segmentation", "svm", "knn"],
        help="a fine-tuning protocol, or a frozen-feature probe (svm, knn)",
    )
    p.add_argument(
        "--weights",
        help="pretrain run folder, exported or imported weights, or a ResNet-50 / ViT "
        "checkpoint of another tool (svm, knn, classification; default: random)",
    )
    p.add_argument(
        "--weights-format",
        help="the checkpoint's layout when detection by its keys is not wanted "
        "(`bench import --show-keys` lists them)",
    )
    p.add_argument("--backend", help="native (default), detectron2 or mmseg")
    p.add_argument("--train-from", help="classification: all, pool5 or fc7")
    _add_run_options(p)

    p = sub.add_parser("export", help="export a pretrained encoder for other frameworks")
    p.add_argument("run", type=Path, help="pretrain run folder")
    p.add_argument(
        "--format", default="native", choices=["native", "torchvision", "detectron2", "mmseg"]
    )
    p.add_argument("--out", type=Path, help="output file (default: inside the run folder)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument(
        "--show-keys", action="store_true",
        help="print each weight's name in the run and in the exported file; write nothing",
    )  # fmt: skip

    p = sub.add_parser(
        "import",
        help="import released weights (Caffe models, ResNet-50 / ViT checkpoints) as a bench "
        "encoder",
        description="`bench import --format F FILE --out OUT` (short for `bench import "
        "checkpoint ...`) imports a ResNet-50 / ViT checkpoint; `bench import --show-keys "
        "[FILE]` prints a format's key map; `bench import caffe ...` a Caffe model.",
    )
    isub = p.add_subparsers(dest="import_format", required=True, metavar="KIND")
    q = isub.add_parser(
        "checkpoint",
        help="a ResNet-50 / ViT checkpoint (torchvision, timm, MoCo, DINO, SwAV, BYOL, SimCLR, "
        "VISSL, MMPretrain, solo-learn, lightly, MAE, detectron2); the default KIND",
    )
    q.add_argument("file", nargs="?", type=Path, help="the checkpoint (read, never run)")
    q.add_argument("--format", dest="checkpoint_format", help="its layout (default: detected)")
    q.add_argument(
        "--show-keys",
        action="store_true",
        help="print the key map (the file's, or the format's rules without FILE) and exit",
    )
    q.add_argument("--family", choices=["resnet", "vit"], help="insist on one encoder family")
    q.add_argument("--branch", help="which network of a file holding several (DINO: teacher)")
    q.add_argument("--num-heads", type=int, help="a ViT's attention heads, where unknown")
    q.add_argument(
        "--input-convention",
        choices=["torchvision", "inception"],
        help="the normalisation the network was trained with (default torchvision's)",
    )
    q.add_argument("--method", help="method name for reports (default: the file's stem)")
    q.add_argument(
        "--out", type=Path, help="output .safetensors file, or a folder (gets encoder.safetensors)"
    )
    q.add_argument("--force", action="store_true", help="overwrite an existing output")
    q = isub.add_parser("caffe", help="a Caffe prototxt + caffemodel (AlexNet/CaffeNet conv1-5)")
    q.add_argument("--prototxt", type=Path, required=True, help="the net's deploy/train prototxt")
    q.add_argument("--caffemodel", type=Path, required=True, help="the trained weights")
    q.add_argument("--method", help="method name for reports (default: the caffemodel's stem)")
    q.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output .safetensors file, or a folder (gets encoder.safetensors)",
    )
    q.add_argument("--force", action="store_true", help="overwrite an existing output")

    p = sub.add_parser(
        "report", help="write Table 1/2 (CSV, LaTeX, Markdown) and index.html from run folders"
    )
    p.add_argument("runs", nargs="*", type=Path, help="run folders or folders of runs")
    p.add_argument("--out", type=Path, help="report folder (default: results/report)")
    p.add_argument("--force", action="store_true", help="overwrite existing report files")
    p.add_argument(
        "--overlays",
        type=int,
        default=0,
        metavar="K",
        help="also copy K prediction overlays of each segmentation run into OUT/overlays",
    )

    p = sub.add_parser("env", help="print what a bug report needs: versions, devices, threads")
    p.add_argument("--json", action="store_true", help="as one JSON object")

    p = sub.add_parser("data", help="make or check datasets")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = dsub.add_parser("synth", help="write the synthetic VOCdevkit")
    q.add_argument("out", type=Path)
    q.add_argument("--images", type=int, default=1000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--min-size", type=int, default=128)
    q.add_argument("--max-size", type=int, default=256)
    q.add_argument(
        "--force", action="store_true", help="replace an existing, different dataset folder"
    )
    q = dsub.add_parser("check", help="parse a dataset and list every problem found")
    q.add_argument("path", type=Path)

    p = sub.add_parser("run", help="run a whole suite from one YAML file, then the report")
    p.add_argument("suite", type=Path)
    p.add_argument("--out", type=Path, help="results root (default: suite's `out`, else ./results)")
    p.add_argument("--force", action="store_true", help="redo steps that already have results")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a suite key, e.g. --set seeds=[0,1]",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print every step's resolved config (and how it departs from the paper) and exit",
    )
    p.add_argument(
        "--launcher",
        choices=["sequential", "local", "slurm"],
        default="sequential",
        help="sequential (default): one step after another in this process; local: submitit "
        "jobs on this machine, one per free GPU (or --max-parallel CPU jobs); slurm: one "
        "SLURM job per step, with the suite's `resources`",
    )
    p.add_argument(
        "--max-parallel",
        type=int,
        metavar="N",
        help="at most N steps at a time (local: default one per visible GPU, else a quarter "
        "of the CPU cores; slurm: default no limit)",
    )
    p.add_argument(
        "--step",
        metavar="NAME",
        help="run exactly one planned step here and exit (a launcher job's entry point; "
        "works under torchrun)",
    )

    p = sub.add_parser("inpaint", help="semantic inpainting: Table 1 evaluation and figures")
    isub = p.add_subparsers(dest="inpaint_command", required=True, metavar="ACTION")
    q = isub.add_parser("evaluate", help="Table 1 metrics of a model (or NN baseline) on images")
    q.add_argument("--weights", help="inpainting run folder (omit with --baseline)")
    q.add_argument("--baseline", choices=["nn-hog", "nn-ce"], help="nearest-neighbour baseline")
    q.add_argument("--train-data", help="training images the NN baselines search")
    _add_run_options(q)
    q = isub.add_parser("figures", help="Figure 6 and Figure 8 PNGs")
    q.add_argument("--runs", nargs="+", type=Path, required=True, help="inpainting run folders")
    q.add_argument("--data", help="query images (held out)")
    q.add_argument("--train-data", help="training images for the nearest-neighbour columns")
    q.add_argument("--alexnet", help="optional supervised AlexNet state dict for Figure 8")
    q.add_argument("--images", type=int, default=6)
    q.add_argument("--out", type=Path, required=True, help="output folder")
    return parser


def _stage_overrides(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """Translate convenience flags into `key=value` overrides; --set comes last and wins."""
    out = []
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f"{key}={value}")
    return out + list(args.overrides)


COMMON_FLAGS = {
    "data": "data",
    "name": "name",
    "seed": "seed",
    "device": "device",
}


def _peek(key: str, args: argparse.Namespace, overrides: list[str], default: str) -> str:
    """Value of a top-level key from the overrides or the YAML, before the config exists."""
    from benchmark.config import load_yaml, parse_override

    value: Any = None
    if args.config is not None:
        value = load_yaml(args.config).get(key)
    for text in overrides:
        path, v = parse_override(text)
        if path == [key]:
            value = v
    return str(value) if value is not None else default


def _run_stage_command(args: argparse.Namespace, stage: Any, overrides: list[str]) -> int:
    from bench.stages import run_stage
    from benchmark.config import dump_yaml, load_config
    from benchmark.runs import default_results_root

    if getattr(args, "iterations", None) is not None:
        import dataclasses

        if "train" not in {f.name for f in dataclasses.fields(stage.config_cls)}:
            raise BenchError("--iterations: this command does not train")
        overrides = [f"train.iterations={args.iterations}", *overrides]
    cfg = load_config(stage.config_cls, args.config, overrides)
    if args.print_config:
        from benchmark.protocol import departures

        found = departures(cfg)
        print(dump_yaml(cfg), end="")
        print(f"# departures from the protocol of record: {', '.join(found) or 'none'}")
        return 0
    root = _folder(args.out or default_results_root(), "--out") / "runs"
    command = "bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path, metrics = run_stage(
        stage, cfg, root, force=args.force, resume=args.resume, command=command
    )
    print(f"run folder: {path}")
    _print_metrics(metrics)
    return 0


def _folder(path: Path, flag: str) -> Path:
    """`path` if it is a folder or can become one: one line when it (or a folder above
    it) is a file."""
    for p in (Path(path), *Path(path).parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == Path(path) else f"is inside {printable(p)}, a file"
            raise BenchError(f"{flag} {printable(path)}: {what}, not a folder")
        if p.is_dir():
            break
    return Path(path)


def _print_metrics(metrics: dict[str, Any]) -> None:
    for k, v in metrics.items():
        if k == "command" or not isinstance(v, (int, float, str)):
            continue
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from bench.stages import pretrain_stage

    flags = {**COMMON_FLAGS, "method": "method", "mask": "mask", "weights": "weights"}
    overrides = _stage_overrides(args, flags)
    method = _peek("method", args, overrides, "context-encoder")
    return _run_stage_command(args, pretrain_stage(method), overrides)


def cmd_transfer(args: argparse.Namespace) -> int:
    from bench.stages import transfer_stage

    flags = {**COMMON_FLAGS, "weights": "weights", "backend": "backend"}
    if args.weights_format is not None:
        flags["weights_format"] = "weights_format"
    if args.train_from is not None:
        if args.task != "classification":
            raise BenchError("--train-from applies to --task classification only")
        flags["train_from"] = "train_from"
    return _run_stage_command(args, transfer_stage(args.task), _stage_overrides(args, flags))


def cmd_export(args: argparse.Namespace) -> int:
    from weights.native import export, show_export_keys

    if args.show_keys:
        print(show_export_keys(args.run, args.format))
        return 0
    path = export(args.run, args.format, args.out, force=args.force)
    print(f"wrote {path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if args.import_format == "checkpoint":
        return _import_checkpoint(args)
    from weights.caffe import import_caffe

    path = import_caffe(args.prototxt, args.caffemodel, args.out, args.method, force=args.force)
    print(f"wrote {printable(path)} (use it as --weights)")
    return 0


def _import_checkpoint(args: argparse.Namespace) -> int:
    options = {"family": args.family, "branch": args.branch}
    if args.show_keys:
        if args.file is None:
            from weights import FORMATS, describe_format, get_format

            chosen = [get_format(args.checkpoint_format)] if args.checkpoint_format else FORMATS
            print("\n\n".join(describe_format(f) for f in chosen))
            return 0
        from weights import show_keys

        print(show_keys(args.file, fmt=args.checkpoint_format, **options))
        return 0
    if args.file is None or args.out is None:
        raise BenchError("bench import: give the checkpoint FILE and --out (or --show-keys)")
    from transfer.imported import import_to_native

    path = import_to_native(
        args.file, args.out, fmt=args.checkpoint_format, method=args.method, force=args.force,
        num_heads=args.num_heads, input_convention=args.input_convention, **options,
    )  # fmt: skip
    print(f"wrote {printable(path)} (use it as --weights)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import HTML_FILE
    from bench.report import main as report_main
    from benchmark.runs import default_results_root

    inputs = args.runs or [default_results_root() / "runs"]
    out = _folder(args.out or default_results_root() / "report", "--out")
    print(report_main(inputs, out, force=args.force, overlays=args.overlays))
    print(f"report files in {out} (open {out / HTML_FILE})")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from bench.environment import main as env_main

    print(env_main(as_json=args.json), end="")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from benchmark.datasets.synth import make_synthetic

        path = make_synthetic(
            args.out,
            images=args.images,
            seed=args.seed,
            min_size=args.min_size,
            max_size=args.max_size,
            force=args.force,
        )
        print(f"wrote synthetic VOCdevkit to {path}")
        return 0
    from benchmark.datasets.check import main_check

    return main_check(args.path)


def cmd_run(args: argparse.Namespace) -> int:
    from bench.suite import print_plan, run_step, run_suite

    if args.print_config:
        print(print_plan(args.suite, out=args.out, overrides=args.overrides), end="")
        return 0
    if args.out is not None:
        _folder(args.out, "--out")
    if args.max_parallel is not None and args.max_parallel < 1:
        raise BenchError(f"--max-parallel: must be >= 1, got {args.max_parallel}")
    if args.step is not None:
        if args.launcher != "sequential" or args.max_parallel is not None:
            raise BenchError("--step runs one step in this process: it takes no --launcher "
                             "or --max-parallel")  # fmt: skip
        path, metrics = run_step(
            args.suite, args.step, out=args.out, force=args.force, overrides=args.overrides
        )
        print(f"run folder: {path}")
        _print_metrics(metrics)
        return 0
    if args.launcher == "sequential":
        if args.max_parallel not in (None, 1):
            raise BenchError("--max-parallel: the sequential launcher runs one step at a "
                             "time (use --launcher local or slurm)")  # fmt: skip
        try:
            print(run_suite(args.suite, out=args.out, force=args.force, overrides=args.overrides))
        except KeyboardInterrupt:
            return _suite_interrupted()
        return 0
    try:
        from bench.launch import launch
    except ImportError as exc:
        if getattr(exc, "name", "") != "submitit":
            raise
        raise BenchError(f"--launcher {args.launcher} needs submitit (pip install "
                         "'submitit>=1.5')") from None  # fmt: skip
    try:
        text, ok = launch(
            args.suite,
            out=args.out,
            force=args.force,
            overrides=args.overrides,
            launcher=args.launcher,
            max_parallel=args.max_parallel,
        )
    except KeyboardInterrupt:
        return _suite_interrupted()
    print(text)
    return 0 if ok else 1


def _suite_interrupted() -> int:
    print("bench: interrupted; rerun the same command to continue (finished steps are kept, "
          "interrupted ones resume)", file=sys.stderr)  # fmt: skip
    return 130


def cmd_inpaint(args: argparse.Namespace) -> int:
    if args.inpaint_command == "figures":
        from pretrain.inpainting.figures import make_figures

        for path in make_figures(
            runs=args.runs,
            data=args.data,
            train_data=args.train_data,
            alexnet=args.alexnet,
            images=args.images,
            out=args.out,
        ):
            print(f"wrote {path}")
        return 0
    from bench.stages import INPAINT_EVAL

    flags = {
        **COMMON_FLAGS,
        "weights": "weights",
        "baseline": "baseline",
        "train_data": "train_data",
    }
    return _run_stage_command(args, INPAINT_EVAL, _stage_overrides(args, flags))


COMMANDS = {
    "pretrain": cmd_pretrain,
    "transfer": cmd_transfer,
    "export": cmd_export,
    "import": cmd_import,
    "report": cmd_report,
    "env": cmd_env,
    "data": cmd_data,
    "run": cmd_run,
    "inpaint": cmd_inpaint,
}


# Errors of the machine rather than of the program: a full or read-only disk, no permission.
DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO}
# A path that cannot be one: a file where a folder is needed (or the reverse), a name too
# long, a loop of links.
PATH_ERRORS = {errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}


def _error(message: str) -> int:
    line = " ".join(printable(message).split())  # one line, printable on any terminal
    print(f"bench: error: {line}", file=sys.stderr)
    return EXIT_USER_ERROR


IMPORT_KINDS = ("caffe", "checkpoint", "-h", "--help")


def _default_import_kind(argv: list[str]) -> list[str]:
    """`bench import --format F FILE` means `bench import checkpoint --format F FILE`."""
    if argv[:1] == ["import"] and (len(argv) == 1 or argv[1] not in IMPORT_KINDS):
        return ["import", "checkpoint", *argv[1:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = _default_import_kind(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BenchError as exc:
        return _error(str(exc))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno in PATH_ERRORS:
            return _error(f"{where}{exc.strerror} (a file where a folder is needed, or the "
                          "reverse?)")  # fmt: skip
        if exc.errno not in DISK_ERRORS:
            raise
        return _error(f"{where}cannot write ({exc.strerror}); nothing half-written was left")
    except KeyboardInterrupt:
        print("bench: interrupted; continue with --resume", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # (never imported for --help and the like)
            from benchmark import distributed

            distributed.teardown()  # a torchrun process leaves its process group cleanly


if __name__ == "__main__":
    sys.exit(main())
