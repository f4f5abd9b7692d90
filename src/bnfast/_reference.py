"""Plain float64 NumPy batch normalization: the oracle for tests and benchmarks.

Every function here is written for clarity, not speed.  Inputs are upcast to
float64, the channel axis is moved last and the array is flattened to
``(n, C)`` (``n`` values per channel), statistics are computed with the
two-pass formula (mean first, then the mean of squared deviations), and
results are returned in float64.  No input is ever modified; running
statistics are returned as new arrays instead of being updated in place.

This module deliberately imports nothing from the compiled extension, so it
can judge it.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_norm_backward",
    "moments",
]


def _channel_axis(ndim, axis):
    """Return the non-negative channel axis, raising ValueError when invalid."""
    if ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions, got {ndim}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of {ndim} dimensions")
    return axis % ndim


def _as_rows(a, axis):
    """View ``a`` (float64) as ``(n, C)`` with the channel axis last.

    Returns
    -------
    rows : ndarray, shape (n, C), float64
        A fresh float64 array (never a view of the caller's data).
    shape_moved : tuple
        Shape of ``a`` with the channel axis moved last, to undo the reshape.
    axis : int
        The non-negative channel axis.
    """
    a = np.asarray(a)
    axis = _channel_axis(a.ndim, axis)
    moved = np.moveaxis(a.astype(np.float64, copy=True), axis, -1)
    channels = a.shape[axis]
    n = int(np.prod(moved.shape[:-1], dtype=np.int64))
    return moved.reshape(n, channels), moved.shape, axis


def _from_rows(rows, shape_moved, axis):
    """Inverse of :func:`_as_rows`: back to the caller's axis order."""
    return np.ascontiguousarray(np.moveaxis(rows.reshape(shape_moved), -1, axis))


def _vector(v, channels, default, name):
    """A float64 copy of a per-channel vector, or ``default`` filled when None."""
    if v is None:
        return np.full(channels, default, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if v.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {v.shape}")
    return v.copy()


def moments(x, axis=1):
    """Per-channel count, mean and sum of squared deviations, two-pass, float64.

    Parameters
    ----------
    x : array_like
        Input with ``ndim >= 2``.
    axis : int, optional
        Channel axis (negative allowed). Default 1.

    Returns
    -------
    count : ndarray of int64, shape (C,)
        Number of values per channel.
    mean : ndarray of float64, shape (C,)
        Per-channel mean (0 for an empty channel).
    m2 : ndarray of float64, shape (C,)
        Per-channel sum of squared deviations from the mean (0 when empty).
    """
    rows, _, _ = _as_rows(x, axis)
    n, channels = rows.shape
    count = np.full(channels, n, dtype=np.int64)
    if n == 0:
        return count, np.zeros(channels), np.zeros(channels)
    mean = rows.sum(axis=0) / n
    dev = rows - mean
    m2 = (dev * dev).sum(axis=0)
    return count, mean, m2


def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                       momentum=0.1, eps=1e-5, axis=1):
    """Training-mode batch normalization in float64.

    Parameters
    ----------
    x : array_like
        Input with ``ndim >= 2``; any float dtype, upcast to float64.
    weight, bias : array_like, shape (C,), optional
        Affine parameters; ``None`` means ones / zeros.
    running_mean, running_var : array_like, shape (C,), optional
        Running statistics. They are not modified; the updated values are
        returned (``None`` when not given).
    momentum : float, optional
        Running-statistics momentum, PyTorch convention. Default 0.1.
    eps : float, optional
        Added to the variance before the square root. Default 1e-5.
    axis : int, optional
        Channel axis (negative allowed). Default 1.

    Returns
    -------
    y : ndarray of float64, shape of x
        ``(x - mean) * invstd * weight + bias``.
    save_mean : ndarray of float64, shape (C,)
        Per-channel batch mean.
    save_invstd : ndarray of float64, shape (C,)
        ``1 / sqrt(biased_var + eps)``.
    new_running_mean, new_running_var : ndarray of float64 or None
        ``(1 - m) * running_mean + m * mean`` and
        ``(1 - m) * running_var + m * var * n / (n - 1)`` (unbiased batch
        variance), or ``None`` when the running array was not given.

    Raises
    ------
    ValueError
        When there is at most one value per channel.
    """
    rows, shape_moved, ax = _as_rows(x, axis)
    n, channels = rows.shape
    if n <= 1:
        raise ValueError("Expected more than 1 value per channel when training")
    w = _vector(weight, channels, 1.0, "weight")
    b = _vector(bias, channels, 0.0, "bias")

    mean = rows.sum(axis=0) / n
    dev = rows - mean
    var = (dev * dev).sum(axis=0) / n  # biased
    invstd = 1.0 / np.sqrt(var + eps)
    y = dev * (invstd * w) + b

    new_rm = new_rv = None
    if running_mean is not None:
        rm = _vector(running_mean, channels, 0.0, "running_mean")
        new_rm = (1.0 - momentum) * rm + momentum * mean
    if running_var is not None:
        rv = _vector(running_var, channels, 1.0, "running_var")
        new_rv = (1.0 - momentum) * rv + momentum * var * (n / (n - 1.0))
    return _from_rows(y, shape_moved, ax), mean, invstd, new_rm, new_rv


def batch_norm_inference(x, running_mean, running_var, weight=None, bias=None, *,
                         eps=1e-5, axis=1):
    """Inference-mode batch normalization with given statistics, in float64.

    Parameters
    ----------
    x : array_like
        Input with ``ndim >= 2``.
    running_mean, running_var : array_like, shape (C,)
        Statistics to normalize with.
    weight, bias : array_like, shape (C,), optional
        Affine parameters; ``None`` means ones / zeros.
    eps : float, optional
        Default 1e-5.
    axis : int, optional
        Channel axis (negative allowed). Default 1.

    Returns
    -------
    y : ndarray of float64, shape of x
        ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``.
    """
    rows, shape_moved, ax = _as_rows(x, axis)
    channels = rows.shape[1]
    rm = _vector(running_mean, channels, 0.0, "running_mean")
    rv = _vector(running_var, channels, 1.0, "running_var")
    w = _vector(weight, channels, 1.0, "weight")
    b = _vector(bias, channels, 0.0, "bias")
    invstd = 1.0 / np.sqrt(rv + eps)
    y = (rows - rm) * (invstd * w) + b
    return _from_rows(y, shape_moved, ax)


def batch_norm_backward(grad_out, x, save_mean, save_invstd, weight=None, *,
                        training=True, axis=1):
    """Gradients of batch normalization, in float64.

    With ``x_hat = (x - save_mean) * save_invstd`` and ``w`` the weight
    (ones when ``None``), ``grad_bias = sum(grad_out)`` and
    ``grad_weight = sum(grad_out * x_hat)`` over every axis but ``axis``.

    - ``training=True`` (the statistics depend on x)::

        grad_input = w * invstd * (grad_out - grad_bias / n - x_hat * grad_weight / n)

    - ``training=False`` (the statistics are constants)::

        grad_input = grad_out * w * invstd

    Parameters
    ----------
    grad_out : array_like
        Gradient of the loss with respect to the output; shape of ``x``.
    x : array_like
        The forward input.
    save_mean, save_invstd : array_like, shape (C,)
        Statistics used in the forward pass (for eval mode: the running mean
        and ``1 / sqrt(running_var + eps)``).
    weight : array_like, shape (C,), optional
        ``None`` means ones.
    training : bool, optional
        Whether the forward pass was in training mode. Default True.
    axis : int, optional
        Channel axis (negative allowed). Default 1.

    Returns
    -------
    grad_input : ndarray of float64, shape of x
    grad_weight : ndarray of float64, shape (C,)
    grad_bias : ndarray of float64, shape (C,)
    """
    g_rows, shape_moved, ax = _as_rows(grad_out, axis)
    x_rows, x_shape_moved, _ = _as_rows(x, axis)
    if g_rows.shape != x_rows.shape or shape_moved != x_shape_moved:
        raise ValueError("grad_out must have the shape of x")
    n, channels = x_rows.shape
    mean = _vector(save_mean, channels, 0.0, "save_mean")
    invstd = _vector(save_invstd, channels, 1.0, "save_invstd")
    w = _vector(weight, channels, 1.0, "weight")

    x_hat = (x_rows - mean) * invstd
    grad_bias = g_rows.sum(axis=0)
    grad_weight = (g_rows * x_hat).sum(axis=0)
    if training:
        if n == 0:
            grad_input = np.zeros_like(g_rows)
        else:
            grad_input = (w * invstd) * (g_rows - grad_bias / n - x_hat * (grad_weight / n))
    else:
        grad_input = g_rows * (w * invstd)
    return _from_rows(grad_input, shape_moved, ax), grad_weight, grad_bias
