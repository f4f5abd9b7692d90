"""The functional API against the float64 NumPy reference.

Property tests (hypothesis) draw the shape (ndim 2..5, dims down to 1), the
channel axis (any valid one, negative included), the dtype, the memory layout
of every array (C or Fortran order, any axis permutation of memory -- which
includes channels-last memory passed with axis=1 --, slices with steps and
negative strides), optional weight/bias and running statistics.  Each result
is checked against ``bnfast._reference`` and against the result for the
contiguous copy of the same input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import bnfast
from bnfast import _reference as ref

DTYPES = [np.float32, np.float64]

# Elementwise outputs: |got - want| <= rtol*|want| + atol*max(1, max|want|).
TOL = {np.dtype(np.float32): (1e-5, 1e-4), np.dtype(np.float64): (1e-10, 1e-10)}
# Per-channel reductions: |got - want| <= SUM_RTOL * sum(|terms|) + tiny.
SUM_RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


# --------------------------------------------------------------------------- helpers

def assert_close(got, want, dtype, what=""):
    """Elementwise comparison of a bnfast output with a float64 reference."""
    dtype = np.dtype(dtype)
    assert isinstance(got, np.ndarray), f"{what}: not an ndarray ({type(got)})"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    rtol, atol = TOL[dtype]
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol * scale,
                               err_msg=what)


def assert_sum_close(got, want, sum_abs, dtype, what=""):
    """Per-channel sums: error bounded relative to the sum of |terms|."""
    dtype = np.dtype(dtype)
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    err = np.abs(got.astype(np.float64) - want)
    bound = SUM_RTOL[dtype] * sum_abs + 1e-30
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: channels {np.flatnonzero(bad)} got {got[bad]} "
                           f"want {want[bad]} (bound {bound[bad]})")


def assert_same(got, other, dtype, what=""):
    """Two bnfast results for the same data (e.g. strided vs contiguous input)."""
    assert got.dtype == np.dtype(dtype) and other.dtype == np.dtype(dtype), what
    other = other.astype(np.float64)
    assert_close(got, other, dtype, what)


def channel_sum_abs(a, axis):
    """sum(|a|) over every axis but ``axis``, in float64."""
    a = np.abs(np.asarray(a, dtype=np.float64))
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis]).sum(axis=0)


def per_channel(v, axis, ndim):
    """Reshape a (C,) vector so it broadcasts along ``axis`` of an ndim array."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v).reshape(shape)


@dataclass(frozen=True)
class Layout:
    """How an array is laid out in memory.

    order: "C", "F" or "perm" (memory order given by ``perm``, outermost first);
    steps: per-axis slice step (negative = reversed) taken from a larger buffer.
    """

    order: str = "C"
    perm: tuple = ()
    steps: tuple = ()

    def make(self, values, fill=np.nan):
        """An array equal to ``values`` with this memory layout.

        The elements of the underlying buffer outside the view are ``fill``
        (NaN by default), so a kernel reading outside the view is caught.
        """
        values = np.asarray(values)
        shape, ndim = values.shape, values.ndim
        steps = self.steps or (1,) * ndim
        big = tuple(s * abs(k) for s, k in zip(shape, steps))
        if self.order == "perm":
            perm = self.perm
            base = np.full([big[p] for p in perm], fill, dtype=values.dtype)
            buf = base.transpose(np.argsort(perm))
        else:
            buf = np.full(big, fill, dtype=values.dtype, order=self.order)
        view = buf[tuple(slice(None, None, k) for k in steps)]
        assert view.shape == shape
        view[...] = values
        return view


@st.composite
def layouts(draw, ndim):
    order = draw(st.sampled_from(["C", "F", "perm", "perm"]))
    perm = tuple(draw(st.permutations(range(ndim)))) if order == "perm" else ()
    strided = draw(st.booleans())
    if strided:
        steps = tuple(draw(st.lists(st.sampled_from([1, 2, 3, -1, -2]),
                                    min_size=ndim, max_size=ndim)))
    else:
        steps = ()
    return Layout(order, perm, steps)


# (offset, scale) of the data: benign conditioning, |offset|/scale small.
DATA = [(0.0, 1.0), (2.0, 0.5), (-5.0, 3.0), (0.0, 100.0), (1.0, 0.01)]


