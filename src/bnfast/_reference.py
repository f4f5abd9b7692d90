"""Plain float64 NumPy normalization: the oracle for tests and benchmarks.

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
    "round_half",
    "half_ulps",
    "activation",
    "activation_grad",
    "batch_norm_act_forward",
    "batch_norm_act_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_norm_backward",
    "batch_norm_double_backward",
    "moments",
    "layer_norm_forward",
    "layer_norm_backward",
    "rms_norm_forward",
    "rms_norm_backward",
    "group_norm_forward",
    "group_norm_backward",
    "instance_norm_forward",
    "instance_norm_backward",
    "filter_response_norm_forward",
    "filter_response_norm_backward",
    "batch_renorm_forward",
    "batch_renorm_backward",
    "ghost_batch_norm_forward",
    "pooled_batch_norm_forward",
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


def batch_norm_double_backward(grad_grad_input, grad_grad_weight, grad_grad_bias, grad_out, x,
                               save_mean, save_invstd, weight=None, *, training=True, axis=1):
    """Gradients of :func:`batch_norm_backward`'s outputs w.r.t. x, grad_out and weight, in float64.

    With ``P(a) = a - mean(a) - x_hat * mean(a * x_hat)`` per channel,
    ``G = grad_grad_input``, ``gw = grad_grad_weight``, ``gb = grad_grad_bias``
    (zeros when None) and ``s = save_invstd``:

    - ``training=True``: ``grad_x = gw s P(g) - w s**2 (x_hat mean(G P(g))
      + mean(G x_hat) P(g) + mean(g x_hat) P(G))``, ``grad_grad_out = w s P(G)
      + gw x_hat + gb``, ``grad_weight = s sum(G P(g))``;
    - ``training=False``: ``grad_x = gw s g``, ``grad_grad_out = w s G + gw
      x_hat + gb``, ``grad_weight = s sum(G g)``.

    Parameters
    ----------
    grad_grad_input : array_like or None
        Gradient w.r.t. grad_input; shape of ``x``.
    grad_grad_weight, grad_grad_bias : array_like, shape (C,), or None
        Gradients w.r.t. grad_weight and grad_bias.
    grad_out, x : array_like
        The arguments of the first backward.
    save_mean, save_invstd : array_like, shape (C,)
        The statistics of the first backward.
    weight : array_like, shape (C,), optional
        ``None`` means ones.
    training : bool, optional
        Whether the statistics are functions of x. Default True.
    axis : int, optional
        Channel axis (negative allowed). Default 1.

    Returns
    -------
    grad_x : ndarray of float64, shape of x
    grad_grad_out : ndarray of float64, shape of x
    grad_weight : ndarray of float64, shape (C,)
    """
    g, shape_moved, ax = _as_rows(grad_out, axis)
    xr, _, _ = _as_rows(x, axis)
    n, channels = xr.shape
    G = np.zeros_like(g) if grad_grad_input is None else _as_rows(grad_grad_input, axis)[0]
    gw = _vector(grad_grad_weight, channels, 0.0, "grad_grad_weight")
    gb = _vector(grad_grad_bias, channels, 0.0, "grad_grad_bias")
    s = _vector(save_invstd, channels, 1.0, "save_invstd")
    w = _vector(weight, channels, 1.0, "weight")
    x_hat = (xr - _vector(save_mean, channels, 0.0, "save_mean")) * s
    if training:
        def P(a):
            return a - a.mean(axis=0) - x_hat * (a * x_hat).mean(axis=0)

        Pg, PG = P(g), P(G)
        cross = (G * Pg).mean(axis=0)
        grad_x = gw * s * Pg - w * s**2 * (x_hat * cross + (G * x_hat).mean(axis=0) * Pg
                                           + (g * x_hat).mean(axis=0) * PG)
        grad_grad_out = w * s * PG + gw * x_hat + gb
        grad_weight = s * (G * Pg).sum(axis=0)
    else:
        grad_x = gw * s * g
        grad_grad_out = w * s * G + gw * x_hat + gb
        grad_weight = s * (G * g).sum(axis=0)
    return (_from_rows(grad_x, shape_moved, ax), _from_rows(grad_grad_out, shape_moved, ax), grad_weight)


# ----------------------------------------------------- the normalization family
#
# Every member normalizes groups of values ("keys") with their own statistics:
# the helpers below view x (float64) as (keys, values per key), normalize per
# key and apply an affine step whose weight is given per value of x.


def _normalize_keys(xk, eps, centered):
    """(x_hat, mean, invstd) per row of ``xk`` (keys, n), two-pass, float64."""
    mean = xk.mean(axis=1, keepdims=True) if centered else np.zeros((xk.shape[0], 1))
    var = ((xk - mean) ** 2).mean(axis=1, keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    return (xk - mean) * invstd, mean[:, 0], invstd[:, 0]


def _backward_keys(gk, x_hat, invstd, centered):
    """grad of x from ``gk`` = weight * grad_out per key, float64."""
    n = gk.shape[1]
    dx = gk - x_hat * (gk * x_hat).sum(axis=1, keepdims=True) / n
    if centered:
        dx = dx - gk.sum(axis=1, keepdims=True) / n
    return dx * invstd[:, None]


def _trailing(x, normalized_shape):
    shape = (normalized_shape,) if np.ndim(normalized_shape) == 0 else tuple(normalized_shape)
    k = len(shape)
    if tuple(x.shape[x.ndim - k:]) != shape:
        raise ValueError(f"normalized_shape {shape} does not match the trailing dims of {x.shape}")
    return shape, x.shape[: x.ndim - k]


def _per_value(v, shape, default):
    return np.full(shape, default) if v is None else np.asarray(v, np.float64)


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, rms=False):
    """Layer (or, with ``rms``, RMS) normalization over the trailing dims.

    Returns
    -------
    y : ndarray of float64
    mean, invstd : ndarray of float64, shape x.shape[:-k] (mean 0 for rms)
    """
    x = np.asarray(x, np.float64)
    shape, lead = _trailing(x, normalized_shape)
    xk = x.reshape(-1, int(np.prod(shape, dtype=np.int64)))
    x_hat, mean, invstd = _normalize_keys(xk, eps, not rms)
    y = x_hat.reshape(x.shape) * _per_value(weight, shape, 1.0) + _per_value(bias, shape, 0.0)
    return y, mean.reshape(lead), invstd.reshape(lead)


def layer_norm_backward(grad_out, x, normalized_shape, weight=None, eps=1e-5, *, rms=False):
    """(grad_input, grad_weight, grad_bias) of `layer_norm_forward`, float64."""
    x = np.asarray(x, np.float64)
    g = np.asarray(grad_out, np.float64)
    shape, _ = _trailing(x, normalized_shape)
    d = int(np.prod(shape, dtype=np.int64))
    xk, gk = x.reshape(-1, d), g.reshape(-1, d)
    x_hat, _, invstd = _normalize_keys(xk, eps, not rms)
    w = _per_value(weight, shape, 1.0).reshape(1, d)
    dx = _backward_keys(gk * w, x_hat, invstd, not rms)
    return dx.reshape(x.shape), (gk * x_hat).sum(axis=0).reshape(shape), gk.sum(axis=0).reshape(shape)


def rms_norm_forward(x, normalized_shape, weight=None, eps=None):
    """RMS normalization: ``x / sqrt(mean(x**2) + eps) * weight`` over the
    trailing dims; eps None is the machine epsilon of x's dtype.

    Returns
    -------
    y, invstd : ndarray of float64
    """
    eps = np.finfo(np.asarray(x).dtype).eps if eps is None else eps
    y, _, invstd = layer_norm_forward(x, normalized_shape, weight, None, eps, rms=True)
    return y, invstd


def rms_norm_backward(grad_out, x, normalized_shape, weight=None, eps=None):
    """(grad_input, grad_weight) of `rms_norm_forward`, float64."""
    eps = np.finfo(np.asarray(x).dtype).eps if eps is None else eps
    dx, dw, _ = layer_norm_backward(grad_out, x, normalized_shape, weight, eps, rms=True)
    return dx, dw


def _grouped(x, num_groups, axis):
    """x (float64) with the channel axis moved to 1, viewed as (N * G, n)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, 1)
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"num_groups {num_groups} does not divide the {c} channels")
    return x, x.reshape(n * num_groups, -1)


