"""Normalization layers on bnfast's kernels: BatchNorm (any rank) and BatchNorm1d/2d/3d,
LayerNorm, RMSNorm, GroupNorm, InstanceNorm1d/2d/3d and FilterResponseNorm2d.

The layers behave like ``torch.nn.BatchNorm1d/2d/3d`` (running statistics,
``momentum=None`` cumulative averages, ``num_batches_tracked``, eval mode,
PyTorch-compatible ``state_dict``) and are thin wrappers over the functional
API in :mod:`bnfast._functional`, which does all the batch-norm arithmetic and
all validation of the arrays.  The layers add only what is specific to a
layer: the expected input rank, the number of channels, the parameter dtype
and the state kept between ``forward`` and ``backward``.

The module-level helpers (``_positive_int``, ``_int_axis``, ``_float_dtype``,
``_check_float_input``) hold the argument checks every normalization layer
shares, with the messages users see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import numpy as np

from .._functional import Moments, batch_norm_backward, batch_norm_forward, batch_norm_inference, moments
from .._functional import _is_half
from .._normalization import (
    filter_response_norm_backward,
    filter_response_norm_forward,
    group_norm_backward,
    group_norm_forward,
    instance_norm_backward,
    instance_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)
from .._functional import _momentum
from .._parameter import Parameter
from .._variants import ghost_batch_norm_backward, ghost_batch_norm_forward
from . import _fused as _fused_layer
from .module import Module

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "FilterResponseNorm2d",
    "SyncBatchNorm",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INT64_MAX = int(np.iinfo(np.int64).max)


# ---------------------------------------------------------------------- shared checks
def _is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy integer (bools excluded)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1, else ValueError (``"num_features must be a positive int"``)."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int (got {value!r})")
    return int(value)


def _int_at_least(value: Any, name: str, least: int) -> int:
    """``value`` as an int >= ``least``, else ValueError (``"burn_in must be an int >= 0"``)."""
    if not _is_int(value) or value < least:
        raise ValueError(f"{name} must be an int >= {least} (got {value!r})")
    return int(value)


def _int_axis(axis: Any, name: str = "axis") -> int:
    """``axis`` as an int, else TypeError; its range is checked against each input."""
    if not _is_int(axis):
        raise TypeError(f"{name} must be an int (got {axis!r})")
    return int(axis)


def _float_dtype(dtype: Any) -> np.dtype:
    """``dtype`` as float32 or float64, else TypeError (``None`` is refused, not float64)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dtype is None or dt is None or dt not in _FLOAT_DTYPES:
        hint = ""
        if dt is not None and _is_half(dt):
            hint = "; a float32 BatchNorm layer takes float16/bfloat16 input and keeps float32 parameters"
        raise TypeError(f"dtype must be float32 or float64 (got {dtype!r}){hint}")
    return dt


def _check_float_input(layer: Module, x: np.ndarray, dtype: np.dtype) -> None:
    """Refuse an input of the *other* float dtype with a message saying how to convert.

    Non-float dtypes are left to the functional API, which names them.
    """
    native = x.dtype.newbyteorder("=")  # either byte order is fine
    if native != dtype and native in _FLOAT_DTYPES:
        raise TypeError(
            f"{type(layer).__name__} has {dtype} parameters but the input is {x.dtype}; "
            f"convert the input with x.astype(np.{dtype}) or create the layer with "
            f"dtype=np.{x.dtype}"
        )


def _check_batch_count(value: np.ndarray, where: str) -> None:
    """``num_batches_tracked`` is a count: an integer in [0, 2**63 - 1]."""
    if value.dtype.kind not in "iu":
        raise TypeError(f"{where} must be an integer array (got dtype {value.dtype})")
    if value.size and not (0 <= int(value.min()) and int(value.max()) <= _INT64_MAX):
        raise ValueError(f"{where} must be in [0, 2**63 - 1] (got {value!r})")


def _plain(p: Parameter | None) -> np.ndarray | None:
    """The plain-ndarray view of a parameter (what the compiled fast path takes), or None."""
    if p is None:
        return None
    plain = p._plain  # cached by Parameter(); None for Parameters NumPy made (views, copies)
    return plain if plain is not None else p.data


class _MomentSink:
    """Moments merged over the inputs a BatchNorm saw in collect mode, and how many."""

    __slots__ = ("moments", "calls")

    def __init__(self, num_features: int) -> None:
        self.moments = Moments.zeros(num_features)
        self.calls = 0


