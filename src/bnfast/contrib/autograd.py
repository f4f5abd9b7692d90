"""bnfast's normalization functions as HIPS autograd primitives.

Each function here has the signature of its `bnfast` namesake and works on
plain arrays and on autograd's traced values alike: the forward pass runs
bnfast's forward kernel on the raw arrays, and the vector-Jacobian product
(VJP) autograd records for it calls the matching bnfast backward kernel, so
``autograd.grad`` of a model using them differentiates through bnfast with
respect to the input, ``weight`` and ``bias``::

    import autograd
    import autograd.numpy as anp
    from bnfast.contrib import autograd as bna

    def loss(w, x):
        return anp.sum(anp.tanh(bna.batch_norm(x @ w, None, None, training=True)))

    autograd.grad(loss)(w, x)

Only first-order reverse mode is supported.  bnfast has no double backward:
the VJPs are not themselves differentiable, and differentiating through one
(``autograd.hessian``, ``grad`` of ``grad``, Hessian-vector products) raises
NotImplementedError.  Forward mode (``autograd.make_jvp``) is not defined
either (autograd raises NotImplementedError).  Running statistics are
constants: they are plain numpy arrays, updated in place once per forward
call in training mode and never by the backward pass.

This module needs ``autograd`` (``pip install autograd``, or
``pip install bnfast[autograd]``); ``import bnfast`` does not import it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

try:
    from autograd.extend import Box, defvjp_argnums, primitive
except ImportError as error:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "bnfast.contrib.autograd needs the autograd package: "
        "pip install autograd (or pip install bnfast[autograd])"
    ) from error

import bnfast

__all__ = ["batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm"]

#: An input: a numpy array, something array-like, or an autograd ArrayBox
#: wrapping one while autograd traces.
ArrayOrBox = Any
ShapeLike = Union[int, Sequence[int]]

_SECOND_ORDER = (
    "{name}: second-order derivatives are not supported -- bnfast has no double "
    "backward, so the gradient computed by bnfast's backward kernel cannot itself be "
    "differentiated (autograd.hessian, grad of grad, Hessian-vector products)"
)


class _Saved:
    """What a forward call keeps for its backward (the statistics).

    One is made per call of a public function and passed to its primitive as
    an ordinary (never traced) argument: the raw forward, which runs exactly
    once per call however many traces are active, fills it, and the VJP that
    autograd records for the call reads it.
    """

    __slots__ = ("stats",)

    def __init__(self) -> None:
        self.stats: Tuple[Any, ...] = ()


def _constant(name: str, **arrays: Any) -> None:
    """Running statistics are constants: refuse traced ones clearly."""
    for argument, value in arrays.items():
        if isinstance(value, Box):
            raise TypeError(
                f"{name}: {argument} is being differentiated; running statistics are "
                "constants (plain numpy arrays, updated in place) and have no gradient"
            )


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, Box) or not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")
    return bool(value)


def _check_argnums(name: str, argnums: Tuple[int, ...], names: Dict[int, str], supported: Dict[int, str]) -> None:
    for argnum in argnums:
        if argnum not in supported:
            raise NotImplementedError(
                f"{name}: no gradient with respect to {names.get(argnum, f'argument {argnum}')}; "
                f"only {', '.join(supported.values())} can be differentiated"
            )


def _first_order(name: str, *values: Any) -> None:
    """Raise if the VJP is being traced itself (a second-order derivative)."""
    if any(isinstance(v, Box) for v in values):
        raise NotImplementedError(_SECOND_ORDER.format(name=name))


def _cotangent(g: Any, y: np.ndarray) -> np.ndarray:
    """The incoming gradient in the output's dtype (bnfast's kernels need it)."""
    return np.asarray(g).astype(y.dtype, copy=False)


def _like(grad: np.ndarray, argument: Any) -> np.ndarray:
    """A gradient in the dtype and shape of the argument it belongs to (the
    vector space autograd expects)."""
    argument = np.asarray(argument)
    return np.reshape(grad.astype(argument.dtype, copy=False), argument.shape)


def _define(
    name: str,
    fun: Callable[..., np.ndarray],
    names: Dict[int, str],
    supported: Dict[int, str],
    backward: Callable[[np.ndarray, Tuple[Any, ...]], Tuple[np.ndarray, ...]],
) -> None:
    """Register one VJP for every differentiable argument of ``fun``.

    ``backward(g, args)`` returns the gradients of all of ``supported`` (in
    argument order), computed by a single bnfast backward call; autograd gets
    those of the arguments it traces.
    """
    order = sorted(supported)

    def vjp_maker(argnums: Tuple[int, ...], ans: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        _check_argnums(name, argnums, names, supported)

        def vjp(g: Any):
            _first_order(name, g, ans, *(args[i] for i in order))
            grads = dict(zip(order, backward(_cotangent(g, ans), args)))
            return tuple(_like(grads[i], args[i]) for i in argnums)

        return vjp

    defvjp_argnums(fun, vjp_maker)


# ---------------------------------------------------------------- batch norm


@primitive
def _batch_norm(x, weight, bias, running_mean, running_var, saved, training, momentum, eps, axis):
    if training:
        y, mean, invstd = bnfast.batch_norm_forward(
            x, weight, bias, running_mean, running_var, momentum=momentum, eps=eps, axis=axis
        )
    else:
        y = bnfast.batch_norm_inference(x, running_mean, running_var, weight, bias, eps=eps, axis=axis)
        mean, invstd = _frozen_stats(running_mean, running_var, eps, y.dtype)
    saved.stats = (mean, invstd)
    return y


def _frozen_stats(running_mean, running_var, eps, dtype):
    """Snapshot of the constant statistics (mean, 1/sqrt(var + eps)) in x's dtype,
    taken at forward time so that a later update of the running statistics
    does not change this call's gradient."""
    mean = np.array(running_mean, dtype=dtype)
    var = np.asarray(running_var, dtype=dtype).astype(np.float64)
    return mean, (1.0 / np.sqrt(var + float(eps))).astype(dtype)


