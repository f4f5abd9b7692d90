"""``mypy --strict`` on a user's script (tests/typing/user_script.py): the public
API is typed -- functional ops, layers, moments, the nn training helper --
and its results are ndarray types or bnfast classes, not ``Any``."""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys

import pytest

import bnfast

pytest.importorskip("mypy.api", reason="mypy is not installed (pip install mypy, or bnfast[test])")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "typing", "user_script.py")


def _env() -> dict[str, str]:
    """mypy finds an installed bnfast (py.typed) itself; a source tree on
    PYTHONPATH goes in MYPYPATH (which must not name site-packages)."""
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    parent = os.path.dirname(os.path.dirname(os.path.abspath(bnfast.__file__)))
    installed = {os.path.abspath(p) for p in site.getsitepackages() + [site.getusersitepackages()]}
    if parent not in installed:
        env["MYPYPATH"] = parent
    return env


@pytest.fixture(scope="module")
def mypy_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mypy-cache")
    cmd = [
        sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(cache),
        # like an installed package: bnfast's own modules are followed but not reported on
        "--follow-imports=silent", "--python-executable", sys.executable, "--show-error-codes", SCRIPT,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(cache), timeout=600)


def test_user_script_passes_mypy_strict(mypy_run):
    errors = [line for line in mypy_run.stdout.splitlines() if ": error:" in line]
    assert mypy_run.returncode == 0 and not errors, mypy_run.stdout + mypy_run.stderr


def test_results_are_typed_not_any(mypy_run):
    revealed = {}
    for line in mypy_run.stdout.splitlines():
        m = re.match(r".*user_script\.py:(\d+): note: Revealed type is \"(.*)\"$", line)
        if m:
            revealed[int(m.group(1))] = m.group(2)
    with open(SCRIPT) as f:
        expected = {i: m.group(1) for i, line in enumerate(f, 1) if (m := re.search(r"# R: (\w+)$", line))}
    assert expected and set(expected) == set(revealed), mypy_run.stdout
    for lineno, kind in expected.items():
        got = revealed[lineno]
        assert got != "Any" and not got.startswith("Any"), (lineno, got)
        assert kind in got, (lineno, kind, got)


def test_user_script_runs():
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
