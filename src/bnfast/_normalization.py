"""The normalization family's functional API on batch norm's kernels.

Every member normalizes groups of values -- keys -- by their own statistics,
and the kernels see each call through one keyed view (``bn_keys`` in
``include/bnfast/ops.h``): ``batch`` samples of ``(outer, C, inner)``,
statistics per (sample, group of channels), the affine step per channel or
per inner element:

=================  ===========================  ==============================
member             keys                          kernel view
=================  ===========================  ==============================
instance norm      (sample, channel)             samples of (outer, C, inner)
group norm         (sample, group of C/G)        the same, channels pooled by G
filter response    (sample, channel), RMS        as instance norm, uncentered
layer norm         row of the normalized dims    (1, rows, D), affine per inner
RMS norm           row, RMS                      as layer norm, uncentered
=================  ===========================  ==============================

The sample view reuses batch norm's layout planning (``_functional``) on one
sample; the batch axis is always axis 0.  Validation lives here, once per
member, and nothing a call changes (running statistics, ``out=``) is touched
before every argument has been checked.  As in ``_functional``, each op
first offers its arguments to the compiled fast path (``_kernels.try_rows_*``
for layer/RMS norm, ``_kernels.try_keyed_*`` for group and instance norm),
which takes only canonical calls, plans them as this module would, and
declines the rest without judging them.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import _kernels
from ._functional import (
    _PLANAR,
    _ROWS,
    _ROWS_MERGED,
    _TRANSPOSED,
    _channel_axis,
    _check_out,
    _check_state_aliasing,
    _eps,
    _finish,
    _float_array,
    _geometry,
    _kernel_shape,
    _merge_dims,
    _momentum,
    _native,
    _real,
    _state_buffer,
    _strides_for,
    _state_vector,
    _vector,
    batch_norm_inference,
)

__all__ = [
    "layer_norm",
    "layer_norm_forward",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_forward",
    "rms_norm_backward",
    "group_norm",
    "group_norm_forward",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_forward",
    "instance_norm_backward",
    "filter_response_norm",
    "filter_response_norm_forward",
    "filter_response_norm_backward",
]

ShapeLike = Union[int, Sequence[int]]
Array = np.ndarray


# ------------------------------------------------------------------ planning


class _KeyedPlan(NamedTuple):
    """How the kernels see one keyed call."""

    shape: tuple  # kernel (outer, C, inner): one sample, or (1, rows, D)
    keys: tuple  # (batch, group, uncentered, affine_inner), bn_keys
    x: np.ndarray  # the input, or its one copy
    xs: tuple  # element strides (outer, channel, sample)
    fit: Callable[[np.ndarray], Optional[tuple]]  # strides of an array of x's shape, or None


def _sample_strides(a: np.ndarray, axis: int, modes=(_PLANAR, _ROWS, _ROWS_MERGED, _TRANSPOSED)):
    """(mode, kernel shape, strides) of ``a`` seen sample by sample (batch axis
    0, channel axis ``axis`` >= 1), or None."""
    if a.strides[0] % a.itemsize:
        return None
    geo = _geometry(a[0], axis - 1)
    if geo is None:
        return None
    for mode in modes:
        s = _strides_for(geo, mode)
        if s is not None:
            return mode, _kernel_shape(geo, mode), s + (a.strides[0] // a.itemsize,)
    return None


def _settle(x: np.ndarray, plan_of: Callable[[np.ndarray], Optional[_KeyedPlan]]) -> _KeyedPlan:
    """The plan of ``x`` if its outputs (fresh arrays in x's memory order) fit
    it too, else the plan of a contiguous copy."""
    plan = plan_of(x)
    # a C-contiguous x's fresh outputs are C-contiguous too: only other
    # layouts need the (allocating) probe
    if plan is None or (not x.flags.c_contiguous and plan.fit(np.empty_like(x)) is None):
        plan = plan_of(np.ascontiguousarray(x))
    assert plan is not None
    return plan


def _sample_plan(x: np.ndarray, axis: int, group: int, uncentered: bool) -> _KeyedPlan:
    def plan_of(a):
        found = _sample_strides(a, axis)
        if found is None:
            return None
        mode, shape, xs = found

        def fit(b):
            other = _sample_strides(b, axis, (mode,))
            return other[2] if other is not None and other[1] == shape else None

        return _KeyedPlan(shape, (a.shape[0], group, int(uncentered), 0), a, xs, fit)

    return _settle(x, plan_of)


def _row_strides(a: np.ndarray, k: int):
    """(rows, D, strides) of ``a`` as rows of its trailing ``k`` dims, or None."""
    item = a.itemsize
    if any(s % item for s in a.strides):
        return None
    strides = [s // item for s in a.strides]
    inner = _merge_dims(a.shape[a.ndim - k :], strides[a.ndim - k :])
    rows = _merge_dims(a.shape[: a.ndim - k], strides[: a.ndim - k])
    if inner is None or rows is None or (inner[0] > 1 and inner[1] != 1):
        return None
    return rows[0], inner[0], (0, rows[1], 0)


def _row_plan(x: np.ndarray, k: int, uncentered: bool) -> _KeyedPlan:
    def plan_of(a):
        found = _row_strides(a, k)
        if found is None:
            return None
        rows, d, xs = found

        def fit(b):
            other = _row_strides(b, k)
            return other[2] if other is not None else None

        return _KeyedPlan((1, rows, d), (1, 1, int(uncentered), 1), a, xs, fit)

    return _settle(x, plan_of)


def _output(plan: _KeyedPlan, out, inputs, others=()):
    """Where the kernel writes: ``out`` itself when it is native, fits the plan
    and overlaps no input except as that very array and none of ``others``,
    else a fresh array (copied to ``out`` by `_finish`)."""
    if out is not None and _native(out):
        strides = plan.fit(out)
        if (
            strides is not None
            and all(out is a or not np.may_share_memory(out, a) for a in inputs)
            and not any(a is not None and np.may_share_memory(out, a) for a in others)
        ):
            return out, strides
    fresh = np.empty_like(plan.x)
    return fresh, plan.fit(fresh)


def _input(plan: _KeyedPlan, a: np.ndarray):
    """A second input (grad_out) and its strides, copied once if it must be."""
    strides = plan.fit(a)
    if strides is not None:
        return a, strides
    copy = np.empty_like(plan.x)
    np.copyto(copy, a)
    return copy, plan.fit(copy)


# ---------------------------------------------------------------- validation


def _int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    return int(value)


def _normalized_shape(normalized_shape, x: np.ndarray) -> tuple:
    """``normalized_shape`` as a tuple that matches x's trailing dims."""
    shape: tuple[int, ...]
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        shape = (int(normalized_shape),)
    else:
        try:
            shape = tuple(_int(n, "normalized_shape") for n in normalized_shape)
        except TypeError:
            raise TypeError(
                f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
            ) from None
    if not shape:
        raise ValueError("normalized_shape must have at least one dimension")
    if x.ndim < len(shape) or x.shape[x.ndim - len(shape) :] != shape:
        raise ValueError(
            f"Given normalized_shape={list(shape)}, expected input with shape "
            f"[*, {', '.join(map(str, shape))}], but got input of size {list(x.shape)}"
        )
    return shape


def _per_value(v, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray | None:
    """A per-element affine argument of layer/RMS norm: contiguous, of ``shape``."""
    if v is None:
        return None
    v = np.asarray(v)
    if v.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {v.dtype}")
    if v.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (normalized_shape), got {v.shape}")
    return np.require(v, dtype=dtype, requirements=["C", "A"])


def _stat(v, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Saved statistics for a backward: ``shape`` (or any shape of its size
    with the same non-1 dims), as a flat contiguous array."""
    if v is None:
        raise ValueError(f"{name} is required")
    v = np.asarray(v)
    if v.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {v.dtype}")
    if tuple(n for n in v.shape if n != 1) != tuple(n for n in shape if n != 1):
        raise ValueError(f"{name} must have shape {shape}, got {v.shape}")
    return np.require(v.reshape(-1), dtype=dtype, requirements=["C", "A"])


def _sample_axis(x: np.ndarray, axis) -> int:
    ax = _channel_axis(x, axis)
    if ax == 0:
        raise ValueError("the channel axis cannot be axis 0, the batch axis")
    return ax


def _grad_out(grad_out, x: np.ndarray) -> np.ndarray:
    grad_out = _float_array(grad_out, "grad_out")
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have the shape of x {x.shape}, got {grad_out.shape}")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grad_out must have the dtype of x ({x.dtype}), got {grad_out.dtype}")
    return grad_out


def _one_value_x_hat(x64: np.ndarray, mean, invstd: np.ndarray, rms: bool) -> np.ndarray:
    """x_hat of rows of one value, where the kernels do not go: x * invstd
    (RMS norm) or (x - mean) * invstd; nan where invstd is inf (eps = 0 and
    no spread), as the kernels give."""
    with np.errstate(invalid="ignore"):
        return (x64 if rms else x64 - mean) * invstd


def _empty_result(x: np.ndarray, out) -> np.ndarray:
    return out if out is not None else np.empty_like(x)


# ---------------------------------------------------------- layer / RMS norm


def _rows_forward(x, normalized_shape, weight, bias, eps, out, rms: bool):
    done = _kernels.try_rows_forward(x, normalized_shape, weight, bias, eps, rms, out)
    if done is not None:
        return done
    x = _float_array(x, "x")
    shape = _normalized_shape(normalized_shape, x)
    k, d = len(shape), math.prod(shape)
    weight = _per_value(weight, "weight", shape, x.dtype)
    bias = _per_value(bias, "bias", shape, x.dtype)
    eps = _rms_eps(eps, x) if rms else _eps(eps)
    _check_out(out, x)
    lead = x.shape[: x.ndim - k]
    rows = math.prod(lead)
    mean, invstd = np.zeros(rows, x.dtype), np.empty(rows, x.dtype)
    stat_shape = lead + (1,) * k
    if x.size == 0:
        return _empty_result(x, out), mean.reshape(stat_shape), invstd.reshape(stat_shape)
    plan = _row_plan(x, k, rms)
    w = weight.reshape(d) if weight is not None else np.ones(d, x.dtype)
    b = bias.reshape(d) if bias is not None else np.zeros(d, x.dtype)
    y, ys = _output(plan, out, (plan.x,), (weight, bias))
    if d == 1:  # one value per row: the mean is x (layer norm), the mean square x^2 (RMS norm)
        x64 = plan.x.astype(np.float64).reshape(rows)
        with np.errstate(divide="ignore"):  # eps = 0: inf, as the kernels give
            inv = 1.0 / np.sqrt((x64 * x64 if rms else 0.0) + eps)
        mean[...] = 0.0 if rms else x64
        invstd[...] = inv
        y[...] = (_one_value_x_hat(x64, mean, inv, rms) * w[0] + b[0]).reshape(y.shape)
    else:
        _kernels.forward_train(
            plan.shape, plan.x, plan.xs, y, ys, w, b, None, None, 0.0, eps, mean, invstd, plan.keys
        )
    return _finish(y, out), mean.reshape(stat_shape), invstd.reshape(stat_shape)


def _rows_backward(grad_out, x, normalized_shape, mean, invstd, weight, out, rms: bool):
    done = _kernels.try_rows_backward(grad_out, x, normalized_shape, mean, invstd, weight, rms, out)
    if done is not None:
        return done
    x = _float_array(x, "x")
    grad_out = _grad_out(grad_out, x)
    shape = _normalized_shape(normalized_shape, x)
    k, d = len(shape), math.prod(shape)
    lead = x.shape[: x.ndim - k]
    invstd = _stat(invstd, "invstd", lead, x.dtype)
    mean = None if rms else _stat(mean, "mean", lead, x.dtype)
    weight = _per_value(weight, "weight", shape, x.dtype)
    _check_out(out, x)
    grad_weight, grad_bias = np.zeros(d, x.dtype), np.zeros(d, x.dtype)
    if x.size == 0:
        return _empty_result(x, out), grad_weight.reshape(shape), grad_bias.reshape(shape)
    plan = _row_plan(x, k, rms)
    g, gs = _input(plan, grad_out)
    w = weight.reshape(d) if weight is not None else np.ones(d, x.dtype)
    grad_in, gis = _output(plan, out, (plan.x, g), (mean, invstd, weight))
    if d == 1:  # one value per row: the kernels' formula with means over one value
        rows = plan.shape[1]
        g64 = g.astype(np.float64).reshape(rows)
        x_hat = _one_value_x_hat(plan.x.astype(np.float64).reshape(rows), mean, invstd, rms)
        grad_in[...] = (g64 * w[0] * invstd * ((1.0 if rms else 0.0) - x_hat * x_hat)).reshape(x.shape)
        grad_weight[...] = (g64 * x_hat).sum()
        grad_bias[...] = g64.sum()
    else:
        _kernels.backward(
            plan.shape, g, gs, plan.x, plan.xs, grad_in, gis,
            mean, invstd, w, True, grad_weight, grad_bias, plan.keys,
        )  # fmt: skip
    return _finish(grad_in, out), grad_weight.reshape(shape), grad_bias.reshape(shape)


def layer_norm_forward(
    x, normalized_shape: ShapeLike, weight=None, bias=None, eps: float = 1e-5, *, out=None
) -> Tuple[Array, Array, Array]:
    """Layer normalization over the trailing dims, and the statistics its backward needs.

    Per row of the trailing ``normalized_shape`` dims, the mean and biased
    variance (one pass, accumulated in float64), and
    ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64
        Input whose trailing dims are ``normalized_shape``; any strides.
    normalized_shape : int or sequence of int
        The trailing dims to normalize over (ONNX LayerNormalization's
        ``axis=a`` is ``normalized_shape=x.shape[a:]``).
    weight, bias : array_like of shape normalized_shape, optional
        Per-element affine parameters; ``None`` means 1 and 0.
    eps : float >= 0, default 1e-5
        Added to the variance.
    out : numpy.ndarray, optional
        Where to write ``y``: x's shape and dtype; may be ``x``.

    Returns
    -------
    y : numpy.ndarray
        Normalized input, x's shape and dtype.
    mean, invstd : numpy.ndarray
        Per row, of shape ``x.shape[:-k] + (1,) * k`` (broadcastable against
        x, as ONNX's Mean and InvStdDev), x's dtype.

    Raises
    ------
    TypeError
        For a non-float x, weight or bias, or a normalized_shape that is not
        integers.
    ValueError
        For a normalized_shape that does not match x's trailing dims, a bad
        weight/bias shape, eps or ``out``.

    See Also
    --------
    layer_norm_backward : Its gradients.
    layer_norm : ``torch.nn.functional.layer_norm``'s signature.
    """
    return _rows_forward(x, normalized_shape, weight, bias, eps, out, False)


def layer_norm(x, normalized_shape: ShapeLike, weight=None, bias=None, eps: float = 1e-5, *, out=None) -> Array:
    """Layer normalization with the signature of ``torch.nn.functional.layer_norm``.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64
        Input whose trailing dims are ``normalized_shape``.
    normalized_shape : int or sequence of int
        The trailing dims to normalize over.
    weight, bias : array_like of shape normalized_shape, optional
        Per-element affine parameters; ``None`` means 1 and 0.
    eps : float >= 0, default 1e-5
        Added to the variance.
    out : numpy.ndarray, optional
        Where to write the result; may be ``x``.

    Returns
    -------
    numpy.ndarray
        The normalized input, x's shape and dtype.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.array([[1.0, 2.0, 3.0], [10.0, 10.0, 10.0]], np.float32)
    >>> bnfast.layer_norm(x, 3).round(4)
    array([[-1.2247,  0.    ,  1.2247],
           [ 0.    ,  0.    ,  0.    ]], dtype=float32)
    """
    return _rows_forward(x, normalized_shape, weight, bias, eps, out, False)[0]


def layer_norm_backward(
    grad_out, x, normalized_shape: ShapeLike, mean, invstd, weight=None, *, out=None
) -> Tuple[Array, Array, Array]:
    """Compute the gradients of layer normalization with respect to input, weight and bias.

    Per row, with ``xhat = (x - mean) * invstd`` and ``u = weight * grad_out``:
    ``grad_input = invstd * (u - mean(u) - xhat * mean(u * xhat))``;
    ``grad_weight = sum(grad_out * xhat)`` and ``grad_bias = sum(grad_out)``
    over the rows.

    Parameters
    ----------
    grad_out : numpy.ndarray
        Gradient of the loss with respect to the output; x's shape and dtype.
    x : numpy.ndarray of float32 or float64
        The forward input.
    normalized_shape : int or sequence of int
        As in the forward call.
    mean, invstd : array_like
        From `layer_norm_forward`.
    weight : array_like of shape normalized_shape, optional
        ``None`` means 1.
    out : numpy.ndarray, optional
        Where to write grad_input; may be ``grad_out`` or ``x``.

    Returns
    -------
    grad_input : numpy.ndarray
        Gradient with respect to ``x``, x's shape and dtype.
    grad_weight, grad_bias : numpy.ndarray of shape normalized_shape
        Gradients with respect to weight and bias, x's dtype (computed even
        when ``weight`` is None).

    Raises
    ------
    TypeError, ValueError
        As `layer_norm_forward`, and for saved statistics of the wrong shape.
    """
    return _rows_backward(grad_out, x, normalized_shape, mean, invstd, weight, out, False)


def _rms_eps(eps, x: np.ndarray) -> float:
    return float(np.finfo(x.dtype).eps) if eps is None else _eps(eps)


def rms_norm_forward(
    x, normalized_shape: ShapeLike, weight=None, eps: Optional[float] = None, *, out=None
) -> Tuple[Array, Array]:
    """RMS normalization over the trailing dims, and the statistic its backward needs.

    Per row of the trailing ``normalized_shape`` dims,
    ``y = x / sqrt(mean(x**2) + eps) * weight`` (Zhang & Sennrich 2019; the
    mean square is formed from a one-pass Welford state in float64, so it
    does not lose accuracy to a large mean).

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64
        Input whose trailing dims are ``normalized_shape``.
    normalized_shape : int or sequence of int
        The trailing dims to normalize over.
    weight : array_like of shape normalized_shape, optional
        ``None`` means 1.
    eps : float >= 0, optional
        ``None`` (PyTorch's default) means ``numpy.finfo(x.dtype).eps``.
    out : numpy.ndarray, optional
        Where to write ``y``; may be ``x``.

    Returns
    -------
    y : numpy.ndarray
        Normalized input, x's shape and dtype.
    invstd : numpy.ndarray
        ``1 / sqrt(mean(x**2) + eps)`` per row, of shape
        ``x.shape[:-k] + (1,) * k``.

    Raises
    ------
    TypeError, ValueError
        As `layer_norm_forward`.
    """
    y, _, invstd = _rows_forward(x, normalized_shape, weight, None, eps, out, True)
    return y, invstd


def rms_norm(x, normalized_shape: ShapeLike, weight=None, eps: Optional[float] = None, *, out=None) -> Array:
    """RMS normalization with the signature of ``torch.nn.functional.rms_norm``.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64
        Input whose trailing dims are ``normalized_shape``.
    normalized_shape : int or sequence of int
        The trailing dims to normalize over.
    weight : array_like of shape normalized_shape, optional
        ``None`` means 1.
    eps : float >= 0, optional
        ``None`` means ``numpy.finfo(x.dtype).eps``.
    out : numpy.ndarray, optional
        Where to write the result; may be ``x``.

    Returns
    -------
    numpy.ndarray
        The normalized input, x's shape and dtype.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bnfast.rms_norm(np.array([[3.0, 4.0]]), 2, eps=0.0)
    array([[0.84852814, 1.13137085]])
    """
    return rms_norm_forward(x, normalized_shape, weight, eps, out=out)[0]


def rms_norm_backward(
    grad_out, x, normalized_shape: ShapeLike, invstd, weight=None, *, out=None
) -> Tuple[Array, Array]:
    """Compute the gradients of RMS normalization with respect to input and weight.

    Per row, with ``xhat = x * invstd`` and ``u = weight * grad_out``:
    ``grad_input = invstd * (u - xhat * mean(u * xhat))``;
    ``grad_weight = sum(grad_out * xhat)`` over the rows.

    Parameters
    ----------
    grad_out : numpy.ndarray
        Gradient of the loss with respect to the output; x's shape and dtype.
    x : numpy.ndarray of float32 or float64
        The forward input.
    normalized_shape : int or sequence of int
        As in the forward call.
    invstd : array_like
        From `rms_norm_forward`.
    weight : array_like of shape normalized_shape, optional
        ``None`` means 1.
    out : numpy.ndarray, optional
        Where to write grad_input; may be ``grad_out`` or ``x``.

    Returns
    -------
    grad_input : numpy.ndarray
        Gradient with respect to ``x``, x's shape and dtype.
    grad_weight : numpy.ndarray of shape normalized_shape
        Gradient with respect to weight, x's dtype.

    Raises
    ------
    TypeError, ValueError
        As `rms_norm_forward`.
    """
    grad_in, grad_weight, _ = _rows_backward(grad_out, x, normalized_shape, None, invstd, weight, out, True)
    return grad_in, grad_weight


# ------------------------------------------- group / instance / filter response


def _keyed_forward(x, ax, group, weight, bias, running_mean, running_var, momentum, eps, out,
                   uncentered=False):
    """Normalize ``x`` (validated, channel axis ``ax``) per (sample, group of
    ``group`` channels); returns (y, mean, invstd) with per-key statistics."""
    n, channels = x.shape[0], x.shape[ax]
    keys = n * (channels // group)
    mean, invstd = np.zeros(keys, x.dtype), np.empty(keys, x.dtype)
    if x.size == 0:
        return _empty_result(x, out), mean, invstd
    plan = _sample_plan(x, ax, group, uncentered)
    y, ys = _output(plan, out, (plan.x,), (weight, bias, running_mean, running_var))
    rm = _state_buffer(running_mean, x.dtype)
    rv = _state_buffer(running_var, x.dtype)
    _kernels.forward_train(
        plan.shape, plan.x, plan.xs, y, ys, weight, bias, rm, rv, momentum, eps, mean, invstd, plan.keys
    )
    if rm is not None and rm is not running_mean:
        running_mean[...] = rm
    if rv is not None and rv is not running_var:
        running_var[...] = rv
    return _finish(y, out), mean, invstd


def _keyed_backward(grad_out, x, ax, group, mean, invstd, weight, out, uncentered=False):
    channels = x.shape[ax]
    grad_weight, grad_bias = np.zeros(channels, x.dtype), np.zeros(channels, x.dtype)
    if x.size == 0:
        return _empty_result(x, out), grad_weight, grad_bias
    plan = _sample_plan(x, ax, group, uncentered)
    g, gs = _input(plan, grad_out)
    grad_in, gis = _output(plan, out, (plan.x, g), (mean, invstd, weight))
    _kernels.backward(
        plan.shape, g, gs, plan.x, plan.xs, grad_in, gis,
        mean, invstd, weight, True, grad_weight, grad_bias, plan.keys,
    )  # fmt: skip
    return _finish(grad_in, out), grad_weight, grad_bias


def _groups(num_groups, channels: int) -> int:
    num_groups = _int(num_groups, "num_groups")
    if num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"Expected number of channels in input to be divisible by num_groups, but got input "
            f"of {channels} channels and num_groups={num_groups}"
        )
    return channels // num_groups


def group_norm_forward(
    x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, *, axis: int = 1, out=None
) -> Tuple[Array, Array, Array]:
    """Group normalization, and the statistics its backward needs.

    The channels (axis ``axis``) are split into ``num_groups`` groups of
    consecutive channels; per sample (axis 0) and group, the mean and biased
    variance over the group's channels and every other axis (one pass,
    float64, merged in a fixed order), and
    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with weight and bias
    per channel (Wu & He 2018; ONNX GroupNormalization, opset 21).

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64, ndim >= 2
        Input (N, C, ...) or, with ``axis=-1``, (N, ..., C); any strides.
    num_groups : int
        Divides the number of channels.
    weight, bias : array_like of shape (C,), optional
        ``None`` means 1 and 0.
    eps : float >= 0, default 1e-5
        Added to the variance.
    axis : int, default 1
        The channel axis; not 0 (the batch axis).
    out : numpy.ndarray, optional
        Where to write ``y``; may be ``x``.

    Returns
    -------
    y : numpy.ndarray
        Normalized input, x's shape and dtype.
    mean, invstd : numpy.ndarray of shape (N, num_groups)
        Mean and ``1 / sqrt(var + eps)`` per sample and group, x's dtype.

    Raises
    ------
    TypeError
        For a non-float x, weight or bias, or a non-integer num_groups.
    ValueError
        For num_groups not dividing C, a bad axis, weight/bias shape, eps or
        ``out``.

    See Also
    --------
    group_norm_backward : Its gradients.
    """
    done = _kernels.try_keyed_forward(x, num_groups, weight, bias, None, None, 0.0, eps, axis, False, out)
    if done is not None:
        return done
    x = _float_array(x, "x")
    ax = _sample_axis(x, axis)
    channels = x.shape[ax]
    group = _groups(num_groups, channels)
    weight = _vector(weight, "weight", channels, x.dtype)
    bias = _vector(bias, "bias", channels, x.dtype)
    eps = _eps(eps)
    _check_out(out, x)
    y, mean, invstd = _keyed_forward(x, ax, group, weight, bias, None, None, 0.0, eps, out)
    return y, mean.reshape(x.shape[0], channels // group), invstd.reshape(x.shape[0], channels // group)


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, *, axis: int = 1,
               out=None) -> Array:
    """Group normalization with the signature of ``torch.nn.functional.group_norm``.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64, ndim >= 2
        Input (N, C, ...) or, with ``axis=-1``, (N, ..., C).
    num_groups : int
        Divides the number of channels.
    weight, bias : array_like of shape (C,), optional
        ``None`` means 1 and 0.
    eps : float >= 0, default 1e-5
        Added to the variance.
    axis : int, default 1
        The channel axis (keyword only; PyTorch has none).
    out : numpy.ndarray, optional
        Where to write the result; may be ``x``.

    Returns
    -------
    numpy.ndarray
        The normalized input, x's shape and dtype.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.arange(8.0).reshape(1, 4, 2)
    >>> bnfast.group_norm(x, 2, eps=0.0).round(4)
    array([[[-1.3416, -0.4472],
            [ 0.4472,  1.3416],
            [-1.3416, -0.4472],
            [ 0.4472,  1.3416]]])
    """
    return group_norm_forward(x, num_groups, weight, bias, eps, axis=axis, out=out)[0]


def group_norm_backward(
    grad_out, x, num_groups: int, mean, invstd, weight=None, *, axis: int = 1, out=None
) -> Tuple[Array, Array, Array]:
    """Compute the gradients of group normalization with respect to input, weight and bias.

    Per sample and group, with ``xhat = (x - mean) * invstd`` and
    ``u = weight * grad_out``:
    ``grad_input = invstd * (u - mean(u) - xhat * mean(u * xhat))``;
    ``grad_weight = sum(grad_out * xhat)`` and ``grad_bias = sum(grad_out)``
    per channel.

    Parameters
    ----------
    grad_out : numpy.ndarray
        Gradient of the loss with respect to the output; x's shape and dtype.
    x : numpy.ndarray of float32 or float64
        The forward input.
    num_groups : int
        As in the forward call.
    mean, invstd : array_like of shape (N, num_groups)
        From `group_norm_forward`.
    weight : array_like of shape (C,), optional
        ``None`` means 1.
    axis : int, default 1
        The channel axis.
    out : numpy.ndarray, optional
        Where to write grad_input; may be ``grad_out`` or ``x``.

    Returns
    -------
    grad_input : numpy.ndarray
        Gradient with respect to ``x``, x's shape and dtype.
    grad_weight, grad_bias : numpy.ndarray of shape (C,)
        Gradients with respect to weight and bias, x's dtype.

    Raises
    ------
    TypeError, ValueError
        As `group_norm_forward`, and for saved statistics of the wrong shape.
    """
    done = _kernels.try_keyed_backward(grad_out, x, num_groups, mean, invstd, weight, axis, False, out)
    if done is not None:
        return done
    x = _float_array(x, "x")
    grad_out = _grad_out(grad_out, x)
    ax = _sample_axis(x, axis)
    channels = x.shape[ax]
    group = _groups(num_groups, channels)
    stat_shape = (x.shape[0], channels // group)
    mean = _stat(mean, "mean", stat_shape, x.dtype)
    invstd = _stat(invstd, "invstd", stat_shape, x.dtype)
    weight = _vector(weight, "weight", channels, x.dtype)
    _check_out(out, x)
    return _keyed_backward(grad_out, x, ax, group, mean, invstd, weight, out)


def _spatial(x: np.ndarray, ax: int) -> int:
    return math.prod(x.shape[1:ax] + x.shape[ax + 1 :])


def instance_norm_forward(
    x, weight=None, bias=None, running_mean=None, running_var=None, *, momentum: float = 0.1,
    eps: float = 1e-5, axis: int = 1, out=None,
) -> Tuple[Array, Array, Array]:
    """Instance normalization with the statistics of each sample and channel.

    Per sample (axis 0) and channel (axis ``axis``), the mean and biased
    variance over the other axes (one pass, float64), and
    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` (Ulyanov et al.
    2016; ONNX InstanceNormalization).

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64, ndim >= 3
        Input (N, C, ...) or, with ``axis=-1``, (N, ..., C).
    weight, bias : array_like of shape (C,), optional
        ``None`` means 1 and 0.
    running_mean, running_var : numpy.ndarray of shape (C,) and x's dtype, optional
        Updated in place as PyTorch does, with the mean over the samples of
        their mean and unbiased variance.  Pass both or neither.
    momentum : float in [0, 1], default 0.1
        Weight of the new statistics in the running update.
    eps : float >= 0, default 1e-5
        Added to the variance.
    axis : int, default 1
        The channel axis; not 0 (the batch axis).
    out : numpy.ndarray, optional
        Where to write ``y``; may be ``x``.

    Returns
    -------
    y : numpy.ndarray
        Normalized input, x's shape and dtype.
    mean, invstd : numpy.ndarray of shape (N, C)
        Mean and ``1 / sqrt(var + eps)`` per sample and channel, x's dtype.

    Raises
    ------
    TypeError
        For non-float arrays or running statistics of another dtype.
    ValueError
        For one value per sample and channel, a bad axis, shape, eps,
        momentum or ``out``, read-only or overlapping running statistics.
        Nothing is modified when an exception is raised.

    See Also
    --------
    instance_norm_backward : Its gradients.
    """
    done = _kernels.try_keyed_forward(
        x, None, weight, bias, running_mean, running_var, momentum, eps, axis, True, out
    )
    if done is not None:
        return done
    source = x
    x = _float_array(x, "x")
    ax = _sample_axis(x, axis)
    channels = x.shape[ax]
    weight = _vector(weight, "weight", channels, x.dtype)
    bias = _vector(bias, "bias", channels, x.dtype)
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if running_mean is not None:
        running_mean = _state_vector(running_mean, "running_mean", channels, x.dtype)
        running_var = _state_vector(running_var, "running_var", channels, x.dtype)
        _check_state_aliasing(
            {"running_mean": running_mean, "running_var": running_var},
            {"x": source, "weight": weight, "bias": bias, "out": out},
        )
    momentum, eps = _momentum(momentum), _eps(eps)
    _check_out(out, x)
    if x.size and _spatial(x, ax) <= 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {list(x.shape)}"
        )
    y, mean, invstd = _keyed_forward(x, ax, 1, weight, bias, running_mean, running_var, momentum, eps, out)
    return y, mean.reshape(x.shape[0], channels), invstd.reshape(x.shape[0], channels)


def instance_norm(
    x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats: bool = True,
    momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1, out=None,
) -> Array:
    """Instance normalization with the signature of ``torch.nn.functional.instance_norm``.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64, ndim >= 3
        Input (N, C, ...) or, with ``axis=-1``, (N, ..., C).
    running_mean, running_var : numpy.ndarray of shape (C,), optional
        Updated in place when ``use_input_stats``; normalize otherwise.
    weight, bias : array_like of shape (C,), optional
        ``None`` means 1 and 0.
    use_input_stats : bool, default True
        Normalize with each instance's statistics (else with the running
        statistics, as batch norm's inference).
    momentum : float in [0, 1], default 0.1
        Weight of the new statistics in the running update.
    eps : float >= 0, default 1e-5
        Added to the variance.
    axis : int, default 1
        The channel axis (keyword only).
    out : numpy.ndarray, optional
        Where to write the result; may be ``x``.

    Returns
    -------
    numpy.ndarray
        The normalized input, x's shape and dtype.

    Raises
    ------
    TypeError, ValueError
        As `instance_norm_forward`; ValueError also when ``use_input_stats``
        is False without running statistics.
    """
    if not isinstance(use_input_stats, (bool, np.bool_)):
        raise TypeError(f"use_input_stats must be True or False, got {use_input_stats!r}")
    if use_input_stats:
        return instance_norm_forward(
            x, weight, bias, running_mean, running_var, momentum=momentum, eps=eps, axis=axis, out=out
        )[0]
    if running_mean is None or running_var is None:
        raise ValueError("Expected running_mean and running_var to be defined when use_input_stats is False")
    x = _float_array(x, "x")
    return batch_norm_inference(x, running_mean, running_var, weight, bias, eps=eps,
                                axis=_sample_axis(x, axis), out=out)


def instance_norm_backward(grad_out, x, mean, invstd, weight=None, *, axis: int = 1,
                           out=None) -> Tuple[Array, Array, Array]:
    """Compute the gradients of instance normalization (with each instance's statistics).

    Parameters
    ----------
    grad_out : numpy.ndarray
        Gradient of the loss with respect to the output; x's shape and dtype.
    x : numpy.ndarray of float32 or float64
        The forward input.
    mean, invstd : array_like of shape (N, C)
        From `instance_norm_forward`.
    weight : array_like of shape (C,), optional
        ``None`` means 1.
    axis : int, default 1
        The channel axis.
    out : numpy.ndarray, optional
        Where to write grad_input; may be ``grad_out`` or ``x``.

    Returns
    -------
    grad_input : numpy.ndarray
        Gradient with respect to ``x``, x's shape and dtype.
    grad_weight, grad_bias : numpy.ndarray of shape (C,)
        Gradients with respect to weight and bias, x's dtype.

    Raises
    ------
    TypeError, ValueError
        For bad dtypes, shapes, axis or ``out``.

    See Also
    --------
    batch_norm_backward : With ``training=False``, the gradient of
        `instance_norm` with ``use_input_stats=False``.
    """
    done = _kernels.try_keyed_backward(grad_out, x, None, mean, invstd, weight, axis, True, out)
    if done is not None:
        return done
    x = _float_array(x, "x")
    grad_out = _grad_out(grad_out, x)
    ax = _sample_axis(x, axis)
    channels = x.shape[ax]
    mean = _stat(mean, "mean", (x.shape[0], channels), x.dtype)
    invstd = _stat(invstd, "invstd", (x.shape[0], channels), x.dtype)
    weight = _vector(weight, "weight", channels, x.dtype)
    _check_out(out, x)
    return _keyed_backward(grad_out, x, ax, 1, mean, invstd, weight, out)


def _per_channel_view(v: np.ndarray, x: np.ndarray, ax: int) -> np.ndarray:
    shape = [1] * x.ndim
    shape[ax] = x.shape[ax]
    return v.reshape(shape)


def filter_response_norm_forward(
    x, weight=None, bias=None, tau=None, eps: float = 1e-6, *, axis: int = 1, out=None
) -> Tuple[Array, Array]:
    """Filter response normalization with its thresholded linear unit.

    Per sample (axis 0) and channel (axis ``axis``), ``nu2 = mean(x**2)``
    over the other axes (from a one-pass float64 Welford state), and
    ``y = max(weight * x / sqrt(nu2 + |eps|) + bias, tau)`` (Singh & Krishnan
    2020).

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64, ndim >= 3
        Input (N, C, ...) or, with ``axis=-1``, (N, ..., C).
    weight, bias, tau : array_like of shape (C,), optional
        ``None`` means 1, 0 and no threshold.
    eps : float, default 1e-6
        Its absolute value is added to ``nu2`` (the paper's learnable eps).
    axis : int, default 1
        The channel axis; not 0 (the batch axis).
    out : numpy.ndarray, optional
        Where to write ``y``; may be ``x``.

    Returns
    -------
    y : numpy.ndarray
        Normalized and thresholded input, x's shape and dtype.
    invstd : numpy.ndarray of shape (N, C)
        ``1 / sqrt(nu2 + |eps|)``, x's dtype.

    Raises
    ------
    TypeError, ValueError
        For bad dtypes, shapes, axis, eps or ``out``.

    See Also
    --------
    filter_response_norm_backward : Its gradients.
    """
    x = _float_array(x, "x")
    ax = _sample_axis(x, axis)
    channels = x.shape[ax]
    weight = _vector(weight, "weight", channels, x.dtype)
    bias = _vector(bias, "bias", channels, x.dtype)
    tau = _vector(tau, "tau", channels, x.dtype)
    eps = _eps(abs(_real(eps, "eps")))
    _check_out(out, x)
    y, _, invstd = _keyed_forward(x, ax, 1, weight, bias, None, None, 0.0, eps, out, uncentered=True)
    if tau is not None:
        np.maximum(y, _per_channel_view(tau, x, ax), out=y)
    return y, invstd.reshape(x.shape[0], channels)


def filter_response_norm(x, weight=None, bias=None, tau=None, eps: float = 1e-6, *, axis: int = 1,
                         out=None) -> Array:
    """Filter response normalization with its TLU; see `filter_response_norm_forward`.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64, ndim >= 3
        Input (N, C, ...) or, with ``axis=-1``, (N, ..., C).
    weight, bias, tau : array_like of shape (C,), optional
        ``None`` means 1, 0 and no threshold.
    eps : float, default 1e-6
        Its absolute value is added to the mean square.
    axis : int, default 1
        The channel axis.
    out : numpy.ndarray, optional
        Where to write the result; may be ``x``.

    Returns
    -------
    numpy.ndarray
        The normalized and thresholded input, x's shape and dtype.
    """
    return filter_response_norm_forward(x, weight, bias, tau, eps, axis=axis, out=out)[0]


def filter_response_norm_backward(
    grad_out, x, y, invstd, weight=None, tau=None, *, axis: int = 1, out=None
) -> Tuple[Array, Array, Array, Array]:
    """Compute the gradients of filter response normalization with respect to x, weight, bias and tau.

    The TLU passes ``grad_out`` where ``y > tau`` and gives the rest to
    ``tau``; then, per sample and channel, with ``xhat = x * invstd`` and
    ``u = weight * g``: ``grad_input = invstd * (u - xhat * mean(u * xhat))``.

    Parameters
    ----------
    grad_out : numpy.ndarray
        Gradient of the loss with respect to the output; x's shape and dtype.
    x : numpy.ndarray of float32 or float64
        The forward input.
    y : numpy.ndarray
        The forward output (it tells exactly where the threshold was active).
    invstd : array_like of shape (N, C)
        From `filter_response_norm_forward`.
    weight, tau : array_like of shape (C,), optional
        As in the forward call.
    axis : int, default 1
        The channel axis.
    out : numpy.ndarray, optional
        Where to write grad_input; may be ``grad_out`` or ``x``.

    Returns
    -------
    grad_input : numpy.ndarray
        Gradient with respect to ``x``, x's shape and dtype.
    grad_weight, grad_bias, grad_tau : numpy.ndarray of shape (C,)
        Gradients with respect to weight, bias and tau, x's dtype (grad_tau
        is zeros without a threshold).

    Raises
    ------
    TypeError, ValueError
        For bad dtypes, shapes, axis or ``out``.
    """
    x = _float_array(x, "x")
    grad_out = _grad_out(grad_out, x)
    y = np.asarray(y)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {x.shape}, got {y.shape}")
    ax = _sample_axis(x, axis)
    channels = x.shape[ax]
    invstd = _stat(invstd, "invstd", (x.shape[0], channels), x.dtype)
    weight = _vector(weight, "weight", channels, x.dtype)
    tau = _vector(tau, "tau", channels, x.dtype)
    _check_out(out, x)
    grad_tau = np.zeros(channels, x.dtype)
    g = grad_out
    if tau is not None and x.size:
        below = ~(y > _per_channel_view(tau, x, ax))
        # summed channel by channel in one fixed order, whatever the memory layouts
        passed_to_tau = np.ascontiguousarray(np.moveaxis(np.where(below, grad_out, 0), ax, 0))
        grad_tau[...] = passed_to_tau.reshape(x.shape[ax], -1).sum(axis=1, dtype=np.float64)
        g = np.where(below, 0, grad_out).astype(x.dtype, copy=False)
    grad_in, grad_weight, grad_bias = _keyed_backward(g, x, ax, 1, None, invstd, weight, out, uncentered=True)
    return grad_in, grad_weight, grad_bias, grad_tau
