"""Property: the compiled fast path and the validating path agree.

Every public op first offers its arguments to ``_kernels.try_*``, which
repeats a subset of the validation rules in C.  Here hypothesis draws calls
-- dtypes in both byte orders, strides, unaligned and broadcast memory,
aliasing between arguments, scalars of every type, good and bad -- and each
call is made twice on identical fresh arguments: as usual, and with the fast
path switched off.  Both must return the same bits and leave every argument
with the same contents, or both must raise the same exception type.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import bnfast
from bnfast import _kernels

OPS = ("forward", "inference", "backward", "batch_norm", "moments")
FAST = {"forward": "try_forward_train", "inference": "try_inference", "backward": "try_backward"}


def _memory(rng, a, kind):
    """``a``'s values in memory of the given kind."""
    if kind == "contiguous":
        return a
    if kind == "swapped":
        return a.astype(a.dtype.newbyteorder("S"))
    if kind == "unaligned":
        buf = np.empty(a.nbytes + 1, np.uint8)
        u = buf[1:].view(a.dtype).reshape(a.shape)
        u[...] = a
        return u
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "strided":
        big = np.empty((2 * a.shape[0],) + a.shape[1:], a.dtype)
        big[::2] = a
        return big[::2]
    if kind == "reversed":
        return np.ascontiguousarray(a[::-1])[::-1]
    if kind == "broadcast":
        return np.broadcast_to(a[:1], a.shape)
    raise AssertionError(kind)


# Each field: its canonical value first, then the unusual ones.  A recipe
# changes up to three fields of a canonical call, so that calls the fast path
# takes, calls just outside what it takes, and plain bad calls all occur.
FIELDS = {
    "op": OPS,
    "dtype": ("f4", "f8"),
    "axis": (1, -1, 0, 2, -2, 7, 2**70, 1.0, True),
    "x": ("contiguous", "swapped", "unaligned", "fortran", "strided", "reversed", "broadcast"),
    "g": ("contiguous", "swapped", "unaligned", "strided", "other-dtype"),
    "vectors": ("same", "none", "other-dtype", "swapped", "unaligned", "list", "wrong-length", "int"),
    "running": ("same", "none", "alias", "view-of-x", "readonly", "swapped", "other-dtype",
                "strided", "overlap-weight"),
    "momentum": (0.1, 0.0, 1.0, 1.5, -0.1, True, float("nan"), np.float32(0.25), 1, "0.1"),
    "eps": (1e-5, 0.0, -1.0, True, float("inf"), np.float64(1e-3), 2, None),
    "out": ("none", "fresh", "x", "g", "swapped", "strided", "unaligned", "other-dtype",
            "readonly", "over-running", "over-weight", "wrong-shape", "string", "list"),
    "training": (True, False, np.bool_(True), "no", None, 1),
}


@st.composite
def recipes(draw):
    r = {name: options[0] for name, options in FIELDS.items()}
    r["op"] = draw(st.sampled_from(OPS))
    r["dtype"] = draw(st.sampled_from(FIELDS["dtype"]))
    r["seed"] = draw(st.integers(0, 2**16))
    r["shape"] = draw(st.lists(st.integers(1, 5), min_size=2, max_size=4))
    for name in draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=3)):
        r[name] = draw(st.sampled_from(FIELDS[name]))
    return r


