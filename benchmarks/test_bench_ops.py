"""Train-forward, inference and backward: bnfast vs the memory limit, NumPy and PyTorch."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import bnfast
from bnfast import _bench

QUICK_SHAPES = [(32, 64, 28, 28), (1, 64, 56, 56), (256, 1024), (8, 16)]
# bnfast: with out= (no allocation); bnfast_alloc: allocating its result, like numpy and torch;
# roofline: the same traffic with as many threads (bnfast._kernels.traffic)
IMPLS = ("bnfast", "bnfast_alloc", "roofline", "numpy", "torch")


def _cases(suite: str, threads):
    shapes = _bench.SUITE if suite == "full" else QUICK_SHAPES
    dtypes = _bench.DTYPES if suite == "full" else ("float32",)
    for shape in shapes:
        for layout, channels_last in _bench._layouts_of(shape, _bench.LAYOUTS):
            for dtype in dtypes:
                for op in _bench.OPS:
                    for n in threads:
                        yield op, shape, layout, channels_last, dtype, n


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    suite = metafunc.config.getoption("--bnfast-suite")
    threads_opt = metafunc.config.getoption("--bnfast-threads")
    threads = [int(t) for t in threads_opt.split(",")] if threads_opt else ([2] if suite == "quick" else [1, 2])
    cases = list(_cases(suite, threads))
    ids = [f"{op}-{'x'.join(map(str, s))}-{lay}-{dt}-t{n}" for op, s, lay, _, dt, n in cases]
    metafunc.parametrize("case", cases, ids=ids)
    metafunc.parametrize("impl", IMPLS)


_DATA: dict = {}


def _data(shape, channels_last, dtype):
    key = (shape, channels_last, dtype)
    if key not in _DATA:
        _DATA.clear()  # keep one case's arrays alive at a time
        _DATA[key] = _bench._make(shape, channels_last, np.dtype(dtype))
    return _DATA[key]


def test_op(benchmark, bnfast_threads, case, impl):
    op, shape, layout, channels_last, dtype, n = case
    torch = _bench._torch() if impl == "torch" else None
    if impl == "torch" and torch is None:
        pytest.skip("PyTorch is not importable")
    x, g, axis = _data(shape, channels_last, dtype)
    bnfast.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    fns = _bench._case_fns(op, x, g, axis, torch, channels_last)
    names = {"bnfast": "bnfast", "bnfast_alloc": "bnfast_alloc", "roofline": "roof", "numpy": "numpy", "torch": "torch"}
    fn = fns[names[impl]]
    benchmark.group = f"{op} {'x'.join(map(str, shape))} {layout} {dtype} {n} thread(s)"
    benchmark.extra_info.update(op=op, shape=list(shape), layout=layout, dtype=dtype, threads=n, impl=impl)
    ctx = torch.no_grad() if torch is not None else contextlib.nullcontext()
    with ctx:
        benchmark(fn)
