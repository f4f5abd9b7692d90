"""Stateful batch-normalization layers and dataset-statistics recalibration.

The layers behave like ``torch.nn.BatchNorm1d/2d/3d`` (running statistics,
``momentum=None`` cumulative averages, ``num_batches_tracked``, eval mode,
PyTorch-compatible ``state_dict``) and are thin wrappers over the functional
API in :mod:`bnfast._functional`, which does all the batch-norm arithmetic and
all input validation.  The layers only add what is specific to a layer: the
expected input rank, the number of channels, the parameter dtype, and the
state kept between ``forward`` and ``backward``.

:func:`recalibrate` replaces the running statistics of one layer, or of every
BatchNorm layer of a model, by the exact pooled statistics of a stream of
batches (AdaBN), merging per-batch Welford states with Chan's formula.
"""

from __future__ import annotations

import os
import types
from collections import namedtuple
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import numpy as np

from ._functional import (
    Moments,
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    moments,
)
from ._parameter import Parameter

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "IncompatibleKeys",
    "recalibrate",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
IncompatibleKeys.__doc__ = """Keys that did not match in a non-strict ``load_state_dict``.

Attributes
----------
missing_keys : list of str
    Keys the layer expects that the state dict did not contain.
unexpected_keys : list of str
    Keys of the state dict the layer does not have.
"""


