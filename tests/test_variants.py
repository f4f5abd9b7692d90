"""Batch Renorm, ghost batches, momentum schedules, Momentum BN and cross-iteration BN.

Against the float64 references in ``bnfast._reference``, finite differences in
float64, batch normalization itself at the settings where a variant reduces to
it, both layouts, both dtypes, bad input with state untouched, and
bit-identical results for any thread count.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnfast
from bnfast import _reference as ref
from bnfast import nn
from bnfast.nn.variants import _compensated, _moment_gradients, mbn_lambda

RNG = np.random.default_rng(12)
LAYOUTS = [(1, (6, 3, 4, 5)), (-1, (6, 4, 5, 3))]  # (axis, NCHW / NHWC shape), C = 3


def _data(shape, dtype, seed=0, scale=2.0, shift=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + shift).astype(dtype)


def _tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


def _state(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _numeric_grad(f, x, g, h=1e-6):
    """d sum(f(x) * g) / dx by central differences (float64)."""
    out = np.zeros_like(x)
    flat, gflat = x.reshape(-1), out.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = (f(x) * g).sum()
        flat[i] = old - h
        down = (f(x) * g).sum()
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return out


# ---------------------------------------------------------------------- Batch Renorm
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis,shape", LAYOUTS)
def test_batch_renorm_matches_reference(dtype, axis, shape):
    brn = bnfast.BatchRenorm2d(3, momentum=0.2, r_max=1.5, d_max=0.5, axis=axis, dtype=dtype)
    brn.weight[...] = [0.5, -1.0, 2.0]
    brn.bias[...] = [0.1, 0.2, -0.3]
    brn.running_mean[...] = [0.0, 3.0, -1.0]  # far from the batch: d and r clip
    brn.running_var[...] = [1.0, 0.1, 30.0]
    x = _data(shape, dtype)
    g = _data(shape, dtype, seed=1, shift=0.0)
    y_ref, r, d, rm, rv = ref.batch_renorm_forward(x, brn.weight, brn.bias, brn.running_mean, brn.running_var,
                                                   momentum=0.2, eps=1e-5, r_max=1.5, d_max=0.5, axis=axis)
    assert np.any(np.abs(r) == 1.5) and np.any(np.abs(d) == 0.5)  # the clips are exercised
    w = brn.weight.data.copy()
    y = brn(x)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, y_ref, **_tol(dtype))
    np.testing.assert_allclose(brn.running_mean, rm, **_tol(dtype))
    np.testing.assert_allclose(brn.running_var, rv, **_tol(dtype))
    assert int(brn.num_batches_tracked) == 1
    gx_ref, gw_ref, gb_ref = ref.batch_renorm_backward(g, x, w, r, d, eps=1e-5, axis=axis)
    gx = brn.backward(g)
    np.testing.assert_allclose(gx, gx_ref, **_tol(dtype))
    np.testing.assert_allclose(brn.weight.grad, gw_ref, rtol=1e-4 if dtype == np.float32 else 1e-9)
    np.testing.assert_allclose(brn.bias.grad, gb_ref, rtol=1e-4 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("axis,shape", [(1, (4, 2, 3)), (-1, (4, 3, 2))])
def test_batch_renorm_finite_differences(axis, shape):
    x = _data(shape, np.float64)
    g = _data(shape, np.float64, seed=3, shift=0.0)
    brn = bnfast.BatchRenorm1d(2, r_max=1.2, d_max=0.3, axis=axis, dtype=np.float64)
    brn.weight[...] = [1.5, -0.7]
    brn.running_mean[...] = [2.0, -2.0]
    brn.running_var[...] = [0.5, 4.0]
    state = _state(brn)
    brn(x)
    gx = brn.backward(g)
    _, r, d, _, _ = ref.batch_renorm_forward(x, state["weight"], state["bias"], state["running_mean"],
                                             state["running_var"], momentum=0.01, eps=1e-5, r_max=1.2, d_max=0.3,
                                             axis=axis)

    def f(xx, w=state["weight"]):  # r and d constants
        rows = np.moveaxis(xx, axis, -1).reshape(-1, 2)
        mean, var = rows.mean(0), rows.var(0)
        y = w * ((rows - mean) / np.sqrt(var + 1e-5) * r + d)
        return np.moveaxis(y.reshape(np.moveaxis(xx, axis, -1).shape), -1, axis)

    np.testing.assert_allclose(gx, _numeric_grad(f, x.copy(), g), rtol=1e-6, atol=1e-7)
    gw = np.array([(f(x, w=np.eye(2)[c]) * g).sum() for c in range(2)])
    np.testing.assert_allclose(brn.weight.grad, gw, rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis,shape", LAYOUTS)
def test_batch_renorm_with_unit_clips_is_batch_norm(dtype, axis, shape):
    """r_max=1, d_max=0: outputs, running statistics and gradients bit for bit."""
    bn = bnfast.BatchNorm2d(3, momentum=0.1, axis=axis, dtype=dtype)
    brn = bnfast.BatchRenorm2d(3, momentum=0.1, r_max=1.0, d_max=0.0, axis=axis, dtype=dtype)
    for layer in (bn, brn):
        layer.weight[...] = [0.5, -1.0, 2.0]
        layer.bias[...] = [0.1, 0.2, -0.3]
    for step in range(3):
        x = _data(shape, dtype, seed=step, scale=step + 1.0)
        g = _data(shape, dtype, seed=10 + step, shift=0.0)
        assert np.array_equal(brn(x), bn(x))
        assert _same_state(_state(brn), _state(bn))
        assert np.array_equal(brn.backward(g), bn.backward(g))
        assert np.array_equal(brn.weight.grad, bn.weight.grad)
        assert np.array_equal(brn.bias.grad, bn.bias.grad)
    bn.eval(), brn.eval()
    assert np.array_equal(brn(x), bn(x))  # eval: the same inference


def test_batch_renorm_clip_attributes_and_state_dict():
    brn = bnfast.BatchRenorm3d(2)
    assert (brn.r_max, brn.d_max, brn.momentum) == (3.0, 5.0, 0.01)
    brn.r_max, brn.d_max = 1.0, 0.0  # warm-up
    brn.r_max = 2.5
    assert brn.r_max == 2.5
    for name, bad, err in (("r_max", 0.5, ValueError), ("d_max", -1.0, ValueError), ("r_max", "2", TypeError),
                           ("d_max", float("nan"), ValueError)):
        before = getattr(brn, name)
        with pytest.raises(err):
            setattr(brn, name, bad)
        assert getattr(brn, name) == before
    assert list(brn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert "r_max=2.5" in repr(brn)
    with pytest.raises(ValueError, match="expected 5D"):
        brn(np.zeros((2, 2, 3), np.float32))


# ---------------------------------------------------------------------- ghost batches
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis,shape", LAYOUTS)
def test_ghost_batches_match_reference(dtype, axis, shape):
    bn = bnfast.BatchNorm2d(3, momentum=0.3, axis=axis, dtype=dtype, virtual_batch_size=2)
    bn.weight[...] = [0.5, -1.0, 2.0]
    bn.running_var[...] = [1.0, 2.0, 3.0]
    x = _data(shape, dtype)
    g = _data(shape, dtype, seed=1, shift=0.0)
    y_ref, rm, rv = ref.ghost_batch_norm_forward(x, 2, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                 momentum=0.3, axis=axis)
    np.testing.assert_allclose(bn(x), y_ref, **_tol(dtype))
    np.testing.assert_allclose(bn.running_mean, rm, **_tol(dtype))
    np.testing.assert_allclose(bn.running_var, rv, **_tol(dtype))
    gx = bn.backward(g)
    # the gradient of each chunk is batch norm's of that chunk; the parameters' sum over chunks
    gws, gbs = [], []
    for k in range(3):
        sl = slice(2 * k, 2 * k + 2)
        _, mean, invstd, _, _ = ref.batch_norm_forward(x[sl], axis=axis)
        gx_k, gw_k, gb_k = ref.batch_norm_backward(g[sl], x[sl], mean, invstd, bn.weight, axis=axis)
        np.testing.assert_allclose(gx[sl], gx_k, **_tol(dtype))
        gws.append(gw_k), gbs.append(gb_k)
    np.testing.assert_allclose(bn.weight.grad, np.sum(gws, 0), rtol=1e-4 if dtype == np.float32 else 1e-9)
    np.testing.assert_allclose(bn.bias.grad, np.sum(gbs, 0), rtol=1e-4 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("axis,shape", [(1, (4, 2, 3)), (-1, (4, 3, 2))])
def test_ghost_batches_finite_differences(axis, shape):
    x = _data(shape, np.float64)
    g = _data(shape, np.float64, seed=5, shift=0.0)
    bn = bnfast.BatchNorm1d(2, axis=axis, dtype=np.float64, virtual_batch_size=2)
    bn.weight[...] = [1.3, -0.4]
    bn(x)
    gx = bn.backward(g)
    f = lambda xx: ref.ghost_batch_norm_forward(xx, 2, bn.weight, None, axis=axis)[0]  # noqa: E731
    np.testing.assert_allclose(gx, _numeric_grad(f, x.copy(), g), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis,shape", LAYOUTS)
def test_one_ghost_batch_is_batch_norm_bit_for_bit(dtype, axis, shape):
    bn = bnfast.BatchNorm2d(3, axis=axis, dtype=dtype)
    ghost = bnfast.BatchNorm2d(3, axis=axis, dtype=dtype, virtual_batch_size=shape[0])
    for step in range(2):
        x = _data(shape, dtype, seed=step)
        g = _data(shape, dtype, seed=7 + step, shift=0.0)
        assert np.array_equal(ghost(x), bn(x))
        assert np.array_equal(ghost.backward(g), bn.backward(g))
        assert _same_state(_state(ghost), _state(bn))
        assert np.array_equal(ghost.weight.grad, bn.weight.grad) and np.array_equal(ghost.bias.grad, bn.bias.grad)


def test_ghost_batch_size_not_a_multiple_leaves_state_untouched():
    bn = bnfast.BatchNorm2d(3, virtual_batch_size=4)
    bn(_data((8, 3, 2, 2), np.float32))
    before = _state(bn)
    with pytest.raises(ValueError, match="not a multiple of virtual_batch_size=4"):
        bn(_data((6, 3, 2, 2), np.float32))
    assert _same_state(_state(bn), before)
    bn1 = bnfast.BatchNorm1d(3, virtual_batch_size=1)
    with pytest.raises(ValueError, match="one value per channel"):
        bn1(_data((4, 3), np.float32))
    assert int(bn1.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bnfast.BatchNorm2d(3, virtual_batch_size=0)
    bn.eval()  # eval mode with running statistics: ghost batches play no part
    assert bn(_data((6, 3, 2, 2), np.float32)).shape == (6, 3, 2, 2)


@settings(max_examples=15)
@given(chunks=st.integers(1, 3), v=st.integers(2, 3), c=st.integers(1, 4), spatial=st.integers(1, 3),
       last=st.booleans(), f64=st.booleans())
def test_ghost_batches_hypothesis(chunks, v, c, spatial, last, f64):
    dtype = np.float64 if f64 else np.float32
    shape = (chunks * v, spatial, c) if last else (chunks * v, c, spatial)
    axis = -1 if last else 1
    x = _data(shape, dtype, seed=chunks * 100 + v * 10 + c)
    bn = bnfast.BatchNorm1d(c, axis=axis, dtype=dtype, virtual_batch_size=v)
    y_ref, rm, rv = ref.ghost_batch_norm_forward(x, v, None, None, np.zeros(c), np.ones(c), axis=axis)
    np.testing.assert_allclose(bn(x), y_ref, rtol=1e-4, atol=2e-4 if dtype == np.float32 else 1e-9)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-4 if dtype == np.float32 else 1e-9)


# ---------------------------------------------------------------------- momentum schedules
def test_momentum_schedule_is_called_with_the_step_count():
    steps = []
    bn = bnfast.BatchNorm1d(3, momentum=lambda step: steps.append(step) or 0.5)
    ref_bn = bnfast.BatchNorm1d(3, momentum=0.5)
    for k in range(3):
        x = _data((5, 3), np.float32, seed=k)
        bn(x), ref_bn(x)
    assert steps == [1, 2, 3]
    assert _same_state(_state(bn), _state(ref_bn))


def test_schedule_one_over_step_is_the_cumulative_average():
    a = bnfast.BatchNorm2d(3, momentum=lambda step: 1.0 / step)
    b = bnfast.BatchNorm2d(3, momentum=None)
    for k in range(4):
        x = _data((4, 3, 2, 2), np.float32, seed=k)
        a(x), b(x)
    assert _same_state(_state(a), _state(b))


@pytest.mark.parametrize("value,err", [(1.5, ValueError), (-0.1, ValueError), ("x", TypeError)])
def test_bad_schedule_value_leaves_state_untouched(value, err):
    bn = bnfast.BatchRenorm1d(3, momentum=lambda step: 0.1 if step == 1 else value)
    bn(_data((5, 3), np.float32))
    before = _state(bn)
    with pytest.raises(err, match="momentum schedule returned"):
        bn(_data((5, 3), np.float32, seed=1))
    assert _same_state(_state(bn), before)


# ---------------------------------------------------------------------- Momentum BN
def test_mbn_lambda_defining_equations():
    T, m, m0 = 50, 2, 32
    rho = (m / m0) ** (1 / T)
    lams = [mbn_lambda(t, T, m, m0) for t in range(1, T + 10)]
    assert lams[0] == pytest.approx(0.0, abs=1e-15)  # t = 1: batch normalization
    assert lams[T - 1] == pytest.approx(1 - m / m0)  # t = T: 1 - rho**T
    assert lams[T + 5] == lams[T - 1]  # constant after T
    assert all(a <= b for a, b in zip(lams, lams[1:]))
    t = 17
    assert lams[t - 1] == pytest.approx(rho ** (T / (T - 1) * (T - t)) - rho**T, rel=1e-14)
    assert all(mbn_lambda(t, T, 64, 32) == 0.0 for t in range(1, T + 3))  # big batches: plain BN


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis,shape", LAYOUTS)
def test_momentum_bn_statistics_and_output(dtype, axis, shape):
    mbn = bnfast.MomentumBatchNorm2d(3, total_steps=5, ideal_batch_size=24, axis=axis, dtype=dtype)
    mbn.weight[...] = [0.5, -1.0, 2.0]
    mm, mv = np.zeros(3), np.ones(3)
    for step in range(1, 5):
        x = _data(shape, dtype, seed=step, shift=step)
        lam = mbn_lambda(step, 5, shape[0], 24)
        y_ref, mean, var = ref.pooled_batch_norm_forward(x, mbn.weight, mbn.bias, [mm], [mv], share_mode="momentum",
                                                         lam=lam, axis=axis)
        np.testing.assert_allclose(mbn(x), y_ref, **_tol(dtype))
        assert mbn.last_lambda == lam
        np.testing.assert_allclose(mbn.momentum_mean, mean, **_tol(dtype))
        np.testing.assert_allclose(mbn.momentum_var, var, **_tol(dtype))
        mm, mv = mbn.momentum_mean.astype(np.float64), mbn.momentum_var.astype(np.float64)
    assert 0 < lam < 1
    assert "momentum_mean" in mbn.state_dict()


@pytest.mark.parametrize("axis,shape", [(1, (3, 2, 3)), (-1, (3, 3, 2))])
def test_momentum_bn_finite_differences(axis, shape):
    mbn = bnfast.MomentumBatchNorm1d(2, total_steps=3, ideal_batch_size=12, axis=axis, dtype=np.float64)
    mbn.weight[...] = [1.4, -0.6]
    mbn(_data(shape, np.float64, seed=9))  # step 1 (lambda 0)
    mm, mv = mbn.momentum_mean.copy(), mbn.momentum_var.copy()
    x = _data(shape, np.float64, seed=2)
    g = _data(shape, np.float64, seed=3, shift=0.0)
    mbn(x)
    lam = mbn.last_lambda
    assert lam > 0.2
    gx = mbn.backward(g)
    f = lambda xx: ref.pooled_batch_norm_forward(xx, mbn.weight, None, [mm], [mv], share_mode="momentum",  # noqa
                                                 lam=lam, axis=axis)[0]
    np.testing.assert_allclose(gx, _numeric_grad(f, x.copy(), g), rtol=1e-6, atol=1e-7)


def test_momentum_bn_with_big_batches_is_batch_norm():
    mbn = bnfast.MomentumBatchNorm2d(3, total_steps=10, ideal_batch_size=4)
    bn = bnfast.BatchNorm2d(3)
    for k in range(3):
        x = _data((4, 3, 2, 2), np.float32, seed=k)
        g = _data((4, 3, 2, 2), np.float32, seed=k + 5)
        np.testing.assert_allclose(mbn(x), bn(x), atol=1e-6)
        assert np.array_equal(mbn.backward(g), bn.backward(g))
        assert np.array_equal(mbn.running_var, bn.running_var)


def test_momentum_bn_counts_epochs_with_steps_per_epoch():
    # the paper's t is the epoch: lambda stays the same within one, and T counts epochs
    mbn = bnfast.MomentumBatchNorm1d(2, total_steps=4, ideal_batch_size=8, steps_per_epoch=3, dtype=np.float64)
    lams = []
    for step in range(1, 16):
        mbn(_data((2, 2), np.float64, seed=step))
        lams.append(mbn.last_lambda)
    expected = [mbn_lambda((step - 1) // 3 + 1, 4, 2, 8) for step in range(1, 16)]
    assert lams == expected
    assert lams[:3] == [0.0, 0.0, 0.0] and lams[3] == lams[5] > 0.0 and lams[9] == lams[14] == pytest.approx(1 - 2 / 8)
    assert "steps_per_epoch=3" in repr(mbn)


def test_momentum_bn_paper_inference_statistics():
    # tau = tau0 ** (m / m0): running = tau * running + (1 - tau) * batch, as momentum = 1 - tau
    m, m0 = 4, 32
    tau = 0.9 ** (m / m0)
    mbn = bnfast.MomentumBatchNorm1d(3, momentum=1 - tau, total_steps=10, ideal_batch_size=m0, dtype=np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    for step in range(1, 4):
        x = _data((m, 3), np.float64, seed=step, shift=step)
        mbn(x)
        rm = tau * rm + (1 - tau) * x.mean(axis=0)
        rv = tau * rv + (1 - tau) * x.var(axis=0, ddof=1)
    np.testing.assert_allclose(mbn.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(mbn.running_var, rv, rtol=1e-12)


def test_momentum_bn_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        bnfast.MomentumBatchNorm1d(3, total_steps=1)
    with pytest.raises(ValueError, match="ideal_batch_size"):
        bnfast.MomentumBatchNorm1d(3, total_steps=10, ideal_batch_size=0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        bnfast.MomentumBatchNorm1d(3, total_steps=10, steps_per_epoch=0)
    mbn = bnfast.MomentumBatchNorm1d(3, total_steps=10)
    before = _state(mbn)
    with pytest.raises(TypeError):
        mbn(np.zeros((4, 3), np.float64))
    with pytest.raises(ValueError, match="more than 1 value"):
        mbn(np.zeros((1, 3), np.float32))
    assert _same_state(_state(mbn), before)


# ---------------------------------------------------------------------- cross-iteration BN
def _conv_model(axis=1, dtype=np.float64, **kw):
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, axis=axis, dtype=dtype, rng=0),
                         bnfast.CrossIterationBatchNorm2d(3, axis=axis, dtype=dtype, **kw))


@pytest.mark.parametrize("axis", [1, -1])
def test_cross_iteration_compensation_matches_finite_difference(axis):
    """The Taylor term predicts the statistics' change under a small weight step (error O(step**2))."""
    model = _conv_model(axis)
    conv = model[0]
    x = _data((2, 2, 5, 5) if axis == 1 else (2, 5, 5, 2), np.float64, seed=4)

    def stats():
        y = conv(x)
        rows = np.moveaxis(y, axis, -1).reshape(-1, 3)
        return rows.mean(0), (rows * rows).mean(0), y

    mu0, nu0, y0 = stats()
    cols = conv._columns(conv._cache[0])[0]
    dmu, dnu = _moment_gradients(cols, np.moveaxis(y0, axis, -1).reshape(-1, 3))
    if axis == 1:  # the layer's channels-first form gives the same derivatives
        d2 = _moment_gradients(cols, y0.reshape(2, 3, -1))
        np.testing.assert_allclose(d2[1], dnu, rtol=1e-12)
    W0 = conv.weight.data.reshape(3, -1).copy()
    b0 = conv.bias.data.copy()
    errors = []
    direction = np.random.default_rng(1).standard_normal(conv.weight.shape)
    bdir = np.random.default_rng(2).standard_normal(3)
    for h in (1e-3, 5e-4):
        conv.weight[...] = (W0 + h * direction.reshape(3, -1)).reshape(conv.weight.shape)
        conv.bias[...] = b0 + h * bdir
        mu1, nu1, _ = stats()
        mu_c, nu_c = _compensated(mu0, nu0, dmu, dnu, conv.weight.data.reshape(3, -1) - W0, conv.bias.data - b0)
        np.testing.assert_allclose(mu_c, mu1, rtol=1e-12, atol=1e-12)  # the mean is linear in W: exact
        change, error = np.abs(nu1 - nu0).max(), np.abs(nu_c - nu1).max()
        assert error < 0.05 * change
        errors.append(error)
    assert errors[1] < 0.3 * errors[0]  # second order: halving the step quarters the error


