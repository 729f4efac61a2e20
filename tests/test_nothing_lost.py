"""Nothing lost: no run deletes what it did not make, no field read from a file becomes a
path, a size or an index unchecked, no write goes through a symbolic link bench did not
make, and every hostile file is one line on stderr with a non-zero exit.

Every case writes its hostile input itself, then checks that nothing outside the run (or
nothing at all) changed, that no code ran, and that `bench` printed exactly one error line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from test_faults import Cfg, Payload  # a run config; a pickle that runs code when loaded

from bench import cli
from benchmark.checkpoint import make_checkpoint
from benchmark.config import to_dict
from benchmark.errors import BenchError
from benchmark.runs import MARKER_FILE, folder_kind, open_run

pytestmark = pytest.mark.usefixtures("one_thread")


def bench(*args: str) -> tuple[int, str]:
    """`bench ARGS` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return code, err.getvalue()


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("bench: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def fails(*args: str) -> str:
    """Run bench, expect exit 2 with one error line; return that line."""
    code, err = bench(*args)
    assert code == 2, err
    return one_line(err)


def snapshot(root: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every file, folder and link below `root`, with its bytes or target (links unfollowed)."""
    out: dict[str, tuple[str, bytes | str]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            key = str(p.relative_to(root))
            if p.is_symlink():
                out[key] = ("link", os.readlink(p))
            elif p.is_dir():
                out[key] = ("dir", b"")
            else:
                out[key] = ("file", p.read_bytes())
    return out


def outside(snap: dict, run: str) -> dict:
    """A snapshot without the entries of the run folder `run` (a path relative to its root)."""
    return {k: v for k, v in snap.items() if k != run and not k.startswith(run + os.sep)}


def pretrain(out: Path, name: str, *flags: str) -> tuple[str, ...]:
    """The fastest real run: a random encoder, exported as a pretraining run."""
    return ("pretrain", "--method", "random", "--name", name, "--out", str(out), *flags)


# ======================================================================= 1. deletes only its own


@pytest.mark.parametrize("flag", [(), ("--force",), ("--resume",)])
def test_a_suites_folder_is_never_cleared_by_a_run(tmp_path, flag):
    from bench.suite import claim_suite_root

    out = tmp_path / "results"
    suite = claim_suite_root(out / "runs" / "tiny")
    (suite / "suite.yaml").write_text("name: tiny\n")
    (suite / ".launcher.lock").write_text("")
    step = open_run(suite / "pretrain-random-s0", Cfg())
    step.write_metrics({"stage": "pretrain", "method": "random"})
    step.close()
    before = snapshot(tmp_path)
    line = fails(*pretrain(out, "tiny", *flag))
    assert "suite's folder" in line and snapshot(tmp_path) == before


@pytest.mark.parametrize("flag", [(), ("--force",), ("--resume",)])
@pytest.mark.parametrize(
    "content",
    [
        {"notes.txt": b"my notes"},  # a user's folder that has the run's name
        {"suite.yaml": b"name: tiny\n", ".launcher.lock": b""},  # an older bench's suite
        {"config.yaml": b"lr: 0.1\n", "log.txt": b"x"},  # a failed run of an older bench
        {MARKER_FILE: b'{"kind": "run"}', "data.csv": b"1,2"},  # a marker bench did not write
        {"sub/deep/file.bin": b"\0\1"},
    ],
)
def test_a_folder_bench_did_not_make_is_never_cleared(tmp_path, content, flag):
    out = tmp_path / "results"
    folder = out / "runs" / "r"
    for name, data in content.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    before = snapshot(tmp_path)
    line = fails(*pretrain(out, "r", *flag))
    assert "did not make this folder" in line and "remove it by hand" in line
    assert snapshot(tmp_path) == before


def test_an_older_benchs_run_folder_resumes_but_is_never_cleared(tmp_path):
    out = tmp_path / "results"
    assert bench(*pretrain(out, "r"))[0] == 0
    run = out / "runs" / "r"
    (run / MARKER_FILE).unlink()  # as a run folder written before the marker existed
    before = snapshot(tmp_path)
    for flag in ((), ("--force",)):
        assert "remove it by hand" in fails(*pretrain(out, "r", *flag))
        assert snapshot(tmp_path) == before
    code, err = bench(*pretrain(out, "r", "--resume"))  # reusing its results deletes nothing
    assert code == 0, err
    assert (run / "metrics.json").read_bytes() == before["results/runs/r/metrics.json"][1]
    assert folder_kind(run) is None  # resuming does not make it bench's to clear


def test_a_run_folder_holding_another_bench_folder_is_not_cleared(tmp_path):
    out = tmp_path / "results"
    assert bench(*pretrain(out, "r"))[0] == 0
    inner = out / "runs" / "r" / "mine" / "results" / "runs"
    assert bench(*pretrain(inner.parent, "kept"))[0] == 0
    before = snapshot(tmp_path)
    assert "holds another bench folder" in fails(*pretrain(out, "r", "--force"))
    assert snapshot(tmp_path) == before


def test_bench_clears_what_it_made_and_takes_an_empty_folder(tmp_path):
    out = tmp_path / "results"
    (out / "runs" / "r").mkdir(parents=True)  # empty: nothing to lose
    assert bench(*pretrain(out, "r"))[0] == 0
    assert folder_kind(out / "runs" / "r") == "run"
    (out / "runs" / "r" / "junk").write_text("x")
    assert bench(*pretrain(out, "r", "--force"))[0] == 0
    assert not (out / "runs" / "r" / "junk").exists()


def test_a_kill_while_marking_a_new_folder_leaves_it_to_bench(tmp_path):
    out = tmp_path / "results"
    _killed(pretrain(out, "r"), MARKER_FILE, tmp_path)
    assert _temporaries(out)  # half a marker
    code, err = bench(*pretrain(out, "r"))
    assert code == 0, err
    assert folder_kind(out / "runs" / "r") == "run" and not _temporaries(out)


def test_a_suite_never_moves_into_a_run_or_a_users_folder(tmp_path, synth_root):
    import yaml

    from bench.suite import run_suite

    out = tmp_path / "results"
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({"name": "r", "device": "cpu", "pretrain": {"random": {}},
                                     "report": False}))  # fmt: skip
    assert bench(*pretrain(out, "r"))[0] == 0  # a run folder named like the suite
    before = snapshot(tmp_path)
    with pytest.raises(BenchError, match="is a run folder"):
        run_suite(suite, out=out)
    assert snapshot(tmp_path) == before
    (out / "runs" / "r" / MARKER_FILE).unlink()
    before = snapshot(tmp_path)
    with pytest.raises(BenchError, match="did not make this folder"):
        run_suite(suite, out=out)
    assert snapshot(tmp_path) == before


# ============================================================= 2. checkpoint fields are checked


def _deep(levels: int) -> dict:
    node: dict = {}
    for _ in range(levels):
        node = {"x": node}
    return node


DEEP = _deep(200)


def _checkpoint_run(tmp_path: Path, **changes) -> tuple[Path, Path]:
    """A run folder with logs and a checkpoint whose fields `changes` replaces."""
    run = open_run(tmp_path / "runs" / "r", Cfg())
    run.logger.info("line")
    run.log_scalars(1, {"loss": 1.0})
    ckpt = make_checkpoint(stage="t", config=to_dict(Cfg()), iteration=1, seconds=1.0,
                           state={"model": {"w": torch.ones(2)}}, logs=run.log_sizes())  # fmt: skip
    for key, value in changes.items():
        node = ckpt
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    run.save_checkpoint(ckpt)
    run.logger.info("after")
    run.close()
    return tmp_path / "runs" / "r", tmp_path / "runs" / "r" / "checkpoints" / "last.pt"


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"logs": {"VICTIM": 5}}, "logs"),  # an absolute path
        ({"logs": {"../../../victim.txt": 0}}, "logs"),
        ({"logs": {"log.txt": -1}}, "logs.log.txt"),
        ({"logs": {"log.txt": "5"}}, "logs.log.txt"),
        ({"logs": {"scalars.jsonl": 2.5}}, "logs.scalars.jsonl"),
        ({"logs": {"log.txt": True}}, "logs.log.txt"),
        ({"logs": [["log.txt", 0]]}, "logs"),
        ({"iteration": -3}, "iteration"),
        ({"iteration": "3"}, "iteration"),
        ({"seconds": float("nan")}, "seconds"),
        ({"config": ["lr", 0.1]}, "config"),
        ({"stage": 7}, "stage"),
        ({"state": {"model": [1, 2]}}, "state.model"),
        ({"scalars": {"history": [1, 2]}}, "scalars.history"),
        ({"rng.python": torch.zeros(3, dtype=torch.int64)}, "rng.python"),
        ({"rng.numpy": torch.full((624,), -1, dtype=torch.int64)}, "rng.numpy"),
        ({"rng.torch": torch.zeros(7, dtype=torch.uint8)}, "rng.torch"),
        ({"rng.numpy_meta": torch.tensor([9999.0, 0, 0], dtype=torch.float64)}, "rng.numpy"),
        ({"rng": "seed"}, "rng"),
        ({"config": {"lr": 0.1, "x": DEEP}}, "nests deeper"),
    ],
)
def test_checkpoint_fields_never_name_files_or_break_the_resume(tmp_path, changes, field):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    if changes.get("logs") == {"VICTIM": 5}:
        changes = {"logs": {str(victim): 5}}
    folder, _ = _checkpoint_run(tmp_path / "w", **changes)
    before = snapshot(tmp_path)
    with pytest.raises(BenchError) as err:
        open_run(folder, Cfg(), resume=True)
    message = str(err.value)
    assert "\n" not in message and "last.pt" in message and f"{field}" in message
    assert snapshot(tmp_path) == before


def test_a_checkpoint_of_the_wrong_shape_is_one_line_on_resume(tmp_path, synth_root):
    out = tmp_path / "results"
    args = ("pretrain", "--method", "context-encoder", "--mask", "central", "--name", "r",
            "--out", str(out),
            "--data", str(synth_root / "unlabelled"), "--set", "model.input_size=67",
            "--set", "train.batch_size=2", "--set", "train.sample_every=0",
            "--set", "train.workers=0", "--iterations", "2", "--device", "cpu",
            "--set", "train.checkpoint_every=1")  # fmt: skip
    code, err = bench(*args)
    assert code == 0, err
    (out / "runs" / "r" / "metrics.json").unlink()  # as if killed after its checkpoint
    ckpt_path = out / "runs" / "r" / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    key = next(iter(ckpt["state"]["model"]))
    ckpt["state"]["model"][key] = torch.zeros(1, 2, 3)
    torch.save(ckpt, ckpt_path)
    line = fails(*args, "--resume")
    assert "last.pt" in line and "state.model" in line


# ============================================================== 3. no write through a link


@pytest.mark.parametrize("which", ["log.txt", "scalars.jsonl", "checkpoints", "command.txt",
                                   "tensorboard", ".lock", "encoder.safetensors"])  # fmt: skip
@pytest.mark.parametrize("flag", ["--resume", "--force"])
def test_a_symbolic_link_in_a_run_folder_is_never_followed(tmp_path, which, flag):
    import shutil

    out = tmp_path / "results"
    assert bench(*pretrain(out, "r"))[0] == 0
    run = out / "runs" / "r"
    victim = tmp_path / "victim"
    if which in ("checkpoints", "tensorboard"):
        victim.mkdir()
        (victim / "last.pt").write_text("precious")
    else:
        victim.write_text("precious data\n" * 10)
    target = run / which
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    target.symlink_to(victim)
    before = outside(snapshot(tmp_path), "results/runs/r")
    code, err = bench(*pretrain(out, "r", flag))
    # --force clears the link itself (bench made the folder); reusing the run refuses it.
    if flag == "--resume" or which == ".lock":
        assert code == 2 and "symbolic link" in one_line(err)
    assert outside(snapshot(tmp_path), "results/runs/r") == before


@pytest.mark.parametrize("which", ["log.txt", "scalars.jsonl", "checkpoints"])
def test_resume_refuses_links_to_logs_and_checkpoints(tmp_path, which):
    folder, _ = _checkpoint_run(tmp_path / "w")
    victim = tmp_path / "victim"
    if which == "checkpoints":
        (folder / which).rename(victim)
    else:
        victim.write_text("precious data\n" * 50)
        (folder / which).unlink()
    (folder / which).symlink_to(victim)
    before = outside(snapshot(tmp_path), "w/runs/r")
    with pytest.raises(BenchError, match="symbolic link"):
        open_run(folder, Cfg(), resume=True)
    assert outside(snapshot(tmp_path), "w/runs/r") == before


# ======================================================================= no code ever runs


def test_a_pickled_payload_in_a_checkpoint_never_runs(tmp_path):
    folder, ckpt_path = _checkpoint_run(tmp_path / "w")
    marker = tmp_path / "pwned"
    torch.save({"format": "bench-checkpoint/1", "logs": Payload(marker)}, ckpt_path)
    with pytest.raises(BenchError, match="unreadable checkpoint"):
        open_run(folder, Cfg(), resume=True)
    assert not marker.exists()
    ckpt_path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(BenchError):
        open_run(folder, Cfg(), resume=True)
    assert not marker.exists()


def test_bench_marks_the_run_folders_it_makes(tmp_path):
    out = tmp_path / "results"
    assert bench(*pretrain(out, "r"))[0] == 0
    marker = json.loads((out / "runs" / "r" / MARKER_FILE).read_text())
    assert marker["kind"] == "run" and marker["format"] == "bench-folder/1"


# ================================================================ export never replaces


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A finished random-encoder pretraining run (its encoder.safetensors and card)."""
    out = tmp_path_factory.mktemp("pretrained") / "results"
    assert bench(*pretrain(out, "r"))[0] == 0
    return out / "runs" / "r"


@pytest.mark.parametrize("fmt", ["native", "torchvision", "detectron2", "mmseg"])
def test_export_never_replaces_a_card_or_weights_without_force(tmp_path, pretrained, fmt):
    suffix = {"native": ".safetensors", "detectron2": ".pkl"}.get(fmt, ".pth")
    out = tmp_path / f"new{suffix}"
    card = tmp_path / "new.card.json"
    card.write_text("my own card")
    before = snapshot(tmp_path)
    line = fails("export", pretrained, "--format", fmt, "--out", out)
    assert "new.card.json" in line and "--force" in line and snapshot(tmp_path) == before
    card.unlink()
    out.write_bytes(b"my weights")
    before = snapshot(tmp_path)
    assert "--force" in fails("export", pretrained, "--format", fmt, "--out", out)
    assert snapshot(tmp_path) == before
    code, err = bench("export", pretrained, "--format", fmt, "--out", out, "--force")
    assert code == 0, err


def test_export_of_nan_weights_fails_in_one_line(tmp_path, pretrained):
    from safetensors.torch import load_file, save_file

    from weights.native import NATIVE_FILE

    run = tmp_path / "run"
    import shutil

    shutil.copytree(pretrained, run)
    state = load_file(str(run / NATIVE_FILE))
    for value in (float("nan"), float("inf")):
        state["features.3.weight"][0, 0, 0, 0] = value
        save_file(state, str(run / NATIVE_FILE))  # no card in the metadata: read beside it
        before = snapshot(tmp_path)
        line = fails("export", run, "--format", "torchvision", "--out", tmp_path / "x.pth")
        assert "features.3.weight" in line and "NaN or infinite" in line
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("out", ["file.txt/x.pth", "missing/x.pth", "folder"])
def test_export_out_that_cannot_be_a_file_is_one_line(tmp_path, pretrained, out):
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "folder").mkdir()
    before = snapshot(tmp_path)
    fails("export", pretrained, "--format", "torchvision", "--out", tmp_path / out)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["pretrain", "report", "run"])