# ---------------------------------------------------------------------- BatchNorm
class BatchNorm(Module):
    """Batch normalization over the channel axis of an input of any rank >= 2.

    In training mode the layer normalizes with the statistics of the current
    batch (mean and biased variance over every axis but ``axis``) and, when
    ``track_running_stats`` is true, updates the running statistics in place
    like PyTorch::

        running_mean = (1 - m) * running_mean + m * mean
        running_var  = (1 - m) * running_var  + m * var * n / (n - 1)

    with ``m = momentum``, or ``m = 1 / num_batches_tracked`` (a cumulative
    average) when ``momentum`` is None.  In eval mode it normalizes with the
    running statistics; a layer that does not track running statistics always
    uses batch statistics.  ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    :class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d` are this
    layer with PyTorch's input-rank checks.  All are :class:`~bnfast.nn.Module`
    subclasses: ``parameters()``, ``state_dict()``, ``train()``/``eval()``,
    ``save``/``load`` and the rest come from there.

    Parameters
    ----------
    num_features : int
        Number of channels C, the length of ``x.shape[axis]``.
    eps : float, default 1e-5
        Added to the variance for numerical stability (must be >= 0).
    momentum : float, callable or None, default 0.1
        Weight of the new batch in the running statistics, in [0, 1]; None
        selects the cumulative moving average (factor ``1/num_batches_tracked``);
        a callable is a schedule: ``momentum(step)`` gives the factor of the
        ``step``-th training batch (``num_batches_tracked`` after it, 1 on the
        first), so ``lambda step: 1 / step`` is the cumulative average.
    affine : bool, default True
        Learn a per-channel scale ``weight`` (initially 1) and shift ``bias``
        (initially 0).
    track_running_stats : bool, default True
        Keep ``running_mean`` (initially 0), ``running_var`` (initially 1) and
        ``num_batches_tracked`` (initially 0).  When false these are None and
        batch statistics are used in training and eval mode alike.
    axis : int, default 1
        The channel axis of the input; negative values count from the end.
        ``1`` is channels-first (NC, NCL, NCHW, NCDHW), ``-1`` channels-last
        (NLC, NHWC, NDHWC).
    dtype : numpy dtype, default numpy.float32
        Dtype of the parameters and buffers, float32 or float64.  Inputs must
        have this dtype: an input of the other float dtype raises TypeError
        (convert it with ``x.astype(layer.dtype)``; no silent conversion).
        A float32 layer also takes float16 and ``ml_dtypes.bfloat16`` input
        (output and ``backward``'s gradient in the input's dtype; parameters,
        running statistics and their gradients stay float32, as PyTorch's
        CPU batch norm keeps them).
    bias : bool, default True
        Keyword-only, as in recent PyTorch (2.13): with ``affine=True`` and
        ``bias=False`` the layer learns only ``weight`` (``bias`` is None and
        absent from the state dict).
    virtual_batch_size : int or None, default None
        Keyword-only.  Ghost batch normalization (Hoffer et al. 2017): in
        training, each consecutive chunk of this many samples is normalized
        by its own statistics (forward and backward per chunk), and the
        running statistics are updated once per call with the mean over the
        chunks of their means and of their unbiased variances -- Keras'
        rule (one update from the averaged chunk statistics; Keras forms its
        chunks by a reshape to ``(virtual_batch_size, -1, ...)``, bnfast of
        consecutive samples, as Hoffer et al.).  Equal to the batch size it is
        exactly batch normalization.  A batch size that is not a multiple
        raises ValueError (state untouched).  Eval mode with running
        statistics is unaffected.
    activation : {None, "relu", "leaky_relu", "elu", "identity"}, default None
        Keyword-only: an activation fused into the layer,
        ``y = act(BN(x))`` in one pass (`bnfast.batch_norm_act_forward`);
        None is plain batch norm.  With an invertible activation (identity,
        elu, leaky_relu with a positive slope) the layer keeps only its
        output for ``backward`` (the input is not referenced).
    negative_slope : float, default 0.01
        Keyword-only: leaky_relu's slope for negative inputs.
    inplace : bool, default False
        Keyword-only: in-place activated batch norm (InPlace-ABN): a
        training-mode forward writes ``y`` over its input (when the input is
        a writable array of the layer's dtype) and ``backward`` recovers the
        normalized input from ``y`` (`bnfast.batch_norm_act_backward`, whose
        rule for tiny weights applies).  Needs an invertible activation (or
        None).  Eval-mode forwards are not in place.

    Attributes
    ----------
    weight, bias : Parameter or None
        Registered parameters, shape (C,); None when ``affine`` is false
        (``bias`` also when ``bias=False``).  Optimizers update them in place;
        assigning an array copies it into them.
    grad_weight, grad_bias : numpy.ndarray or None
        ``weight.grad`` and ``bias.grad``: gradients from the last :meth:`backward`.
    running_mean, running_var : numpy.ndarray or None
        Buffers, shape (C,); None when not tracking.  Assigning copies in place.
    num_batches_tracked : numpy.ndarray or None
        0-d int64 buffer counting training batches; None when not tracking.
    training : bool
        Training mode (True after construction).
    eps : float
    momentum : float, callable or None
        May be changed between calls, like PyTorch's attributes.
    virtual_batch_size : int or None
        Ghost batch size; may be changed between calls.

    Raises
    ------
    ValueError
        ``num_features`` is not a positive int.
    TypeError
        ``axis`` is not an int, or ``dtype`` is not float32/float64.

    Notes
    -----
    Differences from PyTorch: a training ``forward`` that fails (for example
    with one value per channel) leaves ``num_batches_tracked`` and the running
    statistics untouched, where PyTorch has already incremented the counter;
    :meth:`backward` *replaces* ``Parameter.grad`` instead of accumulating;
    :meth:`state_dict` returns copies, not views.  As in PyTorch, a state dict
    without version metadata (old checkpoints, ``{k: v.numpy() ...}``
    comprehensions, ``.npz`` files) that lacks ``num_batches_tracked`` loads
    it as 0; one with ``_metadata`` version >= 2 (from :meth:`state_dict` or
    ``torch_bn.state_dict()``) must have it.

    ``forward`` keeps a reference to its input (no copy) for :meth:`backward`:
    do not modify the input in place between the two calls.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bn = bnfast.BatchNorm(3, axis=-1)          # channels-last, any rank
    >>> x = np.random.default_rng(0).standard_normal((8, 5, 3)).astype(np.float32)
    >>> y = bn(x)
    >>> gx = bn.backward(np.ones_like(y))
    >>> bn.grad_bias
    array([40., 40., 40.], dtype=float32)
    >>> list(bn.state_dict())
    ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    """

    # PyTorch's _NormBase version: 2 since num_batches_tracked exists.
    _version = 2
    # Set (on the instance) only inside _collecting_moments().
    _moment_sink: _MomentSink | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        axis: int = 1,
        dtype: Any = np.float32,
        bias: bool = True,
        virtual_batch_size: int | None = None,
        activation: str | None = None,
        negative_slope: float = 0.01,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        C = _positive_int(num_features, "num_features")
        self._act = _fused_layer.layer_activation(activation, negative_slope, inplace)
        self._num_features = C
        self.virtual_batch_size = None if virtual_batch_size is None else _positive_int(
            virtual_batch_size, "virtual_batch_size")
        if self.virtual_batch_size is not None and self._act is not None:
            raise ValueError("virtual_batch_size cannot be combined with a fused activation or inplace=True "
                             "(ghost batches are normalized chunk by chunk); put the activation in a layer "
                             "of its own")
        self._axis = _int_axis(axis)
        self._dtype = dt = _float_dtype(dtype)
        self._affine = bool(affine)
        self._track_running_stats = bool(track_running_stats)
        self.eps = eps
        self.momentum = momentum
        if self._affine:
            self.weight = Parameter(np.ones(C, dtype=dt), "weight")
            self.register_parameter("bias", Parameter(np.zeros(C, dtype=dt), "bias") if bias else None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self._track_running_stats:
            self.register_buffer("running_mean", np.zeros(C, dtype=dt))
            self.register_buffer("running_var", np.ones(C, dtype=dt))
            self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        # (x, mean, invstd, statistics_from_batch) of the last forward.
        self._saved: tuple[np.ndarray, np.ndarray, np.ndarray, bool] | None = None

    # ------------------------------------------------------------------ attributes
    @property
    def num_features(self) -> int:
        """Number of channels C."""
        return self._num_features

    @property
    def axis(self) -> int:
        """Channel axis of the input (as given; may be negative)."""
        return self._axis

    @property
    def dtype(self) -> np.dtype:
        """Dtype of parameters, buffers, inputs and outputs."""
        return self._dtype

    @property
    def affine(self) -> bool:
        """Whether the layer was built with ``weight`` and ``bias``."""
        return self._affine

    @property
    def track_running_stats(self) -> bool:
        """Whether the layer keeps running statistics."""
        return self._track_running_stats

    @property
    def grad_weight(self) -> np.ndarray | None:
        """``weight.grad``: gradient of the loss w.r.t. ``weight`` from the last backward, or None."""
        w = self._parameters["weight"]
        return None if w is None else w.grad

    @property
    def grad_bias(self) -> np.ndarray | None:
        """``bias.grad``: gradient of the loss w.r.t. ``bias`` from the last backward, or None."""
        b = self._parameters["bias"]
        return None if b is None else b.grad

    def _absent_state_message(self, name: str) -> str:
        why = {
            "weight": "affine=False",
            "bias": "affine=False or bias=False",
            "running_mean": "track_running_stats=False",
            "running_var": "track_running_stats=False",
            "num_batches_tracked": "track_running_stats=False",
        }.get(name)
        if why is None:
            return super()._absent_state_message(name)
        return f"{type(self).__name__} with {why} has no {name}"

    def _check_state_value(self, name: str, value: np.ndarray) -> None:
        if name == "num_batches_tracked":
            _check_batch_count(value, "num_batches_tracked")

    def _load_from_state_dict(self, state_dict: MutableMapping[str, Any], prefix: str,
                              local_metadata: Mapping[str, Any], strict: bool, missing_keys: list[str],
                              unexpected_keys: list[str], error_msgs: list[str],
                              assignments: list[tuple[np.ndarray, np.ndarray]]) -> None:
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self._buffers["num_batches_tracked"] is not None:
            # Checkpoints from before num_batches_tracked existed (no version
            # metadata, or version 1) count as 0 batches, as in PyTorch.
            if key not in state_dict:
                state_dict[key] = np.zeros((), dtype=np.int64)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs, assignments)

    # ------------------------------------------------------------------ compute
    def _factor(self) -> tuple[float, int | None]:
        """The running-statistics factor of the next training batch and the count it makes.

        ``momentum`` None: ``1 / count`` (cumulative average); a callable: its
        value at ``count`` (the step count, 1 on the first training batch);
        else ``momentum``.  Raises (state untouched) for a bad counter or a
        schedule value outside [0, 1].
        """
        nbt = self._buffers["num_batches_tracked"]
        momentum = self.momentum
        if nbt is None:  # no counter: PyTorch's factor
            return (0.0 if momentum is None else momentum), None
        count = int(nbt) + 1
        if count < 1:
            raise ValueError(
                f"num_batches_tracked must be >= 0 (got {count - 1}); reset it with reset_running_stats()"
            )
        if momentum is None:
            return 1.0 / count, count
        if callable(momentum):
            value = momentum(count)
            try:
                return _momentum(value), count
            except (TypeError, ValueError) as e:
                raise type(e)(f"the momentum schedule returned {value!r} at step {count}: {e}") from None
        return momentum, count

    def _ghost_forward(self, x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None,
                       rm: np.ndarray | None, rv: np.ndarray | None, factor: float,
                       count: int | None) -> np.ndarray:
        """Training forward over ghost batches of ``virtual_batch_size`` samples (Hoffer et al. 2017)."""
        y, mean, invstd = ghost_batch_norm_forward(x, self.virtual_batch_size, w, b, rm, rv, momentum=factor,
                                                   eps=self.eps, axis=self._axis)
        nbt = self._buffers["num_batches_tracked"]
        if count is not None and nbt is not None:
            nbt[...] = count
        self.__dict__["_saved"] = (x, mean, invstd, True)
        return y

    def _check_rank(self, ndim: int) -> None:
        """Layer-specific rank check; the any-rank layer leaves it to the functional API."""

    def _check_input(self, x: Any) -> np.ndarray:
        """``x`` as an array of the layer's rank, dtype and channel count (else TypeError/ValueError)."""
        x = np.asarray(x)
        self._check_rank(x.ndim)
        if x.dtype is not self._dtype:  # (the common case skips the call)
            _check_float_input(self, x, self._dtype)
            if _is_half(x.dtype) and self._dtype != np.float32:
                raise TypeError(
                    f"{type(self).__name__} has {self._dtype} parameters but the input is {x.dtype}; "
                    f"half-precision input needs a float32 layer (its parameters and running "
                    f"statistics stay float32, as in PyTorch), or convert the input with "
                    f"x.astype(np.{self._dtype})"
                )
        ax = self._axis
        if x.ndim >= 2 and -x.ndim <= ax < x.ndim and x.shape[ax] != self._num_features:
            raise ValueError(
                f"expected {self._num_features} channels on axis {ax} of the input "
                f"(got input of shape {x.shape} with {x.shape[ax]} channels)"
            )
        return x

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalize ``x`` and remember what :meth:`backward` needs.

        Training mode (or a layer without running statistics): batch
        statistics, and in training mode with tracking the running statistics
        and ``num_batches_tracked`` are updated.  Eval mode with tracking: the
        running statistics, which ``backward`` then treats as constants.

        Parameters
        ----------
        x : numpy.ndarray
            Input of the layer's dtype with ``num_features`` channels on
            ``axis``.  A reference (no copy) is kept for ``backward``.

        Returns
        -------
        numpy.ndarray
            Normalized output, same shape and dtype as ``x``.

        Raises
        ------
        TypeError
            Input of the other float dtype, or a non-float dtype.
        ValueError
            Wrong rank or channel count, or anything the functional API
            rejects (for example one value per channel in training).
        """
        if self._moment_sink is not None:
            return self._collect(x, self._moment_sink)
        x = self._check_input(x)
        params, buffers = self._parameters, self._buffers
        # Plain views of the parameters: the compiled fast path takes exact ndarrays only.
        w, b = _plain(params["weight"]), _plain(params["bias"])
        rm, rv = buffers["running_mean"], buffers["running_var"]
        if rm is None or rv is None or self.training:
            nbt = buffers["num_batches_tracked"]
            if self.training and rm is not None and rv is not None and self._track_running_stats:
                factor, count = self._factor()
                if self.virtual_batch_size is not None:
                    return self._ghost_forward(x, w, b, rm, rv, factor, count)
                y, mean, invstd = self._forward_train(x, w, b, rm, rv, factor)
                if nbt is not None:
                    nbt[...] = count  # only after a successful update
            elif self.virtual_batch_size is not None:
                return self._ghost_forward(x, w, b, None, None, 0.0, None)
            else:
                y, mean, invstd = self._forward_train(x, w, b, None, None, 0.1)
            saved = (x, mean, invstd, True)
        else:
            y = self._forward_eval(x, rm, rv, w, b)
            # Snapshot of the statistics actually used: constants for backward.
            mean = rm.copy()
            with np.errstate(divide="ignore", invalid="ignore"):
                invstd = (1.0 / np.sqrt(rv.astype(np.float64) + self.eps)).astype(self._dtype)
            saved = (x, mean, invstd, False)
        self.__dict__["_saved"] = _fused_layer.saved_state(self, saved)  # skips Module.__setattr__
        return y

    def _forward_train(self, x, w, b, rm, rv, momentum):
        """Training-mode batch norm, fused with the call's activation (bnfast.nn._fused)."""
        act = _fused_layer.call_activation(self)
        if act is None:
            self.__dict__["_fused"] = None
            return batch_norm_forward(x, w, b, rm, rv, momentum=momentum, eps=self.eps, axis=self._axis)
        return _fused_layer.forward_train(self, act, x, w, b, rm, rv, momentum)

    def _forward_eval(self, x, rm, rv, w, b):
        act = _fused_layer.call_activation(self)
        if act is None:
            self.__dict__["_fused"] = None
            return batch_norm_inference(x, rm, rv, w, b, eps=self.eps, axis=self._axis)
        return _fused_layer.forward_eval(self, act, x, rm, rv, w, b)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Gradient of the loss w.r.t. the input of the last :meth:`forward`.

        After a training-mode forward (or any forward of a layer without
        running statistics) this is the full batch-norm gradient through the
        batch statistics; after an eval-mode forward the running statistics
        are constants (frozen BN): ``grad_input = grad_out * weight * invstd``.
        ``weight.grad`` and ``bias.grad`` are set (replaced, not accumulated)
        to ``sum(grad_out * x_hat)`` and ``sum(grad_out)``.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient w.r.t. the output, same shape (and dtype) as the last input.

        Returns
        -------
        numpy.ndarray
            Gradient w.r.t. the input.

        Raises
        ------
        RuntimeError
            No forward has been run yet.
        ValueError
            ``grad_out`` shape differs from the last input's shape.
        TypeError
            ``grad_out`` has another dtype than the input.
        """
        if self._saved is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() called before forward(): "
                "run forward (or __call__) first"
            )
        if self.__dict__.get("_fused") is not None:
            return _fused_layer.backward(self, grad_out)[0]
        x, mean, invstd, batch_stats = self._saved
        grad_out = np.asarray(grad_out)
        if grad_out.shape != x.shape:
            raise ValueError(
                f"grad_out has shape {grad_out.shape} but the last input to forward had "
                f"shape {x.shape}"
            )
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        if batch_stats and mean.ndim == 2:  # ghost batches: statistics per (chunk, channel)
            gx, gw, gb = ghost_batch_norm_backward(grad_out, x, mean, invstd, _plain(weight), axis=self._axis)
        else:
            gx, gw, gb = batch_norm_backward(
                grad_out, x, mean, invstd, _plain(weight), training=batch_stats, axis=self._axis
            )
        if weight is not None:
            weight.grad = gw
        if bias is not None:
            bias.grad = gb
        return gx

    # ------------------------------------------------------------------ collect mode (recalibrate)
    @contextlib.contextmanager
    def _collecting_moments(self) -> Iterator[_MomentSink]:
        """Within the block, ``forward`` only gathers the moments of its inputs.

        Each call validates its input like :meth:`forward`, merges the
        input's per-channel moments into the yielded sink (``sink.moments``,
        ``sink.calls``) and returns the input normalized with its *batch*
        statistics and the layer's weight and bias, whatever ``training`` is
        -- without touching any state (running statistics, counter, the
        values saved for ``backward``).  The mode is left when the block
        exits, normally or by an exception.  Used by
        :func:`bnfast.recalibrate`.

        Yields
        ------
        _MomentSink

        Raises
        ------
        RuntimeError
            The layer is already collecting.
        """
        if self.__dict__.get("_moment_sink") is not None:
            raise RuntimeError(f"{self!r} is already collecting moments")
        sink = _MomentSink(self._num_features)
        self.__dict__["_moment_sink"] = sink
        try:
            yield sink
        finally:
            del self.__dict__["_moment_sink"]

    def _collect(self, x: Any, sink: _MomentSink) -> np.ndarray:
        x = self._check_input(x)
        m = moments(x, axis=self._axis)
        params = self._parameters
        y, _, _ = batch_norm_forward(x, _plain(params["weight"]), _plain(params["bias"]), eps=self.eps,
                                     axis=self._axis)
        sink.moments = sink.moments.merge(m)
        sink.calls += 1
        return y

    # ------------------------------------------------------------------ state
    def reset_running_stats(self) -> None:
        """Set running_mean to 0, running_var to 1 and num_batches_tracked to 0 (in place)."""
        for name, value in (("running_mean", 0), ("running_var", 1), ("num_batches_tracked", 0)):
            buf = self._buffers[name]
            if buf is not None:
                buf.fill(value)

    def reset_parameters(self) -> None:
        """Reset running statistics, weight to 1 and bias to 0 (in place); clear gradients."""
        self.reset_running_stats()
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        if weight is not None:
            weight.fill(1)
        if bias is not None:
            bias.fill(0)
        self.zero_grad()

    # ------------------------------------------------------------------ repr
    def extra_repr(self) -> str:
        """The argument part of the repr (PyTorch 2.13's, plus non-default axis/dtype).

        Returns
        -------
        str
            The constructor arguments as ``torch.nn.BatchNorm2d`` prints them,
            then ``axis`` and ``dtype`` when they are not the defaults.
        """
        s = (
            f"{self._num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self._affine}, bias={self._parameters['bias'] is not None}, "
            f"track_running_stats={self._track_running_stats}"
        )
        if self._axis != 1:
            s += f", axis={self._axis}"
        if self._dtype != np.float32:
            s += f", dtype={self._dtype}"
        if self.virtual_batch_size is not None:
            s += f", virtual_batch_size={self.virtual_batch_size}"
        return s


# The parameters of BatchNorm1d/2d/3d, documented once (BatchNorm has them in full).
_RANKED_BATCH_NORM_PARAMETERS = """    :class:`BatchNorm` describes the parameters in full.

    Parameters
    ----------
    num_features : int
        Number of channels C, the length of ``x.shape[axis]``.
    eps : float, default 1e-5
        Added to the variance for numerical stability (must be >= 0).
    momentum : float, callable or None, default 0.1
        Weight of the new batch in the running statistics, in [0, 1]; None
        selects the cumulative moving average, a callable of the step count
        a schedule.
    affine : bool, default True
        Learn a per-channel scale ``weight`` and shift ``bias``.
    track_running_stats : bool, default True
        Keep running statistics (used in eval mode).
    axis : int, default 1
        The channel axis of the input (keyword only); ``-1`` for channels-last.
    dtype : numpy dtype, default numpy.float32
        Dtype of the parameters, buffers and inputs, float32 or float64
        (keyword only); a float32 layer also takes float16 and bfloat16 input.
    bias : bool, default True
        With ``affine=True``, whether the layer learns ``bias`` (keyword only).
    virtual_batch_size : int or None, default None
        Ghost batch size (keyword only): statistics per consecutive chunk of
        this many samples in training.
    activation : str or None, default None
        A fused activation (keyword only): "relu", "leaky_relu", "elu" or
        "identity"; see :class:`BatchNorm`.
    negative_slope : float, default 0.01
        The slope of leaky_relu (keyword only).
    inplace : bool, default False
        In-place activated batch norm (keyword only); see :class:`BatchNorm`.
"""


class BatchNorm1d(BatchNorm):
    __doc__ = f"""Batch normalization of 2-D (N, C) or 3-D (N, C, L) input, like ``torch.nn.BatchNorm1d``.

    With ``axis=-1`` the input is channels-last, (N, C) or (N, L, C).

{_RANKED_BATCH_NORM_PARAMETERS}
    Raises
    ------
    ValueError
        On input that is not 2-D or 3-D: ``"expected 2D or 3D input (got 4D input)"``.
    """

    def _check_rank(self, ndim: int) -> None:
        if ndim not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {ndim}D input)")


class BatchNorm2d(BatchNorm):
    __doc__ = f"""Batch normalization of 4-D (N, C, H, W) input, like ``torch.nn.BatchNorm2d``.

    With ``axis=-1`` the input is channels-last, (N, H, W, C).

{_RANKED_BATCH_NORM_PARAMETERS}
    Raises
    ------
    ValueError
        On input that is not 4-D: ``"expected 4D input (got 3D input)"``.
    """

    def _check_rank(self, ndim: int) -> None:
        if ndim != 4:
            raise ValueError(f"expected 4D input (got {ndim}D input)")


class BatchNorm3d(BatchNorm):
    __doc__ = f"""Batch normalization of 5-D (N, C, D, H, W) input, like ``torch.nn.BatchNorm3d``.

    With ``axis=-1`` the input is channels-last, (N, D, H, W, C).

{_RANKED_BATCH_NORM_PARAMETERS}
    Raises
    ------
    ValueError
        On input that is not 5-D: ``"expected 5D input (got 4D input)"``.
    """

    def _check_rank(self, ndim: int) -> None:
        if ndim != 5:
            raise ValueError(f"expected 5D input (got {ndim}D input)")


# ------------------------------------------------------------ the family's layers
def _normalized_shape_of(normalized_shape: Any) -> tuple[int, ...]:
    """``normalized_shape`` (an int or a sequence of ints >= 1) as a tuple."""
    if _is_int(normalized_shape):
        shape = (int(normalized_shape),)
    else:
        try:
            shape = tuple(normalized_shape)
        except TypeError:
            raise TypeError(f"normalized_shape must be an int or a sequence of ints (got {normalized_shape!r})") from None
        if not all(_is_int(n) for n in shape):
            raise TypeError(f"normalized_shape must be an int or a sequence of ints (got {normalized_shape!r})")
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"normalized_shape must be one or more positive ints (got {normalized_shape!r})")
    return tuple(int(n) for n in shape)


def _no_forward(layer: Module) -> RuntimeError:
    return RuntimeError(f"{type(layer).__name__}.backward() called before forward(): run forward (or __call__) first")


def _check_grad(grad_out: Any, x: np.ndarray) -> np.ndarray:
    grad_out = np.asarray(grad_out)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out has shape {grad_out.shape} but the last input to forward had shape {x.shape}")
    return grad_out


def _set_grads(layer: Module, **grads: np.ndarray) -> None:
    """Store each gradient on its parameter (replaced, not accumulated), where the parameter exists."""
    for name, grad in grads.items():
        p = layer._parameters.get(name)
        if p is not None:
            p.grad = grad.reshape(p.shape).astype(p.dtype, copy=False)


class _FamilyNorm(Module):
    """The family's layers: ``forward`` keeps ``_saved`` = (input, what its
    gradient needs...) and ``_gradients`` turns them into the input's
    gradient and the parameters'; one ``backward`` serves them all."""

    _saved: tuple | None = None
    _unbatched = False  # the last input was one sample, given without its batch axis

    def _gradients(self, grad_out: np.ndarray, x: np.ndarray, *saved: Any) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Gradient w.r.t. the input of the last :meth:`forward`; sets the parameters' ``grad``.

        The gradients of ``weight``, ``bias`` (and ``tau``, ``eps`` where the
        layer has them) replace their ``.grad``.  After an eval-mode forward
        that normalized with running statistics, those are constants.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient w.r.t. the output, the last input's shape and dtype.

        Returns
        -------
        numpy.ndarray
            Gradient w.r.t. the input.

        Raises
        ------
        RuntimeError
            No forward has been run yet.
        ValueError, TypeError
            ``grad_out`` of another shape or dtype.
        """
        if self._saved is None:
            raise _no_forward(self)
        x, *saved = self._saved
        grad_out = np.asarray(grad_out)
        if self._unbatched and grad_out.ndim == x.ndim - 1:
            grad_out = grad_out[None]
        grad_in, grads = self._gradients(_check_grad(grad_out, x), x, *saved)
        _set_grads(self, **grads)
        return grad_in[0] if self._unbatched else grad_in


class LayerNorm(_FamilyNorm):
    """Layer normalization over the trailing ``normalized_shape`` dims (``torch.nn.LayerNorm``).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, the statistics per
    row of the trailing dims (Ba et al. 2016), computed by
    :func:`bnfast.layer_norm_forward`.

    Parameters
    ----------
    normalized_shape : int or sequence of int
        The trailing dims of the input to normalize over.
    eps : float, default 1e-5
        Added to the variance.
    elementwise_affine : bool, default True
        Whether the layer has ``weight`` (ones) and ``bias`` (zeros) of shape
        ``normalized_shape``.
    bias : bool, default True
        With ``elementwise_affine``, whether it has ``bias``.
    dtype : float32 or float64, default float32
        Dtype of the parameters and of the inputs.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> ln = bnfast.LayerNorm(4)
    >>> ln(np.arange(8, dtype=np.float32).reshape(2, 4)).round(3)
    array([[-1.342, -0.447,  0.447,  1.342],
           [-1.342, -0.447,  0.447,  1.342]], dtype=float32)
    >>> list(ln.state_dict())
    ['weight', 'bias']
    """

    _rms = False

    def __init__(self, normalized_shape: Any, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, dtype: Any = np.float32) -> None:
        super().__init__()
        self.normalized_shape = _normalized_shape_of(normalized_shape)
        self.eps = eps
        self.elementwise_affine = bool(elementwise_affine)
        self._bias = bool(bias) and self.elementwise_affine and not self._rms
        self._dtype = dt = _float_dtype(dtype)
        shape = self.normalized_shape
        if self.elementwise_affine:
            self.weight = Parameter(np.ones(shape, dtype=dt), "weight")
            self.register_parameter("bias", Parameter(np.zeros(shape, dtype=dt), "bias") if self._bias else None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @property
    def dtype(self) -> np.dtype:
        """Dtype of parameters, inputs and outputs."""
        return self._dtype

    def reset_parameters(self) -> None:
        """Weight to ones and bias to zeros (in place)."""
        _reset_affine(self)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalize ``x`` and remember what :meth:`backward` needs.

        Parameters
        ----------
        x : numpy.ndarray
            Input of the layer's dtype whose trailing dims are ``normalized_shape``.

        Returns
        -------
        numpy.ndarray
            The normalized input, x's shape and dtype.

        Raises
        ------
        TypeError
            Input of another dtype.
        ValueError
            Trailing dims that are not ``normalized_shape``, or a bad eps.
        """
        x = np.asarray(x)
        _check_float_input(self, x, self._dtype)
        w, b = _plain(self._parameters["weight"]), _plain(self._parameters.get("bias"))
        if self._rms:
            y, invstd = rms_norm_forward(x, self.normalized_shape, w, self.eps)
            self._saved = (x, None, invstd)
        else:
            y, mean, invstd = layer_norm_forward(x, self.normalized_shape, w, b, self.eps)
            self._saved = (x, mean, invstd)
        return y

    def _gradients(self, grad_out: np.ndarray, x: np.ndarray, mean: Any, invstd: np.ndarray):
        w = _plain(self._parameters["weight"])
        if self._rms:
            gx, gw = rms_norm_backward(grad_out, x, self.normalized_shape, invstd, w)
            return gx, {"weight": gw}
        gx, gw, gb = layer_norm_backward(grad_out, x, self.normalized_shape, mean, invstd, w)
        return gx, {"weight": gw, "bias": gb}

    def extra_repr(self) -> str:
        """The argument part of the repr, as PyTorch's.

        Returns
        -------
        str
            The constructor arguments: ``normalized_shape``, ``eps`` and
            ``elementwise_affine``, then ``bias`` (not for :class:`RMSNorm`).
        """
        text = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        return text if self._rms else f"{text}, bias={self._bias}"