def test_cross_iteration_linear_compensation():
    fc = nn.Linear(4, 3, dtype=np.float64, rng=0)
    x = _data((6, 4), np.float64)
    y = fc(x)
    dmu, dnu = _moment_gradients(x, y)
    W0, dW = fc.weight.data.copy(), 1e-6 * np.random.default_rng(0).standard_normal((3, 4))
    fc.weight[...] = W0 + dW
    y1 = fc(x)
    mu_c, nu_c = _compensated(y.mean(0), (y * y).mean(0), dmu, dnu, dW, None)
    np.testing.assert_allclose(mu_c, y1.mean(0), rtol=1e-12)
    np.testing.assert_allclose(nu_c, (y1 * y1).mean(0), rtol=1e-10)  # error O(step**2)


@pytest.mark.parametrize("axis", [1, -1])
def test_cross_iteration_forward_and_gradient(axis):
    model = _conv_model(axis, window_size=3, burn_in=1)
    conv, cbn = model[0], model[1]
    cbn.weight[...] = [1.5, -0.5, 0.8]
    shape = (2, 2, 4, 4) if axis == 1 else (2, 4, 4, 2)
    for step in range(4):  # burn-in, then the window fills
        x = _data(shape, np.float64, seed=step)
        y = model(x)
        model.backward(np.ones_like(y))
        conv.weight -= 0.05 * conv.weight.grad  # the weights move between iterations
    assert len(cbn._history) == 2
    W = conv.weight.data.reshape(3, -1)
    others = [_compensated(mu, nu, dmu, dnu, W - Wp, conv.bias.data - bp)
              for mu, nu, dmu, dnu, Wp, bp in cbn._history]
    x = _data(shape, np.float64, seed=11)
    h = conv(x)
    y_ref, _, _ = ref.pooled_batch_norm_forward(h, cbn.weight, cbn.bias, [o[0] for o in others],
                                                [o[1] for o in others], share_mode="window", axis=axis)
    y = cbn(h)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    g = _data(h.shape, np.float64, seed=12, shift=0.0)
    gx = cbn.backward(g)
    f = lambda hh: ref.pooled_batch_norm_forward(hh, cbn.weight, None, [o[0] for o in others],  # noqa: E731
                                                 [o[1] for o in others], share_mode="window", axis=axis)[0]
    np.testing.assert_allclose(gx, _numeric_grad(f, h.copy(), g), rtol=1e-6, atol=1e-7)