def test_out_naming_a_file_is_one_line(tmp_path, pretrained, command):
    (tmp_path / "file").write_text("a file")
    before = snapshot(tmp_path)
    if command == "pretrain":
        args = pretrain(tmp_path / "file", "r")
    elif command == "report":
        args = ("report", pretrained, "--out", tmp_path / "file")
    else:
        (tmp_path / "s.yaml").write_text("name: s\npretrain: {random: {}}\n")
        before = snapshot(tmp_path)
        args = ("run", tmp_path / "s.yaml", "--out", tmp_path / "file" / "sub")
    assert "file" in fails(*args)
    assert snapshot(tmp_path) == before


def _killed(args: list[str], fault: str, cwd: Path) -> None:
    """`bench ARGS` in a child process that SIGKILLs itself half-way through writing the
    file named by `fault` (benchmark.faults)."""
    import subprocess
    import sys

    env = {**os.environ, "BENCH_FAULT": f"write:{fault}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "bench.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == -9, done.stderr


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("fault", ["x.pth", "x.card.json"])
def test_a_killed_export_leaves_nothing_after_the_next_one(tmp_path, pretrained, fault):
    out = tmp_path / "exports"
    out.mkdir()
    (out / "mine.tmp").write_text("a user's file that only looks temporary")
    (out / ".notes.md.abcdef12.tmp").write_text("not an export's temporary file either")
    args = ["export", pretrained, "--format", "torchvision", "--out", out / "x.pth"]
    _killed(args, fault, tmp_path)
    assert len(_temporaries(out)) == 3  # the killed write's, and the two kept below
    code, err = bench(*args, "--force")
    assert code == 0, err
    assert sorted(p.name for p in _temporaries(out)) == [".notes.md.abcdef12.tmp", "mine.tmp"]


def test_a_killed_report_leaves_nothing_after_the_next_one(tmp_path, pretrained):
    out = tmp_path / "report"
    _killed(["report", pretrained, "--out", out], "table2.md", tmp_path)
    assert _temporaries(out)
    code, err = bench("report", pretrained, "--out", out, "--force")
    assert code == 0, err
    assert not _temporaries(out) and (out / "table2.md").is_file()


def test_a_report_never_writes_through_a_linked_folder(tmp_path, pretrained):
    out = tmp_path / "report"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "overlays").symlink_to(elsewhere)
    seg = tmp_path / "runs" / "seg"
    seg.mkdir(parents=True)
    (seg / "config.yaml").write_text("seed: 0\n")
    (seg / "metrics.json").write_text(json.dumps({"stage": "transfer", "task": "segmentation",
                                                  "method": "m", "mean_iu": 0.5}))  # fmt: skip
    (seg / "overlays").mkdir()
    (seg / "overlays" / "a.png").write_bytes(b"png")
    before = snapshot(tmp_path)
    line = fails("report", seg, "--out", out, "--overlays", "1", "--force")
    assert "overlays: is a symbolic link" in line and snapshot(tmp_path) == before


