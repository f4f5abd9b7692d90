"""LeakyReLU and ELU layers (``torch.nn.LeakyReLU`` / ``torch.nn.ELU``), and
`Residual`, a skip-connection block ``act(body(x) + shortcut(x))``.

`Sequential` fuses a batch-norm layer with a ReLU, LeakyReLU or ELU after it,
and `Residual` fuses its add and activation into the body's last batch-norm
layer (`bnfast.batch_norm_act_forward`): the same numbers as the unfused
layers within rounding, one pass over the data instead of three.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._functional import _real
from .._fused import _activation, _grad_pre_activation
from . import _fused as fused_layer
from .layers import ReLU, Sequential, _as_float_array, _check_grad
from .module import Module

__all__ = ["ELU", "LeakyReLU", "Residual"]


class LeakyReLU(Module):
    """``x if x >= 0 else negative_slope * x``, like ``torch.nn.LeakyReLU``.

    Parameters
    ----------
    negative_slope : float, default 0.01
        The slope for negative inputs.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import LeakyReLU
    >>> LeakyReLU(0.5)(np.array([-2.0, 3.0]))
    array([-1.,  3.])
    """

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        _, self.negative_slope = _activation("leaky_relu", negative_slope)
        self._v: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Apply the activation.

        Parameters
        ----------
        x : numpy.ndarray
            Floating-point input.

        Returns
        -------
        numpy.ndarray
            Same shape and dtype as ``x``.
        """
        x = _as_float_array(x, "LeakyReLU")
        self._v = x
        return np.where(x < 0, x * x.dtype.type(self.negative_slope), x)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Gradient with respect to the last input.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient with respect to the last output.

        Returns
        -------
        numpy.ndarray
            ``grad_out`` where the input was positive, times the slope elsewhere.
        """
        g = _check_grad(grad_out, None if self._v is None else self._v.shape, "LeakyReLU")
        return np.where(self._v > 0, g, g * g.dtype.type(self.negative_slope))

    def extra_repr(self) -> str:
        """The argument part of the repr.

        Returns
        -------
        str
            ``negative_slope=...``.
        """
        return f"negative_slope={self.negative_slope}"


class ELU(Module):
    """``x if x > 0 else alpha * expm1(x)``, like ``torch.nn.ELU``.

    Parameters
    ----------
    alpha : float, default 1.0
        The scale of the negative part (fused with batch norm only for 1.0).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import ELU
    >>> ELU()(np.array([0.0, 2.0]))
    array([0., 2.])
    """

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = _real(alpha, "alpha")
        self._v: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Apply the activation.

        Parameters
        ----------
        x : numpy.ndarray
            Floating-point input.

        Returns
        -------
        numpy.ndarray
            Same shape and dtype as ``x``.
        """
        x = _as_float_array(x, "ELU")
        self._v = x
        a = x.dtype.type(self.alpha)
        return np.where(x > 0, x, a * np.expm1(np.minimum(x, 0)))

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Gradient with respect to the last input.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient with respect to the last output.

        Returns
        -------
        numpy.ndarray
            ``grad_out * act'(x)``.
        """
        g = _check_grad(grad_out, None if self._v is None else self._v.shape, "ELU")
        x = self._v
        a = x.dtype.type(self.alpha)
        return np.where(x > 0, g, g * a * np.exp(np.minimum(x, 0)))

    def extra_repr(self) -> str:
        """The argument part of the repr.

        Returns
        -------
        str
            ``alpha=...``.
        """
        return f"alpha={self.alpha}"


def fusable_activation(layer: Module) -> tuple[str, float] | None:
    """(activation, slope) of ``layer`` if batch norm can fuse it, else None."""
    if type(layer) is ReLU:
        return "relu", 0.0
    if type(layer) is LeakyReLU:
        return "leaky_relu", layer.negative_slope
    if type(layer) is ELU and layer.alpha == 1.0:
        return "elu", 0.0
    return None


def fusable_norm(layer: Module) -> bool:
    """Whether ``layer`` is a plain batch-norm layer without an activation of its own."""
    from .normalization import BatchNorm

    act = getattr(layer, "_act", None)
    # only BatchNorm's own forward/backward know the fused call (variants, SyncBatchNorm and ghost
    # batches compute differently and keep the activation as a layer of its own)
    return (isinstance(layer, BatchNorm) and type(layer).forward is BatchNorm.forward
            and type(layer).backward is BatchNorm.backward
            and layer.virtual_batch_size is None and (act is None or act[0] == "identity")
            and layer.__dict__.get("_moment_sink") is None)


class Residual(Module):
    """A skip connection: ``act(body(x) + shortcut(x))`` (a ResNet block).

    When the body ends with a batch-norm layer (a :class:`BatchNorm` or a
    :class:`Sequential` whose last layer is one), the add and the activation
    are fused into it (`bnfast.batch_norm_act_forward` with ``residual=``).

    Parameters
    ----------
    body : Module
        The residual branch (e.g. Conv-BN-ReLU-Conv-BN).
    shortcut : Module, optional
        The skip branch (e.g. a 1x1 convolution and batch norm); None is
        the identity.
    activation : {"relu", "leaky_relu", "elu", "identity"}, default "relu"
        Applied after the add.
    negative_slope : float, default 0.01
        The slope of leaky_relu.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import Conv2d, BatchNorm2d, ReLU, Residual, Sequential
    >>> block = Residual(Sequential(Conv2d(4, 4, 3, padding=1, rng=0), BatchNorm2d(4)))
    >>> y = block(np.ones((2, 4, 5, 5), np.float32))
    >>> gx = block.backward(np.ones_like(y))
    >>> y.shape, gx.shape
    ((2, 4, 5, 5), (2, 4, 5, 5))
    """

    def __init__(self, body: Module, shortcut: Module | None = None, activation: str = "relu",
                 negative_slope: float = 0.01) -> None:
        super().__init__()
        self.activation, self.negative_slope = _activation(activation, negative_slope)
        self.body = Sequential._checked(body)
        self.register_module("shortcut", None if shortcut is None else Sequential._checked(shortcut))
        self._state: tuple | None = None

    def _split(self) -> tuple[list[Module], Module | None]:
        """The body's layers before its last batch-norm layer, and that layer (or None)."""
        layers = self.body._layers() if isinstance(self.body, Sequential) else [self.body]
        if layers and fusable_norm(layers[-1]):
            return layers[:-1], layers[-1]
        return layers, None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``act(body(x) + shortcut(x))``.

        Parameters
        ----------
        x : numpy.ndarray
            Input of both branches.

        Returns
        -------
        numpy.ndarray
            The block's output.
        """
        s = x if self.shortcut is None else self.shortcut(x)
        head, norm = self._split()
        h = x
        for layer in head:
            h = layer(h)
        if norm is not None:
            with fused_layer.fused_call(norm, self.activation, self.negative_slope, residual=s):
                y = norm(h)
            self._state = (head, norm, None)
            return y
        v = h + s
        self._state = (head, None, v)
        return _ref_activation(v, self.activation, self.negative_slope)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Gradient with respect to the block's input (both branches summed).

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient with respect to the last output.

        Returns
        -------
        numpy.ndarray
            Gradient with respect to the last input.
        """
        if self._state is None:
            raise RuntimeError("Residual.backward() called before forward()")
        head, norm, v = self._state
        if norm is not None:
            g, gz = fused_layer.backward(norm, grad_out)
        else:
            grad_out = _check_grad(grad_out, v.shape, "Residual")
            yv = _ref_activation(v, self.activation, self.negative_slope)
            g = gz = _grad_pre_activation(self.activation, self.negative_slope, grad_out, yv)
        for layer in reversed(head):
            g = layer.backward(g)
        gs = gz if self.shortcut is None else self.shortcut.backward(gz)
        return g + gs

    def extra_repr(self) -> str:
        """The argument part of the repr.

        Returns
        -------
        str
            The activation (and slope).
        """
        return f"activation={self.activation!r}, negative_slope={self.negative_slope}"


def _ref_activation(v: np.ndarray, name: str, slope: float) -> np.ndarray:
    t = v.dtype.type
    if name == "identity":
        return v
    if name == "relu":
        return np.where(v < 0, t(0), v)
    if name == "leaky_relu":
        return np.where(v < 0, v * t(slope), v)
    return np.where(v < 0, np.expm1(np.minimum(v, t(0))), v)
