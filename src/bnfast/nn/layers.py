"""Layers with explicit ``forward`` / ``backward`` for training without autograd.

Every layer is a :class:`~bnfast.nn.Module` and follows its contract:

* ``layer(x)`` is ``layer.forward(x)``; in training mode it keeps what
  ``backward`` needs.
* ``layer.backward(grad_out)`` returns the gradient with respect to the input
  of the last ``forward`` and stores the gradient of every parameter in its
  :class:`~bnfast._parameter.Parameter` ``.grad`` (overwriting, not
  accumulating).
* ``layer.parameters()`` lists the trainable :class:`Parameter` objects,
  ``layer.train(mode=True)`` / ``layer.eval()`` switch mode and return the
  layer, ``layer.training`` tells the mode.

Names, argument order, parameter shapes and initialisation follow
``torch.nn`` so that models and weights port in both directions.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Iterator, Union, overload

import numpy as np

from .._parameter import Parameter
from .module import Module

__all__ = [
    "Linear",
    "Conv2d",
    "ReLU",
    "Flatten",
    "MaxPool2d",
    "Dropout",
    "Sequential",
]


def _pair(value: Any, name: str) -> tuple[int, int]:
    """Normalise an int or a pair of ints to a pair of non-negative ints."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        a, b = value
    else:
        a = b = value
    for v in (a, b):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(a), int(b)


def _as_float_array(x: Any, who: str) -> np.ndarray:
    """Return ``x`` as an ndarray with a floating dtype or raise ``TypeError``."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"{who}: expected a floating-point input (float32 or float64), got dtype {x.dtype}; "
            "convert it first, e.g. x.astype(np.float32)"
        )
    return x


def _check_grad(grad_out: Any, expected_shape: tuple[int, ...] | None, who: str) -> np.ndarray:
    """Validate ``grad_out`` against the shape of the last forward output."""
    if expected_shape is None:
        raise RuntimeError(f"{who}.backward() called before forward()")
    grad_out = _as_float_array(grad_out, f"{who}.backward")
    if grad_out.shape != tuple(expected_shape):
        raise ValueError(
            f"{who}.backward(): grad_out has shape {grad_out.shape} but the last forward "
            f"produced shape {tuple(expected_shape)}"
        )
    return grad_out


_LAYOUTS = {1: "(N, C, H, W)", -1: "(N, H, W, C)"}


def _check_axis(axis: int, who: str) -> int:
    """Normalise a 4-D layer's channel axis to 1 (NCHW) or -1 (NHWC)."""
    if axis not in (1, -1, 3):
        raise ValueError(f"{who}: axis must be 1 (channels-first, NCHW) or -1 (channels-last, NHWC), got {axis}")
    return 1 if axis == 1 else -1


def _as_float_4d(x: Any, axis: int, who: str) -> np.ndarray:
    """:func:`_as_float_array` that also requires a 4-D input in the ``axis`` layout."""
    x = _as_float_array(x, who)
    if x.ndim != 4:
        raise ValueError(f"{who}: expected a 4-D input {_LAYOUTS[axis]}, got shape {x.shape}")
    return x


# The 2-D layers compute in channels-last order, where a pixel's channels are
# adjacent: im2col rows and pooling windows are then plain reshapes.
def _to_nhwc(a: np.ndarray, axis: int) -> np.ndarray:
    """Channels-last view (no copy) of a 4-D array in the ``axis`` layout."""
    return a.transpose(0, 2, 3, 1) if axis == 1 else a


def _from_nhwc(a: np.ndarray, axis: int) -> np.ndarray:
    """Contiguous array in the ``axis`` layout from a channels-last one."""
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2) if axis == 1 else a)


