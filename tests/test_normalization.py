"""The normalization family's functional API: layer, RMS, group, instance and
filter response norm.

- Every function against the float64 oracle (``bnfast._reference``), and
  every forward/backward pair against its one-call function.
- Properties (hypothesis) over shapes, channel axes and dtypes: byte order,
  alignment, ``out=`` (fresh in any memory, the input itself, overlapping an
  input or a weight), and the memory of every argument but x give the bits
  of the call on x as the kernels read it; x in another memory order (steps,
  transposed, Fortran order, negative strides) gives the bits of the
  contiguous call for layer/RMS norm, and agrees with it to rounding for the
  per-sample members, whose kernels then sum in another order (as batch
  norm's do: see tests/test_functional.py).
- Bit-identical results for 1 and 2 threads on shapes that go parallel.
- Finite-difference gradient checks (float64) of every backward.
- float32 accuracy with a large mean, constant groups giving exactly the bias,
  huge and tiny magnitudes, instance norm's running statistics.
- A battery of bad arguments: the right exception, a clear message, and no
  array of the call modified.
"""

from __future__ import annotations

import math
import re
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnfast
from bnfast import _reference as R

from _normalization_cases import (
    MEMORY_KINDS,
    assert_close,
    frn_tau_off_kink,
    in_memory,
    per_channel,
    same_bits,
    scale_of,
    tol,
)

DTYPES = (np.float32, np.float64)
MEMBERS = ("layer", "rms", "group", "instance", "frn")


# ------------------------------------------------------------ member wrappers
#
# ``p`` holds a call's scalar parameters: eps, and "shape" (layer/RMS: the
# normalized shape), "groups" (group norm), "axis" (group/instance/FRN),
# "momentum" (instance norm).


def forward(m, x, p, *, w=None, b=None, tau=None, rm=None, rv=None, out=None):
    """The member's ``*_forward``: (y, statistics...)."""
    if m == "layer":
        return bnfast.layer_norm_forward(x, p["shape"], w, b, p["eps"], out=out)
    if m == "rms":
        return bnfast.rms_norm_forward(x, p["shape"], w, p["eps"], out=out)
    if m == "group":
        return bnfast.group_norm_forward(x, p["groups"], w, b, p["eps"], axis=p["axis"], out=out)
    if m == "instance":
        return bnfast.instance_norm_forward(x, w, b, rm, rv, momentum=p.get("momentum", 0.1),
                                            eps=p["eps"], axis=p["axis"], out=out)
    if m == "frn":
        return bnfast.filter_response_norm_forward(x, w, b, tau, p["eps"], axis=p["axis"], out=out)
    raise ValueError(m)


def one_call(m, x, p, *, w=None, b=None, tau=None, rm=None, rv=None, out=None):
    """The member's torch-signature function."""
    if m == "layer":
        return bnfast.layer_norm(x, p["shape"], w, b, p["eps"], out=out)
    if m == "rms":
        return bnfast.rms_norm(x, p["shape"], w, p["eps"], out=out)
    if m == "group":
        return bnfast.group_norm(x, p["groups"], w, b, p["eps"], axis=p["axis"], out=out)
    if m == "instance":
        return bnfast.instance_norm(x, rm, rv, w, b, True, p.get("momentum", 0.1), p["eps"],
                                    axis=p["axis"], out=out)
    if m == "frn":
        return bnfast.filter_response_norm(x, w, b, tau, p["eps"], axis=p["axis"], out=out)
    raise ValueError(m)


def backward(m, g, x, saved, p, *, w=None, tau=None, out=None):
    """The member's ``*_backward`` with the statistics ``saved`` by its forward."""
    if m == "layer":
        return bnfast.layer_norm_backward(g, x, p["shape"], saved[1], saved[2], w, out=out)
    if m == "rms":
        return bnfast.rms_norm_backward(g, x, p["shape"], saved[1], w, out=out)
    if m == "group":
        return bnfast.group_norm_backward(g, x, p["groups"], saved[1], saved[2], w, axis=p["axis"],
                                          out=out)
    if m == "instance":
        return bnfast.instance_norm_backward(g, x, saved[1], saved[2], w, axis=p["axis"], out=out)
    if m == "frn":
        return bnfast.filter_response_norm_backward(g, x, saved[0], saved[1], w, tau,
                                                    axis=p["axis"], out=out)
    raise ValueError(m)


def normalized(p) -> tuple:
    s = p["shape"]
    return (int(s),) if np.ndim(s) == 0 else tuple(s)


def _stat_shape(x, p):
    k = len(normalized(p))
    return x.shape[: x.ndim - k] + (1,) * k


def ref_forward(m, x, p, *, w=None, b=None, tau=None):
    """The float64 oracle's outputs, shaped as the member's forward returns them."""
    if m == "layer":
        y, mean, inv = R.layer_norm_forward(x, p["shape"], w, b, p["eps"])
        return y, mean.reshape(_stat_shape(x, p)), inv.reshape(_stat_shape(x, p))
    if m == "rms":
        y, inv = R.rms_norm_forward(x, p["shape"], w, p["eps"])
        return y, inv.reshape(_stat_shape(x, p))
    if m == "group":
        return R.group_norm_forward(x, p["groups"], w, b, p["eps"], axis=p["axis"])
    if m == "instance":
        return R.instance_norm_forward(x, w, b, eps=p["eps"], axis=p["axis"])[:3]
    if m == "frn":
        return R.filter_response_norm_forward(x, w, b, tau, p["eps"], axis=p["axis"])
    raise ValueError(m)


def ref_backward(m, g, x, p, *, w=None, b=None, tau=None):
    if m == "layer":
        return R.layer_norm_backward(g, x, p["shape"], w, p["eps"])
    if m == "rms":
        return R.rms_norm_backward(g, x, p["shape"], w, p["eps"])
    if m == "group":
        return R.group_norm_backward(g, x, p["groups"], w, p["eps"], axis=p["axis"])
    if m == "instance":
        return R.instance_norm_backward(g, x, w, p["eps"], axis=p["axis"])
    if m == "frn":
        return R.filter_response_norm_backward(g, x, w, b, tau, p["eps"], axis=p["axis"])
    raise ValueError(m)


def affine_shape(m, x, p):
    return normalized(p) if m in ("layer", "rms") else (x.shape[p["axis"]],)


def has_bias(m):
    return m != "rms"


def check_close(m, x, p, got, want, *, w=None, b=None, tau=None, what="forward", g=None):
    """``got`` (a forward's or a backward's outputs) within tolerance of ``want``
    (the oracle's, or another bnfast call's on the same values)."""
    dtype = x.dtype
    inv = float(np.max(ref_forward(m, x, p, w=w, b=b, tau=tau)[-1]))
    # a mean large against the spread: the input's rounding is amplified by max|x| * invstd
    cond = max(1.0, float(np.max(np.abs(x))) * inv) if m in ("layer", "group", "instance") else 1.0
    wmax = 1.0 if w is None else max(1.0, float(np.max(np.abs(w))))
    assert len(got) == len(want)
    for i, (a, e) in enumerate(zip(got, want)):
        assert a.shape == np.shape(e), (i, a.shape, np.shape(e))
        assert a.dtype.newbyteorder("=") == dtype.newbyteorder("="), (i, a.dtype, dtype)
    if what == "forward":
        bmax = 0.0 if b is None else float(np.max(np.abs(b)))
        assert_close(got[0], want[0], dtype, scale=max(scale_of(want[0]), wmax + bmax) * cond, err_msg="y")
        for i in range(1, len(got)):
            assert_close(got[i], want[i], dtype, factor=cond, err_msg=f"statistic {i}")
        return
    # grad_input is invstd times a difference of terms of size |weight * grad_out|
    gi_scale = max(scale_of(want[0]), inv * wmax * scale_of(g))
    assert_close(got[0], want[0], dtype, scale=gi_scale, factor=4 * cond, err_msg="grad_input")
    for i in range(1, len(got)):
        assert_close(got[i], want[i], dtype, factor=4 * cond, err_msg=f"grad {i}")


def check_against_reference(m, x, p, got, *, w=None, b=None, tau=None, what="forward", g=None):
    """``got`` within tolerance of the float64 oracle."""
    if what == "forward":
        want = ref_forward(m, x, p, w=w, b=b, tau=tau)
    else:
        want = ref_backward(m, g, x, p, w=w, b=b, tau=tau)
    check_close(m, x, p, got, want, w=w, b=b, tau=tau, what=what, g=g)


def _rng(seed=0):
    return np.random.default_rng(seed)