# ================================================================ data synth --force


@pytest.mark.parametrize("target", ["..", ".", "../..", "here", "user", "link", "file"])
def test_synth_force_deletes_only_a_dataset_it_made(tmp_path, monkeypatch, target):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    (cwd / "work.txt").write_text("my work")
    (tmp_path / "a" / "notes.txt").write_text("notes")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "photo.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "file").write_text("a file")
    (tmp_path / "link").symlink_to(tmp_path / "user")
    monkeypatch.chdir(cwd)
    path = {"here": str(cwd), "user": str(tmp_path / "user"), "link": str(tmp_path / "link"),
            "file": str(tmp_path / "file")}.get(target, target)  # fmt: skip
    before = snapshot(tmp_path)
    fails("data", "synth", path, "--images", "8", "--min-size", "16", "--max-size", "16",
          "--force")  # fmt: skip
    assert snapshot(tmp_path) == before


def test_synth_force_replaces_its_own_dataset(tmp_path):
    out = tmp_path / "data"
    small = ("--images", "8", "--min-size", "16", "--max-size", "16")
    assert bench("data", "synth", out, *small)[0] == 0
    (out / "extra").write_text("x")
    assert bench("data", "synth", out, *small, "--seed", "1", "--force")[0] == 0
    assert not (out / "extra").exists()
    assert json.loads((out / "synth.json").read_text())["seed"] == 1


