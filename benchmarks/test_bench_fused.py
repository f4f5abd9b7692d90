"""Fused act(BN(x) + z) vs BN, add and ReLU as three NumPy-level ops vs PyTorch's sequence.

One group per operation and shape: ``pytest benchmarks/test_bench_fused.py``
(``--benchmark-group-by=param:case``).  The callables are those of
``benchmarks/fused.py --speed``.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnfast

SHAPES = [(32, 64, 56, 56), (8, 256, 14, 14)]


def _arrays(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    z = rng.standard_normal(shape).astype(np.float32)
    C = shape[1]
    return x, z, np.ones(C, np.float32), np.zeros(C, np.float32), np.zeros(C, np.float32), np.ones(C, np.float32)


def _callable(op, impl, shape):
    x, z, w, b, rm, rv = _arrays(shape)
    y = np.empty_like(x)
    if impl == "fused":
        if op == "forward":
            return lambda: bnfast.batch_norm_act_forward(x, w, b, rm, rv, residual=z, out=y)
        return lambda: bnfast.batch_norm_act_inference(x, rm, rv, w, b, residual=z, out=y)
    if impl == "numpy_ops":
        if op == "forward":
            return lambda: np.maximum(np.add(bnfast.batch_norm_forward(x, w, b, rm, rv, out=y)[0], z, out=y),
                                      0, out=y)
        return lambda: np.maximum(np.add(bnfast.batch_norm_inference(x, rm, rv, w, b, out=y), z, out=y), 0, out=y)
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    tx, tz = torch.from_numpy(x), torch.from_numpy(z)
    tw, tb, trm, trv = (torch.from_numpy(a.copy()) for a in (w, b, rm, rv))

    def run():
        with torch.no_grad():
            return F.relu(F.batch_norm(tx, trm, trv, tw, tb, training=op == "forward") + tz)
    return run


@pytest.mark.parametrize("impl", ["fused", "numpy_ops", "torch"])
@pytest.mark.parametrize("op", ["forward", "inference"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused(benchmark, op, impl, shape):
    benchmark.group = f"fused {op} {'x'.join(map(str, shape))}"
    benchmark(_callable(op, impl, shape))