def _build(r):
    """Fresh arguments of the call described by recipe ``r``: (function,
    args, kwargs, every array the call might read or write)."""
    rng = np.random.default_rng(r["seed"])
    dt = np.dtype(r["dtype"])
    other = np.dtype("f8" if r["dtype"] == "f4" else "f4")
    shape = tuple(r["shape"])
    axis = r["axis"]
    ax = axis % len(shape) if type(axis) is int and -len(shape) <= axis < len(shape) else 1
    c = shape[ax]
    x0 = (rng.standard_normal(shape) * 3 + 10).astype(dt)
    x = _memory(rng, x0, r["x"])
    g0 = rng.standard_normal(shape).astype(dt)
    g = g0.astype(other) if r["g"] == "other-dtype" else _memory(rng, g0, r["g"])
    w0, b0 = rng.uniform(0.5, 2, c).astype(dt), rng.standard_normal(c).astype(dt)
    kind = r["vectors"]
    if kind == "none":
        w = b = None
    elif kind == "list":
        w, b = w0.tolist(), b0.tolist()
    elif kind == "wrong-length":
        w, b = np.ones(c + 1, dt), b0
    elif kind == "int":
        w, b = np.ones(c, np.int64), b0
    elif kind == "other-dtype":
        w, b = w0.astype(other), b0.astype(other)
    else:
        w, b = _memory(rng, w0, {"same": "contiguous"}.get(kind, kind)), b0
    rm0, rv0 = rng.standard_normal(c).astype(dt), rng.uniform(0.5, 2, c).astype(dt)
    kind = r["running"]
    rm, rv = rm0, rv0
    if kind == "none":
        rm = rv = None
    elif kind == "alias":
        rv = rm
    elif kind == "view-of-x" and isinstance(x, np.ndarray) and x.flags.writeable and x.size >= c:
        rm = x.reshape(-1)[:c] if x.flags.c_contiguous else rm0
    elif kind == "readonly":
        rv.flags.writeable = False
    elif kind == "swapped":
        rm, rv = rm0.astype(dt.newbyteorder("S")), rv0.astype(dt.newbyteorder("S"))
    elif kind == "other-dtype":
        rm, rv = rm0.astype(other), rv0.astype(other)
    elif kind == "strided":
        rm = np.repeat(rm0, 2)[::2]
    elif kind == "overlap-weight" and isinstance(w, np.ndarray) and w.dtype == dt:
        rm = w
    kind = r["out"]
    out = None
    if kind == "fresh":
        out = np.full(shape, 7.0, dt)
    elif kind == "x":
        out = x
    elif kind == "g":
        out = g
    elif kind in ("swapped", "strided", "unaligned"):
        out = _memory(rng, np.full(shape, 7.0, dt), kind)
    elif kind == "other-dtype":
        out = np.full(shape, 7.0, other)
    elif kind == "readonly":
        out = np.full(shape, 7.0, dt)
        out.flags.writeable = False
    elif kind in ("over-running", "over-weight"):
        buf = np.full(int(np.prod(shape)), 7.0, dt)
        out = buf.reshape(shape)
        if kind == "over-running" and rm is not None and rm is rm0:
            rm = buf[:c]
            rm[...] = rm0
        elif kind == "over-weight" and w is not None and isinstance(w, np.ndarray) and w.dtype == dt:
            w = buf[-c:]
            w[...] = w0
    elif kind == "wrong-shape":
        out = np.full(shape + (1,), 7.0, dt)
    elif kind == "string":
        out = "out"
    elif kind == "list":
        out = np.full(shape, 7.0, dt).tolist()

    op = r["op"]
    momentum, eps, training = r["momentum"], r["eps"], r["training"]
    if op == "forward":
        call = (bnfast.batch_norm_forward, (x, w, b, rm, rv),
                dict(momentum=momentum, eps=eps, axis=axis, out=out))
    elif op == "inference":
        call = (bnfast.batch_norm_inference, (x, rm0 if rm is None else rm, rv0 if rv is None else rv, w, b),
                dict(eps=eps, axis=axis, out=out))
    elif op == "backward":
        invstd = (1.0 / np.sqrt(rv0.astype(np.float64) + 1e-5)).astype(dt)
        call = (bnfast.batch_norm_backward, (g, x, rm0 if rm is None else rm, invstd, w),
                dict(training=training, axis=axis, out=out))
    elif op == "batch_norm":
        call = (bnfast.batch_norm, (x, rm, rv, w, b, training, momentum, eps), dict(axis=axis, out=out))
    else:
        call = (bnfast.moments, (x,), dict(axis=axis))
    arrays = [a for a in (x, g, w, b, rm, rv, out) if isinstance(a, np.ndarray)]
    return call + (arrays,)


def _outcome(r):
    fn, args, kwargs, arrays = _build(r)
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- the exception type is the outcome
        return ("raised", type(exc)), [a.copy() for a in arrays]
    if isinstance(result, bnfast.Moments):
        result = (result.count, result.mean, result.m2)
    elif isinstance(result, np.ndarray):
        result = (result,)
    return ("returned", tuple(np.array(a, copy=True) for a in result)), [a.copy() for a in arrays]


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@settings(max_examples=1000)
@given(recipes())
def test_fast_and_validating_paths_agree(r):
    accepted = []
    originals = {name: getattr(_kernels, name) for name in FAST.values()}

    def recording(name):
        def run(*args, **kwargs):
            done = originals[name](*args, **kwargs)
            accepted.append(done is not None)
            return done
        return run

    with pytest.MonkeyPatch.context() as m:
        for name in FAST.values():
            m.setattr(_kernels, name, recording(name))
        fast, fast_arrays = _outcome(r)
    with pytest.MonkeyPatch.context() as m:
        for name in FAST.values():
            m.setattr(_kernels, name, lambda *args, **kwargs: None)
        slow, slow_arrays = _outcome(r)
    event("fast path took the call" if any(accepted) else "fast path declined")
    event(f"{fast[0]}")
    assert fast[0] == slow[0], (fast, slow)
    if fast[0] == "raised":
        assert fast[1] is slow[1], (fast[1], slow[1])
    else:
        assert len(fast[1]) == len(slow[1])
        for a, b in zip(fast[1], slow[1]):
            assert _same(a, b), "results differ between the paths"
    for a, b in zip(fast_arrays, slow_arrays):
        assert _same(a, b), "arguments left in different states"


@pytest.mark.parametrize("op", ["forward", "inference", "backward"])
def test_the_property_exercises_accepted_calls(op, monkeypatch):
    """The recipes include canonical calls the fast path takes."""
    r = dict(op=op, seed=1, dtype="f4", shape=[4, 3, 5], axis=1, x="contiguous", g="contiguous",
             vectors="same", running="same", momentum=0.1, eps=1e-5, out="none", training=True)
    calls = []
    original = getattr(_kernels, FAST[op])
    monkeypatch.setattr(_kernels, FAST[op], lambda *a, **k: calls.append(original(*a, **k)) or calls[-1])
    _outcome(r)
    assert calls and calls[0] is not None