# ======================================================== one validator per input kind


DEEP_JSON = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "card, field",
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (DEEP_JSON, "nests deeper"),
        ('{"method": 5}', "card.method"),
        ('{"method": "x", "arch": ["caffenet"]}', "card.arch"),
        ('{"method": "x", "pool_free": "yes"}', "card.pool_free"),
        ('{"method": "x", "pretrain_seconds": NaN}', "card.pretrain_seconds"),
        ('{"method": "x", "iterations": 1.5}', "card.iterations"),
    ],
)
def test_malformed_cards_are_one_line(tmp_path, pretrained, card, field):
    from safetensors.torch import load_file, save_file

    from weights.encoder import load_encoder
    from weights.native import NATIVE_FILE

    state = load_file(str(pretrained / NATIVE_FILE))
    inside = tmp_path / "inside.safetensors"
    save_file(state, str(inside), metadata={"card": card})
    beside = tmp_path / "beside.safetensors"
    save_file(state, str(beside))
    (tmp_path / "beside.card.json").write_text(card)
    for weights in (inside, beside):
        with pytest.raises(BenchError) as err:
            load_encoder(weights)
        assert "\n" not in str(err.value) and field in str(err.value)
        assert weights.stem in str(err.value)
        line = fails("export", weights, "--format", "torchvision", "--out", tmp_path / "o.pth")
        assert field in line
    (tmp_path / "beside.card.json").write_bytes(b"\xff\xfe{}")
    assert "not UTF-8" in fails("export", beside, "--format", "mmseg", "--out", tmp_path / "o")


