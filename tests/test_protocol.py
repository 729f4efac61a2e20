"""The protocol of record (benchmark/reference/protocol.yaml) against the config classes, and
`departures` computed from it: every default agrees with the record, a key the record lacks
is an error, and the paper suite departs in nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from bench.stages import INPAINT_EVAL, PRETRAIN_METHODS, TRANSFER_TASKS
from bench.suite import load_suite
from benchmark import protocol
from benchmark.errors import BenchError
from benchmark.protocol import (
    RECORD_FILE,
    class_name,
    departures,
    protocol_keys,
    record_problems,
    settings,
    stage_record,
)
from pretrain.inpainting.config import InpaintingConfig
from transfer.classification.config import ClassificationConfig
from transfer.svm.config import SVMConfig

STAGE_CLASSES = list(
    dict.fromkeys(
        s.config_cls for s in (*PRETRAIN_METHODS.values(), *TRANSFER_TASKS.values(), INPAINT_EVAL)
    )
)
PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper.yaml"

@pytest.mark.parametrize("cls", STAGE_CLASSES, ids=lambda c: c.__name__)
def test_every_default_is_the_recorded_value(cls):
    """A default edited without the record (or the record without the default) fails here,
    naming the key, both values and the recorded source."""
    assert record_problems(cls) == []
    assert departures(cls()) == []


@pytest.mark.parametrize("cls", STAGE_CLASSES, ids=lambda c: c.__name__)
def test_every_protocol_key_has_a_recorded_value_and_a_source(cls):
    record = stage_record(cls)
    keys = protocol_keys(cls, record)
    assert sorted(record.values) == sorted(keys)
    assert all(record.sources[k].strip() for k in keys)
    # not_protocol keys exist and are documented; the leaf-name sets never hide a protocol
    # key of another meaning (every excluded key is a location, setting or runtime key)
    assert all(why.strip() for why in record.not_protocol.values())


def test_the_record_has_one_section_per_stage_config_and_nothing_else():
    stages = yaml.safe_load(RECORD_FILE.read_text())["stages"]
    assert sorted(s["config"] for s in stages.values()) == sorted(
        class_name(c) for c in STAGE_CLASSES
    )


def test_a_new_config_field_without_a_recorded_value_fails(tmp_path, monkeypatch):
    """The next drift cannot be silent: a config class that gains a field the record does not
    hold fails the record check and every `departures` call."""
    extended = dataclasses.make_dataclass(
        "ExtendedClassification", [("new_knob", int, 3)], bases=(ClassificationConfig,)
    )
    stages = yaml.safe_load(RECORD_FILE.read_text())["stages"]
    section = dict(stages["classification"], config=class_name(extended))
    record = tmp_path / "protocol.yaml"
    record.write_text(yaml.safe_dump({"stages": {"extended": section}}))
    monkeypatch.setattr(protocol, "RECORD_FILE", record)
    problems = record_problems(extended)
    assert len(problems) == 1 and "'new_knob' has no value" in problems[0]
    with pytest.raises(BenchError, match="no value for 'new_knob'"):
        departures(extended())


def test_departures_compare_with_the_record_not_with_the_defaults(tmp_path, monkeypatch):
    """A record value that differs from the default makes the default a departure."""
    stages = yaml.safe_load(RECORD_FILE.read_text())["stages"]
    stages["classification"]["values"]["train.lr"]["value"] = 0.01
    record = tmp_path / "protocol.yaml"
    record.write_text(yaml.safe_dump({"stages": stages}))
    monkeypatch.setattr(protocol, "RECORD_FILE", record)
    assert departures(ClassificationConfig()) == ["train.lr"]
    (problem,) = record_problems(ClassificationConfig)
    assert "train.lr = 0.001 differs from the recorded 0.01" in problem
    lr = dataclasses.replace(ClassificationConfig().train, lr=0.01)
    assert departures(dataclasses.replace(ClassificationConfig(), train=lr)) == []


def test_a_stale_or_ill_typed_record_entry_is_an_error_naming_it(tmp_path, monkeypatch):
    stages = yaml.safe_load(RECORD_FILE.read_text())["stages"]
    stages["classification"]["values"]["train.no_such_key"] = {"value": 1, "source": "x"}
    record = tmp_path / "stale.yaml"
    record.write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(BenchError, match="'train.no_such_key' is not a key"):
        stage_record(ClassificationConfig, record)
    del stages["classification"]["values"]["train.no_such_key"]
    stages["classification"]["values"]["train.lr"]["value"] = "fast"
    record = tmp_path / "typed.yaml"
    record.write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(BenchError, match="train.lr"):
        stage_record(ClassificationConfig, record)


def test_locations_settings_runtime_and_experiment_keys_are_no_departures():
    cls_cfg = ClassificationConfig(data="VOCdevkit", seed=3, device="cpu", name="x")
    cls_cfg.train.precision, cls_cfg.train.threads, cls_cfg.train.workers = "bf16", 3, 1
    cls_cfg.train.channels_last, cls_cfg.train.compile = False, True
    cls_cfg.test.batch_size = 2  # not_protocol in the record
    assert departures(cls_cfg) == []
    assert departures(SVMConfig(batch_size=7, n_jobs=1, cache_dir="c")) == []
    adversarial = InpaintingConfig()
    adversarial.loss.kind = "adversarial"  # which Table 1 row, not a departure
    assert departures(adversarial) == []
    cls_cfg.train.lr = 0.01
    assert departures(cls_cfg) == ["train.lr"]


def test_the_paper_suite_departs_in_nothing(tmp_path, capsys):
    """configs/paper.yaml only says where the data is: `--print-config` lists no departure
    for any step."""
    from bench import cli

    _, _, steps = load_suite(PAPER, out=tmp_path)
    assert {s.stage.config_cls for s in steps} >= {
        c for c in STAGE_CLASSES if c.__name__ in (
            "PretrainConfig", "ClassificationConfig", "DetectionConfig", "SegmentationConfig",
            "InpaintingConfig", "InpaintEvalConfig")
    }  # fmt: skip
    assert cli.main(["run", str(PAPER), "--print-config", "--out", str(tmp_path)]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["step"] for d in docs] == [s.name for s in steps]
    assert all(d["departures"] == [] for d in docs)
    ce = next(d for d in docs if d["step"] == "pretrain-context-encoder-s0")["config"]
    assert ce["mask"] == "random-region" and ce["train"]["iterations"] == 100_000


def test_a_suite_with_one_protocol_value_changed_lists_exactly_that_one(tmp_path, capsys):
    from bench import cli

    argv = ["run", str(PAPER), "--print-config", "--out", str(tmp_path),
            "--set", "transfer.detection.train.lr=0.002"]  # fmt: skip
    assert cli.main(argv) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    changed = [d for d in docs if d["departures"] and d["step"].startswith("detection-")]
    assert changed and all(d["departures"] == ["train.lr"] for d in changed)
    others = [d for d in docs if not d["step"].startswith("detection-")]
    assert others and all(d["departures"] == [] for d in others)


def test_a_stage_command_prints_its_departures_with_its_config(capsys):
    from bench import cli

    argv = ["transfer", "--task", "segmentation", "--print-config"]
    assert cli.main([*argv, "--set", "train.iter_size=1", "--set", "train.workers=1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "# departures from the protocol of record: train.iter_size"
    assert yaml.safe_load(out)["train"]["iter_size"] == 1  # the output stays a config file
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("record: none")


def test_settings_record_how_a_run_executed(monkeypatch):
    cfg = ClassificationConfig()
    cfg.train.channels_last = False
    monkeypatch.setenv("WORLD_SIZE", "2")
    got = settings(cfg, device=torch.device("cpu"), precision="bf16")
    assert got == {
        "channels_last": False, "compile": False, "device": "cpu", "precision": "bf16",
        "threads": torch.get_num_threads(), "processes": 2,
    }  # fmt: skip
    # without the resolved values, the config's own (the SVM's extraction precision)
    assert settings(SVMConfig())["precision"] == "auto"
    assert settings(SVMConfig())["device"] == "auto"