@dataclass
class Case:
    shape: tuple
    axis: int
    dtype: np.dtype
    x_layout: Layout
    g_layout: Layout
    out_layout: Layout
    seed: int
    data: tuple
    has_weight: bool
    has_bias: bool
    has_running: bool
    momentum: float
    eps: float

    @property
    def channels(self):
        return self.shape[self.axis]

    @property
    def rng(self):
        return np.random.default_rng(self.seed)

    def arrays(self):
        """x, grad_out, weight, bias, running_mean, running_var (dtype of x)."""
        rng = self.rng
        c, dt = self.channels, self.dtype
        off, scale = self.data
        x = self.x_layout.make((off + scale * rng.standard_normal(self.shape)).astype(dt))
        g = self.g_layout.make(rng.standard_normal(self.shape).astype(dt))
        sign = np.where(rng.random(c) < 0.5, -1.0, 1.0)
        w = (sign * rng.uniform(0.5, 2.0, c)).astype(dt) if self.has_weight else None
        b = rng.standard_normal(c).astype(dt) if self.has_bias else None
        if self.has_running:
            rm = rng.standard_normal(c).astype(dt)
            rv = rng.uniform(0.5, 2.0, c).astype(dt)
        else:
            rm = rv = None
        return x, g, w, b, rm, rv


@st.composite
def cases(draw, training=True):
    ndim = draw(st.integers(2, 5))
    max_dim = {2: 9, 3: 6, 4: 5, 5: 4}[ndim]
    shape = draw(st.lists(st.integers(1, max_dim), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    if training and math.prod(shape) // shape[axis] < 2:
        other = [i for i in range(ndim) if i != axis % ndim]
        shape[draw(st.sampled_from(other))] = 2
    return Case(
        shape=tuple(shape),
        axis=axis,
        dtype=np.dtype(draw(st.sampled_from(DTYPES))),
        x_layout=draw(layouts(ndim)),
        g_layout=draw(layouts(ndim)),
        out_layout=draw(layouts(ndim)),
        seed=draw(st.integers(0, 2**32 - 1)),
        data=draw(st.sampled_from(DATA)),
        has_weight=draw(st.booleans()),
        has_bias=draw(st.booleans()),
        has_running=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.5])),
    )


def copy_or_none(a):
    return None if a is None else a.copy()


def assert_unchanged(before, after, what):
    if before is None:
        assert after is None
        return
    assert np.array_equal(before, after, equal_nan=True), f"{what} was modified"


# --------------------------------------------------------------------------- forward

def check_forward(c, x, w, b, rm, rv, out=None):
    want_y, want_m, want_s, want_rm, want_rv = ref.batch_norm_forward(
        x, w, b, rm, rv, momentum=c.momentum, eps=c.eps, axis=c.axis)
    snapshot = [copy_or_none(a) for a in (x, w, b)]
    rm_obj, rv_obj = rm, rv
    y, sm, si = bnfast.batch_norm_forward(x, w, b, rm, rv, momentum=c.momentum, eps=c.eps,
                                          axis=c.axis, out=out)
    if out is None or out is not x:
        for before, after, name in zip(snapshot, (x, w, b), ("x", "weight", "bias")):
            assert_unchanged(before, after, name)
    if out is not None:
        assert y is out
    assert_close(y, want_y, c.dtype, "y")
    assert_close(sm, want_m, c.dtype, "save_mean")
    assert_close(si, want_s, c.dtype, "save_invstd")
    assert sm.shape == si.shape == (c.channels,)
    if rm is not None:
        assert rm is rm_obj and rv is rv_obj
        assert_close(rm, want_rm, c.dtype, "running_mean (in place)")
        assert_close(rv, want_rv, c.dtype, "running_var (in place)")
    return y, sm, si


@given(cases(training=True))
def test_forward_matches_reference(c):
    x, _, w, b, rm, rv = c.arrays()
    y, sm, si = check_forward(c, x, w, b, rm, rv)

    # Same result for the contiguous copy of the same data.
    rm2 = None if rm is None else np.ascontiguousarray(c.arrays()[4])
    rv2 = None if rv is None else np.ascontiguousarray(c.arrays()[5])
    y2, sm2, si2 = bnfast.batch_norm_forward(np.ascontiguousarray(x), w, b, rm2, rv2,
                                             momentum=c.momentum, eps=c.eps, axis=c.axis)
    assert_same(y, y2, c.dtype, "y vs contiguous")
    assert_same(sm, sm2, c.dtype, "save_mean vs contiguous")
    assert_same(si, si2, c.dtype, "save_invstd vs contiguous")
    if rm is not None:
        assert_same(rm, rm2, c.dtype, "running_mean vs contiguous")
        assert_same(rv, rv2, c.dtype, "running_var vs contiguous")


