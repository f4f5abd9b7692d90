"""Layers with explicit ``forward`` / ``backward`` for training without autograd.

Every layer follows bnfast's layer contract:

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
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .._parameter import Parameter

__all__ = [
    "Module",
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


def _unique_by_id(items: Iterable[Any], key: Callable[[Any], Any] = lambda item: item) -> list[Any]:
    """Keep the first item of every distinct ``key(item)`` object, in order.

    Identity rather than equality: a parameter shared by two layers is one
    parameter, while two equal arrays are two.
    """
    seen: set[int] = set()
    out: list[Any] = []
    for item in items:
        if id(key(item)) not in seen:
            seen.add(id(key(item)))
            out.append(item)
    return out


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


class Module:
    """Base class of bnfast.nn layers; subclass it for layers of your own.

    A subclass registers its trainable arrays with :meth:`register_parameter`
    and its sub-layers with :meth:`register_child`, then implements
    :meth:`forward` and :meth:`backward`.  Mode switching, parameter
    collection, ``zero_grad`` and ``state_dict`` come from this class.
    Children may be any object following the layer contract (for example
    bnfast's BatchNorm layers).

    Attributes
    ----------
    training : bool
        ``True`` in training mode (the initial mode), ``False`` after
        :meth:`eval`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import Module
    >>> class Scale(Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.s = self.register_parameter("s", np.ones(1))
    ...     def forward(self, x):
    ...         self._x = x
    ...         return x * self.s.data
    ...     def backward(self, g):
    ...         self.s.grad = np.array([(g * self._x).sum()])
    ...         return g * self.s.data
    >>> Scale()(np.arange(3.0))
    array([0., 1., 2.])
    """

    def __init__(self) -> None:
        self.training = True
        self._params: OrderedDict[str, Parameter] = OrderedDict()
        self._children: OrderedDict[str, Any] = OrderedDict()

    # -- registration -----------------------------------------------------
    def register_parameter(self, name: str, data: np.ndarray) -> Parameter:
        """Create, register and return a :class:`Parameter` holding ``data``.

        Parameters
        ----------
        name : str
            Name used by :meth:`state_dict` (``"weight"``, ``"bias"``, ...).
        data : numpy.ndarray
            Initial value; the parameter keeps this array (no copy).

        Returns
        -------
        Parameter
            The registered parameter; keep it as an attribute of the layer.
        """
        p = Parameter(np.asarray(data), name)
        self._params[name] = p
        return p

    def register_child(self, name: str, layer: Any) -> Any:
        """Register a sub-layer so that mode switches and parameters reach it.

        Parameters
        ----------
        name : str
            Prefix of the child's entries in :meth:`state_dict`.
        layer : object
            Any object following the layer contract.

        Returns
        -------
        object
            ``layer``, for chaining.
        """
        self._children[str(name)] = layer
        return layer

    def children(self) -> list[Any]:
        """Return the registered sub-layers in order.

        Returns
        -------
        list
            The sub-layers, in registration order.
        """
        return list(self._children.values())

    # -- contract -----------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Compute the layer's output; subclasses implement it.

        Parameters
        ----------
        x : numpy.ndarray
            The input.

        Returns
        -------
        numpy.ndarray
            The output.
        """
        raise NotImplementedError

    def backward(self, grad_out: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Back-propagate ``grad_out``; subclasses implement it.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient of the loss with respect to the last output.

        Returns
        -------
        numpy.ndarray
            Gradient of the loss with respect to the last input.
        """
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def parameters(self) -> list[Parameter]:
        """Return the trainable parameters of this layer and its children.

        Returns
        -------
        list of Parameter
            Each parameter once, in registration order (own first).
        """
        own = list(self._params.values())
        return _unique_by_id(own + [p for child in self._children.values() for p in child.parameters()])

    def named_parameters(self, prefix: str = "") -> list[tuple[str, Parameter]]:
        """Return ``(name, parameter)`` pairs under torch's dotted names.

        Children that have no ``named_parameters`` (for example bnfast's
        BatchNorm layers) are named by each :class:`Parameter`'s ``name``.

        Parameters
        ----------
        prefix : str, default ""
            Prepended to every name.

        Returns
        -------
        list of (str, Parameter)
            E.g. ``[("0.weight", ...), ("0.bias", ...), ("1.weight", ...)]``
            for a :class:`Sequential`; each parameter once.
        """
        pairs = [(prefix + name, p) for name, p in self._params.items()]
        for cname, child in self._children.items():
            if hasattr(child, "named_parameters"):
                pairs += child.named_parameters(prefix=f"{prefix}{cname}.")
            else:
                pairs += [(f"{prefix}{cname}.{getattr(p, 'name', '') or k}", p)
                          for k, p in enumerate(child.parameters())]
        return _unique_by_id(pairs, key=lambda pair: pair[1])

    def train(self, mode: bool = True) -> "Module":
        """Set training mode (``mode=True``) or evaluation mode on every layer.

        Parameters
        ----------
        mode : bool, default True
            True for training mode, False for evaluation mode.

        Returns
        -------
        Module
            ``self``.
        """
        self.training = bool(mode)
        for child in self._children.values():
            child.train(mode)
        return self

    def eval(self) -> "Module":
        """Switch this layer and its children to evaluation mode.

        Returns
        -------
        Module
            ``self``.
        """
        return self.train(False)

    def zero_grad(self) -> None:
        """Set ``grad`` of every parameter to ``None``."""
        for p in self.parameters():
            p.grad = None

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Return copies of the parameters (and children's state) under torch's keys.

        Children are prefixed by their registered name (``"0.weight"`` in a
        :class:`Sequential`), exactly as ``torch.nn.Module.state_dict``.

        Returns
        -------
        collections.OrderedDict of str to numpy.ndarray
            Copies of the arrays, under dotted names.
        """
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for name, p in self._params.items():
            out[name] = p.data.copy()
        for cname, child in self._children.items():
            if hasattr(child, "state_dict"):
                for k, v in child.state_dict().items():
                    out[f"{cname}.{k}"] = v
        return out

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays from ``state`` into the parameters and children.

        Parameters
        ----------
        state : mapping of str to array_like
            As produced by :meth:`state_dict` or by torch
            (``{k: v.numpy() for k, v in torch_model.state_dict().items()}``).
        strict : bool, default True
            Raise ``KeyError`` on missing or unexpected keys.

        Raises
        ------
        KeyError
            Missing or unexpected keys when ``strict``.
        ValueError
            A shape differs from the parameter's.
        """
        state = dict(state)
        own = {k: v for k, v in state.items() if "." not in k}
        expected = set(self._params)
        if strict:
            missing = sorted(expected - set(own))
            unexpected = sorted(set(own) - expected)
            prefixes = {k.split(".", 1)[0] for k in state if "." in k}
            unexpected += sorted(f"{p}.*" for p in prefixes - set(self._children))
            if missing or unexpected:
                raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        # Check every shape before copying anything, so that a bad entry
        # leaves the parameters as they were.
        for name, p in self._params.items():
            if name in own:
                v = np.asarray(own[name])
                if v.shape != p.data.shape:
                    raise ValueError(
                        f"load_state_dict: {name!r} has shape {v.shape}, expected {p.data.shape}"
                    )
        for name, p in self._params.items():
            if name in own:
                p.data[...] = np.asarray(own[name])
        for cname, child in self._children.items():
            sub = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(cname + ".")}
            if hasattr(child, "load_state_dict"):
                child.load_state_dict(sub, strict=strict)

    # -- display ----------------------------------------------------------------
    def extra_repr(self) -> str:
        """Return the argument summary shown inside the repr.

        Returns
        -------
        str
            The text between the parentheses of ``repr(layer)``; empty here,
            subclasses override it.
        """
        return ""

    def __repr__(self) -> str:
        if not self._children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in self._children.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        lines.append(")")
        return "\n".join(lines)


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
        self._weight = self.register_parameter(
            "weight", gen.uniform(-bound, bound, weight_shape).astype(dtype))
        self._bias = (
            self.register_parameter("bias", gen.uniform(-bound, bound, weight_shape[0]).astype(dtype))
            if bias else None
        )

    # Shape of the last forward output, which backward checks grad_out against.
    _out_shape: tuple[int, ...] | None = None

    weight = property(lambda self: self._weight.data, doc="Weight array.")
    bias = property(lambda self: None if self._bias is None else self._bias.data,
                    doc="Bias array ``(out,)`` or None.")
    grad_weight = property(lambda self: self._weight.grad, doc="Gradient of ``weight``.")
    grad_bias = property(lambda self: None if self._bias is None else self._bias.grad,
                         doc="Gradient of ``bias``.")

    def _weight_matrix(self, dtype: np.dtype) -> np.ndarray:
        """The weight as an ``(out, fan_in)`` matrix in ``dtype`` (a view when the dtype matches)."""
        w = self._weight.data
        return w.reshape(w.shape[0], -1).astype(dtype, copy=False)

    def _matmul_forward(self, cols: np.ndarray) -> np.ndarray:
        """``cols @ W.T + bias`` in the dtype of ``cols``; ``cols`` is ``(..., fan_in)``."""
        out = cols @ self._weight_matrix(cols.dtype).T
        if self._bias is not None:
            out += self._bias.data.astype(cols.dtype, copy=False)
        return out

    def _matmul_backward(self, g2: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Store the parameter gradients and return the gradient of ``cols``.

        ``g2`` is ``(M, out)`` and ``cols`` the ``(M, fan_in)`` matrix of the
        forward pass; the gradients are cast to the parameters' dtype.
        """
        w = self._weight.data
        self._weight.grad = (g2.T @ cols).reshape(w.shape).astype(w.dtype, copy=False)
        if self._bias is not None:
            self._bias.grad = g2.sum(axis=0).astype(self._bias.data.dtype, copy=False)
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
    weight : numpy.ndarray
        ``(out_features, in_features)``.
    bias : numpy.ndarray or None
        ``(out_features,)``.
    grad_weight, grad_bias : numpy.ndarray or None
        Gradients from the last :meth:`backward`.

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

    weight = property(_WeightBiasLayer.weight.fget, doc="Weight array ``(out, in)``.")

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
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self._bias is not None}"


class Conv2d(_WeightBiasLayer):
    """2-D convolution (cross-correlation) like ``torch.nn.Conv2d``.

    Implemented as im2col (``numpy.lib.stride_tricks.sliding_window_view``)
    followed by one matrix product; the backward pass is a matrix product and
    a scatter-add over the kernel offsets.

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
    weight : numpy.ndarray
        ``(out_channels, in_channels, kh, kw)``.
    bias : numpy.ndarray or None
    grad_weight, grad_bias : numpy.ndarray or None

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

    weight = property(_WeightBiasLayer.weight.fget, doc="Weight array ``(out, in, kh, kw)``.")

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
        xn = _to_nhwc(x, self.axis)
        n, h, w, c = xn.shape
        if c != self.in_channels:
            raise ValueError(
                f"Conv2d(in_channels={self.in_channels}, axis={self.axis}): input {_LAYOUTS[self.axis]} has "
                f"{c} channels (shape {x.shape})"
            )
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if h + 2 * ph < kh or w + 2 * pw < kw:
            raise ValueError(
                f"Conv2d: padded input ({h + 2 * ph}x{w + 2 * pw}) is smaller than the kernel ({kh}x{kw})"
            )
        if ph or pw:
            xn = np.pad(xn, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
        oh = (h + 2 * ph - kh) // sh + 1
        ow = (w + 2 * pw - kw) // sw + 1
        # (N, OH, OW, C, kh, kw) view; the reshape is the one im2col copy and
        # orders each row (C, kh, kw) like a row of the weight matrix.
        win = np.lib.stride_tricks.sliding_window_view(xn, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
        cols = win.reshape(n * oh * ow, c * kh * kw)
        out = self._matmul_forward(cols).reshape(n, oh, ow, self.out_channels)
        out = _from_nhwc(out, self.axis)
        self._cache = (cols, (n, h, w, c), (oh, ow))
        self._out_shape = out.shape
        return out

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
        cols, (n, h, w, c), (oh, ow) = self._cache
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
        if self._bias is None:
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
    """Chain layers; ``backward`` runs them in reverse.

    Parameters
    ----------
    *layers
        Objects following the layer contract (bnfast.nn layers, bnfast's
        BatchNorm layers, or your own).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import Sequential, Linear, ReLU, BatchNorm1d
    >>> model = Sequential(Linear(4, 8, rng=0), BatchNorm1d(8), ReLU(), Linear(8, 2, rng=1))
    >>> y = model(np.ones((5, 4), np.float32))
    >>> gx = model.backward(np.ones_like(y))
    >>> len(model.parameters()), model.eval().training
    (6, False)
    """

    def __init__(self, *layers: Any) -> None:
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for layer in layers:
            self.append(layer)

    def append(self, layer: Any) -> "Sequential":
        """Add a layer at the end.

        Parameters
        ----------
        layer : object
            Must have ``forward``/``__call__``, ``backward``, ``parameters``
            and ``train``.

        Returns
        -------
        Sequential
            ``self``.
        """
        for attr in ("backward", "parameters", "train"):
            if not hasattr(layer, attr):
                raise TypeError(f"Sequential: {layer!r} has no {attr}() and does not follow the layer contract")
        layer.train(self.training)
        self.register_child(str(len(self._children)), layer)
        return self

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Run every layer in order.

        Parameters
        ----------
        x : numpy.ndarray
            Input of the first layer.

        Returns
        -------
        numpy.ndarray
            Output of the last layer.
        """
        for layer in self._children.values():
            x = layer(x)
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
        for layer in reversed(list(self._children.values())):
            g = layer.backward(g)
        return g

    def __getitem__(self, i: int) -> Any:
        return list(self._children.values())[i]

    def __len__(self) -> int:
        return len(self._children)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._children.values()))
