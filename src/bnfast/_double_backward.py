"""Second-order batch normalization: the vector-Jacobian product of the backward pass.

Validation goes through the one validation room (:mod:`bnfast._functional`);
the per-channel sums are accumulated in float64 and every full-size output is
written as one per-channel affine combination of the inputs.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from . import _functional as F

__all__ = ["batch_norm_double_backward"]


def _same_as_x(a, name: str, x: np.ndarray) -> np.ndarray:
    """A full-size argument (grad_out, grad_grad_input): x's shape and dtype."""
    a = F._float_array(a, name)
    if a.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {x.shape}, got {a.shape}")
    if a.dtype != x.dtype:  # both native now
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {a.dtype}")
    return a


def _outs(out, x: np.ndarray):
    """``out=`` as a pair (grad_x target, grad_grad_out target), each checked."""
    if out is None:
        return None, None
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(
            "out must be None or a tuple of two arrays or Nones (for grad_x and grad_grad_out), "
            f"got {type(out).__name__}"
        )
    F._check_out(out[0], x, "out[0]")
    F._check_out(out[1], x, "out[1]")
    if out[0] is not None and out[1] is not None and F._overlap(out[0], out[1]):
        raise ValueError("out[0] and out[1] share memory; pass separate arrays")
    return out


def _sum(a: np.ndarray, b: np.ndarray | None, spec: str) -> np.ndarray:
    """Per-channel ``sum(a)`` or ``sum(a * b)``, accumulated in float64 (no full-size temporary)."""
    if b is None:
        return np.einsum(spec, a, dtype=np.float64)
    return np.einsum(spec.replace("->", "," + spec.split("->")[0] + "->"), a, b, dtype=np.float64)


def _combine(terms, x: np.ndarray, centre: np.ndarray, slope: np.ndarray, shift: np.ndarray,
             ax: int, dest: np.ndarray | None) -> np.ndarray:
    """``sum(coef * a for coef, a in terms) + (x - centre) * slope + shift`` per channel.

    The centred affine part is one pass of the inference kernel (computed in
    float64 per element); each further term is one scaled add.  ``dest``
    (overlapping no input) receives the result, else a new array does.
    """
    dt = x.dtype
    y = F.batch_norm_inference(x, centre.astype(dt), np.ones(centre.shape, dt), slope.astype(dt),
                               shift.astype(dt), eps=0.0, axis=ax, out=dest)
    shape = [1] * x.ndim
    shape[ax] = x.shape[ax]
    scratch = None
    for coef, a in terms:
        if a is None or not np.any(coef):
            continue
        if scratch is None:
            scratch = np.empty(y.shape, dt)
        np.multiply(a, coef.astype(dt).reshape(shape), out=scratch)
        y += scratch
    return y


def _destination(target: np.ndarray | None, inputs) -> np.ndarray | None:
    """``target`` if the result can be written into it directly (it overlaps no input)."""
    if target is None or not all(a is None or not np.may_share_memory(target, a) for a in inputs):
        return None
    return target