def test_cross_iteration_burn_in_is_batch_norm_and_needs_a_predecessor():
    model = _conv_model(1, dtype=np.float32, burn_in=3)
    bn_model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=0), bnfast.BatchNorm2d(3))
    for step in range(3):
        x = _data((2, 2, 4, 4), np.float32, seed=step)
        a, b = model(x), bn_model(x)
        assert np.allclose(a, b, atol=1e-5)
        assert np.array_equal(model.backward(np.ones_like(a)), bn_model.backward(np.ones_like(b)))
    assert np.array_equal(model[1].running_var, bn_model[1].running_var)
    lone = bnfast.CrossIterationBatchNorm2d(3, burn_in=0)
    before = _state(lone)
    with pytest.raises(RuntimeError, match="directly follow"):
        lone(_data((2, 3, 4, 4), np.float32))
    assert _same_state(_state(lone), before)
    lone.eval()
    assert lone(_data((2, 3, 4, 4), np.float32)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="window_size"):
        bnfast.CrossIterationBatchNorm1d(3, window_size=0)


# ---------------------------------------------------------------------- threads
@pytest.mark.parametrize("make", [
    lambda: bnfast.BatchRenorm2d(4, r_max=1.5, d_max=1.0),
    lambda: bnfast.BatchNorm2d(4, virtual_batch_size=2),
    lambda: bnfast.MomentumBatchNorm2d(4, total_steps=3),
])
def test_variants_bit_identical_for_any_thread_count(make):
    x = _data((8, 4, 9, 9), np.float32, seed=3)
    g = _data((8, 4, 9, 9), np.float32, seed=4)
    results = []
    for threads in (1, 2, 3):
        bnfast.set_num_threads(threads)
        layer = make()
        out = [layer(x), layer(x * 2), layer.backward(g), layer.weight.grad]
        out += list(_state(layer).values())
        results.append(out)
    for other in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis,shape", LAYOUTS)
