"""The functional API: the one place that validates arguments and plans views.

Each public op first offers its arguments to the compiled fast path
(``_kernels.try_*``), which takes only calls that are canonical already --
C-contiguous arrays of matching dtype and shape, Python floats in range, an
``out=`` that is the input or overlaps none -- and declines everything else without judging it; this module then
validates, reports and plans the rest.

Every public op sees its array as ``(outer, C, inner)`` around the channel
axis and hands the kernels one of two layout families:

* planar (``inner > 1``, contiguous inner runs): NCHW, NCL, NCDHW, ...;
* channels-last (``inner == 1``, contiguous channels): NC, NHWC, NLC, ...

Strided input maps onto a family through its element strides when it can
(slices, negative strides, a channels-last memory layout passed with
``axis=1``, Fortran order) and is copied once, here, when it cannot.  Nothing
a call would change -- running statistics, ``out=`` buffers -- is touched
before every argument has been checked.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from . import _kernels
from ._moments import Moments

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "get_contention_backoff",
    "get_num_threads",
    "moments",
    "set_contention_backoff",
    "set_num_threads",
]

_SUPPORTED_CHARS = frozenset("fd")  # float32, float64
_FLOAT32 = np.dtype(np.float32)

# Layout modes: how (outer, C, inner) maps onto a kernel family.
_PLANAR = 0  # (outer, C, inner), inner stride 1
_ROWS = 1  # inner == 1, channel stride 1: (outer rows, C)
_ROWS_MERGED = 2  # channel stride 1, outer and inner merge into rows
_TRANSPOSED = 3  # inner == 1, outer stride 1: planar (1, C, outer)


# ---------------------------------------------------------------- validation
#
# Byte order and alignment: the kernels read native, aligned data only.  An
# input in the other byte order (or unaligned) is read once into a native
# copy; an array the call writes (running statistics, out=) is updated
# through a native copy that is written back on success.  Overlap: an array
# updated in place (the running statistics) may share memory with no other
# argument (ValueError); out= may overlap what the call reads, which is then
# computed into a fresh array and copied to out.


def _native(a: np.ndarray) -> bool:
    """Whether the kernels can use ``a``'s memory as it is."""
    return a.dtype.isnative and a.flags.aligned