class RMSNorm(LayerNorm):
    """Root-mean-square normalization over the trailing dims (``torch.nn.RMSNorm``).

    ``y = x / sqrt(mean(x**2) + eps) * weight`` per row of the trailing
    ``normalized_shape`` dims (Zhang & Sennrich 2019), computed by
    :func:`bnfast.rms_norm_forward`.

    Parameters
    ----------
    normalized_shape : int or sequence of int
        The trailing dims of the input to normalize over.
    eps : float, optional
        Added to the mean square; ``None`` means ``numpy.finfo(dtype).eps``.
    elementwise_affine : bool, default True
        Whether the layer has ``weight`` (ones) of shape ``normalized_shape``.
    dtype : float32 or float64, default float32
        Dtype of the parameters and of the inputs.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> bnfast.RMSNorm(2, eps=0.0, dtype=np.float64)(np.array([[3.0, 4.0]]))
    array([[0.84852814, 1.13137085]])
    """

    _rms = True

    def __init__(self, normalized_shape: Any, eps: float | None = None, elementwise_affine: bool = True,
                 *, dtype: Any = np.float32) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, False, dtype=dtype)  # type: ignore[arg-type]


class GroupNorm(_FamilyNorm):
    """Group normalization (``torch.nn.GroupNorm``).

    The channels are split into ``num_groups`` groups; each sample and group
    is normalized by its own mean and variance, then scaled and shifted per
    channel (Wu & He 2018), by :func:`bnfast.group_norm_forward`.

    Parameters
    ----------
    num_groups : int
        Number of groups; divides ``num_channels``.
    num_channels : int
        Number of channels C.
    eps : float, default 1e-5
        Added to the variance.
    affine : bool, default True
        Whether the layer has per-channel ``weight`` (ones) and ``bias`` (zeros).
    axis : int, default 1
        The channel axis of the input (-1 for channels-last); axis 0 is the batch.
    dtype : float32 or float64, default float32
        Dtype of the parameters and of the inputs.
    bias : bool, default True
        With ``affine``, whether the layer has ``bias`` (PyTorch's keyword).

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> gn = bnfast.GroupNorm(2, 4)
    >>> gn(np.arange(8, dtype=np.float32).reshape(1, 4, 2)).round(3)[0, :, 0]
    array([-1.342,  0.447, -1.342,  0.447], dtype=float32)
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 axis: int = 1, dtype: Any = np.float32, bias: bool = True) -> None:
        super().__init__()
        self.num_groups = _positive_int(num_groups, "num_groups")
        self.num_channels = _positive_int(num_channels, "num_channels")
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.eps = eps
        self.affine = bool(affine)
        self._axis = _int_axis(axis)
        self._dtype = dt = _float_dtype(dtype)
        self._bias = bool(bias) and self.affine
        if self.affine:
            self.weight = Parameter(np.ones(self.num_channels, dtype=dt), "weight")
            self.register_parameter("bias", Parameter(np.zeros(self.num_channels, dtype=dt), "bias") if bias else None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @property
    def axis(self) -> int:
        """Channel axis of the input."""
        return self._axis

    @property
    def dtype(self) -> np.dtype:
        """Dtype of parameters, inputs and outputs."""
        return self._dtype

    def reset_parameters(self) -> None:
        """Weight to ones and bias to zeros (in place)."""
        _reset_affine(self)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalize ``x`` per sample and group; remember what :meth:`backward` needs.

        Parameters
        ----------
        x : numpy.ndarray
            Input (N, C, ...) of the layer's dtype (channels on ``axis``).

        Returns
        -------
        numpy.ndarray
            The normalized input, x's shape and dtype.

        Raises
        ------
        TypeError
            Input of another dtype.
        ValueError
            A channel count other than ``num_channels``, or a bad shape.
        """
        x = np.asarray(x)
        _check_float_input(self, x, self._dtype)
        _check_channels(self, x, self._axis, self.num_channels)
        w, b = _plain(self._parameters["weight"]), _plain(self._parameters["bias"])
        y, mean, invstd = group_norm_forward(x, self.num_groups, w, b, self.eps, axis=self._axis)
        self._saved = (x, mean, invstd)
        return y

    def _gradients(self, grad_out: np.ndarray, x: np.ndarray, mean: np.ndarray, invstd: np.ndarray):
        gx, gw, gb = group_norm_backward(grad_out, x, self.num_groups, mean, invstd,
                                         _plain(self._parameters["weight"]), axis=self._axis)
        return gx, {"weight": gw, "bias": gb}

    def extra_repr(self) -> str:
        """The argument part of the repr, as PyTorch's.

        Returns
        -------
        str
            The constructor arguments: ``num_groups`` and ``num_channels``, then
            ``eps``, ``affine`` and ``bias``.
        """
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, bias={self._bias}"


