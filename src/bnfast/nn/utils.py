"""Weight reparametrizations with PyTorch's classic API: weight and spectral normalization.

:func:`weight_norm` and :func:`spectral_norm` replace a module's parameter
(``weight``) by the parameters of a reparametrization and compute the weight
from them before every forward, as ``torch.nn.utils.weight_norm`` and
``torch.nn.utils.spectral_norm`` do, with their state-dict keys
(``weight_g``/``weight_v``; ``weight_orig`` and the buffers ``weight_u``/``weight_v``).

bnfast has no autograd, so each reparametrization uses two hook points of the
one :class:`~bnfast.nn.Module` base:

* a forward pre-hook (:meth:`~bnfast.nn.Module.register_forward_pre_hook`)
  computes the weight and sets it as a plain attribute ``module.weight`` (not
  a registered parameter: absent from ``parameters()`` and ``state_dict()``,
  like PyTorch's plain tensor).  It is a :class:`~bnfast.nn.Parameter`
  object only so that the layer's ``backward`` can store the weight's
  gradient in its ``.grad``;
* a backward hook (:meth:`~bnfast.nn.Module.register_full_backward_hook`)
  turns that gradient into the gradients of the new parameters (the chain
  rule of the reparametrization), so optimizers and ``fit`` train them.

The module must read the parameter as ``module.<name>`` in ``forward`` and
store its gradient in ``module.<name>.grad`` in ``backward``:
:class:`~bnfast.nn.Linear` and :class:`~bnfast.nn.Conv2d` do (bnfast's
normalization layers read their registries directly and are not supported).
"""

from __future__ import annotations

import numbers
from typing import Any, TypeVar

import numpy as np

from .._functional import _eps
from .._parameter import Parameter
from .module import Module

__all__ = ["weight_norm", "remove_weight_norm", "spectral_norm", "remove_spectral_norm"]

M = TypeVar("M", bound=Module)


def _set_computed(module: Module, name: str, weight: np.ndarray) -> None:
    """Set the computed weight as a plain, unregistered attribute (PyTorch sets a plain tensor).

    ``Module.__setattr__`` would register a Parameter, so the attribute goes
    into the instance dict directly; it is a Parameter for its ``.grad`` slot.
    """
    object.__setattr__(module, name, Parameter(weight, name))


def _computed(module: Module, name: str) -> Parameter:
    """The weight the last forward computed (the plain attribute)."""
    w: Parameter = module.__dict__[name]
    return w


def _param(module: Module, key: str) -> Parameter:
    """A parameter the reparametrization registered (present while it is applied)."""
    p = module._parameters[key]
    assert p is not None
    return p


def _buffer(module: Module, key: str) -> np.ndarray:
    b = module._buffers[key]
    assert b is not None
    return b


