"""Finite-difference gradient checks of batch_norm_backward (float64).

The scalar loss is L = sum(y * R) for a fixed random R, so dL/dy = R is the
grad_out given to backward.  Central differences of L with respect to every
element of x, weight and bias are compared with the analytic gradients:

- through batch_norm_forward (training mode) against backward(training=True);
- through batch_norm_inference (eval mode, statistics constant) against
  backward(training=False) with save_mean = running_mean and
  save_invstd = 1/sqrt(running_var + eps).

The same checks are run on the float64 reference, so the oracle itself is
verified independently of bnfast.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnfast
from bnfast import _reference as ref

H = 1e-6
RTOL, ATOL = 1e-6, 1e-7
EPS = 1e-3

SHAPES = [
    pytest.param((3, 4, 5), 1, id="NCL"),
    pytest.param((3, 5, 4), -1, id="NLC"),
    pytest.param((2, 3, 2, 3), 1, id="NCHW"),
    pytest.param((2, 2, 3, 3), -1, id="NHWC"),
    pytest.param((6, 3), 1, id="NC"),
    pytest.param((3, 2, 4, 2), 2, id="axis2"),
    pytest.param((4, 3, 3), -3, id="axis-3"),
]


def numeric_grad(loss, a):
    """Central differences of the scalar function ``loss()`` w.r.t. every element of ``a``."""
    grad = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        orig = a[i]
        a[i] = orig + H
        up = loss()
        a[i] = orig - H
        down = loss()
        a[i] = orig
        grad[i] = (up - down) / (2 * H)
    return grad


def problem(shape, axis, seed):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = rng.standard_normal(shape) * 1.5 + 0.3
    R = rng.standard_normal(shape)
    w = rng.uniform(0.5, 2.0, c) * np.where(rng.random(c) < 0.5, -1.0, 1.0)
    b = rng.standard_normal(c)
    rm = rng.standard_normal(c) * 0.5
    rv = rng.uniform(0.5, 2.0, c)
    return x, R, w, b, rm, rv


IMPLS = {
    "bnfast": (
        lambda x, w, b, axis: bnfast.batch_norm_forward(x, w, b, eps=EPS, axis=axis),
        lambda x, rm, rv, w, b, axis: bnfast.batch_norm_inference(x, rm, rv, w, b, eps=EPS,
                                                                  axis=axis),
        lambda *a, **k: bnfast.batch_norm_backward(*a, **k),
    ),
    "reference": (
        lambda x, w, b, axis: ref.batch_norm_forward(x, w, b, eps=EPS, axis=axis)[:3],
        lambda x, rm, rv, w, b, axis: ref.batch_norm_inference(x, rm, rv, w, b, eps=EPS,
                                                               axis=axis),
        lambda *a, **k: ref.batch_norm_backward(*a, **k),
    ),
}


def check(name, analytic, numeric):
    np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_training_gradients(shape, axis, affine, impl):
    forward, _, backward = IMPLS[impl]
    x, R, w, b, _, _ = problem(shape, axis, seed=30)
    if not affine:
        w = np.ones_like(w)
        b = np.zeros_like(b)
    weight = w if affine else None
    bias = b if affine else None

    def loss():
        return float(np.sum(forward(x, weight, bias, axis)[0] * R))

    y, sm, si = forward(x, weight, bias, axis)
    gi, gw, gb = backward(R, x, sm, si, weight, training=True, axis=axis)
    assert gi.shape == x.shape and gw.shape == gb.shape == (shape[axis],)
    check("grad_input", gi, numeric_grad(loss, x))

    # weight/bias gradients: always returned, computed as if weight were ones when None
    def loss_wb():
        return float(np.sum(forward(x, w, b, axis)[0] * R))

    check("grad_weight", gw, numeric_grad(loss_wb, w))
    check("grad_bias", gb, numeric_grad(loss_wb, b))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_eval_gradients(shape, axis, affine, impl):
    _, inference, backward = IMPLS[impl]
    x, R, w, b, rm, rv = problem(shape, axis, seed=31)
    if not affine:
        w = np.ones_like(w)
        b = np.zeros_like(b)
    weight = w if affine else None
    bias = b if affine else None

    def loss():
        return float(np.sum(inference(x, rm, rv, weight, bias, axis) * R))

    save_invstd = 1.0 / np.sqrt(rv + EPS)
    gi, gw, gb = backward(R, x, rm, save_invstd, weight, training=False, axis=axis)
    check("grad_input", gi, numeric_grad(loss, x))

    def loss_wb():
        return float(np.sum(inference(x, rm, rv, w, b, axis) * R))

    check("grad_weight", gw, numeric_grad(loss_wb, w))
    check("grad_bias", gb, numeric_grad(loss_wb, b))


@pytest.mark.parametrize("shape,axis", SHAPES[:4])
def test_training_and_eval_gradients_differ(shape, axis):
    """Guard against backward ignoring `training`: the two gradients are not the same."""
    x, R, w, b, _, _ = problem(shape, axis, seed=32)
    _, sm, si = bnfast.batch_norm_forward(x, w, b, eps=EPS, axis=axis)
    gi_t = bnfast.batch_norm_backward(R, x, sm, si, w, training=True, axis=axis)[0]
    gi_e = bnfast.batch_norm_backward(R, x, sm, si, w, training=False, axis=axis)[0]
    assert np.abs(gi_t - gi_e).max() > 1e-3
    # training-mode grad_input sums to zero over each channel (mean is subtracted)
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    np.testing.assert_allclose(gi_t.sum(axis=red), 0.0, atol=1e-10)
