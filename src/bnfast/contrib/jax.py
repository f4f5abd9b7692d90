"""Batch normalization for JAX on bnfast's CPU kernels.

`batch_norm` is a `jax.custom_vjp` function whose forward and backward
passes call bnfast's `~bnfast.batch_norm_forward` (training),
`~bnfast.batch_norm_inference` (evaluation) and `~bnfast.batch_norm_backward`
through `jax.pure_callback`, so it works under `jax.jit`, `jax.grad` and
`jax.vmap` (one callback per mapped element).  The running statistics are
returned as new arrays, as Flax does; the arrays passed in are not modified.

The callbacks run on the host: this adapter is for JAX on the CPU.  It needs
JAX (``pip install jax`` or ``pip install bnfast[jax]``); ``import bnfast``
never imports this module.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> from bnfast.contrib.jax import batch_norm
>>> x = jnp.ones((8, 3, 4, 4))
>>> w, b = jnp.ones(3), jnp.zeros(3)
>>> rm, rv = jnp.zeros(3), jnp.ones(3)
>>> y, rm, rv = jax.jit(batch_norm, static_argnames="training")(x, w, b, rm, rv, training=True)
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

import numpy as np

try:
    import jax
    import jax.numpy as jnp
except ImportError as err:  # pragma: no cover - exercised only without jax
    raise ImportError(
        "bnfast.contrib.jax needs JAX: pip install jax (or pip install bnfast[jax])"
    ) from err

from .._functional import batch_norm_backward, batch_norm_forward, batch_norm_inference

__all__ = ["batch_norm"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# pure_callback under jax.vmap: call the kernels once per mapped element, which
# is batch normalization of each element on its own (what vmap means).  JAX
# before 0.4.34 spells this ``vectorized=False`` (its default).
if "vmap_method" in inspect.signature(jax.pure_callback).parameters:
    _VMAP = {"vmap_method": "sequential"}
else:  # pragma: no cover - old JAX
    _VMAP = {}


def _writable(a: Any) -> np.ndarray:
    """A C-contiguous, writable NumPy copy of a callback argument."""
    return np.array(a, copy=True, order="C")


def _readable(a: Any) -> np.ndarray:
    """A NumPy view of a callback argument (possibly read-only, never written)."""
    return np.asarray(a)


def _invstd(running_var: np.ndarray, eps: float) -> np.ndarray:
    """``1 / sqrt(running_var + eps)`` computed in float64, rounded once to the input's dtype."""
    return (1.0 / np.sqrt(running_var.astype(np.float64) + eps)).astype(running_var.dtype)


# ------------------------------------------------------------- host callbacks


def _host_forward_train(x, weight, bias, running_mean, running_var, *, momentum, eps, axis):
    rm, rv = _writable(running_mean), _writable(running_var)
    y, mean, invstd = batch_norm_forward(
        _readable(x), _readable(weight), _readable(bias), rm, rv, momentum=momentum, eps=eps, axis=axis
    )
    return y, rm, rv, mean, invstd


def _host_inference(x, weight, bias, running_mean, running_var, *, eps, axis):
    return batch_norm_inference(
        _readable(x), _readable(running_mean), _readable(running_var), _readable(weight), _readable(bias),
        eps=eps, axis=axis,
    )  # fmt: skip


def _host_backward(grad_out, x, save_mean, save_invstd, weight, *, training, axis):
    return batch_norm_backward(
        _readable(grad_out), _readable(x), _readable(save_mean), _readable(save_invstd), _readable(weight),
        training=training, axis=axis,
    )  # fmt: skip


def _host_backward_eval(grad_out, x, running_mean, running_var, weight, *, eps, axis):
    rv = _readable(running_var)
    return batch_norm_backward(
        _readable(grad_out), _readable(x), _readable(running_mean), _invstd(rv, eps), _readable(weight),
        training=False, axis=axis,
    )  # fmt: skip


def _struct(a: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


# ------------------------------------------------------------ the custom VJP


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _bn(x, weight, bias, running_mean, running_var, training, momentum, eps, axis):
    out, _ = _bn_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps, axis)
    return out


def _bn_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps, axis):
    if training:
        vec = _struct(running_mean)
        y, new_rm, new_rv, mean, invstd = jax.pure_callback(
            partial(_host_forward_train, momentum=momentum, eps=eps, axis=axis),
            (_struct(x), vec, vec, vec, vec),
            x, weight, bias, running_mean, running_var,
            **_VMAP,
        )  # fmt: skip
        return (y, new_rm, new_rv), (x, weight, mean, invstd)
    y = jax.pure_callback(
        partial(_host_inference, eps=eps, axis=axis),
        _struct(x),
        x, weight, bias, running_mean, running_var,
        **_VMAP,
    )  # fmt: skip
    return (y, running_mean, running_var), (x, weight, running_mean, running_var)


