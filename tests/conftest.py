"""Shared fixtures: a tiny synthetic VOCdevkit made once per session, and the real samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmark.datasets.synth import make_synthetic

REPO_ROOT = Path(__file__).resolve().parent.parent

SYNTH_IMAGES = 24
SYNTH_SEED = 0


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `bench data synth` tree with 24 labelled + 24 unlabelled images of 96-128 px.

    Layout: VOCdevkit/VOC2007, VOCdevkit/VOC2012, SBD/dataset, unlabelled (see
    benchmark/datasets/synth.py). Shared by the whole session: do not modify it; copy it
    (shutil.copytree) to break things.
    """
    out = tmp_path_factory.mktemp("synth") / "data"
    return make_synthetic(out, images=SYNTH_IMAGES, seed=SYNTH_SEED, min_size=96, max_size=128)


def _shared_data_dir() -> Path | None:
    candidates = [os.environ.get("BENCH_SHARED_DATA"), "/work/shared/data"]
    candidates.append(str(REPO_ROOT.parent / "shared" / "data"))
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that reads the real samples (through `shared_data`, directly or through
    another fixture) is marked `realdata`: `pytest -m realdata` runs just them."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realdata)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real dataset samples (../shared/data); skips the test where they are absent."""
    path = _shared_data_dir()
    if path is None:
        pytest.skip("real data samples not available (../shared/data is absent)")
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: threads fight over a loaded CI machine (10x slower)
    and a fixed count keeps CPU results bit-stable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
