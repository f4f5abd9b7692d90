"""Smoke tests of ``python -m bnfast demo`` (bnfast._demo.main)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bnfast import _demo

pytest.importorskip("sklearn")


def test_demo_prints_table(capsys):
    assert _demo.main(["--epochs", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "test acc" in out and "final train loss" in out and "epochs to 95% test acc" in out
    assert "s/epoch" in out
    rows = [line for line in out.splitlines() if line.startswith(("with BN", "without BN"))]
    assert len(rows) == 2 and all("%" in r for r in rows)
    assert "batch normalization" in out.splitlines()[-1]


def test_demo_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    assert _demo.main(["--epochs", "1", "--plot", str(path)]) == 0
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in capsys.readouterr().out


def test_demo_same_initial_weights():
    a, b = _demo.build_model(True, seed=3), _demo.build_model(False, seed=3)
    wa = [p.data for p in a.parameters() if p.data.ndim > 1]
    wb = [p.data for p in b.parameters() if p.data.ndim > 1]
    assert len(wa) == len(wb) == 3
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)
    X = _demo.load_data(0)[0][:4]
    assert a(X).shape == b(X).shape == (4, 10)


def test_demo_missing_optional_dependencies(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert _demo.main(["--epochs", "1", "--plot", "x.png"]) == 2
    assert "matplotlib" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert _demo.main(["--epochs", "1"]) == 2
    assert "scikit-learn" in capsys.readouterr().err


def test_demo_bad_arguments(capsys):
    assert _demo.main(["--epochs", "0"]) == 2
    assert _demo.main(["--bogus"]) == 2
    assert _demo.main(["--help"]) == 0
    assert "--plot" in capsys.readouterr().out


def test_command_line_entry_point():
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "bnfast", "demo", "--epochs", "1"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "with BN" in proc.stdout and "without BN" in proc.stdout


def test_demo_norms_quick(capsys, tmp_path):
    from bnfast import _demo_norms

    assert _demo.main(["--norms", "--quick"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("normalization"))
    assert header.split()[1:] == ["batch", "2", "batch", "8", "batch", "32"]
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines() if line.split("  ")[0].strip() in
            _demo_norms.NORMS}
    assert set(rows) == set(_demo_norms.NORMS)
    assert all(rows[name].count("%") == 3 for name in rows)
    assert _demo.main(["--norms", "--epochs", "0"]) == 2