def make_affine(m, x, p, rng, *, weight=True, bias=True, tau=False):
    shape = affine_shape(m, x, p)
    w = rng.uniform(-2.0, 2.0, shape).astype(x.dtype) if weight else None
    b = rng.standard_normal(shape).astype(x.dtype) if bias and has_bias(m) else None
    t = None
    if tau and m == "frn":
        z = bnfast.filter_response_norm(x, w, b, None, p["eps"], axis=p["axis"])
        t = frn_tau_off_kink(z, p["axis"]).astype(x.dtype)
    return w, b, t


# ----------------------------------------------------- against the reference

REFERENCE_CASES = [
    ("layer", (6, 10), dict(shape=(10,))),
    ("layer", (3, 4, 5), dict(shape=(5,))),
    ("layer", (3, 4, 5), dict(shape=(4, 5))),
    ("layer", (3, 4, 5), dict(shape=(3, 4, 5))),
    ("layer", (2, 3, 4, 5), dict(shape=(4, 5))),
    ("layer", (7, 1), dict(shape=(1,))),
    ("layer", (2, 3, 1, 1), dict(shape=(1, 1))),
    ("layer", (9,), dict(shape=9)),
    ("rms", (6, 10), dict(shape=(10,))),
    ("rms", (3, 4, 5), dict(shape=(4, 5))),
    ("rms", (2, 3, 4, 5), dict(shape=(5,))),
    ("rms", (7, 1), dict(shape=(1,))),
    ("rms", (9,), dict(shape=[9])),
    ("group", (6, 8), dict(groups=2, axis=1)),
    ("group", (6, 8), dict(groups=8, axis=1)),
    ("group", (6, 8), dict(groups=1, axis=-1)),
    ("group", (3, 6, 5), dict(groups=3, axis=1)),
    ("group", (3, 5, 6), dict(groups=3, axis=-1)),
    ("group", (2, 8, 3, 4), dict(groups=4, axis=1)),
    ("group", (2, 3, 4, 8), dict(groups=4, axis=-1)),
    ("group", (2, 3, 6, 4), dict(groups=2, axis=2)),
    ("group", (2, 4, 2, 3, 2), dict(groups=2, axis=1)),
    ("group", (2, 2, 3, 2, 4), dict(groups=2, axis=-1)),
    ("instance", (3, 4, 5), dict(axis=1)),
    ("instance", (3, 5, 4), dict(axis=-1)),
    ("instance", (2, 3, 4, 5), dict(axis=1)),
    ("instance", (2, 4, 5, 3), dict(axis=3)),
    ("instance", (2, 4, 3, 5), dict(axis=2)),
    ("instance", (2, 3, 2, 3, 2), dict(axis=1)),
    ("instance", (2, 2, 3, 2, 3), dict(axis=-1)),
    ("frn", (3, 4, 5), dict(axis=1)),
    ("frn", (3, 5, 4), dict(axis=-1)),
    ("frn", (2, 3, 4, 5), dict(axis=1)),
    ("frn", (2, 4, 5, 3), dict(axis=-1)),
    ("frn", (2, 4, 3, 5), dict(axis=-2)),
    ("frn", (2, 3, 2, 3, 2), dict(axis=1)),
]


def _case_id(case):
    m, shape, p = case
    extra = ",".join(f"{k}={v}" for k, v in p.items())
    return f"{m}-{'x'.join(map(str, shape))}-{extra}"


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=[_case_id(c) for c in REFERENCE_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("eps", [1e-5, 0.1, "default"])
def test_against_reference(case, dtype, affine, eps):
    m, shape, params = case
    rng = _rng(zlib.crc32(repr((m, shape, affine)).encode()))
    p = dict(params)
    if eps == "default":
        p["eps"] = {"rms": None, "frn": 1e-6}.get(m, 1e-5)
    else:
        p["eps"] = -eps if m == "frn" and eps == 0.1 else eps  # FRN uses |eps|
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w, b, tau = make_affine(m, x, p, rng, weight=affine != "none", bias=affine == "both",
                            tau=affine == "both")
    fwd = forward(m, x, p, w=w, b=b, tau=tau)
    check_against_reference(m, x, p, fwd, w=w, b=b, tau=tau)
    # the one-call function is the forward's first output, to the bit
    same_bits(one_call(m, x, p, w=w, b=b, tau=tau), fwd[0])
    bwd = backward(m, g, x, fwd, p, w=w, tau=tau)
    check_against_reference(m, x, p, bwd, w=w, b=b, tau=tau, what="backward", g=g)


def test_default_eps_values():
    """layer/group/instance: 1e-5; RMS: the dtype's machine epsilon; FRN: 1e-6."""
    rng = _rng(1)
    for dtype in DTYPES:
        x = rng.standard_normal((3, 4, 5)).astype(dtype) * 1e-3  # eps matters at this scale
        same_bits(bnfast.layer_norm(x, (5,)), bnfast.layer_norm(x, (5,), eps=1e-5))
        same_bits(bnfast.rms_norm(x, (5,)), bnfast.rms_norm(x, (5,), eps=float(np.finfo(dtype).eps)))
        same_bits(bnfast.group_norm(x, 2), bnfast.group_norm(x, 2, eps=1e-5))
        same_bits(bnfast.instance_norm(x), bnfast.instance_norm(x, eps=1e-5))
        same_bits(bnfast.filter_response_norm(x), bnfast.filter_response_norm(x, eps=1e-6))
        same_bits(bnfast.filter_response_norm(x, eps=-1e-6), bnfast.filter_response_norm(x, eps=1e-6))


def test_statistics_shapes_and_values():
    rng = _rng(2)
    x = rng.standard_normal((2, 3, 4, 5))
    y, mean, inv = bnfast.layer_norm_forward(x, (4, 5))
    assert mean.shape == inv.shape == (2, 3, 1, 1)
    np.testing.assert_allclose(mean, x.mean(axis=(2, 3), keepdims=True), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(inv, 1 / np.sqrt(x.var(axis=(2, 3), keepdims=True) + 1e-5), rtol=1e-13)
    y, inv = bnfast.rms_norm_forward(x, 5)
    assert inv.shape == (2, 3, 4, 1)
    _, mean, inv = bnfast.group_norm_forward(x, 3)
    assert mean.shape == inv.shape == (2, 3)
    _, mean, inv = bnfast.group_norm_forward(x, 5, axis=-1)
    assert mean.shape == inv.shape == (2, 5)
    np.testing.assert_allclose(mean, x.mean(axis=(1, 2)), rtol=1e-13, atol=1e-15)
    _, mean, inv = bnfast.instance_norm_forward(x, axis=2)
    assert mean.shape == inv.shape == (2, 4)
    np.testing.assert_allclose(mean, x.mean(axis=(1, 3)), rtol=1e-13, atol=1e-15)
    _, inv = bnfast.filter_response_norm_forward(x, axis=-1)
    assert inv.shape == (2, 5)
    np.testing.assert_allclose(inv, 1 / np.sqrt((x * x).mean(axis=(1, 2)) + 1e-6), rtol=1e-13)


@pytest.mark.parametrize("m", MEMBERS)
def test_empty_batch(m):
    x = np.zeros((0, 4, 3), np.float32)
    p = dict(shape=(4, 3), groups=2, axis=1, eps=1e-5)
    out = forward(m, x, p)
    assert out[0].shape == x.shape and out[0].dtype == x.dtype
    grads = backward(m, np.zeros_like(x), x, out, p)
    assert grads[0].shape == x.shape
    for gr in grads[1:]:
        np.testing.assert_array_equal(gr, 0)


# ------------------------------------------------------------ running stats


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((2, 3, 4, 5), 1), ((2, 4, 5, 3), -1),
                                        ((3, 2, 3, 2, 2), 1)])
def test_instance_norm_running_stats(dtype, momentum, shape, axis):
    rng = _rng(3)
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    c = shape[axis]
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm0 = rng.standard_normal(c).astype(dtype)
    rv0 = rng.uniform(0.5, 2, c).astype(dtype)
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, inv = bnfast.instance_norm_forward(x, w, b, rm, rv, momentum=momentum, axis=axis)
    want = R.instance_norm_forward(x, w, b, rm0, rv0, momentum=momentum, axis=axis)
    assert_close(y, want[0], dtype, err_msg="y")
    assert_close(mean, want[1], dtype)
    assert_close(inv, want[2], dtype)
    assert rm.dtype == rv.dtype == np.dtype(dtype)
    assert_close(rm, want[3], dtype, err_msg="running_mean")
    assert_close(rv, want[4], dtype, err_msg="running_var")
    # the one-call function: the same output and the same updates, to the bit
    rm2, rv2 = rm0.copy(), rv0.copy()
    y2 = bnfast.instance_norm(x, rm2, rv2, w, b, True, momentum, axis=axis)
    same_bits(y2, y)
    same_bits(rm2, rm)
    same_bits(rv2, rv)
    # no running statistics: the same output
    same_bits(bnfast.instance_norm_forward(x, w, b, momentum=momentum, axis=axis)[0], y)


