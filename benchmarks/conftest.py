"""pytest-benchmark suite for bnfast (not part of the normal test run).

Run from the repository root::

    pytest benchmarks                                  # quick subset, a few minutes
    pytest benchmarks --bnfast-suite=full              # the whole suite (long)
    pytest benchmarks --benchmark-autosave             # save a baseline under .benchmarks/
    pytest benchmarks --benchmark-json=new.json         # a run to compare
    python benchmarks/compare.py baseline.json new.json # noise-aware regression check

(README, "Tracking performance": pytest-benchmark's own --benchmark-compare-fail
rule fails on unchanged code, because sub-microsecond cases vary by tens of
percent between runs.)

Each group is one operation/shape/layout/dtype/thread-count; its members are
bnfast with out= (bnfast) and allocating its result (bnfast_alloc), the
memory-limit reference on the same arrays with the group's thread count
(roofline: bnfast._kernels.traffic, out = x, or out = x + g for backward,
streaming like the kernels), the NumPy baseline and PyTorch (when importable;
channels-last memory format for NHWC groups, same thread count).  The CPU
model, SIMD variant and cache sizes are in the report header and in the saved
machine_info["bnfast"].
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("bnfast benchmarks")
    group.addoption(
        "--bnfast-suite",
        choices=("quick", "full"),
        default="quick",
        help="quick: float32, 2 threads, 4 shapes (default); full: every shape of "
        "`python -m bnfast bench`, float32 and float64, 1 and 2 threads (long)",
    )
    group.addoption(
        "--bnfast-threads",
        default=None,
        help="comma-separated thread counts (default: 2 for quick, 1,2 for full)",
    )


def pytest_report_header(config):
    from bnfast import _bench

    return ["bnfast: " + line for line in _bench.header_lines(_bench._torch())]


def pytest_benchmark_update_machine_info(config, machine_info):
    from bnfast import _bench

    machine_info["bnfast"] = _bench.machine_info()


def pytest_configure(config):
    # keep a default run affordable: few rounds unless asked otherwise
    opt = config.option
    if getattr(opt, "benchmark_min_rounds", None) == 5:
        opt.benchmark_min_rounds = 3
    if getattr(opt, "benchmark_max_time", None) == 1.0:
        opt.benchmark_max_time = 0.25


@pytest.fixture
def bnfast_threads():
    """Restore bnfast's (and torch's) thread counts after a benchmark."""
    import bnfast

    before = bnfast.get_num_threads()
    try:
        import torch

        torch_before = torch.get_num_threads()
    except Exception:
        torch, torch_before = None, None
    yield
    bnfast.set_num_threads(before)
    if torch is not None:
        torch.set_num_threads(torch_before)