def _batch_norm_backward(g, args):
    x, weight, _, _, _, saved, training, _, _, axis = args
    mean, invstd = saved.stats
    return bnfast.batch_norm_backward(g, x, mean, invstd, weight, training=training, axis=axis)


_define(
    "batch_norm",
    _batch_norm,
    {0: "x", 1: "weight", 2: "bias", 3: "running_mean", 4: "running_var", 7: "momentum", 8: "eps"},
    {0: "x", 1: "weight", 2: "bias"},
    _batch_norm_backward,
)


def batch_norm(
    x: ArrayOrBox,
    running_mean: Optional[np.ndarray],
    running_var: Optional[np.ndarray],
    weight: Optional[ArrayOrBox] = None,
    bias: Optional[ArrayOrBox] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
) -> ArrayOrBox:
    """Batch normalization, differentiable by autograd (see `bnfast.batch_norm`).

    In training mode the batch statistics normalize, the gradient flows
    through them, and the running statistics (when given) are updated in
    place, once per call; in evaluation mode the running statistics normalize
    and are constants.  The VJP calls `bnfast.batch_norm_backward`.

    Parameters
    ----------
    x : numpy.ndarray or autograd ArrayBox, float32 or float64, ndim >= 2
        Input; channels on ``axis``.
    running_mean, running_var : numpy.ndarray of shape (C,) or None
        Plain numpy arrays (never traced).  Required when ``training`` is
        False; updated in place when training.
    weight, bias : array of shape (C,), optional
        Affine parameters, possibly traced; ``None`` means 1 and 0 (and no
        gradient).
    training : bool, default False
        Normalize with the batch statistics (and update the running ones)
        instead of the running statistics.
    momentum : float in [0, 1], default 0.1
        Weight of the batch statistics in the running-statistics update.
    eps : float >= 0, default 1e-5
        Added to the variance before the square root.
    axis : int, default 1
        The channel axis (negative allowed): 1 for NC..., -1 for N...C.

    Returns
    -------
    numpy.ndarray or autograd ArrayBox
        The normalized input, x's shape and dtype; traced when an argument is.

    Raises
    ------
    TypeError
        For a traced running statistic, a non-boolean ``training``, and as
        `bnfast.batch_norm` (dtypes).
    ValueError
        As `bnfast.batch_norm`, and when ``training`` is False without
        running statistics.
    NotImplementedError
        When a gradient with respect to ``momentum`` or ``eps`` is asked for,
        or a second-order derivative is attempted (the VJP is not
        differentiable: bnfast has no double backward).
    """
    _constant("batch_norm", running_mean=running_mean, running_var=running_var)
    training = _flag(training, "training")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var must be given when training is False")
    return _batch_norm(x, weight, bias, running_mean, running_var, _Saved(), training, momentum, eps, axis)


# ---------------------------------------------------------------- layer norm


@primitive
def _layer_norm(x, weight, bias, normalized_shape, eps, saved):
    y, mean, invstd = bnfast.layer_norm_forward(x, normalized_shape, weight, bias, eps)
    saved.stats = (mean, invstd)
    return y


def _layer_norm_backward(g, args):
    x, weight, _, normalized_shape, _, saved = args
    mean, invstd = saved.stats
    return bnfast.layer_norm_backward(g, x, normalized_shape, mean, invstd, weight)


