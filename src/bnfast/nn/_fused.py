"""The fused activation of the BatchNorm layers (``activation=``, ``inplace=``)
and of the batch-norm layers that `Sequential` and `Residual` fuse with the
activation after them: the layer's forward and backward call these helpers,
which call `bnfast.batch_norm_act_forward` / ``_inference`` / ``_backward``.

State a fused forward leaves on the layer, in ``layer.__dict__["_fused"]``:
``(activation, negative_slope, residual, y, batch_stats)``, and in
``_saved`` the usual ``(x, mean, invstd, batch_stats)`` with ``x`` None when
the backward recovers it from ``y`` (invertible activation, batch statistics).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from .._functional import _flag, _float_array, _residual, batch_norm_backward
from .._fused import (
    _activation,
    _grad_pre_activation,
    _invertible,
    batch_norm_act_backward,
    batch_norm_act_forward,
    batch_norm_act_inference,
)


def layer_activation(activation: Any, negative_slope: Any, inplace: Any) -> tuple | None:
    """The layer's (activation, slope, inplace), checked; None for plain batch norm."""
    inplace = _flag(inplace, "inplace")
    if activation is None and not inplace:
        _activation("identity", negative_slope)
        return None
    name, slope = _activation("identity" if activation is None else activation, negative_slope)
    if inplace and not _invertible(name, slope):
        raise ValueError(
            f"inplace=True needs an invertible activation (identity, elu, or leaky_relu with a positive "
            f"negative_slope), got {name!r} with negative_slope={slope}: the backward recovers the input "
            "from the output"
        )
    return name, slope, inplace


def call_activation(layer) -> tuple | None:
    """(activation, slope, residual, inplace) of the current forward, or None."""
    call = layer.__dict__.get("_call_act")
    if call is not None:
        return call
    act = layer._act
    return None if act is None else (act[0], act[1], None, act[2])


@contextlib.contextmanager
def fused_call(layer, activation: str, negative_slope: float, residual=None) -> Iterator[None]:
    """Within the block, ``layer.forward`` fuses ``activation`` (and adds ``residual``)."""
    base = layer._act  # the layer's own in-place mode carries over where it can
    inplace = base is not None and base[2] and _invertible(activation, negative_slope)
    layer.__dict__["_call_act"] = (activation, float(negative_slope), residual, inplace)
    try:
        yield
    finally:
        del layer.__dict__["_call_act"]


def _inplace_target(layer, x: np.ndarray, inplace: bool) -> np.ndarray | None:
    if inplace and type(x) is np.ndarray and x.dtype == layer.dtype and x.flags.writeable and x.dtype.isnative:
        return x
    return None


def forward_train(layer, act, x, w, b, rm, rv, momentum):
    name, slope, z, inplace = act
    out = _inplace_target(layer, x, inplace)
    y, mean, invstd = batch_norm_act_forward(
        x, w, b, rm, rv, activation=name, negative_slope=slope, residual=z, momentum=momentum,
        eps=layer.eps, axis=layer.axis, out=out,
    )
    # relu's backward reads y only through y > 0: keep the mask (1 byte an element)
    layer.__dict__["_fused"] = (name, slope, z, (y > 0) if name == "relu" else y, True)
    return y, mean, invstd


def forward_eval(layer, act, x, rm, rv, w, b):
    name, slope, z, _ = act
    y = batch_norm_act_inference(x, rm, rv, w, b, activation=name, negative_slope=slope, residual=z,
                                   eps=layer.eps, axis=layer.axis)
    layer.__dict__["_fused"] = (name, slope, z, y, False)
    return y


def saved_state(layer, saved: tuple) -> tuple:
    """``saved`` without the input where a fused backward recovers it from y."""
    fused = layer.__dict__.get("_fused")
    if fused is not None and fused[4] and _invertible(fused[0], fused[1]):
        return (None,) + saved[1:]
    return saved


def backward(layer, grad_out) -> tuple[np.ndarray, np.ndarray | None]:
    """(grad_input, grad_residual) of the last fused forward; sets the parameters' grads."""
    name, slope, z, y, batch_stats = layer.__dict__["_fused"]
    x, mean, invstd, _ = layer._saved
    if y.dtype == np.bool_:  # relu's mask: a stand-in for y with the same signs
        y = y.astype(x.dtype)
    grad_out = np.asarray(grad_out)
    if grad_out.shape != y.shape:
        raise ValueError(
            f"grad_out has shape {grad_out.shape} but the last output of forward had shape {y.shape}"
        )
    params = layer._parameters
    weight, bias = params["weight"], params["bias"]
    w = None if weight is None else np.asarray(weight)
    b = None if bias is None else np.asarray(bias)
    if batch_stats:
        gx, gw, gb, gz = batch_norm_act_backward(
            grad_out, y, mean, invstd, w, b, activation=name, negative_slope=slope, residual=z, x=x,
            axis=layer.axis,
        )
    else:  # eval mode: constant statistics
        yv = _float_array(y, "y")
        dv = _grad_pre_activation(name, slope, _residual(grad_out, yv, "grad_out", "y"), yv)
        gx, gw, gb = batch_norm_backward(dv, x, mean, invstd, w, training=False, axis=layer.axis)
        gz = dv if z is not None else None
    if weight is not None:
        weight.grad = gw
    if bias is not None:
        bias.grad = gb
    return gx, gz
