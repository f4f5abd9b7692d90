"""The compiled fast path: same bits as the validating path, and only for canonical calls."""

from __future__ import annotations

import numpy as np
import pytest

import bnfast
from bnfast import _kernels

SHAPES = [((8, 16), 1), ((4, 6, 5, 7), 1), ((4, 5, 7, 6), -1), ((3, 4, 2, 3, 5), 2)]


def _strided_out(x):
    """An out= the fast path declines (every other row of a larger array) but
    the kernels use with the same layout: forces the validating path."""
    return np.empty((2 * x.shape[0],) + x.shape[1:], x.dtype)[::2]


def _args(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    return x, g, w, b, np.zeros(c, dtype), np.ones(c, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_fast_path_matches_validating_path_bitwise(shape, axis, dtype):
    x, g, w, b, rm, rv = _args(shape, axis, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    fast = _kernels.try_forward_train(x, w, b, rm, rv, 0.1, 1e-5, axis)
    assert fast is not None
    slow_y = _strided_out(x)
    assert _kernels.try_forward_train(x, w, b, rm2.copy(), rv2.copy(), 0.1, 1e-5, axis, slow_y) is None
    slow = bnfast.batch_norm_forward(x, w, b, rm2, rv2, axis=axis, out=slow_y)
    for got, want in zip(fast, slow):
        assert got.dtype == x.dtype and np.array_equal(got, want)
    assert np.array_equal(rm, rm2) and np.array_equal(rv, rv2)

    y = _kernels.try_inference(x, rm, rv, w, b, 1e-5, axis)
    assert np.array_equal(y, bnfast.batch_norm_inference(x, rm, rv, w, b, axis=axis, out=_strided_out(x)))

    _, mean, invstd = fast
    for training in (True, False):
        got = _kernels.try_backward(g, x, mean, invstd, w, training, axis)
        want = bnfast.batch_norm_backward(g, x, mean, invstd, w, training=training, axis=axis, out=_strided_out(x))
        for a, b_ in zip(got, want):
            assert np.array_equal(a, b_)


def test_fast_path_declines_what_it_does_not_recognize():
    x, g, w, b, rm, rv = _args((8, 4, 3), 1, np.float32)
    declined = [
        (x.astype(np.float16), w, b, rm, rv, 0.1, 1e-5, 1),  # unsupported dtype
        (x[:, :, ::2], w, b, rm, rv, 0.1, 1e-5, 1),  # strided
        (x.tolist(), w, b, rm, rv, 0.1, 1e-5, 1),  # not an ndarray
        (x, w.astype(np.float64), b, rm, rv, 0.1, 1e-5, 1),  # weight dtype differs
        (x, w[:3], b, rm, rv, 0.1, 1e-5, 1),  # weight length
        (x, w, b, rm, None, 0.1, 1e-5, 1),  # one running buffer
        (x, w, b, rm[::-1], rv, 0.1, 1e-5, 1),  # strided buffer
        (x, w, b, rm, rv, 1.5, 1e-5, 1),  # momentum out of range
        (x, w, b, rm, rv, float("nan"), 1e-5, 1),
        (x, w, b, rm, rv, 0.1, -1.0, 1),  # negative eps
        (x, w, b, rm, rv, 0.1, float("inf"), 1),
        (x, w, b, rm, rv, 0.1, np.float32(1e-5), 1),  # not a Python float: judged by the slow path
        (x, w, b, rm, rv, 0.1, 1e-5, 3),  # axis out of range
        (x, w, b, rm, rv, 0.1, 1e-5, 1.0),  # axis not an int
        (x[:1, :, :1], w, b, rm, rv, 0.1, 1e-5, 1),  # one value per channel
        (x[:0], w, b, rm, rv, 0.1, 1e-5, 1),  # empty batch
        (x[0, 0], w, b, rm, rv, 0.1, 1e-5, 0),  # 1-D
    ]
    before = rm.copy(), rv.copy()
    for args in declined:
        assert _kernels.try_forward_train(*args) is None
    read_only = rm.copy()
    read_only.setflags(write=False)
    assert _kernels.try_forward_train(x, w, b, read_only, rv, 0.1, 1e-5, 1) is None
    assert np.array_equal(rm, before[0]) and np.array_equal(rv, before[1])
    assert _kernels.try_inference(x, rm, None, w, b, 1e-5, 1) is None
    assert _kernels.try_backward(g.astype(np.float64), x, rm, rv, w, True, 1) is None
    assert _kernels.try_backward(g[:4], x, rm, rv, w, True, 1) is None
    assert _kernels.try_backward(g, x, rm, rv, w, 1, 1) is None  # training not a bool


def test_fast_path_out_buffers():
    x, g, w, b, rm, rv = _args((8, 4, 6), 1, np.float64)
    want = bnfast.batch_norm_forward(x, w, b, rm.copy(), rv.copy())
    out = np.empty_like(x)
    got = _kernels.try_forward_train(x, w, b, rm.copy(), rv.copy(), 0.1, 1e-5, 1, out)
    assert got is not None and got[0] is out and np.array_equal(out, want[0])
    in_place = x.copy()
    got = _kernels.try_forward_train(in_place, w, b, rm.copy(), rv.copy(), 0.1, 1e-5, 1, in_place)
    assert got[0] is in_place and np.array_equal(in_place, want[0])
    grads = _kernels.try_backward(g.copy(), x, want[1], want[2], w, True, 1, None)
    g_in_place = g.copy()
    got = _kernels.try_backward(g_in_place, x, want[1], want[2], w, True, 1, g_in_place)
    assert got[0] is g_in_place and np.array_equal(g_in_place, grads[0])

    flat = np.zeros(2 * x.size)
    overlapping = flat[x.size // 2 : x.size // 2 + x.size].reshape(x.shape)
    x_in_flat = flat[: x.size].reshape(x.shape)
    x_in_flat[...] = x
    declined_outs = [
        overlapping,  # overlaps x without being x
        np.empty_like(x, dtype=np.float32),  # dtype
        np.empty((8, 4, 5)),  # shape
        np.asfortranarray(np.empty_like(x)),  # not C-contiguous
    ]
    read_only = np.empty_like(x)
    read_only.setflags(write=False)
    declined_outs.append(read_only)
    for out in declined_outs:
        assert _kernels.try_forward_train(x_in_flat, w, b, rm.copy(), rv.copy(), 0.1, 1e-5, 1, out) is None
    # the validating path still gets the overlapping case right
    y = bnfast.batch_norm_forward(x_in_flat, w, b, axis=1, out=overlapping)[0]
    assert y is overlapping
    np.testing.assert_allclose(overlapping, want[0], atol=1e-12)
