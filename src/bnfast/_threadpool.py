"""bnfast's thread count seen and limited by threadpoolctl.

threadpoolctl finds the thread pools of a process by scanning its loaded
shared libraries; third-party libraries join through ``threadpoolctl.register``
with a ``LibController`` subclass (threadpoolctl's documented route for them).
`register` does that for bnfast's compiled extension, so that

* ``threadpoolctl.threadpool_info()`` lists bnfast (``internal_api
  "bnfast"``) with the thread count its next kernel call uses, and
* ``threadpool_limits(n)`` -- for every library, or ``user_api="openmp"`` --
  limits bnfast too, even after an explicit ``bnfast.set_num_threads``, and
  restores bnfast's own setting afterwards: an explicit count, or "follow
  OpenMP's default" when no count was set.

bnfast's ``user_api`` is ``"openmp"``: its kernels are OpenMP code, and an
OpenMP limit should reach them as it reaches libgomp (which threadpoolctl
lists separately).  A serial build (no OpenMP) is listed too, with one thread
and ``openmp_enabled: False``.

`register` runs when bnfast is imported and threadpoolctl is installed
(threadpoolctl itself is cheap to import: it scans libraries only when asked),
and does nothing when it is not, or is older than the ``register`` API (3.3).
"""

from __future__ import annotations

import os
from typing import Any

from . import _functional, _kernels

__all__ = ["register"]

# State shared by every controller instance (threadpoolctl makes new ones per
# ThreadpoolController, or reuses a cached one): bnfast's own setting as it
# was before a limit took effect, to restore it -- mode included -- when
# threadpoolctl restores the count it read then.
_saved: tuple[int, int | None] | None = None  # (count read, set_num_threads argument)
_limited = False  # a threadpoolctl limit of ours is in force

_registered = False


def _get() -> int:
    global _saved
    n = _functional.get_num_threads()
    if not _limited:  # what threadpoolctl reads before limiting, and restores later
        _saved = (n, _functional._requested)
    return n


def _set(n: int) -> None:
    global _limited
    if _limited and _saved is not None and n == _saved[0]:
        # threadpoolctl restores the count it read before its limit: restore
        # the setting that gave it (None: follow OpenMP's default)
        _functional.set_num_threads(_saved[1])
        _limited = False
        return
    n = max(1, min(int(n), _kernels.max_threads()))
    if not _limited and n == _functional.get_num_threads():
        # nothing to change: threadpoolctl restoring every library after a
        # limit that did not select bnfast, or a limit at the current count
        return
    _functional.set_num_threads(n)
    _limited = True


def _same_file(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _controller_class() -> type[Any]:
    from threadpoolctl import LibController  # type: ignore[import-untyped]

    from ._version import __version__

    class BnfastController(LibController):  # type: ignore[misc]  # untyped base
        """threadpoolctl's view of bnfast: ``bnfast.get_num_threads`` and
        ``bnfast.set_num_threads`` (clamped to bnfast's bounds)."""

        user_api = "openmp"
        internal_api = "bnfast"
        # the compiled extension: _kernels.cpython-3XY-<platform>.so / .pyd
        filename_prefixes = ("_kernels",)
        check_symbols = ("PyInit__kernels",)

        def get_num_threads(self) -> int:
            return _get()

        def set_num_threads(self, num_threads: int) -> None:
            _set(num_threads)

        def get_version(self) -> str:
            return __version__

        def set_additional_attributes(self) -> None:
            # another package's "_kernels" extension is not bnfast's: threadpoolctl
            # skips a library whose controller raises OSError here
            if not _same_file(self.filepath, getattr(_kernels, "__file__", None)):
                raise OSError(f"{self.filepath} is not bnfast's extension")
            self.openmp_enabled = _kernels.openmp_enabled()
            self.simd_in_use = _kernels.simd_in_use()

    return BnfastController


def register() -> bool:
    """Register bnfast's controller with threadpoolctl, once.

    Returns
    -------
    bool
        Whether bnfast is registered (False: threadpoolctl is not installed,
        or has no ``register`` function).
    """
    global _registered
    if _registered:
        return True
    try:
        from threadpoolctl import register as tpc_register  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return False
    tpc_register(_controller_class())
    _registered = True
    return True
