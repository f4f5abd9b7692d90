"""Testing helpers for layers with a hand-written backward pass."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

__all__ = ["gradcheck"]


def _params(layer: Any) -> list:
    return list(layer.parameters()) if hasattr(layer, "parameters") else []


def _labels(layer: Any) -> list[str]:
    """``"parameter k (name)"`` for each of ``_params(layer)``, by registered (dotted) name."""
    if hasattr(layer, "named_parameters"):
        names = [name for name, _ in layer.named_parameters()]
    else:
        names = [getattr(p, "name", "") or "" for p in _params(layer)]
    return [f"parameter {k} ({name})" if name else f"parameter {k}" for k, name in enumerate(names)]


def gradcheck(layer: Any, x: Any, *, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-3,
              seed: Any = 0) -> bool:
    """Compare a layer's ``backward`` with central finite differences in float64.

    The scalar checked is ``L = sum(layer(x) * R)`` for a fixed random
    projection ``R``; ``layer.backward(R)`` must return ``dL/dx`` and store
    ``dL/dp`` in every ``Parameter.grad``.  Each entry of ``x`` and of every
    parameter is perturbed by ``±eps`` and the difference quotient compared
    with the analytic value: ``|analytic - numeric| <= atol + rtol * |numeric|``.

    Every evaluation runs on a fresh ``copy.deepcopy`` of ``layer``, so
    random state (e.g. dropout masks) is replayed identically, running
    statistics are not disturbed, and ``layer`` itself is left untouched.
    The check uses whatever mode the layer is in (``train()`` or ``eval()``).

    Parameters
    ----------
    layer : object
        Follows the layer contract: ``__call__``/``forward``,
        ``backward(grad_out) -> grad_input`` and (optionally)
        ``parameters()``.  Its parameters must be float64 (build it with
        ``dtype=np.float64``), otherwise finite differences are meaningless.
    x : array_like
        Input; converted to float64.  Keep it small: the cost is two forward
        passes per input and parameter entry.
    eps : float, default 1e-6
        Finite-difference step.
    atol, rtol : float, default 1e-5 and 1e-3
        Tolerances of the comparison.
    seed : int or None, default 0
        Seed of the random projection ``R``.

    Returns
    -------
    bool
        ``True`` when every entry matches.

    Raises
    ------
    AssertionError
        With the worst mismatch (which array, index, analytic and numeric
        values) when some entry does not match, or when ``backward`` returns
        a wrongly shaped gradient or leaves a parameter gradient unset.
    TypeError
        When a parameter is not float64.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> from bnfast.testing import gradcheck
    >>> layer = nn.Linear(3, 2, dtype=np.float64, rng=0)
    >>> gradcheck(layer, np.random.default_rng(0).normal(size=(4, 3)))
    True
    """
    x = np.array(x, dtype=np.float64, copy=True)
    labels = _labels(layer)
    for k, p in enumerate(_params(layer)):
        dtype = np.asarray(p).dtype
        if dtype != np.float64:
            raise TypeError(
                f"gradcheck: {labels[k]} has dtype {dtype}; finite differences "
                "need float64 parameters (build the layer with dtype=np.float64)"
            )

    def run(perturb: Any = None) -> tuple[Any, np.ndarray]:
        lay = copy.deepcopy(layer)
        xx = x
        if perturb is not None:
            which, idx, delta = perturb
            if which < 0:
                xx = x.copy()
                xx[idx] += delta
            else:
                _params(lay)[which].data[idx] += delta
        return lay, np.asarray(lay(xx))

    lay, y = run()
    if y.dtype != np.float64:
        raise AssertionError(f"gradcheck: the layer returned dtype {y.dtype} for a float64 input")
    R = np.random.default_rng(seed).standard_normal(y.shape)
    gx = np.asarray(lay.backward(R.copy()))
    if gx.shape != x.shape:
        raise AssertionError(f"gradcheck: backward returned shape {gx.shape}, input shape is {x.shape}")
    analytic: list[tuple[str, int, np.ndarray]] = [("input", -1, gx)]
    for k, p in enumerate(_params(lay)):
        if p.grad is None:
            raise AssertionError(f"gradcheck: backward left the gradient of {labels[k]} unset")
        g = np.asarray(p.grad)
        if g.shape != p.data.shape:
            raise AssertionError(
                f"gradcheck: gradient of {labels[k]} has shape {g.shape}, parameter {p.data.shape}"
            )
        analytic.append((labels[k], k, g))

    def loss(perturb: Any) -> float:
        _, yy = run(perturb)
        return float(np.sum(yy * R))

    worst: tuple[float, str, tuple, float, float] | None = None
    for label, which, g in analytic:
        for idx in np.ndindex(*g.shape):  # shapes checked above: g.shape is the perturbed array's
            num = (loss((which, idx, eps)) - loss((which, idx, -eps))) / (2 * eps)
            ana = float(g[idx])
            err = abs(ana - num)
            excess = err - (atol + rtol * abs(num))
            if not np.isfinite(ana) or excess > 0:
                score = np.inf if not np.isfinite(ana) else excess
                if worst is None or score > worst[0]:
                    worst = (score, label, idx, ana, num)
    if worst is not None:
        _, label, idx, ana, num = worst
        raise AssertionError(
            f"gradcheck failed for {type(layer).__name__}: worst mismatch in the gradient of {label} at "
            f"index {idx}: analytic {ana:.10g}, numeric {num:.10g}, |difference| {abs(ana - num):.3g} > "
            f"atol {atol:g} + rtol {rtol:g} * |numeric|"
        )
    return True