def _per_channel(v, x_moved, default):
    c = x_moved.shape[1]
    v = np.full(c, default) if v is None else np.asarray(v, np.float64)
    return v.reshape((1, c) + (1,) * (x_moved.ndim - 2))


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1,
                       centered=True):
    """Group normalization (channel axis ``axis``, batch axis 0), float64.

    Returns
    -------
    y : ndarray of float64
    mean, invstd : ndarray of float64, shape (N, num_groups)
    """
    xm, xk = _grouped(x, num_groups, axis)
    x_hat, mean, invstd = _normalize_keys(xk, eps, centered)
    y = x_hat.reshape(xm.shape) * _per_channel(weight, xm, 1.0) + _per_channel(bias, xm, 0.0)
    n = xm.shape[0]
    return np.moveaxis(y, 1, axis), mean.reshape(n, num_groups), invstd.reshape(n, num_groups)


def group_norm_backward(grad_out, x, num_groups, weight=None, eps=1e-5, *, axis=1,
                        centered=True):
    """(grad_input, grad_weight, grad_bias) of `group_norm_forward`, float64."""
    xm, xk = _grouped(x, num_groups, axis)
    gm = np.moveaxis(np.asarray(grad_out, np.float64), axis, 1)
    x_hat, _, invstd = _normalize_keys(xk, eps, centered)
    w = _per_channel(weight, xm, 1.0)
    dx = _backward_keys((gm * w).reshape(xk.shape), x_hat, invstd, centered)
    reduce = (0,) + tuple(range(2, xm.ndim))
    x_hat = x_hat.reshape(xm.shape)
    return (np.moveaxis(dx.reshape(xm.shape), 1, axis), (gm * x_hat).sum(axis=reduce),
            gm.sum(axis=reduce))