def _parameter(module: Any, name: Any, who: str) -> Parameter:
    """``module``'s registered floating-point parameter ``name``, or a clear error."""
    if not isinstance(module, Module):
        raise TypeError(f"{who}: module must be a bnfast.nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"{who}: name must be a string, got {type(name).__name__}")
    for hook in module.__dict__.get("_forward_pre_hooks", {}).values():
        if isinstance(hook, (_WeightNorm, _SpectralNorm)) and hook.name == name:
            raise ValueError(f"{who}: cannot register two weight_norm/spectral_norm hooks on the "
                             f"same parameter {name!r}")
    p = module._parameters.get(name)
    if p is None:
        raise ValueError(f"{who}: {type(module).__name__} has no parameter {name!r}")
    if p.dtype.kind != "f":
        raise TypeError(f"{who}: parameter {name!r} must be floating-point, got dtype {p.dtype}")
    return p


def _dim(dim: Any, ndim: int, who: str, *, whole: bool) -> int | None:
    """``dim`` checked and made non-negative; with ``whole``, None and -1 mean the whole tensor."""
    if dim is None:
        return None if whole else 0
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{who}: dim must be an integer or None, got {dim!r}")
    d = int(dim)
    if whole and d == -1:  # PyTorch's weight_norm: -1 is the norm over the whole tensor
        return None
    if not -ndim <= d < max(ndim, 1):
        raise ValueError(f"{who}: dim {d} is out of range for a parameter of {ndim} dimensions")
    return d % max(ndim, 1)


def _detach(module: Module, fn: Any) -> None:
    """Unregister every hook of the reparametrization ``fn`` (the object or its bound methods)."""
    for registry in ("_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks"):
        hooks = module.__dict__.get(registry, {})
        for key, hook in list(hooks.items()):
            if hook is fn or getattr(hook, "__self__", None) is fn:
                del hooks[key]


def _find(module: Any, cls: Any, name: str, who: str) -> Any:
    if not isinstance(module, Module):
        raise TypeError(f"{who}: module must be a bnfast.nn.Module, got {type(module).__name__}")
    hook: Any
    for hook in module.__dict__.get("_forward_pre_hooks", {}).values():
        if isinstance(hook, cls) and hook.name == name:
            return hook
    raise ValueError(f"{who}: {getattr(cls, '_what')} of {name!r} not found in {type(module).__name__}")


# ------------------------------------------------------------------- weight norm


class _WeightNorm:
    """``weight = g * v / ||v||``, the norm over every dimension but ``dim`` (None: all)."""

    _what = "weight_norm"

    def __init__(self, name: str, dim: int | None) -> None:
        self.name = name
        self.dim = dim
        self._norm: np.ndarray | None = None  # ||v|| of the last forward

    def _v_norm(self, v: np.ndarray) -> np.ndarray:
        if self.dim is None:
            return np.sqrt(np.sum(v * v))
        axes = tuple(i for i in range(v.ndim) if i != self.dim)
        return np.sqrt(np.sum(v * v, axis=axes, keepdims=True))

    def compute_weight(self, module: Module) -> tuple[np.ndarray, np.ndarray]:
        g = _param(module, self.name + "_g").data
        v = _param(module, self.name + "_v").data
        norm = self._v_norm(v)
        return v * (g / norm), norm

    def __call__(self, module: Module, args: tuple) -> None:  # forward pre-hook
        weight, self._norm = self.compute_weight(module)
        _set_computed(module, self.name, weight)

    def backward_hook(self, module: Module, grad_input: tuple, grad_output: tuple) -> None:
        grad = _computed(module, self.name).grad
        if grad is None or self._norm is None:
            return
        g_p, v_p = _param(module, self.name + "_g"), _param(module, self.name + "_v")
        g, v, norm = g_p.data, v_p.data, self._norm
        axes = None if self.dim is None else tuple(i for i in range(v.ndim) if i != self.dim)
        # d/dg: <grad, v> / ||v||;  d/dv: (g / ||v||) (grad - v <grad, v> / ||v||^2)
        grad_g = np.sum(grad * v, axis=axes, keepdims=self.dim is not None) / norm
        g_p.grad = np.asarray(grad_g, dtype=g.dtype).reshape(g.shape)
        v_p.grad = ((g / norm) * grad - (g * grad_g / (norm * norm)) * v).astype(v.dtype, copy=False)


def weight_norm(module: M, name: str = "weight", dim: int | None = 0) -> M:
    """Reparametrize ``module.<name>`` as ``g * v / ||v||`` (Salimans and Kingma, 2016).

    ``torch.nn.utils.weight_norm``'s semantics: the parameter is replaced by
    ``<name>_g`` (the norms) and ``<name>_v`` (the direction), the weight is
    computed from them before every ``module(x)`` (in training and eval
    mode), and ``backward`` fills ``<name>_g.grad`` and ``<name>_v.grad``.

    Parameters
    ----------
    module : Module
        A layer that reads ``module.<name>`` in ``forward`` and stores its
        gradient in ``module.<name>.grad`` (:class:`~bnfast.nn.Linear`,
        :class:`~bnfast.nn.Conv2d`).
    name : str, default "weight"
        The parameter to reparametrize.
    dim : int or None, default 0
        The dimension kept by the norm (one norm per output channel for 0);
        None or -1 (as in PyTorch): one norm over the whole parameter.
        Other negative values count from the end.

    Returns
    -------
    Module
        ``module`` itself, with parameters ``<name>_g`` (the norm, with 1 in
        every dimension but ``dim``; 0-d for the whole parameter) and
        ``<name>_v`` (initially the weight itself, sharing its memory)
        registered after the module's other parameters.

    Raises
    ------
    TypeError
        ``module`` is not a Module, ``name`` not a string, ``dim`` not an
        integer, or the parameter is not floating-point.
    ValueError
        The module has no parameter ``name``, ``dim`` is out of range, or
        ``name`` is already reparametrized (PyTorch raises RuntimeError).
        The module is unchanged.

    See Also
    --------
    remove_weight_norm : Back to a plain parameter.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> fc = nn.utils.weight_norm(nn.Linear(4, 3, rng=0))
    >>> list(fc.state_dict()), fc.weight_g.shape
    (['bias', 'weight_g', 'weight_v'], (3, 1))
    """
    weight = _parameter(module, name, "weight_norm")
    fn = _WeightNorm(name, _dim(dim, weight.ndim, "weight_norm", whole=True))
    delattr(module, name)
    module.register_parameter(name + "_g", Parameter(np.asarray(fn._v_norm(weight.data), weight.dtype),
                                                     name + "_g"))
    module.register_parameter(name + "_v", Parameter(weight.data, name + "_v"))
    fn(module, ())
    module.register_forward_pre_hook(fn)
    module.register_full_backward_hook(fn.backward_hook)
    return module


def remove_weight_norm(module: M, name: str = "weight") -> M:
    """Undo :func:`weight_norm`: ``<name>`` becomes a plain parameter again, with the computed value.

    Parameters
    ----------
    module : Module
        A module given to :func:`weight_norm`.
    name : str, default "weight"
        The reparametrized parameter.

    Returns
    -------
    Module
        ``module``, with ``<name>`` registered last and ``<name>_g``,
        ``<name>_v`` and the hooks removed.

    Raises
    ------
    TypeError
        ``module`` is not a Module.
    ValueError
        ``name`` is not reparametrized by weight_norm.
    """
    fn = _find(module, _WeightNorm, name, "remove_weight_norm")
    weight, _ = fn.compute_weight(module)
    _detach(module, fn)
    delattr(module, name)
    delattr(module, name + "_g")
    delattr(module, name + "_v")
    module.register_parameter(name, Parameter(weight, name))
    return module


# ----------------------------------------------------------------- spectral norm


def _normalize(a: np.ndarray, eps: float) -> np.ndarray:
    """``a / max(||a||, eps)`` (``torch.nn.functional.normalize``)."""
    return a / max(float(np.sqrt(np.dot(a, a))), eps)


class _SpectralNorm:
    """``weight = weight_orig / sigma``, sigma estimated by power iteration on ``weight_orig``."""

    _what = "spectral_norm"
    #: the layout of the state dict (PyTorch's SpectralNorm._version), stored in its _metadata
    _version = 1

    def __init__(self, name: str, n_power_iterations: int, dim: int, eps: float) -> None:
        self.name = name
        self.n_power_iterations = n_power_iterations
        self.dim = dim
        self.eps = eps
        self._last: tuple[Any, np.ndarray, np.ndarray] | None = None  # (sigma, u, v) of the last forward

    def _matrix(self, w: np.ndarray) -> np.ndarray:
        """The weight as ``(size of dim, rest)``, ``dim`` moved first."""
        if self.dim != 0:
            w = np.moveaxis(w, self.dim, 0)
        return w.reshape(w.shape[0], -1)

    def compute_weight(self, module: Module, do_power_iteration: bool) -> tuple[np.ndarray, Any]:
        w = _param(module, self.name + "_orig").data
        u, v = _buffer(module, self.name + "_u"), _buffer(module, self.name + "_v")
        mat = self._matrix(w)
        if do_power_iteration:  # updates the buffers in place, as PyTorch does
            for _ in range(self.n_power_iterations):
                v[...] = _normalize(mat.T @ u, self.eps)
                u[...] = _normalize(mat @ v, self.eps)
        sigma = np.dot(u, mat @ v)
        self._last = (sigma, u.copy(), v.copy())
        return w / sigma, sigma

    def __call__(self, module: Module, args: tuple) -> None:  # forward pre-hook
        weight, _ = self.compute_weight(module, do_power_iteration=module.training)
        _set_computed(module, self.name, weight)

    def backward_hook(self, module: Module, grad_input: tuple, grad_output: tuple) -> None:
        grad = _computed(module, self.name).grad
        if grad is None or self._last is None:
            return
        orig = _param(module, self.name + "_orig")
        sigma, u, v = self._last
        # u and v are constants (PyTorch: computed under no_grad); sigma = u^T W v, so
        # d/dW of L(W / sigma) = grad / sigma - <grad, W> / sigma^2 * u v^T
        g_mat, w_mat = self._matrix(grad), self._matrix(orig.data)
        d_mat = g_mat / sigma - (np.sum(g_mat * w_mat) / (sigma * sigma)) * np.outer(u, v)
        moved = np.moveaxis(orig.data, self.dim, 0).shape if self.dim != 0 else orig.shape
        d = d_mat.reshape(moved)
        if self.dim != 0:
            d = np.moveaxis(d, 0, self.dim)
        orig.grad = np.ascontiguousarray(d, dtype=orig.dtype)

    def state_dict_hook(self, module: Module, state_dict: Any, prefix: str, local_metadata: dict) -> None:
        versions = local_metadata.setdefault("spectral_norm", {})
        versions[self.name + ".version"] = self._version


def spectral_norm(module: M, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None, *, rng: Any = None) -> M:
    """Divide ``module.<name>`` by its spectral norm, estimated by power iteration (Miyato et al., 2018).

    ``torch.nn.utils.spectral_norm``'s semantics: the parameter becomes
    ``<name>_orig``, the buffers ``<name>_u`` and ``<name>_v`` hold the
    power-iteration vectors, and before every ``module(x)`` the weight
    ``<name>_orig / sigma`` is computed with ``sigma = u . (W v)``, ``W`` the
    parameter as a matrix with ``dim`` first.  In training mode
    ``n_power_iterations`` steps ``v = normalize(W^T u)``, ``u =
    normalize(W v)`` update the buffers in place first; in eval mode they are
    used as they are.  ``backward`` fills ``<name>_orig.grad``, with ``u`` and
    ``v`` constants (as in PyTorch).  After loading PyTorch's state dict,
    every forward repeats PyTorch's steps.

    Parameters
    ----------
    module : Module
        A layer that reads ``module.<name>`` in ``forward`` and stores its
        gradient in ``module.<name>.grad`` (:class:`~bnfast.nn.Linear`,
        :class:`~bnfast.nn.Conv2d`).
    name : str, default "weight"
        The parameter to normalize.
    n_power_iterations : int >= 1, default 1
        Power-iteration steps per training forward.
    eps : float >= 0, default 1e-12
        Lower bound of the norms the vectors are divided by.
    dim : int or None, default None
        The dimension of the output channels, moved first to form the
        matrix; None means 0 (PyTorch uses 1 only for transposed
        convolutions, which bnfast does not have).
    rng : int, numpy.random.Generator or None, optional
        Seed or generator for the initial ``u`` and ``v`` (normal, then
        normalized).

    Returns
    -------
    Module
        ``module``, with the parameter ``<name>_orig`` (the original array)
        and the buffers ``<name>_u``, ``<name>_v``; its state dict records
        ``{"spectral_norm": {"<name>.version": 1}}`` in ``_metadata``, as
        PyTorch's does.

    Raises
    ------
    TypeError
        Bad argument types, or a parameter that is not floating-point.
    ValueError
        The module has no parameter ``name``, ``n_power_iterations < 1``, a
        bad ``eps`` or ``dim``, or ``name`` is already reparametrized
        (PyTorch raises RuntimeError).  The module is unchanged.

    See Also
    --------
    remove_spectral_norm : Back to a plain parameter.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> fc = nn.utils.spectral_norm(nn.Linear(4, 3, rng=0), rng=0)
    >>> list(fc.state_dict())
    ['bias', 'weight_orig', 'weight_u', 'weight_v']
    >>> y = fc(np.ones((2, 4), np.float32))
    >>> bool(abs(np.linalg.svd(fc.weight, compute_uv=False)[0] - 1) < 0.5)
    True
    """
    weight = _parameter(module, name, "spectral_norm")
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, numbers.Integral):
        raise TypeError(f"spectral_norm: n_power_iterations must be an integer, got {n_power_iterations!r}")
    if n_power_iterations <= 0:
        raise ValueError(f"spectral_norm: expected n_power_iterations to be positive, got {n_power_iterations}")
    eps = _eps(eps)
    if weight.ndim == 0:
        raise ValueError(f"spectral_norm: parameter {name!r} must have at least one dimension")
    fn = _SpectralNorm(name, int(n_power_iterations), _dim(dim, weight.ndim, "spectral_norm", whole=False), eps)
    gen = np.random.default_rng(rng)
    h, w = fn._matrix(weight.data).shape
    u = _normalize(gen.standard_normal(h).astype(weight.dtype), eps)
    v = _normalize(gen.standard_normal(w).astype(weight.dtype), eps)
    delattr(module, name)
    module.register_parameter(name + "_orig", weight)
    _set_computed(module, name, weight.data)
    module.register_buffer(name + "_u", u)
    module.register_buffer(name + "_v", v)
    module.register_forward_pre_hook(fn)
    module.register_full_backward_hook(fn.backward_hook)
    module._register_state_dict_hook(fn.state_dict_hook)
    return module


def remove_spectral_norm(module: M, name: str = "weight") -> M:
    """Undo :func:`spectral_norm`: ``<name>`` becomes a plain parameter with the normalized value.

    The value is ``<name>_orig / sigma`` from the current ``u`` and ``v``
    (no power-iteration step).

    Parameters
    ----------
    module : Module
        A module given to :func:`spectral_norm`.
    name : str, default "weight"
        The normalized parameter.

    Returns
    -------
    Module
        ``module``, with ``<name>`` registered last and ``<name>_orig``,
        ``<name>_u``, ``<name>_v`` and the hooks removed.

    Raises
    ------
    TypeError
        ``module`` is not a Module.
    ValueError
        ``name`` is not normalized by spectral_norm.
    """
    fn = _find(module, _SpectralNorm, name, "remove_spectral_norm")
    weight, _ = fn.compute_weight(module, do_power_iteration=False)
    _detach(module, fn)
    delattr(module, name)
    delattr(module, name + "_u")
    delattr(module, name + "_v")
    delattr(module, name + "_orig")
    module.register_parameter(name, Parameter(weight, name))
    return module
