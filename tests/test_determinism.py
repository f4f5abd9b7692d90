"""Bit-identical results for any thread count, with or without streaming stores.

The kernels split work on a grid that depends only on the shape and merge
partial results in a fixed order, so 1, 2, 3 or 4 threads -- and every SIMD
variant's own results -- must agree to the last bit, for every op, layout and
dtype, including the shapes of the performance suite (some scaled down).
Streaming (non-temporal) stores change how an output is written, never its
value: forcing them on for every output must not change a bit either.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnfast
from bnfast import _kernels

THREADS = (1, 2, 3, 4)
_SHORT = {"AVX2+FMA": "avx2", "AVX-512": "avx512"}  # simd_in_use() -> select_isa() name


@pytest.fixture(params=["baseline", "avx2", "avx512"])
def isa(request):
    """Run the test with each kernel variant this CPU and build have."""
    if request.param not in _kernels.simd_available():
        pytest.skip(f"{request.param} kernels are not available on this CPU or build")
    before = _SHORT.get(_kernels.simd_in_use(), "baseline")
    _kernels.select_isa(request.param)
    yield request.param
    _kernels.select_isa(before)

# (NCHW-order shape, layout); NHWC arrays are the channels-last transpose.
SHAPES = [
    ((32, 64, 28, 28), "NCHW"),
    ((32, 64, 28, 28), "NHWC"),
    ((8, 64, 56, 56), "NCHW"),  # suite (32,64,56,56), scaled down
    ((8, 64, 56, 56), "NHWC"),
    ((2, 64, 112, 112), "NCHW"),  # suite (64,64,112,112), scaled down
    ((2, 64, 112, 112), "NHWC"),
    ((16, 256, 14, 14), "NCHW"),  # suite (128,256,14,14), scaled down
    ((16, 256, 14, 14), "NHWC"),
    ((4, 3, 224, 224), "NCHW"),  # fewer channels than threads
    ((4, 3, 224, 224), "NHWC"),
    ((1, 64, 56, 56), "NCHW"),
    ((1, 64, 56, 56), "NHWC"),
    ((256, 1024), "NC"),
    ((4096, 64), "NC"),
    ((8, 16), "NC"),
    ((2, 32, 16, 28, 28), "NCHW"),
    ((2, 32, 16, 28, 28), "NHWC"),
    ((3, 1500, 70), "NCHW"),  # odd sizes: vector tails everywhere
    ((70001, 3), "NC"),
    ((2, 1, 100003), "NCHW"),  # one long run split into segments
    ((5, 1029, 3), "NHWC"),  # more channels than a tile
    ((40, 256, 14, 14), "NCHW"),  # short runs: streamed spans across channels
    ((40, 256, 14, 14), "NHWC"),
    ((3, 40, 17, 13), "NCHW"),  # odd runs: streamed lines straddle channels, unaligned rows
    ((7, 5, 11, 45), "NHWC"),
]


@pytest.fixture
def stream_threshold():
    """Restore the streaming threshold after the test."""
    before = _kernels.stream_threshold()
    yield _kernels.set_stream_threshold
    _kernels.set_stream_threshold(before)


def _layout(x: np.ndarray, layout: str):
    if layout == "NHWC":
        return np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1
    return x, 1


def _all_outputs(x, g, w, b, axis):
    C = x.shape[axis]
    rm = np.linspace(-1, 1, C).astype(x.dtype)
    rv = np.linspace(0.5, 2, C).astype(x.dtype)
    y, mean, invstd = bnfast.batch_norm_forward(x, w, b, rm, rv, axis=axis)
    yi = bnfast.batch_norm_inference(x, rm, rv, w, b, axis=axis)
    gi, gw, gb = bnfast.batch_norm_backward(g, x, mean, invstd, w, axis=axis)
    ge, gwe, gbe = bnfast.batch_norm_backward(g, x, mean, invstd, w, training=False, axis=axis)
    m = bnfast.moments(x, axis=axis)
    return [y, mean, invstd, rm, rv, yi, gi, gw, gb, ge, gwe, gbe, m.count, m.mean, m.m2]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,layout", SHAPES, ids=[f"{s}-{l}" for s, l in SHAPES])
def test_bit_identical_across_thread_counts(shape, layout, dtype, isa, stream_threshold):
    rng = np.random.default_rng(sum(shape))
    x, axis = _layout((rng.standard_normal(shape) * 2 + 3).astype(dtype), layout)
    g, _ = _layout(rng.standard_normal(shape).astype(dtype), layout)
    C = x.shape[axis]
    w = rng.standard_normal(C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    results = {}
    stream_threshold(2**62)  # no streaming stores
    for n in THREADS:
        bnfast.set_num_threads(n)
        results[n] = _all_outputs(x, g, w, b, axis)
    stream_threshold(0)  # streaming stores wherever the kernels can use them
    for n in (1, 3):
        bnfast.set_num_threads(n)
        results[f"{n} streamed"] = _all_outputs(x, g, w, b, axis)
    names = "y mean invstd rm rv yi gi gw gb ge gwe gbe count mmean m2".split()
    for n in list(results)[1:]:
        for name, a, ref in zip(names, results[n], results[1]):
            assert np.array_equal(a, ref, equal_nan=True), f"{name} differs with {n} threads vs 1"


def test_bit_identical_with_large_offset_and_strided_input(isa):
    rng = np.random.default_rng(7)
    base = (1e5 + rng.standard_normal((6, 40, 33, 29))).astype(np.float32)
    x = base[:, ::2, :, ::-1]  # strided, negative strides
    g = rng.standard_normal(x.shape).astype(np.float32)
    w, b = np.ones(20, np.float32), np.zeros(20, np.float32)
    results = []
    for n in THREADS:
        bnfast.set_num_threads(n)
        results.append(_all_outputs(x, g, w, b, 1))
    for other in results[1:]:
        for a, ref in zip(other, results[0]):
            assert np.array_equal(a, ref, equal_nan=True)


def test_same_isa_selection_is_stable():
    """Selecting the same variant twice gives the same bits (no hidden state)."""
    x = np.random.default_rng(1).standard_normal((16, 32, 20, 20)).astype(np.float32)
    before = _kernels.simd_in_use()
    try:
        for name in _kernels.simd_available():
            _kernels.select_isa(name)
            first = bnfast.batch_norm_forward(x)[0]
            _kernels.select_isa(name)
            bnfast.set_num_threads(3)
            assert np.array_equal(bnfast.batch_norm_forward(x)[0], first)
    finally:
        _kernels.select_isa(_SHORT.get(before, "baseline"))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_streamed_outputs_match_reference(layout, stream_threshold):
    """Outputs past the streaming threshold (whole-line stores, spans over
    channels) agree with the float64 reference, with out= aliasing the input."""
    from bnfast import _reference

    stream_threshold(1 << 20)  # the (40, 256, 14, 14) float32 outputs are 8 MB
    rng = np.random.default_rng(3)
    x, axis = _layout((rng.standard_normal((40, 256, 14, 14)) * 2 + 3).astype(np.float32), layout)
    g, _ = _layout(rng.standard_normal((40, 256, 14, 14)).astype(np.float32), layout)
    C = x.shape[axis]
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    y, mean, invstd = bnfast.batch_norm_forward(x, w, b, axis=axis)
    ry, _, _, _, _ = _reference.batch_norm_forward(x, w, b, axis=axis)
    np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
    gi, _, _ = bnfast.batch_norm_backward(g, x, mean, invstd, w, axis=axis)
    rgi, _, _ = _reference.batch_norm_backward(g, x, mean, invstd, w, axis=axis)
    np.testing.assert_allclose(gi, rgi, rtol=1e-4, atol=1e-5)
    g2 = g.copy()
    bnfast.batch_norm_backward(g2, x, mean, invstd, w, axis=axis, out=g2)  # in place
    np.testing.assert_array_equal(g2, gi)
    x2 = x.copy()
    bnfast.batch_norm_forward(x2, w, b, axis=axis, out=x2)
    np.testing.assert_array_equal(x2, y)


@pytest.mark.parametrize("channels", [3, 16, 31, 32, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_spans_match_rows(channels, dtype):
    """Contiguous channels-last rows of few channels are applied several rows
    per span (inference, backward with given statistics, fused activation);
    rows with a gap between them go row by row: the same bits, element for
    element.  The batch statistics agree to rounding (packed rows of fewer
    channels than a vector sum in periodic lanes, strided ones per row)."""
    rng = np.random.default_rng(channels)
    wide = (rng.standard_normal((4096, channels + 1)) * 3 + 1).astype(dtype)
    g_wide = rng.standard_normal((4096, channels + 1)).astype(dtype)
    strided, g_strided = wide[:, :channels], g_wide[:, :channels]
    dense, g_dense = np.ascontiguousarray(strided), np.ascontiguousarray(g_strided)
    w = rng.uniform(0.5, 2, channels).astype(dtype)
    b = rng.standard_normal(channels).astype(dtype)
    rm = rng.standard_normal(channels).astype(dtype)
    rv = rng.uniform(0.5, 2, channels).astype(dtype)
    invstd = (1 / np.sqrt(rv.astype(np.float64) + 1e-5)).astype(dtype)
    applied, batch = [], []
    for x, g in ((dense, g_dense), (strided, g_strided)):
        y = bnfast.batch_norm_inference(x, rm, rv, w, b, axis=-1)
        gi = bnfast.batch_norm_backward(g, x, rm, invstd, w, training=False, axis=-1)[0]
        ya = bnfast.batch_norm_act_inference(x, rm, rv, w, b, activation="relu", residual=g, axis=-1)
        applied.append([y, gi, ya])
        y, mean, invstd_b = bnfast.batch_norm_forward(x, w, b, axis=-1)
        batch.append([y, mean, invstd_b, *bnfast.batch_norm_backward(g, x, mean, invstd_b, w, axis=-1)])
    for a, b_ in zip(*applied):
        assert a.dtype == b_.dtype and np.array_equal(a, b_)
    tol = 2e-6 if dtype == np.float32 else 1e-13
    for a, b_ in zip(*batch):
        assert a.dtype == b_.dtype
        np.testing.assert_allclose(a, b_, rtol=tol, atol=tol)