@pytest.mark.parametrize("dims", [[2**32, 2**32], [2**62, 4], [-1, 0], [1] * 40])
def test_caffemodel_dimensions_that_overflow_are_one_line(tmp_path, dims):
    from weights.caffe import read_caffemodel
    from weights.caffe.schema import messages

    net = messages()["NetParameter"]()
    layer = net.layer.add()
    layer.name = "conv1"
    blob = layer.blobs.add()
    blob.shape.dim.extend(dims)
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(net.SerializeToString())
    with pytest.raises(BenchError, match="bad.caffemodel: layer 'conv1' blob 0"):
        read_caffemodel(path)


YAML_CASES = {
    "not-utf8": b"name: \xff\xfe\n",
    "deep": b"a: " + b"[" * 50_000 + b"]" * 50_000 + b"\n",
    "laughs": b"a: &a [x,x,x,x,x,x,x,x,x,x]\n" + b"".join(
        b"%c: &%c [" % (98 + i, 98 + i) + b",".join([b"*%c" % (97 + i)] * 10) + b"]\n"
        for i in range(8)
    ),
    "list": b"- 1\n- 2\n",
    "binary": bytes(range(256)),
    "int-keys": b"1: x\nname: y\n",
    "tab": b"train:\n\tlr: 1\n",
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_malformed_yaml_is_one_line_and_makes_nothing(tmp_path, case):
    path = tmp_path / "bad.yaml"
    path.write_bytes(YAML_CASES[case])
    out = tmp_path / "results"
    before = snapshot(tmp_path)
    where = "'1'" if case == "int-keys" else "bad.yaml"  # the key at fault, or the file
    assert where in fails("pretrain", "--method", "random", "--config", path, "--out", out)
    assert where in fails("run", path, "--out", out)
    assert snapshot(tmp_path) == before


def test_an_override_that_nests_too_deeply_is_one_line(tmp_path):
    deep = "[" * 5000 + "]" * 5000
    line = fails("pretrain", "--method", "random", "--set", f"train.x={deep}",
                 "--out", tmp_path)  # fmt: skip
    assert "train.x" in line


METRICS_CASES = {
    "not-json": b"{",
    "list": b"[1, 2]",
    "not-utf8": b'{"stage": "\xff"}',
    "deep": b'{"stage": "transfer", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "stage-number": b'{"stage": 5}',
    "map-text": b'{"stage": "transfer", "task": "classification", "method": "m", "map": "high"}',
    "per-class-list": b'{"stage": "transfer", "task": "detection", "method": "m", '
    b'"map": 0.5, "per_class": [1]}',
    "per-class-text": b'{"stage": "transfer", "task": "detection", "method": "m", '
    b'"map": 0.5, "per_class": {"cat": "x"}}',
    "seed-text": b'{"stage": "pretrain", "method": "m", "seed": "0"}',
    "departures-text": b'{"stage": "pretrain", "method": "m", "departures": "none"}',
    "per-layer": b'{"stage": "transfer", "task": "svm", "method": "m", "per_layer": {"c": 1}}',
    "low-shot": b'{"stage": "transfer", "task": "svm", "method": "m", "low_shot": {"c": [1]}}',
    "low-shot-mean": b'{"stage": "transfer", "task": "svm", "method": "m", '
    b'"low_shot": {"conv1": {"1": {"mean": "x"}}}}',
}


@pytest.mark.parametrize("case", sorted(METRICS_CASES))
def test_malformed_report_inputs_are_one_line(tmp_path, case):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "metrics.json").write_bytes(METRICS_CASES[case])
    before = snapshot(tmp_path)
    line = fails("report", tmp_path / "runs", "--out", tmp_path / "report")
    assert "metrics.json" in line
    assert snapshot(tmp_path) == before


