"""The trainable-array container shared by every layer and optimizer."""

from __future__ import annotations

import numpy as np

__all__ = ["Parameter"]


class Parameter:
    """A trainable array and the gradient of the loss with respect to it.

    Layers own their parameters and expose the arrays under PyTorch's names
    (``layer.weight`` is ``layer.<param>.data``); optimizers update ``data``
    in place, so every reference a user holds stays valid.

    Parameters
    ----------
    data : numpy.ndarray
        The array, updated in place by optimizers.
    name : str, optional
        The name under which the owning layer exposes it (``"weight"``, ...).

    Attributes
    ----------
    data : numpy.ndarray
    grad : numpy.ndarray or None
        Gradient from the last ``backward``; same shape and dtype as ``data``,
        ``None`` before any backward pass.
    name : str
    """

    __slots__ = ("data", "grad", "name")

    def __init__(self, data: np.ndarray, name: str = "") -> None:
        self.data = data
        self.grad: np.ndarray | None = None
        self.name = name

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``data``."""
        return self.data.shape

    def zero_grad(self) -> None:
        """Forget the stored gradient."""
        self.grad = None

    def __repr__(self) -> str:
        return f"Parameter(name={self.name!r}, shape={self.data.shape}, dtype={self.data.dtype})"