@given(cases(training=True))
def test_forward_out(c):
    x, _, w, b, rm, rv = c.arrays()
    out = c.out_layout.make(np.zeros(c.shape, c.dtype))
    check_forward(c, x, w, b, rm, rv, out=out)


@given(cases(training=True))
def test_forward_out_is_x(c):
    x, _, w, b, rm, rv = c.arrays()
    check_forward(c, x, w, b, rm, rv, out=x)


# --------------------------------------------------------------------------- inference

def check_inference(c, x, w, b, rm, rv, out=None):
    want = ref.batch_norm_inference(x, rm, rv, w, b, eps=c.eps, axis=c.axis)
    snapshot = [copy_or_none(a) for a in (w, b, rm, rv)]
    y = bnfast.batch_norm_inference(x, rm, rv, w, b, eps=c.eps, axis=c.axis, out=out)
    for before, after, name in zip(snapshot, (w, b, rm, rv),
                                   ("weight", "bias", "running_mean", "running_var")):
        assert_unchanged(before, after, name)
    if out is not None:
        assert y is out
    assert_close(y, want, c.dtype, "inference y")
    return y


def with_running(c):
    x, g, w, b, rm, rv = c.arrays()
    if rm is None:
        rng = c.rng
        rm = rng.standard_normal(c.channels).astype(c.dtype)
        rv = rng.uniform(0.5, 2.0, c.channels).astype(c.dtype)
    return x, g, w, b, rm, rv


@given(cases(training=False))
def test_inference_matches_reference(c):
    x, _, w, b, rm, rv = with_running(c)
    x_before = x.copy()
    y = check_inference(c, x, w, b, rm, rv)
    assert np.array_equal(x, x_before, equal_nan=True)
    y2 = bnfast.batch_norm_inference(np.ascontiguousarray(x), rm, rv, w, b, eps=c.eps, axis=c.axis)
    assert_same(y, y2, c.dtype, "inference vs contiguous")


@given(cases(training=False))
def test_inference_out(c):
    x, _, w, b, rm, rv = with_running(c)
    out = c.out_layout.make(np.zeros(c.shape, c.dtype))
    check_inference(c, x, w, b, rm, rv, out=out)


@given(cases(training=False))
def test_inference_out_is_x(c):
    x, _, w, b, rm, rv = with_running(c)
    check_inference(c, x, w, b, rm, rv, out=x)


# --------------------------------------------------------------------------- backward

def backward_stats(c, x, rm, rv, training):
    """save_mean / save_invstd in x's dtype: batch stats (training) or running (eval)."""
    if training:
        _, m, s, _, _ = ref.batch_norm_forward(x, eps=c.eps, axis=c.axis)
    else:
        m = np.asarray(rm, np.float64)
        s = 1.0 / np.sqrt(np.asarray(rv, np.float64) + c.eps)
    return m.astype(c.dtype), s.astype(c.dtype)


def check_backward(c, g, x, sm, si, w, training, out=None):
    gi_w, gw_w, gb_w = ref.batch_norm_backward(g, x, sm, si, w, training=training, axis=c.axis)
    x_hat = (x.astype(np.float64) - per_channel(sm.astype(np.float64), c.axis, x.ndim)) \
        * per_channel(si.astype(np.float64), c.axis, x.ndim)
    sum_abs_gw = channel_sum_abs(g.astype(np.float64) * x_hat, c.axis)
    sum_abs_gb = channel_sum_abs(g, c.axis)
    aliased = out is not None and (out is x or out is g)
    snapshot = {name: copy_or_none(a) for name, a in
                (("grad_out", g), ("x", x), ("save_mean", sm), ("save_invstd", si), ("weight", w))}
    gi, gw, gb = bnfast.batch_norm_backward(g, x, sm, si, w, training=training, axis=c.axis,
                                            out=out)
    for name, a in (("grad_out", g), ("x", x), ("save_mean", sm), ("save_invstd", si),
                    ("weight", w)):
        if aliased and a is out:
            continue
        assert_unchanged(snapshot[name], a, name)
    if out is not None:
        assert gi is out
    assert_close(gi, gi_w, c.dtype, f"grad_input (training={training})")
    assert_sum_close(gw, gw_w, sum_abs_gw, c.dtype, "grad_weight")
    assert_sum_close(gb, gb_w, sum_abs_gb, c.dtype, "grad_bias")
    return gi, gw, gb


