"""Ghost (virtual-batch) batch normalization on the family's keyed view.

A batch of N samples split into N / v consecutive chunks of v samples is
the array ``(N / v, v, ...)``: instance normalization of that array, with
the chunk as its sample axis, keys the statistics on (chunk, channel) --
one kernel call for every chunk, forward and backward, the running
statistics averaged over the chunks' statistics as instance norm averages
over samples.  One chunk is batch normalization itself.
"""

from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike

from ._functional import _channel_axis, _float_array
from ._normalization import instance_norm_backward, instance_norm_forward

__all__: list[str] = []


def _chunks(x: np.ndarray, virtual_batch_size, axis) -> tuple[int, int]:
    """(channel axis, number of chunks) of ``x`` in ghost batches, else TypeError/ValueError."""
    if isinstance(virtual_batch_size, (bool, np.bool_)) or not isinstance(virtual_batch_size, numbers.Integral):
        raise TypeError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
    v = int(virtual_batch_size)
    if v < 1:
        raise ValueError(f"virtual_batch_size must be a positive int, got {v}")
    ax = _channel_axis(x, axis)
    if ax == 0:
        raise ValueError("with virtual_batch_size the channel axis cannot be axis 0, the batch axis")
    n = x.shape[0]
    if n % v:
        raise ValueError(
            f"the batch size {n} is not a multiple of virtual_batch_size={v}; pass batches of a multiple "
            f"of {v} samples (or change virtual_batch_size)"
        )
    per_chunk = v * (x.size // (n * x.shape[ax])) if x.size else 0
    if per_chunk == 1:
        raise ValueError(
            f"virtual_batch_size={v} leaves one value per channel in each ghost batch (input shape {x.shape})"
        )
    return ax, n // v


def ghost_batch_norm_forward(
    x: ArrayLike, virtual_batch_size: int, weight: ArrayLike | None = None, bias: ArrayLike | None = None,
    running_mean: np.ndarray | None = None, running_var: np.ndarray | None = None, *,
    momentum: float = 0.1, eps: float = 1e-5, axis: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch normalization of each consecutive chunk of ``virtual_batch_size`` samples.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64, ndim >= 2
        Input; axis 0 is the batch, its length a multiple of ``virtual_batch_size``.
    virtual_batch_size : int >= 1
        Samples per ghost batch.
    weight, bias : array_like of shape (C,), optional
        Affine parameters; ``None`` means 1 and 0.
    running_mean, running_var : numpy.ndarray of shape (C,), optional
        Updated in place once, with the mean over the chunks of their means and
        of their unbiased variances (Keras' rule for its virtual batches).
    momentum : float in [0, 1], default 0.1
        Weight of the averaged chunk statistics in the update.
    eps : float >= 0, default 1e-5
        Added to the variances.
    axis : int, default 1
        The channel axis (not 0).

    Returns
    -------
    y : numpy.ndarray
        Normalized input, x's shape and dtype.
    mean, invstd : numpy.ndarray
        Shape (N / v, C), per chunk and channel.  One chunk gives bit for bit
        the results of `bnfast.batch_norm_forward` (the same kernel on the
        same view).

    Raises
    ------
    TypeError, ValueError
        As `bnfast.batch_norm_forward`; also a batch size that is not a
        multiple of ``virtual_batch_size`` or one value per channel in a chunk.
        Nothing is modified when an exception is raised.
    """
    x = _float_array(x, "x")
    ax, chunks = _chunks(x, virtual_batch_size, axis)
    xr = x.reshape((chunks, x.shape[0] // chunks) + x.shape[1:])
    y, mean, invstd = instance_norm_forward(xr, weight, bias, running_mean, running_var, momentum=momentum,
                                            eps=eps, axis=ax + 1)
    return y.reshape(x.shape), mean, invstd


def ghost_batch_norm_backward(
    grad_out: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike, weight: ArrayLike | None = None, *,
    axis: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of `ghost_batch_norm_forward` (statistics through each chunk).

    Parameters
    ----------
    grad_out : numpy.ndarray
        Gradient w.r.t. the output; x's shape and dtype.
    x : numpy.ndarray
        The forward input.
    mean, invstd : array_like
        From the forward: (chunks, C).
    weight : array_like of shape (C,), optional
        ``None`` means 1.
    axis : int, default 1
        The channel axis (not 0).

    Returns
    -------
    grad_input : numpy.ndarray
        x's shape and dtype.
    grad_weight, grad_bias : numpy.ndarray of shape (C,)
        Summed over all chunks.

    Raises
    ------
    TypeError, ValueError
        For bad dtypes or shapes.
    """
    x = _float_array(x, "x")
    mean = np.asarray(mean)
    if mean.ndim != 2 or mean.shape[0] < 1 or x.ndim < 1 or x.shape[0] % mean.shape[0]:
        raise ValueError(f"mean must have shape (chunks, C) with chunks dividing the batch, got {mean.shape}")
    chunks = mean.shape[0]
    ax, _ = _chunks(x, x.shape[0] // chunks, axis)
    grad_out = np.asarray(grad_out)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have the shape of x {x.shape}, got {grad_out.shape}")
    shape = (chunks, x.shape[0] // chunks) + x.shape[1:]
    gx, gw, gb = instance_norm_backward(grad_out.reshape(shape), x.reshape(shape), mean, invstd, weight,
                                        axis=ax + 1)
    return gx.reshape(x.shape), gw, gb
