"""Half precision: bnfast on float32, float16 and bfloat16 copies of the same data, and PyTorch's
half-precision batch norm (float32 parameters), one group per op/shape/layout/thread count.

The issue's targets, on a tensor far beyond the cache (``--bnfast-suite=full``: 64x64x112x112):
float16/bfloat16 <= 0.6x the float32 time, and >= 2x faster than PyTorch on the same half tensors.
``python -m bnfast bench --half`` prints the same comparison as a table.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import bnfast
from bnfast import _bench, _bench_half

QUICK_SHAPES = [(16, 64, 56, 56)]
# with out= (float32, float16, bfloat16); allocating, as PyTorch does (*_alloc, against torch_*)
MEMBERS = ("float32", "float16", "bfloat16", "float16_alloc", "bfloat16_alloc", "torch_float16", "torch_bfloat16")


def pytest_generate_tests(metafunc):
    if "half_case" not in metafunc.fixturenames:
        return
    suite = metafunc.config.getoption("--bnfast-suite")
    threads_opt = metafunc.config.getoption("--bnfast-threads")
    threads = [int(t) for t in threads_opt.split(",")] if threads_opt else ([2] if suite == "quick" else [1, 2])
    shapes = _bench_half.SHAPES if suite == "full" else QUICK_SHAPES
    cases = [(op, shape, layout, cl, n) for shape in shapes for layout, cl in _bench._layouts_of(shape, _bench.LAYOUTS)
             for op in _bench_half.OPS for n in threads]
    ids = [f"{op}-{'x'.join(map(str, s))}-{lay}-t{n}" for op, s, lay, _, n in cases]
    metafunc.parametrize("half_case", cases, ids=ids)
    metafunc.parametrize("member", MEMBERS)


_DATA: dict = {}


def _data(shape, channels_last):
    key = (shape, channels_last)
    if key not in _DATA:
        _DATA.clear()  # one case's arrays alive at a time
        x, g, _ = _bench._make(shape, channels_last, np.dtype(np.float32))
        data = {"float32": (x, g)}
        data.update({name: (x.astype(dt), g.astype(dt)) for name, dt in _bench_half._half_dtypes()})
        _DATA[key] = data
    return _DATA[key]


def test_half(benchmark, bnfast_threads, half_case, member):
    op, shape, layout, channels_last, n = half_case
    with_torch = member.startswith("torch") or member.endswith("_alloc")  # _fns makes these with torch only
    torch = _bench._torch() if with_torch else None
    if with_torch and torch is None:
        pytest.skip("PyTorch is not importable")
    data = _data(shape, channels_last)
    if member.removeprefix("torch_").removesuffix("_alloc") not in data:
        pytest.skip("ml_dtypes is not installed")
    bnfast.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    fns = _bench_half._fns(op, data, -1 if channels_last else 1, torch, channels_last)
    benchmark.group = f"half {op} {'x'.join(map(str, shape))} {layout} {n} thread(s)"
    benchmark.extra_info.update(op=op, shape=list(shape), layout=layout, threads=n, member=member)
    with torch.no_grad() if torch is not None else contextlib.nullcontext():
        benchmark(fns[member])
