"""Numerical robustness: large offsets, constant channels, NaN/Inf isolation, huge values."""

from __future__ import annotations

import numpy as np
import pytest

import bnfast
from bnfast import _reference as ref

EPS = 1e-5
F32_U = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32


def per_channel(v, axis, ndim):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v).reshape(shape)


def take(a, c, axis):
    """Channel c of a, as a view (channel axis dropped)."""
    idx = [slice(None)] * a.ndim
    idx[axis] = c
    return a[tuple(idx)]


def others(a, c, axis):
    """Every channel of a except c (channel axis kept)."""
    idx = [i for i in range(a.shape[axis]) if i != c]
    return np.take(a, idx, axis=axis)


# --------------------------------------------------------------------------- large offset

LARGE = [
    pytest.param((64, 16, 32, 32), 1, id="NCHW"),
    pytest.param((64, 32, 32, 16), -1, id="NHWC"),
]


@pytest.fixture(scope="module", params=[1e4, 1e5], ids=["1e4", "1e5"])
def offset(request):
    return request.param


@pytest.mark.parametrize("shape,axis", LARGE)
def test_large_offset_variance_accuracy(shape, axis, offset):
    rng = np.random.default_rng(20)
    x = (offset + rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    count, mean64, m2 = ref.moments(x, axis=axis)  # float64 two-pass of the same float32 data
    var64 = m2 / count

    # 1) the public Welford state
    m = bnfast.moments(x, axis=axis)
    assert np.array_equal(m.count, count)
    rel = np.abs(m.var() - var64) / var64
    assert rel.max() <= 1e-5, f"moments variance relative error {rel.max():.3g}"
    np.testing.assert_allclose(m.mean, mean64, rtol=1e-9)

    # 2) the training forward: variance recovered from save_invstd in float64
    c = shape[axis]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y, save_mean, save_invstd = bnfast.batch_norm_forward(x, None, None, rm, rv, momentum=1.0,
                                                          axis=axis)
    var_fwd = 1.0 / save_invstd.astype(np.float64) ** 2 - EPS
    rel = np.abs(var_fwd - var64) / var64
    assert rel.max() <= 1e-5, f"forward variance relative error {rel.max():.3g}"
    # mean: within a float32 rounding of the exact mean
    assert np.all(np.abs(save_mean.astype(np.float64) - mean64) <= 2 * F32_U * np.abs(mean64))
    # running_var (momentum 1: the unbiased batch variance), stored in float32
    n = count[0]
    rel = np.abs(rv.astype(np.float64) - var64 * n / (n - 1)) / var64
    assert rel.max() <= 1e-5, f"running_var relative error {rel.max():.3g}"

    # 3) outputs: error no worse than a few float32 roundings of x, scaled to the output
    want_y = ref.batch_norm_forward(x, axis=axis)[0]
    invstd64 = 1.0 / np.sqrt(var64 + EPS)
    bound = 4 * F32_U * (offset + 10) * per_channel(invstd64, axis, x.ndim) + 1e-6
    err = np.abs(y.astype(np.float64) - want_y)
    assert (err <= bound).all(), f"y error {err.max():.3g} > {bound.max():.3g}"
    # and the normalized output really is normalized
    yy = y.astype(np.float64)
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    assert np.abs(yy.mean(axis=red)).max() < 1e-3
    assert np.abs(yy.var(axis=red) - var64 / (var64 + EPS)).max() < 1e-3


# --------------------------------------------------------------------------- constant channel

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((8, 5, 6, 7), 1), ((8, 6, 7, 5), -1), ((40, 5), 1),
                                        ((3, 5, 1000), 1), ((1000, 5), -1)])