def values_per_channel(c):
    return math.prod(c.shape) // c.channels


@pytest.mark.parametrize("training", [True, False])
@given(c=cases(training=False))
def test_backward_matches_reference(c, training):
    assume(not training or values_per_channel(c) >= 2)
    x, g, w, _, rm, rv = with_running(c)
    sm, si = backward_stats(c, x, rm, rv, training)
    gi, gw, gb = check_backward(c, g, x, sm, si, w, training)

    gi2, gw2, gb2 = bnfast.batch_norm_backward(np.ascontiguousarray(g), np.ascontiguousarray(x),
                                               sm, si, w, training=training, axis=c.axis)
    assert_same(gi, gi2, c.dtype, "grad_input vs contiguous")
    assert_same(gw, gw2, c.dtype, "grad_weight vs contiguous")
    assert_same(gb, gb2, c.dtype, "grad_bias vs contiguous")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("target", ["new", "grad_out", "x"])
@given(c=cases(training=False))
def test_backward_out(c, training, target):
    assume(not training or values_per_channel(c) >= 2)
    x, g, w, _, rm, rv = with_running(c)
    sm, si = backward_stats(c, x, rm, rv, training)
    out = {"new": lambda: c.out_layout.make(np.zeros(c.shape, c.dtype)),
           "grad_out": lambda: g, "x": lambda: x}[target]()
    check_backward(c, g, x, sm, si, w, training, out=out)


# --------------------------------------------------------------------------- non-contiguous out

SENTINEL = 777.0


def strided_out(shape, dtype):
    """A non-contiguous, reversed, Fortran-ordered view into a sentinel-filled buffer.

    Returns (out, buffer, outside) where ``outside`` masks the buffer elements
    that are not part of ``out`` (they must stay SENTINEL).
    """
    big = tuple(2 * s for s in shape)
    buf = np.full(big, SENTINEL, dtype=dtype, order="F")
    sl = tuple(slice(None, None, -2) if i % 2 else slice(1, None, 2) for i in range(len(shape)))
    out = buf[sl]
    outside = np.ones(big, bool)
    outside[sl] = False
    return out, buf, outside


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 3, 5, 2), 1), ((4, 5, 2, 3), -1), ((6, 3), 1)])
def test_noncontiguous_out_written_only_inside(shape, axis, dtype):
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)

    out, buf, outside = strided_out(shape, dtype)
    assert not out.flags.c_contiguous and not out.flags.f_contiguous
    y, sm, si = bnfast.batch_norm_forward(x, w, b, axis=axis, out=out)
    assert y is out
    assert_close(out, ref.batch_norm_forward(x, w, b, axis=axis)[0], dtype, "forward out")
    assert (buf[outside] == SENTINEL).all(), "forward wrote outside out"

    out, buf, outside = strided_out(shape, dtype)
    y = bnfast.batch_norm_inference(x, rm, rv, w, b, axis=axis, out=out)
    assert y is out
    assert_close(out, ref.batch_norm_inference(x, rm, rv, w, b, axis=axis), dtype, "inference out")
    assert (buf[outside] == SENTINEL).all(), "inference wrote outside out"

    for training in (True, False):
        out, buf, outside = strided_out(shape, dtype)
        gi, _, _ = bnfast.batch_norm_backward(g, x, sm, si, w, training=training, axis=axis,
                                              out=out)
        assert gi is out
        want = ref.batch_norm_backward(g, x, sm, si, w, training=training, axis=axis)[0]
        assert_close(out, want, dtype, f"backward out (training={training})")
        assert (buf[outside] == SENTINEL).all(), "backward wrote outside out"