class _WeightBiasLayer(Module):
    """Base of the layers whose output is ``cols @ weight.reshape(out, -1).T + bias``.

    :class:`Linear` (``cols`` is the input) and :class:`Conv2d` (``cols`` is
    the im2col matrix) share the parameters, their initialisation, the
    ``weight`` / ``bias`` / ``grad_*`` attributes and both matrix products.
    """

    def _init_parameters(self, weight_shape: tuple[int, ...], bias: bool, dtype: Any, rng: Any,
                         who: str) -> None:
        dtype = np.dtype(dtype)
        if not np.issubdtype(dtype, np.floating):
            raise TypeError(f"{who}: dtype must be floating, got {dtype}")
        gen = np.random.default_rng(rng)
        # PyTorch's defaults, kaiming_uniform_(a=sqrt(5)) for the weight and
        # U(±1/sqrt(fan_in)) for the bias, have the same bound 1/sqrt(fan_in).
        # The weight is drawn first: a seeded model depends on that order.
        bound = 1.0 / math.sqrt(math.prod(weight_shape[1:]))
        self.weight = Parameter(gen.uniform(-bound, bound, weight_shape).astype(dtype), "weight")
        self.register_parameter(
            "bias",
            Parameter(gen.uniform(-bound, bound, weight_shape[0]).astype(dtype), "bias") if bias else None,
        )

    # Shape of the last forward output, which backward checks grad_out against.
    _out_shape: tuple[int, ...] | None = None

    @property
    def grad_weight(self) -> np.ndarray | None:
        """``weight.grad``: gradient of ``weight`` from the last backward, or None."""
        return self._weight_parameter().grad

    def _weight_parameter(self) -> Parameter:
        # By attribute: the registered Parameter, or the weight a reparametrization
        # (bnfast.nn.utils.weight_norm / spectral_norm) computes before each forward.
        w = self.weight
        if w is None:
            raise AttributeError(f"{type(self).__name__}.weight was set to None")
        return w

    @property
    def grad_bias(self) -> np.ndarray | None:
        """``bias.grad``: gradient of ``bias`` from the last backward, or None (also without bias)."""
        b = self._parameters["bias"]
        return None if b is None else b.grad

    def _weight_matrix(self, dtype: np.dtype) -> np.ndarray:
        """The weight as an ``(out, fan_in)`` matrix in ``dtype`` (a view when the dtype matches)."""
        w = self._weight_parameter().data
        return w.reshape(w.shape[0], -1).astype(dtype, copy=False)

    def _matmul_forward(self, cols: np.ndarray) -> np.ndarray:
        """``cols @ W.T + bias`` in the dtype of ``cols``; ``cols`` is ``(..., fan_in)``."""
        out = cols @ self._weight_matrix(cols.dtype).T
        b = self._parameters["bias"]
        if b is not None:
            out += b.data.astype(cols.dtype, copy=False)
        return out

    def _matmul_backward(self, g2: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Store the parameter gradients and return the gradient of ``cols``.

        ``g2`` is ``(M, out)`` and ``cols`` the ``(M, fan_in)`` matrix of the
        forward pass; the gradients are cast to the parameters' dtype.
        """
        weight, bias = self._weight_parameter(), self._parameters["bias"]
        weight.grad = (g2.T @ cols).reshape(weight.shape).astype(weight.dtype, copy=False)
        if bias is not None:
            bias.grad = g2.sum(axis=0).astype(bias.dtype, copy=False)
        return g2 @ self._weight_matrix(g2.dtype)


class Linear(_WeightBiasLayer):
    """Affine map ``y = x @ weight.T + bias`` like ``torch.nn.Linear``.

    Parameters
    ----------
    in_features : int
        Size of the last input dimension.
    out_features : int
        Size of the last output dimension.
    bias : bool, default True
        Learn an additive bias.
    dtype : numpy dtype, default numpy.float32
        Dtype of the parameters.  The output has the dtype of the input.
    rng : int, numpy.random.Generator or None, optional
        Seed or generator for the initialisation (PyTorch's default:
        ``weight`` and ``bias`` uniform in ``±1/sqrt(in_features)``).

    Attributes
    ----------
    weight : Parameter
        ``(out_features, in_features)``.
    bias : Parameter or None
        ``(out_features,)``.
    grad_weight, grad_bias : numpy.ndarray or None
        ``weight.grad`` and ``bias.grad``: gradients from the last :meth:`backward`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import Linear
    >>> fc = Linear(3, 2, rng=0)
    >>> fc(np.ones((4, 3), np.float32)).shape
    (4, 2)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: Any = np.float32, rng: Any = None) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError("Linear: in_features and out_features must be positive")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._init_parameters((self.out_features, self.in_features), bias, dtype, rng, "Linear")
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Apply the affine map to the last dimension of ``x``.

        Parameters
        ----------
        x : numpy.ndarray
            ``(*, in_features)``, floating.

        Returns
        -------
        numpy.ndarray
            ``(*, out_features)``, dtype of ``x``.
        """
        x = _as_float_array(x, "Linear")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear(in_features={self.in_features}): expected input of shape (*, {self.in_features}), "
                f"got {x.shape}"
            )
        y = self._matmul_forward(x)
        self._x = x
        self._out_shape = y.shape
        return y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Compute the gradients of ``weight``, ``bias`` and the input.

        Parameters
        ----------
        grad_out : numpy.ndarray
            ``(*, out_features)``.

        Returns
        -------
        numpy.ndarray
            ``(*, in_features)``.
        """
        g = _check_grad(grad_out, self._out_shape, "Linear")
        x2 = self._x.reshape(-1, self.in_features)
        return self._matmul_backward(g.reshape(-1, self.out_features), x2).reshape(self._x.shape)

    def extra_repr(self) -> str:
        """Return the constructor arguments shown in the repr.

        Returns
        -------
        str
            The text between the parentheses of ``repr(layer)``.
        """
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self._parameters['bias'] is not None}"