@pytest.mark.parametrize("value", [0.0, 3.7, -1234.5678, 1e4 + 0.1, 1e-30])
def test_constant_channel_gives_exactly_bias(shape, axis, dtype, value):
    rng = np.random.default_rng(21)
    x = rng.standard_normal(shape).astype(dtype)
    take(x, 2, axis)[...] = dtype(value)
    c = shape[axis]
    w = rng.uniform(0.5, 2.0, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    for weight in (w, None):
        y, save_mean, save_invstd = bnfast.batch_norm_forward(x, weight, b, axis=axis)
        assert np.array_equal(take(y, 2, axis), np.full(take(y, 2, axis).shape, b[2], dtype)), \
            "constant channel is not exactly its bias"
        assert save_mean[2] == dtype(value)
        np.testing.assert_allclose(save_invstd[2], 1.0 / np.sqrt(EPS),
                                   rtol=2 * np.finfo(dtype).eps)
    # no bias: exactly zero
    y, _, _ = bnfast.batch_norm_forward(x, w, None, axis=axis)
    assert np.array_equal(take(y, 2, axis), np.zeros(take(y, 2, axis).shape, dtype))
    # the other channels are unaffected by the constant one
    want = ref.batch_norm_forward(x, w, b, axis=axis)[0]
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(others(bnfast.batch_norm_forward(x, w, b, axis=axis)[0], 2, axis),
                               others(want, 2, axis), rtol=tol, atol=tol * 10)
    # inference with a channel's own statistics: also exactly bias
    m = bnfast.moments(x, axis=axis)
    assert m.m2[2] == 0.0 and m.mean[2] == float(dtype(value))


# --------------------------------------------------------------------------- NaN / Inf isolation

BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
NAN_LAYOUTS = [((6, 4, 9, 11), 1), ((6, 9, 11, 4), -1), ((50, 4), 1), ((3, 4, 2000), 1),
               ((2000, 4), -1), ((16, 4, 32, 32), 1), ((16, 32, 32, 4), -1)]


def _poison(shape, axis, dtype, kind, seed, where="one"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    ch = take(x, 1, axis)  # a view into x
    n = ch.size
    pos = {"one": [n // 3], "first": [0], "last": [n - 1], "many": list(range(0, n, 7))}[where]
    for p in pos:
        ch[np.unravel_index(p, ch.shape)] = BAD[kind]
    assert (~np.isfinite(x)).sum() == len(pos)
    return x


def _finite_check(got, want, axis, dtype, what, bad_channel=1):
    ok_got, ok_want = others(got, bad_channel, axis), others(want, bad_channel, axis)
    assert np.isfinite(ok_got).all(), f"{what}: non-finite values leaked into other channels"
    tol = 1e-4 if dtype == np.float32 else 1e-10
    scale = max(1.0, float(np.abs(ok_want).max())) if ok_want.size else 1.0
    np.testing.assert_allclose(ok_got.astype(np.float64), ok_want, rtol=tol, atol=tol * scale,
                               err_msg=what)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the float64 reference
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", NAN_LAYOUTS)
@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("where", ["one", "first", "last", "many"])
@pytest.mark.parametrize("threads", [1, 2])
def test_nonfinite_input_stays_in_its_channel(shape, axis, dtype, kind, where, threads):
    bnfast.set_num_threads(threads)
    x = _poison(shape, axis, dtype, kind, seed=22, where=where)
    c = shape[axis]
    rng = np.random.default_rng(23)
    w = rng.uniform(0.5, 2.0, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    want = ref.batch_norm_forward(x, w, b, rm, rv, axis=axis)

    with np.errstate(all="ignore"):
        y, sm, si = bnfast.batch_norm_forward(x, w, b, rm, rv, axis=axis)
    assert np.isnan(take(y, 1, axis)).all(), "forward y of the poisoned channel is not all NaN"
    assert not np.isfinite(sm[1]) and np.isnan(si[1])
    assert np.isnan(rv[1]) and not np.isfinite(rm[1])
    _finite_check(y, want[0], axis, dtype, "forward y")
    _finite_check(sm, want[1], 0, dtype, "save_mean")
    _finite_check(si, want[2], 0, dtype, "save_invstd")
    _finite_check(rm, want[3], 0, dtype, "running_mean")
    _finite_check(rv, want[4], 0, dtype, "running_var")

    # moments
    m = bnfast.moments(x, axis=axis)
    assert not np.isfinite(m.mean[1]) or not np.isfinite(m.m2[1])
    assert np.isnan(m.var()[1])
    cnt, mean, m2 = ref.moments(x, axis=axis)
    assert np.array_equal(m.count, cnt)
    _finite_check(m.mean, mean, 0, np.float64, "moments.mean")
    _finite_check(m.m2, m2, 0, np.float64, "moments.m2")

    # backward: the poisoned channel's statistics are NaN; other channels unaffected
    for training in (True, False):
        gw_want = ref.batch_norm_backward(g, x, sm, si, w, training=training, axis=axis)
        with np.errstate(all="ignore"):
            gi, gw, gb = bnfast.batch_norm_backward(g, x, sm, si, w, training=training, axis=axis)
        assert np.isnan(take(gi, 1, axis)).all()
        assert np.isnan(gw[1])
        _finite_check(gi, gw_want[0], axis, dtype, f"grad_input training={training}")
        _finite_check(gw, gw_want[1], 0, dtype, f"grad_weight training={training}")
        # grad_bias = sum(grad_out) does not involve x: finite and right in every channel
        np.testing.assert_allclose(gb, gw_want[2], rtol=1e-4 if dtype == np.float32 else 1e-10,
                                   atol=1e-3 if dtype == np.float32 else 1e-9)

    # inference: a non-finite input element only affects its own output element's channel
    with np.errstate(all="ignore"):
        yi = bnfast.batch_norm_inference(x, np.zeros(c, dtype), np.ones(c, dtype), w, b,
                                         axis=axis)
    wi = ref.batch_norm_inference(x, np.zeros(c), np.ones(c), w, b, axis=axis)
    _finite_check(yi, wi, axis, dtype, "inference")
    assert np.array_equal(np.isfinite(yi), np.isfinite(wi))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the float64 reference
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", NAN_LAYOUTS[:3])
@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("training", [True, False])
def test_nonfinite_grad_out_stays_in_its_channel(shape, axis, dtype, kind, training):
    rng = np.random.default_rng(24)
    x = rng.standard_normal(shape).astype(dtype)
    g = _poison(shape, axis, dtype, kind, seed=25)
    c = shape[axis]
    w = rng.uniform(0.5, 2.0, c).astype(dtype)
    _, sm, si, _, _ = ref.batch_norm_forward(x, axis=axis)
    sm, si = sm.astype(dtype), si.astype(dtype)
    want = ref.batch_norm_backward(g, x, sm, si, w, training=training, axis=axis)
    with np.errstate(all="ignore"):
        gi, gw, gb = bnfast.batch_norm_backward(g, x, sm, si, w, training=training, axis=axis)
    assert not np.isfinite(gw[1]) and not np.isfinite(gb[1])
    if training:
        # every element depends on the channel's sums (one of them +-inf): NaN or +-inf
        assert not np.isfinite(take(gi, 1, axis)).any()
    else:
        assert np.array_equal(np.isfinite(gi), np.isfinite(want[0]))
    _finite_check(gi, want[0], axis, dtype, "grad_input")
    _finite_check(gw, want[1], 0, dtype, "grad_weight")
    _finite_check(gb, want[2], 0, dtype, "grad_bias")


# --------------------------------------------------------------------------- huge magnitudes

@pytest.mark.parametrize("spread", [1e18, 1e30], ids=["1e18", "1e30"])
@pytest.mark.parametrize("shape,axis", [((8, 6, 16, 16), 1), ((8, 16, 16, 6), -1), ((4000, 6), 1)])
def test_huge_magnitudes_float32(shape, axis, spread):
    """float32 data whose squares (and sums of squares) overflow float32."""
    rng = np.random.default_rng(26)
    c = shape[axis]
    x64 = rng.standard_normal(shape) * spread
    x64 += per_channel(np.linspace(-2, 2, c) * spread, axis, len(shape))
    x = x64.astype(np.float32)
    assert np.isfinite(x).all()
    w = rng.uniform(0.5, 2.0, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    want_y, want_m, want_s, want_rm, want_rv = ref.batch_norm_forward(x, w, b, rm, rv, axis=axis)

    y, sm, si = bnfast.batch_norm_forward(x, w, b, rm, rv, axis=axis)
    for name, got in (("y", y), ("save_mean", sm), ("save_invstd", si), ("running_mean", rm)):
        assert np.isfinite(got).all(), f"{name} not finite"
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sm, want_m, rtol=1e-5)
    np.testing.assert_allclose(si, want_s, rtol=1e-5)
    assert si.min() > 0
    np.testing.assert_allclose(rm, want_rm, rtol=1e-5)
    # running_var ~ 0.1 * spread**2: beyond float32's range (inf) when spread = 1e30
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(rv, want_rv.astype(np.float32), rtol=1e-5)

    m = bnfast.moments(x, axis=axis)
    cnt, mean, m2 = ref.moments(x, axis=axis)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-12, atol=1e-12 * spread)
    np.testing.assert_allclose(m.m2, m2, rtol=1e-10)

    g = rng.standard_normal(shape).astype(np.float32)
    sm64, si64 = want_m.astype(np.float32), want_s.astype(np.float32)
    for training in (True, False):
        want = ref.batch_norm_backward(g, x, sm64, si64, w, training=training, axis=axis)
        gi, gw, gb = bnfast.batch_norm_backward(g, x, sm64, si64, w, training=training, axis=axis)
        assert np.isfinite(gi).all() and np.isfinite(gw).all() and np.isfinite(gb).all()
        scale = np.abs(want[0]).max()
        np.testing.assert_allclose(gi, want[0], rtol=1e-4, atol=1e-4 * scale)
        np.testing.assert_allclose(gw, want[1], rtol=1e-4, atol=1e-4 * np.abs(want[1]).max())
        np.testing.assert_allclose(gb, want[2], rtol=1e-4, atol=1e-4 * np.abs(want[2]).max())

    # inference with float32 running statistics of that magnitude
    rvar = (want_s.astype(np.float64) ** -2)  # ~spread**2: overflows float32 when spread=1e30
    if rvar.max() < np.finfo(np.float32).max:
        yi = bnfast.batch_norm_inference(x, want_m.astype(np.float32), rvar.astype(np.float32),
                                         w, b, axis=axis)
        np.testing.assert_allclose(yi, want_y, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("axis,shape", [(1, (64, 8, 100)), (-1, (64, 100, 8))])
def test_tiny_spread_float32(axis, shape):
    """Spread far below sqrt(eps): var + eps is dominated by eps, outputs are tiny but right."""
    rng = np.random.default_rng(27)
    x = (1.0 + 1e-6 * rng.standard_normal(shape)).astype(np.float32)
    y, sm, si = bnfast.batch_norm_forward(x, axis=axis)
    want = ref.batch_norm_forward(x, axis=axis)
    np.testing.assert_allclose(si, want[2], rtol=1e-5)
    np.testing.assert_allclose(y, want[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- output rounding (issue 9)

ULP_FLOOR = np.float32(0.125)


def _ulps(got, want64):
    """Distance of float32 results from the float64 reference rounded to
    float32, in units in the last place of that rounded reference (of
    ULP_FLOOR for references smaller than that)."""
    want = want64.astype(np.float32)
    return np.abs(got.astype(np.float64) - want) / np.spacing(np.maximum(np.abs(want), ULP_FLOOR))


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4, 1e5, 1e6])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("affine", ["none", "weight"])
def test_float32_outputs_within_3_ulp_of_the_rounded_reference(offset, axis, affine):
    """The apply phase computes in float32 on the centred form with the mean
    as a float pair: outputs stay within 3 ulp of the exact float64 result
    rounded to float32 at offsets to 1e6 (measured: 2, over 20 seeds).  The ulp is that of
    max(|y|, 1/8): the pair carries the mean to 2**-48 of its size, an
    absolute error of ~0.06 ulp(1) at offset 1e6 / spread 1, which is many
    ulps of an output very close to 0.  A bias is left out: an output that
    cancels against it has no meaningful ulp bound either."""
    rng = np.random.default_rng(int(offset) % 97)
    shape = (8, 24, 9, 11) if axis == 1 else (8, 9, 11, 24)
    x = (offset + rng.standard_normal(shape)).astype(np.float32)
    c = x.shape[axis]
    w = rng.uniform(0.5, 2.0, c).astype(np.float32) if affine == "weight" else None
    y, _, _ = bnfast.batch_norm_forward(x, w, axis=axis)
    want = ref.batch_norm_forward(x, w, axis=axis)[0]
    assert _ulps(y, want).max() <= 3
    rm = x.astype(np.float64).mean(axis=tuple(i for i in range(4) if i != axis % 4))
    rv = x.astype(np.float64).var(axis=tuple(i for i in range(4) if i != axis % 4))
    rm32, rv32 = rm.astype(np.float32), rv.astype(np.float32)
    y = bnfast.batch_norm_inference(x, rm32, rv32, w, axis=axis)
    want = ref.batch_norm_inference(x, rm32, rv32, w, axis=axis)
    assert _ulps(y, want).max() <= 3
