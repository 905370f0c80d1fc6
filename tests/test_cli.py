"""The command line: help that teaches, one-line errors with the documented exit codes."""
import subprocess
import sys

import pytest

from medcycle.cli import build_parser, main

COMMANDS = ["phantom", "preprocess", "train", "convert", "evaluate", "demo"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medcycle", *args], capture_output=True, encoding="utf-8", errors="replace", timeout=120)


def test_python_dash_m_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"medcycle {command}" in out


def test_usage_error_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["convert", "-i", "x.nii.gz"])
    assert exit_info.value.code == 2


def test_config_error_is_one_line_exit_2(tmp_path):
    result = run_cli("preprocess", "--data", str(tmp_path), "--out", str(tmp_path / "cache"), "--set", "data.tile_size=30")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.tile_size must be a multiple of 4" in lines[0]