def test_a_malformed_run_config_is_one_line_in_the_report(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"stage": "pretrain", "method": "m"}')
    for text in (b"\xff\xfe", b"[" * 50_000, b"- a\n"):
        (run / "config.yaml").write_bytes(text)
        assert "config.yaml" in fails("report", tmp_path / "runs", "--out", tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def _pickle(tmp_path: Path, obj) -> Path:
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(obj))
    return path


@pytest.mark.parametrize(
    "obj, field",
    [
        ({"ids": "a", "boxes": []}, "ids"),
        ({"ids": [["a"]], "boxes": [[]]}, "ids"),
        ({"ids": ["a"], "boxes": 5}, "boxes"),
        ({"ids": ["a", "b"], "boxes": [[[0, 0, 1, 1]]]}, "boxes"),
        ({"ids": ["a"], "boxes": [[[0, 0, 1]]]}, "boxes of image 'a'"),
        ({"ids": ["a"], "boxes": [[["x", 0, 1, 1]]]}, "boxes of image 'a'"),
        ({"ids": ["a"], "boxes": [[[float("nan"), 0, 1, 1]]]}, "NaN"),
        ({"ids": ["a"], "boxes": [[[0, 0, 1, 1]]], "bbox_mode": "0"}, "bbox_mode"),
        ({"ids": ["a"], "boxes": [[[0, 0, 1, 1]]], "bbox_mode": 1}, "bbox_mode"),
        ({"ids": ["a"], "boxes": [{"x": 1}]}, "boxes of image 'a'"),
        ([1, 2], "expected a dict"),
    ],
)
def test_malformed_proposal_pickles_are_one_line(tmp_path, obj, field):
    from transfer.detection.proposals import load_proposal_file

    with pytest.raises(BenchError) as err:
        load_proposal_file(_pickle(tmp_path, obj), ["a"])
    assert "\n" not in str(err.value) and "p.pkl" in str(err.value) and field in str(err.value)