def instance_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                          momentum=0.1, eps=1e-5, axis=1):
    """Instance normalization with batch statistics, float64.

    Returns
    -------
    y : ndarray of float64
    mean, invstd : ndarray of float64, shape (N, C)
    running_mean, running_var : the updated copies (None when not given)
    """
    c = np.shape(x)[axis]
    y, mean, invstd = group_norm_forward(x, c, weight, bias, eps, axis=axis)
    if running_mean is not None:
        n = np.asarray(x)[0].size // c
        var = _grouped(x, c, axis)[1].var(axis=1).reshape(mean.shape)
        running_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean.mean(0)
        running_var = ((1 - momentum) * np.asarray(running_var, np.float64)
                       + momentum * (var * n / (n - 1)).mean(0))
    return y, mean, invstd, running_mean, running_var


def instance_norm_backward(grad_out, x, weight=None, eps=1e-5, *, axis=1):
    """(grad_input, grad_weight, grad_bias) of `instance_norm_forward`, float64."""
    return group_norm_backward(grad_out, x, np.shape(x)[axis], weight, eps, axis=axis)


def filter_response_norm_forward(x, weight, bias, tau, eps=1e-6, *, axis=1):
    """Filter response normalization with its TLU (Singh & Krishnan 2020):
    ``max(weight * x / sqrt(mean(x**2) + |eps|) + bias, tau)``, the mean over
    the spatial axes of each sample and channel; float64.

    Returns
    -------
    y : ndarray of float64
    invstd : ndarray of float64, shape (N, C)
    """
    c = np.shape(x)[axis]
    z, _, invstd = group_norm_forward(x, c, weight, bias, abs(eps), axis=axis, centered=False)
    xm = np.moveaxis(z, axis, 1)
    y = np.maximum(xm, _per_channel(tau, xm, -np.inf))
    return np.moveaxis(y, 1, axis), invstd


