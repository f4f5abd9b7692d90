"""The normalization family, forward and backward: bnfast vs the memory limit and PyTorch.

The cases are `bnfast._bench_family.FAMILY_SUITE` (float32; the thread
counts of ``--bnfast-threads``, default 2); each group is one member, shape,
layout and direction, with bnfast (``out=``), the roofline (the same traffic
with as many threads) and PyTorch's kernels when importable.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import bnfast
from bnfast import _bench, _bench_family

IMPLS = ("bnfast", "roofline", "torch")


def pytest_generate_tests(metafunc):
    if "family_case" not in metafunc.fixturenames:
        return
    threads_opt = metafunc.config.getoption("--bnfast-threads")
    threads = [int(t) for t in threads_opt.split(",")] if threads_opt else [2]
    cases = [
        (member, shape, layout, direction, n)
        for member, shape, layouts in _bench_family.FAMILY_SUITE
        for layout in layouts
        for direction in ("forward", "backward")
        for n in threads
    ]
    ids = [f"{m}-{'x'.join(map(str, s))}-{lay}-{d}-t{n}" for m, s, lay, d, n in cases]
    metafunc.parametrize("family_case", cases, ids=ids)
    metafunc.parametrize("impl", IMPLS)


def test_family(benchmark, bnfast_threads, family_case, impl):
    member, shape, layout, direction, n = family_case
    torch = _bench._torch() if impl == "torch" else None
    if impl == "torch" and torch is None:
        pytest.skip("PyTorch is not importable")
    if layout == "rows":
        rng = np.random.default_rng(0)
        x, g, axis = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32), -1
    else:
        x, g, axis = _bench._make(shape, layout == "NHWC", np.dtype(np.float32))
    bnfast.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    fns = _bench_family._case_fns(member, direction, x, g, axis, torch, layout == "NHWC")
    fn = fns[{"roofline": "roof"}.get(impl, impl)]
    benchmark.group = f"{member} {'x'.join(map(str, shape))} {layout} {direction} {n} thread(s)"
    benchmark.extra_info.update(member=member, shape=list(shape), layout=layout, direction=direction,
                                threads=n, impl=impl)
    with torch.no_grad() if torch is not None else contextlib.nullcontext():
        benchmark(fn)
