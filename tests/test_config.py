from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from benchmark.config import config_hash, dump_yaml, load_config, to_dict
from benchmark.errors import ConfigError


@dataclass
class Train:
    lr: float = 1e-3
    iterations: int = 100
    scales: tuple[int, ...] = (600,)


@dataclass
class Cfg:
    name: str | None = None
    mask: Literal["central", "random-region"] = "random-region"
    data: Path | None = None
    amp: bool = False
    train: Train = field(default_factory=Train)


def test_defaults_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("mask: central\ntrain:\n  iterations: 5\n")
    cfg = load_config(Cfg, y, ["train.lr=1e-4", "amp=true", "train.scales=[480, 600]"])
    assert cfg.mask == "central" and cfg.train.iterations == 5
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.amp is True
    assert cfg.train.scales == (480, 600)


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(Cfg, None, ["train.lrr=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.iterations"):
        load_config(Cfg, None, ["train.iterations=many"])
    with pytest.raises(ConfigError, match="mask"):
        load_config(Cfg, None, ["mask=square"])
    with pytest.raises(ConfigError, match="amp"):
        load_config(Cfg, None, ["amp=3"])


def test_bad_yaml_names_the_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(Cfg, y)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(Cfg, tmp_path / "missing.yaml")


def test_round_trip_and_hash():
    cfg = load_config(Cfg, None, ["data=/x/y"])
    again = load_config(Cfg, None, [], base=to_dict(cfg))
    assert again == cfg
    assert config_hash(cfg) == config_hash(again)
    assert config_hash(cfg) != config_hash(load_config(Cfg, None, ["amp=true"]))
    assert "data: /x/y" in dump_yaml(cfg)


def _training_stages():
    from bench.stages import PRETRAIN_METHODS, TRANSFER_TASKS

    stages = {**PRETRAIN_METHODS, **TRANSFER_TASKS}
    return sorted({s.config_cls for s in stages.values()}, key=lambda c: c.__name__)


@pytest.mark.parametrize("config_cls", _training_stages(), ids=lambda c: c.__name__)
def test_every_training_stage_has_a_loop_train_section_and_on_bad_data(config_cls):
    from dataclasses import fields

    from benchmark.loop import LoopConfig

    assert load_config(config_cls, None, []).on_bad_data == "error"
    assert load_config(config_cls, None, ["on_bad_data=skip"]).on_bad_data == "skip"
    with pytest.raises(ConfigError, match="on_bad_data"):
        load_config(config_cls, None, ["on_bad_data=ignore"])
    if "train" not in {f.name for f in fields(config_cls)}:  # the probes: no SGD loop
        assert config_cls.__name__ in {"KNNConfig", "SVMConfig"}
        with pytest.raises(ConfigError, match="train"):
            load_config(config_cls, None, ["train.iterations=3"])
        return
    cfg = load_config(config_cls, None, ["train.iterations=3", "train.precision=bf16"])
    assert isinstance(cfg.train, LoopConfig)
    assert cfg.train.iterations == 3 and cfg.train.precision == "bf16"
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(config_cls, None, ["train.precision=fp8"])