def filter_response_norm_backward(grad_out, x, weight, bias, tau, eps=1e-6, *, axis=1):
    """(grad_input, grad_weight, grad_bias, grad_tau) of
    `filter_response_norm_forward`, float64 (the gradient at z == tau goes to tau)."""
    c = np.shape(x)[axis]
    z, _, _ = group_norm_forward(x, c, weight, bias, abs(eps), axis=axis, centered=False)
    zm = np.moveaxis(z, axis, 1)
    gm = np.moveaxis(np.asarray(grad_out, np.float64), axis, 1)
    above = zm > _per_channel(tau, zm, -np.inf)
    reduce = (0,) + tuple(range(2, zm.ndim))
    grad_tau = np.where(above, 0.0, gm).sum(axis=reduce)
    gz = np.moveaxis(np.where(above, gm, 0.0), 1, axis)
    dx, dw, db = group_norm_backward(gz, x, c, weight, abs(eps), axis=axis, centered=False)
    return dx, dw, db, grad_tau


# ------------------------------------------------------- small-batch variants


def batch_renorm_forward(x, weight, bias, running_mean, running_var, *, momentum, eps, r_max, d_max,
                         axis=1):
    """Batch Renormalization (Ioffe 2017) in training mode, float64.

    Returns
    -------
    y : ndarray
        ``weight * ((x - mean) / sigma_B * r + d) + bias``.
    r, d : ndarray, shape (C,)
        The clipped corrections from the running statistics before the update.
    new_rm, new_rv : ndarray, shape (C,)
        The running statistics after batch norm's update.
    """
    rows, shape_moved, ax = _as_rows(x, axis)
    n, channels = rows.shape
    w = _vector(weight, channels, 1.0, "weight")
    b = _vector(bias, channels, 0.0, "bias")
    rm = _vector(running_mean, channels, 0.0, "running_mean")
    rv = _vector(running_var, channels, 1.0, "running_var")
    mean = rows.mean(axis=0)
    var = ((rows - mean) ** 2).mean(axis=0)
    sigma_b, sigma = np.sqrt(var + eps), np.sqrt(rv + eps)
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = np.clip((mean - rm) / sigma, -d_max, d_max)
    y = w * ((rows - mean) / sigma_b * r + d) + b
    new_rm = (1.0 - momentum) * rm + momentum * mean
    new_rv = (1.0 - momentum) * rv + momentum * var * n / (n - 1.0)
    return _from_rows(y, shape_moved, ax), r, d, new_rm, new_rv


def batch_renorm_backward(grad_out, x, weight, r, d, *, eps, axis=1):
    """Gradients of :func:`batch_renorm_forward` with r and d constant, float64.

    Returns
    -------
    grad_input, grad_weight, grad_bias : ndarray
    """
    rows, shape_moved, ax = _as_rows(x, axis)
    g, _, _ = _as_rows(grad_out, axis)
    n, channels = rows.shape
    w = _vector(weight, channels, 1.0, "weight")
    mean = rows.mean(axis=0)
    invstd = 1.0 / np.sqrt(((rows - mean) ** 2).mean(axis=0) + eps)
    x_hat = (rows - mean) * invstd
    gx = w * r * invstd * (g - g.mean(axis=0) - x_hat * (g * x_hat).mean(axis=0))
    return _from_rows(gx, shape_moved, ax), (g * (x_hat * r + d)).sum(axis=0), g.sum(axis=0)