_define(
    "layer_norm",
    _layer_norm,
    {0: "x", 1: "weight", 2: "bias", 4: "eps"},
    {0: "x", 1: "weight", 2: "bias"},
    _layer_norm_backward,
)


def layer_norm(
    x: ArrayOrBox,
    normalized_shape: ShapeLike,
    weight: Optional[ArrayOrBox] = None,
    bias: Optional[ArrayOrBox] = None,
    eps: float = 1e-5,
) -> ArrayOrBox:
    """Layer normalization, differentiable by autograd (see `bnfast.layer_norm`).

    The VJP calls `bnfast.layer_norm_backward`.

    Parameters
    ----------
    x : numpy.ndarray or autograd ArrayBox, float32 or float64
        Input whose trailing dims are ``normalized_shape``.
    normalized_shape : int or sequence of int
        The trailing dims to normalize over.
    weight, bias : array of shape normalized_shape, optional
        Per-element affine parameters, possibly traced; ``None`` means 1 and
        0 (and no gradient).
    eps : float >= 0, default 1e-5
        Added to the variance.

    Returns
    -------
    numpy.ndarray or autograd ArrayBox
        The normalized input, x's shape and dtype.

    Raises
    ------
    TypeError, ValueError
        As `bnfast.layer_norm`.
    NotImplementedError
        For a gradient with respect to ``eps`` or a second-order derivative
        (the VJP is not differentiable: bnfast has no double backward).
    """
    return _layer_norm(x, weight, bias, normalized_shape, eps, _Saved())


# ------------------------------------------------------------------ RMS norm


@primitive
def _rms_norm(x, weight, normalized_shape, eps, saved):
    y, invstd = bnfast.rms_norm_forward(x, normalized_shape, weight, eps)
    saved.stats = (invstd,)
    return y


def _rms_norm_backward(g, args):
    x, weight, normalized_shape, _, saved = args
    (invstd,) = saved.stats
    return bnfast.rms_norm_backward(g, x, normalized_shape, invstd, weight)


_define("rms_norm", _rms_norm, {0: "x", 1: "weight", 3: "eps"}, {0: "x", 1: "weight"}, _rms_norm_backward)


def rms_norm(
    x: ArrayOrBox,
    normalized_shape: ShapeLike,
    weight: Optional[ArrayOrBox] = None,
    eps: Optional[float] = None,
) -> ArrayOrBox:
    """RMS normalization, differentiable by autograd (see `bnfast.rms_norm`).

    The VJP calls `bnfast.rms_norm_backward`.

    Parameters
    ----------
    x : numpy.ndarray or autograd ArrayBox, float32 or float64
        Input whose trailing dims are ``normalized_shape``.
    normalized_shape : int or sequence of int
        The trailing dims to normalize over.
    weight : array of shape normalized_shape, optional
        Possibly traced; ``None`` means 1 (and no gradient).
    eps : float >= 0, optional
        ``None`` means ``numpy.finfo(x.dtype).eps``.

    Returns
    -------
    numpy.ndarray or autograd ArrayBox
        The normalized input, x's shape and dtype.

    Raises
    ------
    TypeError, ValueError
        As `bnfast.rms_norm`.
    NotImplementedError
        For a gradient with respect to ``eps`` or a second-order derivative
        (the VJP is not differentiable: bnfast has no double backward).
    """
    return _rms_norm(x, weight, normalized_shape, eps, _Saved())


# ---------------------------------------------------------------- group norm


@primitive
def _group_norm(x, weight, bias, num_groups, eps, axis, saved):
    y, mean, invstd = bnfast.group_norm_forward(x, num_groups, weight, bias, eps, axis=axis)
    saved.stats = (mean, invstd)
    return y


def _group_norm_backward(g, args):
    x, weight, _, num_groups, _, axis, saved = args
    mean, invstd = saved.stats
    return bnfast.group_norm_backward(g, x, num_groups, mean, invstd, weight, axis=axis)


_define(
    "group_norm",
    _group_norm,
    {0: "x", 1: "weight", 2: "bias", 4: "eps"},
    {0: "x", 1: "weight", 2: "bias"},
    _group_norm_backward,
)


