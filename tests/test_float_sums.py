"""The training forward's statistics and the backward's gradient sums of
float32 and half-precision data.

Tasks whose lanes sum at least 64 values each (planar tasks of 4096 values
with AVX-512) sum ``y = x - pilot`` and ``y * y`` in float
lanes over blocks of 8 and in double across the blocks (``planar_float_sums_``
and ``rows_float_sums_`` in ``kernel_body.h``), and take those sums only where
``float_sums_ok_`` bounds their error: the relative error of M2 to 117 u =
7.0e-6 (u = 2**-24) and that of the mean to 1.1e-6 deviations; everywhere else
(float overflow or underflow, NaN, constant data, a pilot far from the mean)
they sum again in double.  These tests read the statistics in float64 (the
kernel's ``stats`` output, `bnfast._variants.statistics_forward`) on shapes
whose tasks take that path, in both layouts, and check them against the exact
float64 statistics of the same values.  ``moments`` keeps double sums
throughout (its float64 state is its product): test_functional checks it to
1e-12.

The backward's sum(g) and sum(g * (x - mean)) take the same float blocks
(the saved mean, rounded to float, as the pilot) on the same tasks, each sum
within (8 + 2) u of the sum of its terms' magnitudes, and sum again in double
where a product overflows or underflows float (``grad_float_sums_ok_``); the
last section checks that bound, grad_input at offsets to 1e6, those
fallbacks, and the bits for any thread count.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnfast
from bnfast import _reference
from bnfast._variants import statistics_forward

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - optional dependency
    BF16 = None

DTYPES = [
    pytest.param(np.dtype(np.float32), id="float32"),
    pytest.param(np.dtype(np.float16), id="float16"),
    pytest.param(BF16, id="bfloat16",
                 marks=pytest.mark.skipif(BF16 is None, reason="ml_dtypes is not installed")),
]

# planar tasks of 16 x 1000 values; channels-last tasks of 16384 values over
# 64 channels (4 whole vectors in every variant) and 70 (a partial one); packed
# channels-last rows of fewer channels than a vector (periodic lanes): 3 and 4
# channels, 6 and 12 with a run that ends inside a period, and 7 (a period
# too long: per row)
LAYOUTS = [((16, 3, 40, 25), 1), ((16, 40, 25, 64), -1), ((300, 70), 1), ((8, 3, 33, 131), 1),
           ((16, 40, 25, 3), -1), ((64, 33, 4), -1), ((4001, 6), 1), ((2003, 12), 1), ((700, 7), 1)]

M2_BOUND = 117 * 2.0**-24  # relative error of the biased variance
MEAN_BOUND = 1.1e-6  # error of the mean in deviations


def _stats(x, axis):
    C = x.shape[axis]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    *_, stats = statistics_forward(x, None, None, rm, rv, momentum=0.1, eps=1e-5, axis=axis)
    return stats[0], stats[1]


def _exact(x, axis):
    x64 = np.moveaxis(x.astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
    mean = x64.mean(axis=1)
    return mean, ((x64 - mean[:, None]) ** 2).mean(axis=1)


def _check(x, axis):
    mean, var = _stats(x, axis)
    want_mean, want_var = _exact(x, axis)
    sd = np.sqrt(want_var)
    assert np.all(np.abs(mean - want_mean) <= MEAN_BOUND * sd + 1e-300), (mean, want_mean)
    assert np.all(np.abs(var - want_var) <= M2_BOUND * want_var), (var, want_var)
    return np.max(np.abs(var - want_var) / want_var)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("offset", [0.0, 10.0, 1e3])
def test_statistics_within_the_bound(dtype, shape, axis, offset):
    rng = np.random.default_rng(7)
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    _check(x, axis)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6])
def test_float32_at_large_offsets(shape, axis, offset):
    rng = np.random.default_rng(8)
    _check((offset + rng.standard_normal(shape)).astype(np.float32), axis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_outlier_in_the_pilot_sample(dtype, shape, axis):
    """A first value 60 deviations out: the pilot is a mean of several values,
    and a task whose pilot still lands far from the mean sums in double."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape)
    first = (0,) * x.ndim
    x[first] = 60.0
    _check(x.astype(dtype), axis)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_magnitudes_where_float_squares_fail(shape, axis, scale):
    """Squares that underflow or overflow float: the tasks sum in double."""
    rng = np.random.default_rng(10)
    x = (scale * rng.standard_normal(shape)).astype(np.float32)
    mean, var = _stats(x, axis)
    want_mean, want_var = _exact(x, axis)
    assert np.all(np.isfinite(var)) and np.all(var > 0)
    np.testing.assert_allclose(var, want_var, rtol=1e-12)
    np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-12 * np.sqrt(want_var).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_constant_and_nonfinite_channels(dtype, shape, axis):
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape)
    xm = np.moveaxis(x, axis, 0)  # a view: channel first
    xm[0] = 3.25  # constant: exactly its value, variance exactly 0
    xm[1].flat[xm[1].size // 2] = np.nan
    x = x.astype(dtype)
    mean, var = _stats(x, axis)
    assert mean[0] == 3.25 and var[0] == 0.0
    assert np.isnan(mean[1]) and np.isnan(var[1])
    want_mean, want_var = _exact(x, axis)
    sd = np.sqrt(want_var[2:])
    assert np.all(np.abs(mean[2:] - want_mean[2:]) <= MEAN_BOUND * sd)
    assert np.all(np.abs(var[2:] - want_var[2:]) <= M2_BOUND * want_var[2:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_for_any_thread_count(dtype):
    data = [((5.0 + np.random.default_rng(12).standard_normal(shape)).astype(dtype), axis)
            for shape, axis in LAYOUTS]
    results = []
    for threads in (1, 2, 3):
        bnfast.set_num_threads(threads)
        results.append(np.concatenate([np.concatenate(_stats(x, axis)) for x, axis in data]))
    for other in results[1:]:
        assert np.array_equal(results[0], other)


# ------------------------------------------------------------ gradient sums

# The backward's sum(g) and sum(g * (x - mean)) in the same float blocks
# (grad_sums_planar_, grad_sums_rows_): each off by at most (BN_FLUSH + 2) u
# of the sum of its terms' magnitudes, or summed again in double where a
# product overflows or underflows float (grad_float_sums_ok_).
GRAD_SUMS_BOUND = 10 * 2.0**-24


def _grad_data(shape, axis, dtype, offset=0.0, scale=1.0, gscale=1.0, seed=13):
    rng = np.random.default_rng(seed)
    x = (offset + scale * rng.standard_normal(shape)).astype(dtype)
    # a gradient with a mean (sum(g) cancels less than fully) and a part
    # correlated with x (so does sum(g * xhat))
    xs = np.moveaxis(x.astype(np.float64), axis, 0)
    xs = (xs - xs.mean(axis=tuple(range(1, xs.ndim)), keepdims=True)) / scale
    g = gscale * (0.3 + rng.standard_normal(shape) + 0.5 * np.moveaxis(xs, 0, axis))
    return x, g.astype(dtype)


def _channels(a, axis):
    return np.moveaxis(np.asarray(a, np.float64), axis, 0).reshape(a.shape[axis], -1)


def _grad_check(g, x, axis):
    """grad_bias and grad_weight against the exact sums of the same values
    (save_mean and save_invstd as given), within the bound plus their
    rounding to float32; returns the largest error in units of the bound."""
    C = x.shape[axis]
    x32 = x.astype(np.float32)
    _, mean, invstd = bnfast.batch_norm_forward(x32, axis=axis)
    gi, gw, gb = bnfast.batch_norm_backward(g, x, mean, invstd, np.ones(C, np.float32), axis=axis)
    g64, y = _channels(g, axis), _channels(x, axis) - mean.astype(np.float64)[:, None]
    inv = invstd.astype(np.float64)
    want_gb, want_gw = g64.sum(axis=1), inv * (g64 * y).sum(axis=1)
    tol_gb = GRAD_SUMS_BOUND * np.abs(g64).sum(axis=1)
    tol_gw = inv * GRAD_SUMS_BOUND * np.abs(g64 * y).sum(axis=1)
    err_gb = np.abs(gb - want_gb) - np.spacing(np.abs(want_gb).astype(np.float32))
    err_gw = np.abs(gw - want_gw) - np.spacing(np.abs(want_gw).astype(np.float32))
    assert np.all(err_gb <= tol_gb), (gb, want_gb)
    assert np.all(err_gw <= tol_gw), (gw, want_gw)
    return max(np.max(err_gb / tol_gb), np.max(err_gw / tol_gw)), gi, mean, invstd


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("offset", [0.0, 10.0, 1e3])
def test_gradient_sums_within_the_bound(dtype, shape, axis, offset):
    _grad_check(*_grad_data(shape, axis, dtype, offset)[::-1], axis)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6])
def test_float32_gradients_at_large_offsets(shape, axis, offset):
    """The sums within their bound, and grad_input within 4 ulp (of
    max(|ref|, 1/8), as for the forward) plus what the sums' bound passes on:
    invstd |w| (bound mean|g| + |xhat| invstd bound mean|g y|)."""
    x, g = _grad_data(shape, axis, np.float32, offset)
    _, gi, mean, invstd = _grad_check(g, x, axis)
    C = x.shape[axis]
    w = np.ones(C, np.float32)
    want = _reference.batch_norm_backward(g, x, mean, invstd, w, axis=axis)[0]
    g64, y = _channels(g, axis), _channels(x, axis) - mean.astype(np.float64)[:, None]
    inv = invstd.astype(np.float64)[:, None]
    n = g64.shape[1]
    passed_on = inv * (GRAD_SUMS_BOUND * np.abs(g64).sum(1, keepdims=True) / n
                       + np.abs(y * inv) * inv * GRAD_SUMS_BOUND * np.abs(g64 * y).sum(1, keepdims=True) / n)
    err = np.abs(_channels(gi, axis) - _channels(want, axis))
    spacing = np.spacing(np.maximum(np.abs(_channels(want, axis)).astype(np.float32), np.float32(0.125)))
    assert np.all(err <= 4 * spacing + passed_on)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("scale,gscale", [(1e30, 1e30), (1e20, 1e25), (1e-20, 1e-25), (1e-30, 1e-10)])
def test_gradient_products_that_fail_in_float(shape, axis, scale, gscale):
    """Products g * (x - mean) that overflow or underflow float: the tasks sum
    in double, and grad_weight keeps float64's accuracy of the same values
    (eps = 0: invstd of the data's own scale, grad_weight a normal float)."""
    x, g = _grad_data(shape, axis, np.float32, scale=scale, gscale=gscale)
    C = x.shape[axis]
    _, mean, invstd = bnfast.batch_norm_forward(x, eps=0.0, axis=axis)
    _, gw, gb = bnfast.batch_norm_backward(g, x, mean, invstd, np.ones(C, np.float32), axis=axis)
    g64, y = _channels(g, axis), _channels(x, axis) - mean.astype(np.float64)[:, None]
    assert np.all(np.isfinite(gw)) and np.all(np.isfinite(gb))
    np.testing.assert_allclose(gw, invstd.astype(np.float64) * (g64 * y).sum(axis=1), rtol=2e-7)
    np.testing.assert_allclose(gb, g64.sum(axis=1), rtol=2e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_zero_and_nonfinite_gradient_channels(dtype, shape, axis):
    x, g = _grad_data(shape, axis, np.float64)
    gm = np.moveaxis(g, axis, 0)  # a view: channel first
    gm[0] = 0.0  # exactly zero sums
    gm[1].flat[gm[1].size // 3] = np.nan
    gm[2].flat[gm[2].size // 2] = np.inf
    x, g = x.astype(dtype), g.astype(dtype)
    C = x.shape[axis]
    _, mean, invstd = bnfast.batch_norm_forward(x, axis=axis)
    _, gw, gb = bnfast.batch_norm_backward(g, x, mean, invstd, np.ones(C, np.float32), axis=axis)
    assert gw[0] == 0.0 and gb[0] == 0.0
    assert np.isnan(gw[1]) and np.isnan(gb[1])
    assert not np.isfinite(gw[2]) and gb[2] == np.inf
    assert np.all(np.isfinite(gw[3:])) and np.all(np.isfinite(gb[3:]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_same_bits_for_any_thread_count(dtype):
    data = [_grad_data(shape, axis, dtype, 5.0) + (axis,) for shape, axis in LAYOUTS]
    results = []
    for threads in (1, 2, 3):
        bnfast.set_num_threads(threads)
        out = []
        for x, g, axis in data:
            C = x.shape[axis]
            _, mean, invstd = bnfast.batch_norm_forward(x, axis=axis)
            for training in (True, False):
                gi, gw, gb = bnfast.batch_norm_backward(g, x, mean, invstd, np.ones(C, np.float32),
                                                        training=training, axis=axis)
                out += [gi.astype(np.float64).ravel(), gw, gb]
        results.append(np.concatenate(out))
    for other in results[1:]:
        assert np.array_equal(results[0], other)
