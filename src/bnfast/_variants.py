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

from ._functional import (
    _backward,
    _channel_axis,
    _float_array,
    _forward_train,
    _vector,
)
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
    if n == 0 or (x.size == 0 and x.shape[ax] > 0):
        raise ValueError(f"cannot compute batch statistics of an empty batch (input shape {x.shape})")
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


def shared_batch_norm_backward(
    grad_out: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike, weight: ArrayLike | None, share: float,
    ref_mean: ArrayLike | None = None, *, axis: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch-norm backward for statistics of which the batch is a share.

    When the normalizing mean is ``... + share * batch_mean`` and the variance
    changes by ``share * 2 (x_i - ref_mean) / n`` per value (momentum batch
    norm: the batch variance about the batch mean; cross-iteration batch
    norm: ``ref_mean`` the pooled mean),
    ``grad_input = s * (g - share * mean(g) - share * invstd * (x - ref_mean) * mean(g * x_hat))``
    with ``s = weight * invstd`` and ``x_hat = (x - mean) * invstd`` -- the
    batch-norm backward kernel with scaled statistics terms (one call, one
    pass over the data as for batch norm).

    Parameters
    ----------
    grad_out, x : numpy.ndarray
        Same shape and dtype (float32/float64).
    mean, invstd : array_like of shape (C,)
        The statistics the forward normalized with.
    weight : array_like of shape (C,) or None
        ``None`` means 1.
    share : float in (0, 1]
        The batch's share of the statistics.
    ref_mean : array_like of shape (C,), optional
        Float64 reference mean of the variance term; ``None`` means ``mean``.
    axis : int, default 1
        The channel axis.

    Returns
    -------
    grad_input : numpy.ndarray
    grad_weight, grad_bias : numpy.ndarray of shape (C,)
        ``sum(g * x_hat)`` and ``sum(g)``.

    Raises
    ------
    TypeError, ValueError
        For bad dtypes or shapes, or a share outside (0, 1].
    """
    xa = _float_array(x, "x", native=False, half=True)
    channels = xa.shape[_channel_axis(xa, axis)]
    share = float(share)
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    ref = None if ref_mean is None else _vector(ref_mean, "ref_mean", channels, np.dtype(np.float64))
    return _backward(grad_out, x, mean, invstd, weight, True, axis, None, share=share, ref_mean=ref)


def statistics_forward(
    x: ArrayLike, weight: ArrayLike | None, bias: ArrayLike | None, running_mean: np.ndarray,
    running_var: np.ndarray, *, momentum: float, eps: float, axis: int = 1, share: float = 1.0,
    prior_mean: np.ndarray | None = None, prior_var: np.ndarray | None = None, prior_moments: bool = False,
    r_max: float = 0.0, d_max: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training forward normalizing with statistics other than the batch's, in one kernel call.

    The batch statistics update the running statistics as `bnfast.batch_norm_forward`
    does; the normalization uses (``bn_forward_args`` in ``ops.h``):

    * with ``prior_mean``/``prior_var``: ``mean' = share * mean + prior_mean`` and
      ``var' = share * var + prior_var`` (or, ``prior_moments``, with second
      moments: ``var' = max(share * (var + mean**2) + prior_var - mean'**2, 0)``);
    * with ``r_max >= 1``: batch renormalization against the running statistics
      before the update, ``r`` clipped to ``[1/r_max, r_max]`` and ``d`` to
      ``[-d_max, d_max]``.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64, ndim >= 2
        Input.
    weight, bias : array_like of shape (C,) or None
        Affine parameters.
    running_mean, running_var : numpy.ndarray of shape (C,)
        Updated in place with the batch statistics.
    momentum : float in [0, 1]
        Their update factor.
    eps : float >= 0
        Added to the variances.
    axis : int, default 1
        The channel axis.
    share : float, default 1.0
        The batch's share of the prior-mixed statistics.
    prior_mean, prior_var : numpy.ndarray of shape (C,) float64, optional
        The statistics' other part (pass both or neither).
    prior_moments : bool, default False
        Whether ``prior_var`` is a second moment (see above).
    r_max, d_max : float, default 0
        Batch renormalization's clips (``r_max`` 0: none).

    Returns
    -------
    y : numpy.ndarray
        Normalized input.
    save_mean, save_invstd : numpy.ndarray of shape (C,)
        The statistics used (the batch's for renormalization), x's dtype.
    stats : numpy.ndarray of shape (4, C), float64
        Batch mean, batch biased variance, then ``mean'`` and ``var'`` (prior) or
        ``r`` and ``d`` (renormalization).

    Raises
    ------
    TypeError, ValueError
        As `bnfast.batch_norm_forward`; nothing is modified then.
    """
    xa = _float_array(x, "x", native=False, half=True)
    channels = xa.shape[_channel_axis(xa, axis)]
    for name, state in (("running_mean", running_mean), ("running_var", running_var)):
        if state is None:
            raise TypeError(f"{name} must be a numpy.ndarray updated in place, got NoneType")
    f64 = np.dtype(np.float64)
    if (prior_mean is None) != (prior_var is None):
        raise ValueError("pass both prior_mean and prior_var, or neither")
    pm = None if prior_mean is None else _vector(prior_mean, "prior_mean", channels, f64)
    pv = None if prior_var is None else _vector(prior_var, "prior_var", channels, f64)
    stats = np.zeros((4, channels), f64)
    y, save_mean, save_invstd = _forward_train(
        x, weight, bias, running_mean, running_var, momentum, eps, axis, None,
        statistics=(float(share), float(r_max), float(d_max), pm, pv, int(bool(prior_moments)), stats),
    )
    return y, save_mean, save_invstd, stats
