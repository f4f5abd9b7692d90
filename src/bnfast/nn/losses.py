"""Loss functions that return the loss and remember its gradient.

Design: ``value = loss(pred, target)`` returns the loss as a Python float and
remembers what the gradient needs; ``loss.backward()`` then returns the
gradient of that value with respect to ``pred`` (same shape and dtype as
``pred``), ready for ``model.backward``::

    value = loss(model(x), y)
    model.backward(loss.backward())
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CrossEntropyLoss", "MSELoss"]

_REDUCTIONS = ("mean", "sum")


class _Loss:
    """Shared plumbing: reduction check, ``backward`` before call."""

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{type(self).__name__}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self._grad: np.ndarray | None = None

    def backward(self) -> np.ndarray:
        """Return the gradient of the last loss value with respect to ``pred``.

        Returns
        -------
        numpy.ndarray
            Same shape and dtype as the ``pred`` of the last call.

        Raises
        ------
        RuntimeError
            If the loss has not been computed yet.
        """
        if self._grad is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before computing a loss")
        return self._grad

    def _reduce(self, total: float, grad: np.ndarray, count: int, dtype: np.dtype) -> float:
        """Apply the reduction to the summed loss and its gradient; keep the gradient in ``dtype``.

        ``count`` is what ``"mean"`` divides by (samples for cross-entropy,
        elements for MSE, as in PyTorch).
        """
        if self.reduction == "mean":
            total /= count
            grad /= count
        self._grad = grad.astype(dtype, copy=False)
        return total

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"


def _float_pred(pred: Any, who: str) -> np.ndarray:
    pred = np.asarray(pred)
    if not np.issubdtype(pred.dtype, np.floating):
        raise TypeError(f"{who}: predictions must be floating point, got dtype {pred.dtype}")
    return pred


def _check_target(target: Any, kind: type, message: str) -> np.ndarray:
    """Return ``target`` as an array of a ``kind`` dtype (bool rejected) or raise ``TypeError``."""
    target = np.asarray(target)
    if target.dtype == np.bool_ or not np.issubdtype(target.dtype, kind):
        raise TypeError(message.format(dtype=target.dtype))
    return target


class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy from logits, like ``torch.nn.CrossEntropyLoss``.

    Computed with a numerically stable log-softmax (the row maximum is
    subtracted first), so large logits do not overflow.

    Parameters
    ----------
    reduction : {"mean", "sum"}, default "mean"
        Average or sum over the batch.

    Notes
    -----
    ``loss(logits, labels)`` takes logits of shape ``(N, C)`` and integer
    class labels of shape ``(N,)`` with values in ``[0, C)``, returns the
    loss as a float, and :meth:`backward` returns
    ``(softmax(logits) - onehot(labels)) / N`` (without ``/ N`` for
    ``"sum"``).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import CrossEntropyLoss
    >>> ce = CrossEntropyLoss()
    >>> round(ce(np.zeros((2, 4)), np.array([0, 3])), 4)  # log(4)
    1.3863
    >>> ce.backward().shape
    (2, 4)
    """

    def __call__(self, logits: np.ndarray, target: np.ndarray) -> float:
        """Compute the loss and remember its gradient.

        Parameters
        ----------
        logits : numpy.ndarray
            ``(N, C)`` floating-point scores.
        target : numpy.ndarray
            ``(N,)`` integer class indices in ``[0, C)``.

        Returns
        -------
        float
            The mean (or summed) cross-entropy.

        Raises
        ------
        TypeError
            Non-floating logits or non-integer labels (bool included).
        ValueError
            Wrong shapes or labels out of range.
        """
        logits = _float_pred(logits, "CrossEntropyLoss")
        if logits.ndim != 2:
            raise ValueError(f"CrossEntropyLoss: logits must be 2-D (N, C), got shape {logits.shape}")
        n, c = logits.shape
        target = _check_target(
            target, np.integer,
            "CrossEntropyLoss: targets must be integer class indices, got dtype {dtype} "
            "(convert with y.astype(np.int64); one-hot or probability targets are not supported)",
        )
        if target.shape != (n,):
            raise ValueError(
                f"CrossEntropyLoss: targets must have shape (N,) = ({n},) to match logits {logits.shape}, "
                f"got {target.shape}"
            )
        if n == 0:
            raise ValueError("CrossEntropyLoss: empty batch")
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= c:
            bad = lo if lo < 0 else hi
            raise ValueError(f"CrossEntropyLoss: label {bad} is out of range for {c} classes [0, {c})")
        shifted = logits - logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        logp = shifted - lse
        rows = np.arange(n)
        total = -float(logp[rows, target].sum(dtype=np.float64))
        grad = np.exp(logp)  # softmax
        grad[rows, target] -= 1
        return self._reduce(total, grad, n, logits.dtype)


class MSELoss(_Loss):
    """Mean squared error, like ``torch.nn.MSELoss``.

    Parameters
    ----------
    reduction : {"mean", "sum"}, default "mean"
        Average over every element or sum.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import MSELoss
    >>> mse = MSELoss()
    >>> mse(np.array([1.0, 2.0]), np.array([1.0, 4.0]))
    2.0
    >>> mse.backward()
    array([ 0., -2.])
    """

    def __call__(self, pred: np.ndarray, target: np.ndarray) -> float:
        """Compute the loss and remember its gradient.

        Parameters
        ----------
        pred : numpy.ndarray
            Floating-point predictions.
        target : numpy.ndarray
            Real targets of the same shape as ``pred``.

        Returns
        -------
        float
            The mean (or summed) squared error.

        Raises
        ------
        TypeError
            Non-numeric targets or non-floating predictions.
        ValueError
            Shapes differ.
        """
        pred = _float_pred(pred, "MSELoss")
        target = _check_target(target, np.number, "MSELoss: targets must be numeric, got dtype {dtype}")
        if target.shape != pred.shape:
            raise ValueError(
                f"MSELoss: predictions {pred.shape} and targets {target.shape} must have the same shape "
                "(reshape targets, e.g. y.reshape(-1, 1))"
            )
        if pred.size == 0:
            raise ValueError("MSELoss: empty batch")
        diff = pred - target.astype(pred.dtype, copy=False)
        total = float(np.square(diff, dtype=np.float64).sum())
        return self._reduce(total, 2 * diff, pred.size, pred.dtype)
