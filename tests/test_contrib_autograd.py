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
