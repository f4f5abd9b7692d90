"""`python -m bnfast`: every command listed with one line, every option with help, exit codes."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from bnfast import __main__ as cli
from bnfast import _bench, _demo, _selfcheck


def test_help_lists_every_command_on_one_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("check", "bench", "demo"):
        lines = [line for line in out.splitlines() if line.split()[:1] == [name]]
        assert len(lines) == 1 and len(lines[0]) <= 79, (name, out)
        following = out.splitlines()[out.splitlines().index(lines[0]) + 1]
        assert not following.startswith(" " * 9), "one line per command"
    assert "exit status" in out and "default" in out


def test_help_from_the_interpreter():
    proc = subprocess.run([sys.executable, "-m", "bnfast", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "bench" in proc.stdout and "demo" in proc.stdout and "check" in proc.stdout


@pytest.mark.parametrize("parser", [_selfcheck._parser(), _bench._parser(), _demo._parser()],
                         ids=["check", "bench", "demo"])  # fmt: skip
def test_every_option_has_help_and_exit_codes_are_documented(parser):
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        assert "issue" not in action.help.lower()
    assert "exit status" in (parser.epilog or "")


def test_unknown_command_exits_2(capsys):
    assert cli.main(["nonsense"]) == 2
    assert "check, bench, demo" in capsys.readouterr().err


def test_version(capsys):
    import bnfast

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bnfast {bnfast.__version__}"


def test_check_is_the_default_and_takes_options(capsys):
    assert cli.main(["--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "self-check: passed" in out and "timing" not in out.split("self-check against")[1].split("self-check:")[0]
    assert cli.main(["check", "--no-timing"]) == 0


def test_bad_option_values_exit_2(capsys):
    assert cli.main(["check", "--shape", "a,b"]) == 2
    assert cli.main(["check", "--repeats", "0"]) == 2
    assert cli.main(["bench", "--ops", "nope"]) == 2
    assert cli.main(["check", "--help"]) == 0
