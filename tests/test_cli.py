"""One step of each CLI command's plumbing: help, config errors, run-folder protection."""

import errno
import subprocess
import sys

import pytest
import yaml

from bench.cli import main

SUBCOMMANDS = [
    "pretrain", "transfer", "export", "import", "report", "env", "data", "run", "inpaint",
]  # fmt: skip


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_console_script_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "bench.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "transfer" in out.stdout


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["pretrain", "--set", "train.no_such_key=1", "--print-config"], "train.no_such_key"),
        (["pretrain", "--set", "train.iterations=abc", "--print-config"], "train.iterations"),
        (["pretrain", "--method", "bogus"], "bogus"),
        (["transfer", "--task", "classification", "--set", "bogus=1"], "bogus"),
        (["pretrain", "--config", "no/such/file.yaml"], "no/such/file.yaml"),
        (["transfer", "--task", "detection", "--set", "train.bogus=1"], "train.bogus"),
        (["transfer", "--task", "segmentation", "--set", "train.iter_size=x"], "train.iter_size"),
        (["inpaint", "evaluate", "--iterations", "3"], "--iterations"),
        (
            [
                "import",
                "caffe",
                "--prototxt",
                "no/such.prototxt",
                "--caffemodel",
                "no/m.caffemodel",
                "--out",
                "w.safetensors",
            ],
            "no/such.prototxt",
        ),
    ],
)
def test_bad_input_is_one_line_error(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1
    assert err.startswith("bench: error: ")


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain"],
        ["pretrain", "--method", "inpainting"],
        ["transfer", "--task", "classification"],
        ["transfer", "--task", "detection"],
        ["transfer", "--task", "segmentation"],
    ],
)
def test_iterations_flag_sets_train_iterations(argv, capsys):
    assert main([*argv, "--iterations", "7", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["iterations"] == 7
    # --set comes after the flag and wins.
    assert main([*argv, "--iterations", "7", "--set", "train.iterations=9", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["iterations"] == 9


def test_disk_error_is_one_line(tmp_path, monkeypatch, capsys):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "w.pt"))

    monkeypatch.setattr("weights.native.export", full)
    assert main(["export", str(tmp_path), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bench: error: ")
    assert "w.pt" in err and "No space left" in err


def test_inpaint_figures_missing_run_is_one_line_error(tmp_path, capsys):
    code = main(["inpaint", "figures", "--runs", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere" in err and len(err.splitlines()) == 1


def test_print_config_shows_paper_defaults(capsys):
    assert main(["transfer", "--task", "classification", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "80000" in out  # the fine-tuning protocol's iteration budget


def test_data_check_missing_path(tmp_path, capsys):
    code = main(["data", "check", str(tmp_path / "nowhere")])
    assert code != 0
    captured = capsys.readouterr()
    assert "nowhere" in captured.err + captured.out


def _tree(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_data_synth_twice_is_identical_and_check_names_broken_files(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert main(["data", "synth", str(out), "--images", "10", "--seed", "5",
                     "--min-size", "64", "--max-size", "96"]) == 0  # fmt: skip
    assert _tree(a) == _tree(b)
    assert main(["data", "check", str(a)]) == 0

    voc = a / "VOCdevkit" / "VOC2007"
    anns = sorted((voc / "Annotations").glob("*.xml"))
    (voc / "JPEGImages" / f"{anns[0].stem}.jpg").unlink()
    anns[1].write_text("<annotation><object>")
    text = anns[2].read_text()
    first = text.index("<name>", text.index("<object>"))
    end = text.index("</name>", first)
    anns[2].write_text(text[:first] + "<name>unicorn" + text[end:])
    capsys.readouterr()
    assert main(["data", "check", str(a)]) == 1
    captured = capsys.readouterr()
    report = captured.out + captured.err
    for path in anns[:3]:
        assert path.name in report
    assert "unicorn" in report