def _bn_bwd(training, momentum, eps, axis, residuals, cotangents):
    x, weight, stat_a, stat_b = residuals
    grad_out = cotangents[0]  # the running statistics carry no gradient
    vec = _struct(weight)
    if training:
        host = partial(_host_backward, training=True, axis=axis)
    else:
        host = partial(_host_backward_eval, eps=eps, axis=axis)
    grad_x, grad_w, grad_b = jax.pure_callback(
        host, (_struct(x), vec, vec), grad_out, x, stat_a, stat_b, weight, **_VMAP
    )
    zeros = jnp.zeros(vec.shape, vec.dtype)
    return grad_x, grad_w, grad_b, zeros, zeros


_bn.defvjp(_bn_fwd, _bn_bwd)


# ---------------------------------------------------------------- public API


def batch_norm(
    x: jax.Array,
    weight: jax.Array | None,
    bias: jax.Array | None,
    running_mean: jax.Array,
    running_var: jax.Array,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch normalization on bnfast's kernels, differentiable in JAX.

    In training mode the batch statistics (mean and biased variance over
    every axis but ``axis``) normalize ``x`` and update the running
    statistics as PyTorch does::

        y = (x - mean) / sqrt(var + eps) * weight + bias
        new_running_mean = (1 - momentum) * running_mean + momentum * mean
        new_running_var = (1 - momentum) * running_var + momentum * var * n / (n - 1)

    with n the number of values per channel.  In evaluation mode the running
    statistics normalize ``x`` and are returned unchanged.

    Parameters
    ----------
    x : jax.Array of float32 or float64, ndim >= 2
        Input (float64 needs ``jax_enable_x64``).
    weight, bias : jax.Array of shape (C,), or None
        Affine parameters, cast to x's dtype; ``None`` means 1 and 0.
    running_mean, running_var : jax.Array of shape (C,)
        Running statistics, cast to x's dtype; not modified.
    training : bool
        Normalize with the batch statistics (and return updated running
        statistics) instead of the running statistics.  Static: a Python bool,
        not a traced value (under `jax.jit`, mark it static).
    momentum : float in [0, 1], default 0.1
        Weight of the batch statistics in the running-statistics update
        (static).
    eps : float >= 0, default 1e-5
        Added to the variance before the square root (static).
    axis : int, default 1
        The channel axis: 1 for channels-first (NCHW, ...), -1 for
        channels-last (NHWC, ...) (static).

    Returns
    -------
    y : jax.Array
        Normalized input, x's shape and dtype.
    new_running_mean, new_running_var : jax.Array of shape (C,)
        Updated running statistics (training), or ``running_mean`` and
        ``running_var`` themselves (evaluation), in x's dtype.

    Raises
    ------
    TypeError
        If x is not float32/float64 or a static argument is not a Python
        number/bool.
    ValueError
        For a bad shape or axis, or momentum/eps out of range.

    Notes
    -----
    Gradients flow to ``x``, ``weight`` and ``bias``: through the batch
    statistics in training mode; with the statistics held constant in
    evaluation mode (``grad_x = g * weight / sqrt(running_var + eps)``).  The
    running statistics get zero gradients in both modes, and cotangents of
    the returned running statistics are ignored.  Forward-mode
    differentiation (`jax.jvp`, `jax.jacfwd`) is not supported, as for every
    `jax.custom_vjp` function.

    Each call runs a host callback: under `jax.jit` it is one opaque
    operation that XLA cannot fuse with its neighbours.
    """
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be True or False (static), got {training!r}")
    for name, value in (("momentum", momentum), ("eps", eps)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a Python number (static), got {type(value).__name__}")
    momentum, eps = float(momentum), float(eps)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    if not (0.0 <= eps < float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an integer (static), got {axis!r}")

    x = jnp.asarray(x)
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32 or float64, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"expected an array of at least 2 dimensions (N, C, ...), got shape {x.shape}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an array of {x.ndim} dimensions")
    axis = int(axis) % x.ndim
    channels = x.shape[axis]

    def vector(v: Any, name: str, fill: float | None = None) -> jax.Array:
        if v is None:
            if fill is None:
                raise ValueError(f"{name} is required")
            return jnp.full((channels,), fill, x.dtype)
        v = jnp.asarray(v)
        if v.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {v.shape}")
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {v.dtype}")
        return v.astype(x.dtype)

    weight_ = vector(weight, "weight", 1.0)
    bias_ = vector(bias, "bias", 0.0)
    rm = vector(running_mean, "running_mean")
    rv = vector(running_var, "running_var")
    return _bn(x, weight_, bias_, rm, rv, bool(training), momentum, eps, axis)