def test_a_proposal_pickle_never_runs_code(tmp_path):
    from transfer.detection.proposals import load_proposal_file

    marker = tmp_path / "pwned"
    with pytest.raises(BenchError, match="not allowed"):
        load_proposal_file(_pickle(tmp_path, {"ids": ["a"], "boxes": [Payload(marker)]}), ["a"])
    assert not marker.exists()


def _npz(path: Path, **arrays) -> Path:
    import numpy as np

    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def test_a_damaged_selective_search_cache_is_computed_again(tmp_path, monkeypatch):
    import numpy as np

    import transfer.detection.proposals as proposals

    searched = []
    def search(job):
        searched.append(job)
        return np.ones((2, 4), np.float32)

    monkeypatch.setattr(proposals, "_search_file", search)
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    cache = tmp_path / "cache"
    first = proposals.selective_search_cached(["a"], [image], cache)
    (path,) = cache.glob("*.npz")
    good = path.read_bytes()
    damaged = [
        good[: len(good) // 2],  # truncated
        b"not a zip",
        _npz(tmp_path / "x.npz", ids=np.array(["a"]), boxes=np.ones((2, 4)),
             offsets=np.array([0, 9])).read_bytes(),  # offsets past the boxes
        _npz(tmp_path / "y.npz", ids=np.array(["a"]), boxes=np.ones((2, 3)),
             offsets=np.array([0, 2])).read_bytes(),  # not (N, 4)
        _npz(tmp_path / "z.npz", ids=np.array(["a"])).read_bytes(),  # arrays missing
    ]  # fmt: skip
    for data in damaged:
        path.write_bytes(data)
        searched.clear()
        boxes = proposals.selective_search_cached(["a"], [image], cache)
        assert len(searched) == 1 and np.array_equal(boxes[0], first[0])
        assert proposals.load_npz(path)[0] == ["a"]  # written again, sound
    searched.clear()
    proposals.selective_search_cached(["a"], [image], cache)
    assert not searched  # a sound cache is used as it is
    for data in damaged:  # given as a proposal file, the same damage is one line
        (tmp_path / "given.npz").write_bytes(data)
        with pytest.raises(BenchError, match="given.npz"):
            proposals.load_proposal_file(tmp_path / "given.npz", ["a"])


def test_a_damaged_feature_cache_is_extracted_again(tmp_path):
    import numpy as np

    from transfer.probes.features import _read_cache

    class Spec:
        dim = 3

    specs = {"conv1": Spec()}
    meta = np.asarray(json.dumps({"key": "k"}))
    good = dict(feat_conv1=np.zeros((2, 3), np.float32), ids=np.array(["a", "b"]),
                keep=np.array([0, 1]), skipped=np.array([], dtype=str), meta=meta)  # fmt: skip
    assert _read_cache(_npz(tmp_path / "ok.npz", **good), "k", ["conv1"], specs, 2) is not None
    bad = [
        {**good, "feat_conv1": np.zeros((3, 3), np.float32)},  # rows != ids
        {**good, "feat_conv1": np.zeros((2, 4), np.float32)},  # width != layer
        {**good, "keep": np.array([1, 0])},  # not increasing
        {**good, "keep": np.array([0, 7])},  # past the split
        {**good, "ids": np.array([[1, 2]])},
        {**good, "meta": np.asarray("[1]")},
    ]
    for i, arrays in enumerate(bad):
        assert _read_cache(_npz(tmp_path / f"{i}.npz", **arrays), "k", ["conv1"], specs, 2) is None
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:100])
    assert _read_cache(tmp_path / "cut.npz", "k", ["conv1"], specs, 2) is None


# ============================================== ids are plain names; check and runs agree


BAD_IDS = ["../../../escape/q", "/abs/q", "a\\b", "..", ".", "x\x01y"]
CLASSIFY = ("transfer", "--task", "classification", "--set", "hidden=16",
            "--set", "augment.crop=67", "--set", "train.batch_size=4",
            "--set", "test.mode=center", "--iterations", "1", "--set", "train.workers=0",
            "--device", "cpu")  # fmt: skip


