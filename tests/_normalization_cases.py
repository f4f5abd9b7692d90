"""Shared helpers for the normalization-family tests (not a test module).

- `in_memory`: the same values in memory of another kind (byte order,
  alignment, strides, memory order), so a call on it can be compared bit for
  bit with the call on the contiguous native array.
- `assert_close`: float64 / float32 tolerances against the float64 reference.
- `frn_tau_off_kink`: a threshold for filter response norm that no output is
  near, so finite differences do not straddle the TLU's kink.
"""

from __future__ import annotations

import numpy as np

MEMORY_KINDS = ("contiguous", "swapped", "unaligned", "fortran", "strided", "transposed", "negative")

# Float64 is compared ~1e-12 relative-ish, float32 ~1e-5 (on outputs of order 1).
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


def tol(dtype) -> float:
    return TOL[np.dtype(dtype).newbyteorder("=")]


def in_memory(a: np.ndarray, kind: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """``a``'s values (and dtype) in memory of the given kind; never ``a`` itself
    unless ``kind`` is "contiguous"."""
    rng = rng if rng is not None else np.random.default_rng(0)
    if kind == "contiguous":
        return a
    if kind == "swapped":
        return a.astype(a.dtype.newbyteorder("S"), order="K")
    if kind == "unaligned":
        buf = np.empty(a.nbytes + 1, np.uint8)
        u = buf[1:].view(a.dtype).reshape(a.shape)
        u[...] = a
        assert not u.flags.aligned or a.size == 0
        return u
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "strided":
        # every axis with a step of 2 (and a start of 1 on the first), garbage between
        big = np.full(tuple(2 * n + 1 for n in a.shape), np.nan, a.dtype)
        starts = [1] + [0] * (a.ndim - 1)
        view = big[tuple(slice(s, s + 2 * n, 2) for s, n in zip(starts, a.shape))]
        view[...] = a
        return view
    if kind == "transposed":
        perm = np.arange(a.ndim)[::-1] if a.ndim < 3 else rng.permutation(a.ndim)
        if a.ndim >= 2 and np.array_equal(perm, np.arange(a.ndim)):
            perm = np.arange(a.ndim)[::-1]
        base = np.ascontiguousarray(a.transpose(perm))
        return base.transpose(np.argsort(perm))
    if kind == "negative":
        axes = tuple(range(a.ndim)) if a.ndim else None
        base = np.ascontiguousarray(np.flip(a, axes))
        view = np.flip(base, axes)
        return view
    raise ValueError(kind)


def scale_of(want) -> float:
    return max(1.0, float(np.max(np.abs(want)))) if np.size(want) else 1.0


def assert_close(got, want, dtype, *, scale=None, factor=1.0, err_msg=""):
    """``got`` (any dtype) within the dtype's tolerance of the float64 ``want``:
    ``|got - want| <= t * (scale + |want|)`` with ``scale`` the size of the
    values involved (default max(1, max|want|))."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    t = tol(dtype) * factor
    s = scale_of(want) if scale is None else scale
    np.testing.assert_allclose(got, want, rtol=t, atol=t * s, err_msg=err_msg)


def same_bits(got, want, err_msg=""):
    """Equal values and the same (native-order) dtype."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype.newbyteorder("=") == want.dtype.newbyteorder("="), (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got, want, err_msg=err_msg)


def per_channel(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v).reshape(shape)


def frn_tau_off_kink(z: np.ndarray, axis: int) -> np.ndarray:
    """Per channel, a threshold halfway between two neighbouring values of the
    pre-threshold output ``z`` near the channel's median (so some values are
    above and some below, and none is close)."""
    zm = np.moveaxis(np.asarray(z, np.float64), axis, 0).reshape(z.shape[axis], -1)
    tau = np.empty(zm.shape[0])
    for c, row in enumerate(zm):
        s = np.sort(row)
        if len(s) < 2:
            tau[c] = s[0] - 1.0  # one value: a threshold well below it
            continue
        gaps = np.diff(s)
        lo = len(gaps) // 4
        hi = max(lo + 1, (3 * len(gaps) + 3) // 4)
        i = lo + int(np.argmax(gaps[lo:hi]))  # the widest gap among the middle half
        if gaps[i] > 1e-3 * max(1.0, abs(s[i])):
            tau[c] = (s[i] + s[i + 1]) / 2
        else:  # (nearly) equal values: a threshold well below them all
            tau[c] = s[0] - 1.0
    return tau