@pytest.mark.parametrize("kind", ["swapped", "strided", "negative", "unaligned"])
def test_instance_norm_running_stats_in_any_memory(kind):
    rng = _rng(4)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)
    rm0 = rng.standard_normal(5).astype(np.float32)
    rv0 = rng.uniform(0.5, 2, 5).astype(np.float32)
    rm, rv = rm0.copy(), rv0.copy()
    y = bnfast.instance_norm(x, rm, rv, momentum=0.3)
    rmv, rvv = in_memory(rm0, kind), in_memory(rv0, kind)
    dtype_before = rmv.dtype
    y2 = bnfast.instance_norm(x, rmv, rvv, momentum=0.3)
    same_bits(y2, y)
    assert rmv.dtype == dtype_before and rvv.dtype == dtype_before  # byte order kept
    same_bits(rmv, rm)
    same_bits(rvv, rv)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("axis", [1, -1])
def test_instance_norm_without_input_stats(dtype, axis):
    rng = _rng(5)
    x = rng.standard_normal((3, 4, 6)).astype(dtype)
    c = x.shape[axis]
    rm = rng.standard_normal(c).astype(dtype)
    rv = rng.uniform(0.5, 2, c).astype(dtype)
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y = bnfast.instance_norm(x, rm, rv, w, b, use_input_stats=False, eps=1e-3, axis=axis)
    assert y.dtype == dtype
    assert_close(y, R.batch_norm_inference(x, rm0, rv0, w, b, eps=1e-3, axis=axis), dtype)
    same_bits(rm, rm0)  # nothing updated
    same_bits(rv, rv0)
    same_bits(y, bnfast.batch_norm_inference(x, rm0, rv0, w, b, eps=1e-3, axis=axis))


# ---------------------------------------------------------------- properties


