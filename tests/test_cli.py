"""One step of each CLI command's plumbing: help, config errors, run-folder protection."""

import subprocess
import sys

import pytest

from benchmark.cli import main

SUBCOMMANDS = ["pretrain", "transfer", "export", "report", "data", "run", "inpaint"]


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_console_script_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "benchmark.cli", "--help"], capture_output=True, text=True
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
    ],
)
def test_bad_input_is_one_line_error(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1


def test_print_config_shows_paper_defaults(capsys):
    assert main(["transfer", "--task", "classification", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "80000" in out  # the fine-tuning protocol's iteration budget


def test_data_check_missing_path(tmp_path, capsys):
    code = main(["data", "check", str(tmp_path / "nowhere")])
    assert code != 0
    captured = capsys.readouterr()
    assert "nowhere" in captured.err + captured.out
