"""The built wheel installs into a fresh virtual environment and its `bench` command works.

Installing the wheel's dependencies (torch alone is 5.5 GB) into a fresh environment on every
CI run would take minutes and the network. So the fresh environment borrows them: a `.pth`
file puts the test interpreter's site-packages at the END of its `sys.path`, and the wheel is
installed with `--no-deps`. What this checks: the wheel builds from a copy of the sources, it
holds every module and data file a command needs (the reference tables of `bench report`),
its `bench` entry point and version work, and its declared requirements are all satisfied by
installed versions. What it does not check: that pip can resolve and download those
requirements from the package index on a bare machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from benchmark import __version__

REPO = Path(__file__).resolve().parents[1]
DIST = "bench-ssl"


# every top-level package of the checkout: each must ship in the wheel (pyproject's `include`)
PACKAGES = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file())
SOURCES = ("pyproject.toml", "README.md", *PACKAGES)  # a new package needs no edit here

pytestmark = pytest.mark.slow

CHECK_REQUIREMENTS = """
import importlib.metadata as md
import sys
import benchmark
from packaging.requirements import Requirement
print(benchmark.__file__)
for text in md.requires(sys.argv[1]) or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an optional extra
    have = md.version(req.name)
    assert req.specifier.contains(have, prereleases=True), (text, have)
"""


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: the build writes build/ and *.egg-info beside the sources
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp / "dist"), str(src)],
        check=True,
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("*.whl")
    return wheel


def _fresh_env(tmp: Path, wheel: Path) -> tuple[Path, dict[str, str]]:
    home = tmp / "fresh"
    venv.EnvBuilder(with_pip=False).create(home)
    python = home / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # Appended after the fresh site-packages: the wheel's own modules come first. A path in a
    # .pth file is added without reading the .pth files inside it, so the project's editable
    # install there stays inert.
    (Path(purelib) / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "-q", str(wheel)],
        check=True,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{home / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    return home, env


def test_wheel_installs_and_runs_in_a_fresh_environment(tmp_path: Path, synth_root: Path) -> None:
    wheel = _build_wheel(tmp_path)
    assert wheel.name == f"{DIST.replace('-', '_')}-{__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert "benchmark/reference/table2.csv" in names and "transfer/probes/svm.py" in names
    assert "encoders/resnet.py" in names and "weights/formats.py" in names
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names, package
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]

    home, env = _fresh_env(tmp_path, wheel)
    work = tmp_path / "work"
    work.mkdir()

    def bench(*args: str) -> str:
        out = subprocess.run([str(home / "bin" / "bench"), *args], cwd=work, env=env,
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    check = subprocess.run([str(home / "bin" / "python"), "-c", CHECK_REQUIREMENTS, DIST], cwd=work,
                           env=env, capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stderr[-2000:]
    assert check.stdout.strip().startswith(str(home))  # the wheel's modules, not the checkout's

    assert bench("--version").strip() == f"bench {__version__}"
    assert "pretrain" in bench("--help")
    out = bench("pretrain", "--iterations", "1", "--mask", "central", "--data", str(synth_root),
                "--out", "res",
                "--set", "model.input_size=99", "--set", "train.batch_size=2",
                "--set", "train.workers=0")  # fmt: skip
    assert "run folder:" in out
    assert (work / "res" / "runs").is_dir()
    # the report reads the paper's numbers from the installed package's data
    assert "Context encoder" in bench("report", "res/runs", "--out", "res/report")
