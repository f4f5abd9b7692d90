"""bnfast.contrib.autograd: autograd primitives over bnfast's kernels."""

import numpy as np
import pytest

autograd = pytest.importorskip("autograd")
anp = pytest.importorskip("autograd.numpy")
from autograd.test_util import check_grads  # noqa: E402

from bnfast.contrib import autograd as bna  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_check_grads(rng, training, axis, affine):
    x = rng.standard_normal((4, 3, 5)) if axis == 1 else rng.standard_normal((4, 5, 3))
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    if affine:
        w, b = rng.standard_normal(3), rng.standard_normal(3)
        f = lambda x, w, b: bna.batch_norm(x, rm, rv, w, b, training=training, axis=axis)  # noqa: E731
        check_grads(f, (0, 1, 2), modes=["rev"], order=1)(x, w, b)
    else:
        f = lambda x: bna.batch_norm(x, rm, rv, training=training, axis=axis)  # noqa: E731
        check_grads(f, modes=["rev"], order=1)(x)


def test_second_order_raises(rng):
    x = rng.standard_normal((4, 3, 5))
    loss = lambda x: anp.sum(anp.sin(bna.batch_norm(x, None, None, training=True)))  # noqa: E731
    with pytest.raises(NotImplementedError, match="second-order"):
        autograd.hessian(loss)(x)


@pytest.mark.parametrize("axis", [1, -1])
def test_family_check_grads(rng, axis):
    x = rng.standard_normal((3, 4, 5)) if axis == 1 else rng.standard_normal((3, 5, 4))
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    rev = dict(modes=["rev"], order=1)
    check_grads(lambda x, w, b: bna.group_norm(x, 2, w, b, axis=axis), (0, 1, 2), **rev)(x, w, b)
    check_grads(lambda x: bna.group_norm(x, 2, axis=axis), **rev)(x)
    for stats in (True, False):
        f = lambda x, w, b: bna.instance_norm(x, rm, rv, w, b, use_input_stats=stats, axis=axis)  # noqa: E731
        check_grads(f, (0, 1, 2), **rev)(x, w, b)
    d = x.shape[-1]
    wl, bl = rng.standard_normal(d), rng.standard_normal(d)
    check_grads(lambda x, w, b: bna.layer_norm(x, d, w, b), (0, 1, 2), **rev)(x, wl, bl)
    check_grads(lambda x: bna.layer_norm(x, x.shape[1:]), **rev)(x)
    check_grads(lambda x, w: bna.rms_norm(x, d, w), (0, 1), **rev)(x, wl)
    check_grads(lambda x: bna.rms_norm(x, d), **rev)(x)


# ---- against the same models written in autograd.numpy ----------------------

def _anp_batch_norm(x, w, b, axis, eps=1e-5):
    """Training-mode batch norm in plain autograd.numpy (two-pass statistics)."""
    reduce = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    mean = anp.mean(x, axis=reduce, keepdims=True)
    var = anp.mean((x - mean) ** 2, axis=reduce, keepdims=True)
    return (x - mean) / anp.sqrt(var + eps) * anp.reshape(w, shape) + anp.reshape(b, shape)


def _anp_layer_norm(x, w, b, eps=1e-5):
    mean = anp.mean(x, axis=-1, keepdims=True)
    var = anp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / anp.sqrt(var + eps) * w + b


def _anp_group_norm(x, groups, w, b, eps=1e-5):
    n, c = x.shape[:2]
    xg = anp.reshape(x, (n, groups, -1))
    mean = anp.mean(xg, axis=2, keepdims=True)
    var = anp.mean((xg - mean) ** 2, axis=2, keepdims=True)
    y = anp.reshape((xg - mean) / anp.sqrt(var + eps), x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return y * anp.reshape(w, shape) + anp.reshape(b, shape)


CASES = [
    ("batch_norm axis=1", lambda x, w, b: bna.batch_norm(x, None, None, w, b, training=True),
     lambda x, w, b: _anp_batch_norm(x, w, b, 1), (6, 4, 5), 4),
    ("batch_norm axis=-1", lambda x, w, b: bna.batch_norm(x, None, None, w, b, training=True, axis=-1),
     lambda x, w, b: _anp_batch_norm(x, w, b, -1), (6, 5, 4), 4),
    ("layer_norm", lambda x, w, b: bna.layer_norm(x, 7, w, b), _anp_layer_norm, (5, 3, 7), 7),
    ("group_norm", lambda x, w, b: bna.group_norm(x, 2, w, b), lambda x, w, b: _anp_group_norm(x, 2, w, b),
     (3, 6, 4), 6),
]


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-10), (np.float32, 1e-4)])
@pytest.mark.parametrize("name, ours, theirs, shape, c", CASES, ids=[c[0] for c in CASES])
def test_value_and_gradients_match_autograd_numpy(rng, dtype, rtol, name, ours, theirs, shape, c):
    x = (3.0 + rng.standard_normal(shape)).astype(dtype)
    w, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    weights = rng.standard_normal(shape).astype(dtype)

    def loss(f):
        return lambda x, w, b: anp.sum(anp.sin(f(x, w, b)) * weights)

    np.testing.assert_allclose(ours(x, w, b), theirs(x, w, b), rtol=rtol, atol=rtol)
    for arg in range(3):
        got = autograd.grad(loss(ours), arg)(x, w, b)
        want = autograd.grad(loss(theirs), arg)(x, w, b)
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=f"argument {arg}")


def test_running_statistics_update_once_per_forward_like_bnfast(rng):
    import bnfast

    x = rng.standard_normal((8, 3, 5))
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = np.zeros(3), np.ones(3)
    ref_m, ref_v = rm.copy(), rv.copy()
    loss = lambda x, w: anp.sum(bna.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3) ** 2)  # noqa: E731
    autograd.grad(loss, (0, 1))(x, w)  # one forward and one backward
    bnfast.batch_norm(x, ref_m, ref_v, w, b, training=True, momentum=0.3)
    np.testing.assert_array_equal(rm, ref_m)
    np.testing.assert_array_equal(rv, ref_v)


def test_two_layer_model_gradients_match_autograd_numpy(rng):
    x = rng.standard_normal((16, 5))
    params = [rng.standard_normal((5, 8)) * 0.5, np.ones(8), np.zeros(8), rng.standard_normal((8, 2)) * 0.5]
    target = rng.standard_normal((16, 2))

    def model(norm):
        def loss(params):
            w1, g, b, w2 = params
            h = anp.tanh(norm(anp.dot(x, w1), g, b))
            return anp.mean((anp.dot(h, w2) - target) ** 2)
        return loss

    ours = autograd.grad(model(lambda h, g, b: bna.batch_norm(h, None, None, g, b, training=True)))(params)
    theirs = autograd.grad(model(lambda h, g, b: _anp_batch_norm(h, g, b, 1)))(params)
    for got, want in zip(ours, theirs):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
