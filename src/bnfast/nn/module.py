"""The one base class of bnfast's layers, with the contract of ``torch.nn.Module``.

A :class:`Module` owns three ordered registries:

* parameters (:class:`~bnfast._parameter.Parameter` or None), trained by the
  optimizers;
* buffers (plain ``ndarray`` or None), state that is not trained, such as
  running statistics; persistent buffers are part of the state dict;
* child modules.

Assigning a Parameter or a Module to an attribute registers it, reading the
attribute finds it, ``del`` removes it.  Everything that walks a model --
``train``/``eval``, ``parameters``, ``zero_grad``, ``state_dict``,
``load_state_dict``, ``apply``, ``repr`` -- goes through these registries, so
one implementation serves every layer.

Differences from PyTorch, all deliberate:

* No autograd: a layer implements ``forward`` *and* ``backward``;
  ``backward(grad_out)`` returns the gradient w.r.t. the input of the last
  ``forward`` and stores parameter gradients in ``Parameter.grad``.
* Hooks (``register_forward_pre_hook``, ``register_forward_hook``,
  ``register_full_backward_pre_hook``, ``register_full_backward_hook``, each
  returning a :class:`RemovableHandle`) run around ``forward`` when the module
  is called and around every ``backward`` call: each subclass's ``backward``
  is wrapped once, when the class is created.  Backward hooks see one-element
  tuples ``(grad,)`` and run after the parameters' ``.grad`` are stored.
* The walkers (``parameters``, ``named_modules``, ...) return lists, not
  generators: they can be indexed, measured and iterated twice.
* Assigning an array to an attribute that holds a registered parameter or
  buffer copies it into the existing array in place (same shape,
  ``same_kind`` casting): references held by optimizers and users stay valid.
  To replace the array object itself, assign a new :class:`Parameter` or call
  :meth:`Module.register_buffer` again.
* ``state_dict`` holds copies (plain arrays) unless ``keep_vars``;
  ``load_state_dict`` copies into the existing arrays, checks every entry
  before changing anything (all or nothing) and raises
  :class:`StateDictError`, a ``ValueError`` that is also a ``RuntimeError``.
"""

from __future__ import annotations

import functools
import itertools
import os
import weakref
from collections import OrderedDict, namedtuple
from collections.abc import Mapping, MutableMapping
from typing import Any, Callable, Iterable, TypeVar

import numpy as np

from .._parameter import Parameter, _copy_into

__all__ = ["Module", "IncompatibleKeys", "StateDictError", "RemovableHandle"]

T = TypeVar("T", bound="Module")


class StateDictError(ValueError, RuntimeError):
    """``load_state_dict`` found missing, unexpected or mis-shaped entries.

    A ``ValueError`` (bnfast's rule for bad values) and a ``RuntimeError``
    (what ``torch.nn.Module.load_state_dict`` raises), so handlers written for
    either catch it.  The message lists every problem, in PyTorch's wording:
    ``Error(s) in loading state_dict for BatchNorm2d: Missing key(s) in
    state_dict: "running_var". ...``.
    """


class IncompatibleKeys(namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])):
    """Keys that did not match in :meth:`Module.load_state_dict` (a named tuple).

    Parameters
    ----------
    missing_keys : list of str
        Keys the module expects that the state dict did not contain.
    unexpected_keys : list of str
        Keys of the state dict that the module does not have.

    Attributes
    ----------
    missing_keys : list of str
        Keys the module expects that the state dict did not contain.
    unexpected_keys : list of str
        Keys of the state dict that the module does not have.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return super().__repr__()

    __str__ = __repr__


def _unique_by_id(items: Iterable[Any], key: Callable[[Any], Any] = lambda item: item) -> list[Any]:
    """Keep the first item of every distinct ``key(item)`` object, in order.

    Identity rather than equality: a parameter shared by two layers is one
    parameter, while two equal arrays are two.
    """
    seen: set[int] = set()
    out: list[Any] = []
    for item in items:
        k = id(key(item))
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} name should be a string (got {type(name).__name__})")
    if name == "":
        raise ValueError(f'{what} name can\'t be empty string ""')
    if "." in name:
        raise ValueError(f'{what} name can\'t contain "." (got {name!r})')
    return name


def _indent(text: str, spaces: int) -> str:
    """Indent every line of ``text`` but the first."""
    return text.replace("\n", "\n" + " " * spaces)


def _state_array(value: Any, key: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except Exception as exc:  # e.g. a torch tensor that requires grad
        raise TypeError(f"state_dict[{key!r}] cannot be converted to a NumPy array: {exc}") from exc


class RemovableHandle:
    """The handle a ``register_*hook`` method returns: ``handle.remove()`` unregisters the hook.

    Like ``torch.utils.hooks.RemovableHandle``; also a context manager that
    removes the hook on exit.  Removing twice, or after the module is gone,
    does nothing.

    Parameters
    ----------
    hooks_dict : collections.OrderedDict
        The registry the hook is stored in, under :attr:`id`.

    Attributes
    ----------
    id : int
        The hook's key in its registry (unique in the process).
    """

    _ids = itertools.count()

    def __init__(self, hooks_dict: "OrderedDict[int, Callable[..., Any]]") -> None:
        self.hooks_dict_ref = weakref.ref(hooks_dict)
        self.id = next(RemovableHandle._ids)

    def remove(self) -> None:
        """Unregister the hook (nothing happens if it is already gone)."""
        hooks = self.hooks_dict_ref()
        if hooks is not None:
            hooks.pop(self.id, None)

    def __enter__(self) -> "RemovableHandle":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()


_HOOK_REGISTRIES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
                    "_state_dict_hooks")


def _one(result: Any) -> Any:
    """A hook's replacement for a one-element tuple of arrays: the array."""
    return result[0] if isinstance(result, tuple) else result


