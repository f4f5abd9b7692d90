"""Batch normalization fused with an activation and a residual add.

``y = act(BN(x) + residual)`` in one pass over ``x`` (and the residual): the
forward and inference ops are the batch-norm kernels with a fused apply phase
(``include/bnfast/kernel_body.h``, the ``bn_act`` argument), validated by the
same code as `batch_norm_forward` / `batch_norm_inference`.

The backward works from the output ``y`` alone for invertible activations
(in-place activated batch norm, Rota Bulò et al., "In-Place Activated
BatchNorm for Memory-Optimized Training of DNNs", CVPR 2018): with
``v = act^-1(y) - residual = BN(x)``, ``xhat = (v - bias) / weight``, and the
batch-norm gradient of ``dv = grad_out * act'(v)`` follows with the existing
backward kernel (its ``x`` is ``v``, its mean ``bias`` and its ``invstd``
``1 / weight``).  The activation's derivative and inverse are one NumPy pass
(see ``batch_norm_act_backward``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from . import _functional as F

__all__ = ["batch_norm_act_backward", "batch_norm_act_forward", "batch_norm_act_inference"]

# The activation codes of the kernels (bn_activation, include/bnfast/ops.h).
ACTIVATIONS = {"identity": 1, "relu": 2, "leaky_relu": 3, "elu": 4}


def _activation(activation, negative_slope) -> tuple[str, float]:
    """The activation's name and slope, checked (the one place)."""
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a string, got {activation!r} of type {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
    slope = F._real(negative_slope, "negative_slope")
    if not np.isfinite(slope):
        raise ValueError(f"negative_slope must be finite, got {negative_slope!r}")
    return activation, slope


def _invertible(activation: str, slope: float) -> bool:
    """Whether ``x`` can be recovered from ``y`` (in-place mode)."""
    return activation in ("identity", "elu") or (activation == "leaky_relu" and slope > 0.0)


def batch_norm_act_forward(
    x: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    *,
    activation: str = "relu",
    negative_slope: float = 0.01,
    residual: ArrayLike | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch normalization in training mode, then a residual add and an activation, in one pass.

    ``y = act(BN(x) + residual)`` with ``BN`` as in `batch_norm_forward` (batch
    statistics, running-statistics update): the statistics pass reads ``x``,
    the apply pass reads ``x`` and the residual once and writes ``y``, with
    the activation computed in registers (no intermediate array).

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64, ndim >= 2
        Input, any strides and memory order.
    weight, bias : array_like of shape (C,), optional
        Affine parameters; ``None`` means 1 and 0.
    running_mean, running_var : numpy.ndarray of shape (C,) and x's dtype, optional
        Updated in place as in `batch_norm_forward`.  Pass both or neither.
    activation : {"relu", "leaky_relu", "elu", "identity"}, default "relu"
        ``relu(v) = max(v, 0)``; ``leaky_relu(v) = v if v >= 0 else
        negative_slope * v``; ``elu(v) = v if v > 0 else expm1(v)`` (alpha 1,
        PyTorch's default); ``identity(v) = v``.
    negative_slope : float, default 0.01
        The slope of ``leaky_relu`` for negative inputs (any finite value
        here; the in-place backward needs it > 0).  Unused by the others.
    residual : array_like, optional
        Added after the normalization, before the activation (the skip
        connection of a ResNet block): x's shape and dtype, any strides.
    momentum : float in [0, 1], default 0.1
        Weight of the batch statistics in the running-statistics update.
    eps : float >= 0, default 1e-5
        Added to the variance before the square root.
    axis : int, default 1
        The channel axis: 1 for channels-first, -1 for channels-last.
    out : numpy.ndarray, optional
        Where to write ``y``: x's shape and dtype, writable; may be ``x``
        itself (in place: with an invertible activation the backward needs
        only ``y``, see `batch_norm_act_backward`) or the residual.

    Returns
    -------
    y : numpy.ndarray
        ``act(BN(x) + residual)``, x's shape and dtype.
    save_mean : numpy.ndarray of shape (C,)
        Batch mean, x's dtype.
    save_invstd : numpy.ndarray of shape (C,)
        ``1 / sqrt(var + eps)``, x's dtype.

    Raises
    ------
    TypeError
        As `batch_norm_forward`; ``activation`` not a string; a residual of
        another dtype.
    ValueError
        As `batch_norm_forward`; an unknown activation, a non-finite
        ``negative_slope``, a residual of another shape.  Nothing is
        modified when an exception is raised.

    See Also
    --------
    batch_norm_act_backward : Its gradients.
    batch_norm_act_inference : Evaluation mode.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    >>> y, mean, invstd = bnfast.batch_norm_act_forward(x, activation="leaky_relu", out=x)
    >>> y is x
    True
    """
    name, slope = _activation(activation, negative_slope)
    fused = (ACTIVATIONS[name], slope, residual)
    return F._forward_train(x, weight, bias, running_mean, running_var, momentum, eps, axis, out, fused)


def batch_norm_act_inference(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    activation: str = "relu",
    negative_slope: float = 0.01,
    residual: ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Batch normalization with given statistics, then a residual add and an activation, in one pass.

    ``y = act((x - running_mean) / sqrt(running_var + eps) * weight + bias + residual)``.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64, ndim >= 2
        Input, any strides and memory order.
    running_mean, running_var : array_like of shape (C,)
        The statistics to normalize with (not modified).
    weight, bias : array_like of shape (C,), optional
        Affine parameters; ``None`` means 1 and 0.
    activation : {"relu", "leaky_relu", "elu", "identity"}, default "relu"
        As in `batch_norm_act_forward`.
    negative_slope : float, default 0.01
        The slope of ``leaky_relu`` for negative inputs.
    residual : array_like, optional
        Added before the activation: x's shape and dtype.
    eps : float >= 0, default 1e-5
        Added to the variance before the square root.
    axis : int, default 1
        The channel axis (negative allowed).
    out : numpy.ndarray, optional
        Where to write the result; may be ``x`` or the residual.

    Returns
    -------
    numpy.ndarray
        The activated output, x's shape and dtype.

    Raises
    ------
    TypeError, ValueError
        As `batch_norm_act_forward`.
    """
    name, slope = _activation(activation, negative_slope)
    fused = (ACTIVATIONS[name], slope, residual)
    return F._inference(x, running_mean, running_var, weight, bias, eps, axis, out, fused)


def _other_axes(ndim: int, ax: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != ax)


def _per_channel(v: np.ndarray, ndim: int, ax: int) -> np.ndarray:
    shape = [1] * ndim
    shape[ax] = v.shape[0]
    return v.reshape(shape)


def _check_recoverable(
    name: str, y: np.ndarray, z: np.ndarray | None, weight: np.ndarray, bias: np.ndarray, ax: int
) -> None:
    """Refuse a recovery of xhat from y that rounding would make wrong.

    ``xhat = (v - bias) / weight`` carries the rounding error of ``v`` (about
    ``u * (|bias| + |residual|)``, u the unit roundoff of the dtype) divided
    by ``|weight|``: grad_input stays accurate (it is multiplied by the
    weight again), but ``grad_weight = sum(dv * xhat)`` does not.  A channel
    is refused when ``|weight| < sqrt(u) * (|bias| + max |residual|)`` or the
    weight is 0 or not finite, which bounds the error of xhat from rounding
    by ``sqrt(u)``; elu refuses outputs within ``sqrt(u)`` of its saturation
    at -1 (where ``log1p`` amplifies the rounding of y beyond that bound).
    """
    u, tiny = _unit_roundoff(y.dtype)
    root = float(np.sqrt(u))
    scale = np.abs(bias.astype(np.float64))
    if z is not None and z.size:
        scale = scale + np.abs(z).max(axis=_other_axes(z.ndim, ax)).astype(np.float64)
    w = np.abs(weight.astype(np.float64))
    bad = ~np.isfinite(w) | (w == 0.0) | (w < root * scale) | (w < tiny)
    if bad.any():
        channels = np.flatnonzero(bad)
        raise ValueError(
            f"cannot recover the normalized input from y for channel(s) {channels[:8].tolist()}: "
            f"|weight| is zero or below sqrt(eps of {y.dtype}) * (|bias| + max|residual|), so "
            "xhat = (act^-1(y) - residual - bias) / weight would be dominated by rounding; pass x= "
            "(keep the input, no in-place forward)"
        )
    if name == "elu" and y.size and float(y.min()) < -1.0 + root:
        raise ValueError(
            "cannot recover the normalized input from y: elu saturated (y within sqrt(eps) of -1, where "
            "the input is lost to rounding); pass x= (keep the input, no in-place forward)"
        )


def _unit_roundoff(dtype: np.dtype) -> tuple[float, float]:
    """(unit roundoff, smallest normal) of a float dtype, half types included."""
    if F._is_half(dtype):
        return (2.0**-11, 2.0**-14) if dtype.char == "e" else (2.0**-8, 2.0**-126)
    info = np.finfo(dtype)
    return float(info.eps) / 2, float(info.tiny)


def _in_float32(fn):
    """Run an elementwise helper in float32 for half-precision operands and
    round its result once to the half type (NumPy's float16 arithmetic would
    round every step; bfloat16 has none)."""
    def wrapper(name, slope, *arrays, **kw):
        first = arrays[0]
        if not F._is_half(first.dtype):
            return fn(name, slope, *arrays, **kw)
        wide = [None if a is None else a.astype(np.float32) for a in arrays]
        return fn(name, slope, *wide, **kw).astype(first.dtype)
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_in_float32
def _grad_pre_activation(name: str, slope: float, grad_out: np.ndarray, y: np.ndarray,
                         copy: bool = True) -> np.ndarray:
    """``grad_out * act'(v)`` from the output ``y`` (the same sign as v), in
    one pass and one new array (``grad_out`` itself for identity without ``copy``)."""
    t = grad_out.dtype.type
    if name == "identity":
        return grad_out.copy() if copy else grad_out
    if name == "relu":
        return np.where(y > 0, grad_out, t(0))  # 0 where y <= 0, even for a non-finite grad_out
    dv = grad_out.copy()
    neg = y <= 0
    if name == "leaky_relu":  # PyTorch's: the slope where v <= 0
        np.multiply(dv, t(slope), out=dv, where=neg)
    else:  # elu: act' = y + 1 where v <= 0
        np.multiply(dv, y + t(1), out=dv, where=neg)
    return dv


@_in_float32
def _pre_activation(name: str, slope: float, y: np.ndarray, z: np.ndarray | None) -> np.ndarray:
    """``v = act^-1(y) - residual = BN(x)`` (invertible activations only), one new array."""
    if name == "identity":
        return y if z is None else np.subtract(y, z)
    v = y.copy()
    neg = v < 0
    if name == "leaky_relu":
        np.divide(v, v.dtype.type(slope), out=v, where=neg)
    else:  # elu: y > -1 checked
        np.log1p(v, out=v, where=neg)
    if z is not None:
        np.subtract(v, z, out=v)
    return v


def batch_norm_act_backward(
    grad_out: ArrayLike,
    y: ArrayLike,
    save_mean: ArrayLike,
    save_invstd: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    activation: str = "relu",
    negative_slope: float = 0.01,
    residual: ArrayLike | None = None,
    x: ArrayLike | None = None,
    axis: int = 1,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Compute the gradients of `batch_norm_act_forward` from its output ``y`` (in-place ABN) or its input.

    With ``dv = grad_out * act'(v)`` (v = BN(x) + residual, its sign read from
    ``y``): ``grad_residual = dv`` and the batch-norm gradient of ``dv`` as in
    `batch_norm_backward` (training statistics).  The normalized input
    ``xhat`` comes from ``x`` when given, else from ``y``:
    ``xhat = (act^-1(y) - residual - bias) / weight`` (identity, elu, and
    leaky_relu with ``negative_slope > 0``; relu is not invertible).

    Parameters
    ----------
    grad_out : numpy.ndarray
        Gradient of the loss with respect to ``y``; y's shape and dtype.
    y : numpy.ndarray of float32 or float64
        The forward's output (possibly written over its input, ``out=x``).
    save_mean, save_invstd : array_like of shape (C,)
        From `batch_norm_act_forward`.
    weight, bias : array_like of shape (C,), optional
        As passed to the forward; ``None`` means 1 and 0.
    activation : {"relu", "leaky_relu", "elu", "identity"}, default "relu"
        As passed to the forward.
    negative_slope : float, default 0.01
        As passed to the forward.
    residual : array_like, optional
        The forward's residual: needed to recover ``xhat`` from ``y``; given,
        ``grad_residual`` is returned.
    x : array_like, optional
        The forward's input (not overwritten).  Required for relu (and for
        leaky_relu with ``negative_slope <= 0``); with it no recovery is made.
    axis : int, default 1
        The channel axis (negative allowed).
    out : numpy.ndarray, optional
        Where to write grad_input: y's shape and dtype; may be ``grad_out``.

    Returns
    -------
    grad_input : numpy.ndarray
        Gradient with respect to ``x``.
    grad_weight, grad_bias : numpy.ndarray of shape (C,)
        Gradients with respect to weight and bias.
    grad_residual : numpy.ndarray or None
        Gradient with respect to the residual (``grad_out * act'(v)``), or
        None when no residual is given.

    Raises
    ------
    TypeError
        Bad dtypes (arrays of another dtype than ``y``), a non-string activation.
    ValueError
        Bad shapes, axis or ``out``; an unknown activation; ``x`` missing for
        relu (or a non-positive slope); a recovery that rounding would make
        wrong (see Notes).

    Notes
    -----
    Zero or tiny weights: the recovery divides by the weight, which scales
    the rounding error of ``v`` (about ``u * (|bias| + |residual|)``, u the
    unit roundoff) by ``1 / |weight|``.  grad_input is multiplied by the
    weight again and stays accurate, grad_weight does not, so a channel with
    ``|weight| < sqrt(u) * (|bias| + max |residual|)`` (or a zero weight,
    where ``xhat`` is lost) raises ValueError, as does an elu output within
    ``sqrt(u)`` of its saturation value -1; pass ``x=`` there.  InPlace-ABN
    instead always normalizes with ``|weight| + eps`` (a different function
    of the weight); bnfast keeps PyTorch's ``weight`` so that the fused
    layers compute what the unfused ones do, and refuses where that cannot
    be inverted.

    Without a residual (and without ``x``), the backward kernel itself reads
    ``y`` and ``grad_out`` and applies ``act'`` and ``act^-1`` per element in
    its statistics and apply passes (no intermediate array).  With a
    residual, the activation's derivative and inverse are NumPy passes (one
    new array each) before the kernel: its apply phase has two inputs and one
    output, and this backward reads three (grad_out, y, residual) and writes
    two (grad_input, grad_residual).
    """
    name, slope = _activation(activation, negative_slope)
    y = F._float_array(y, "y", half=True)
    grad_out = F._float_array(grad_out, "grad_out", half=True)
    ax = F._channel_axis(y, axis)
    if grad_out.shape != y.shape:
        raise ValueError(f"grad_out must have the shape of y {y.shape}, got {grad_out.shape}")
    if grad_out.dtype != y.dtype:
        raise TypeError(f"grad_out must have the dtype of y ({y.dtype}), got {grad_out.dtype}")
    channels = y.shape[ax]
    cdt = F._channel_dtype(y.dtype)  # float32 per-channel arrays for half-precision y
    save_mean = F._vector(save_mean, "save_mean", channels, cdt)
    save_invstd = F._vector(save_invstd, "save_invstd", channels, cdt)
    if save_mean is None or save_invstd is None:
        raise ValueError("save_mean and save_invstd are required")
    weight = F._vector(weight, "weight", channels, cdt)
    bias = F._vector(bias, "bias", channels, cdt)
    z = F._residual(residual, y, of="y")
    if x is not None:
        x = F._residual(x, y, "x", of="y")
    F._check_out(out, y)
    if x is None and not _invertible(name, slope):
        why = "relu is not invertible" if name == "relu" else f"leaky_relu with negative_slope={slope} is not invertible"
        raise ValueError(
            f"{why} (the input is lost where y is 0 or folded): pass x=, the forward's input"
        )
    w = weight if weight is not None else np.ones(channels, cdt)
    b = bias if bias is not None else np.zeros(channels, cdt)
    if x is None:
        _check_recoverable(name, y, z, w, b, ax)
    if x is not None:
        dv = _grad_pre_activation(name, slope, grad_out, y, copy=z is not None)
        gx, gw, gb = F.batch_norm_backward(dv, x, save_mean, save_invstd, weight, axis=axis, out=out)
        return gx, gw, gb, (dv if z is not None else None)
    # the backward kernel with x = v = act^-1(y) - z, mean = bias, invstd =
    # 1 / weight: xhat = (v - bias) / weight; its weight w' = weight^2 *
    # invstd makes w' * (1 / weight) = weight * invstd, the gradient's factor
    w64 = w.astype(np.float64)
    inv = (1.0 / w64).astype(cdt)
    scale = (w64 * w64 * save_invstd.astype(np.float64)).astype(cdt)
    if not np.isfinite(scale).all():
        raise ValueError("weight * weight * save_invstd overflows the dtype: pass x=")
    if z is None and name != "identity":
        # no residual: the kernel reads y and grad_out and applies act' and
        # act^-1 per element in its statistics and apply passes (no copies)
        gx, gw, gb = F._backward(grad_out, y, b, inv, scale, True, axis, out, (ACTIVATIONS[name], slope))
        return gx, gw, gb, None
    dv = _grad_pre_activation(name, slope, grad_out, y, copy=z is not None)
    v = _pre_activation(name, slope, y, z)
    gx, gw, gb = F.batch_norm_backward(dv, v, b, inv, scale, axis=axis, out=out)
    return gx, gw, gb, (dv if z is not None else None)