# --------------------------------------------------------------------------- one row, strided

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [
    pytest.param(lambda a: a.reshape(1, 8)[:, ::2], id="(1,4)-step2"),
    pytest.param(lambda a: a.reshape(1, 8)[:, ::-2], id="(1,4)-step-2"),
    pytest.param(lambda a: a.reshape(1, 4, 2)[:, :, :1], id="(1,4,1)-sliced"),
    pytest.param(lambda a: a.reshape(8, 1).T[:, ::2], id="(1,4)-transposed-step2"),
])
def test_single_row_strided_input(make, dtype):
    """Only one value per channel (eval-mode ops), channels not adjacent in memory."""
    x = make(np.arange(1.0, 9.0, dtype=dtype))
    assert x.shape[1] == 4 and x.size == 4 and not x.flags.c_contiguous
    c = 4
    rm, rv = np.full(c, 0.5, dtype), np.full(c, 4.0, dtype)
    w, b = np.arange(1, 5, dtype=dtype), np.full(c, 0.25, dtype)
    want = ref.batch_norm_inference(x, rm, rv, w, b, eps=0.0)
    assert_close(bnfast.batch_norm_inference(x, rm, rv, w, b, eps=0.0), want, dtype, "inference")
    assert_close(bnfast.batch_norm(x, rm, rv, w, b, False, 0.1, 0.0), want, dtype, "batch_norm")
    g = np.ones(x.shape, dtype)
    si = np.full(c, 0.5, dtype)
    want_b = ref.batch_norm_backward(g, x, rm, si, w, training=False)
    gi, gw, gb = bnfast.batch_norm_backward(g, x, rm, si, w, training=False)
    assert_close(gi, want_b[0], dtype, "grad_input")
    assert_close(gw, want_b[1], dtype, "grad_weight")
    assert_close(gb, want_b[2], dtype, "grad_bias")
    gi, gw, gb = bnfast.batch_norm_backward(x, g, rm, si, w, training=False)  # strided grad_out
    want_b = ref.batch_norm_backward(x, g, rm, si, w, training=False)
    assert_close(gi, want_b[0], dtype, "grad_input (strided grad_out)")
    assert_close(gb, want_b[2], dtype, "grad_bias (strided grad_out)")
    m = bnfast.moments(x)
    np.testing.assert_array_equal(m.mean, np.asarray(x, np.float64).ravel())
    np.testing.assert_array_equal(m.m2, np.zeros(c))


# --------------------------------------------------------------------------- batch_norm wrapper

@pytest.mark.parametrize("training", [True, False])
@given(c=cases(training=True))
def test_batch_norm_wrapper(c, training):
    x, _, w, b, rm, rv = c.arrays()
    if not training and rm is None:
        x, _, w, b, rm, rv = with_running(c)
    if training:
        want, _, _, want_rm, want_rv = ref.batch_norm_forward(
            x, w, b, rm, rv, momentum=c.momentum, eps=c.eps, axis=c.axis)
    else:
        want = ref.batch_norm_inference(x, rm, rv, w, b, eps=c.eps, axis=c.axis)
        want_rm, want_rv = copy_or_none(rm), copy_or_none(rv)
    # torch.nn.functional.batch_norm positional order
    y = bnfast.batch_norm(x, rm, rv, w, b, training, c.momentum, c.eps, axis=c.axis)
    assert_close(y, want, c.dtype, f"batch_norm(training={training})")
    if rm is not None:
        if training:
            assert_close(rm, want_rm, c.dtype, "running_mean")
            assert_close(rv, want_rv, c.dtype, "running_var")
        else:
            assert np.array_equal(rm, want_rm.astype(c.dtype)), "eval mode changed running_mean"
            assert np.array_equal(rv, want_rv.astype(c.dtype)), "eval mode changed running_var"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_wrapper_out_is_x(training, dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 5, 2)).astype(dtype)
    rm = rng.standard_normal(3).astype(dtype)
    rv = rng.uniform(0.5, 2, 3).astype(dtype)
    w = rng.uniform(0.5, 2, 3).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    if training:
        want = ref.batch_norm_forward(x, w, b, rm, rv, momentum=0.2, eps=1e-4)[0]
    else:
        want = ref.batch_norm_inference(x, rm, rv, w, b, eps=1e-4)
    y = bnfast.batch_norm(x, rm, rv, w, b, training=training, momentum=0.2, eps=1e-4, out=x)
    assert y is x
    assert_close(x, want, dtype, "in-place batch_norm")


