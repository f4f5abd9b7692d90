"""The contention back-off: parallel calls fall back to one thread while the
OS deschedules their threads (bnfast.set_contention_backoff)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import bnfast
from bnfast import _kernels
from bnfast._bench_contention import busy

pytestmark = pytest.mark.skipif(not _kernels.openmp_enabled(), reason="serial build: no parallel calls")


@pytest.fixture
def two_threads():
    before, backoff = bnfast.get_num_threads(), bnfast.get_contention_backoff()
    bnfast.set_num_threads(2)
    bnfast.set_contention_backoff(True)
    yield
    bnfast.set_contention_backoff(backoff)
    bnfast.set_num_threads(before)


def test_a_report_runs_the_next_calls_on_one_thread_for_a_while(two_threads):
    assert _kernels._next_call_threads() == 2
    assert _kernels._next_call_threads(1) == 1
    left = _kernels.contention_backoff()[1]
    assert 0.0 < left <= 0.01
    time.sleep(0.012)
    assert _kernels._next_call_threads() == 2  # the period is over


def test_the_period_doubles_while_contention_lasts_and_resets_after_a_clean_call(two_threads):
    periods = []
    for _ in range(9):
        _kernels._next_call_threads(1)
        periods.append(_kernels.contention_backoff()[1])
    # each report while backed off starts a period twice as long, capped at 1 s
    assert periods[1] > 1.5 * periods[0] and max(periods) <= 1.0
    bnfast.set_contention_backoff(True)  # reset: 10 ms again
    _kernels._next_call_threads(0)
    _kernels._next_call_threads(1)
    assert _kernels.contention_backoff()[1] <= 0.01


def test_off_means_the_configured_count_always(two_threads):
    bnfast.set_contention_backoff(False)
    assert not bnfast.get_contention_backoff()
    assert _kernels._next_call_threads(1) == 2
    assert bnfast.get_num_threads() == 2


def test_get_num_threads_reports_the_setting_not_the_back_off(two_threads):
    _kernels._next_call_threads(1)
    assert bnfast.get_num_threads() == 2


def test_results_do_not_depend_on_the_back_off(two_threads):
    x = np.random.default_rng(0).standard_normal((8, 16, 64, 64)).astype(np.float32)
    quiet = bnfast.batch_norm_forward(x)
    _kernels._next_call_threads(1)  # the next calls run on one thread
    backed_off = bnfast.batch_norm_forward(x)
    for a, b in zip(quiet, backed_off):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("bad", [1, 0, None, "yes", 1.0])
def test_set_contention_backoff_takes_a_bool(bad):
    with pytest.raises(TypeError, match="enabled must be a bool"):
        bnfast.set_contention_backoff(bad)


def _in_child(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "BNFAST_CONTENTION_BACKOFF"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={**base, **env}, timeout=120)


def test_off_by_default_and_the_environment_variable():
    code = "import bnfast; print(bnfast.get_contention_backoff())"
    assert _in_child(code).stdout.strip() == "False"
    assert _in_child(code, BNFAST_CONTENTION_BACKOFF="0").stdout.strip() == "False"
    assert _in_child(code, BNFAST_CONTENTION_BACKOFF="1").stdout.strip() == "True"
    bad = _in_child(code, BNFAST_CONTENTION_BACKOFF="maybe")
    assert bad.stdout.strip() == "False" and "BNFAST_CONTENTION_BACKOFF='maybe' ignored" in bad.stderr


def test_calls_beside_busy_processes_report_contention(two_threads):
    """Twice as many busy threads as CPUs: the OS deschedules the call's
    threads, and a call of milliseconds notices."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    x = np.random.default_rng(0).standard_normal((32, 64, 56, 56)).astype(np.float32)
    seen = False
    with busy(2 * max(cpus, 2)):
        for _ in range(40):
            bnfast.set_contention_backoff(True)  # each call runs on two threads
            bnfast.batch_norm_forward(x)
            if _kernels._next_call_threads() == 1:
                seen = True
                break
    assert seen