def group_norm(
    x: ArrayOrBox,
    num_groups: int,
    weight: Optional[ArrayOrBox] = None,
    bias: Optional[ArrayOrBox] = None,
    eps: float = 1e-5,
    *,
    axis: int = 1,
) -> ArrayOrBox:
    """Group normalization, differentiable by autograd (see `bnfast.group_norm`).

    The VJP calls `bnfast.group_norm_backward`.

    Parameters
    ----------
    x : numpy.ndarray or autograd ArrayBox, float32 or float64, ndim >= 2
        Input (N, C, ...) or, with ``axis=-1``, (N, ..., C).
    num_groups : int
        Divides the number of channels.
    weight, bias : array of shape (C,), optional
        Possibly traced; ``None`` means 1 and 0 (and no gradient).
    eps : float >= 0, default 1e-5
        Added to the variance.
    axis : int, default 1
        The channel axis; not 0 (the batch axis).

    Returns
    -------
    numpy.ndarray or autograd ArrayBox
        The normalized input, x's shape and dtype.

    Raises
    ------
    TypeError, ValueError
        As `bnfast.group_norm`.
    NotImplementedError
        For a gradient with respect to ``eps`` or a second-order derivative
        (the VJP is not differentiable: bnfast has no double backward).
    """
    return _group_norm(x, weight, bias, num_groups, eps, axis, _Saved())


# ------------------------------------------------------------- instance norm


@primitive
def _instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis, saved):
    if use_input_stats:
        y, mean, invstd = bnfast.instance_norm_forward(
            x, weight, bias, running_mean, running_var, momentum=momentum, eps=eps, axis=axis
        )
    else:
        y = bnfast.instance_norm(
            x, running_mean, running_var, weight, bias, use_input_stats=False, eps=eps, axis=axis
        )
        mean, invstd = _frozen_stats(running_mean, running_var, eps, y.dtype)
    saved.stats = (mean, invstd)
    return y


def _instance_norm_backward(g, args):
    x, weight, _, _, _, use_input_stats, _, _, axis, saved = args
    mean, invstd = saved.stats
    if use_input_stats:
        return bnfast.instance_norm_backward(g, x, mean, invstd, weight, axis=axis)
    return bnfast.batch_norm_backward(g, x, mean, invstd, weight, training=False, axis=axis)


_define(
    "instance_norm",
    _instance_norm,
    {0: "x", 1: "weight", 2: "bias", 3: "running_mean", 4: "running_var", 6: "momentum", 7: "eps"},
    {0: "x", 1: "weight", 2: "bias"},
    _instance_norm_backward,
)


def instance_norm(
    x: ArrayOrBox,
    running_mean: Optional[np.ndarray] = None,
    running_var: Optional[np.ndarray] = None,
    weight: Optional[ArrayOrBox] = None,
    bias: Optional[ArrayOrBox] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
) -> ArrayOrBox:
    """Instance normalization, differentiable by autograd (see `bnfast.instance_norm`).

    With ``use_input_stats`` each instance's statistics normalize, the
    gradient flows through them (`bnfast.instance_norm_backward`) and the
    running statistics, when given, are updated in place once per call;
    otherwise the running statistics normalize as constants
    (`bnfast.batch_norm_inference`, gradient by
    `bnfast.batch_norm_backward` with ``training=False``).

    Parameters
    ----------
    x : numpy.ndarray or autograd ArrayBox, float32 or float64, ndim >= 3
        Input (N, C, ...) or, with ``axis=-1``, (N, ..., C).
    running_mean, running_var : numpy.ndarray of shape (C,), optional
        Plain numpy arrays (never traced); updated in place when
        ``use_input_stats``, normalize otherwise.
    weight, bias : array of shape (C,), optional
        Possibly traced; ``None`` means 1 and 0 (and no gradient).
    use_input_stats : bool, default True
        Normalize with each instance's statistics instead of the running ones.
    momentum : float in [0, 1], default 0.1
        Weight of the new statistics in the running update.
    eps : float >= 0, default 1e-5
        Added to the variance.
    axis : int, default 1
        The channel axis; not 0 (the batch axis).

    Returns
    -------
    numpy.ndarray or autograd ArrayBox
        The normalized input, x's shape and dtype.

    Raises
    ------
    TypeError
        For a traced running statistic, a non-boolean ``use_input_stats``,
        and as `bnfast.instance_norm`.
    ValueError
        As `bnfast.instance_norm` (also when ``use_input_stats`` is False
        without running statistics).
    NotImplementedError
        For a gradient with respect to ``momentum`` or ``eps``, or a
        second-order derivative (the VJP is not differentiable: bnfast has
        no double backward).
    """
    _constant("instance_norm", running_mean=running_mean, running_var=running_var)
    use_input_stats = _flag(use_input_stats, "use_input_stats")
    if not use_input_stats and (running_mean is None or running_var is None):
        raise ValueError("Expected running_mean and running_var to be defined when use_input_stats is False")
    return _instance_norm(
        x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis, _Saved()
    )