def test_batch_norm_defaults_are_eval_mode():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 3, 4))
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    rm0, rv0 = rm.copy(), rv.copy()
    y = bnfast.batch_norm(x, rm, rv)
    assert_close(y, ref.batch_norm_inference(x, rm0, rv0), np.float64, "default eval")
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0)


# --------------------------------------------------------------------------- explicit layouts

NCHW = (3, 4, 5, 6)


def layouts_for(shape):
    """Named layouts of an NCHW-ordered array, all seen with axis=1."""
    nd = len(shape)
    return {
        "contiguous": Layout(),
        "fortran": Layout("F"),
        "channels_last_memory": Layout("perm", (0,) + tuple(range(2, nd)) + (1,)),
        "negative_strides": Layout("C", (), (1, -1) + (-1,) * (nd - 2)),
        "stepped": Layout("C", (), (2, 1) + (3,) * (nd - 2)),
        "transposed_stepped": Layout("perm", tuple(reversed(range(nd))), (1, -2) + (2,) * (nd - 2)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(layouts_for(NCHW)))
def test_named_layouts_match_contiguous(name, dtype):
    layout = layouts_for(NCHW)[name]
    rng = np.random.default_rng(11)
    data = rng.standard_normal(NCHW).astype(dtype)
    g_data = rng.standard_normal(NCHW).astype(dtype)
    w = rng.uniform(0.5, 2, NCHW[1]).astype(dtype)
    b = rng.standard_normal(NCHW[1]).astype(dtype)
    x, g = layout.make(data), layout.make(g_data)
    assert np.array_equal(x, data)

    y, sm, si = bnfast.batch_norm_forward(x, w, b)
    y_c, sm_c, si_c = bnfast.batch_norm_forward(data, w, b)
    want = ref.batch_norm_forward(data, w, b)
    assert_close(y, want[0], dtype, name)
    assert_same(y, y_c, dtype, name + " y")
    assert_same(sm, sm_c, dtype, name + " save_mean")
    assert_same(si, si_c, dtype, name + " save_invstd")

    gi, gw, gb = bnfast.batch_norm_backward(g, x, sm, si, w)
    gi_c, gw_c, gb_c = bnfast.batch_norm_backward(g_data, data, sm, si, w)
    gi_w = ref.batch_norm_backward(g_data, data, sm, si, w)[0]
    assert_close(gi, gi_w, dtype, name + " grad_input")
    assert_same(gi, gi_c, dtype, name + " grad_input")
    assert_same(gw, gw_c, dtype, name + " grad_weight")
    assert_same(gb, gb_c, dtype, name + " grad_bias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_axis_minus_one_equals_axis_one(dtype):
    rng = np.random.default_rng(12)
    nchw = rng.standard_normal((4, 6, 5, 7)).astype(dtype)
    nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
    y1, m1, s1 = bnfast.batch_norm_forward(nchw, axis=1)
    y2, m2, s2 = bnfast.batch_norm_forward(nhwc, axis=-1)
    y3, m3, s3 = bnfast.batch_norm_forward(nhwc, axis=3)
    assert_same(y2.transpose(0, 3, 1, 2), y1, dtype, "y")
    assert_same(m2, m1, dtype, "save_mean")
    assert_same(s2, s1, dtype, "save_invstd")
    assert np.array_equal(y2, y3) and np.array_equal(m2, m3) and np.array_equal(s2, s3)


# --------------------------------------------------------------------------- empty

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 0, 3), 1), ((0, 3, 4), 1), ((0, 5, 3), -1),
                                        ((2, 3, 0), -1), ((0, 0), 0), ((5, 0), -1)])
