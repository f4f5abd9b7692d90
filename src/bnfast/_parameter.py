"""The trainable array of every layer and optimizer: an ``ndarray`` with a ``.grad``.

:class:`Parameter` plays the part of ``torch.nn.Parameter``: it *is* an array
(``isinstance(p, numpy.ndarray)``), so ``layer.weight`` can be indexed,
printed, passed to NumPy and combined arithmetically like any array, and it
carries the gradient of the loss with respect to it in ``p.grad``.

Design choices
--------------
* ``Parameter(array)`` shares memory with an ``ndarray`` argument (as
  ``torch.nn.Parameter(t)`` shares ``t``'s storage), whatever its layout;
  anything else is converted once with :func:`numpy.asarray`.  Pass
  ``array.copy()`` for a private copy.
* Results of arithmetic, ufuncs and reductions on a Parameter are plain
  ``ndarray`` objects (or NumPy scalars), as ``p * 2`` is a plain tensor in
  PyTorch.  In-place operators (``p -= g``) and ``out=p`` write into the
  Parameter and return it.
* Views, copies and ``astype`` results are made by NumPy through the
  subclass (NumPy cannot return a plain array there); they are Parameters
  *without* the original's ``grad``: the gradient belongs to the Parameter
  object itself.  ``numpy.asarray(p)`` and ``p.data`` give a plain ``ndarray``
  view of the same memory; the compiled fast path of the functional API only
  takes plain arrays, which is why the layers pass ``p.data``.
* ``p.data`` is cached (the same ``ndarray`` object each time), so
  ``p.data -= lr * g`` updates in place and references stay valid.
  Assigning ``p.data = value`` copies ``value`` into the existing memory
  (PyTorch rebinds the storage; NumPy arrays cannot be rebound).
* ``copy.deepcopy`` and pickling keep ``grad``, ``name`` and any attribute
  set on the Parameter; unpickling calls only this module's rebuild function.
* Parameters hash by identity (like tensors), so they can key dicts and
  sets; ``==`` stays element-wise.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

__all__ = ["Parameter"]

_NUMERIC_KINDS = frozenset("biufc")


def _rebuild_parameter(data: np.ndarray, state: dict[str, Any]) -> "Parameter":
    """Unpickle a :class:`Parameter` (the target of ``Parameter.__reduce_ex__``)."""
    p = Parameter(data, state.get("name", ""))
    p.__dict__.update(state)
    return p


def _copy_into(target: np.ndarray, value: Any, where: str) -> None:
    """Copy ``value`` into ``target`` in place with ``same_kind`` casting and an exact shape."""
    value = np.asarray(value)
    if not np.can_cast(value.dtype, target.dtype, "same_kind"):
        raise TypeError(
            f"{where}: cannot copy a value of dtype {value.dtype} into an array of dtype "
            f"{target.dtype} (only same-kind casts, e.g. float64 to float32, are allowed)"
        )
    if value.shape != target.shape:
        raise ValueError(f"{where} must have shape {target.shape} (got {value.shape})")
    np.copyto(target, value, casting="same_kind")


class Parameter(np.ndarray):
    """A trainable array (an ``ndarray`` subclass) and the gradient of the loss w.r.t. it.

    Layers register their Parameters (:meth:`bnfast.nn.Module.register_parameter`)
    and expose them under PyTorch's names (``layer.weight``);
    :meth:`backward <bnfast.nn.Module.backward>` stores gradients in ``.grad``
    and optimizers update the values in place, so every reference a user holds
    stays valid.

    Parameters
    ----------
    data : array_like
        The values.  An ``ndarray`` is shared, not copied (any layout); other
        inputs are converted with :func:`numpy.asarray`.  Must be numeric
        (bool, integer, floating or complex).
    name : str, optional
        A label for messages (layers use their attribute name, ``"weight"``,
        ...); state dicts use the name under which a module registered the
        Parameter, not this label.

    Attributes
    ----------
    grad : numpy.ndarray or None
        Gradient from the last ``backward``, same shape as the Parameter;
        ``None`` before any backward pass and after ``zero_grad``.
    name : str
        The label given at construction (``""`` by default).

    Raises
    ------
    TypeError
        ``data`` is not numeric (strings, objects, ...).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import Parameter
    >>> w = np.ones(3, np.float32)
    >>> p = Parameter(w)
    >>> isinstance(p, np.ndarray), np.shares_memory(p, w), p.grad is None
    (True, True, True)
    >>> type(p * 2).__name__
    'ndarray'
    >>> p.grad = np.full(3, 0.5, np.float32)
    >>> p -= 0.1 * p.grad              # in place: p stays the same Parameter
    >>> w
    array([0.95, 0.95, 0.95], dtype=float32)
    """

    grad: np.ndarray | None
    name: str
    _plain: np.ndarray | None

    def __new__(cls, data: Any, name: str = "") -> "Parameter":
        plain = np.asarray(data)  # the ndarray itself, or a plain view of a subclass (a Parameter)
        if plain.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"Parameter data must be numeric (got dtype {plain.dtype})")
        obj = plain.view(cls)
        obj.name = str(name)
        # The plain view served by ``.data``; it references ``plain``'s memory,
        # never ``obj`` (no reference cycle through the array base).
        obj._plain = plain
        return obj

    def __array_finalize__(self, obj: Any) -> None:
        # Called for views, copies and astype results made from a Parameter
        # (and for ``Parameter.__new__``'s own view): each starts without a
        # gradient and without a cached plain view.
        self.grad = None
        self.name = ""
        self._plain = None

    def __array_wrap__(self, arr: np.ndarray, context: Any = None, return_scalar: bool = False) -> Any:
        # Ufunc results are plain arrays (or scalars); an ``out=`` Parameter
        # (in-place operators) is returned as itself.
        if isinstance(arr, Parameter):
            return arr
        if return_scalar:
            return arr[()]
        return arr if type(arr) is np.ndarray else arr.view(np.ndarray)

    # Identity, like torch tensors (``==`` stays element-wise): Parameters can key dicts and sets.
    __hash__ = object.__hash__  # type: ignore[assignment]

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        """A plain ``ndarray`` view of the Parameter's memory (the same object on every call).

        Assigning copies the value into the existing memory (same shape,
        ``same_kind`` casting), so ``p.data -= lr * g`` works in place.
        """
        plain = self._plain
        if plain is None or plain.shape != self.shape:
            return self.view(np.ndarray)
        return plain

    @data.setter
    def data(self, value: Any) -> None:
        if value is self._plain:  # ``p.data -= ...`` assigns the updated view back
            return
        _copy_into(self.view(np.ndarray), value, "Parameter.data")

    def zero_grad(self) -> None:
        """Forget the stored gradient (set ``grad`` to None)."""
        self.grad = None

    def _state(self) -> dict[str, Any]:
        """``grad``, ``name`` and any attributes a user set (everything but the cached view)."""
        return {k: v for k, v in self.__dict__.items() if k != "_plain"}

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return (_rebuild_parameter, (self.view(np.ndarray), self._state()))

    def __reduce__(self) -> tuple:
        return self.__reduce_ex__(2)

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> "Parameter":
        memo = {} if memo is None else memo
        new = Parameter(np.array(self.view(np.ndarray), copy=True, order="K"), self.name)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self._state(), memo))
        return new