@pytest.fixture
def data(synth_root, tmp_path) -> Path:
    """A copy of the synthetic dataset to break."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(synth_root, copy)
    return copy


def _prepend(path: Path, line: str) -> None:
    path.write_text(line + "\n" + path.read_text())


def check(path: Path) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main(["data", "check", str(path)])
    return code, err.getvalue()


@pytest.mark.parametrize("bad", BAD_IDS)
def test_an_id_that_is_a_path_is_refused_by_check_and_every_run(data, tmp_path, bad):
    main = data / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt"
    seg = data / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    sbd = data / "SBD" / "dataset" / "train.txt"
    for split in (main, seg, sbd):
        _prepend(split, bad)
        code, err = check(data)
        assert code == 1 and f"{split.name}: line 1: image id" in err, err
        split.write_text(split.read_text().split("\n", 1)[1])
    _prepend(main, bad)
    (tmp_path / "results" / "runs").mkdir(parents=True)
    before = outside(snapshot(tmp_path), "results/runs/c")
    line = fails(*CLASSIFY, "--data", data, "--name", "c", "--out", tmp_path / "results")
    assert "trainval.txt: line 1: image id" in line
    assert outside(snapshot(tmp_path), "results/runs/c") == before


def test_a_segmentation_run_never_writes_outside_for_an_id(data, tmp_path):
    seg = data / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    for name in ("val.txt", "train.txt"):
        _prepend(seg / name, "../../../../../../escape/q")
    args = ("transfer", "--task", "segmentation", "--data", data, "--set", "fc_dim=16",
            "--set", "pad=0", "--set", "max_size=64", "--iterations", "1",
            "--set", "train.workers=0", "--set", "save_overlays=3", "--device", "cpu",
            "--set", "train_set=voc+sbd", "--name", "s", "--out", tmp_path / "results")  # fmt: skip
    (tmp_path / "results" / "runs").mkdir(parents=True)
    before = outside(snapshot(tmp_path), "results/runs/s")
    assert "line 1: image id" in fails(*args)
    code, err = bench(*args, "--force", "--set", "on_bad_data=skip")
    assert code == 0, err
    assert outside(snapshot(tmp_path), "results/runs/s") == before
    metrics = json.loads((tmp_path / "results" / "runs" / "s" / "metrics.json").read_text())
    assert "../../../../../../escape/q" in json.dumps(metrics["skipped"])
    assert not list(tmp_path.rglob("q.png"))


def test_repeated_ids_and_empty_splits_are_check_errors_and_runs_refuse_them(data, tmp_path):
    main = data / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    first = (main / "trainval.txt").read_text().split()[0]
    (main / "trainval.txt").write_text((main / "trainval.txt").read_text() + first + "\n")
    code, err = check(data)
    assert code == 1 and "image id " + first + " repeats line 1" in err, err
    line = fails(*CLASSIFY, "--data", data, "--out", tmp_path / "r1")
    assert "repeats line 1" in line
    code, err = bench(*CLASSIFY, "--data", data, "--out", tmp_path / "r2",
                      "--set", "on_bad_data=skip")  # fmt: skip
    assert code == 0, err  # the id is scored once
    (main / "trainval.txt").write_text("\n\n")
    code, err = check(data)
    assert code == 1 and "trainval.txt: split file lists no image id" in err, err
    assert "lists no usable image id" in fails(*CLASSIFY, "--data", data, "--out", tmp_path / "r3")


def test_classification_refuses_the_box_errors_check_reports(data, tmp_path):
    voc = data / "VOCdevkit" / "VOC2007"
    image_id = (voc / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0]
    xml = voc / "Annotations" / f"{image_id}.xml"
    text = xml.read_text()
    start = text.index("<xmin>") + len("<xmin>")
    xml.write_text(text[:start] + "-5" + text[text.index("</xmin>"):])
    code, err = check(data)
    assert code == 1 and "negative coordinate" in err
    for task in ("classification", "detection"):
        args = list(CLASSIFY)
        args[2] = task
        if task == "detection":
            args = ["transfer", "--task", "detection", "--iterations", "1", "--device", "cpu"]
        assert "negative coordinate" in fails(*args, "--data", data, "--out", tmp_path / task)
    code, err = bench(*CLASSIFY, "--data", data, "--out", tmp_path / "skip",
                      "--set", "on_bad_data=skip")  # fmt: skip
    assert code == 0, err
    (metrics,) = (tmp_path / "skip").rglob("metrics.json")
    assert image_id in json.dumps(json.loads(metrics.read_text())["skipped"])
