"""Fold an eval-mode BatchNorm layer into the Linear or Conv layer before it."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._functional import _eps
from .nn.normalization import BatchNorm

__all__ = ["fold_batch_norm"]

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def fold_batch_norm(
    weight: Any, bias: Any, bn: BatchNorm, *, axis: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``bn`` (in eval mode) into the weight and bias of the layer before it.

    For a layer ``z = W * x + b`` (matmul or convolution) followed by ``bn``
    in eval mode, ``y = (z - running_mean) * s + beta`` with
    ``s = gamma / sqrt(running_var + eps)``, so the single layer with
    ``W' = W * s`` (scaled along the output-channel axis) and
    ``b' = (b - running_mean) * s + beta`` gives the same ``y``.  ``bn``
    must be in eval mode, as for PyTorch's ``fuse_conv_bn_eval``: in training
    mode it normalizes with batch statistics, which no fixed layer reproduces.
    ``gamma = 1`` when
    ``bn.affine`` is false and ``beta = 0`` when ``bn.bias`` is None.  The
    arithmetic is done in float64 and the results are cast to ``weight``'s
    dtype.  The inputs are not modified.

    Parameters
    ----------
    weight : array_like
        Weight of the preceding layer, with the output channels on ``axis``:

        * channels-first (``axis=0``, the default): PyTorch's layouts, Linear
          ``(out, in)`` and Conv ``(out, in/groups, *kernel)`` for any number
          of spatial dimensions (grouped and depthwise convolutions included).
        * channels-last (``axis=-1``): the output channels last, as in
          TensorFlow/Keras Conv ``(*kernel, in/groups, out)`` (HWIO for 2-D)
          or a Linear weight stored ``(in, out)`` for ``y = x @ W``.
        * any other axis holding the output channels, e.g. ``axis=1`` for a
          ConvTranspose weight ``(in, out, *kernel)`` with ``groups=1``.

        The layout of the *activations* (``bn.axis``) does not matter.
    bias : array_like or None
        Bias of the preceding layer, shape ``(out,)``; None counts as zeros.
    bn : BatchNorm
        A bnfast BatchNorm layer in eval mode with ``track_running_stats=True``
        and ``num_features == weight.shape[axis]``.
    axis : int, default 0
        Axis of ``weight`` that indexes the output channels.

    Returns
    -------
    weight : numpy.ndarray
        Folded weight, same shape and dtype as ``weight``.
    bias : numpy.ndarray
        Folded bias, shape ``(out,)``, ``weight``'s dtype.

    Raises
    ------
    TypeError
        ``bn`` is not a bnfast BatchNorm, ``bn.eps`` is not a real number, or
        ``weight`` is not floating point.
    ValueError
        ``bn`` is in training mode or has no running statistics, ``bn.eps``
        is negative or not finite, ``axis`` is out of range, or the shapes of
        ``weight``/``bias`` do not match ``bn.num_features``.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bn = bnfast.BatchNorm1d(4).eval()
    >>> W, b = np.ones((4, 3), np.float32), None       # Linear(3, 4), no bias
    >>> W2, b2 = bnfast.fold_batch_norm(W, b, bn)
    >>> x = np.ones((2, 3), np.float32)
    >>> bool(np.allclose(x @ W2.T + b2, bn(x @ W.T)))
    True
    """
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be a bnfast BatchNorm layer (got {type(bn).__name__})")
    if not bn.track_running_stats:
        raise ValueError(
            "cannot fold a BatchNorm with track_running_stats=False: it always normalizes "
            "with batch statistics"
        )
    if bn.training:
        raise ValueError(
            "cannot fold a BatchNorm in training mode: it normalizes with batch statistics; "
            "call bn.eval() first"
        )
    eps = _eps(bn.eps, "bn.eps")
    w = np.asarray(weight)
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be a floating-point array (got dtype {w.dtype})")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int (got {axis!r})")
    if w.ndim == 0 or not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis {axis} is out of range for a weight of shape {w.shape}")
    C = bn.num_features
    if w.shape[axis] != C:
        raise ValueError(
            f"weight has {w.shape[axis]} output channels on axis {axis} (shape {w.shape}) "
            f"but bn has num_features={C}"
        )
    if bias is None:
        b = np.zeros(C, dtype=np.float64)
    else:
        b = np.asarray(bias)
        if b.shape != (C,):
            raise ValueError(f"bias must have shape ({C},) (got {b.shape})")
        if b.dtype.kind not in "iuf":
            raise TypeError(f"bias must be a real numeric array (got dtype {b.dtype})")
        b = b.astype(np.float64)
    assert bn.running_mean is not None and bn.running_var is not None
    mean = np.asarray(bn.running_mean, dtype=np.float64)
    var = np.asarray(bn.running_var, dtype=np.float64)
    gamma = np.ones(C) if bn.weight is None else np.asarray(bn.weight, dtype=np.float64)
    beta = np.zeros(C) if bn.bias is None else np.asarray(bn.bias, dtype=np.float64)
    scale = gamma / np.sqrt(var + eps)
    shape = [1] * w.ndim
    shape[axis] = C
    new_w = (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype)
    new_b = ((b - mean) * scale + beta).astype(w.dtype)
    return new_w, new_b
