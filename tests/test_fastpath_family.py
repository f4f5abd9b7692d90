"""Property: the family's compiled fast path and its validating path agree.

Layer, RMS, group and instance norm first offer their arguments to
``_kernels.try_rows_*`` and ``_kernels.try_keyed_*``, which repeat a subset
of ``bnfast._normalization``'s rules and its planning in C.  As in
test_fastpath_property, hypothesis draws calls -- canonical ones, ones just
outside what the fast path takes, and bad ones -- and each is made twice on
identical fresh arguments, with the fast path on and off: both must return
the same bits and leave every argument with the same contents, or both must
raise the same exception type.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import bnfast
from bnfast import _kernels
from test_fastpath_property import _memory, _same

FAST = ("try_rows_forward", "try_rows_backward", "try_keyed_forward", "try_keyed_backward")
OPS = (
    "layer_norm_forward", "layer_norm_backward", "rms_norm_forward", "rms_norm_backward",
    "group_norm_forward", "group_norm_backward", "instance_norm_forward", "instance_norm_backward",
    "layer_norm", "rms_norm", "group_norm", "instance_norm",
)  # fmt: skip

# Each field: its canonical value first, then the unusual ones (a recipe
# changes up to three fields of a canonical call).
FIELDS = {
    "dtype": ("f4", "f8"),
    "scale": (3.0, 1e-4),  # 1e-4: eps dominates the variance (a wrong default eps shows)
    "trailing": ("tuple", "int", "list", "np-int", "bool", "too-long", "wrong", "empty", "string"),
    "groups": ("divisor", "one", "all", "non-divisor", 0, None, True, "np-int", 2.0),
    "axis": (1, -1, 2, -2, 0, 7, True, 1.0),
    "x": ("contiguous", "swapped", "unaligned", "fortran", "strided", "reversed", "broadcast"),
    "g": ("contiguous", "swapped", "unaligned", "strided", "other-dtype", "wrong-shape"),
    "vectors": ("same", "none", "weight-only", "other-dtype", "list", "wrong-shape", "int", "unaligned"),
    "stats": ("same", "flat", "other-dtype", "wrong-shape", "list", "swapped", "none"),
    "running": ("none", "same", "alias", "readonly", "other-dtype", "strided", "one-only"),
    "momentum": (0.1, 0.0, 1.0, 1.5, True, np.float32(0.25)),
    "eps": (1e-5, 0.0, -1.0, float("inf"), np.float64(1e-3), 2, None, True),
    "out": ("none", "fresh", "x", "g", "strided", "unaligned", "other-dtype", "readonly",
            "over-weight", "over-stats", "wrong-shape", "list"),
}


@st.composite
def recipes(draw):
    r = {name: options[0] for name, options in FIELDS.items()}
    r["op"] = draw(st.sampled_from(OPS))
    r["dtype"] = draw(st.sampled_from(FIELDS["dtype"]))
    r["seed"] = draw(st.integers(0, 2**16))
    r["shape"] = draw(st.lists(st.integers(1, 5), min_size=2, max_size=4))
    r["k"] = draw(st.integers(1, len(r["shape"])))
    for name in draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=3)):
        r[name] = draw(st.sampled_from(FIELDS[name]))
    return r


def _normalized_shape(kind, trailing):
    return {
        "tuple": trailing, "int": trailing[-1], "list": list(trailing),
        "np-int": tuple(np.int64(n) for n in trailing), "bool": True, "too-long": (1,) + trailing * 2,
        "wrong": tuple(n + 1 for n in trailing), "empty": (), "string": "3",
    }[kind]  # fmt: skip


def _num_groups(kind, c):
    divisor = max(n for n in range(1, c + 1) if c % n == 0 and n < c) if c > 1 else 1
    named = {"divisor": divisor, "one": 1, "all": c, "non-divisor": c + 1, "np-int": np.int64(divisor)}
    return named.get(kind, kind) if isinstance(kind, str) else kind


def _build(r):
    """Fresh arguments of recipe ``r``'s call: (function, args, kwargs,
    every array the call might read or write)."""
    rng = np.random.default_rng(r["seed"])
    dt = np.dtype(r["dtype"])
    other = np.dtype("f8" if r["dtype"] == "f4" else "f4")
    shape = tuple(r["shape"])
    member = r["op"].split("_")[0]
    backward = r["op"].endswith("_backward")
    axis = r["axis"]
    ax = axis % len(shape) if type(axis) is int and -len(shape) <= axis < len(shape) else 1
    c = shape[ax]
    rows = member in ("layer", "rms")
    trailing = shape[len(shape) - r["k"] :]
    per = trailing if rows else (c,)
    x = _memory(rng, (rng.standard_normal(shape) * r["scale"] + 10 * (r["scale"] > 1)).astype(dt), r["x"])
    g0 = rng.standard_normal(shape).astype(dt)
    g = {"other-dtype": g0.astype(other), "wrong-shape": g0[..., :1]}.get(r["g"])
    g = _memory(rng, g0, r["g"]) if g is None else g
    w0, b0 = rng.uniform(0.5, 2, per).astype(dt), rng.standard_normal(per).astype(dt)
    kind = r["vectors"]
    w, b = {
        "none": (None, None), "weight-only": (w0, None), "other-dtype": (w0.astype(other), b0.astype(other)),
        "list": (w0.tolist(), b0.tolist()), "wrong-shape": (np.ones(w0.size + 1, dt), b0),
        "int": (np.ones(per, np.int64), b0), "unaligned": (_memory(rng, w0, "unaligned"), b0),
    }.get(kind, (w0, b0))  # fmt: skip
    if rows:
        stat_shape = shape[: len(shape) - r["k"]] + (1,) * r["k"]
    else:
        stat_shape = (shape[0], c if member == "instance" else _group_count(r, c))
    mean0 = rng.standard_normal(stat_shape).astype(dt)
    inv0 = rng.uniform(0.5, 2, stat_shape).astype(dt)
    kind = r["stats"]
    mean, invstd = {
        "flat": (mean0.reshape(-1), inv0.reshape(-1)), "other-dtype": (mean0.astype(other), inv0.astype(other)),
        "wrong-shape": (mean0.reshape(-1)[:-1], inv0), "list": (mean0.tolist(), inv0.tolist()),
        "swapped": (mean0.astype(dt.newbyteorder("S")), inv0), "none": (None, inv0),
    }.get(kind, (mean0, inv0))  # fmt: skip
    rm0, rv0 = rng.standard_normal(c).astype(dt), rng.uniform(0.5, 2, c).astype(dt)
    kind = r["running"]
    rm, rv = {
        "none": (None, None), "same": (rm0, rv0), "alias": (rm0, rm0), "other-dtype": (rm0.astype(other), rv0),
        "strided": (np.repeat(rm0, 2)[::2], rv0), "one-only": (rm0, None),
    }.get(kind, (rm0, rv0))  # fmt: skip
    if kind == "readonly":
        rv.flags.writeable = False
    kind = r["out"]
    out = None
    if kind == "fresh":
        out = np.full(shape, 7.0, dt)
    elif kind == "x":
        out = x
    elif kind == "g":
        out = g
    elif kind in ("strided", "unaligned"):
        out = _memory(rng, np.full(shape, 7.0, dt), kind)
    elif kind == "other-dtype":
        out = np.full(shape, 7.0, other)
    elif kind == "readonly":
        out = np.full(shape, 7.0, dt)
        out.flags.writeable = False
    elif kind in ("over-weight", "over-stats"):
        buf = np.full(int(np.prod(shape)) + w0.size + mean0.size, 7.0, dt)
        out = buf[: int(np.prod(shape))].reshape(shape)
        if kind == "over-weight" and isinstance(w, np.ndarray) and w.dtype == dt:
            w = buf[-w0.size :].reshape(per)
            w[...] = w0
            out = buf[-int(np.prod(shape)) :].reshape(shape)
        elif kind == "over-stats" and isinstance(mean, np.ndarray) and mean.dtype == dt:
            invstd = buf[-inv0.size :].reshape(stat_shape)
            invstd[...] = inv0
            out = buf[-int(np.prod(shape)) :].reshape(shape)
    elif kind == "wrong-shape":
        out = np.full(shape + (1,), 7.0, dt)
    elif kind == "list":
        out = np.full(shape, 7.0, dt).tolist()

    eps, momentum = r["eps"], r["momentum"]
    ns = _normalized_shape(r["trailing"], trailing)
    num_groups = _num_groups(r["groups"], c)
    fn = getattr(bnfast, r["op"])
    if member in ("layer", "rms") and backward:
        stats = (invstd,) if member == "rms" else (mean, invstd)
        call = (fn, (g, x, ns) + stats + (w,), dict(out=out))
    elif member == "layer":
        call = (fn, (x, ns, w, b) + (() if eps is None else (eps,)), dict(out=out))
    elif member == "rms":
        call = (fn, (x, ns, w, eps), dict(out=out))
    elif member == "group" and backward:
        call = (fn, (g, x, num_groups, mean, invstd, w), dict(axis=axis, out=out))
    elif member == "group":
        call = (fn, (x, num_groups, w, b) + (() if eps is None else (eps,)), dict(axis=axis, out=out))
    elif backward:
        call = (fn, (g, x, mean, invstd, w), dict(axis=axis, out=out))
    elif r["op"] == "instance_norm":
        call = (fn, (x, rm, rv, w, b, True, momentum) + (() if eps is None else (eps,)), dict(axis=axis, out=out))
    else:
        call = (fn, (x, w, b, rm, rv), dict(momentum=momentum, eps=1e-5 if eps is None else eps, axis=axis, out=out))
    arrays = [a for a in (x, g, w, b, mean, invstd, rm, rv, out) if isinstance(a, np.ndarray)]
    return call + (arrays,)


def _group_count(r, c):
    n = _num_groups(r["groups"], c)
    return n if type(n) is int and n > 0 and c % n == 0 else 1


def _outcome(r):
    fn, args, kwargs, arrays = _build(r)
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- the exception type is the outcome
        return ("raised", type(exc)), [a.copy() for a in arrays]
    result = (result,) if isinstance(result, np.ndarray) else result
    return ("returned", tuple(np.array(a, copy=True) for a in result)), [a.copy() for a in arrays]


def _both_paths(r):
    """(outcome with the fast path, whether it took the call, outcome without it)."""
    accepted = []
    originals = {name: getattr(_kernels, name) for name in FAST}

    def recording(name):
        def run(*args, **kwargs):
            done = originals[name](*args, **kwargs)
            accepted.append(done is not None)
            return done

        return run

    with pytest.MonkeyPatch.context() as m:
        for name in FAST:
            m.setattr(_kernels, name, recording(name))
        fast = _outcome(r)
    with pytest.MonkeyPatch.context() as m:
        for name in FAST:
            m.setattr(_kernels, name, lambda *args, **kwargs: None)
        slow = _outcome(r)
    return fast, any(accepted), slow


@settings(max_examples=1500, deadline=None)
@given(recipes())
def test_fast_and_validating_paths_agree(r):
    (fast, fast_arrays), accepted, (slow, slow_arrays) = _both_paths(r)
    event("fast path took the call" if accepted else "fast path declined")
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


CANONICAL = dict(seed=3, dtype="f4", scale=3.0, trailing="tuple", groups="divisor", axis=1, x="contiguous",
                 g="contiguous", vectors="same", stats="same", running="none", momentum=0.1, eps=1e-5,
                 out="none")


LAYOUTS = [([4, 6, 5], 1, 1), ([3, 4, 2, 6], 2, -1), ([2, 6], 1, 1)]  # planar, channels-last, (N, C)


@pytest.mark.parametrize(
    "op,shape,k,axis",
    [(op,) + case for op in OPS for case in LAYOUTS if not (op.startswith("instance") and len(case[0]) == 2)],
)  # (instance norm of (N, C) has one value per instance: an error)
def test_the_property_exercises_accepted_calls(op, shape, k, axis):
    """Canonical calls of every op, layouts planar and channels-last, are
    taken by the fast path (and agree with the validating path)."""
    r = dict(CANONICAL, op=op, shape=shape, k=k, axis=axis)
    (fast, _), accepted, (slow, _) = _both_paths(r)
    assert accepted, "the fast path declined a canonical call"
    assert fast[0] == slow[0] == "returned"
    for a, b in zip(fast[1], slow[1]):
        assert _same(a, b)


def test_instance_norm_running_statistics_take_the_fast_path():
    r = dict(CANONICAL, op="instance_norm_forward", shape=[3, 4, 5], k=1, running="same")
    (fast, fast_arrays), accepted, (slow, slow_arrays) = _both_paths(r)
    assert accepted and fast[0] == "returned"
    for a, b in zip(fast_arrays, slow_arrays):  # the running statistics among them
        assert _same(a, b)


@pytest.mark.parametrize("dtype", FIELDS["dtype"])
@pytest.mark.parametrize("op", ["rms_norm_forward", "rms_norm"])
def test_rms_default_eps_is_the_dtypes_on_both_paths(op, dtype):
    """eps=None means numpy.finfo(dtype).eps: on data of 1e-4 scale it sets
    the result, so a fast path with another default would differ."""
    r = dict(CANONICAL, op=op, dtype=dtype, scale=1e-4, eps=None, shape=[3, 8], k=1)
    (fast, _), accepted, (slow, _) = _both_paths(r)
    assert accepted and fast[0] == slow[0] == "returned"
    for a, b in zip(fast[1], slow[1]):
        assert _same(a, b)