def test_inference_zero_size_returns_empty(shape, axis, dtype):
    c = shape[axis]
    x = np.zeros(shape, dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    y = bnfast.batch_norm_inference(x, rm, rv, np.ones(c, dtype), np.zeros(c, dtype), axis=axis)
    assert y.shape == shape and y.dtype == np.dtype(dtype) and y.size == 0
    y = bnfast.batch_norm(x, rm, rv, axis=axis)
    assert y.shape == shape and y.dtype == np.dtype(dtype)


# --------------------------------------------------------------------------- moments

@given(cases(training=False))
def test_moments_match_reference(c):
    x = c.arrays()[0]
    m = bnfast.moments(x, axis=c.axis)
    count, mean, m2 = ref.moments(x, axis=c.axis)
    assert len(m) == c.channels
    assert m.count.dtype == np.int64 and m.mean.dtype == np.float64 and m.m2.dtype == np.float64
    assert np.array_equal(m.count, count)
    scale = np.max(np.abs(x.astype(np.float64)))
    np.testing.assert_allclose(m.mean, mean, rtol=1e-12, atol=1e-12 * scale)
    # m2: sum of squared deviations; accumulated in float64 whatever the input dtype.
    np.testing.assert_allclose(m.m2, m2, rtol=1e-9, atol=1e-12 * scale * scale)
    for ddof in (0, 1) if count[0] > 1 else (0,):
        want_var = m2 / (count - ddof)
        np.testing.assert_allclose(m.var(ddof=ddof), want_var, rtol=1e-9,
                                   atol=1e-12 * scale * scale)
    assert np.array_equal(m.var(), m.var(ddof=0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_moments_merge(dtype, axis):
    rng = np.random.default_rng(13)
    x = (3.0 + 2.0 * rng.standard_normal((10, 4, 6))).astype(dtype)
    a, b = x[:3], x[3:]
    merged = bnfast.moments(a, axis=axis).merge(bnfast.moments(b, axis=axis))
    count, mean, m2 = ref.moments(x, axis=axis)
    assert np.array_equal(merged.count, count)
    np.testing.assert_allclose(merged.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(merged.m2, m2, rtol=1e-10)

    whole = bnfast.moments(x, axis=axis)
    c = x.shape[axis]
    zeros = bnfast.Moments.zeros(c) if hasattr(bnfast, "Moments") else type(whole).zeros(c)
    assert len(zeros) == c and np.array_equal(zeros.count, np.zeros(c, np.int64))
    for m in (zeros.merge(whole), whole.merge(zeros)):
        assert np.array_equal(m.count, whole.count)
        assert np.array_equal(m.mean, whole.mean)
        assert np.array_equal(m.m2, whole.m2)
    empty = zeros.merge(type(whole).zeros(c))
    assert np.array_equal(empty.count, np.zeros(c, np.int64))
    assert np.isfinite(empty.mean).all() and np.isfinite(empty.m2).all()
    # merge returns a new object and leaves its operands alone
    before = (whole.count.copy(), whole.mean.copy(), whole.m2.copy())
    m = whole.merge(whole)
    assert m is not whole
    assert np.array_equal(whole.count, before[0]) and np.array_equal(whole.mean, before[1])
    assert np.array_equal(m.count, 2 * before[0])
    np.testing.assert_allclose(m.m2, 2 * before[2], rtol=1e-12)


# --------------------------------------------------------------------------- threads

def test_num_threads_roundtrip():
    for n in (1, 2, 1):
        bnfast.set_num_threads(n)
        assert bnfast.get_num_threads() == (n if bnfast._kernels.openmp_enabled() else 1)


def _all_outputs(x, g, w, b, rm, rv, axis):
    rm, rv = rm.copy(), rv.copy()
    y, sm, si = bnfast.batch_norm_forward(x, w, b, rm, rv, axis=axis)
    yi = bnfast.batch_norm_inference(x, rm, rv, w, b, axis=axis)
    gt = bnfast.batch_norm_backward(g, x, sm, si, w, training=True, axis=axis)
    ge = bnfast.batch_norm_backward(g, x, sm, si, w, training=False, axis=axis)
    m = bnfast.moments(x, axis=axis)
    return [y, sm, si, rm, rv, yi, *gt, *ge, m.count, m.mean, m.m2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,strided", [
    ((16, 8, 32, 32), 1, False),
    ((16, 32, 32, 8), -1, False),
    ((8, 24, 20, 20), 1, True),
    ((64, 40), 1, False),
    ((10, 9, 9, 24), -1, True),
])
def test_threads_bitwise_identical(shape, axis, strided, dtype):
    rng = np.random.default_rng(14)
    big = [s * 2 if strided and i != axis % len(shape) else s for i, s in enumerate(shape)]
    x = (1.5 + rng.standard_normal(big)).astype(dtype)
    g = rng.standard_normal(big).astype(dtype)
    if strided:
        sl = tuple(slice(None, None, -2) if i != axis % len(shape) else slice(None)
                   for i in range(len(shape)))
        x, g = x[sl], g[sl]
    c = shape[axis]
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)

    bnfast.set_num_threads(1)
    one = _all_outputs(x, g, w, b, rm, rv, axis)
    bnfast.set_num_threads(2)
    two = _all_outputs(x, g, w, b, rm, rv, axis)
    names = ["y", "save_mean", "save_invstd", "running_mean", "running_var", "inference",
             "gi_train", "gw_train", "gb_train", "gi_eval", "gw_eval", "gb_eval",
             "moments.count", "moments.mean", "moments.m2"]
    for name, a, b2 in zip(names, one, two):
        assert np.array_equal(a, b2), f"{name} differs between 1 and 2 threads"
    # and the outputs are right
    want = ref.batch_norm_forward(x, w, b, rm, rv, axis=axis)
    assert_close(two[0], want[0], dtype, "y")


# --------------------------------------------------------------------------- sizes around blocking

BLOCK_CASES = [
    # (shape, axis, memory transform) -- lengths straddling SIMD lanes, blocks, tasks, tiles
    pytest.param((2, 3, 17), 1, None, id="planar-17"),
    pytest.param((2, 3, 4097), 1, None, id="planar-4097"),
    pytest.param((1, 2, 16385), 1, None, id="planar-16385"),
    pytest.param((3, 1, 65537), 1, None, id="planar-65537-C1"),
    pytest.param((33, 5, 2049), 1, None, id="planar-many-tasks"),
    pytest.param((4097, 3), -1, None, id="rows-4097"),
    pytest.param((17, 1025), -1, None, id="rows-C1025"),
    pytest.param((70, 2049), 1, None, id="rows-NC-C2049"),
    pytest.param((65537, 1), -1, None, id="rows-C1"),
    pytest.param((8, 33, 33, 17), -1, None, id="NHWC-odd"),
    pytest.param((5000, 3), 1, "F", id="fortran-NC"),
    pytest.param((9, 7, 33, 31), 1, "NHWC-memory", id="NCHW-view-of-NHWC"),
    pytest.param((3, 2000, 5), -1, "F", id="fortran-NLC"),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,memory", BLOCK_CASES)
def test_sizes_around_kernel_blocks(shape, axis, memory, dtype, threads):
    bnfast.set_num_threads(threads)
    rng = np.random.default_rng(15)
    x = (0.7 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    if memory == "F":
        x, g = np.asfortranarray(x), np.asfortranarray(g)
    elif memory == "NHWC-memory":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        g = np.ascontiguousarray(g.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    c = shape[axis]
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    want = ref.batch_norm_forward(x, w, b, rm, rv, axis=axis)
    y, sm, si = bnfast.batch_norm_forward(x, w, b, rm, rv, axis=axis)
    assert_close(y, want[0], dtype, "y")
    assert_close(sm, want[1], dtype, "save_mean")
    assert_close(si, want[2], dtype, "save_invstd")
    assert_close(rm, want[3], dtype, "running_mean")
    assert_close(rv, want[4], dtype, "running_var")
    assert_close(bnfast.batch_norm_inference(x, rm, rv, w, b, axis=axis),
                 ref.batch_norm_inference(x, rm, rv, w, b, axis=axis), dtype, "inference")
    x_hat = (x.astype(np.float64) - per_channel(sm.astype(np.float64), axis, x.ndim)) \
        * per_channel(si.astype(np.float64), axis, x.ndim)
    for training in (True, False):
        gw_want = ref.batch_norm_backward(g, x, sm, si, w, training=training, axis=axis)
        gi, gw, gb = bnfast.batch_norm_backward(g, x, sm, si, w, training=training, axis=axis)
        assert_close(gi, gw_want[0], dtype, f"grad_input training={training}")
        assert_sum_close(gw, gw_want[1], channel_sum_abs(g * x_hat, axis), dtype, "grad_weight")
        assert_sum_close(gb, gw_want[2], channel_sum_abs(g, axis), dtype, "grad_bias")
    m = bnfast.moments(x, axis=axis)
    count, mean, m2 = ref.moments(x, axis=axis)
    assert np.array_equal(m.count, count)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.m2, m2, rtol=1e-10)
