"""Optimizers with PyTorch's update rules, updating ``Parameter.data`` in place.

Parameters whose ``grad`` is ``None`` are skipped, as in PyTorch.  Like
``torch.optim``, an optimizer holds ``param_groups`` (a list of dicts with
``"params"`` and the hyper-parameters); the schedulers change ``"lr"`` there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._parameter import Parameter
from .module import _unique_by_id

__all__ = ["Optimizer", "SGD", "Adam", "clip_grad_norm_"]


def _as_list(params: Any) -> list:
    """A single Parameter, a model (anything with ``parameters()``) or an iterable, as a list."""
    if isinstance(params, Parameter):
        return [params]
    if hasattr(params, "parameters") and callable(params.parameters):
        return list(params.parameters())
    return list(params)


def _param_list(params: Any, who: str) -> list[Parameter]:
    """:func:`_as_list`, checked to hold Parameters, each kept once."""
    params = _as_list(params)
    for p in params:
        if not isinstance(p, Parameter):
            raise TypeError(f"{who}: expected bnfast Parameter objects (e.g. model.parameters()), got {type(p).__name__}")
    return _unique_by_id(params)


class Optimizer:
    """Base class: parameter groups, ``zero_grad``, the ``lr`` shortcut and the ``step`` loop.

    :meth:`step` visits every parameter that has a gradient, adds the weight
    decay and calls ``_update(p, g, group)``, the one method a subclass
    implements (or it overrides :meth:`step` itself).

    Parameters
    ----------
    params : iterable of Parameter, or iterable of dict
        The parameters to optimise, or torch-style groups
        ``[{"params": [...], "lr": ...}, ...]`` whose missing options take
        the defaults.
    defaults : dict
        Default hyper-parameters of every group.
    """

    def __init__(self, params: Any, defaults: dict) -> None:
        name = type(self).__name__
        params = [params] if isinstance(params, dict) else _as_list(params)
        if not params:
            raise ValueError(f"{name}: got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        seen: set[int] = set()
        for g in groups:
            group = dict(self.defaults)
            group.update(g)
            group["params"] = _param_list(g["params"], name)
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError(f"{name}: a parameter appears in more than one group")
                seen.add(id(p))
            self._check_group(group)
            group.setdefault("initial_lr", group["lr"])
            self.param_groups.append(group)
        self.state: dict[int, dict] = {}

    def _check_group(self, group: dict) -> None:
        if group["lr"] < 0:
            raise ValueError(f"{type(self).__name__}: invalid learning rate {group['lr']}")
        if group.get("weight_decay", 0) < 0:
            raise ValueError(f"{type(self).__name__}: invalid weight_decay {group['weight_decay']}")

    @property
    def lr(self) -> float:
        """Learning rate of the first group; setting it sets every group's."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for g in self.param_groups:
            g["lr"] = float(value)

    def parameters(self) -> list[Parameter]:
        """Return every parameter of every group.

        Returns
        -------
        list of Parameter
            The parameters, group by group.
        """
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self) -> None:
        """Set the gradient of every parameter to ``None`` (PyTorch's default)."""
        for p in self.parameters():
            p.grad = None

    def step(self) -> None:
        """Apply one update to every parameter that has a gradient.

        Adds the L2 penalty ``weight_decay * p`` to each gradient and hands
        it to :meth:`_update`, which subclasses implement.
        """
        for group in self.param_groups:
            wd = group.get("weight_decay", 0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = np.asarray(p.grad, dtype=p.data.dtype)
                if wd != 0:
                    g = g + wd * p.data
                self._update(p, g, group)

    def _update(self, p: Parameter, g: np.ndarray, group: dict) -> None:  # pragma: no cover - abstract
        """Update ``p.data`` in place from the gradient ``g`` (weight decay included)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"{type(self).__name__}({opts})"


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, exactly as ``torch.optim.SGD``.

    For each parameter ``p`` with gradient ``g``::

        g = g + weight_decay * p
        buf = g                                   (first step)
        buf = momentum * buf + (1 - dampening) * g (later steps)
        g = g + momentum * buf  if nesterov else buf   (when momentum != 0)
        p -= lr * g

    Parameters
    ----------
    params : iterable of Parameter or of dict
        E.g. ``model.parameters()``.
    lr : float
        Learning rate.
    momentum : float, default 0
        Momentum factor; 0 for plain SGD.
    dampening : float, default 0
        The new gradient enters the momentum buffer times ``1 - dampening``.
    weight_decay : float, default 0
        L2 penalty added to the gradient.
    nesterov : bool, default False
        Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast._parameter import Parameter
    >>> from bnfast.nn import SGD
    >>> p = Parameter(np.array([1.0]))
    >>> opt = SGD([p], lr=0.1, momentum=0.9)
    >>> p.grad = np.array([1.0]); opt.step(); p.data
    array([0.9])
    """

    def __init__(self, params: Any, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if momentum < 0:
            raise ValueError(f"SGD: invalid momentum {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov momentum requires a momentum > 0 and zero dampening")
        super().__init__(params, dict(lr=float(lr), momentum=float(momentum), dampening=float(dampening),
                                      weight_decay=float(weight_decay), nesterov=bool(nesterov)))

    def _update(self, p: Parameter, g: np.ndarray, group: dict) -> None:
        mom = group["momentum"]
        if mom != 0:
            st = self.state.setdefault(id(p), {})
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = g.copy()
            else:
                buf *= mom
                buf += (1 - group["dampening"]) * g
            g = g + mom * buf if group["nesterov"] else buf
        p.data -= group["lr"] * g


class Adam(Optimizer):
    """Adam with bias correction, exactly as ``torch.optim.Adam`` (``amsgrad=False``).

    ``weight_decay`` is an L2 penalty added to the gradient (not AdamW's
    decoupled decay)::

        g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    Parameters
    ----------
    params : iterable of Parameter or of dict
        E.g. ``model.parameters()``.
    lr : float, default 1e-3
        Learning rate.
    betas : (float, float), default (0.9, 0.999)
        Decay rates of the running averages of the gradient and its square.
    eps : float, default 1e-8
        Added to the denominator for numerical stability.
    weight_decay : float, default 0
        L2 penalty added to the gradient.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast._parameter import Parameter
    >>> from bnfast.nn import Adam
    >>> p = Parameter(np.array([1.0]))
    >>> opt = Adam([p], lr=0.1)
    >>> p.grad = np.array([5.0]); opt.step(); p.data.round(6)
    array([0.9])
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        b1, b2 = betas
        if not 0.0 <= b1 < 1.0 or not 0.0 <= b2 < 1.0:
            raise ValueError(f"Adam: invalid betas {betas}")
        if eps < 0:
            raise ValueError(f"Adam: invalid eps {eps}")
        super().__init__(params, dict(lr=float(lr), betas=(float(b1), float(b2)), eps=float(eps),
                                      weight_decay=float(weight_decay)))

    def _update(self, p: Parameter, g: np.ndarray, group: dict) -> None:
        b1, b2 = group["betas"]
        st = self.state.setdefault(id(p), {})
        if not st:
            st.update(step=0, exp_avg=np.zeros_like(p.data), exp_avg_sq=np.zeros_like(p.data))
        st["step"] += 1
        t = st["step"]
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        # torch's order of operations (bias corrections as scalars), so results agree to rounding
        denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + group["eps"]
        p.data -= (group["lr"] / (1 - b1 ** t)) * (m / denom)


def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2.0) -> float:
    """Scale gradients in place so their joint norm is at most ``max_norm``.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: the norm is taken over
    all gradients together, and every gradient is multiplied by
    ``min(1, max_norm / (total_norm + 1e-6))``.

    Parameters
    ----------
    parameters : Parameter, iterable of Parameter, or a model
        Parameters without a gradient are ignored.
    max_norm : float
        Largest joint norm allowed.
    norm_type : float, default 2.0
        Order of the norm; ``float("inf")`` for the maximum norm.

    Returns
    -------
    float
        The total norm before clipping.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast._parameter import Parameter
    >>> from bnfast.nn import clip_grad_norm_
    >>> p = Parameter(np.zeros(2)); p.grad = np.array([3.0, 4.0])
    >>> clip_grad_norm_([p], 1.0)
    5.0
    >>> round(float(np.linalg.norm(p.grad)), 5)
    1.0
    """
    params = [p for p in _param_list(parameters, "clip_grad_norm_") if p.grad is not None]
    if not params:
        return 0.0
    norm_type = float(norm_type)
    if math.isinf(norm_type):
        total = max(float(np.max(np.abs(p.grad))) if p.grad.size else 0.0 for p in params)
    else:
        total = sum(float(np.sum(np.abs(p.grad.astype(np.float64)) ** norm_type)) for p in params)
        total = total ** (1.0 / norm_type)
    coef = float(max_norm) / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad *= np.asarray(coef, dtype=p.grad.dtype)
    return total