@pytest.mark.parametrize("with_ref", [False, True])
def test_shared_statistics_backward_kernel(dtype, axis, shape, with_ref):
    """The backward kernel with a share and a reference mean against the closed form in float64."""
    from bnfast._variants import shared_batch_norm_backward

    x = _data(shape, dtype)
    g = _data(shape, dtype, seed=1, shift=0.0)
    mean = np.array([0.5, -0.2, 1.1], dtype)
    invstd = np.array([0.7, 1.3, 0.4], dtype)
    w = np.array([1.5, -0.5, 0.8], dtype)
    ref_mean = np.array([1.0, 0.3, -0.4]) if with_ref else None
    gx, gw, gb = shared_batch_norm_backward(g, x, mean, invstd, w, 0.3, ref_mean, axis=axis)
    rows = np.moveaxis(x.astype(np.float64), axis, -1)
    gr = np.moveaxis(g.astype(np.float64), axis, -1)
    s, m = invstd.astype(np.float64), mean.astype(np.float64)
    xh = (rows - m) * s
    n = rows.size // 3
    r = m if ref_mean is None else ref_mean
    mg, mgx = gr.reshape(-1, 3).mean(0), (gr * xh).reshape(-1, 3).mean(0)
    expect = w * s * (gr - 0.3 * mg - 0.3 * s * (rows - r) * mgx)
    np.testing.assert_allclose(gx, np.moveaxis(expect, -1, axis), rtol=1e-4 if dtype == np.float32 else 1e-11,
                               atol=1e-4 if dtype == np.float32 else 1e-11)
    np.testing.assert_allclose(gw, (gr * xh).reshape(-1, 3).sum(0), rtol=1e-4 if dtype == np.float32 else 1e-11)
    np.testing.assert_allclose(gb, gr.reshape(-1, 3).sum(0), rtol=1e-4 if dtype == np.float32 else 1e-11)
    assert n > 0
    with pytest.raises(ValueError, match="share"):
        shared_batch_norm_backward(g, x, mean, invstd, w, 0.0, axis=axis)