def batch_norm_double_backward(
    grad_grad_input: ArrayLike | None,
    grad_grad_weight: ArrayLike | None,
    grad_grad_bias: ArrayLike | None,
    grad_out: ArrayLike,
    x: ArrayLike,
    save_mean: ArrayLike,
    save_invstd: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    training: bool = True,
    axis: int = 1,
    out: tuple[np.ndarray | None, np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Differentiate `batch_norm_backward` once more (double backward of batch normalization).

    `batch_norm_backward` maps ``(grad_out, x, weight)`` to ``(grad_input,
    grad_weight, grad_bias)``.  Given the gradients of a loss with respect to
    those three outputs, this function returns the gradients of the loss with
    respect to ``x``, ``grad_out`` and ``weight``: what
    ``torch.autograd.grad(..., create_graph=True)`` followed by a second
    ``backward`` computes for ``torch.nn.functional.batch_norm`` (gradient
    penalties, meta-learning, Hessian-vector products).

    Parameters
    ----------
    grad_grad_input : array_like or None
        Gradient with respect to ``grad_input``; x's shape and dtype.  None
        means zero.
    grad_grad_weight, grad_grad_bias : array_like of shape (C,) or None
        Gradients with respect to ``grad_weight`` and ``grad_bias``.  None
        means zero.
    grad_out : numpy.ndarray
        The ``grad_out`` of the first backward; x's shape and dtype.
    x : numpy.ndarray of float32 or float64, ndim >= 2
        The forward input, any strides and memory order.
    save_mean, save_invstd : array_like of shape (C,)
        From `batch_norm_forward` (training); for ``training=False`` the
        running mean and ``1 / sqrt(running_var + eps)``.
    weight : array_like of shape (C,), optional
        ``None`` means 1 (the returned ``grad_weight`` is then the gradient
        at weight 1, as `batch_norm_backward` returns ``grad_weight`` without
        a weight).
    training : bool, default True
        Whether the statistics are the batch's (functions of ``x``) or
        constants (evaluation mode).
    axis : int, default 1
        The channel axis (negative allowed): 1 for channels-first, -1 for
        channels-last.
    out : tuple of two numpy.ndarray or None, optional
        Where to write ``grad_x`` and ``grad_grad_out`` (NumPy's convention
        for several outputs; either entry may be None).  Each has x's shape
        and dtype and is writable; they may be input arrays.

    Returns
    -------
    grad_x : numpy.ndarray
        Gradient with respect to ``x``; x's shape and dtype.
    grad_grad_out : numpy.ndarray
        Gradient with respect to ``grad_out``; x's shape and dtype.
    grad_weight : numpy.ndarray of shape (C,)
        Gradient with respect to ``weight``; x's dtype.

    Raises
    ------
    TypeError
        A full-size argument is not float32/float64 or has another dtype than
        ``x``; ``out`` is not a pair; ``axis`` or ``training`` has the wrong
        type.
    ValueError
        Mismatched shapes, a bad axis, a read-only or overlapping ``out``,
        or an empty batch in training mode.  Nothing is written when an
        exception is raised.

    See Also
    --------
    batch_norm_backward : The function differentiated here.

    Notes
    -----
    Per channel, with ``n`` values, ``s = save_invstd``, ``w = weight``,
    ``xh = (x - save_mean) * s``, ``g = grad_out``, ``G = grad_grad_input``,
    ``gw, gb = grad_grad_weight, grad_grad_bias`` and ``<a> = mean(a)``, the
    first backward is ``grad_input = w s P(g)`` with
    ``P(a) = a - <a> - xh <a xh>``, ``grad_weight = sum(g xh)`` and
    ``grad_bias = sum(g)``; the loss is
    ``L = sum(G grad_input) + gw grad_weight + gb grad_bias``.

    Training: the statistics depend on ``x``: ``d<x>/dx = 1/n`` and
    ``ds/dx = -s**2 xh / n`` (``s = (var + eps)**-1/2``, eps included
    exactly), so ``d xh / dx = s P`` (``P`` is symmetric).  Then

    * ``dL/dg = w s P(G) + gw xh + gb`` (``grad_input`` is linear in ``g``
      with the symmetric operator ``w s P``);
    * ``dL/dw = s sum(G P(g)) = n s (<G g> - <G><g> - <G xh><g xh>)``;
    * ``dL/dx = gw s P(g) - w s**2 (xh (<G g> - <G><g> - <G xh><g xh>)
      + <G xh> P(g) + <g xh> P(G))``: the first term from
      ``grad_weight = sum(g xh)``, the rest from differentiating
      ``s``, ``<g xh>`` and ``sum(G xh)`` in ``sum(G grad_input)``.

    Evaluation (constants): ``dL/dg = w s G + gw xh + gb``,
    ``dL/dw = s sum(G g)`` and ``dL/dx = gw s g``.

    Expanding ``P`` turns each full-size output into one per-channel affine
    combination, ``a g + b G + (x - mean) c + d``, whose coefficients come
    from five per-channel sums (``sum g``, ``sum G``, ``sum g (x - mean)``,
    ``sum G (x - mean)``, ``sum G g``) accumulated in float64 around the
    mean; the outputs are written in the centred form, so a large mean does
    not cancel.  Passes over full-size data: the sums, then one per output
    term.  These are the formulas of PyTorch's ``batchnorm_double_backward``.

    Examples
    --------
    >>> import numpy as np
    >>> import bnfast
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 4, 4))
    >>> y, mean, invstd = bnfast.batch_norm_forward(x)
    >>> g = np.ones_like(x)
    >>> gx, ggo, gw = bnfast.batch_norm_double_backward(g, None, None, g, x, mean, invstd)
    >>> gx.shape, ggo.shape, gw.shape
    ((8, 3, 4, 4), (8, 3, 4, 4), (3,))
    """
    x = F._float_array(x, "x")
    ax = F._channel_axis(x, axis)
    grad_out = _same_as_x(grad_out, "grad_out", x)
    ggi = None if grad_grad_input is None else _same_as_x(grad_grad_input, "grad_grad_input", x)
    channels = x.shape[ax]
    save_mean = F._vector(save_mean, "save_mean", channels, x.dtype)
    save_invstd = F._vector(save_invstd, "save_invstd", channels, x.dtype)
    if save_mean is None or save_invstd is None:
        raise ValueError("save_mean and save_invstd are required")
    weight = F._vector(weight, "weight", channels, x.dtype)
    ggw = F._vector(grad_grad_weight, "grad_grad_weight", channels, x.dtype)
    ggb = F._vector(grad_grad_bias, "grad_grad_bias", channels, x.dtype)
    training = F._flag(training, "training")
    out_x, out_g = _outs(out, x)
    n = x.size // channels if channels else math.prod(x.shape[:ax] + x.shape[ax + 1:])
    if training and n == 0:
        raise ValueError(f"cannot differentiate batch statistics of an empty batch (input shape {x.shape})")

    f64 = np.float64
    zero = np.zeros(channels, f64)
    mean, s = save_mean.astype(f64), save_invstd.astype(f64)
    w = zero + 1.0 if weight is None else weight.astype(f64)
    gw = zero if ggw is None else ggw.astype(f64)
    gb = zero if ggb is None else ggb.astype(f64)
    if x.size == 0:
        zeros = np.zeros_like(x)
        gx = zeros if out_x is None else out_x
        gg = np.zeros_like(x) if out_g is None else out_g
        return gx, gg, np.zeros(channels, x.dtype)

    letters = "abcdefghijklmnopqrstuvwxyz"[: x.ndim]
    spec = letters + "->" + letters[ax]
    shape = [1] * x.ndim
    shape[ax] = channels
    # the means that appear in the formulas (float64 per channel); eval mode needs only <G g>
    Gg_mean = zero if ggi is None else _sum(ggi, grad_out, spec) / n  # <G g>
    if training:
        # x - mean once (x's dtype, like the kernels' centred form), for the centred sums
        xc = x - save_mean.reshape(shape)
        g_mean = _sum(grad_out, None, spec) / n
        gxh_mean = s * _sum(grad_out, xc, spec) / n  # <g xh>
        if ggi is not None:
            G_mean = _sum(ggi, None, spec) / n
            Gxh_mean = s * _sum(ggi, xc, spec) / n  # <G xh>
        else:
            G_mean = Gxh_mean = zero
        del xc
        cross = Gg_mean - G_mean * g_mean - Gxh_mean * gxh_mean  # <G P(g)>
        grad_weight = n * s * cross
        # dL/dx = alpha s P(g) + beta s P(G) + delta xh, expanded into a g + b G + c (x - mean) + d
        alpha = gw - w * s * Gxh_mean
        beta = -w * s * gxh_mean
        delta = -w * s * s * cross
        a, b = alpha * s, beta * s
        c = delta * s - a * s * gxh_mean - b * s * Gxh_mean
        d = -(a * g_mean + b * G_mean)
        # dL/dg = w s P(G) + gw xh + gb
        b2 = w * s
        c2 = gw * s - b2 * s * Gxh_mean
        d2 = gb - b2 * G_mean
    else:
        grad_weight = n * s * Gg_mean
        a, b, c, d = gw * s, zero, zero, zero
        b2, c2, d2 = w * s, gw * s, gb
    inputs = (x, grad_out, ggi)
    grad_x = _combine([(a, grad_out), (b, ggi)], x, mean, c, d, ax, _destination(out_x, inputs))
    grad_grad_out = _combine([(b2, ggi)], x, mean, c2, d2, ax, _destination(out_g, inputs))
    # an out= that overlaps an input is written once both results are computed
    if out_x is not None and grad_x is not out_x:
        np.copyto(out_x, grad_x)
        grad_x = out_x
    if out_g is not None and grad_grad_out is not out_g:
        np.copyto(out_g, grad_grad_out)
        grad_grad_out = out_g
    return grad_x, grad_grad_out, grad_weight.astype(x.dtype)
