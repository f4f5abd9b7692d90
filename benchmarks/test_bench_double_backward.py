"""batch_norm_double_backward against batch_norm_backward on the same arrays (issue 12).

Each group is one shape/layout/dtype/thread count with two members, so the
report's relative column is the double backward's cost in first backwards:

    pytest benchmarks/test_bench_double_backward.py --benchmark-columns=mean,median,rounds

``--bnfast-suite=quick`` (the default): (32, 64, 56, 56) float32, NCHW and
NHWC, 2 threads; ``--bnfast-suite=full`` adds float64 and 1 thread.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnfast
from bnfast import _bench

SHAPE = (32, 64, 56, 56)
IMPLS = ("backward", "double_backward", "double_backward_eval")


def pytest_generate_tests(metafunc):
    if "dbw_case" not in metafunc.fixturenames:
        return
    suite = metafunc.config.getoption("--bnfast-suite")
    threads_opt = metafunc.config.getoption("--bnfast-threads")
    threads = [int(t) for t in threads_opt.split(",")] if threads_opt else ([2] if suite == "quick" else [1, 2])
    dtypes = ("float32",) if suite == "quick" else ("float32", "float64")
    cases = [(layout, dt, n) for layout in ("NCHW", "NHWC") for dt in dtypes for n in threads]
    metafunc.parametrize("dbw_case", cases, ids=[f"{'x'.join(map(str, SHAPE))}-{lay}-{dt}-t{n}"
                                                 for lay, dt, n in cases])
    metafunc.parametrize("impl", IMPLS)


_DATA: dict = {}


def _data(channels_last: bool, dtype: str):
    key = (channels_last, dtype)
    if key not in _DATA:
        _DATA.clear()  # one case's arrays alive at a time
        x, g, axis = _bench._make(SHAPE, channels_last, np.dtype(dtype))
        gg = np.random.default_rng(1).standard_normal(x.shape).astype(dtype)
        _, mean, invstd = bnfast.batch_norm_forward(x, axis=axis)
        c = SHAPE[1]
        w = np.linspace(0.5, 1.5, c).astype(dtype)
        ggw, ggb = np.full(c, 0.1, dtype), np.full(c, -0.2, dtype)
        outs = (np.empty_like(x), np.empty_like(x))
        _DATA[key] = (x, g, gg, mean, invstd, w, ggw, ggb, axis, outs)
    return _DATA[key]


def test_double_backward(benchmark, bnfast_threads, dbw_case, impl):
    layout, dtype, n = dbw_case
    x, g, gg, mean, invstd, w, ggw, ggb, axis, outs = _data(layout == "NHWC", dtype)
    bnfast.set_num_threads(n)
    if impl == "backward":
        def fn():
            return bnfast.batch_norm_backward(g, x, mean, invstd, w, axis=axis, out=outs[0])
    else:
        training = impl == "double_backward"

        def fn():
            return bnfast.batch_norm_double_backward(gg, ggw, ggb, g, x, mean, invstd, w,
                                                     training=training, axis=axis, out=outs)
    benchmark.group = f"double backward {'x'.join(map(str, SHAPE))} {layout} {dtype} {n} thread(s)"
    benchmark.extra_info.update(shape=list(SHAPE), layout=layout, dtype=dtype, threads=n, impl=impl)
    benchmark(fn)