def _native_dtype(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=")


def _bfloat16() -> np.dtype | None:
    """ml_dtypes' bfloat16, if ml_dtypes is imported (an array of it cannot
    exist otherwise: the optional dependency is never imported here)."""
    module = sys.modules.get("ml_dtypes")
    return None if module is None else np.dtype(module.bfloat16)


def _is_half(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is float16 or ml_dtypes.bfloat16 (either byte order)."""
    if dtype.char == "e":
        return True
    bf16 = _bfloat16() if dtype.kind == "V" else None
    return bf16 is not None and _native_dtype(dtype) == bf16


def _channel_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of the per-channel arrays (weight, bias, running statistics,
    saved statistics, their gradients) for input of ``dtype``: float32 for
    float16 and bfloat16 (as PyTorch's CPU batch norm keeps them), else the
    input's own."""
    return _FLOAT32 if _is_half(dtype) else dtype


def _float_array(x, name: str, *, native: bool = True, half: bool = False) -> np.ndarray:
    """``x`` as a float32/float64 (with ``half``, also float16/bfloat16)
    ndarray; with ``native``, in memory the kernels can read (converted once
    if it must be)."""
    if type(x) is not np.ndarray:
        x = np.asarray(x)
    if x.dtype.char not in _SUPPORTED_CHARS and not (half and _is_half(x.dtype)):
        if half:
            raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got dtype {x.dtype}")
        note = " (float16 and bfloat16 are supported by the batch-norm ops only)" if _is_half(x.dtype) else ""
        raise TypeError(f"{name} must be float32 or float64, got dtype {x.dtype}{note}")
    return _as_native(x) if native else x


def _as_native(x: np.ndarray) -> np.ndarray:
    return x if _native(x) else x.astype(_native_dtype(x.dtype), order="K")


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` share memory (exactly where that is cheap to
    decide, else conservatively)."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=100_000))
    except np.exceptions.TooHardError:
        return True


def _check_state_aliasing(state: dict, others: dict) -> None:
    """Arrays updated in place share memory with no other argument."""
    names = [n for n, a in state.items() if a is not None]
    for i, name in enumerate(names):
        for other in names[i + 1 :]:
            if _overlap(state[name], state[other]):
                raise ValueError(f"{name} and {other} share memory; pass separate arrays")
        for other, a in others.items():
            if isinstance(a, np.ndarray) and _overlap(state[name], a):
                raise ValueError(
                    f"{name} shares memory with {other}; it is updated in place, so pass a separate array"
                )


def _channel_axis(x: np.ndarray, axis) -> int:
    if x.ndim < 2:
        raise ValueError(
            f"expected an array of at least 2 dimensions (N, C, ...), got shape {x.shape}"
        )
    if type(axis) is not int and (not isinstance(axis, numbers.Integral) or isinstance(axis, bool)):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an array of {x.ndim} dimensions")
    return int(axis) % x.ndim


def _real(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    return float(value)


def _eps(eps, name: str = "eps") -> float:
    if type(eps) is float and 0.0 <= eps < math.inf:
        return eps
    value = _real(eps, name)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")
    return value


def _momentum(momentum) -> float:
    if type(momentum) is float and 0.0 <= momentum <= 1.0:
        return momentum
    value = _real(momentum, "momentum")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    return value


def _flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")
    return bool(value)


def _vector(v, name: str, channels: int, dtype: np.dtype) -> np.ndarray | None:
    """A read-only per-channel argument as a contiguous array of ``dtype``."""
    if v is None:
        return None
    if (
        type(v) is np.ndarray
        and v.dtype is dtype
        and v.shape == (channels,)
        and v.flags.c_contiguous
        and v.flags.aligned
    ):
        return v
    v = np.asarray(v)
    if v.dtype.kind != "f" and not _is_half(v.dtype):
        raise TypeError(f"{name} must be a floating-point array, got dtype {v.dtype}")
    if v.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {v.shape}")
    return np.require(v, dtype=dtype, requirements=["C", "A"])


def _state_vector(v, name: str, channels: int, x_dtype: np.dtype) -> np.ndarray:
    """A per-channel buffer updated in place (running statistics), of the
    per-channel dtype of input of ``x_dtype``."""
    if not isinstance(v, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray updated in place, got {type(v).__name__}")
    dtype = _channel_dtype(x_dtype)
    if _native_dtype(v.dtype) != dtype:  # either byte order
        if dtype != x_dtype:
            raise TypeError(
                f"{name} must be float32 for a {x_dtype} input (running statistics of half-precision "
                f"input are kept in float32, as PyTorch's CPU batch norm does), got {v.dtype}"
            )
        raise TypeError(f"{name} must have the dtype of the input ({dtype}), got {v.dtype}")
    if v.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {v.shape}")
    if not v.flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place")
    return v


def _check_out(out, x: np.ndarray, name: str = "out") -> None:
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{name} must have shape {x.shape}, got {out.shape}")
    if _native_dtype(out.dtype) != _native_dtype(x.dtype):  # either byte order
        raise ValueError(f"{name} must have dtype {x.dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")


# ------------------------------------------------------------------ planning


def _merge_dims(shape, strides):
    """(size, element stride) of ``shape`` collapsed to one axis, or None."""
    size, stride, expected = 1, 0, None
    for n, s in zip(reversed(shape), reversed(strides)):
        if n == 1:
            continue
        if expected is not None and s != expected:
            return None
        if expected is None:
            stride = s
        size *= n
        expected = s * n
    return size, stride


def _geometry(a: np.ndarray, axis: int):
    """(outer, C, inner) and their element strides, or None if not expressible."""
    item = a.itemsize
    if any(s % item for s in a.strides):
        return None
    strides = [s // item for s in a.strides]
    before = _merge_dims(a.shape[:axis], strides[:axis])
    after = _merge_dims(a.shape[axis + 1 :], strides[axis + 1 :])
    if before is None or after is None:
        return None
    (outer, so), (inner, si) = before, after
    channels, sc = a.shape[axis], strides[axis]
    if channels == 1:
        sc = 1
    return outer, channels, inner, so, sc, si


def _strides_for(geo, mode: int):
    """Kernel (outer, channel) strides of an operand under ``mode``, or None."""
    outer, _, inner, so, sc, si = geo
    if mode == _PLANAR:
        return (so, sc) if inner > 1 and si == 1 else None
    if mode == _ROWS:
        return (so, 1) if inner == 1 and sc == 1 else None
    if mode == _ROWS_MERGED:
        ok = inner > 1 and sc == 1 and (outer == 1 or so == si * inner)
        return (si, 1) if ok else None
    ok = inner == 1 and outer > 1 and so == 1  # kernel inner == outer > 1: planar
    return (0, sc) if ok else None


def _kernel_shape(geo, mode: int):
    outer, channels, inner = geo[:3]
    if mode == _ROWS_MERGED:
        return outer * inner, channels, 1
    if mode == _TRANSPOSED:
        return 1, channels, outer
    return outer, channels, inner


class _Plan(NamedTuple):
    """How the kernels see the data of one call."""

    axis: int
    mode: int
    shape: tuple  # kernel (outer, C, inner)
    x: np.ndarray  # the input, or its one contiguous copy
    xs: tuple


def _plan(x: np.ndarray, axis: int) -> _Plan:
    if x.flags.c_contiguous:  # the common case, without stride arithmetic
        shape = x.shape
        channels, inner = shape[axis], math.prod(shape[axis + 1 :])
        outer = math.prod(shape[:axis])
        if inner > 1:
            return _Plan(axis, _PLANAR, (outer, channels, inner), x, (channels * inner, inner))
        return _Plan(axis, _ROWS, (outer, channels, 1), x, (channels, 1))
    geo = _geometry(x, axis)
    if geo is not None:
        for mode in (_PLANAR, _ROWS, _ROWS_MERGED, _TRANSPOSED):
            xs = _strides_for(geo, mode)
            if xs is not None:
                return _Plan(axis, mode, _kernel_shape(geo, mode), x, xs)
    x = np.ascontiguousarray(x)
    geo = _geometry(x, axis)
    mode = _PLANAR if geo[2] > 1 else _ROWS
    return _Plan(axis, mode, _kernel_shape(geo, mode), x, _strides_for(geo, mode))


def _fit(plan: _Plan, a: np.ndarray):
    """Kernel strides of ``a`` (same shape as the input) under ``plan``, or None."""
    if a is plan.x:
        return plan.xs
    geo = _geometry(a, plan.axis)
    return None if geo is None else _strides_for(geo, plan.mode)


def _fresh(plan: _Plan):
    """A new array of the input's shape whose memory order fits ``plan`` (for
    every usual layout, the input's own memory order), and its kernel strides."""
    x, ax = plan.x, plan.axis
    _, channels, inner = plan.shape
    if plan.mode == _ROWS_MERGED:  # channels innermost
        rest = x.shape[:ax] + x.shape[ax + 1 :]
        return np.moveaxis(np.empty(rest + (channels,), x.dtype), -1, ax), (channels, 1)
    if plan.mode == _TRANSPOSED:  # channels outermost
        rest = x.shape[:ax] + x.shape[ax + 1 :]
        return np.moveaxis(np.empty((channels,) + rest, x.dtype), 0, ax), (0, inner)
    return np.empty(x.shape, x.dtype), (channels * inner, inner)


def _input(plan: _Plan, a: np.ndarray):
    """A second input (grad_out) and its kernel strides, copied once if it must be."""
    strides = _fit(plan, a)
    if strides is not None:
        return a, strides
    copy, strides = _fresh(plan)
    np.copyto(copy, a)
    return copy, strides


def _output(plan: _Plan, out: np.ndarray | None, inputs, others=()):
    """Where the kernel writes: ``out`` itself when it is native, its strides
    fit and it overlaps no input except as that very array (element for
    element, which every kernel allows) and none of ``others`` (per-channel
    arguments) at all, else a fresh array copied to ``out`` afterwards."""
    if out is not None and _native(out):
        strides = _fit(plan, out)
        if (
            strides is not None
            and all(out is a or not np.may_share_memory(out, a) for a in inputs)
            and not any(a is not None and np.may_share_memory(out, a) for a in others)
        ):
            return out, strides
    return _fresh(plan)


def _residual(z, x: np.ndarray, name: str = "residual", of: str = "x") -> np.ndarray | None:
    """A second input added element for element: the shape and dtype of ``x``
    (named ``of`` in messages)."""
    if z is None:
        return None
    z = _float_array(z, name, half=_is_half(x.dtype))
    if z.shape != x.shape:
        raise ValueError(f"{name} must have the shape of {of} {x.shape}, got {z.shape}")
    if z.dtype != x.dtype:  # both native now
        raise TypeError(f"{name} must have the dtype of {of} ({x.dtype}), got {z.dtype}")
    return z


def _fused_operands(plan: _Plan, fused, z: np.ndarray | None):
    """The kernels' ``act`` argument of a fused call (None: plain batch
    norm) and the inputs its output may alias element for element."""
    if fused is None:
        return None, (plan.x,)
    if z is None:
        return (fused[0], fused[1], None, None), (plan.x,)
    zk, zs = _input(plan, z)
    return (fused[0], fused[1], zk, zs), (plan.x, zk)


def _state_buffer(a: np.ndarray | None, dtype: np.dtype) -> np.ndarray | None:
    """An array the kernel may update in place for the state array ``a``:
    ``a`` itself, or a contiguous native copy written back on success."""
    if a is None or (a.flags.c_contiguous and _native(a)):
        return a
    return np.array(a, dtype=dtype, order="C", copy=True)  # a fresh array is aligned


def _finish(target: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return target
    if target is not out:
        np.copyto(out, target)
    return out


# ------------------------------------------------------------ public functions


def batch_norm_forward(
    x: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    *,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch normalization in training mode: batch statistics, then normalize.

    Per channel, the mean and biased variance over every axis but ``axis`` are
    computed in one pass with Welford's algorithm (accumulated in float64,
    blocks merged with Chan's formula in a fixed order), and

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    Parameters
    ----------
    x : numpy.ndarray of float32, float64, float16 or bfloat16, ndim >= 2
        Input, any strides and memory order.
    weight, bias : array_like of shape (C,), optional
        Affine parameters; ``None`` means 1 and 0.
    running_mean, running_var : numpy.ndarray of shape (C,) and x's dtype, optional
        (float32 for float16/bfloat16 x.)  Updated in place as PyTorch does:
        ``r_mean = (1 - momentum) * r_mean + momentum * mean`` and
        ``r_var = (1 - momentum) * r_var + momentum * var * n / (n - 1)``,
        n the number of values per channel.  Pass both or neither.
    momentum : float in [0, 1], default 0.1
        Weight of the batch statistics in the running-statistics update.
    eps : float >= 0, default 1e-5
        Added to the variance before the square root.
    axis : int, default 1
        The channel axis: 1 for channels-first (NC, NCL, NCHW, NCDHW), -1 for
        channels-last (NLC, NHWC, NDHWC).
    out : numpy.ndarray, optional
        Where to write ``y``: x's shape and dtype, writable; may be ``x``.

    Returns
    -------
    y : numpy.ndarray
        Normalized input, x's shape and dtype.
    save_mean : numpy.ndarray of shape (C,)
        Batch mean, x's dtype (float32 for float16/bfloat16 x, as every
        per-channel array: weight, bias and the running statistics too).
    save_invstd : numpy.ndarray of shape (C,)
        ``1 / sqrt(var + eps)``, of save_mean's dtype.

    Raises
    ------
    TypeError
        If x is not float32/float64/float16/bfloat16, or running statistics
        have another dtype than the per-channel one.
    ValueError
        For a bad shape, axis, eps, momentum or ``out``; read-only running
        statistics; one value per channel or an empty batch.  Nothing is
        modified when an exception is raised.

    See Also
    --------
    batch_norm_backward : Gradients of this function.
    batch_norm : The torch.nn.functional.batch_norm-compatible wrapper.
    """
    done = _kernels.try_forward_train(x, weight, bias, running_mean, running_var, momentum, eps, axis, out)
    if done is not None:
        return done
    return _forward_train(x, weight, bias, running_mean, running_var, momentum, eps, axis, out)


def _forward_train(x, weight, bias, running_mean, running_var, momentum, eps, axis, out, fused=None,
                   statistics=None):
    """The validating path of `batch_norm_forward`; ``fused``: (activation
    code, negative slope, residual or None) of ``batch_norm_act_forward``;
    ``statistics``: the kernel's other normalizing statistics (see
    ``_variants.statistics_forward``), already validated."""
    source = x
    x = _float_array(x, "x", half=True)
    ax = _channel_axis(x, axis)
    channels = x.shape[ax]
    cdt = _channel_dtype(x.dtype)
    weight = _vector(weight, "weight", channels, cdt)
    bias = _vector(bias, "bias", channels, cdt)
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if running_mean is not None:
        running_mean = _state_vector(running_mean, "running_mean", channels, x.dtype)
        running_var = _state_vector(running_var, "running_var", channels, x.dtype)
    momentum, eps = _momentum(momentum), _eps(eps)
    _check_out(out, x)
    z = None if fused is None else _residual(fused[2], x)
    if running_mean is not None:
        _check_state_aliasing(
            {"running_mean": running_mean, "running_var": running_var},
            {"x": source, "weight": weight, "bias": bias, "out": out, "residual": z},
        )
    per_channel = x.size // channels if channels else math.prod(x.shape[:ax] + x.shape[ax + 1 :])
    if per_channel == 0:
        raise ValueError(f"cannot compute batch statistics of an empty batch (input shape {x.shape})")
    if per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}"
        )

    save_mean = np.empty(channels, cdt)
    save_invstd = np.empty(channels, cdt)
    if channels == 0:
        return (out if out is not None else np.empty_like(x)), save_mean, save_invstd
    plan = _plan(x, ax)
    act, inputs = _fused_operands(plan, fused, z)
    y, ys = _output(plan, out, inputs, (weight, bias))
    rm = _state_buffer(running_mean, cdt)
    rv = _state_buffer(running_var, cdt)
    _kernels.forward_train(
        plan.shape, plan.x, plan.xs, y, ys, weight, bias, rm, rv, momentum, eps, save_mean, save_invstd,
        act=act, statistics=statistics,
    )
    if rm is not None and rm is not running_mean:
        running_mean[...] = rm
    if rv is not None and rv is not running_var:
        running_var[...] = rv
    return _finish(y, out), save_mean, save_invstd


def batch_norm_inference(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Batch normalization with given statistics (evaluation mode).

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``,
    computed in float64 per element and rounded once to x's dtype.

    Parameters
    ----------
    x : numpy.ndarray of float32, float64, float16 or bfloat16, ndim >= 2
        Input, any strides and memory order.
    running_mean, running_var : array_like of shape (C,)
        The statistics to normalize with (not modified).
    weight, bias : array_like of shape (C,), optional
        Affine parameters; ``None`` means 1 and 0.
    eps : float >= 0, default 1e-5
        Added to the variance before the square root.
    axis : int, default 1
        The channel axis (negative allowed).
    out : numpy.ndarray, optional
        Where to write the result; may be ``x``.

    Returns
    -------
    numpy.ndarray
        The normalized input, x's shape and dtype.

    Raises
    ------
    TypeError, ValueError
        As `batch_norm_forward`.
    """
    done = _kernels.try_inference(x, running_mean, running_var, weight, bias, eps, axis, out)
    if done is not None:
        return done
    return _inference(x, running_mean, running_var, weight, bias, eps, axis, out)


def _inference(x, running_mean, running_var, weight, bias, eps, axis, out, fused=None):
    """The validating path of `batch_norm_inference`; ``fused`` as in _forward_train."""
    x = _float_array(x, "x", half=True)
    ax = _channel_axis(x, axis)
    channels = x.shape[ax]
    cdt = _channel_dtype(x.dtype)
    running_mean = _vector(running_mean, "running_mean", channels, cdt)
    running_var = _vector(running_var, "running_var", channels, cdt)
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required for inference")
    weight = _vector(weight, "weight", channels, cdt)
    bias = _vector(bias, "bias", channels, cdt)
    eps = _eps(eps)
    _check_out(out, x)
    z = None if fused is None else _residual(fused[2], x)
    if x.size == 0:
        return out if out is not None else np.empty_like(x)
    plan = _plan(x, ax)
    act, inputs = _fused_operands(plan, fused, z)
    y, ys = _output(plan, out, inputs, (running_mean, running_var, weight, bias))
    _kernels.inference(
        plan.shape, plan.x, plan.xs, y, ys, running_mean, running_var, weight, bias, eps, act=act
    )
    return _finish(y, out)


def batch_norm_backward(
    grad_out: ArrayLike,
    x: ArrayLike,
    save_mean: ArrayLike,
    save_invstd: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    training: bool = True,
    axis: int = 1,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the gradients of batch normalization with respect to input, weight and bias.

    With ``training=True`` the statistics are those of the batch and the
    gradient flows through them::

        grad_input = weight * invstd * (g - mean(g) - xhat * mean(g * xhat))

    With ``training=False`` they are constants (evaluation mode, frozen-BN
    fine-tuning): ``grad_input = g * weight * invstd``.  In both cases
    ``grad_weight = sum(g * xhat)`` and ``grad_bias = sum(g)``, with
    ``xhat = (x - save_mean) * save_invstd``.

    Parameters
    ----------
    grad_out : numpy.ndarray
        Gradient of the loss with respect to the output; x's shape and dtype.
    x : numpy.ndarray of float32, float64, float16 or bfloat16
        The forward input.
    save_mean, save_invstd : array_like of shape (C,)
        From `batch_norm_forward`; for ``training=False`` the running mean and
        ``1 / sqrt(running_var + eps)``.
    weight : array_like of shape (C,), optional
        ``None`` means 1.
    training : bool, default True
        Whether the statistics are the batch's (the gradient flows through
        them) or constants.
    axis : int, default 1
        The channel axis (negative allowed).
    out : numpy.ndarray, optional
        Where to write grad_input; may be ``grad_out`` or ``x``.

    Returns
    -------
    grad_input : numpy.ndarray
        Gradient with respect to ``x``, x's shape and dtype.
    grad_weight, grad_bias : numpy.ndarray of shape (C,)
        Gradients with respect to weight and bias, x's dtype (float32 for
        float16/bfloat16 x; computed even when ``weight`` is None).

    Raises
    ------
    TypeError, ValueError
        For bad dtypes, shapes, axis or ``out``.
    """
    done = _kernels.try_backward(grad_out, x, save_mean, save_invstd, weight, training, axis, out)
    if done is not None:
        return done
    return _backward(grad_out, x, save_mean, save_invstd, weight, training, axis, out)


def _backward(grad_out, x, save_mean, save_invstd, weight, training, axis, out, fused=None, share=1.0,
              ref_mean=None):
    """The validating path of `batch_norm_backward`; ``fused``: (activation
    code, negative slope) of in-place activated batch norm, ``x`` then being
    the forward's output (see ``batch_norm_act_backward``); ``share`` and
    ``ref_mean`` (float64, validated): statistics of which the batch is a
    share (see ``_variants.shared_batch_norm_backward``)."""
    x = _float_array(x, "x", half=True)
    grad_out = _float_array(grad_out, "grad_out", half=True)
    ax = _channel_axis(x, axis)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have the shape of x {x.shape}, got {grad_out.shape}")
    if grad_out.dtype != x.dtype:  # both native now
        raise TypeError(f"grad_out must have the dtype of x ({x.dtype}), got {grad_out.dtype}")
    channels = x.shape[ax]
    cdt = _channel_dtype(x.dtype)
    save_mean = _vector(save_mean, "save_mean", channels, cdt)
    save_invstd = _vector(save_invstd, "save_invstd", channels, cdt)
    if save_mean is None or save_invstd is None:
        raise ValueError("save_mean and save_invstd are required")
    weight = _vector(weight, "weight", channels, cdt)
    training = _flag(training, "training")
    _check_out(out, x)
    grad_weight = np.zeros(channels, cdt)
    grad_bias = np.zeros(channels, cdt)
    if x.size == 0:
        grad_in = out if out is not None else np.empty_like(x)
        return grad_in, grad_weight, grad_bias
    plan = _plan(x, ax)
    g, gs = _input(plan, grad_out)
    grad_in, gis = _output(plan, out, (plan.x, g), (save_mean, save_invstd, weight))
    _kernels.backward(
        plan.shape, g, gs, plan.x, plan.xs, grad_in, gis,
        save_mean, save_invstd, weight, training, grad_weight, grad_bias,
        act=None if fused is None else (fused[0], fused[1], None, None), share=share, ref_mean=ref_mean,
    )  # fmt: skip
    return _finish(grad_in, out), grad_weight, grad_bias


def batch_norm(
    x: ArrayLike,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Batch normalization with the signature of ``torch.nn.functional.batch_norm``.

    Code written for PyTorch ports by changing the import: in training mode the
    batch statistics normalize and update the running statistics (when given);
    otherwise the running statistics normalize.

    Parameters
    ----------
    x : numpy.ndarray of float32, float64, float16 or bfloat16, ndim >= 2
        Input, any strides and memory order.
    running_mean, running_var : numpy.ndarray of shape (C,) or None
        Required when ``training`` is False; updated in place when training.
    weight, bias : array_like of shape (C,), optional
        Affine parameters; ``None`` means 1 and 0.
    training : bool, default False
        Normalize with the batch statistics (and update the running ones)
        instead of the running statistics.
    momentum : float in [0, 1], default 0.1
        Weight of the batch statistics in the running-statistics update.
    eps : float >= 0, default 1e-5
        Added to the variance before the square root.
    axis : int, default 1
        The channel axis (keyword only; PyTorch has none).
    out : numpy.ndarray, optional
        Where to write the result: x's shape and dtype, writable; may be ``x``.

    Returns
    -------
    numpy.ndarray
        The normalized input, x's shape and dtype.

    See Also
    --------
    batch_norm_forward : Training mode, also returning the batch statistics.
    batch_norm_inference : Evaluation mode.
    """
    if _flag(training, "training"):
        y, _, _ = batch_norm_forward(
            x, weight, bias, running_mean, running_var, momentum=momentum, eps=eps, axis=axis, out=out
        )
        return y
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be given when training is False")
    return batch_norm_inference(x, running_mean, running_var, weight, bias, eps=eps, axis=axis, out=out)


def moments(x: ArrayLike, *, axis: int = 1) -> Moments:
    """Per-channel Welford state (count, mean, M2) of ``x``.

    The state merges exactly with others (`Moments.merge`), for statistics of
    data sets seen in pieces: ``bnfast.recalibrate`` and distributed use.

    Parameters
    ----------
    x : numpy.ndarray of float32, float64, float16 or bfloat16, ndim >= 2
        Input, any strides and memory order.
    axis : int, default 1
        The channel axis.

    Returns
    -------
    Moments
        ``count`` (int64), ``mean`` and ``m2`` (float64), each of shape (C,).
    """
    x = _float_array(x, "x", native=False, half=True)
    ax = _channel_axis(x, axis)
    x, repeats = _unbroadcast(x, ax)
    x = _as_native(x)
    channels = x.shape[ax]
    count = np.zeros(channels, np.float64)
    mean = np.zeros(channels, np.float64)
    m2 = np.zeros(channels, np.float64)
    if x.size:
        plan = _plan(x, ax)
        _kernels.moments(plan.shape, plan.x, plan.xs, count, mean, m2)
    if repeats != 1:  # the state of `repeats` copies of the same values
        count *= repeats
        m2 *= repeats
    return Moments(count.astype(np.int64), mean, m2)


def _unbroadcast(x: np.ndarray, axis: int):
    """``x`` without its repeated (stride-0) non-channel axes, and how many
    times the rest repeats: statistics need one pass over distinct data."""
    index, repeats = [], 1
    for i, (n, s) in enumerate(zip(x.shape, x.strides)):
        if i != axis and s == 0 and n > 1:
            index.append(slice(0, 1))
            repeats *= n
        else:
            index.append(slice(None))
    return (x[tuple(index)], repeats) if repeats != 1 else (x, 1)


# ------------------------------------------------------------------- threads


_requested: int | None = None  # the last set_num_threads argument (bnfast._threadpool restores it)


def set_num_threads(n: int | None) -> None:
    """Set the number of threads every kernel uses.

    Parameters
    ----------
    n : int >= 1, or None
        ``None`` restores the default: OpenMP's, which follows
        ``OMP_NUM_THREADS`` and threadpoolctl limits.

    Raises
    ------
    TypeError
        ``n`` is not an integer (or None).
    ValueError
        ``n`` is outside ``[1, 4 * os.cpu_count()]``: more threads than that
        only oversubscribe the CPUs (and tens of thousands make OpenMP fail).

    Notes
    -----
    Results are bit-identical for any thread count.  An OpenMP default
    (``OMP_NUM_THREADS``) above the bound is capped to it.  In a child made by
    ``os.fork()`` (e.g. a ``multiprocessing`` worker with the 'fork' start
    method) kernels always run on one thread, and asking for more warns:
    OpenMP's threads do not survive ``fork``, and a parallel call would hang.
    Use the 'spawn' or 'forkserver' start method for parallel workers.
    A serial build (no OpenMP) accepts any valid ``n`` and runs on one thread.
    With threadpoolctl installed, ``threadpoolctl.threadpool_info()`` lists
    bnfast (``internal_api="bnfast"``, ``user_api="openmp"``) and
    ``threadpool_limits`` applies to it, over an explicit ``n`` too, restoring
    this setting afterwards.
    """
    global _requested
    if n is None:
        _kernels.set_num_threads(0)
        _requested = None
        return
    if not isinstance(n, numbers.Integral) or isinstance(n, (bool, np.bool_)):
        raise TypeError(f"number of threads must be an integer or None, got {n!r}")
    limit = _kernels.max_threads()
    if not 1 <= n <= limit:
        raise ValueError(f"number of threads must be in [1, {limit}] (4 per CPU) or None, got {n!r}")
    _kernels.set_num_threads(int(n))
    _requested = int(n)


def get_num_threads() -> int:
    """Number of threads the next kernel call uses (1 in a serial build).

    Returns
    -------
    int
        At least 1; always 1 in a child made by ``os.fork()``.
    """
    return _kernels.get_num_threads() if _kernels.openmp_enabled() else 1


def set_contention_backoff(enabled: bool) -> None:
    """Let parallel calls fall back to one thread while other processes hold the cores.

    Parameters
    ----------
    enabled : bool
        True turns the back-off on, False (the default at import, unless
        ``BNFAST_CONTENTION_BACKOFF=1``) off.  Either way the back-off's
        state is reset: the next call runs on `get_num_threads` threads.

    Raises
    ------
    TypeError
        ``enabled`` is not a bool.

    Notes
    -----
    Every barrier of a parallel call waits for its slowest thread; when the OS
    deschedules one (another process competes for the cores), each barrier
    waits for a time slice, and a call of a millisecond was measured at up to
    34 times its quiet time.  With the back-off on, a parallel call of at
    least a millisecond and ``2**22`` elements checks whether the OS ran each
    of its threads for at least half the call.  Where one ran less, the calls
    of that size in the next 10 ms run on one thread, which waits for nobody;
    while the contention lasts the period doubles, up to 1 s, and a clean
    parallel call brings it back to 10 ms.  Smaller calls, with few barriers,
    keep their threads.  Results are bit-identical for any thread count: the
    back-off changes only speed.  It is off by default because it is a
    trade-off: on a 2-core VM it removed the rare calls of 5-34 times their
    quiet time, but one thread sharing a core is slower than two threads the
    scheduler favours, and beside two busy threads the (32,64,56,56) backward
    took 3.0-3.6 times its quiet time with it and 1.0-2.9 times without.
    ``python -m bnfast bench --contention`` measures both (run it with
    ``BNFAST_CONTENTION_BACKOFF=1`` for the back-off).
    """
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _kernels.set_contention_backoff(bool(enabled))


def get_contention_backoff() -> bool:
    """Whether the contention back-off is on (see `set_contention_backoff`).

    Returns
    -------
    bool
        True when parallel calls fall back to one thread under contention.
    """
    return _kernels.contention_backoff()[0]


# ------------------------------------------------- statistics from elsewhere
#
# Batch norm whose statistics are not those of the array at hand (SyncBatchNorm:
# the global batch spread over processes), built from the kernels above: the
# forward is an inference call, the backward a constant-statistics backward
# call (which also gives the local sums) plus an inference call that adds the
# terms through the statistics.  The statistics are float64; their mean is
# carried as a pair ``mh + ml`` (mh of the input's dtype, ml the float64
# rest), folded into the shift, so a large mean does not cancel in float32.
# The callers have validated x (dtype, axis, channel count) and eps.


def _split_mean(mean: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """``mean`` (float64) as ``mh`` of ``dtype`` plus the float64 rest ``ml``."""
    mh = mean.astype(dtype)
    return mh, mean - mh.astype(np.float64)


def _normalize_with(x: np.ndarray, mean: np.ndarray, var: np.ndarray, weight: np.ndarray | None,
                    bias: np.ndarray | None, eps: float, axis: int) -> np.ndarray:
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` for float64 statistics (C,)."""
    dt = x.dtype
    mh, ml = _split_mean(mean, dt)
    scale = (1.0 if weight is None else weight.astype(np.float64)) / np.sqrt(var + eps)
    shift = (0.0 if bias is None else bias.astype(np.float64)) - ml * scale
    return batch_norm_inference(x, mh, var.astype(dt), weight, np.asarray(shift, np.float64).astype(dt),
                                eps=eps, axis=axis)


def _local_grad_sums(grad_out: np.ndarray, x: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                     weight: np.ndarray | None, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(grad_out * weight * invstd, sum(grad_out), sum(grad_out * xhat))`` per channel.

    ``xhat = (x - mean) * invstd`` with the float64 statistics; the sums are
    float64 and are what :func:`_add_grad_through_stats` needs once summed
    over every part of the batch.
    """
    dt = x.dtype
    mh, ml = _split_mean(mean, dt)
    partial, sum_gx, sum_g = batch_norm_backward(grad_out, x, mh, invstd.astype(dt), weight,
                                                 training=False, axis=axis)
    sum_g = sum_g.astype(np.float64)
    # the kernel's xhat uses mh: sum(g * (x - mh - ml) * invstd) = its sum - ml * invstd * sum(g)
    sum_gx = sum_gx.astype(np.float64) - ml * invstd * sum_g
    return partial, sum_g, sum_gx


def _add_grad_through_stats(partial: np.ndarray, x: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                            weight: np.ndarray | None, sum_g: np.ndarray, sum_gx: np.ndarray,
                            count: int, axis: int) -> np.ndarray:
    """Turn ``partial`` (from :func:`_local_grad_sums`) into the training grad_input, in place.

    ``grad_input = weight * invstd * (g - sum_g / n - xhat * sum_gx / n)``
    where ``sum_g``, ``sum_gx`` (float64, (C,)) and ``n = count`` are those
    of the whole batch: ``partial`` holds the first term; the other two, an
    affine function of ``x`` per channel, come from one fused inference call
    that adds ``partial`` as its residual and writes over it (one pass).
    """
    dt = x.dtype
    mh, ml = _split_mean(mean, dt)
    a = (1.0 if weight is None else weight.astype(np.float64)) * invstd
    k0 = -a * sum_g / count  # + k1 * (x - mean)
    k1 = -a * invstd * sum_gx / count
    identity = 1  # bn_activation's BN_ACT_IDENTITY (ops.h): the affine step plus the residual
    return _inference(x, mh, np.ones_like(mh), k1.astype(dt), (k0 - ml * k1).astype(dt), 0.0, axis,
                      partial, fused=(identity, 0.0, partial))
