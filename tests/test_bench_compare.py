"""benchmarks/compare.py: the noise-aware regression rule on synthetic pytest-benchmark JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "compare.py")
if not os.path.exists(PATH):
    pytest.skip("benchmarks/compare.py is not beside tests/", allow_module_level=True)
_spec = importlib.util.spec_from_file_location("bnfast_bench_compare", PATH)
compare = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = compare  # dataclasses look their module up
_spec.loader.exec_module(compare)


def _bench(name, median, *, iqr=None, minimum=None, impl="bnfast"):
    iqr = median * 0.02 if iqr is None else iqr
    minimum = median * 0.95 if minimum is None else minimum
    stats = {"median": median, "min": minimum, "max": median * 2, "mean": median, "stddev": iqr,
             "iqr": iqr, "q1": median - iqr / 2, "q3": median + iqr / 2, "rounds": 50}  # fmt: skip
    return {"name": name, "fullname": f"benchmarks/test_bench_ops.py::{name}", "stats": stats,
            "extra_info": {"impl": impl}}  # fmt: skip


def _write(tmp_path, fname, benches):
    path = tmp_path / fname
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benches}))
    return str(path)


def _verdict(base, new, **rule):
    return compare.judge("case", base["stats"], new["stats"], **rule)


def test_unchanged_within_noise_is_ok():
    assert _verdict(_bench("a", 1e-3), _bench("a", 1.05e-3)).status == "ok"


def test_clear_slowdown_regresses():
    v = _verdict(_bench("a", 1e-3), _bench("a", 1.5e-3, minimum=1.45e-3))
    assert v.status == "REGRESSED" and v.regressed and v.ratio == pytest.approx(1.5)


def test_threshold_scales_with_the_spread():
    base = _bench("a", 1e-3, iqr=0.2e-3)  # 20 % IQR: a 30 % slowdown is within 2 IQRs
    new = _bench("a", 1.3e-3, iqr=0.2e-3, minimum=1.25e-3)
    v = _verdict(base, new)
    assert v.status == "ok" and v.threshold == pytest.approx(0.4)
    assert _verdict(_bench("a", 1e-3), _bench("a", 1.3e-3, minimum=1.25e-3)).status == "REGRESSED"


def test_median_alone_does_not_regress():
    """Noise bursts move the median; the fastest round must be slower too."""
    v = _verdict(_bench("a", 1e-3, minimum=0.9e-3), _bench("a", 1.4e-3, minimum=0.92e-3))
    assert v.status == "ok"


def test_sub_10us_cases_skip_the_percentage_rule():
    # the 39 % run-to-run swing of a sub-microsecond call is not a regression ...
    v = _verdict(_bench("tiny", 0.6e-6), _bench("tiny", 0.84e-6, minimum=0.8e-6))
    assert v.status == "small" and not v.regressed
    # ... but a doubling is, at any size
    v = _verdict(_bench("tiny", 0.6e-6), _bench("tiny", 1.5e-6, minimum=1.4e-6))
    assert v.status == "small REGRESSED" and v.regressed


def test_faster_is_reported():
    assert _verdict(_bench("a", 1e-3), _bench("a", 0.5e-3, minimum=0.45e-3)).status == "faster"


def test_main_exit_codes_and_impl_filter(tmp_path, capsys):
    base = _write(tmp_path, "base.json", [_bench("fast", 1e-3), _bench("np", 1e-3, impl="numpy"),
                                          _bench("gone", 1e-3)])  # fmt: skip
    same = _write(tmp_path, "same.json", [_bench("fast", 1.02e-3), _bench("np", 3e-3, impl="numpy")])
    slow = _write(tmp_path, "slow.json", [_bench("fast", 2e-3, minimum=1.9e-3), _bench("np", 1e-3, impl="numpy")])
    assert compare.main([base, same]) == 0  # numpy's slowdown is context, not judged
    out = capsys.readouterr().out
    assert "0 regressed" in out and "1 cases only in the baseline" in out
    assert compare.main([base, same, "--impl", "all"]) == 1
    capsys.readouterr()
    assert compare.main([base, slow, "--quiet"]) == 1
    assert "REGRESSION: benchmarks/test_bench_ops.py::fast" in capsys.readouterr().out
    assert compare.main([base, str(tmp_path / "missing.json")]) == 2
    assert compare.main([base, _write(tmp_path, "other.json", [_bench("x", 1e-3)])]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert compare.main([base, str(bad)]) == 2


def test_machine_drift_from_the_memory_limit_reference(tmp_path, capsys):
    base = {"r": _bench("r", 1e-3, impl="roofline"), "b": _bench("b", 1e-3)}
    busy = {"r": _bench("r", 1.5e-3, impl="roofline"), "b": _bench("b", 1.5e-3, minimum=1.45e-3)}
    ratio, count = compare.machine_drift(base, busy)
    assert ratio == pytest.approx(1.5) and count == 1
    assert compare.machine_drift({"b": _bench("b", 1e-3)}, {"b": _bench("b", 1e-3)}) is None
    a = _write(tmp_path, "a.json", list(base.values()))
    b = _write(tmp_path, "b.json", list(busy.values()))
    assert compare.main([a, b, "--quiet"]) == 1
    assert "machine was busier" in capsys.readouterr().out


def test_reads_a_real_pytest_benchmark_file(tmp_path):
    """A file written by pytest-benchmark (one tiny case of benchmarks/) parses and,
    compared with itself, has no regression."""
    pytest.importorskip("pytest_benchmark")
    import bnfast

    out = tmp_path / "run.json"
    env = dict(os.environ)  # the bnfast under test, wherever it is imported from
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(bnfast.__file__)))]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.dirname(PATH),
         # the case id alone: a parent directory's name (e.g. /tmp/bnfast-...) is a -k keyword too
         "-k", "inference-8x16-NC-float32-t2-bnfast", f"--benchmark-json={out}",
         "--benchmark-max-time=0.01", "--benchmark-min-rounds=3", "--benchmark-disable-gc"],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = compare.load(str(out))
    verdicts, only_base, only_new = compare.compare(data, data)
    assert {compare._impl(b) for b in data.values()} == {"bnfast", "bnfast_alloc"}
    assert len(verdicts) == 2 and not only_base and not only_new
    assert all(v.status in ("ok", "small") for v in verdicts)