def _with_backward_hooks(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a subclass's ``backward`` so the module's backward hooks run around it.

    Applied once per class by :meth:`Module.__init_subclass__`.  Only the
    outermost call on an instance runs the hooks (a ``super().backward``
    inside a hooked ``backward`` does not run them again); without hooks the
    wrapper adds one dictionary lookup.
    """

    @functools.wraps(backward)
    def hooked(self: "Module", *args: Any, **kwargs: Any) -> Any:
        d = self.__dict__
        pre, post = d.get("_backward_pre_hooks"), d.get("_backward_hooks")
        if not (pre or post) or d.get("_running_backward_hooks"):
            return backward(self, *args, **kwargs)
        if args:  # the gradient: the first argument (or the keyword grad_out)
            grad_out, args = args[0], args[1:]
        elif "grad_out" in kwargs:
            grad_out = kwargs.pop("grad_out")
        else:
            raise TypeError(f"{type(self).__name__}.backward: backward hooks need the gradient as its "
                            "first argument")
        d["_running_backward_hooks"] = True
        try:
            for hook in list(pre.values()) if pre else ():
                result = hook(self, (grad_out,))
                if result is not None:
                    grad_out = _one(result)
            grad_in = backward(self, grad_out, *args, **kwargs)
            for hook in list(post.values()) if post else ():
                result = hook(self, (grad_in,), (grad_out,))
                if result is not None:
                    grad_in = _one(result)
        finally:
            del d["_running_backward_hooks"]
        return grad_in

    hooked._bnfast_backward_hooks = True  # type: ignore[attr-defined]
    return hooked


class Module:
    """Base class of every bnfast layer; subclass it for layers of your own.

    A subclass calls ``super().__init__()`` first, then assigns its
    :class:`~bnfast._parameter.Parameter` objects, buffers
    (:meth:`register_buffer`) and sub-modules as attributes, and implements
    :meth:`forward` and :meth:`backward`.  Mode switching, parameter
    collection, ``zero_grad``, state dicts, ``save``/``load`` and the repr come
    from this class and follow ``torch.nn.Module``.

    Attributes
    ----------
    training : bool
        ``True`` in training mode (the initial mode), ``False`` after
        :meth:`eval`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.nn import Module, Parameter
    >>> class Scale(Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.s = Parameter(np.ones(1))
    ...     def forward(self, x):
    ...         self._x = x
    ...         return x * self.s
    ...     def backward(self, g):
    ...         self.s.grad = np.array([(g * self._x).sum()])
    ...         return g * self.s
    >>> m = Scale()
    >>> m(np.arange(3.0))
    array([0., 1., 2.])
    >>> [name for name, _ in m.named_parameters()], list(m.state_dict())
    (['s'], ['s'])
    """

    #: Version of the module's state-dict layout, stored in ``state_dict()._metadata``
    #: and handed back to :meth:`_load_from_state_dict` (as in PyTorch).
    _version: int = 1

    training: bool
    _parameters: "OrderedDict[str, Parameter | None]"
    _buffers: "OrderedDict[str, np.ndarray | None]"
    _non_persistent_buffers_set: set[str]
    _modules: "OrderedDict[str, Module | None]"

    def __init__(self) -> None:
        d = self.__dict__
        d["training"] = True
        d["_parameters"] = OrderedDict()
        d["_buffers"] = OrderedDict()
        d["_non_persistent_buffers_set"] = set()
        d["_modules"] = OrderedDict()
        for registry in _HOOK_REGISTRIES:
            d[registry] = OrderedDict()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Each class that defines backward gets it wrapped once, so that the
        # backward hooks of an instance run whoever calls backward (Sequential,
        # fit, user code): the class-level counterpart of __call__ for forward.
        super().__init_subclass__(**kwargs)
        backward = cls.__dict__.get("backward")
        if callable(backward) and not getattr(backward, "_bnfast_backward_hooks", False):
            cls.backward = _with_backward_hooks(backward)  # type: ignore[method-assign]

    # ------------------------------------------------------------------ registration
    def _check_new_attribute(self, name: str, store: str) -> None:
        d = self.__dict__
        if "_parameters" not in d:
            raise AttributeError(f"cannot register a {store} before Module.__init__() call")
        taken = (
            (name in d or hasattr(type(self), name))
            or (store != "parameter" and name in d["_parameters"])
            or (store != "buffer" and name in d["_buffers"])
            or (store != "module" and name in d["_modules"])
        )
        if taken:
            raise ValueError(f"attribute {name!r} already exists")

    def register_parameter(self, name: str, param: Any) -> Parameter | None:
        """Add a parameter to the module under ``name``.

        Parameters
        ----------
        name : str
            Attribute name and state-dict key (no ``"."``, not empty, not an
            existing non-parameter attribute).
        param : Parameter, numpy.ndarray or None
            The parameter.  A plain ``ndarray`` is wrapped in a
            :class:`Parameter` sharing its memory (PyTorch requires a
            Parameter).  ``None`` declares an absent parameter (left out of
            :meth:`parameters` and :meth:`state_dict`), e.g. ``bias`` of a
            layer built with ``bias=False``.

        Returns
        -------
        Parameter or None
            The registered object.

        Raises
        ------
        TypeError
            ``name`` is not a string, or ``param`` is neither a Parameter, an
            ndarray nor None.
        ValueError
            ``name`` is empty, contains ``"."`` or is already another attribute.
        AttributeError
            Called before ``Module.__init__``.
        """
        _check_name(name, "parameter")
        self._check_new_attribute(name, "parameter")
        if param is not None and not isinstance(param, Parameter):
            if not isinstance(param, np.ndarray):
                raise TypeError(
                    f"cannot assign '{type(param).__name__}' object to parameter '{name}' "
                    "(bnfast.nn.Parameter, numpy.ndarray or None required)"
                )
            param = Parameter(param, name)
        self._parameters[name] = param
        return param

    def register_buffer(self, name: str, tensor: np.ndarray | None, persistent: bool = True) -> None:
        """Add a buffer: an array that is module state but not a trainable parameter.

        Running statistics are buffers.  Registering an existing buffer name
        again replaces the array object (attribute assignment instead copies
        into the existing array).

        Parameters
        ----------
        name : str
            Attribute name and state-dict key.
        tensor : numpy.ndarray or None
            The array, kept as it is (no copy); None declares an absent buffer.
        persistent : bool, default True
            Whether the buffer is part of :meth:`state_dict`.

        Raises
        ------
        TypeError
            ``name`` is not a string, or ``tensor`` is not an ndarray or None
            (a :class:`Parameter` is registered with :meth:`register_parameter`).
        ValueError
            ``name`` is empty, contains ``"."`` or is already another attribute.
        AttributeError
            Called before ``Module.__init__``.
        """
        _check_name(name, "buffer")
        self._check_new_attribute(name, "buffer")
        if tensor is not None and (not isinstance(tensor, np.ndarray) or isinstance(tensor, Parameter)):
            raise TypeError(
                f"cannot assign '{type(tensor).__name__}' object to buffer '{name}' "
                "(numpy.ndarray or None required; parameters go through register_parameter)"
            )
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent_buffers_set.discard(name)
        else:
            self._non_persistent_buffers_set.add(name)

    def add_module(self, name: str, module: "Module | None") -> None:
        """Add a child module under ``name`` (``self.name = module`` does the same).

        Parameters
        ----------
        name : str
            Attribute name and the prefix of the child's state-dict keys.
        module : Module or None
            The child; None declares an absent child.

        Raises
        ------
        TypeError
            ``name`` is not a string, or ``module`` is not a Module or None.
        ValueError
            ``name`` is empty, contains ``"."`` or is already another attribute.
        AttributeError
            Called before ``Module.__init__``.
        """
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a bnfast.nn.Module subclass")
        _check_name(name, "module")
        self._check_new_attribute(name, "module")
        self._modules[name] = module

    def register_module(self, name: str, module: "Module | None") -> None:
        """Register a child module; an alias of :meth:`add_module`.

        Parameters
        ----------
        name : str
            Attribute name and the prefix of the child's state-dict keys.
        module : Module or None
            The child; None declares an absent child.

        Raises
        ------
        TypeError, ValueError, AttributeError
            As :meth:`add_module`.
        """
        self.add_module(name, module)

    def register_child(self, name: str, module: "Module") -> "Module":
        """Older name of :meth:`add_module` (bnfast 0.1) that returns the module.

        Parameters
        ----------
        name : str
            Attribute name and the prefix of the child's state-dict keys.
        module : Module
            The child.

        Returns
        -------
        Module
            ``module``.

        Raises
        ------
        TypeError, ValueError, AttributeError
            As :meth:`add_module`.
        """
        self.add_module(str(name), module)
        return module

    # ------------------------------------------------------------------ attributes
    def __getattr__(self, name: str) -> Any:
        # Only called when ordinary lookup fails: parameters, buffers and
        # children live in the registries, not in the instance dict.
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            registry = d.get(store)
            if registry is not None and name in registry:
                return registry[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        if name in d and not isinstance(value, (Parameter, Module)):
            # An existing ordinary attribute, the common case (a layer's saved
            # state): registered names never live in the instance dict, and a
            # name there is not a data descriptor of the class.
            d[name] = value
            return
        params = d.get("_parameters")
        if isinstance(value, Parameter):
            if params is None:
                raise AttributeError("cannot assign parameters before Module.__init__() call")
            self._forget(name)
            self.register_parameter(name, value)
        elif isinstance(value, Module):
            if params is None:
                raise AttributeError("cannot assign a module before Module.__init__() call")
            self._forget(name)
            self.add_module(name, value)
        elif params is not None and name in params:
            self._assign_state(params, name, value)
        elif params is not None and name in d["_buffers"]:
            self._assign_state(d["_buffers"], name, value)
        elif params is not None and name in d["_modules"]:
            if value is not None:
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as child module '{name}' "
                    "(bnfast.nn.Module or None expected)"
                )
            d["_modules"][name] = None
        else:
            object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            registry = d.get(store)
            if registry is not None and name in registry:
                del registry[name]
                if store == "_buffers":
                    d["_non_persistent_buffers_set"].discard(name)
                return
        object.__delattr__(self, name)

    def __dir__(self) -> list[str]:
        keys = list(super().__dir__())
        for store in ("_parameters", "_buffers", "_modules"):
            keys += list(self.__dict__.get(store, ()))
        return sorted(set(keys))

    def _forget(self, name: str) -> None:
        """Remove ``name`` from the instance dict and every registry (before re-registering it)."""
        d = self.__dict__
        d.pop(name, None)
        for store in ("_parameters", "_buffers", "_modules"):
            d[store].pop(name, None)
        d["_non_persistent_buffers_set"].discard(name)

    def _assign_state(self, registry: "OrderedDict[str, Any]", name: str, value: Any) -> None:
        """``self.name = value`` for a registered parameter or buffer that is not a Parameter."""
        if value is None:
            registry[name] = None
            return
        target = registry[name]
        if target is None:
            raise AttributeError(self._absent_state_message(name))
        value = _state_array(value, name)
        self._check_state_value(name, value)
        _copy_into(target, value, name)

    def _absent_state_message(self, name: str) -> str:
        """The message of the AttributeError raised when an array is assigned to a None slot.

        Layers override it to say why the slot is empty (``affine=False``, ...).

        Parameters
        ----------
        name : str

        Returns
        -------
        str
        """
        return (
            f"{type(self).__name__} has no {name} (registered as None); assign a Parameter or "
            "call register_buffer to create one"
        )

    def _check_state_value(self, name: str, value: np.ndarray) -> None:
        """Validate ``value`` for this module's parameter or buffer ``name``; override to restrict.

        Called by attribute assignment and :meth:`load_state_dict` before the
        generic dtype and shape checks.  Raise ``TypeError`` or ``ValueError``.

        Parameters
        ----------
        name : str
            Local name of the parameter or buffer.
        value : numpy.ndarray
            The candidate value.
        """

    # ------------------------------------------------------------------ walking
    def named_children(self) -> list[tuple[str, "Module"]]:
        """Immediate child modules with their names, each module once.

        Returns
        -------
        list of (str, Module)
            In registration order; None children are skipped.
        """
        return _unique_by_id(
            ((name, m) for name, m in self._modules.items() if m is not None), key=lambda pair: pair[1]
        )

    def children(self) -> list["Module"]:
        """Immediate child modules, each once.

        Returns
        -------
        list of Module
            In registration order; None children are skipped.
        """
        return [m for _, m in self.named_children()]

    def named_modules(
        self, memo: set[int] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> list[tuple[str, "Module"]]:
        """Return this module and all its descendants, depth first, with dotted names.

        Parameters
        ----------
        memo : set of int, optional
            The ``id()`` of each module already visited (internal, as in PyTorch).
        prefix : str, default ""
            Name of this module; children are named ``prefix + "." + name``.
        remove_duplicate : bool, default True
            Visit a module reachable along several paths only once (first path).

        Returns
        -------
        list of (str, Module)
            ``("", self)`` first, then e.g. ``("0", ...)``, ``("0.1", ...)``.
        """
        out: list[tuple[str, Module]] = []
        if memo is None:
            memo = set()
        self._collect_modules(memo, prefix, remove_duplicate, out)
        return out

    def _collect_modules(self, memo: set[int], prefix: str, remove_duplicate: bool,
                         out: list[tuple[str, "Module"]]) -> None:
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        out.append((prefix, self))
        for name, module in self._modules.items():
            if module is not None:
                module._collect_modules(memo, prefix + ("." if prefix else "") + name, remove_duplicate, out)

    def modules(self) -> list["Module"]:
        """Return this module and all its descendants, each once.

        Returns
        -------
        list of Module
            ``self`` first, then its descendants, depth first.
        """
        return [m for _, m in self.named_modules()]

    def _named_members(self, store: str, prefix: str, recurse: bool, remove_duplicate: bool,
                       persistent_only: bool = False) -> list[tuple[str, Any]]:
        modules = self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate) if recurse else [(prefix, self)]
        seen: set[int] = set()
        out: list[tuple[str, Any]] = []
        for module_prefix, module in modules:
            skip = module._non_persistent_buffers_set if persistent_only else ()
            for name, value in module.__dict__[store].items():
                if value is None or name in skip:
                    continue
                if remove_duplicate:
                    if id(value) in seen:
                        continue
                    seen.add(id(value))
                out.append((module_prefix + ("." if module_prefix else "") + name, value))
        return out

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> list[tuple[str, Parameter]]:
        """Return the parameters with their dotted names (PyTorch's names: ``"0.weight"``, ...).

        Parameters
        ----------
        prefix : str, default ""
            Prepended (with a ``"."``) to every name.
        recurse : bool, default True
            Include the parameters of all descendants, not only this module's own.
        remove_duplicate : bool, default True
            A parameter shared by several modules is listed once.

        Returns
        -------
        list of (str, Parameter)
            Own parameters first, then each child's, in registration order.
        """
        return self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True) -> list[Parameter]:
        """The trainable parameters, each once.

        Parameters
        ----------
        recurse : bool, default True
            Include those of all descendants.

        Returns
        -------
        list of Parameter
            Optimizers update them in place; ``backward`` sets their ``grad``.
        """
        return [p for _, p in self.named_parameters(recurse=recurse)]

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> list[tuple[str, np.ndarray]]:
        """Return the buffers (persistent or not) with their dotted names.

        Parameters
        ----------
        prefix : str, default ""
            Prepended (with a ``"."``) to every name.
        recurse : bool, default True
            Include the buffers of all descendants, not only this module's own.
        remove_duplicate : bool, default True
            A buffer shared by several modules is listed once.

        Returns
        -------
        list of (str, numpy.ndarray)
            Own buffers first, then each child's, in registration order.
        """
        return self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> list[np.ndarray]:
        """The buffers (running statistics, ...), each once.

        Parameters
        ----------
        recurse : bool, default True
            Include those of all descendants.

        Returns
        -------
        list of numpy.ndarray
            Persistent or not; own buffers first, then each child's.
        """
        return [b for _, b in self.named_buffers(recurse=recurse)]

    def apply(self: T, fn: Callable[["Module"], Any]) -> T:
        """Call ``fn`` on every child (recursively), then on ``self``.

        Parameters
        ----------
        fn : callable
            Called with each module, e.g. to re-initialise weights.

        Returns
        -------
        Module
            ``self``.
        """
        for module in self.children():
            module.apply(fn)
        fn(self)
        return self

    # ------------------------------------------------------------------ modes and gradients
    def train(self: T, mode: bool = True) -> T:
        """Set training mode (``mode=True``) or eval mode on this module and all descendants.

        Parameters
        ----------
        mode : bool, default True
            True for training mode, False for eval mode.

        Returns
        -------
        Module
            ``self``.

        Raises
        ------
        ValueError
            ``mode`` is not a bool.
        """
        if not isinstance(mode, (bool, np.bool_)):
            raise ValueError(f"training mode is expected to be boolean (got {mode!r})")
        self.training = bool(mode)
        for module in self.children():
            module.train(mode)
        return self

    def eval(self: T) -> T:
        """Set eval mode; same as ``train(False)``.

        Returns
        -------
        Module
            ``self``.
        """
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all parameters.

        Parameters
        ----------
        set_to_none : bool, default True
            Set ``grad`` to None (PyTorch's default); otherwise fill existing
            gradients with zeros in place.
        """
        for p in self.parameters():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad[...] = 0

    # ------------------------------------------------------------------ computation
    def forward(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """Compute the module's output; every subclass implements it.

        Parameters
        ----------
        *args, **kwargs
            The inputs (bnfast's layers take one array).

        Returns
        -------
        numpy.ndarray
            The output.

        Raises
        ------
        NotImplementedError
            Always, in the base class.
        """
        raise NotImplementedError(
            f'Module [{type(self).__name__}] is missing the required "forward" function: '
            "subclasses of bnfast.nn.Module implement forward(x) (and backward(grad_out))"
        )

    def backward(self, grad_out: Any) -> np.ndarray:
        """Back-propagate: the gradient w.r.t. the input of the last :meth:`forward`.

        Subclasses implement it and store the gradient of each of their
        parameters in ``Parameter.grad`` (replacing, not accumulating).

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient of the loss with respect to the last output.

        Returns
        -------
        numpy.ndarray
            Gradient of the loss with respect to the last input.

        Raises
        ------
        NotImplementedError
            Always, in the base class.
        """
        raise NotImplementedError(
            f'Module [{type(self).__name__}] is missing the required "backward" function: '
            "bnfast has no autograd, so each layer implements backward(grad_out) -> grad_input"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        d = self.__dict__
        pre, post = d.get("_forward_pre_hooks"), d.get("_forward_hooks")
        if not (pre or post):
            return self.forward(*args, **kwargs)
        for hook in list(pre.values()) if pre else ():
            result = hook(self, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
        out = self.forward(*args, **kwargs)
        for hook in list(post.values()) if post else ():
            result = hook(self, args, out)
            if result is not None:
                out = result
        return out

    # ------------------------------------------------------------------ hooks
    def _add_hook(self, registry: str, hook: Any, prepend: bool) -> RemovableHandle:
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        d = self.__dict__
        if registry not in d:  # a module unpickled from before hooks existed
            if "_parameters" not in d:
                raise AttributeError("cannot register a hook before Module.__init__() call")
            d[registry] = OrderedDict()
        hooks = d[registry]
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        if prepend:
            hooks.move_to_end(handle.id, last=False)
        return handle

    def _register_state_dict_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook(module, state_dict, prefix, local_metadata)``, run by :meth:`state_dict`.

        Called after the module's own entries are written (PyTorch's private
        hook of the same name); ``local_metadata`` is this module's entry of
        ``state_dict._metadata``.  :func:`bnfast.nn.utils.spectral_norm`
        records its state-dict version there.
        """
        return self._add_hook("_state_dict_hooks", hook, False)

    def register_forward_pre_hook(self, hook: Callable[..., Any], *, prepend: bool = False) -> RemovableHandle:
        """Register ``hook(module, args)``, called by ``module(*args)`` before :meth:`forward`.

        Hooks run in registration order; each may return None or new
        positional arguments (a tuple, or a single value that is wrapped in
        one).  Calling ``module.forward(x)`` directly runs no hooks, as in
        PyTorch.  Reparametrizations use this point:
        :func:`bnfast.nn.utils.weight_norm` computes the weight here.

        Parameters
        ----------
        hook : callable
            ``hook(module, args) -> None or args``.
        prepend : bool, default False
            Run before the hooks already registered.

        Returns
        -------
        RemovableHandle
            ``handle.remove()`` unregisters the hook.

        Raises
        ------
        TypeError
            ``hook`` is not callable.
        """
        return self._add_hook("_forward_pre_hooks", hook, prepend)

    def register_forward_hook(self, hook: Callable[..., Any], *, prepend: bool = False) -> RemovableHandle:
        """Register ``hook(module, args, output)``, called by ``module(*args)`` after :meth:`forward`.

        Parameters
        ----------
        hook : callable
            ``hook(module, args, output) -> None or output``; a value other
            than None replaces the output.
        prepend : bool, default False
            Run before the hooks already registered.

        Returns
        -------
        RemovableHandle
            ``handle.remove()`` unregisters the hook.

        Raises
        ------
        TypeError
            ``hook`` is not callable.
        """
        return self._add_hook("_forward_hooks", hook, prepend)

    def register_full_backward_pre_hook(self, hook: Callable[..., Any], *,
                                        prepend: bool = False) -> RemovableHandle:
        """Register ``hook(module, grad_output)``, called when :meth:`backward` starts.

        ``grad_output`` is a one-element tuple ``(grad_out,)`` (PyTorch passes
        a tuple of tensors); the hook may return None or a replacement (a
        tuple, or a bare array).  Runs on every call of ``module.backward``:
        each subclass's ``backward`` is wrapped once, at class creation.

        Parameters
        ----------
        hook : callable
            ``hook(module, grad_output) -> None or grad_output``.
        prepend : bool, default False
            Run before the hooks already registered.

        Returns
        -------
        RemovableHandle
            ``handle.remove()`` unregisters the hook.

        Raises
        ------
        TypeError
            ``hook`` is not callable.
        """
        return self._add_hook("_backward_pre_hooks", hook, prepend)

    def register_full_backward_hook(self, hook: Callable[..., Any], *, prepend: bool = False) -> RemovableHandle:
        """Register ``hook(module, grad_input, grad_output)``, called after :meth:`backward`.

        Both are one-element tuples; the parameters' ``.grad`` are already
        stored when the hook runs, so it may read or change them (this is
        where :func:`bnfast.nn.utils.weight_norm` turns the gradient of the
        computed weight into those of ``weight_g`` and ``weight_v``).  A
        return value other than None replaces ``grad_input`` (a tuple or a
        bare array).

        Parameters
        ----------
        hook : callable
            ``hook(module, grad_input, grad_output) -> None or grad_input``.
        prepend : bool, default False
            Run before the hooks already registered.

        Returns
        -------
        RemovableHandle
            ``handle.remove()`` unregisters the hook.

        Raises
        ------
        TypeError
            ``hook`` is not callable.
        """
        return self._add_hook("_backward_hooks", hook, prepend)

    # ------------------------------------------------------------------ state
    def _save_to_state_dict(self, destination: MutableMapping[str, Any], prefix: str, keep_vars: bool) -> None:
        """Write this module's own parameters and persistent buffers (not its children's).

        Parameters
        ----------
        destination : mutable mapping
        prefix : str
            Prepended to the local names.
        keep_vars : bool
            Store the arrays themselves instead of copies.
        """
        for name, p in self._parameters.items():
            if p is not None:
                destination[prefix + name] = p if keep_vars else np.array(p, copy=True, order="K")
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = b if keep_vars else np.array(b, copy=True, order="K")

    def state_dict(self, *, destination: MutableMapping[str, Any] | None = None, prefix: str = "",
                   keep_vars: bool = False) -> Any:
        """The module's state under PyTorch's keys and in PyTorch's order.

        Own parameters, own persistent buffers, then each child's entries
        under ``"<child name>."``, recursively.  The returned dict also has
        PyTorch's ``_metadata`` attribute (the ``_version`` of every module).

        Parameters
        ----------
        destination : mutable mapping, optional
            Fill and return this mapping instead of a new ``OrderedDict``.
        prefix : str, default ""
            Prepended to every key.
        keep_vars : bool, default False
            Store the Parameter and buffer objects themselves instead of
            plain-array copies.

        Returns
        -------
        collections.OrderedDict of str to numpy.ndarray
            ``{k: torch.from_numpy(v) for k, v in m.state_dict().items()}``
            loads into the matching torch module.
        """
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()  # type: ignore[attr-defined]
        metadata = getattr(destination, "_metadata", None)
        local_metadata: dict[str, Any] = {"version": self._version}
        if metadata is not None:
            metadata[prefix[:-1]] = local_metadata
        self._save_to_state_dict(destination, prefix, keep_vars)
        for hook in self.__dict__.get("_state_dict_hooks", {}).values():
            hook(self, destination, prefix, local_metadata)
        for name, module in self._modules.items():
            if module is not None:
                module.state_dict(destination=destination, prefix=prefix + name + ".", keep_vars=keep_vars)
        return destination

    def _load_from_state_dict(self, state_dict: MutableMapping[str, Any], prefix: str,
                              local_metadata: Mapping[str, Any], strict: bool, missing_keys: list[str],
                              unexpected_keys: list[str], error_msgs: list[str],
                              assignments: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Check this module's own entries of ``state_dict`` and stage their copies.

        The override point of :meth:`load_state_dict`, as in PyTorch, with
        one more argument: nothing is copied here; each accepted value is
        appended to ``assignments`` as ``(target, value)``, and
        :meth:`load_state_dict` copies them all once every module has been
        checked.  An override may add, rename or convert entries of
        ``state_dict`` (a private copy of the caller's mapping) and then call
        ``super()._load_from_state_dict(...)``.

        Parameters
        ----------
        state_dict : mutable mapping
            All entries being loaded (not only this module's).
        prefix : str
            This module's key prefix (``"layer1.0."``).
        local_metadata : mapping
            ``state_dict._metadata[prefix[:-1]]`` when present, else ``{}``;
            ``local_metadata.get("version")`` is the ``_version`` of the
            module that saved the entries (None for old PyTorch checkpoints).
        strict : bool
            Collect unexpected keys under this prefix.
        missing_keys, unexpected_keys, error_msgs : list of str
            Filled in.
        assignments : list of (numpy.ndarray, numpy.ndarray)
            Filled in with the staged copies.

        Raises
        ------
        TypeError
            A value cannot be converted to an array of the target's kind.
        """
        local: list[tuple[str, np.ndarray]] = [(n, p) for n, p in self._parameters.items() if p is not None]
        local += [(n, b) for n, b in self._buffers.items()
                  if b is not None and n not in self._non_persistent_buffers_set]
        for name, target in local:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = _state_array(state_dict[key], key)
            if not np.can_cast(value.dtype, target.dtype, "same_kind"):
                raise TypeError(
                    f"state_dict[{key!r}] has dtype {value.dtype}, which cannot be cast to "
                    f"{target.dtype} (only same-kind casts, e.g. float64 to float32)"
                )
            try:
                self._check_state_value(name, value)
            except ValueError as exc:
                error_msgs.append(f"{key}: {exc}")
                continue
            if value.shape != target.shape:
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {value.shape} from "
                    f"checkpoint, the shape in current model is {target.shape}."
                )
                continue
            if target.dtype.kind in "iu" and value.size and value.dtype.kind in "iu":
                info = np.iinfo(target.dtype)
                if int(value.min()) < info.min or int(value.max()) > info.max:
                    error_msgs.append(f"{key}: values out of range for {target.dtype}")
                    continue
            assignments.append((target, value))
        if strict:
            local_names = {name for name, _ in local}
            for key in state_dict:
                if not key.startswith(prefix):
                    continue
                head, dot, _ = key[len(prefix):].partition(".")
                if dot:
                    if head not in self._modules:
                        unexpected_keys.append(key)
                elif head not in local_names:
                    unexpected_keys.append(key)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Copy state into the module's existing arrays, checking everything first.

        Accepts NumPy arrays, anything :func:`numpy.asarray` converts (CPU torch
        tensors from ``torch_module.state_dict()``) and the output of
        :meth:`state_dict`.  Values are cast to each array's dtype with
        ``same_kind`` casting (float64 into float32 is fine; complex, strings,
        float into integer are refused).  All or nothing: if any check fails
        no array is changed.

        Parameters
        ----------
        state_dict : mapping of str to array_like
            A ``_metadata`` attribute (PyTorch's, or :meth:`state_dict`'s) is
            passed on to each module's ``_load_from_state_dict``.
        strict : bool, default True
            Require exactly the module's keys.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``; both empty after a strict load.

        Raises
        ------
        StateDictError
            (A ValueError and a RuntimeError.)  ``strict`` and keys are
            missing or unexpected, or (strict or not) a value has the wrong
            shape or is out of range; the message lists every problem.
        TypeError
            ``state_dict`` is not a mapping, or a value is not numeric or
            cannot be cast to its array's dtype (names the key).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping (got {type(state_dict).__name__})")
        metadata = getattr(state_dict, "_metadata", None)
        state: OrderedDict[str, Any] = OrderedDict(state_dict)
        missing: list[str] = []
        unexpected: list[str] = []
        errors: list[str] = []
        assignments: list[tuple[np.ndarray, np.ndarray]] = []

        def load(module: Module, prefix: str) -> None:
            local_metadata = {} if metadata is None else metadata.get(prefix[:-1], {})
            module._load_from_state_dict(state, prefix, local_metadata, True, missing, unexpected, errors,
                                         assignments)
            for name, child in module._modules.items():
                if child is not None:
                    load(child, prefix + name + ".")

        load(self, "")
        if strict:
            if unexpected:
                errors.insert(0, "Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + ".")
            if missing:
                errors.insert(0, "Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ".")
        if errors:
            raise StateDictError(
                f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(errors)
            )
        for target, value in assignments:
            np.copyto(target, value, casting="unsafe")  # kinds and ranges checked above
        return IncompatibleKeys(missing, unexpected)

    def save(self, path: "str | os.PathLike[str]") -> None:
        """Save :meth:`state_dict` to a ``.npz`` file (:func:`numpy.savez`, no pickle).

        The file holds only the state arrays under their keys, not the
        configuration: load it into a module built the same way.  NumPy
        appends ``.npz`` to a path that lacks it.

        Parameters
        ----------
        path : str or os.PathLike
            Where to write; ``.npz`` is appended to a path without it.

        Raises
        ------
        TypeError
            A state array has a non-numeric dtype (it would need pickle).
        ValueError
            A key is ``"file"`` or ``"allow_pickle"``, which ``numpy.savez``
            cannot store.
        """
        state = self.state_dict()
        for key, value in state.items():
            if key in ("file", "allow_pickle"):
                raise ValueError(f"numpy.savez cannot store a state-dict key named {key!r}")
            if value.dtype.kind not in "biufc":
                raise TypeError(f"state_dict[{key!r}] has dtype {value.dtype}, which .npz cannot hold without pickle")
        np.savez(path, **state)

    def load(self: T, path: "str | os.PathLike[str]", strict: bool = True) -> T:
        """Load a ``.npz`` written by :meth:`save` (or ``numpy.savez(path, **state_dict)``).

        Parameters
        ----------
        path : str or os.PathLike
            The ``.npz`` file.
        strict : bool, default True
            As in :meth:`load_state_dict`.

        Returns
        -------
        Module
            ``self``, so ``bnfast.BatchNorm2d(64).load("bn.npz")`` works.

        Raises
        ------
        StateDictError, TypeError
            As :meth:`load_state_dict`; nothing changes on failure.
        OSError
            The file cannot be read.
        ValueError
            The file is not a valid ``.npz`` (or needs pickle).
        """
        with np.load(path, allow_pickle=False) as data:
            state = {k: data[k] for k in data.files}
        self.load_state_dict(state, strict=strict)
        return self

    # ------------------------------------------------------------------ display
    def extra_repr(self) -> str:
        """The module-specific part of the repr (constructor arguments); override it.

        Returns
        -------
        str
            ``""`` in the base class; may span several lines.
        """
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        lines = extra.split("\n") if extra else []
        simple = len(lines) <= 1
        for name, module in self._modules.items():
            lines.append(f"({name}): " + _indent(repr(module), 2))
            simple = False
        if not lines:
            return f"{type(self).__name__}()"
        if simple:
            return f"{type(self).__name__}({lines[0]})"
        return f"{type(self).__name__}(\n  " + "\n  ".join(lines) + "\n)"
