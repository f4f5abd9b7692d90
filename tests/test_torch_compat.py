"""Agreement with torch.nn.functional.batch_norm and torch autograd (skipped without torch).

bnfast.batch_norm takes torch's positional order, so each comparison calls
both libraries with the same arguments.  Channels-last layouts are compared
with the torch result of the equivalent channels-first tensor (torch always
uses dim 1 as the channel axis).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import bnfast  # noqa: E402

LAYOUTS = [
    # (name, shape as bnfast sees it, bnfast axis, permutation to torch's channels-first order)
    pytest.param((6, 5), 1, (0, 1), id="NC"),
    pytest.param((4, 5, 7), 1, (0, 1, 2), id="NCL"),
    pytest.param((4, 7, 5), -1, (0, 2, 1), id="NLC"),
    pytest.param((3, 5, 6, 7), 1, (0, 1, 2, 3), id="NCHW"),
    pytest.param((3, 6, 7, 5), -1, (0, 3, 1, 2), id="NHWC"),
    pytest.param((2, 5, 3, 4, 3), 1, (0, 1, 2, 3, 4), id="NCDHW"),
    pytest.param((2, 3, 4, 3, 5), -1, (0, 4, 1, 2, 3), id="NDHWC"),
]
DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=1e-4, atol=1e-4), np.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; torch is only the referee here
    yield
    torch.set_num_threads(before)


def to_torch(a, perm, requires_grad=False):
    """numpy array in bnfast's layout -> torch tensor in channels-first order."""
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(*perm)
    if requires_grad:
        t = t.detach().clone().requires_grad_(True)
    return t


def from_torch(t, perm):
    """torch channels-first tensor -> numpy array in bnfast's layout."""
    return t.detach().permute(*np.argsort(perm).tolist()).numpy()


def setup(shape, axis, dtype, seed):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (0.5 + 1.3 * rng.standard_normal(shape)).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2.0, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm = rng.standard_normal(c).astype(dtype)
    rv = rng.uniform(0.5, 2.0, c).astype(dtype)
    return x, g, w, b, rm, rv


def close(got, want, dtype, what):
    np.testing.assert_allclose(got, want, err_msg=what, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum,eps", [(0.1, 1e-5), (0.7, 1e-3), (1.0, 1e-8), (0.0, 0.1)])
@pytest.mark.parametrize("shape,axis,perm", LAYOUTS)
def test_training_matches_torch(shape, axis, perm, momentum, eps, affine, dtype):
    x, _, w, b, rm, rv = setup(shape, axis, dtype, seed=40)
    if not affine:
        w = b = None
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    want = F.batch_norm(to_torch(x, perm), t_rm, t_rv,
                        None if w is None else torch.from_numpy(w),
                        None if b is None else torch.from_numpy(b),
                        True, momentum, eps)
    y = bnfast.batch_norm(x, rm, rv, w, b, True, momentum, eps, axis=axis)
    assert y.dtype == np.dtype(dtype) and y.shape == shape
    close(y, from_torch(want, perm), dtype, "y")
    close(rm, t_rm.numpy(), dtype, "running_mean")
    close(rv, t_rv.numpy(), dtype, "running_var")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,axis,perm", LAYOUTS)
def test_eval_matches_torch(shape, axis, perm, affine, dtype):
    x, _, w, b, rm, rv = setup(shape, axis, dtype, seed=41)
    if not affine:
        w = b = None
    rm0, rv0 = rm.copy(), rv.copy()
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    want = F.batch_norm(to_torch(x, perm), t_rm, t_rv,
                        None if w is None else torch.from_numpy(w),
                        None if b is None else torch.from_numpy(b),
                        False, 0.1, 1e-5)
    y = bnfast.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, axis=axis)
    close(y, from_torch(want, perm), dtype, "y")
    y2 = bnfast.batch_norm_inference(x, rm, rv, w, b, axis=axis)
    close(y2, from_torch(want, perm), dtype, "batch_norm_inference")
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0)
    assert np.array_equal(rm, t_rm.numpy()) and np.array_equal(rv, t_rv.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,perm", LAYOUTS)
def test_training_without_running_stats_matches_torch(shape, axis, perm, dtype):
    x, _, w, b, _, _ = setup(shape, axis, dtype, seed=42)
    want = F.batch_norm(to_torch(x, perm), None, None, torch.from_numpy(w), torch.from_numpy(b),
                        True)
    y = bnfast.batch_norm(x, None, None, w, b, True, axis=axis)
    close(y, from_torch(want, perm), dtype, "y")
    y2, sm, si = bnfast.batch_norm_forward(x, w, b, axis=axis)
    close(y2, from_torch(want, perm), dtype, "batch_norm_forward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,axis,perm", LAYOUTS)
def test_gradients_match_autograd(shape, axis, perm, training, affine, dtype):
    eps = 1e-5
    x, g, w, b, rm, rv = setup(shape, axis, dtype, seed=43)
    tx = to_torch(x, perm, requires_grad=True)
    # weight/bias gradients are always returned; with no affine they are those of
    # weight = 1, bias = 0 -- which torch gives when it is handed those tensors.
    tw = torch.from_numpy(w if affine else np.ones_like(w)).requires_grad_(True)
    tb = torch.from_numpy(b if affine else np.zeros_like(b)).requires_grad_(True)
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    ty = F.batch_norm(tx, t_rm, t_rv, tw, tb, training, 0.1, eps)
    (ty * to_torch(g, perm)).sum().backward()

    weight = w if affine else None
    bias = b if affine else None
    if training:
        y, sm, si = bnfast.batch_norm_forward(x, weight, bias, rm, rv, momentum=0.1, eps=eps,
                                              axis=axis)
        close(rm, t_rm.numpy(), dtype, "running_mean")
        close(rv, t_rv.numpy(), dtype, "running_var")
    else:
        y = bnfast.batch_norm_inference(x, rm, rv, weight, bias, eps=eps, axis=axis)
        sm = rm
        si = (1.0 / np.sqrt(rv.astype(np.float64) + eps)).astype(dtype)
    close(y, from_torch(ty, perm), dtype, "y")
    gi, gw, gb = bnfast.batch_norm_backward(g, x, sm, si, weight, training=training, axis=axis)
    assert gi.dtype == gw.dtype == gb.dtype == np.dtype(dtype)
    close(gi, from_torch(tx.grad, perm), dtype, "grad_input")
    # reductions over up to a few hundred values: scale the float32 tolerance
    n = x.size // x.shape[axis]
    red_tol = dict(rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * max(1.0, np.sqrt(n)))
    np.testing.assert_allclose(gw, tw.grad.numpy(), err_msg="grad_weight", **red_tol)
    np.testing.assert_allclose(gb, tb.grad.numpy(), err_msg="grad_bias", **red_tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_memory_tensor(dtype):
    """A torch channels_last NCHW tensor's numpy view, passed with axis=1."""
    rng = np.random.default_rng(44)
    t = torch.from_numpy(rng.standard_normal((4, 6, 5, 3)).astype(dtype)) \
        .contiguous(memory_format=torch.channels_last)
    x = t.numpy()
    assert not x.flags.c_contiguous
    rm, rv = np.zeros(6, dtype), np.ones(6, dtype)
    t_rm, t_rv = torch.zeros(6, dtype=t.dtype), torch.ones(6, dtype=t.dtype)
    want = F.batch_norm(t, t_rm, t_rv, None, None, True, 0.1, 1e-5)
    y = bnfast.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5, axis=1)
    close(y, want.numpy(), dtype, "y")
    close(rv, t_rv.numpy(), dtype, "running_var")
