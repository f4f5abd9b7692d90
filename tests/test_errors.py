"""Bad input: a clear exception, never a crash or a silent wrong answer.

Every case of issue 2's bad-input list is run against every public op it
applies to.  Each failing call must raise the documented exception with a
message naming the problem, and must leave every array it was given --
running_mean / running_var, out=, x, weight, ... -- exactly as it was.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import bnfast
from bnfast import _reference as ref

C = 3
SHAPE = (4, C, 5)
DTYPES = [np.float32, np.float64]
DTYPE_MSG = r"(?s)(float32.*float64|float64.*float32)"
ONE_VALUE_MSG = r"^Expected more than 1 value per channel when training"


def valid(dtype):
    """A consistent, valid set of arguments (C = 3, x of shape (4, 3, 5))."""
    rng = np.random.default_rng(0)
    dt = np.dtype(dtype)
    x = rng.standard_normal(SHAPE).astype(dt)
    return SimpleNamespace(
        dtype=dt,
        x=x,
        g=rng.standard_normal(SHAPE).astype(dt),
        w=rng.uniform(0.5, 2.0, C).astype(dt),
        b=rng.standard_normal(C).astype(dt),
        rm=rng.standard_normal(C).astype(dt),
        rv=rng.uniform(0.5, 2.0, C).astype(dt),
        sm=x.mean(axis=(0, 2)).astype(dt),
        si=(1.0 / np.sqrt(x.var(axis=(0, 2)) + 1e-5)).astype(dt),
        out=np.full(SHAPE, 5.0, dt),
    )


# default (valid) arguments of each op, by parameter name
def defaults(op, A):
    if op == "forward":
        return dict(x=A.x, weight=A.w, bias=A.b, running_mean=A.rm, running_var=A.rv, out=A.out)
    if op == "inference":
        return dict(x=A.x, running_mean=A.rm, running_var=A.rv, weight=A.w, bias=A.b, out=A.out)
    if op == "backward":
        return dict(grad_out=A.g, x=A.x, save_mean=A.sm, save_invstd=A.si, weight=A.w,
                    training=True, out=A.out)
    if op == "backward_eval":
        return dict(grad_out=A.g, x=A.x, save_mean=A.rm, save_invstd=A.si, weight=A.w,
                    training=False, out=A.out)
    if op in ("bn_train", "bn_eval"):
        return dict(x=A.x, running_mean=A.rm, running_var=A.rv, weight=A.w, bias=A.b,
                    training=op == "bn_train", out=A.out)
    if op == "moments":
        return dict(x=A.x)
    raise AssertionError(op)


FUNCS = {
    "forward": (bnfast.batch_norm_forward, ["x"],
                {"momentum", "eps", "axis"}),
    "inference": (bnfast.batch_norm_inference, ["x", "running_mean", "running_var"],
                  {"eps", "axis"}),
    "backward": (bnfast.batch_norm_backward, ["grad_out", "x", "save_mean", "save_invstd"],
                 {"axis"}),
    "backward_eval": (bnfast.batch_norm_backward, ["grad_out", "x", "save_mean", "save_invstd"],
                      {"axis"}),
    "bn_train": (bnfast.batch_norm, ["x", "running_mean", "running_var"],
                 {"momentum", "eps", "axis"}),
    "bn_eval": (bnfast.batch_norm, ["x", "running_mean", "running_var"],
                {"eps", "axis"}),
    "moments": (bnfast.moments, ["x"], {"axis"}),
}


def build_call(op, A, overrides):
    fn, positional, extras = FUNCS[op]
    kw = defaults(op, A)
    for k, v in overrides.items():
        if k in kw or k in extras:
            kw[k] = v
    args = [kw.pop(name) for name in positional]
    return fn, args, kw


def snapshot(arrays):
    return [(a, a.copy()) for a in arrays if isinstance(a, np.ndarray) and a.dtype != object]


def assert_untouched(snap, context):
    for a, before in snap:
        assert np.array_equal(a, before, equal_nan=True), f"{context}: an input array was modified"


ALL = ["forward", "inference", "backward", "backward_eval", "bn_train", "bn_eval", "moments"]
AFFINE = ["forward", "inference", "bn_train", "bn_eval"]
WEIGHTED = AFFINE + ["backward", "backward_eval"]
RUNNING = ["forward", "inference", "bn_train", "bn_eval"]
TRAIN = ["forward", "bn_train"]
EPS = ["forward", "inference", "bn_train", "bn_eval"]
WITH_OUT = ["forward", "inference", "backward", "backward_eval", "bn_train", "bn_eval"]


def one_d(A):
    return dict(x=A.x[0, :, 0].copy(), grad_out=A.g[0, :, 0].copy(), axis=0,
                out=np.full(C, 5.0, A.dtype))


def shaped(shape, axis=1):
    def build(A):
        rng = np.random.default_rng(1)
        return dict(x=rng.standard_normal(shape).astype(A.dtype), axis=axis,
                    out=np.full(shape, 5.0, A.dtype))
    return build


def bad_vec(name, shape):
    return lambda A: {name: np.ones(shape, A.dtype)}


def readonly(name):
    def build(A):
        a = getattr(A, name)
        a.flags.writeable = False
        return {}
    return build


def readonly_out(A):
    A.out.flags.writeable = False
    return {}


def other_float(A):
    return np.float64 if A.dtype == np.float32 else np.float32


CASES = []


def case(ops, build, exc, match, name):
    for op in ops:
        CASES.append(pytest.param(op, build, exc, match, id=f"{name}-{op}"))


# non-float dtypes
for bad in ["int32", "int64", "uint8", "bool", "complex128", "complex64", "object"]:
    case(ALL, (lambda bad: lambda A: dict(x=A.x.astype(bad)))(bad), TypeError, DTYPE_MSG,
         f"x-{bad}")
case(["backward", "backward_eval"], lambda A: dict(grad_out=A.g.astype(np.int64)), TypeError,
     DTYPE_MSG, "grad_out-int64")

# ndim < 2, axis out of range
case(ALL, one_d, ValueError, r"(?i)dim", "ndim1")
case(ALL, lambda A: dict(axis=3), ValueError, r"(?i)axis", "axis3")
case(ALL, lambda A: dict(axis=-4), ValueError, r"(?i)axis", "axis-4")
case(ALL, lambda A: dict(axis=10**12), ValueError, r"(?i)axis", "axis-huge")

# per-channel arrays of the wrong length / ndim: message names the argument and (C,)
SHAPE_MSG = r"(?s)({name}.*(\(3,?\)|\b3\b)|(\(3,?\)|\b3\b).*{name})"
for name, ops in [("weight", WEIGHTED), ("bias", AFFINE), ("running_mean", RUNNING),
                  ("running_var", RUNNING)]:
    case(ops, bad_vec(name, (C + 1,)), ValueError, SHAPE_MSG.format(name=name), f"{name}-len4")
    case(ops, bad_vec(name, (C - 1,)), ValueError, SHAPE_MSG.format(name=name), f"{name}-len2")
    case(ops, bad_vec(name, (1, C)), ValueError, SHAPE_MSG.format(name=name), f"{name}-2d")
    case(ops, bad_vec(name, ()), ValueError, SHAPE_MSG.format(name=name), f"{name}-0d")
for name in ["save_mean", "save_invstd"]:
    case(["backward", "backward_eval"], bad_vec(name, (C + 1,)), ValueError,
         SHAPE_MSG.format(name=name), f"{name}-len4")
case(["backward", "backward_eval"], lambda A: dict(grad_out=np.ones((4, C, 6), A.dtype)),
     ValueError, r"(?i)grad_out|shape", "grad_out-shape")
case(["backward", "backward_eval"], lambda A: dict(grad_out=np.ones((4, C, 5, 1), A.dtype)),
     ValueError, r"(?i)grad_out|shape", "grad_out-ndim")

# training with one value per channel; zero-size batch in training
case(TRAIN, shaped((1, C)), ValueError, ONE_VALUE_MSG, "one-value-NC")
case(TRAIN, shaped((1, C, 1)), ValueError, ONE_VALUE_MSG, "one-value-NC1")
case(TRAIN, shaped((1, 1, 1, C), axis=-1), ValueError, ONE_VALUE_MSG, "one-value-NHWC")
case(TRAIN, shaped((0, C, 5)), ValueError, r"(?i)value per channel|empty|zero|size",
     "zero-batch")
case(TRAIN, shaped((4, C, 0)), ValueError, r"(?i)value per channel|empty|zero|size",
     "zero-spatial")

# eps < 0, momentum outside [0, 1]
for eps in [-1e-5, -1.0, -np.inf]:
    case(EPS, (lambda e: lambda A: dict(eps=e))(eps), ValueError, r"eps", f"eps{eps}")
for m in [-0.1, 1.1, np.inf, np.nan]:
    case(TRAIN, (lambda m: lambda A: dict(momentum=m))(m), ValueError, r"momentum",
         f"momentum{m}")

# out of the wrong shape / dtype, read-only out
case(WITH_OUT, lambda A: dict(out=np.full((4, C, 6), 5.0, A.dtype)), ValueError, r"out",
     "out-shape")
case(WITH_OUT, lambda A: dict(out=np.full((C, 4, 5), 5.0, A.dtype)), ValueError, r"out",
     "out-shape-permuted")
case(WITH_OUT, lambda A: dict(out=np.full(SHAPE, 5.0, other_float(A))), ValueError, r"out",
     "out-dtype")
case(WITH_OUT, lambda A: dict(out=np.full(SHAPE, 5, np.int64)), ValueError, r"out",
     "out-int")
case(WITH_OUT, readonly_out, ValueError, r"out", "out-readonly")

# read-only running arrays (training writes them); the other one is writable
RO_MSG = r"(?is)({name}.*(read.?only|writ)|(read.?only|writ).*{name})"
case(TRAIN, readonly("rm"), ValueError, RO_MSG.format(name="running_mean"), "ro-running_mean")
case(TRAIN, readonly("rv"), ValueError, RO_MSG.format(name="running_var"), "ro-running_var")

# running arrays that cannot be updated in place
case(TRAIN, lambda A: dict(running_mean=np.zeros(C, np.int64)), (TypeError, ValueError),
     r"running_mean", "running_mean-int")
case(TRAIN, lambda A: dict(running_var=np.ones(C, np.int32)), (TypeError, ValueError),
     r"running_var", "running_var-int")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,build,exc,match", CASES)
def test_bad_input(op, build, exc, match, dtype):
    A = valid(dtype)
    overrides = build(A)
    fn, args, kw = build_call(op, A, overrides)
    snap = snapshot([*vars(A).values(), *args, *kw.values()])
    with pytest.raises(exc, match=match):
        fn(*args, **kw)
    assert_untouched(snap, f"{op} failing call")
    # in particular the running statistics and out=
    assert np.array_equal(A.rm, valid(dtype).rm) and np.array_equal(A.rv, valid(dtype).rv)
    assert (A.out == 5.0).all()


# --------------------------------------------------------------------------- valid boundaries

@pytest.mark.parametrize("dtype", DTYPES)
def test_momentum_bounds_are_valid(dtype):
    A = valid(dtype)
    rm0, rv0 = A.rm.copy(), A.rv.copy()
    bnfast.batch_norm_forward(A.x, running_mean=A.rm, running_var=A.rv, momentum=0.0)
    assert np.array_equal(A.rm, rm0) and np.array_equal(A.rv, rv0)
    bnfast.batch_norm_forward(A.x, running_mean=A.rm, running_var=A.rv, momentum=1.0)
    n = A.x.size // C
    x64 = A.x.astype(np.float64)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(A.rm, x64.mean(axis=(0, 2)), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(A.rv, x64.var(axis=(0, 2)) * n / (n - 1), rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eps_zero_and_two_values_per_channel_are_valid(dtype):
    x = np.array([[[1.0, 3.0]], [[2.0, 6.0]]], dtype).transpose(0, 2, 1)  # (2, 2, 1)
    y, m, s = bnfast.batch_norm_forward(x, eps=0.0)
    want = ref.batch_norm_forward(x, eps=0.0)
    np.testing.assert_allclose(y, want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s, want[2], rtol=1e-6)
    x = np.arange(6, dtype=dtype).reshape(1, 3, 2)  # one sample, two values per channel
    y, m, s = bnfast.batch_norm_forward(x)
    np.testing.assert_allclose(y, ref.batch_norm_forward(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_inputs_are_accepted(dtype):
    A = valid(dtype)
    for a in (A.x, A.g, A.w, A.b, A.rm, A.rv, A.sm, A.si):
        a.flags.writeable = False
    y, m, s = bnfast.batch_norm_forward(A.x, A.w, A.b)
    np.testing.assert_allclose(y, ref.batch_norm_forward(A.x, A.w, A.b)[0], rtol=1e-4, atol=1e-4)
    y = bnfast.batch_norm_inference(A.x, A.rm, A.rv, A.w, A.b)
    np.testing.assert_allclose(y, ref.batch_norm_inference(A.x, A.rm, A.rv, A.w, A.b),
                               rtol=1e-4, atol=1e-4)
    # eval mode never writes the running statistics, so read-only ones are fine
    y = bnfast.batch_norm(A.x, A.rm, A.rv, A.w, A.b, training=False)
    np.testing.assert_allclose(y, ref.batch_norm_inference(A.x, A.rm, A.rv, A.w, A.b),
                               rtol=1e-4, atol=1e-4)
    gi, gw, gb = bnfast.batch_norm_backward(A.g, A.x, A.sm, A.si, A.w)
    np.testing.assert_allclose(gi, ref.batch_norm_backward(A.g, A.x, A.sm, A.si, A.w)[0],
                               rtol=1e-4, atol=1e-4)
    bnfast.moments(A.x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_without_running_stats_on_read_only_x(dtype):
    A = valid(dtype)
    A.x.flags.writeable = False
    y = bnfast.batch_norm(A.x, None, None, A.w, A.b, training=True)
    np.testing.assert_allclose(y, ref.batch_norm_forward(A.x, A.w, A.b)[0], rtol=1e-4, atol=1e-4)


def _updated_or_rejected(x, rm, rv, dtype, what):
    """Running arrays bnfast may reject; if accepted they must really be updated in place."""
    rm0, rv0 = rm.copy(), rv.copy()
    try:
        bnfast.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=0.5)
    except (TypeError, ValueError) as e:
        assert "running" in str(e), f"{what}: unhelpful message {e!r}"
        assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0), f"{what}: modified on error"
        return
    want = ref.batch_norm_forward(x, running_mean=rm0, running_var=rv0, momentum=0.5)
    rtol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-12
    np.testing.assert_allclose(rm, want[3], rtol=rtol, atol=rtol, err_msg=f"{what}: running_mean")
    np.testing.assert_allclose(rv, want[4], rtol=rtol, err_msg=f"{what}: running_var")


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_stats_of_other_float_dtype_updated_or_rejected(dtype):
    A = valid(dtype)
    other = np.float64 if np.dtype(dtype) == np.float32 else np.float32
    _updated_or_rejected(A.x, A.rm.astype(other), A.rv.astype(other), dtype, "other dtype")


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_running_stats_updated_or_rejected(dtype):
    A = valid(dtype)
    rm_buf = np.zeros(2 * C, dtype)
    rv_buf = np.ones(2 * C, dtype)
    rm_buf[::2], rv_buf[::-2] = A.rm, A.rv
    _updated_or_rejected(A.x, rm_buf[::2], rv_buf[::-2], dtype, "strided")
    assert (rm_buf[1::2] == 0).all() and (rv_buf[-2::-2] == 1).all(), "wrote between the strides"