class Conv2d(_WeightBiasLayer):
    """2-D convolution (cross-correlation) like ``torch.nn.Conv2d``.

    Implemented as im2col (``numpy.lib.stride_tricks.sliding_window_view``)
    followed by one matrix product; the backward pass is a matrix product and
    a scatter-add over the kernel offsets.  Like ``torch.nn.Conv2d`` (and
    :class:`Linear`) it keeps a reference to its input for the backward pass,
    not the ``kh * kw`` times larger im2col matrix, which the backward pass
    rebuilds; so do not modify the input in place between the two.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of the input and the output.
    kernel_size : int or (int, int)
        Height and width of the kernel.
    stride : int or (int, int), default 1
        Step of the kernel along height and width.
    padding : int or (int, int), default 0
        Zero padding on each side of both spatial dimensions.
    bias : bool, default True
        Learn an additive bias.
    axis : {1, -1}, keyword-only, default 1
        Channel axis of input and output: 1 for ``(N, C, H, W)``, -1 for
        ``(N, H, W, C)``.  The weight is ``(out, in, kh, kw)`` either way, so
        torch weights load unchanged.
    dtype : numpy dtype, default numpy.float32
        Dtype of the parameters; the output has the dtype of the input.
    rng : int, numpy.random.Generator or None, optional
        Seed or generator for PyTorch's default initialisation
        (uniform in ``±1/sqrt(in_channels*kh*kw)``).

    Attributes
    ----------
    weight : Parameter
        ``(out_channels, in_channels, kh, kw)``.
    bias : Parameter or None
        ``(out_channels,)``.
    grad_weight, grad_bias : numpy.ndarray or None
        ``weight.grad`` and ``bias.grad``: gradients from the last :meth:`backward`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import Conv2d
    >>> conv = Conv2d(1, 4, 3, padding=1, rng=0)
    >>> conv(np.zeros((2, 1, 8, 8), np.float32)).shape
    (2, 4, 8, 8)
    >>> Conv2d(1, 4, 3, axis=-1, rng=0)(np.zeros((2, 8, 8, 1), np.float32)).shape
    (2, 6, 6, 4)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, bias: bool = True, *, axis: int = 1, dtype: Any = np.float32,
                 rng: Any = None) -> None:
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError("Conv2d: in_channels and out_channels must be positive")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError("Conv2d: kernel_size and stride must be >= 1 and padding >= 0")
        self.axis = _check_axis(axis, "Conv2d")
        self._init_parameters((self.out_channels, self.in_channels, *self.kernel_size), bias, dtype, rng,
                              "Conv2d")
        self._cache: tuple | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Convolve ``x``.

        Parameters
        ----------
        x : numpy.ndarray
            ``(N, C_in, H, W)`` (``axis=1``) or ``(N, H, W, C_in)`` (``axis=-1``).

        Returns
        -------
        numpy.ndarray
            ``(N, C_out, H_out, W_out)`` or ``(N, H_out, W_out, C_out)``, dtype
            of ``x``, with ``H_out = (H + 2*pad - kh) // stride + 1``.
        """
        x = _as_float_4d(x, self.axis, "Conv2d")
        n, h, w, c = _to_nhwc(x, self.axis).shape
        if c != self.in_channels:
            raise ValueError(
                f"Conv2d(in_channels={self.in_channels}, axis={self.axis}): input {_LAYOUTS[self.axis]} has "
                f"{c} channels (shape {x.shape})"
            )
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if h + 2 * ph < kh or w + 2 * pw < kw:
            raise ValueError(
                f"Conv2d: padded input ({h + 2 * ph}x{w + 2 * pw}) is smaller than the kernel ({kh}x{kw})"
            )
        cols, (oh, ow) = self._columns(x)
        out = self._matmul_forward(cols).reshape(n, oh, ow, self.out_channels)
        out = _from_nhwc(out, self.axis)
        # the input itself, as torch saves it (and as Linear does): backward
        # rebuilds the columns, which are kh * kw times larger
        self._cache = (x, (n, h, w, c), (oh, ow))
        self._out_shape = out.shape
        return out

    def _columns(self, x: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """im2col of a validated input: ``(N * OH * OW, C * kh * kw)`` and ``(OH, OW)``."""
        xn = _to_nhwc(x, self.axis)
        n, h, w, c = xn.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if ph or pw:
            xn = np.pad(xn, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
        oh = (h + 2 * ph - kh) // sh + 1
        ow = (w + 2 * pw - kw) // sw + 1
        # (N, OH, OW, C, kh, kw) view; the reshape is the one im2col copy and
        # orders each row (C, kh, kw) like a row of the weight matrix.
        win = np.lib.stride_tricks.sliding_window_view(xn, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
        return win.reshape(n * oh * ow, c * kh * kw), (oh, ow)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Compute the gradients of ``weight``, ``bias`` and the input.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Same shape as the last output.

        Returns
        -------
        numpy.ndarray
            Same shape and layout as the last input.
        """
        g = _check_grad(grad_out, self._out_shape, "Conv2d")
        x, (n, h, w, c), (oh, ow) = self._cache
        cols = self._columns(x)[0]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        g2 = _to_nhwc(g, self.axis).reshape(n * oh * ow, self.out_channels)
        dcols = self._matmul_backward(g2, cols).reshape(n, oh, ow, c, kh, kw)
        # col2im: scatter-add each kernel offset's slice into the padded input;
        # the loop runs over the kh*kw offsets, every add is vectorised.
        dxp = np.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=g.dtype)
        for i in range(kh):
            for j in range(kw):
                dxp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] += dcols[:, :, :, :, i, j]
        return _from_nhwc(dxp[:, ph:ph + h, pw:pw + w, :], self.axis)

    def extra_repr(self) -> str:
        """Return the constructor arguments shown in the repr.

        Returns
        -------
        str
            The text between the parentheses of ``repr(layer)``.
        """
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self._parameters["bias"] is None:
            s += ", bias=False"
        if self.axis != 1:
            s += f", axis={self.axis}"
        return s


class ReLU(Module):
    """Rectified linear unit ``max(x, 0)`` like ``torch.nn.ReLU``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import ReLU
    >>> ReLU()(np.array([-1.0, 2.0]))
    array([0., 2.])
    """

    def __init__(self) -> None:
        super().__init__()
        self._mask: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Return ``max(x, 0)``.

        Parameters
        ----------
        x : numpy.ndarray
            Floating-point input.

        Returns
        -------
        numpy.ndarray
            ``max(x, 0)``, same shape and dtype as ``x``.
        """
        x = _as_float_array(x, "ReLU")
        y = np.maximum(x, 0)
        self._mask = y > 0
        return y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Pass the gradient where the output was positive.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient with respect to the last output.

        Returns
        -------
        numpy.ndarray
            Gradient with respect to the last input.
        """
        g = _check_grad(grad_out, None if self._mask is None else self._mask.shape, "ReLU")
        return g * self._mask


class Flatten(Module):
    """Flatten dimensions ``start_dim..end_dim`` like ``torch.nn.Flatten``.

    Parameters
    ----------
    start_dim : int, default 1
        First dimension to flatten.
    end_dim : int, default -1
        Last dimension to flatten (included).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import Flatten
    >>> Flatten()(np.zeros((2, 3, 4))).shape
    (2, 12)
    """

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim = start_dim
        self.end_dim = end_dim
        self._in_shape: tuple[int, ...] | None = None
        self._out_shape: tuple[int, ...] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Reshape ``x``, merging the flattened dimensions.

        Parameters
        ----------
        x : numpy.ndarray
            The input.

        Returns
        -------
        numpy.ndarray
            ``x`` with dimensions ``start_dim..end_dim`` merged into one.
        """
        x = np.asarray(x)
        nd = x.ndim
        s = self.start_dim % nd if nd else 0
        e = self.end_dim % nd if nd else 0
        if s > e:
            raise ValueError(f"Flatten: start_dim {self.start_dim} is after end_dim {self.end_dim} for ndim {nd}")
        shape = x.shape[:s] + (int(np.prod(x.shape[s:e + 1])),) + x.shape[e + 1:]
        y = x.reshape(shape)
        self._in_shape = x.shape
        self._out_shape = y.shape
        return y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Reshape the gradient back to the input shape.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient with respect to the last output.

        Returns
        -------
        numpy.ndarray
            Gradient with respect to the last input.
        """
        g = _check_grad(grad_out, self._out_shape, "Flatten")
        return g.reshape(self._in_shape)

    def extra_repr(self) -> str:
        """Return the constructor arguments shown in the repr.

        Returns
        -------
        str
            The text between the parentheses of ``repr(layer)``.
        """
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class MaxPool2d(Module):
    """Non-overlapping 2-D max pooling like ``torch.nn.MaxPool2d(kernel_size)``.

    The stride equals the kernel size; trailing rows and columns that do not
    fill a window are dropped (PyTorch's floor mode).  The gradient goes to
    the first maximum of each window in row-major order, as in PyTorch.

    Parameters
    ----------
    kernel_size : int or (int, int)
        Height and width of the window (and of the stride).
    axis : {1, -1}, keyword-only, default 1
        Channel axis: 1 for ``(N, C, H, W)``, -1 for ``(N, H, W, C)``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import MaxPool2d
    >>> MaxPool2d(2)(np.arange(16.0).reshape(1, 1, 4, 4))[0, 0]
    array([[ 5.,  7.],
           [13., 15.]])
    """

    def __init__(self, kernel_size: Any, *, axis: int = 1) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        if min(self.kernel_size) < 1:
            raise ValueError("MaxPool2d: kernel_size must be >= 1")
        self.axis = _check_axis(axis, "MaxPool2d")
        self._cache: tuple | None = None
        self._out_shape: tuple[int, ...] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Take the maximum of each window.

        Parameters
        ----------
        x : numpy.ndarray
            ``(N, C, H, W)`` or ``(N, H, W, C)``.

        Returns
        -------
        numpy.ndarray
            ``(N, C, H // kh, W // kw)`` or ``(N, H // kh, W // kw, C)``.
        """
        x = _as_float_4d(x, self.axis, "MaxPool2d")
        kh, kw = self.kernel_size
        xn = _to_nhwc(x, self.axis)
        n, h, w, c = xn.shape
        oh, ow = h // kh, w // kw
        if oh == 0 or ow == 0:
            raise ValueError(f"MaxPool2d: input {h}x{w} is smaller than the kernel {kh}x{kw}")
        # (N, OH, kh, OW, kw, C) -> (N, OH, OW, C, kh*kw): each window flattened
        # row-major, so argmax picks the first maximum in PyTorch's order.
        win = xn[:, :oh * kh, :ow * kw, :].reshape(n, oh, kh, ow, kw, c).transpose(0, 1, 3, 5, 2, 4)
        win = win.reshape(n, oh, ow, c, kh * kw)
        idx = np.argmax(win, axis=-1)
        out = _from_nhwc(np.take_along_axis(win, idx[..., None], axis=-1)[..., 0], self.axis)
        self._cache = (idx, (n, h, w, c))
        self._out_shape = out.shape
        return out

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Route each output gradient to its window's maximum.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient with respect to the last output.

        Returns
        -------
        numpy.ndarray
            Same shape and layout as the last input.
        """
        g = _check_grad(grad_out, self._out_shape, "MaxPool2d")
        idx, (n, h, w, c) = self._cache
        kh, kw = self.kernel_size
        oh, ow = h // kh, w // kw
        gwin = np.zeros((n, oh, ow, c, kh * kw), dtype=g.dtype)
        np.put_along_axis(gwin, idx[..., None], _to_nhwc(g, self.axis)[..., None], axis=-1)
        gwin = gwin.reshape(n, oh, ow, c, kh, kw).transpose(0, 1, 4, 2, 5, 3).reshape(n, oh * kh, ow * kw, c)
        if oh * kh == h and ow * kw == w:
            dx = gwin
        else:
            dx = np.zeros((n, h, w, c), dtype=g.dtype)
            dx[:, :oh * kh, :ow * kw, :] = gwin
        return _from_nhwc(dx, self.axis)

    def extra_repr(self) -> str:
        """Return the constructor arguments shown in the repr.

        Returns
        -------
        str
            The text between the parentheses of ``repr(layer)``.
        """
        s = f"kernel_size={self.kernel_size}, stride={self.kernel_size}"
        if self.axis != 1:
            s += f", axis={self.axis}"
        return s


class Dropout(Module):
    """Inverted dropout like ``torch.nn.Dropout``.

    In training mode each element is zeroed with probability ``p`` and the
    rest are scaled by ``1/(1-p)``; in evaluation mode the layer is the
    identity.

    Parameters
    ----------
    p : float, default 0.5
        Probability of zeroing an element, in ``[0, 1]``.
    rng : int, numpy.random.Generator or None, keyword-only
        Seed or generator for the masks.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import Dropout
    >>> d = Dropout(0.5, rng=0)
    >>> sorted(set(d(np.ones(1000)).tolist()))
    [0.0, 2.0]
    >>> d.eval()(np.ones(3))
    array([1., 1., 1.])
    """

    def __init__(self, p: float = 0.5, *, rng: Any = None) -> None:
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = float(p)
        self.rng = np.random.default_rng(rng)
        self._mask: np.ndarray | None = None
        self._out_shape: tuple[int, ...] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Apply dropout (training) or the identity (evaluation).

        Parameters
        ----------
        x : numpy.ndarray
            Floating-point input.

        Returns
        -------
        numpy.ndarray
            The input with dropped elements zeroed and the others scaled
            (training), or ``x`` itself (evaluation).
        """
        x = _as_float_array(x, "Dropout")
        self._out_shape = x.shape
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        if self.p == 1.0:
            self._mask = np.zeros(x.shape, dtype=x.dtype)
        else:
            keep = self.rng.random(x.shape) >= self.p
            self._mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p))
        return x * self._mask

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Apply the same mask to the gradient.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient with respect to the last output.

        Returns
        -------
        numpy.ndarray
            Gradient with respect to the last input.
        """
        g = _check_grad(grad_out, self._out_shape, "Dropout")
        return g if self._mask is None else g * self._mask

    def extra_repr(self) -> str:
        """Return the constructor arguments shown in the repr.

        Returns
        -------
        str
            The text between the parentheses of ``repr(layer)``.
        """
        return f"p={self.p}"


class Sequential(Module):
    """Chain modules; ``backward`` runs them in reverse.

    The children are registered under ``"0"``, ``"1"``, ... (or the names of
    an ``OrderedDict``), so state-dict keys and parameter names are
    PyTorch's (``"0.weight"``, ``"1.running_mean"``, ...).

    Parameters
    ----------
    *layers : Module, or one list, tuple or OrderedDict of them
        The layers: bnfast.nn layers, bnfast's BatchNorm layers or your own
        Module subclasses.

    Raises
    ------
    TypeError
        A layer is not a :class:`~bnfast.nn.Module`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import Sequential, Linear, ReLU, BatchNorm1d
    >>> model = Sequential(Linear(4, 8, rng=0), BatchNorm1d(8), ReLU(), Linear(8, 2, rng=1))
    >>> y = model(np.ones((5, 4), np.float32))
    >>> gx = model.backward(np.ones_like(y))
    >>> len(model.parameters()), model.eval().training
    (6, False)
    >>> [name for name, _ in model.named_parameters()][:3]
    ['0.weight', '0.bias', '1.weight']
    """

    def __init__(self, *layers: Any) -> None:
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], OrderedDict):
            for name, layer in layers[0].items():
                self.add_module(name, self._checked(layer))
            return
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for layer in layers:
            self.append(layer)

    @staticmethod
    def _checked(layer: Any) -> Module:
        if not isinstance(layer, Module):
            raise TypeError(
                f"Sequential: {layer!r} is not a bnfast.nn.Module and does not follow the layer contract "
                "(subclass bnfast.nn.Module and implement forward and backward)"
            )
        return layer

    def append(self, layer: Module) -> "Sequential":
        """Add a module at the end, under the name ``str(len(self))``.

        Parameters
        ----------
        layer : Module
            The layer to run last.

        Returns
        -------
        Sequential
            ``self``.

        Raises
        ------
        TypeError
            ``layer`` is not a :class:`~bnfast.nn.Module`.
        """
        self.add_module(str(len(self._modules)), self._checked(layer))
        return self

    def _layers(self) -> list[Module]:
        return [m for m in self._modules.values() if m is not None]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Run every layer in order.

        A batch-norm layer (without an activation of its own) followed by a
        ReLU, LeakyReLU or ELU (alpha 1) runs as one fused layer
        (`bnfast.batch_norm_act_forward`): the same numbers as the two layers
        within rounding; ``backward`` then skips the activation layer.

        Parameters
        ----------
        x : numpy.ndarray
            Input of the first layer.

        Returns
        -------
        numpy.ndarray
            Output of the last layer.
        """
        from . import _fused
        from .activations import fusable_activation, fusable_norm

        layers, ran, i, previous = self._layers(), [], 0, None
        while i < len(layers):
            layer = layers[i]
            bind = getattr(type(layer), "_bind_preceding", None)  # cross-iteration BN reads its predecessor
            if bind is not None:
                bind(layer, previous)
            act = fusable_activation(layers[i + 1]) if i + 1 < len(layers) else None
            if act is not None and fusable_norm(layer):  # batch norm + activation: one pass
                with _fused.fused_call(layer, *act):
                    x = layer(x)
                i += 2
            else:
                x = layer(x)
                i += 1
            ran.append(layer)
            previous = layers[i - 1]
        self.__dict__["_ran"] = ran
        return x

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Run every layer's ``backward`` in reverse order.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient with respect to the output of the last layer.

        Returns
        -------
        numpy.ndarray
            Gradient with respect to the input of the first layer.
        """
        g = grad_out
        for layer in reversed(self.__dict__.get("_ran") or self._layers()):
            g = layer.backward(g)
        return g

    @overload
    def __getitem__(self, index: int) -> Module: ...

    @overload
    def __getitem__(self, index: slice) -> "Sequential": ...

    def __getitem__(self, index: Union[int, slice]) -> Union[Module, "Sequential"]:
        """The layer at ``index`` (negative counts from the end); a slice gives a Sequential.

        Parameters
        ----------
        index : int or slice

        Returns
        -------
        Module or Sequential
            A slice shares the layers (and keeps their names), as in PyTorch.

        Raises
        ------
        IndexError
            ``index`` is out of range.
        """
        items = list(self._modules.items())
        if isinstance(index, slice):
            return Sequential(OrderedDict(items[index]))
        try:
            layer = items[index][1]
        except IndexError:
            raise IndexError(f"Sequential index {index} is out of range for {len(items)} layers") from None
        if layer is None:
            raise IndexError(f"Sequential layer {index} was set to None")
        return layer

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._layers())