@settings(max_examples=12)
@given(n=st.integers(2, 5), c=st.integers(1, 4), spatial=st.integers(1, 3), last=st.booleans(),
       f64=st.booleans(), r_max=st.floats(1.0, 4.0), d_max=st.floats(0.0, 3.0))
def test_batch_renorm_hypothesis(n, c, spatial, last, f64, r_max, d_max):
    dtype = np.float64 if f64 else np.float32
    shape, axis = ((n, spatial, c), -1) if last else ((n, c, spatial), 1)
    x = _data(shape, dtype, seed=n * 31 + c * 7 + spatial)
    brn = bnfast.BatchRenorm1d(c, momentum=0.3, r_max=r_max, d_max=d_max, axis=axis, dtype=dtype)
    brn.running_mean[...] = np.linspace(-2, 2, c)
    brn.running_var[...] = np.linspace(0.2, 5, c)
    y_ref, _, _, rm, rv = ref.batch_renorm_forward(x, None, None, brn.running_mean, brn.running_var, momentum=0.3,
                                                   eps=1e-5, r_max=r_max, d_max=d_max, axis=axis)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(brn(x), y_ref, **tol)
    np.testing.assert_allclose(brn.running_var, rv, **tol)


@pytest.mark.parametrize("make", [
    lambda: bnfast.BatchRenorm2d(3),
    lambda: bnfast.MomentumBatchNorm2d(3, total_steps=5),
    lambda: bnfast.BatchNorm2d(3, virtual_batch_size=2),
])
def test_bad_input_leaves_variant_state_untouched(make):
    layer = make()
    layer(_data((4, 3, 2, 2), np.float32))
    before = _state(layer)
    for bad, err in ((np.zeros((4, 3, 2, 2), np.float64), TypeError), (np.zeros((4, 5, 2, 2), np.float32), ValueError),
                     (np.zeros((4, 3, 2), np.float32), ValueError), (np.zeros((1, 3, 1, 1), np.float32), ValueError)):
        with pytest.raises(err):
            layer(bad)
        assert _same_state(_state(layer), before)
    layer.eps = -1.0
    with pytest.raises(ValueError):
        layer(_data((4, 3, 2, 2), np.float32))
    layer.eps = 1e-5
    assert _same_state(_state(layer), before)