def _reset_affine(layer: Module) -> None:
    """A layer's weight to ones and bias to zeros (in place), where they exist."""
    for name, value in (("weight", 1), ("bias", 0)):
        p = layer._parameters.get(name)
        if p is not None:
            p.data[...] = value


def _check_channels(layer: Module, x: np.ndarray, axis: int, channels: int) -> None:
    if x.ndim >= 2 and -x.ndim <= axis < x.ndim and x.shape[axis] != channels:
        raise ValueError(
            f"{type(layer).__name__} expected {channels} channels on axis {axis} of the input "
            f"(got input of shape {x.shape} with {x.shape[axis]} channels)"
        )


class _InstanceNorm(_FamilyNorm):
    """Instance normalization of any rank; see InstanceNorm1d/2d/3d."""

    _version = 2
    _rank = 0  # dims of a batched input (0: any); unbatched inputs have one fewer

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, *, axis: int = 1,
                 dtype: Any = np.float32, bias: bool = True) -> None:
        super().__init__()
        C = _positive_int(num_features, "num_features")
        self.num_features = C
        self.eps = eps
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self._axis = _int_axis(axis)
        self._dtype = dt = _float_dtype(dtype)
        self._bias = bool(bias) and self.affine
        if self.affine:
            self.weight = Parameter(np.ones(C, dtype=dt), "weight")
            self.register_parameter("bias", Parameter(np.zeros(C, dtype=dt), "bias") if bias else None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", np.zeros(C, dtype=dt))
            self.register_buffer("running_var", np.ones(C, dtype=dt))
            # kept for PyTorch's state_dict; like PyTorch, instance norm never advances it
            self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    @property
    def axis(self) -> int:
        """Channel axis of a batched input."""
        return self._axis

    @property
    def dtype(self) -> np.dtype:
        """Dtype of parameters, buffers, inputs and outputs."""
        return self._dtype

    def reset_running_stats(self) -> None:
        """Running mean to zeros and running variance to ones (in place)."""
        for name, value in (("running_mean", 0), ("running_var", 1), ("num_batches_tracked", 0)):
            buffer = self._buffers[name]
            if buffer is not None:
                buffer[...] = value

    def reset_parameters(self) -> None:
        """Running statistics reset; weight to ones and bias to zeros (in place)."""
        self.reset_running_stats()
        _reset_affine(self)

    def _batched(self, x: np.ndarray) -> tuple[np.ndarray, bool]:
        rank = self._rank
        if rank and x.ndim not in (rank - 1, rank):
            raise ValueError(
                f"{type(self).__name__} expects a {rank}-D (batched) or {rank - 1}-D (unbatched) "
                f"input, got shape {x.shape}"
            )
        unbatched = bool(rank) and x.ndim == rank - 1
        return (x[None] if unbatched else x), unbatched

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalize ``x`` per sample and channel; remember what :meth:`backward` needs.

        In training mode, or without running statistics, each instance is
        normalized by its own statistics (and running statistics, when kept,
        are updated in training mode); in eval mode with running statistics,
        by those.

        Parameters
        ----------
        x : numpy.ndarray
            Input (N, C, ...) of the layer's dtype, or one sample (C, ...).

        Returns
        -------
        numpy.ndarray
            The normalized input, x's shape and dtype.

        Raises
        ------
        TypeError
            Input of another dtype.
        ValueError
            Wrong rank or channel count, or one value per instance in training.
        """
        x = np.asarray(x)
        _check_float_input(self, x, self._dtype)
        xb, unbatched = self._batched(x)
        _check_channels(self, xb, self._axis, self.num_features)
        w, b = _plain(self._parameters["weight"]), _plain(self._parameters["bias"])
        rm, rv = self._buffers["running_mean"], self._buffers["running_var"]
        if self.training or rm is None:
            update = self.training and rm is not None
            momentum = 0.0 if self.momentum is None else self.momentum  # as PyTorch
            y, mean, invstd = instance_norm_forward(
                xb, w, b, rm if update else None, rv if update else None, momentum=momentum,
                eps=self.eps, axis=self._axis,
            )
            self._saved = (xb, mean, invstd, True)
        else:
            assert rv is not None  # kept together with running_mean
            y = batch_norm_inference(xb, rm, rv, w, b, eps=self.eps, axis=self._axis)
            with np.errstate(divide="ignore", invalid="ignore"):
                invstd = (1.0 / np.sqrt(rv.astype(np.float64) + self.eps)).astype(self._dtype)
            self._saved = (xb, rm.copy(), invstd, False)
        self._unbatched = unbatched
        return y[0] if unbatched else y

    def _gradients(self, grad_out: np.ndarray, x: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                   own_stats: bool):
        w = _plain(self._parameters["weight"])
        if own_stats:
            gx, gw, gb = instance_norm_backward(grad_out, x, mean, invstd, w, axis=self._axis)
        else:  # eval mode with running statistics: constants
            gx, gw, gb = batch_norm_backward(grad_out, x, mean, invstd, w, training=False, axis=self._axis)
        return gx, {"weight": gw, "bias": gb}

    def extra_repr(self) -> str:
        """The argument part of the repr, as PyTorch's.

        Returns
        -------
        str
            The constructor arguments: ``num_features``, then ``eps``,
            ``momentum``, ``affine``, ``bias`` and ``track_running_stats``.
        """
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self._bias}, track_running_stats={self.track_running_stats}")


# The parameters of InstanceNorm1d/2d/3d, documented once.
_INSTANCE_NORM_PARAMETERS = """    Each sample and channel is normalized by the mean and biased variance of
    its values (Ulyanov et al. 2016), by :func:`bnfast.instance_norm_forward`.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float, default 1e-5
        Added to the variance.
    momentum : float or None, default 0.1
        Weight of the new statistics in the running update (None: 0, as PyTorch).
    affine : bool, default False
        Whether the layer has per-channel ``weight`` and ``bias``.
    track_running_stats : bool, default False
        Whether the layer keeps running statistics (used in eval mode).
    axis : int, default 1
        The channel axis of a batched input (-1 for channels-last).
    dtype : float32 or float64, default float32
        Dtype of the parameters, buffers and inputs.
    bias : bool, default True
        With ``affine``, whether the layer has ``bias`` (PyTorch's keyword).
"""


class InstanceNorm1d(_InstanceNorm):
    __doc__ = f"""Instance normalization of (N, C, L) input, or (C, L) unbatched (``torch.nn.InstanceNorm1d``).

{_INSTANCE_NORM_PARAMETERS}"""

    _rank = 3


class InstanceNorm2d(_InstanceNorm):
    __doc__ = f"""Instance normalization of (N, C, H, W) input, or (C, H, W) unbatched (``torch.nn.InstanceNorm2d``).

{_INSTANCE_NORM_PARAMETERS}
    Examples
    --------
    >>> import numpy as np, bnfast
    >>> m = bnfast.InstanceNorm2d(3, affine=True)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    >>> y = m(x)
    >>> bool(np.allclose(y.mean(axis=(2, 3)), 0, atol=1e-6))
    True
    >>> list(m.state_dict())
    ['weight', 'bias']
    """

    _rank = 4


class InstanceNorm3d(_InstanceNorm):
    __doc__ = f"""Instance normalization of (N, C, D, H, W) input, or (C, D, H, W) unbatched (``torch.nn.InstanceNorm3d``).

{_INSTANCE_NORM_PARAMETERS}"""

    _rank = 5


class FilterResponseNorm2d(_FamilyNorm):
    """Filter response normalization with its thresholded linear unit (Singh & Krishnan 2020).

    ``y = max(weight * x / sqrt(nu2 + |eps|) + bias, tau)``, ``nu2`` the mean
    of ``x**2`` over the spatial axes of each sample and channel; weight,
    bias and tau per channel.  Computed by
    :func:`bnfast.filter_response_norm_forward`.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float, default 1e-6
        Added (as its absolute value) to ``nu2``.
    learnable_eps : bool, default False
        Whether ``eps`` is a trainable parameter (shape (1,), named ``eps``).
    axis : int, default 1
        The channel axis (-1 for NHWC).
    dtype : float32 or float64, default float32
        Dtype of the parameters and of the inputs.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> frn = bnfast.FilterResponseNorm2d(3)
    >>> sorted(name for name, _ in frn.named_parameters())
    ['bias', 'tau', 'weight']
    """

    def __init__(self, num_features: int, eps: float = 1e-6, learnable_eps: bool = False, *,
                 axis: int = 1, dtype: Any = np.float32) -> None:
        super().__init__()
        C = self.num_features = _positive_int(num_features, "num_features")
        self._axis = _int_axis(axis)
        self._dtype = dt = _float_dtype(dtype)
        self.learnable_eps = bool(learnable_eps)
        self.weight = Parameter(np.ones(C, dtype=dt), "weight")
        self.bias = Parameter(np.zeros(C, dtype=dt), "bias")
        self.tau = Parameter(np.zeros(C, dtype=dt), "tau")
        self.eps: float | Parameter = Parameter(np.full(1, eps, dtype=dt), "eps") if self.learnable_eps else eps

    @property
    def axis(self) -> int:
        """Channel axis of the input."""
        return self._axis

    def _eps_value(self) -> float:
        return float(self.eps[0]) if isinstance(self.eps, Parameter) else float(self.eps)

    def reset_parameters(self) -> None:
        """Weight to ones, bias and tau to zeros (in place)."""
        self.weight.data[...] = 1
        self.bias.data[...] = 0
        self.tau.data[...] = 0

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalize ``x`` and apply the TLU; remember what :meth:`backward` needs.

        Parameters
        ----------
        x : numpy.ndarray
            Input (N, C, H, W) (or channels-last with ``axis=-1``) of the layer's dtype.

        Returns
        -------
        numpy.ndarray
            The normalized and thresholded input, x's shape and dtype.

        Raises
        ------
        TypeError
            Input of another dtype.
        ValueError
            Not 4-D, or a channel count other than ``num_features``.
        """
        x = np.asarray(x)
        _check_float_input(self, x, self._dtype)
        if x.ndim != 4:
            raise ValueError(f"FilterResponseNorm2d expects a 4-D input, got shape {x.shape}")
        _check_channels(self, x, self._axis, self.num_features)
        eps = self._eps_value()
        y, invstd = filter_response_norm_forward(x, self.weight.data, self.bias.data, self.tau.data, eps,
                                                 axis=self._axis)
        self._saved = (x, y, invstd, eps)
        return y

    def _gradients(self, grad_out: np.ndarray, x: np.ndarray, y: np.ndarray, invstd: np.ndarray,
                   eps: float):
        gx, gw, gb, gt = filter_response_norm_backward(grad_out, x, y, invstd, self.weight.data,
                                                       self.tau.data, axis=self._axis)
        grads = {"weight": gw, "bias": gb, "tau": gt}
        if self.learnable_eps:  # d y / d|eps| = -weight * x * invstd**3 / 2 where the TLU passes
            ax = self._axis % x.ndim
            channel, stat = [1] * x.ndim, [1] * x.ndim
            channel[ax] = stat[ax] = x.shape[ax]
            stat[0] = x.shape[0]
            passed = y > self.tau.data.reshape(channel)
            g = np.where(passed, grad_out, 0).astype(np.float64)
            total = (g * x * invstd.astype(np.float64).reshape(stat) ** 3 * self.weight.data.reshape(channel)).sum()
            grads["eps"] = np.array([-0.5 * np.sign(eps) * total])
        return gx, grads

    def extra_repr(self) -> str:
        """The argument part of the repr.

        Returns
        -------
        str
            The constructor arguments: ``num_features``, then ``eps`` (its
            current value when learnable) and ``learnable_eps``.
        """
        return f"{self.num_features}, eps={self._eps_value()}, learnable_eps={self.learnable_eps}"


# ---------------------------------------------------------------------- SyncBatchNorm
class _SyncStats:
    """What a synchronized training forward keeps for its backward (global statistics)."""

    __slots__ = ("mean", "invstd", "count")

    def __init__(self, mean: np.ndarray, invstd: np.ndarray, count: int) -> None:
        self.mean, self.invstd, self.count = mean, invstd, count


class SyncBatchNorm(BatchNorm):
    """Batch normalization with the statistics of the batch spread over every MPI rank.

    ``torch.nn.SyncBatchNorm`` for NumPy over MPI (mpi4py).  In training
    mode each rank passes its own slice of the global batch, of any size
    (1 sample, or none); the slice is normalized with the mean and biased
    variance of the *global* batch, obtained from every rank's per-channel
    Welford state (:func:`bnfast.moments`) merged with Chan's formula in rank
    order (:func:`bnfast.distributed.allreduce_moments`), so the statistics
    are exact and bit-identical on every rank.  The running statistics are
    updated, identically on every rank, with the global mean and the unbiased
    global variance.  :meth:`backward` gives each rank the gradient of its
    own slice of the global-batch function (one collective of the
    per-channel sums of ``grad_out`` and ``grad_out * x_hat``);
    ``weight.grad`` and ``bias.grad`` are this rank's contributions, so their
    sum over ranks is the full-batch gradient (data-parallel training then
    sums or averages them, as :func:`bnfast.nn.fit` does).  Eval mode is plain
    :class:`BatchNorm` inference without communication (and so is a layer
    without running statistics in eval mode, as in PyTorch).

    Every rank of ``comm`` must call ``forward`` and ``backward`` of its
    replica of the layer in the same order and mode.  Bad input on any rank
    (wrong shape, dtype or channel count), ranks with different channel
    counts or dtypes, or a global batch with one value per channel raise on
    *every* rank (ValueError, or the rank's own error where its input was
    bad) and change no state; no call hangs.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float, default 1e-5
        Added to the variance for numerical stability.
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics; None for the
        cumulative average.
    affine : bool, default True
        Learn ``weight`` and ``bias``.
    track_running_stats : bool, default True
        Keep running statistics (used in eval mode).
    axis : int, default 1
        The channel axis (keyword only); ``-1`` for channels-last.  Any input
        rank >= 2.
    dtype : numpy dtype, default numpy.float32
        Dtype of the parameters, buffers and inputs (keyword only).
    comm : mpi4py.MPI.Comm, optional
        Communicator of the data-parallel ranks (keyword only); default
        ``mpi4py.MPI.COMM_WORLD``.
    bias : bool, default True
        With ``affine=True``, whether the layer learns ``bias`` (keyword only).

    Attributes
    ----------
    comm : mpi4py.MPI.Comm
        The communicator.

    Raises
    ------
    ImportError
        ``comm`` is None and mpi4py is not installed (``pip install "bnfast[mpi]"``).

    See Also
    --------
    BatchNorm : The layer on one process; the other attributes are its.
    bnfast.distributed.allreduce_moments : The statistics collective.

    Notes
    -----
    Communication per training step, with P ranks and C channels: the
    forward gathers a 24-byte header and then 24 C bytes (count, mean, m2)
    from every rank (two ``Allgather`` calls); the backward gathers 16 C + 8
    bytes (the two sums and an error flag) from every rank (one
    ``Allgather``).  The computation on the local slice is that of a
    :class:`BatchNorm` step: one statistics pass and one normalizing pass
    forward; one constant-statistics backward pass and one pass adding the
    terms through the statistics backward.

    Examples
    --------
    Run under ``mpiexec -n 2 python script.py``; each rank holds its slice:

    >>> import numpy as np, bnfast
    >>> bn = bnfast.SyncBatchNorm(3)                      # doctest: +SKIP
    >>> x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    >>> y = bn(x)                                         # doctest: +SKIP
    >>> gx = bn.backward(np.ones_like(y))                 # doctest: +SKIP
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        axis: int = 1,
        dtype: Any = np.float32,
        comm: Any = None,
        bias: bool = True,
    ) -> None:
        from ..distributed import get_comm

        comm = get_comm(comm)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis=axis, dtype=dtype,
                         bias=bias)
        self.__dict__["_comm"] = comm

    @property
    def comm(self) -> Any:
        """The MPI communicator of the data-parallel ranks."""
        return self._comm

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalize this rank's slice ``x`` with the statistics of the global batch.

        In training mode every rank of :attr:`comm` must call it (collective);
        in eval mode (or while :func:`bnfast.recalibrate` collects moments)
        it is :meth:`BatchNorm.forward`, without communication.

        Parameters
        ----------
        x : numpy.ndarray
            This rank's slice of the batch: the layer's dtype, ``num_features``
            channels on ``axis``, any number of samples (also 0).

        Returns
        -------
        numpy.ndarray
            Normalized slice, same shape and dtype as ``x``.

        Raises
        ------
        TypeError
            Input of another dtype on this rank.
        ValueError
            Bad input on this rank, a rank with bad input (on the others), ranks
            with different channel counts or dtypes, or a global batch with
            one value per channel.  Nothing is changed on any rank.
        """
        if self._moment_sink is not None or not self.training:
            return super().forward(x)
        from .._functional import _channel_axis, _eps, _momentum, _normalize_with
        from ..distributed import _allreduce_moments

        C, dt, tracking = self._num_features, self._dtype, self.running_mean is not None
        error: BaseException | None = None
        local = None
        try:
            x = self._check_input(x)
            ax = _channel_axis(x, self._axis)
            eps = _eps(self.eps)
            factor, count = self._factor() if tracking else (0.0, 0)
            factor = _momentum(factor)
            local = moments(x, axis=ax)  # also refuses non-float input
        except Exception as exc:  # this rank still joins the collective, carrying the error
            error = exc
        total = _allreduce_moments(self._comm, local, error, C, dt)
        n = int(total.count[0]) if C else 0
        if n <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got a global batch of "
                f"{n} value(s) per channel over {self._comm.Get_size()} rank(s) (this rank's input "
                f"shape {x.shape}); nothing was changed on any rank"
            )
        mean, var = total.mean, total.m2 / n
        invstd = 1.0 / np.sqrt(var + eps)
        params = self._parameters
        y = _normalize_with(x, mean, var, _plain(params["weight"]), _plain(params["bias"]), eps, ax)
        if tracking:
            buffers = self._buffers
            rm, rv, nbt = buffers["running_mean"], buffers["running_var"], buffers["num_batches_tracked"]
            assert rm is not None and rv is not None
            rm[...] = (1.0 - factor) * rm.astype(np.float64) + factor * mean
            rv[...] = (1.0 - factor) * rv.astype(np.float64) + factor * (total.m2 / (n - 1.0))
            if nbt is not None:
                nbt[...] = count
        self.__dict__["_saved"] = (x, mean.astype(dt), invstd.astype(dt), _SyncStats(mean, invstd, n))
        return y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Gradient w.r.t. this rank's slice, through the global statistics.

        After a training forward this is a collective: every rank must call
        it.  It sets ``weight.grad`` and ``bias.grad`` to this rank's
        contributions (their sum over ranks is the full-batch gradient).
        After an eval-mode forward it is :meth:`BatchNorm.backward`.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient w.r.t. this rank's output, same shape and dtype as its input.

        Returns
        -------
        numpy.ndarray
            Gradient w.r.t. this rank's input.

        Raises
        ------
        RuntimeError
            No forward has been run yet on this rank.
        ValueError, TypeError
            ``grad_out`` of another shape or dtype on this rank; ValueError on
            the other ranks.  No gradient is changed on any rank.
        """
        saved = self._saved
        if saved is not None and not isinstance(saved[3], _SyncStats):
            return super().backward(grad_out)
        if saved is None and not self.training:
            return super().backward(grad_out)  # raises: no forward
        from .._functional import _add_grad_through_stats, _local_grad_sums
        from ..distributed import _sum_flagged

        C = self._num_features
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        w = _plain(weight)
        error: BaseException | None = None
        sums = np.zeros(2 * C)
        x = partial = sum_g = sum_gx = np.zeros(0)
        stats: _SyncStats | None = None
        ax = 0
        try:
            if saved is None:
                raise RuntimeError(
                    f"{type(self).__name__}.backward() called before forward(): run forward (or __call__) first"
                )
            x, stats = saved[0], saved[3]
            grad_out = np.asarray(grad_out)
            if grad_out.shape != x.shape:
                raise ValueError(
                    f"grad_out has shape {grad_out.shape} but the last input to forward had shape {x.shape}"
                )
            ax = self._axis % x.ndim
            partial, sum_g, sum_gx = _local_grad_sums(grad_out, x, stats.mean, stats.invstd, w, ax)
            sums[:C], sums[C:] = sum_g, sum_gx
        except Exception as exc:
            error = exc
        total = _sum_flagged(self._comm, sums, error)
        assert stats is not None  # else _sum_flagged raised
        gx = _add_grad_through_stats(partial, x, stats.mean, stats.invstd, w, total[:C], total[C:],
                                     stats.count, ax)
        if weight is not None:
            weight.grad = sum_gx.astype(self._dtype)
        if bias is not None:
            bias.grad = sum_g.astype(self._dtype)
        return gx

    @classmethod
    def convert_sync_batchnorm(cls, module: Any, comm: Any = None) -> Any:
        """Replace every BatchNorm layer of a model by a SyncBatchNorm with the same state.

        Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new layers
        take over the old ones' settings, parameter objects (so an optimizer
        built before the conversion still updates them), buffers and mode.

        Parameters
        ----------
        module : Module, BatchNorm, or list or tuple of them
            A model (e.g. :class:`bnfast.nn.Sequential`; its children are
            replaced in place, recursively), a single BatchNorm layer, or a
            list or tuple of layers (a new one is returned).
        comm : mpi4py.MPI.Comm, optional
            Communicator of the new layers; default ``mpi4py.MPI.COMM_WORLD``.

        Returns
        -------
        object
            The converted model: ``module`` itself for a Module with children,
            a new SyncBatchNorm for a BatchNorm, a new list or tuple for a
            sequence; anything else unchanged.

        Raises
        ------
        ImportError
            ``comm`` is None and mpi4py is not installed.
        """
        from ..distributed import get_comm

        return cls._convert(module, get_comm(comm), {})

    @classmethod
    def _convert(cls, module: Any, comm: Any, memo: dict[int, Any]) -> Any:
        """:meth:`convert_sync_batchnorm`; ``memo`` maps a converted layer's id to its replacement."""
        if isinstance(module, (list, tuple)):
            return type(module)(cls._convert(m, comm, memo) for m in module)
        if isinstance(module, BatchNorm) and not isinstance(module, SyncBatchNorm):
            if id(module) not in memo:  # a layer used twice becomes one SyncBatchNorm used twice
                new = cls(module.num_features, module.eps, module.momentum, module.affine,
                          module.track_running_stats, axis=module.axis, dtype=module.dtype, comm=comm,
                          bias=module._parameters["bias"] is not None)
                for name, p in module._parameters.items():
                    new._parameters[name] = p  # the same Parameter objects
                for name, buf in module._buffers.items():
                    new._buffers[name] = buf
                new.train(module.training)
                memo[id(module)] = new
            return memo[id(module)]
        if isinstance(module, Module):
            for name, child in list(module._modules.items()):
                if child is not None:
                    converted = cls._convert(child, comm, memo)
                    if converted is not child:
                        module.add_module(name, converted)
        return module
