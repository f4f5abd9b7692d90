"""bnfast.contrib.jax: the custom-VJP batch norm against plain jax.numpy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
from jax.test_util import check_grads  # noqa: E402

from bnfast.contrib.jax import batch_norm  # noqa: E402

# jax.enable_x64 is the current spelling; older JAX has only jax.experimental.enable_x64
if hasattr(jax, "enable_x64"):
    enable_x64 = jax.enable_x64
else:  # pragma: no cover - old JAX
    from jax.experimental import enable_x64

TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "float64": dict(rtol=1e-10, atol=1e-10)}


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """The dtype under test; float64 runs with x64 enabled for this test only."""
    if request.param == "float64":
        with enable_x64(True):
            yield request.param
    else:
        yield request.param


def reference(x, weight, bias, running_mean, running_var, *, training, momentum=0.1, eps=1e-5, axis=1):
    """Batch norm in plain jax.numpy, written independently of the adapter."""
    ax = axis % x.ndim
    others = tuple(i for i in range(x.ndim) if i != ax)
    bshape = tuple(x.shape[i] if i == ax else 1 for i in range(x.ndim))
    if training:
        mean = x.mean(axis=others)
        centered = x - mean.reshape(bshape)
        var = (centered * centered).mean(axis=others)
        n = x.size // x.shape[ax]
        new_mean = (1 - momentum) * running_mean + momentum * mean
        new_var = (1 - momentum) * running_var + momentum * var * n / (n - 1)
    else:
        mean, var, new_mean, new_var = running_mean, running_var, running_mean, running_var
    xhat = (x - mean.reshape(bshape)) / jnp.sqrt(var.reshape(bshape) + eps)
    return xhat * weight.reshape(bshape) + bias.reshape(bshape), new_mean, new_var


def make(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = rng.standard_normal(shape) * 2.0 + 0.5
    c = rng.standard_normal(shape)
    arrays = [x, rng.uniform(0.5, 1.5, C), rng.uniform(-0.5, 0.5, C), rng.standard_normal(C) * 0.1,
              rng.uniform(0.5, 2.0, C), c]  # fmt: skip
    return [jnp.asarray(a.astype(dtype)) for a in arrays]


def loss_of(bn, training, axis):
    def loss(x, w, b, rm, rv, c):
        y, _, _ = bn(x, w, b, rm, rv, training=training, axis=axis)
        return jnp.sum(y * c) + 0.5 * jnp.sum(y * y * c)

    return loss


def maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_jax_numpy(dtype, training, axis, jit):
    shape = (6, 5, 4, 3) if axis == 1 else (6, 4, 3, 5)
    x, w, b, rm, rv, c = make(shape, axis, dtype)
    rm_before, rv_before = np.asarray(rm).copy(), np.asarray(rv).copy()

    def ours(x, w, b, rm, rv):
        return batch_norm(x, w, b, rm, rv, training=training, axis=axis)

    fwd = jax.jit(ours) if jit else ours
    y, new_rm, new_rv = fwd(x, w, b, rm, rv)
    y_ref, rm_ref, rv_ref = reference(x, w, b, rm, rv, training=training, axis=axis)
    tol = TOL[dtype]
    for got, want in ((y, y_ref), (new_rm, rm_ref), (new_rv, rv_ref)):
        assert got.dtype == np.dtype(dtype) and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tol)
    # inputs untouched; in eval mode the statistics come back unchanged
    np.testing.assert_array_equal(np.asarray(rm), rm_before)
    np.testing.assert_array_equal(np.asarray(rv), rv_before)
    if not training:
        np.testing.assert_array_equal(np.asarray(new_rm), rm_before)
        np.testing.assert_array_equal(np.asarray(new_rv), rv_before)

    grad = jax.grad(loss_of(batch_norm, training, axis), argnums=(0, 1, 2, 3, 4))
    grad_ref = jax.grad(loss_of(reference, training, axis), argnums=(0, 1, 2))
    if jit:
        grad, grad_ref = jax.jit(grad), jax.jit(grad_ref)
    gx, gw, gb, grm, grv = grad(x, w, b, rm, rv, c)
    for got, want in zip((gx, gw, gb), grad_ref(x, w, b, rm, rv, c)):
        assert got.dtype == np.dtype(dtype)
        scale = max(1.0, float(np.max(np.abs(np.asarray(want)))))
        assert maxdiff(got, want) <= tol["atol"] * scale, maxdiff(got, want)  # relative to the largest value
    # no gradient through the running statistics
    np.testing.assert_array_equal(np.asarray(grm), 0)
    np.testing.assert_array_equal(np.asarray(grv), 0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("axis", [1, -1])
def test_numerical_gradients_float64(training, axis):
    with enable_x64(True):
        shape = (4, 3, 5) if axis == 1 else (4, 5, 3)
        x, w, b, rm, rv, c = make(shape, axis, "float64", seed=1)

        def f(x, w, b):
            y, _, _ = batch_norm(x, w, b, rm, rv, training=training, axis=axis)
            return jnp.sum(jnp.sin(y) * c)

        check_grads(f, (x, w, b), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
        check_grads(jax.jit(f), (x, w, b), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def test_momentum_eps_and_default_affine():
    x, _, _, rm, rv, _ = make((8, 3, 5), 1, "float32", seed=2)
    y, new_rm, new_rv = batch_norm(x, None, None, rm, rv, training=True, momentum=0.3, eps=1e-3)
    ones, zeros = jnp.ones(3), jnp.zeros(3)
    want = reference(x, ones, zeros, rm, rv, training=True, momentum=0.3, eps=1e-3)
    for got, ref in zip((y, new_rm, new_rv), want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_vmap_normalizes_each_element():
    x, w, b, rm, rv, _ = make((3, 6, 4, 2), 1, "float32", seed=3)  # vmap over the first axis
    y = jax.vmap(lambda xi: batch_norm(xi, w[:4], b[:4], rm[:4], rv[:4], training=True)[0])(x)
    for i in range(3):
        want = reference(x[i], w[:4], b[:4], rm[:4], rv[:4], training=True)[0]
        np.testing.assert_allclose(np.asarray(y[i]), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    x, w, b, rm, rv, _ = make((4, 3, 2), 1, "float32")
    with pytest.raises(TypeError, match="float32 or float64"):
        batch_norm(x.astype(jnp.int32), w, b, rm, rv, training=True)
    with pytest.raises(ValueError, match="shape"):
        batch_norm(x, w[:2], b, rm, rv, training=True)
    with pytest.raises(ValueError, match="out of range"):
        batch_norm(x, w, b, rm, rv, training=True, axis=3)
    with pytest.raises(TypeError, match="training"):
        batch_norm(x, w, b, rm, rv, training=jnp.bool_(True))
    with pytest.raises(ValueError, match="momentum"):
        batch_norm(x, w, b, rm, rv, training=True, momentum=1.5)


def test_import_bnfast_does_not_import_jax():
    code = "import sys, bnfast, bnfast.contrib; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_jax_raises_helpful_import_error():
    code = (
        "import sys; sys.modules['jax'] = None\n"
        "try:\n    import bnfast.contrib.jax\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install jax" in out and "bnfast[jax]" in out


def test_bench_jax_prints_a_ratio(capsys):
    from bnfast._bench import main

    assert main(["--jax", "--shapes", "4x3x5x5", "--rounds", "3", "--budget", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "bnfast.contrib.jax.batch_norm" in out and "jax.numpy batch norm" in out
    assert "ratio" in out and "x\n" in out