def test_cross_iteration_bit_identical_for_any_thread_count():
    results = []
    for threads in (1, 2, 3):
        bnfast.set_num_threads(threads)
        model = _conv_model(1, dtype=np.float32, burn_in=0, window_size=3)
        out = []
        for step in range(3):
            y = model(_data((4, 2, 6, 6), np.float32, seed=step))
            out += [y, model.backward(np.ones_like(y)), model[1].weight.grad]
        results.append(out + list(_state(model).values()))
    for other in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], other))


def test_variants_refuse_ghost_batches():
    brn = bnfast.BatchRenorm1d(3)
    brn.virtual_batch_size = 2
    with pytest.raises(ValueError, match="virtual_batch_size"):
        brn(_data((4, 3), np.float32))
    assert int(brn.num_batches_tracked) == 0


def test_statistics_forward_arguments():
    from bnfast._variants import statistics_forward

    x = _data((4, 3), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="prior_mean and prior_var"):
        statistics_forward(x, None, None, rm, rv, momentum=0.1, eps=1e-5, prior_mean=np.zeros(3))
    with pytest.raises(ValueError, match="momentum"):
        statistics_forward(x, None, None, rm, rv, momentum=2.0, eps=1e-5)
    assert np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3))
    y, mean, invstd, stats = statistics_forward(x, None, None, rm, rv, momentum=0.1, eps=1e-5)
    y_bn, mean_bn, invstd_bn = bnfast.batch_norm_forward(x, None, None, np.zeros(3, np.float32),
                                                         np.ones(3, np.float32), momentum=0.1)
    assert np.array_equal(y, y_bn) and np.array_equal(mean, mean_bn) and np.array_equal(invstd, invstd_bn)
    np.testing.assert_allclose(stats[0], x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats[1], x.astype(np.float64).var(0), rtol=1e-5)


@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (4, 3, 0, 5)])
def test_ghost_batches_refuse_an_empty_batch(shape):
    layer = nn.BatchNorm2d(3, virtual_batch_size=2)
    before = layer.state_dict()
    with pytest.raises(ValueError, match="empty batch"):
        layer(np.ones(shape, np.float32))
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
