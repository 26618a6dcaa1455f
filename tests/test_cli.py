from __future__ import annotations

import subprocess
import sys

from tspo.cli import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: tspo" in out


def test_console_script_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "tspo.cli", "--version"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("tspo ")


def test_user_error_under_python_dash_m_prints_one_line():
    # Under `python -m tspo.cli` the CLI module runs as __main__: a user error raised by a command must
    # still be caught (CLIError lives outside the CLI module) and printed without a traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "tspo.cli", "train", "trainer.bf16=maybe"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tspo train: error: trainer.bf16: 'maybe' is not one of 'auto', 'on', 'off'"
