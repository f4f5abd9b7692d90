"""Batch normalization as a NumPy user writes it: the speed baseline.

Unlike `bnfast._reference` (the float64 oracle), these keep the input dtype
and use NumPy's own reductions, as code without bnfast would.
"""

from __future__ import annotations

import numpy as np


def _reduce_axes(x: np.ndarray, axis: int) -> tuple:
    axis %= x.ndim
    return tuple(i for i in range(x.ndim) if i != axis)


def _per_channel(v: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return v.reshape(shape)


def forward(x, weight, bias, eps=1e-5, axis=1):
    """Training forward: (y, mean, invstd) with NumPy's mean and var."""
    axes = _reduce_axes(x, axis)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - mean) * (invstd * _per_channel(weight, x, axis)) + _per_channel(bias, x, axis)
    return y, mean.reshape(-1), invstd.reshape(-1)


def inference(x, mean, var, weight, bias, eps=1e-5, axis=1):
    """Inference with given statistics."""
    scale = weight / np.sqrt(var + eps)
    return (x - _per_channel(mean, x, axis)) * _per_channel(scale, x, axis) + _per_channel(bias, x, axis)


def backward(grad_out, x, mean, invstd, weight, axis=1):
    """Training backward: (grad_input, grad_weight, grad_bias)."""
    axes = _reduce_axes(x, axis)
    n = x.size // x.shape[axis % x.ndim]
    xhat = (x - _per_channel(mean, x, axis)) * _per_channel(invstd, x, axis)
    grad_bias = grad_out.sum(axis=axes)
    grad_weight = (grad_out * xhat).sum(axis=axes)
    k = _per_channel(weight * invstd, x, axis)
    grad_in = k * (grad_out - _per_channel(grad_bias / n, x, axis) - xhat * _per_channel(grad_weight / n, x, axis))
    return grad_in, grad_weight, grad_bias