class _StateDictKeyError(KeyError):
    """A KeyError whose message prints without KeyError's extra quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


_INT64_MAX = int(np.iinfo(np.int64).max)


def _check_batch_count(value: np.ndarray, where: str) -> None:
    """``num_batches_tracked`` is a count: an integer in [0, 2**63 - 1]."""
    if value.dtype.kind not in "iu":
        raise TypeError(f"{where} must be an integer array (got dtype {value.dtype})")
    if value.size and not (0 <= int(value.min()) and int(value.max()) <= _INT64_MAX):
        raise ValueError(f"{where} must be in [0, 2**63 - 1] (got {value!r})")


class BatchNorm:
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
    layer with PyTorch's input-rank checks.

    Parameters
    ----------
    num_features : int
        Number of channels C, the length of ``x.shape[axis]``.
    eps : float, default 1e-5
        Added to the variance for numerical stability (must be >= 0).
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics, in [0, 1]; None
        selects the cumulative moving average (factor ``1/num_batches_tracked``).
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
        The dtype of the parameters and buffers, float32 or float64.  Inputs must
        have this dtype: an input of the other float dtype raises TypeError
        (convert it with ``x.astype(layer.dtype)``; no silent conversion).
    bias : bool, default True
        Keyword-only, as in recent PyTorch (2.13): with ``affine=True`` and
        ``bias=False`` the layer learns only ``weight`` (``bias`` is None and
        absent from the state dict).

    Attributes
    ----------
    weight, bias : numpy.ndarray or None
        The parameter arrays (``Parameter.data``), shape (C,); None when
        ``affine`` is false (``bias`` also when ``bias=False``).  Optimizers
        update them in place.
    grad_weight, grad_bias : numpy.ndarray or None
        Gradients from the last :meth:`backward` (``Parameter.grad``).
    running_mean, running_var : numpy.ndarray or None
        Running statistics, shape (C,); None when not tracking.
    num_batches_tracked : numpy.ndarray or None
        0-d int64 array counting training batches; None when not tracking.
    training : bool
        Training mode (True after construction).
    eps : float
    momentum : float or None
        May be changed between calls, like PyTorch's attributes.

    Notes
    -----
    Differences from PyTorch: a training ``forward`` that fails (for example
    with one value per channel) leaves ``num_batches_tracked`` and the running
    statistics untouched, where PyTorch has already incremented the counter;
    :meth:`backward` *replaces* ``Parameter.grad`` instead of accumulating;
    :meth:`state_dict` returns copies, not views; a strict
    :meth:`load_state_dict` requires ``num_batches_tracked`` (PyTorch fills in
    a missing one for dicts without version metadata; use ``strict=False``).

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
        bias: bool = True,
    ) -> None:
        if not _is_int(num_features) or num_features < 1:
            raise ValueError(f"num_features must be a positive int (got {num_features!r})")
        if not _is_int(axis):
            raise TypeError(f"axis must be an int (got {axis!r})")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dtype is None or dt is None or dt not in _FLOAT_DTYPES:  # (np.dtype(None) is float64)
            raise TypeError(f"dtype must be float32 or float64 (got {dtype!r})")
        self._num_features = int(num_features)
        self._axis = int(axis)
        self._dtype = dt
        self._affine = bool(affine)
        self._track_running_stats = bool(track_running_stats)
        self.eps = eps
        self.momentum = momentum
        self.training = True
        C = self._num_features
        self._weight: Parameter | None = None
        self._bias: Parameter | None = None
        if self._affine:
            self._weight = Parameter(np.ones(C, dtype=dt), "weight")
            if bias:
                self._bias = Parameter(np.zeros(C, dtype=dt), "bias")
        if self._track_running_stats:
            self._running_mean: np.ndarray | None = np.zeros(C, dtype=dt)
            self._running_var: np.ndarray | None = np.ones(C, dtype=dt)
            self._num_batches_tracked: np.ndarray | None = np.zeros((), dtype=np.int64)
        else:
            self._running_mean = self._running_var = self._num_batches_tracked = None
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
        """The dtype of parameters, buffers, inputs and outputs."""
        return self._dtype

    @property
    def affine(self) -> bool:
        """Whether the layer has ``weight`` and ``bias``."""
        return self._affine

    @property
    def track_running_stats(self) -> bool:
        """Whether the layer keeps running statistics."""
        return self._track_running_stats

    def _set_array(self, target: np.ndarray | None, value: Any, name: str) -> None:
        if target is None:
            why = {"weight": "affine=False", "bias": "affine=False or bias=False"}.get(
                name, "track_running_stats=False"
            )
            raise AttributeError(f"{type(self).__name__} with {why} has no {name}")
        value = np.asarray(value)
        if value.shape != target.shape:
            raise ValueError(f"{name} must have shape {target.shape} (got {value.shape})")
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a real numeric array (got dtype {value.dtype})")
        np.copyto(target, value, casting="unsafe")

    @property
    def weight(self) -> np.ndarray | None:
        """Scale gamma, shape (C,), or None when ``affine`` is false.

        Assigning copies the values into the existing array (same object).
        """
        return None if self._weight is None else self._weight.data

    @weight.setter
    def weight(self, value: Any) -> None:
        self._set_array(self.weight, value, "weight")

    @property
    def bias(self) -> np.ndarray | None:
        """Shift beta, shape (C,), or None when ``affine`` (or ``bias``) is false.

        Assigning copies the values into the existing array (same object).
        """
        return None if self._bias is None else self._bias.data

    @bias.setter
    def bias(self, value: Any) -> None:
        self._set_array(self.bias, value, "bias")

    @property
    def grad_weight(self) -> np.ndarray | None:
        """Gradient of the loss w.r.t. ``weight`` from the last backward, or None."""
        return None if self._weight is None else self._weight.grad

    @property
    def grad_bias(self) -> np.ndarray | None:
        """Gradient of the loss w.r.t. ``bias`` from the last backward, or None."""
        return None if self._bias is None else self._bias.grad

    @property
    def running_mean(self) -> np.ndarray | None:
        """Running mean, shape (C,), or None when not tracking.

        Assigning copies the values into the existing array (same object).
        """
        return self._running_mean

    @running_mean.setter
    def running_mean(self, value: Any) -> None:
        self._set_array(self._running_mean, value, "running_mean")

    @property
    def running_var(self) -> np.ndarray | None:
        """Running unbiased variance, shape (C,), or None when not tracking.

        Assigning copies the values into the existing array (same object).
        """
        return self._running_var

    @running_var.setter
    def running_var(self, value: Any) -> None:
        self._set_array(self._running_var, value, "running_var")

    @property
    def num_batches_tracked(self) -> np.ndarray | None:
        """0-d int64 array: training batches seen, or None when not tracking.

        Assigning copies the value into the existing array (same object).
        """
        return self._num_batches_tracked

    @num_batches_tracked.setter
    def num_batches_tracked(self, value: Any) -> None:
        if self._num_batches_tracked is not None:
            _check_batch_count(np.asarray(value), "num_batches_tracked")
        self._set_array(self._num_batches_tracked, value, "num_batches_tracked")

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "BatchNorm":
        """Set training mode (``mode=True``) or eval mode (``mode=False``).

        Parameters
        ----------
        mode : bool, default True
            True for training mode, False for eval mode.

        Returns
        -------
        BatchNorm
            ``self``.
        """
        if not isinstance(mode, (bool, np.bool_)):
            raise ValueError(f"training mode is expected to be boolean (got {mode!r})")
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        """Set eval mode; same as ``train(False)``.

        Returns
        -------
        BatchNorm
            ``self``.
        """
        return self.train(False)

    def parameters(self) -> list[Parameter]:
        """The trainable parameters.

        Returns
        -------
        list of Parameter
            ``[weight, bias]`` Parameter objects (their ``.data`` is updated in
            place by optimizers, their ``.grad`` set by :meth:`backward`); an
            empty list when ``affine`` is false, ``[weight]`` when ``bias`` is.
        """
        return [p for p in (self._weight, self._bias) if p is not None]

    def zero_grad(self) -> None:
        """Set the gradients of all parameters to None."""
        for p in self.parameters():
            p.zero_grad()

    # ------------------------------------------------------------------ compute
    def _check_rank(self, ndim: int) -> None:
        """Layer-specific rank check; the any-rank layer leaves it to the functional API."""

    def _check_input(self, x: Any) -> np.ndarray:
        x = np.asarray(x)
        self._check_rank(x.ndim)
        native = x.dtype.newbyteorder("=")  # either byte order is fine
        if native != self._dtype and native in _FLOAT_DTYPES:
            raise TypeError(
                f"{type(self).__name__} has {self._dtype} parameters but the input is {x.dtype}; "
                f"convert the input with x.astype(np.{self._dtype}) or create the layer with "
                f"dtype=np.{x.dtype}"
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
        x = self._check_input(x)
        w, b = self.weight, self.bias
        if self.training or not self._track_running_stats:
            if self.training and self._track_running_stats:
                assert self._num_batches_tracked is not None
                count = int(self._num_batches_tracked) + 1
                if count < 1:
                    raise ValueError(
                        f"num_batches_tracked must be >= 0 (got {count - 1}); reset it with "
                        "reset_running_stats()"
                    )
                factor = 1.0 / count if self.momentum is None else self.momentum
                y, mean, invstd = batch_norm_forward(
                    x, w, b, self._running_mean, self._running_var,
                    momentum=factor, eps=self.eps, axis=self._axis,
                )
                self._num_batches_tracked[...] = count  # only after a successful update
            else:
                y, mean, invstd = batch_norm_forward(x, w, b, eps=self.eps, axis=self._axis)
            self._saved = (x, mean, invstd, True)
        else:
            assert self._running_mean is not None and self._running_var is not None
            y = batch_norm_inference(
                x, self._running_mean, self._running_var, w, b, eps=self.eps, axis=self._axis
            )
            # Snapshot of the statistics actually used: constants for backward.
            mean = self._running_mean.copy()
            with np.errstate(divide="ignore", invalid="ignore"):
                invstd = (1.0 / np.sqrt(self._running_var.astype(np.float64) + self.eps)).astype(
                    self._dtype
                )
            self._saved = (x, mean, invstd, False)
        return y

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Normalize ``x``; the same as :meth:`forward`.

        Parameters
        ----------
        x : numpy.ndarray
            Input of the layer's dtype with ``num_features`` channels on
            ``axis``.

        Returns
        -------
        numpy.ndarray
            Normalized output, same shape and dtype as ``x``.
        """
        return self.forward(x)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Gradient of the loss w.r.t. the input of the last :meth:`forward`.

        After a training-mode forward (or any forward of a layer without
        running statistics) this is the full batch-norm gradient through the
        batch statistics; after an eval-mode forward the running statistics
        are constants (frozen BN): ``grad_input = grad_out * weight * invstd``.
        ``Parameter.grad`` of ``weight`` and ``bias`` is set (replaced, not
        accumulated) to ``sum(grad_out * x_hat)`` and ``sum(grad_out)``.

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
        """
        if self._saved is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() called before forward(): "
                "run forward (or __call__) first"
            )
        x, mean, invstd, batch_stats = self._saved
        grad_out = np.asarray(grad_out)
        if grad_out.shape != x.shape:
            raise ValueError(
                f"grad_out has shape {grad_out.shape} but the last input to forward had "
                f"shape {x.shape}"
            )
        gx, gw, gb = batch_norm_backward(
            grad_out, x, mean, invstd, self.weight, training=batch_stats, axis=self._axis
        )
        if self._weight is not None:
            self._weight.grad = gw
        if self._bias is not None:
            self._bias.grad = gb
        return gx

    # ------------------------------------------------------------------ state
    def reset_running_stats(self) -> None:
        """Set running_mean to 0, running_var to 1 and num_batches_tracked to 0 (in place)."""
        if self._track_running_stats:
            assert self._running_mean is not None and self._running_var is not None
            assert self._num_batches_tracked is not None
            self._running_mean.fill(0)
            self._running_var.fill(1)
            self._num_batches_tracked.fill(0)

    def reset_parameters(self) -> None:
        """Reset running statistics, weight to 1 and bias to 0 (in place); clear gradients."""
        self.reset_running_stats()
        if self._weight is not None:
            self._weight.data.fill(1)
        if self._bias is not None:
            self._bias.data.fill(0)
        self.zero_grad()

    def _state_targets(self) -> dict[str, np.ndarray]:
        d: dict[str, np.ndarray] = {}
        if self._weight is not None:
            d["weight"] = self._weight.data
        if self._bias is not None:
            d["bias"] = self._bias.data
        if self._track_running_stats:
            assert self._running_mean is not None and self._running_var is not None
            assert self._num_batches_tracked is not None
            d["running_mean"] = self._running_mean
            d["running_var"] = self._running_var
            d["num_batches_tracked"] = self._num_batches_tracked
        return d

    def state_dict(self, *, prefix: str = "") -> dict[str, np.ndarray]:
        """The layer's state under PyTorch's keys and shapes.

        Parameters
        ----------
        prefix : str, default ""
            Prepended to every key (for models that nest layers).

        Returns
        -------
        dict of str to numpy.ndarray
            Copies of ``weight``, ``bias`` (shape (C,), when affine),
            ``running_mean``, ``running_var`` (shape (C,)) and
            ``num_batches_tracked`` (0-d int64), when tracking, in this order.
            ``{k: torch.from_numpy(v) for k, v in bn.state_dict().items()}``
            loads into the matching ``torch.nn.BatchNorm*``.
        """
        return {prefix + k: v.copy() for k, v in self._state_targets().items()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Copy state into the layer's arrays (in place), validating everything first.

        Accepts NumPy arrays, anything ``numpy.asarray`` converts (for example
        CPU torch tensors from ``torch_bn.state_dict()``) and the output of
        :meth:`state_dict`.  Float values are cast to the layer's dtype,
        ``num_batches_tracked`` must be an integer array of shape ().  If any
        check fails nothing is changed.

        Parameters
        ----------
        state_dict : mapping of str to array_like
            The state to load, under the keys of :meth:`state_dict`.
        strict : bool, default True
            Require exactly the layer's keys.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``; both empty when ``strict``.

        Raises
        ------
        KeyError
            ``strict`` and keys are missing or unexpected (the message names them).
        ValueError
            A value's shape differs from the layer's (names the key; also when
            not strict, like PyTorch).
        TypeError
            A value is not a real numeric array, or ``num_batches_tracked``
            is not an integer.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping (got {type(state_dict).__name__})")
        targets = self._state_targets()
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        name = type(self).__name__
        if strict and (missing or unexpected):
            parts = []
            if unexpected:
                parts.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected))
            if missing:
                parts.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing))
            raise _StateDictKeyError(f"Error(s) in loading state_dict for {name}: " + ". ".join(parts) + ".")
        staged: list[tuple[np.ndarray, np.ndarray]] = []
        problems: list[str] = []
        for key, target in targets.items():
            if key not in state_dict:
                continue
            try:
                value = np.asarray(state_dict[key])
            except Exception as exc:  # e.g. a torch tensor that requires grad
                raise TypeError(f"state_dict[{key!r}] cannot be converted to a NumPy array: {exc}") from exc
            if key == "num_batches_tracked":
                _check_batch_count(value, "state_dict['num_batches_tracked']")
            elif value.dtype.kind not in "biuf":
                raise TypeError(f"state_dict[{key!r}] must be a real numeric array (got dtype {value.dtype})")
            if value.shape != target.shape:
                problems.append(
                    f"size mismatch for {key}: copying a value with shape {value.shape} from the "
                    f"state_dict, the shape in the current layer is {target.shape}"
                )
                continue
            staged.append((target, value))
        if problems:
            raise ValueError(f"Error(s) in loading state_dict for {name}: " + "; ".join(problems))
        for target, value in staged:
            np.copyto(target, value, casting="unsafe")
        return IncompatibleKeys(missing, unexpected)

    def save(self, path: str | os.PathLike) -> None:
        """Save :meth:`state_dict` to a ``.npz`` file (``numpy.savez``).

        The file holds only the state arrays under PyTorch's keys, not the
        configuration (eps, momentum, axis, ...): load it into a layer built
        with the same configuration.  NumPy appends ``.npz`` to a path that
        lacks it.

        Parameters
        ----------
        path : str or os.PathLike
            The file to write.
        """
        np.savez(path, **self.state_dict())

    def load(self, path: str | os.PathLike, strict: bool = True) -> "BatchNorm":
        """Load a ``.npz`` written by :meth:`save` (or ``numpy.savez`` of a state dict).

        Parameters
        ----------
        path : str or os.PathLike
            The file to read.
        strict : bool, default True
            As in :meth:`load_state_dict`.

        Returns
        -------
        BatchNorm
            ``self``, so ``bnfast.BatchNorm2d(64).load("bn.npz")`` works.
        """
        with np.load(path, allow_pickle=False) as data:
            state = {k: data[k] for k in data.files}
        self.load_state_dict(state, strict=strict)
        return self

    # ------------------------------------------------------------------ repr
    def extra_repr(self) -> str:
        """Return the argument part of the repr (PyTorch 2.13's, plus non-default axis/dtype).

        Returns
        -------
        str
            The text between the parentheses of ``repr(layer)``.
        """
        s = (
            f"{self._num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self._affine}, bias={self._bias is not None}, "
            f"track_running_stats={self._track_running_stats}"
        )
        if self._axis != 1:
            s += f", axis={self._axis}"
        if self._dtype != np.float32:
            s += f", dtype={self._dtype}"
        return s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class BatchNorm1d(BatchNorm):
    """Batch normalization of 2-D (N, C) or 3-D (N, C, L) input, like ``torch.nn.BatchNorm1d``.

    With ``axis=-1`` the input is channels-last, (N, C) or (N, L, C).
    Attributes, methods and semantics are those of :class:`BatchNorm`.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float, default 1e-5
        Added to the variance for numerical stability (>= 0).
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics; None for the
        cumulative moving average.
    affine : bool, default True
        Learn a per-channel ``weight`` and ``bias``.
    track_running_stats : bool, default True
        Keep running statistics (else batch statistics in every mode).
    axis : int, default 1
        The channel axis; ``-1`` for channels-last input.
    dtype : numpy dtype, default numpy.float32
        The dtype of parameters, buffers and inputs: float32 or float64.
    bias : bool, default True
        Keyword-only; ``False`` with ``affine=True`` learns only ``weight``.

    Raises
    ------
    ValueError
        On input that is not 2-D or 3-D: ``"expected 2D or 3D input (got 4D input)"``.
    """

    def _check_rank(self, ndim: int) -> None:
        if ndim not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {ndim}D input)")


class BatchNorm2d(BatchNorm):
    """Batch normalization of 4-D (N, C, H, W) input, like ``torch.nn.BatchNorm2d``.

    With ``axis=-1`` the input is channels-last, (N, H, W, C).
    Attributes, methods and semantics are those of :class:`BatchNorm`.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float, default 1e-5
        Added to the variance for numerical stability (>= 0).
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics; None for the
        cumulative moving average.
    affine : bool, default True
        Learn a per-channel ``weight`` and ``bias``.
    track_running_stats : bool, default True
        Keep running statistics (else batch statistics in every mode).
    axis : int, default 1
        The channel axis; ``-1`` for channels-last input.
    dtype : numpy dtype, default numpy.float32
        The dtype of parameters, buffers and inputs: float32 or float64.
    bias : bool, default True
        Keyword-only; ``False`` with ``affine=True`` learns only ``weight``.

    Raises
    ------
    ValueError
        On input that is not 4-D: ``"expected 4D input (got 3D input)"``.
    """

    def _check_rank(self, ndim: int) -> None:
        if ndim != 4:
            raise ValueError(f"expected 4D input (got {ndim}D input)")


class BatchNorm3d(BatchNorm):
    """Batch normalization of 5-D (N, C, D, H, W) input, like ``torch.nn.BatchNorm3d``.

    With ``axis=-1`` the input is channels-last, (N, D, H, W, C).
    Attributes, methods and semantics are those of :class:`BatchNorm`.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float, default 1e-5
        Added to the variance for numerical stability (>= 0).
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics; None for the
        cumulative moving average.
    affine : bool, default True
        Learn a per-channel ``weight`` and ``bias``.
    track_running_stats : bool, default True
        Keep running statistics (else batch statistics in every mode).
    axis : int, default 1
        The channel axis; ``-1`` for channels-last input.
    dtype : numpy dtype, default numpy.float32
        The dtype of parameters, buffers and inputs: float32 or float64.
    bias : bool, default True
        Keyword-only; ``False`` with ``affine=True`` learns only ``weight``.

    Raises
    ------
    ValueError
        On input that is not 5-D: ``"expected 5D input (got 4D input)"``.
    """

    def _check_rank(self, ndim: int) -> None:
        if ndim != 5:
            raise ValueError(f"expected 5D input (got {ndim}D input)")


# ---------------------------------------------------------------------- recalibrate
def _find_batch_norms(root: Any) -> list[BatchNorm]:
    """BatchNorm layers reachable from ``root``, in discovery order, each once.

    Walks lists, tuples, dict values, instance attributes (``vars(obj)``) and
    the closure cells of functions.
    """
    found: list[BatchNorm] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, BatchNorm):
            found.append(obj)
            continue
        children: list[Any] = []
        if isinstance(obj, (list, tuple)):
            children = list(obj)
        elif isinstance(obj, dict):
            children = list(obj.values())
        elif isinstance(obj, (str, bytes, np.ndarray, type, types.ModuleType, Parameter)):
            children = []
        else:
            if isinstance(obj, types.MethodType):
                children.append(obj.__self__)
                obj = obj.__func__
            if isinstance(obj, types.FunctionType) and obj.__closure__:
                for cell in obj.__closure__:
                    try:
                        children.append(cell.cell_contents)
                    except ValueError:  # empty cell
                        pass
            try:
                children.extend(vars(obj).values())
            except TypeError:
                pass
        stack.extend(reversed(children))
    return found


def _pooled_update(layer: BatchNorm, acc: Moments, num_batches: int, where: str) -> tuple:
    count = np.asarray(acc.count)
    if num_batches == 0 or count.size == 0 or int(count.min()) == 0:
        raise ValueError(f"recalibrate: {where} received no batch")
    if int(count.min()) < 2:
        raise ValueError(
            f"recalibrate: {where} saw only 1 value per channel; the unbiased variance "
            "needs more than 1 value per channel"
        )
    mean = np.asarray(acc.mean, dtype=np.float64).astype(layer.dtype)
    var = np.asarray(acc.var(ddof=1), dtype=np.float64).astype(layer.dtype)
    return (layer, mean, var, num_batches)


def recalibrate(layer_or_layers: Any, batches: Iterable[Any]) -> Any:
    """Set running statistics to the exact pooled statistics of a stream of batches (AdaBN).

    For each BatchNorm layer the per-channel moments of every input it sees
    are merged with Chan's formula (:meth:`Moments.merge`), so the result
    equals the mean and *unbiased* variance of the concatenation of all its
    inputs (up to rounding) -- not an average of per-batch variances, which is
    what ``momentum=None`` gives.  ``running_mean`` and ``running_var`` are
    replaced (``momentum`` plays no part) and ``num_batches_tracked`` is set to
    the number of batches the layer saw, as if it had been reset and trained
    with ``momentum=None``.  Nothing is changed if an error occurs.

    Parameters
    ----------
    layer_or_layers : BatchNorm, sequence of callables, or callable model
        * A single :class:`BatchNorm`: each batch is that layer's input.
        * A list or tuple of callables (layers or functions): run as a chain,
          ``x = f(x)`` for each element in order.
        * Any other callable (for example ``bnfast.nn.Sequential``): called as
          ``model(x)``.  Its BatchNorm layers are found through its attributes,
          lists, tuples, dict values and closure cells.

        For a model, every BatchNorm layer with ``track_running_stats=True``
        gathers the statistics of its *own* inputs while the model runs: for
        the duration of the call its ``forward`` is temporarily replaced (an
        instance attribute, removed afterwards) by one that merges the moments
        of its input and returns that input normalized with the current
        *batch* statistics and the layer's weight and bias, without touching
        any state -- the same outputs as training mode, which is what
        ``torch.optim.swa_utils.update_bn`` does.  The pass is single, so
        ``batches`` may be a one-shot generator.  Other layers run in
        whatever mode they are in (put dropout in eval mode first if
        desired); layers without running statistics behave as usual.  The
        ``training`` flags of all BatchNorm layers are restored afterwards.
        A layer called several times per batch pools all of its inputs.
    batches : iterable of numpy.ndarray
        Input batches (of the layer's dtype, with its channel axis).

    Returns
    -------
    object
        ``layer_or_layers``.

    Raises
    ------
    ValueError
        ``batches`` is empty, a BatchNorm layer received no input or only one
        value per channel, a single layer does not track running statistics,
        or a model contains no BatchNorm layer that tracks them.
    TypeError
        ``layer_or_layers`` is neither a BatchNorm, a sequence nor a callable.
    """
    if isinstance(layer_or_layers, BatchNorm):
        layer = layer_or_layers
        if not layer.track_running_stats:
            raise ValueError(
                f"recalibrate: {layer!r} has no running statistics (track_running_stats=False)"
            )
        acc = Moments.zeros(layer.num_features)
        n = 0
        for x in batches:
            x = layer._check_input(x)
            acc = acc.merge(moments(x, axis=layer.axis))
            n += 1
        updates = [_pooled_update(layer, acc, n, f"{layer!r}")]
    else:
        if isinstance(layer_or_layers, (list, tuple)):
            chain = list(layer_or_layers)
            for i, f in enumerate(chain):
                if not callable(f):
                    raise TypeError(f"recalibrate: element {i} of the sequence is not callable: {f!r}")

            def run(x: Any) -> Any:
                for f in chain:
                    x = f(x)
                return x

        elif callable(layer_or_layers):
            run = layer_or_layers
        else:
            raise TypeError(
                "recalibrate expects a BatchNorm layer, a sequence of callables or a callable "
                f"model (got {type(layer_or_layers).__name__})"
            )
        all_bns = _find_batch_norms(layer_or_layers)
        bns = [bn for bn in all_bns if bn.track_running_stats]
        if not bns:
            raise ValueError("recalibrate: no BatchNorm layer with track_running_stats=True found")
        stats: dict[int, list[Any]] = {id(bn): [Moments.zeros(bn.num_features), 0] for bn in bns}

        def gathering_forward(bn: BatchNorm) -> Callable[[Any], np.ndarray]:
            entry = stats[id(bn)]

            def forward(x: Any) -> np.ndarray:
                x = bn._check_input(x)
                m = moments(x, axis=bn.axis)
                y, _, _ = batch_norm_forward(x, bn.weight, bn.bias, eps=bn.eps, axis=bn.axis)
                entry[0] = entry[0].merge(m)
                entry[1] += 1
                return y

            return forward

        modes = [(bn, bn.training) for bn in all_bns]
        installed: list[tuple[BatchNorm, bool, Any]] = []
        try:
            for bn in bns:
                had = "forward" in vars(bn)
                installed.append((bn, had, vars(bn).get("forward")))
                bn.forward = gathering_forward(bn)  # type: ignore[method-assign]
            for x in batches:
                run(x)
        finally:
            for bn, had, old in reversed(installed):
                if had:
                    bn.forward = old  # type: ignore[method-assign]
                else:
                    del bn.forward
            for bn, mode in modes:
                bn.training = mode
        updates = [
            _pooled_update(bn, stats[id(bn)][0], stats[id(bn)][1], f"BatchNorm layer #{i} ({bn!r})")
            for i, bn in enumerate(bns)
        ]
    for layer, mean, var, n in updates:
        layer._running_mean[...] = mean
        layer._running_var[...] = var
        layer._num_batches_tracked[...] = n
    return layer_or_layers