def ghost_batch_norm_forward(x, virtual_batch_size, weight=None, bias=None, running_mean=None,
                             running_var=None, *, momentum=0.1, eps=1e-5, axis=1):
    """Ghost batch normalization: batch norm of each consecutive chunk, float64.

    Returns
    -------
    y : ndarray
    new_rm, new_rv : ndarray or None
        One update with the mean over the chunks of their means and unbiased
        variances (Keras' rule).
    """
    x = np.asarray(x, dtype=np.float64)
    chunks = x.shape[0] // virtual_batch_size
    ys, means, vars_ = [], [], []
    for k in range(chunks):
        part = x[k * virtual_batch_size:(k + 1) * virtual_batch_size]
        y, mean, _, _, rv1 = batch_norm_forward(part, weight, bias, None, np.zeros(x.shape[axis]),
                                                momentum=1.0, eps=eps, axis=axis)
        ys.append(y)
        means.append(mean)
        vars_.append(rv1)
    mean, var = np.mean(means, axis=0), np.mean(vars_, axis=0)
    new_rm = None if running_mean is None else (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
    new_rv = None if running_var is None else (1 - momentum) * np.asarray(running_var, np.float64) + momentum * var
    return np.concatenate(ys, axis=0), new_rm, new_rv


def pooled_batch_norm_forward(x, weight, bias, other_means, other_second_moments, *, share_mode, lam=0.0,
                              eps=1e-5, axis=1):
    """Normalization by statistics pooled from the batch and constants, float64.

    ``share_mode="momentum"`` (Momentum BN): ``mean = lam * m0 + (1 - lam) * mean_B``
    and ``var = lam * v0 + (1 - lam) * var_B`` with ``other_means = [m0]``,
    ``other_second_moments = [v0]`` (a variance).  ``share_mode="window"``
    (cross-iteration BN): the mean over the batch and the others of the
    means and of ``max(nu, mu**2)``, ``var = nu_bar - mu_bar**2``.

    Returns
    -------
    y, mean, var : ndarray
    """
    rows, shape_moved, ax = _as_rows(x, axis)
    n, channels = rows.shape
    w = _vector(weight, channels, 1.0, "weight")
    b = _vector(bias, channels, 0.0, "bias")
    mean_b = rows.mean(axis=0)
    if share_mode == "momentum":
        var_b = ((rows - mean_b) ** 2).mean(axis=0)
        mean = lam * np.asarray(other_means[0]) + (1.0 - lam) * mean_b
        var = lam * np.asarray(other_second_moments[0]) + (1.0 - lam) * var_b
    else:
        mus = [mean_b] + [np.asarray(m) for m in other_means]
        nus = [(rows * rows).mean(axis=0)] + [np.maximum(np.asarray(v), np.asarray(m) ** 2)
                                              for m, v in zip(other_means, other_second_moments)]
        mean = np.mean(mus, axis=0)
        var = np.maximum(np.mean(nus, axis=0) - mean * mean, 0.0)
    y = (rows - mean) / np.sqrt(var + eps) * w + b
    return _from_rows(y, shape_moved, ax), mean, var
# ------------------------------------------- fused activation and residual add
def activation(v, name, negative_slope=0.01):
    """``act(v)`` in float64: identity, relu, leaky_relu or elu (alpha 1).

    Parameters
    ----------
    v : array_like
        Pre-activation values.
    name : {"identity", "relu", "leaky_relu", "elu"}
        The activation.
    negative_slope : float, optional
        leaky_relu's slope for negative values. Default 0.01.

    Returns
    -------
    ndarray of float64
    """
    v = np.asarray(v, dtype=np.float64)
    if name == "identity":
        return v.copy()
    if name == "relu":
        return np.where(v < 0, 0.0, v)
    if name == "leaky_relu":
        return np.where(v < 0, v * negative_slope, v)
    if name == "elu":
        return np.where(v < 0, np.expm1(np.minimum(v, 0.0)), v)
    raise ValueError(f"unknown activation {name!r}")


def activation_grad(v, name, negative_slope=0.01):
    """``act'(v)`` in float64, with PyTorch's values at 0 (relu 0, leaky_relu its slope, elu 1).

    Parameters
    ----------
    v : array_like
        Pre-activation values.
    name : {"identity", "relu", "leaky_relu", "elu"}
        The activation.
    negative_slope : float, optional
        leaky_relu's slope. Default 0.01.

    Returns
    -------
    ndarray of float64
    """
    v = np.asarray(v, dtype=np.float64)
    if name == "identity":
        return np.ones_like(v)
    if name == "relu":
        return (v > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(v > 0, 1.0, negative_slope)
    if name == "elu":
        return np.where(v > 0, 1.0, np.exp(np.minimum(v, 0.0)))
    raise ValueError(f"unknown activation {name!r}")


def batch_norm_act_forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                           activation_name="relu", negative_slope=0.01, residual=None,
                           momentum=0.1, eps=1e-5, axis=1):
    """``act(BN(x) + residual)`` in float64, BN in training mode.

    Parameters
    ----------
    x, weight, bias, running_mean, running_var, momentum, eps, axis
        As `batch_norm_forward`.
    activation_name : str, optional
        As `activation`. Default "relu".
    negative_slope : float, optional
        leaky_relu's slope. Default 0.01.
    residual : array_like, optional
        Added before the activation.

    Returns
    -------
    y, save_mean, save_invstd, new_running_mean, new_running_var
        As `batch_norm_forward`, y activated.
    """
    y, mean, invstd, rm, rv = batch_norm_forward(x, weight, bias, running_mean, running_var,
                                                 momentum=momentum, eps=eps, axis=axis)
    if residual is not None:
        y = y + np.asarray(residual, dtype=np.float64)
    return activation(y, activation_name, negative_slope), mean, invstd, rm, rv


def batch_norm_act_backward(grad_out, x, weight=None, bias=None, *, activation_name="relu",
                            negative_slope=0.01, residual=None, eps=1e-5, axis=1):
    """Gradients of `batch_norm_act_forward` (from x, in float64).

    Parameters
    ----------
    grad_out : array_like
        Gradient with respect to the output.
    x, weight, bias, eps, axis
        As `batch_norm_forward`.
    activation_name, negative_slope, residual
        As `batch_norm_act_forward`.

    Returns
    -------
    grad_input, grad_weight, grad_bias, grad_residual
        ndarrays of float64; grad_residual is None without a residual.
    """
    u, mean, invstd, _, _ = batch_norm_forward(x, weight, bias, eps=eps, axis=axis)
    v = u if residual is None else u + np.asarray(residual, dtype=np.float64)
    dv = np.asarray(grad_out, dtype=np.float64) * activation_grad(v, activation_name, negative_slope)
    gx, gw, gb = batch_norm_backward(dv, x, mean, invstd, weight, axis=axis)
    return gx, gw, gb, (dv if residual is not None else None)


# ------------------------------------------------ half precision: the yardstick
#
# float16 (IEEE binary16) and bfloat16 results are judged against the float64
# reference rounded once, correctly, to the half type -- not through float32,
# whose extra rounding could move a tie.

# (significand bits, exponent of the smallest subnormal) per half type
_HALF_FORMATS = {"float16": (11, -24), "bfloat16": (8, -133)}


def _half_format(dtype):
    dtype = np.dtype(dtype)
    if dtype.name not in _HALF_FORMATS or dtype.itemsize != 2:
        raise TypeError(f"not a half-precision dtype: {dtype}")
    return _HALF_FORMATS[dtype.name]


def round_half(values, dtype):
    """float64 values rounded once to nearest (ties to even) in a half type.

    Parameters
    ----------
    values : array_like
        Converted to float64 first.
    dtype : numpy.dtype
        ``numpy.float16`` or ``ml_dtypes.bfloat16``.

    Returns
    -------
    ndarray of dtype
        Each value on the half type's grid (its subnormals included);
        magnitudes beyond its largest finite value become infinities.
    """
    bits, min_exp = _half_format(dtype)
    v = np.asarray(values, dtype=np.float64)
    _, e = np.frexp(v)  # v = m * 2**e, 0.5 <= |m| < 1
    q = np.maximum(e - bits, min_exp)  # the grid spacing's exponent at v
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.where(np.isfinite(v), np.ldexp(np.rint(np.ldexp(v, -q)), q), v)
        return r.astype(dtype)  # exact: r is on the grid (or beyond it: inf)


def half_ulps(result, reference):
    """Units in the last place between a half-precision result and the float64
    reference rounded to its type (`round_half`).

    Parameters
    ----------
    result : ndarray of float16 or bfloat16
    reference : array_like
        float64 values of ``result``'s shape.

    Returns
    -------
    ndarray of float64
        The number of representable values between them (0: the correctly
        rounded result; +0 and -0 count as one value); inf where exactly one
        of them is NaN, 0 where both are.
    """
    result = np.asarray(result)
    expected = round_half(reference, result.dtype)

    def order(a):
        bits = a.view(np.uint16).astype(np.int64)
        magnitude = bits & 0x7FFF
        return np.where(bits & 0x8000, -magnitude, magnitude)

    nan_r = np.isnan(result.astype(np.float64))
    nan_e = np.isnan(expected.astype(np.float64))
    d = np.abs(order(result) - order(expected)).astype(np.float64)
    return np.where(nan_r | nan_e, np.where(nan_r == nan_e, 0.0, np.inf), d)