@st.composite
def st_case(draw, m):
    """(member, x contiguous native, params, weight, bias, tau, seed)."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    ndim = draw(st.integers(3 if m in ("instance", "frn") else 2, 5))
    top = 4 if ndim <= 3 else 3
    shape = draw(st.lists(st.integers(1, top), min_size=ndim, max_size=ndim))
    p = dict(eps=draw(st.sampled_from([1e-5, 1e-3, 0.5])))
    if m in ("layer", "rms"):
        k = draw(st.integers(1, ndim))
        p["shape"] = tuple(shape[ndim - k:])
        if m == "rms" and draw(st.booleans()):
            p["eps"] = None
    else:
        pos = draw(st.one_of(st.just(1), st.just(ndim - 1), st.integers(1, ndim - 1)))
        if m == "group":
            groups = draw(st.integers(1, 4))
            shape[pos] = groups * draw(st.integers(1, 3))
            p["groups"] = groups
        if m == "instance":
            others = [i for i in range(1, ndim) if i != pos]
            if math.prod(shape[i] for i in others) <= 1:
                shape[draw(st.sampled_from(others))] = 2
            p["momentum"] = draw(st.sampled_from([0.0, 0.1, 1.0]))
        p["axis"] = pos - ndim if draw(st.booleans()) else pos
    shape = tuple(shape)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = _rng(seed)
    x = (rng.standard_normal(shape) * draw(st.sampled_from([1.0, 0.01, 100.0]))
         + draw(st.sampled_from([0.0, 3.0, -1e3]))).astype(dtype)
    if m != "instance" and draw(st.integers(0, 9)) == 0:
        x[...] = x.flat[0]  # constant input (zero variance)
    w, b, tau = make_affine(m, x, p, rng, weight=draw(st.booleans()), bias=draw(st.booleans()),
                            tau=draw(st.booleans()))
    return m, x, p, w, b, tau, rng


def st_kinds():
    return st.lists(st.sampled_from(MEMORY_KINDS), max_size=2)


def chain(a, kinds, rng):
    for k in kinds:
        a = in_memory(a, k, rng)
    return a


def affine_variant(v, kind, rng):
    if v is None:
        return None
    if kind == "list":
        return v.tolist()
    if kind == "other-float":  # a wider float: the same values
        return v.astype(np.float64) if v.dtype == np.float32 else v.astype(">f8")
    return in_memory(v, kind, rng)


ST_AFFINE = st.sampled_from(["contiguous", "swapped", "strided", "negative", "unaligned", "list",
                             "other-float", "fortran"])


def native_twin(a):
    """What the kernels read for ``a``: ``a`` itself, or its native copy in
    the same memory order."""
    if a.dtype.isnative and a.flags.aligned:
        return a
    return a.astype(a.dtype.newbyteorder("="), order="K")


def check_layout(m, x, p, twin_out, want, **kw):
    """The call on x's values in another memory order against the contiguous
    call: the same bits for layer/RMS norm (rows are always read in order) and
    for a C-contiguous input; within a few rounding errors otherwise (another
    memory order is summed in another order)."""
    xt = kw.pop("xt")
    if m in ("layer", "rms") or xt.flags.c_contiguous:
        for i, (a, e) in enumerate(zip(twin_out, want)):
            same_bits(a, e, err_msg=f"output {i}, x strides {xt.strides}")
    else:
        check_close(m, x, p, twin_out, want, **kw)


def copy(a):
    return None if a is None else a.copy()


def _forward_property(data, m):
    m, x, p, w, b, tau, rng = data.draw(st_case(m))
    rm0 = rv0 = None
    if m == "instance" and data.draw(st.booleans()):
        c = x.shape[p["axis"]]
        rm0 = rng.standard_normal(c).astype(x.dtype)
        rv0 = rng.uniform(0.5, 2, c).astype(x.dtype)
    rm_c, rv_c = copy(rm0), copy(rv0)
    want = forward(m, x, p, w=w, b=b, tau=tau, rm=rm_c, rv=rv_c)
    if data.draw(st.integers(0, 3)) == 0:  # cheap enough to check now and then
        check_against_reference(m, x, p, want, w=w, b=b, tau=tau)

    mode = data.draw(st.sampled_from(["none", "fresh", "x", "flip", "shifted", "weight-in-out"]), label="out")
    if mode == "shifted":  # out overlaps x partly: x and out a few elements apart in one buffer
        shift = data.draw(st.integers(1, max(1, x.size - 1)))
        buf = np.full(x.size + shift, np.nan, x.dtype)
        xv = buf[: x.size].reshape(x.shape)
        xv[...] = x
    else:
        xv = chain(x.copy(), data.draw(st_kinds(), label="x memory"), rng)
    # the same call on what the kernels read, with every other argument plain
    xt = native_twin(xv)
    rm_t, rv_t = copy(rm0), copy(rv0)
    twin = [copy(a) for a in forward(m, xt, p, w=w, b=b, tau=tau, rm=rm_t, rv=rv_t)]
    check_layout(m, x, p, twin, want, w=w, b=b, tau=tau, xt=xt)
    if rm0 is not None:
        if xt.flags.c_contiguous:
            same_bits(rm_t, rm_c)
            same_bits(rv_t, rv_c)
        else:
            assert_close(rm_t, rm_c, x.dtype, factor=10)
            assert_close(rv_t, rv_c, x.dtype, scale=scale_of(rv_c) * 10, factor=10)

    wkind = data.draw(ST_AFFINE, label="affine memory")
    wv, bv, tv = (affine_variant(v, wkind, rng) for v in (w, b, tau))
    rkind = data.draw(st.sampled_from(["contiguous", "swapped", "strided", "negative"]))
    rmv = None if rm0 is None else in_memory(rm0.copy(), rkind, rng)
    rvv = None if rv0 is None else in_memory(rv0.copy(), rkind, rng)
    out = None
    if mode == "shifted":
        out = buf[shift:].reshape(x.shape)
    elif mode == "fresh":
        out = chain(np.full(x.shape, np.nan, x.dtype), data.draw(st_kinds(), label="out memory"), rng)
    elif mode == "x":
        out = xv
    elif mode == "flip":
        out = np.flip(xv, data.draw(st.integers(0, x.ndim - 1)))
    elif mode == "weight-in-out":
        out = np.full(x.shape, np.nan, x.dtype)
        if w is not None:  # the weight read from memory the call writes
            wv = out.reshape(-1)[: w.size].reshape(w.shape)
            wv[...] = w
    got = forward(m, xv, p, w=wv, b=bv, tau=tv, rm=rmv, rv=rvv, out=out)
    if out is not None:
        assert got[0] is out
    # byte order, alignment, the memory of every other argument and out= change no bit
    assert len(got) == len(twin)
    for i, (a, e) in enumerate(zip(got, twin)):
        same_bits(a, e, err_msg=f"output {i}, x strides {xv.strides}, out mode {mode}")
    if rm0 is not None:
        same_bits(rmv, rm_t, err_msg="running_mean")
        same_bits(rvv, rv_t, err_msg="running_var")
    if mode not in ("x", "flip", "shifted"):
        same_bits(xv, x, err_msg="x modified")
    for before, after in ((b, bv), (tau, tv)):
        if isinstance(after, np.ndarray):
            np.testing.assert_array_equal(after, before)  # read-only arguments unchanged


def _backward_property(data, m):
    m, x, p, w, b, tau, rng = data.draw(st_case(m))
    g = rng.standard_normal(x.shape).astype(x.dtype)
    saved = forward(m, x, p, w=w, b=b, tau=tau)
    want = backward(m, g, x, saved, p, w=w, tau=tau)
    if data.draw(st.integers(0, 3)) == 0:
        check_against_reference(m, x, p, want, w=w, b=b, tau=tau, what="backward", g=g)

    xv = chain(x.copy(), data.draw(st_kinds(), label="x memory"), rng)
    xt = native_twin(xv)
    twin = [a.copy() for a in backward(m, g, xt, saved, p, w=w, tau=tau)]
    check_layout(m, x, p, twin, want, w=w, b=b, tau=tau, what="backward", g=g, xt=xt)

    modes = ["none", "fresh", "x", "grad", "flip-grad", "shifted-grad"] + (["y"] if m == "frn" else [])
    mode = data.draw(st.sampled_from(modes), label="out")
    if mode == "shifted-grad":  # out overlaps grad_out partly
        shift = data.draw(st.integers(1, max(1, x.size - 1)))
        buf = np.full(x.size + shift, np.nan, x.dtype)
        gv = buf[: x.size].reshape(x.shape)
        gv[...] = g
    else:
        gv = chain(g.copy(), data.draw(st_kinds(), label="grad memory"), rng)
    skind = data.draw(st.sampled_from(["contiguous", "swapped", "strided", "other-float", "list"]))
    saved_v = [affine_variant(s.copy(), skind, rng) for s in saved]
    if m == "frn":
        saved_v[0] = chain(saved[0].copy(), data.draw(st_kinds(), label="y memory"), rng)
    wkind = data.draw(ST_AFFINE, label="affine memory")
    wv, tv = affine_variant(w, wkind, rng), affine_variant(tau, wkind, rng)
    out = {"none": None, "x": xv, "grad": gv, "y": saved_v[0]}.get(mode)
    if mode == "shifted-grad":
        out = buf[shift:].reshape(x.shape)
    elif mode == "fresh":
        out = chain(np.full(x.shape, np.nan, x.dtype), data.draw(st_kinds(), label="out memory"), rng)
    elif mode == "flip-grad":
        out = np.flip(gv, data.draw(st.integers(0, x.ndim - 1)))
    got = backward(m, gv, xv, saved_v, p, w=wv, tau=tv, out=out)
    if out is not None:
        assert got[0] is out
    assert len(got) == len(twin)
    for i, (a, e) in enumerate(zip(got, twin)):
        same_bits(a, e, err_msg=f"gradient {i}, x strides {xv.strides}, out mode {mode}")
    if mode != "x":
        same_bits(xv, x, err_msg="x modified")
    if mode not in ("grad", "flip-grad", "shifted-grad"):
        same_bits(gv, g, err_msg="grad_out modified")


@pytest.mark.parametrize("m", MEMBERS)
@settings(max_examples=120)
@given(data=st.data())
def test_forward_in_any_memory(m, data):
    _forward_property(data, m)


@pytest.mark.parametrize("m", MEMBERS)
@settings(max_examples=120)
@given(data=st.data())
def test_backward_in_any_memory(m, data):
    _backward_property(data, m)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", [((8, 4, 16, 16), 1), ((16, 3, 9), 1), ((4, 6, 5, 3), -1)])
def test_frn_backward_gradients_do_not_depend_on_the_memory_of_grad_out_and_y(dtype, shape, axis):
    """grad_out and y in Fortran order (x C-contiguous): every gradient, grad_tau
    included, has the bits of the all-C-contiguous call."""
    rng = _rng(13)
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    p = dict(axis=axis, eps=1e-6)
    w, b, tau = make_affine("frn", x, p, rng, tau=True)
    y, inv = bnfast.filter_response_norm_forward(x, w, b, tau, axis=axis)
    want = bnfast.filter_response_norm_backward(g, x, y, inv, w, tau, axis=axis)
    got = bnfast.filter_response_norm_backward(np.asfortranarray(g), x, np.asfortranarray(y), inv, w, tau,
                                               axis=axis)
    for name, a, e in zip(["grad_input", "grad_weight", "grad_bias", "grad_tau"], got, want):
        same_bits(a, e, err_msg=name)


# ------------------------------------------------------------------- threads

PARALLEL = [
    ("group", (8, 32, 32, 32), dict(groups=8, axis=1)),
    ("group", (8, 32, 32, 32), dict(groups=4, axis=-1)),
    ("instance", (8, 32, 32, 32), dict(axis=1)),
    ("instance", (8, 32, 32, 32), dict(axis=-1)),
    # samples per thread run whole, the rest by the team: batches of 1, 3, 5
    ("group", (5, 32, 24, 24), dict(groups=8, axis=-1)),
    ("group", (1, 64, 48, 48), dict(groups=16, axis=-1)),
    ("instance", (3, 48, 24, 24), dict(axis=-1)),
    ("instance", (2, 32, 128, 128), dict(axis=-1)),  # backward: samples beyond one thread's cache
    ("frn", (8, 32, 32, 32), dict(axis=1)),
    ("frn", (8, 32, 32, 32), dict(axis=-1)),
    ("layer", (512, 768), dict(shape=(768,))),
    ("layer", (8, 32, 32, 32), dict(shape=(32, 32, 32))),
    ("layer", (8, 32, 32, 32), dict(shape=(32,))),
    ("rms", (512, 768), dict(shape=(768,))),
    ("rms", (8, 32, 32, 32), dict(shape=(32, 32))),
]


def _with_threads(n, fn):
    bnfast.set_num_threads(n)
    try:
        assert bnfast.get_num_threads() == n
        return fn()
    finally:
        bnfast.set_num_threads(None)


# float32 everywhere, float64 on layer and group norm (runtime)
PARALLEL_CASES = [pytest.param(c, d, id=f"{_case_id(c)}-{np.dtype(d).name}") for c in PARALLEL for d in DTYPES
                  if d == np.float32 or c[0] in ("layer", "group")]


@pytest.mark.parametrize("case,dtype", PARALLEL_CASES)
def test_bit_identical_for_any_thread_count(case, dtype):
    m, shape, params = case
    rng = _rng(6)
    p = dict(params, eps=1e-5, momentum=0.1)
    x = (rng.standard_normal(shape) + 5).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w, b, tau = make_affine(m, x, p, rng, tau=True)
    c = shape[p["axis"]] if "axis" in p else None
    rm0 = np.zeros(c, dtype) if m == "instance" else None

    def run():
        rm = None if rm0 is None else rm0.copy()
        rv = None if rm0 is None else rm0.copy() + 1
        fwd = forward(m, x, p, w=w, b=b, tau=tau, rm=rm, rv=rv)
        bwd = backward(m, g, x, fwd, p, w=w, tau=tau)
        return list(fwd) + list(bwd) + ([rm, rv] if rm is not None else [])

    one = _with_threads(1, run)
    for n in (2, 3, 4):
        for i, (a, e) in enumerate(zip(_with_threads(n, run), one)):
            same_bits(a, e, err_msg=f"array {i}, {n} threads")


# -------------------------------------------------------- finite differences

FD_CASES = [
    ("layer", (3, 4, 5), dict(shape=(4, 5), eps=1e-5), True),
    ("layer", (4, 6), dict(shape=6, eps=1e-3), False),
    ("layer", (2, 3, 4), dict(shape=(2, 3, 4), eps=1e-5), True),
    ("rms", (3, 4, 5), dict(shape=(5,), eps=None), True),
    ("rms", (4, 6), dict(shape=(6,), eps=1e-3), False),
    ("rms", (2, 3, 4), dict(shape=(3, 4), eps=1e-5), True),
    ("group", (2, 6, 3), dict(groups=3, axis=1, eps=1e-5), True),
    ("group", (2, 3, 2, 4), dict(groups=2, axis=-1, eps=1e-5), True),
    ("group", (5, 6), dict(groups=2, axis=1, eps=1e-5), False),
    ("group", (2, 2, 4, 3), dict(groups=2, axis=2, eps=1e-5), True),
    ("instance", (2, 3, 4), dict(axis=1, eps=1e-5), True),
    ("instance", (2, 3, 2, 3), dict(axis=-1, eps=1e-3), True),
    ("instance", (2, 3, 4), dict(axis=1, eps=1e-5), False),
    ("frn", (2, 3, 4, 2), dict(axis=1, eps=1e-6), True),
    ("frn", (2, 4, 3), dict(axis=-1, eps=-1e-3), True),
    ("frn", (2, 3, 5), dict(axis=1, eps=1e-6), False),
]


def _numeric_grad(loss, a, h=1e-6):
    grad = np.zeros(a.shape)
    flat = a.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        step = h * max(1.0, abs(keep))
        flat[i] = keep + step
        up = loss()
        flat[i] = keep - step
        down = loss()
        flat[i] = keep
        grad.reshape(-1)[i] = (up - down) / (2 * step)
    return grad


@pytest.mark.parametrize("case", FD_CASES, ids=[_case_id(c[:3]) + f"-affine={c[3]}" for c in FD_CASES])
def test_finite_difference_gradients(case):
    m, shape, p, affine = case
    rng = _rng(7)
    x = rng.standard_normal(shape) * 1.5 + 0.3
    r = rng.standard_normal(shape)  # the loss is sum(r * y)
    w, b, tau = make_affine(m, x, p, rng, weight=affine, bias=affine, tau=affine)
    grads = backward(m, r, x, forward(m, x, p, w=w, b=b, tau=tau), p, w=w, tau=tau)
    # weight=None means ones: its gradient is the one of an explicit ones weight
    wf = np.ones(affine_shape(m, x, p)) if w is None else w.copy()
    bf = np.zeros(affine_shape(m, x, p)) if b is None else b.copy()
    args = dict(w=wf, b=bf if has_bias(m) else None, tau=tau)

    def loss():
        return float(np.sum(r * forward(m, x, p, **args)[0]))

    wrt = [x, args["w"]] + ([args["b"]] if has_bias(m) else []) + ([tau] if m == "frn" else [])
    names = ["x", "weight", "bias", "tau"] if has_bias(m) else ["x", "weight"]
    if m == "frn" and tau is None:
        wrt, names = wrt[:3], names[:3]
    for name, a, got in zip(names, wrt, grads):
        want = _numeric_grad(loss, a)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * scale_of(want),
                                   err_msg=f"d loss / d {name}")
    if m == "frn" and tau is None:
        np.testing.assert_array_equal(grads[3], 0)


# -------------------------------------------------------- float32 accuracy

ACCURACY = [
    ("layer", "all"), ("layer", "last"), ("rms", "all"), ("rms", "last"),
    ("group", None), ("instance", None), ("frn", None),
]


def _layout_params(m, which, x, axis):
    p = dict(eps=1e-5, axis=axis, groups=4)
    if m == "rms":
        p["eps"] = None
    if m == "frn":
        p["eps"] = 1e-6
    if which == "all":
        p["shape"] = x.shape[1:]
    elif which == "last":
        p["shape"] = x.shape[-1:]
    return p


@pytest.mark.parametrize("offset", [1e4, 1e5, 1e6])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("member", ACCURACY, ids=[f"{m}-{w}" if w else m for m, w in ACCURACY])
def test_float32_accuracy_with_a_large_mean(offset, layout, member):
    m, which = member
    rng = _rng(8)
    x = (offset + rng.standard_normal((8, 16, 12, 12))).astype(np.float32)
    axis = 1
    if layout == "NHWC":
        x, axis = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), -1
    p = _layout_params(m, which, x, axis)
    w, b, tau = make_affine(m, x, p, rng)
    if w is not None:
        w = np.abs(w) + 0.5
    got = forward(m, x, p, w=w, b=b, tau=tau)
    want = ref_forward(m, x.astype(np.float64), dict(p, eps=p["eps"] if p["eps"] is not None
                                                       else float(np.finfo(np.float32).eps)),
                       w=w, b=b, tau=tau)
    err = float(np.max(np.abs(got[0].astype(np.float64) - want[0])))
    assert err <= 1e-4, f"max abs error {err:.3g} of {m} ({layout}, offset {offset:g})"
    for i in range(1, len(got)):  # statistics: relative to float32's resolution
        np.testing.assert_allclose(got[i], want[i], rtol=2e-7 * 4, err_msg=f"statistic {i}")


# ------------------------------------------------------- constant groups


CONSTANTS = [0.0, 0.1, -3.3, 1e6 + 0.5, 1e-20, 123456.79, -7.25e7]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("value", CONSTANTS)
def test_constant_group_gives_exactly_its_bias(dtype, axis, value):
    rng = _rng(9)
    shape = (2, 8, 3, 4) if axis == 1 else (2, 3, 4, 8)
    x = rng.standard_normal(shape).astype(dtype)
    c = 8
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    xm = np.moveaxis(x, axis, 1)  # a view: writes reach x
    xm[0, 2:4] = value  # group 1 of sample 0 (group norm, 4 groups of 2)
    xm[1, 5] = value  # channel 5 of sample 1 (instance norm)
    y = np.moveaxis(bnfast.group_norm(x, 4, w, b, axis=axis), axis, 1)
    np.testing.assert_array_equal(y[0, 2:4], np.broadcast_to(b[2:4, None, None], (2, 3, 4)))
    assert np.isfinite(y).all()
    y = np.moveaxis(bnfast.instance_norm(x, weight=w, bias=b, axis=axis), axis, 1)
    np.testing.assert_array_equal(y[1, 5], np.full((3, 4), b[5]))
    np.testing.assert_array_equal(y[0, 2], np.full((3, 4), b[2]))
    assert np.isfinite(y).all()
    # everything constant
    y = bnfast.group_norm(np.full(shape, value, dtype), 2, w, b, axis=axis)
    np.testing.assert_array_equal(y, np.broadcast_to(per_channel(b, len(shape), axis), shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("value", CONSTANTS)
@pytest.mark.parametrize("shape,normalized", [((5, 12), (12,)), ((3, 4, 5), (4, 5)),
                                              ((2, 3, 4, 8), (8,)), ((6, 1), (1,))])
def test_constant_row_gives_exactly_the_bias(dtype, value, shape, normalized):
    rng = _rng(10)
    x = rng.standard_normal(shape).astype(dtype)
    rows = x.reshape(-1, math.prod(normalized))
    rows[1] = value
    w = rng.uniform(0.5, 2, normalized).astype(dtype)
    b = rng.standard_normal(normalized).astype(dtype)
    y = bnfast.layer_norm(x, normalized, w, b).reshape(rows.shape)
    np.testing.assert_array_equal(y[1], b.reshape(-1))
    assert np.isfinite(y).all()
    y = bnfast.layer_norm(np.full(shape, value, dtype), normalized, w, b)
    np.testing.assert_array_equal(y, np.broadcast_to(b, shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("d", [1, 2, 8], ids=lambda d: f"d{d}")
def test_zero_eps_without_spread_is_nan_for_any_row_length(dtype, d):
    """Rows of one value take their own path; it must agree with the
    kernels (and PyTorch): 0 / sqrt(0) is nan, forward and backward."""
    x = np.full((3, d), 2.5, dtype)
    x[0] = np.arange(d) if d > 1 else 0.0  # a row with spread stays finite where it can
    with np.errstate(all="raise"):  # no floating-point warnings either
        y, mean, invstd = bnfast.layer_norm_forward(x, (d,), eps=0.0)
        grad_in, grad_w, _ = bnfast.layer_norm_backward(np.ones_like(x), x, (d,), mean, invstd)
    assert np.isnan(y[1:]).all() and np.isnan(grad_in[1:]).all()
    assert np.isinf(invstd[1:]).all() and np.isnan(grad_w).all()
    if d > 1:
        assert np.isfinite(y[0]).all() and np.isfinite(grad_in[0]).all()


# ------------------------------------------------------- huge and tiny values


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("eps", ["zero", "default"])
@pytest.mark.parametrize("case", [
    ("layer", (4, 6, 5), dict(shape=(6, 5))),
    ("layer", (4, 6, 5), dict(shape=(5,))),
    ("rms", (4, 6, 5), dict(shape=(6, 5))),
    ("group", (4, 6, 5), dict(groups=3, axis=1)),
    ("group", (4, 5, 6), dict(groups=2, axis=-1)),
    ("instance", (4, 6, 5), dict(axis=1)),
    ("instance", (4, 5, 6), dict(axis=-1)),
    ("frn", (4, 6, 5), dict(axis=1)),
    ("frn", (4, 5, 6), dict(axis=-1)),
], ids=_case_id)
def test_huge_and_tiny_magnitudes(dtype, scale, eps, case):
    m, shape, params = case
    rng = _rng(11)
    p = dict(params)
    p["eps"] = 0.0 if eps == "zero" else {"rms": None, "frn": 1e-6}.get(m, 1e-5)
    x = (scale * (3 + rng.standard_normal(shape))).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w, b, _ = make_affine(m, x, p, rng)
    fwd = forward(m, x, p, w=w, b=b)
    bwd = backward(m, g, x, fwd, p, w=w)
    for a in list(fwd) + list(bwd):
        assert np.isfinite(a).all(), f"non-finite output at scale {scale:g}"
    want = ref_forward(m, x, p, w=w, b=b)
    for i, (a, e) in enumerate(zip(fwd, want)):
        np.testing.assert_allclose(a, e, rtol=4 * tol(dtype), atol=4 * tol(dtype) * np.abs(e).max(),
                                   err_msg=f"forward output {i}")
    want = ref_backward(m, g, x, p, w=w, b=b)
    for i, (a, e) in enumerate(zip(bwd, want)):
        np.testing.assert_allclose(a, e, rtol=40 * tol(dtype), atol=40 * tol(dtype) * np.abs(e).max(),
                                   err_msg=f"gradient {i}")


# ----------------------------------------------------------- bad arguments

C, G = 6, 3
SHAPE = (4, C, 5)


def _arrays(dtype):
    rng = _rng(12)
    A = SimpleNamespace(dtype=np.dtype(dtype))
    A.other = np.dtype(np.float64 if A.dtype == np.float32 else np.float32)
    A.x = rng.standard_normal(SHAPE).astype(dtype)
    A.g = rng.standard_normal(SHAPE).astype(dtype)
    A.w = rng.uniform(0.5, 2, C).astype(dtype)
    A.b = rng.standard_normal(C).astype(dtype)
    A.tau = np.full(C, -0.5, dtype)
    A.rm = rng.standard_normal(C).astype(dtype)
    A.rv = rng.uniform(0.5, 2, C).astype(dtype)
    A.rm4 = rng.standard_normal(4).astype(dtype)  # running statistics of batch-sized length
    A.rv4 = rng.uniform(0.5, 2, 4).astype(dtype)
    A.out = np.full(SHAPE, 7.0, dtype)
    A.lw = rng.uniform(0.5, 2, 5).astype(dtype)  # layer/RMS norm over the last dim
    A.lb = rng.standard_normal(5).astype(dtype)
    _, A.lmean, A.linv = bnfast.layer_norm_forward(A.x, 5)
    _, A.gmean, A.ginv = bnfast.group_norm_forward(A.x, G)
    _, A.imean, A.iinv = bnfast.instance_norm_forward(A.x)
    A.fy, A.finv = bnfast.filter_response_norm_forward(A.x, A.w, A.b, A.tau)
    return A


def _ro(a):
    a = a.copy()
    a.flags.writeable = False
    return a


BAD = []


def bad(name, exc, match, fn):
    BAD.append(pytest.param(fn, exc, match, id=name))


# x
for _name, _mk in [("int", lambda A: A.x.astype(np.int32)), ("float16", lambda A: A.x.astype(np.float16)),
                   ("complex", lambda A: A.x.astype(np.complex128)), ("bool", lambda A: A.x > 0),
                   ("object", lambda A: A.x.astype(object)), ("list-of-ints", lambda A: [[1, 2], [3, 4]])]:
    bad(f"layer-x-{_name}", TypeError, r"\bx\b", lambda A, mk=_mk: bnfast.layer_norm(mk(A), 2, out=A.out))
    bad(f"rms-x-{_name}", TypeError, r"\bx\b", lambda A, mk=_mk: bnfast.rms_norm(mk(A), 2, out=A.out))
    bad(f"group-x-{_name}", TypeError, r"\bx\b", lambda A, mk=_mk: bnfast.group_norm(mk(A), 2, out=A.out))
    bad(f"instance-x-{_name}", TypeError, r"\bx\b",
        lambda A, mk=_mk: bnfast.instance_norm(mk(A), A.rm, A.rv, out=A.out))
    bad(f"frn-x-{_name}", TypeError, r"\bx\b",
        lambda A, mk=_mk: bnfast.filter_response_norm(mk(A), out=A.out))
bad("group-x-1d", ValueError, r"dimension", lambda A: bnfast.group_norm(A.x[0, 0], 1))
bad("instance-x-1d", ValueError, r"dimension", lambda A: bnfast.instance_norm(A.x[0, 0], A.rm[:5], A.rv[:5]))
bad("layer-x-0d", ValueError, r"normalized_shape", lambda A: bnfast.layer_norm(A.x[0, 0, 0], 1))

# num_groups
for _g, _exc in [(4, ValueError), (5, ValueError), (12, ValueError), (0, ValueError), (-3, ValueError),
                 (-6, ValueError), (3.0, TypeError), (True, TypeError), (np.bool_(True), TypeError),
                 ("3", TypeError), (None, TypeError), (np.float64(3), TypeError)]:
    _id = repr(_g).replace(" ", "")
    bad(f"group-num_groups-{_id}", _exc, r"num_groups",
        lambda A, g=_g: bnfast.group_norm(A.x, g, A.w, A.b, out=A.out))
    bad(f"group_forward-num_groups-{_id}", _exc, r"num_groups",
        lambda A, g=_g: bnfast.group_norm_forward(A.x, g, out=A.out))
    bad(f"group_backward-num_groups-{_id}", _exc, r"num_groups",
        lambda A, g=_g: bnfast.group_norm_backward(A.g, A.x, g, A.gmean, A.ginv, A.w, out=A.out))

# normalized_shape
for _s, _exc in [((4,), ValueError), ((6, 4), ValueError), ((), ValueError), ([], ValueError),
                 ((4, 6, 5, 1), ValueError), ((1, 4, 6, 5), ValueError), (0, ValueError), (-5, ValueError),
                 ((6,), ValueError), ((5.0,), TypeError), (5.0, TypeError), ("5", TypeError),
                 (True, TypeError), ((True,), TypeError), (None, TypeError), ((5, None), TypeError),
                 (np.float64(5), TypeError)]:
    _id = repr(_s).replace(" ", "")
    bad(f"layer-normalized_shape-{_id}", _exc, r"normalized_shape",
        lambda A, s=_s: bnfast.layer_norm(A.x, s, out=A.out))
    bad(f"rms_forward-normalized_shape-{_id}", _exc, r"normalized_shape",
        lambda A, s=_s: bnfast.rms_norm_forward(A.x, s, out=A.out))
    bad(f"layer_backward-normalized_shape-{_id}", _exc, r"normalized_shape",
        lambda A, s=_s: bnfast.layer_norm_backward(A.g, A.x, s, A.lmean, A.linv, out=A.out))
    bad(f"rms_backward-normalized_shape-{_id}", _exc, r"normalized_shape",
        lambda A, s=_s: bnfast.rms_norm_backward(A.g, A.x, s, A.linv, out=A.out))

# weight / bias / tau
_SHAPES_BAD = [("short", lambda v: v[:-1]), ("long", lambda v: np.concatenate([v, v[:1]])),
               ("2d", lambda v: v[None]), ("scalar", lambda v: v[0])]
_TYPES_BAD = [("int", lambda v: v.astype(np.int64)), ("bool", lambda v: v > 0),
              ("complex", lambda v: v.astype(np.complex64)), ("str", lambda v: np.array(["a"] * v.size))]
for _kind, _mk, _exc in [s + (ValueError,) for s in _SHAPES_BAD] + [t + (TypeError,) for t in _TYPES_BAD]:
    bad(f"layer-weight-{_kind}", _exc, r"weight",
        lambda A, mk=_mk: bnfast.layer_norm(A.x, 5, mk(A.lw), A.lb, out=A.out))
    bad(f"layer-bias-{_kind}", _exc, r"bias",
        lambda A, mk=_mk: bnfast.layer_norm(A.x, 5, A.lw, mk(A.lb), out=A.out))
    bad(f"layer_backward-weight-{_kind}", _exc, r"weight",
        lambda A, mk=_mk: bnfast.layer_norm_backward(A.g, A.x, 5, A.lmean, A.linv, mk(A.lw), out=A.out))
    bad(f"rms-weight-{_kind}", _exc, r"weight",
        lambda A, mk=_mk: bnfast.rms_norm(A.x, 5, mk(A.lw), out=A.out))
    bad(f"group-weight-{_kind}", _exc, r"weight",
        lambda A, mk=_mk: bnfast.group_norm(A.x, G, mk(A.w), A.b, out=A.out))
    bad(f"group-bias-{_kind}", _exc, r"bias",
        lambda A, mk=_mk: bnfast.group_norm(A.x, G, A.w, mk(A.b), out=A.out))
    bad(f"group_backward-weight-{_kind}", _exc, r"weight",
        lambda A, mk=_mk: bnfast.group_norm_backward(A.g, A.x, G, A.gmean, A.ginv, mk(A.w), out=A.out))
    bad(f"instance-weight-{_kind}", _exc, r"weight",
        lambda A, mk=_mk: bnfast.instance_norm(A.x, A.rm, A.rv, mk(A.w), A.b, out=A.out))
    bad(f"instance-bias-{_kind}", _exc, r"bias",
        lambda A, mk=_mk: bnfast.instance_norm_forward(A.x, A.w, mk(A.b), A.rm, A.rv, out=A.out))
    bad(f"instance_backward-weight-{_kind}", _exc, r"weight",
        lambda A, mk=_mk: bnfast.instance_norm_backward(A.g, A.x, A.imean, A.iinv, mk(A.w), out=A.out))
    bad(f"frn-weight-{_kind}", _exc, r"weight",
        lambda A, mk=_mk: bnfast.filter_response_norm(A.x, mk(A.w), A.b, A.tau, out=A.out))
    bad(f"frn-tau-{_kind}", _exc, r"tau",
        lambda A, mk=_mk: bnfast.filter_response_norm(A.x, A.w, A.b, mk(A.tau), out=A.out))
    bad(f"frn_backward-tau-{_kind}", _exc, r"tau",
        lambda A, mk=_mk: bnfast.filter_response_norm_backward(A.g, A.x,
            A.fy, A.finv, A.w, mk(A.tau), out=A.out))

# axis
for _axis, _exc in [(0, ValueError), (-3, ValueError), (3, ValueError), (-4, ValueError), (100, ValueError),
                    (1.0, TypeError), (True, TypeError), ("1", TypeError), (None, TypeError)]:
    _id = repr(_axis)
    bad(f"group-axis-{_id}", _exc, r"axis", lambda A, a=_axis: bnfast.group_norm(A.x, 1, axis=a, out=A.out))
    bad(f"group_backward-axis-{_id}", _exc, r"axis",
        lambda A, a=_axis: bnfast.group_norm_backward(A.g, A.x,
            1, A.gmean[:, :1], A.ginv[:, :1], axis=a, out=A.out))
    bad(f"instance-axis-{_id}", _exc, r"axis",
        lambda A, a=_axis: bnfast.instance_norm(A.x, A.rm, A.rv, axis=a, out=A.out))
    bad(f"instance_forward-axis-{_id}", _exc, r"axis",
        lambda A, a=_axis: bnfast.instance_norm_forward(A.x, running_mean=A.rm, running_var=A.rv, axis=a,
                                                        out=A.out))
    bad(f"instance_eval-axis-{_id}", _exc, r"axis",
        lambda A, a=_axis: bnfast.instance_norm(A.x, A.rm4, A.rv4, use_input_stats=False, axis=a, out=A.out))
    bad(f"instance_backward-axis-{_id}", _exc, r"axis",
        lambda A, a=_axis: bnfast.instance_norm_backward(A.g, A.x, A.imean, A.iinv, axis=a, out=A.out))
    bad(f"frn-axis-{_id}", _exc, r"axis",
        lambda A, a=_axis: bnfast.filter_response_norm(A.x, axis=a, out=A.out))
    bad(f"frn_backward-axis-{_id}", _exc, r"axis",
        lambda A, a=_axis: bnfast.filter_response_norm_backward(A.g, A.x, A.fy, A.finv, axis=a, out=A.out))

# eps
for _eps, _exc in [(-1e-5, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                   (-float("inf"), ValueError), ("1e-5", TypeError), (True, TypeError), (1j, TypeError),
                   (np.array([1e-5, 1e-5]), TypeError)]:
    _id = repr(_eps)[:12]
    bad(f"layer-eps-{_id}", _exc, r"eps", lambda A, e=_eps: bnfast.layer_norm(A.x, 5, eps=e, out=A.out))
    bad(f"layer_forward-eps-{_id}", _exc, r"eps",
        lambda A, e=_eps: bnfast.layer_norm_forward(A.x, 5, eps=e, out=A.out))
    bad(f"rms-eps-{_id}", _exc, r"eps", lambda A, e=_eps: bnfast.rms_norm(A.x, 5, eps=e, out=A.out))
    bad(f"group-eps-{_id}", _exc, r"eps", lambda A, e=_eps: bnfast.group_norm(A.x, G, eps=e, out=A.out))
    bad(f"instance-eps-{_id}", _exc, r"eps",
        lambda A, e=_eps: bnfast.instance_norm(A.x, A.rm, A.rv, eps=e, out=A.out))
    bad(f"instance_eval-eps-{_id}", _exc, r"eps",
        lambda A, e=_eps: bnfast.instance_norm(A.x, A.rm, A.rv, use_input_stats=False, eps=e, out=A.out))
    if not (isinstance(_eps, float) and _eps == -1e-5):  # FRN takes |eps|
        bad(f"frn-eps-{_id}", _exc, r"eps",
            lambda A, e=_eps: bnfast.filter_response_norm(A.x, eps=e, out=A.out))
bad("layer-eps-None", TypeError, r"eps", lambda A: bnfast.layer_norm(A.x, 5, eps=None, out=A.out))
bad("group-eps-None", TypeError, r"eps", lambda A: bnfast.group_norm(A.x, G, eps=None, out=A.out))
bad("frn-eps-None", TypeError, r"eps", lambda A: bnfast.filter_response_norm(A.x, eps=None, out=A.out))

# momentum
for _mom, _exc in [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                   (float("inf"), ValueError),
                   ("0.1", TypeError), (True, TypeError), (None, TypeError), (1j, TypeError)]:
    _id = repr(_mom)
    bad(f"instance-momentum-{_id}", _exc, r"momentum",
        lambda A, mo=_mom: bnfast.instance_norm(A.x, A.rm, A.rv, momentum=mo, out=A.out))
    bad(f"instance_forward-momentum-{_id}", _exc, r"momentum",
        lambda A, mo=_mom: bnfast.instance_norm_forward(A.x, A.w, A.b, A.rm, A.rv, momentum=mo, out=A.out))

# running statistics
_RUNNING = [
    ("rm-other-float", TypeError, r"running_mean", lambda A: dict(running_mean=A.rm.astype(A.other))),
    ("rv-other-float", TypeError, r"running_var", lambda A: dict(running_var=A.rv.astype(A.other))),
    ("rm-int", TypeError, r"running_mean", lambda A: dict(running_mean=A.rm.astype(np.int64))),
    ("rm-list", TypeError, r"running_mean", lambda A: dict(running_mean=A.rm.tolist())),
    ("rm-short", ValueError, r"running_mean", lambda A: dict(running_mean=A.rm[:-1].copy())),
    ("rv-2d", ValueError, r"running_var", lambda A: dict(running_var=A.rv[None].copy())),
    ("rm-read-only", ValueError, r"running_mean.*read-only", lambda A: dict(running_mean=_ro(A.rm))),
    ("rv-read-only", ValueError, r"running_var.*read-only", lambda A: dict(running_var=_ro(A.rv))),
    ("rm-alias-x", ValueError, r"running_mean.*share", lambda A: dict(running_mean=A.x[0, :, 0])),
    ("rv-alias-x", ValueError, r"running_var.*share", lambda A: dict(running_var=A.x[1, :, 2])),
    ("rm-is-rv", ValueError, r"share", lambda A: dict(running_var=A.rm)),
    ("rm-alias-out", ValueError, r"running_mean.*share", lambda A: dict(running_mean=A.out[0, :, 0])),
    ("rv-alias-weight", ValueError, r"running_var.*share", lambda A: dict(running_var=A.w)),
    ("rm-alias-bias", ValueError, r"running_mean.*share", lambda A: dict(running_mean=A.b)),
    ("rm-only", ValueError, r"running_var|both", lambda A: dict(running_var=None)),
    ("rv-only", ValueError, r"running_mean|both", lambda A: dict(running_mean=None)),
]


def _instance_kwargs(A, **over):
    kw = dict(running_mean=A.rm, running_var=A.rv, weight=A.w, bias=A.b, out=A.out)
    kw.update(over)
    return kw


for _id, _exc, _match, _over in _RUNNING:
    bad(f"instance-{_id}", _exc, _match,
        lambda A, o=_over: bnfast.instance_norm(A.x, **_instance_kwargs(A, **o(A))))
    bad(f"instance_forward-{_id}", _exc, _match,
        lambda A, o=_over: bnfast.instance_norm_forward(A.x, **_instance_kwargs(A, **o(A))))

# instance norm: one spatial element, use_input_stats
bad("instance-one-spatial-element", ValueError, r"spatial",
    lambda A: bnfast.instance_norm(A.x[:, :, :1], A.rm, A.rv, out=A.out[:, :, :1]))
bad("instance-one-spatial-element-2d", ValueError, r"spatial",
    lambda A: bnfast.instance_norm(A.x[:, :, 0], A.rm, A.rv, out=A.out[:, :, 0]))
bad("instance_forward-one-spatial-element-channels-last", ValueError, r"spatial",
    lambda A: bnfast.instance_norm_forward(A.x[:, :1, :], running_mean=A.rv[:5], running_var=A.rm[:5],
                                           axis=-1, out=A.out[:, :1, :]))
bad("instance-eval-without-running-stats", ValueError, r"running_mean",
    lambda A: bnfast.instance_norm(A.x, weight=A.w, use_input_stats=False, out=A.out))
bad("instance-eval-without-running-var", ValueError, r"running_var",
    lambda A: bnfast.instance_norm(A.x, A.rm, None, use_input_stats=False, out=A.out))
bad("instance-eval-running-short", ValueError, r"running_mean",
    lambda A: bnfast.instance_norm(A.x, A.rm[:-1], A.rv[:-1], use_input_stats=False, out=A.out))
for _u in ["yes", None, 1.0]:
    bad(f"instance-use_input_stats-{_u!r}", TypeError, r"use_input_stats",
        lambda A, u=_u: bnfast.instance_norm(A.x, A.rm, A.rv, use_input_stats=u, out=A.out))

# out
_OUT = [
    ("shape", ValueError, lambda A: np.full((4, C, 4), 7.0, A.dtype)),
    ("permuted", ValueError, lambda A: np.full((C, 4, 5), 7.0, A.dtype)),
    ("other-float", ValueError, lambda A: np.full(SHAPE, 7.0, A.other)),
    ("int", ValueError, lambda A: np.full(SHAPE, 7, np.int64)),
    ("read-only", ValueError, lambda A: _ro(A.out)),
    ("list", TypeError, lambda A: A.out.tolist()),
]
for _id, _exc, _mk in _OUT:
    bad(f"layer-out-{_id}", _exc, r"\bout\b", lambda A, mk=_mk: bnfast.layer_norm(A.x, 5, out=mk(A)))
    bad(f"layer_backward-out-{_id}", _exc, r"\bout\b",
        lambda A, mk=_mk: bnfast.layer_norm_backward(A.g, A.x, 5, A.lmean, A.linv, out=mk(A)))
    bad(f"rms-out-{_id}", _exc, r"\bout\b", lambda A, mk=_mk: bnfast.rms_norm(A.x, 5, out=mk(A)))
    bad(f"rms_backward-out-{_id}", _exc, r"\bout\b",
        lambda A, mk=_mk: bnfast.rms_norm_backward(A.g, A.x, 5, A.linv, out=mk(A)))
    bad(f"group-out-{_id}", _exc, r"\bout\b", lambda A, mk=_mk: bnfast.group_norm(A.x, G, out=mk(A)))
    bad(f"group_backward-out-{_id}", _exc, r"\bout\b",
        lambda A, mk=_mk: bnfast.group_norm_backward(A.g, A.x, G, A.gmean, A.ginv, out=mk(A)))
    bad(f"instance-out-{_id}", _exc, r"\bout\b",
        lambda A, mk=_mk: bnfast.instance_norm(A.x, A.rm, A.rv, out=mk(A)))
    bad(f"instance_eval-out-{_id}", _exc, r"\bout\b",
        lambda A, mk=_mk: bnfast.instance_norm(A.x, A.rm, A.rv, use_input_stats=False, out=mk(A)))
    bad(f"instance_backward-out-{_id}", _exc, r"\bout\b",
        lambda A, mk=_mk: bnfast.instance_norm_backward(A.g, A.x, A.imean, A.iinv, out=mk(A)))
    bad(f"frn-out-{_id}", _exc, r"\bout\b", lambda A, mk=_mk: bnfast.filter_response_norm(A.x, out=mk(A)))
    bad(f"frn_backward-out-{_id}", _exc, r"\bout\b",
        lambda A, mk=_mk: bnfast.filter_response_norm_backward(A.g, A.x, A.fy, A.finv, out=mk(A)))

# grad_out
_GRAD = [
    ("shape", ValueError, lambda A: A.g[:, :, :4].copy()),
    ("transposed", ValueError, lambda A: np.ascontiguousarray(A.g.transpose(1, 0, 2))),
    ("other-float", TypeError, lambda A: A.g.astype(A.other)),
    ("int", TypeError, lambda A: A.g.astype(np.int32)),
]
for _id, _exc, _mk in _GRAD:
    bad(f"layer_backward-grad_out-{_id}", _exc, r"grad_out",
        lambda A, mk=_mk: bnfast.layer_norm_backward(mk(A), A.x, 5, A.lmean, A.linv, out=A.out))
    bad(f"rms_backward-grad_out-{_id}", _exc, r"grad_out",
        lambda A, mk=_mk: bnfast.rms_norm_backward(mk(A), A.x, 5, A.linv, out=A.out))
    bad(f"group_backward-grad_out-{_id}", _exc, r"grad_out",
        lambda A, mk=_mk: bnfast.group_norm_backward(mk(A), A.x, G, A.gmean, A.ginv, out=A.out))
    bad(f"instance_backward-grad_out-{_id}", _exc, r"grad_out",
        lambda A, mk=_mk: bnfast.instance_norm_backward(mk(A), A.x, A.imean, A.iinv, out=A.out))
    bad(f"frn_backward-grad_out-{_id}", _exc, r"grad_out",
        lambda A, mk=_mk: bnfast.filter_response_norm_backward(mk(A), A.x, A.fy, A.finv, out=A.out))

# saved statistics
_STATS = [
    ("short", ValueError, lambda s: s[:-1].copy()),
    ("extra-column", ValueError, lambda s: np.concatenate([s, s[:, :1]], axis=1)),
    ("transposed", ValueError, lambda s: np.ascontiguousarray(np.swapaxes(s, 0, 1))),
    ("int", TypeError, lambda s: s.astype(np.int64)),
]
for _id, _exc, _mk in _STATS:
    bad(f"layer_backward-mean-{_id}", _exc, r"mean",
        lambda A, mk=_mk: bnfast.layer_norm_backward(A.g, A.x, 5, mk(A.lmean), A.linv, out=A.out))
    bad(f"layer_backward-invstd-{_id}", _exc, r"invstd",
        lambda A, mk=_mk: bnfast.layer_norm_backward(A.g, A.x, 5, A.lmean, mk(A.linv), out=A.out))
    bad(f"rms_backward-invstd-{_id}", _exc, r"invstd",
        lambda A, mk=_mk: bnfast.rms_norm_backward(A.g, A.x, 5, mk(A.linv), out=A.out))
    bad(f"group_backward-mean-{_id}", _exc, r"mean",
        lambda A, mk=_mk: bnfast.group_norm_backward(A.g, A.x, G, mk(A.gmean), A.ginv, out=A.out))
    bad(f"group_backward-invstd-{_id}", _exc, r"invstd",
        lambda A, mk=_mk: bnfast.group_norm_backward(A.g, A.x, G, A.gmean, mk(A.ginv), out=A.out))
    bad(f"instance_backward-mean-{_id}", _exc, r"mean",
        lambda A, mk=_mk: bnfast.instance_norm_backward(A.g, A.x, mk(A.imean), A.iinv, out=A.out))
    bad(f"instance_backward-invstd-{_id}", _exc, r"invstd",
        lambda A, mk=_mk: bnfast.instance_norm_backward(A.g, A.x, A.imean, mk(A.iinv), out=A.out))
    bad(f"frn_backward-invstd-{_id}", _exc, r"invstd",
        lambda A, mk=_mk: bnfast.filter_response_norm_backward(A.g, A.x, A.fy, mk(A.finv), out=A.out))
bad("group_backward-stats-of-instance", ValueError, r"mean",
    lambda A: bnfast.group_norm_backward(A.g, A.x, G, A.imean, A.iinv, out=A.out))
bad("frn_backward-y-shape", ValueError, r"\by\b",
    lambda A: bnfast.filter_response_norm_backward(A.g, A.x, A.fy[:, :, :4], A.finv, out=A.out))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("fn,exc,match", BAD)
def test_bad_argument_raises_clearly_and_changes_nothing(fn, exc, match, dtype):
    A = _arrays(dtype)
    before = {k: v.copy() for k, v in vars(A).items() if isinstance(v, np.ndarray)}
    with pytest.raises((TypeError, ValueError)) as info:
        fn(A)
    assert info.type is exc or issubclass(info.type, exc), (
        f"expected {exc.__name__}, got {info.type.__name__}: {info.value}")
    # a TypeError that is also a ValueError (or the reverse) would be ambiguous
    other = ValueError if exc is TypeError else TypeError
    assert not isinstance(info.value, other), f"{type(info.value).__mro__}"
    assert re.search(match, str(info.value)), f"message {str(info.value)!r} does not match {match!r}"
    for k, v in before.items():
        now = getattr(A, k)
        assert now.tobytes() == v.tobytes(), f"{k} was modified by a failing call"
