"""Validate every public docstring of bnfast with numpydoc; exit 1 on any error.

Public means: every name in ``bnfast.__all__``, in the ``__all__`` of every
module listed there (``bnfast.nn``, ``bnfast.testing``, ...), and, for each
class among them, every public method and property it defines or inherits
from a bnfast class, plus ``__call__`` where it has a docstring of its own.
``__slots__`` members have no docstring of their own; they are documented in
their class's ``Attributes`` section, which is validated with the class.

Usage: python docs/validate_docstrings.py  (bnfast importable)
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types

from numpydoc.docscrape import get_doc_object
from numpydoc.validate import Validator, get_validation_checks, validate

# Checks not enforced (numpydoc's "all" minus these), and why:
#   ES01  extended summary: a one-line summary is enough for small methods
#         (``eval``, ``zero_grad``, properties).
#   EX01  examples: the entry points have them (and they are doctested);
#         every method having its own would repeat them.
#   SA01  "See Also": cross-references where they help, not on every object.
EXCLUDED_CHECKS = {"ES01", "EX01", "SA01"}
CHECKS = get_validation_checks({"all"} | EXCLUDED_CHECKS)


class _Validator(Validator):
    """numpydoc's validator, tolerant of properties made with ``property(lambda ...)``.

    numpydoc finds the definition line of an object by searching its source
    for ``def``/``class``; a lambda has neither, and numpydoc 1.x then raises
    StopIteration.  The line only serves ``# numpydoc ignore`` comments, which
    bnfast does not use.
    """

    @property
    def source_file_def_line(self):
        try:
            return super().source_file_def_line
        except StopIteration:
            return None


def _public_objects():
    """(dotted name, object) of every public object, each once."""
    root = importlib.import_module("bnfast")
    modules = [root] + [getattr(root, n) for n in root.__all__ if isinstance(getattr(root, n), types.ModuleType)]
    seen: set[int] = set()
    for mod in modules:  # grows by the submodules listed in an __all__ (bnfast.nn.utils)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, types.ModuleType) and obj not in modules:
                modules.append(obj)
            if isinstance(obj, types.ModuleType) or id(obj) in seen:
                continue  # modules are walked themselves; re-exports validated once
            seen.add(id(obj))
            qual = f"{mod.__name__}.{name}"
            yield qual, obj
            if inspect.isclass(obj):
                yield from _members(qual, obj, seen)


def _members(qual: str, cls: type, seen: set[int]):
    names = set()
    for base in cls.__mro__:
        if base.__module__.split(".")[0] == "bnfast":
            names.update(base.__dict__)
    for name in sorted(names):
        if name.startswith("_") and name != "__call__":
            continue
        raw = inspect.getattr_static(cls, name)
        if isinstance(raw, (types.MemberDescriptorType, types.GetSetDescriptorType)):
            continue  # __slots__ member: documented in the class's Attributes section
        if isinstance(raw, (staticmethod, classmethod)):
            raw = raw.__func__
        if not (inspect.isfunction(raw) or isinstance(raw, property)):
            continue  # class-level data
        if name == "__call__" and not raw.__doc__:
            continue  # undocumented __call__ is forward(); not shown in the docs
        key = id(raw.fget if isinstance(raw, property) else raw)
        if key in seen:
            continue  # inherited: validated where it is defined
        seen.add(key)
        yield f"{qual}.{name}", getattr(cls, name) if not isinstance(raw, property) else raw


def main() -> int:
    failures = 0
    count = 0
    for qual, obj in _public_objects():
        count += 1
        report = validate(qual, validator_cls=lambda obj_name, _o=obj: _Validator(get_doc_object(_o)))
        errors = [(code, msg) for code, msg in report["errors"] if code in CHECKS]
        for code, msg in errors:
            print(f"{qual}: {code} {msg}")
        failures += bool(errors)
    excluded = ", ".join(sorted(EXCLUDED_CHECKS))
    print(f"numpydoc validation: {count} public docstrings, {failures} with errors "
          f"(all checks except {excluded})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
