"""Build and runtime configuration report."""

from __future__ import annotations

import os

import platform
import sys
from typing import IO, Any

import numpy as np

from . import _kernels
from ._version import __version__


def _build_setting(name: str) -> Any:
    """A setting setup.py recorded in ``bnfast/_build_config.py`` (None if the
    file is absent, e.g. a build made without this setup.py)."""
    try:
        from . import _build_config  # type: ignore[attr-defined, unused-ignore]  # written at build time
    except ImportError:
        return None
    return getattr(_build_config, name, None)


def serial_requested() -> bool:
    """Whether this build is serial because ``BNFAST_NO_OPENMP=1`` asked for it."""
    return not _kernels.openmp_enabled() and bool(_build_setting("SERIAL_REQUESTED"))


def openmp_status() -> str:
    """One line on OpenMP: enabled, serial by choice, or serial because missing."""
    if _kernels.openmp_enabled():
        return "enabled"
    requested = _build_setting("SERIAL_REQUESTED")
    if requested:
        return "serial build, as requested (BNFAST_NO_OPENMP=1)"
    if requested is None:
        return "serial build"
    return "serial build: the compiler had no OpenMP when bnfast was built"


def config() -> dict[str, Any]:
    """The build and runtime configuration as a dict.

    Returns
    -------
    dict
        ``version``, ``openmp`` (bool), ``openmp_status`` (enabled, or why the
        build is serial), ``threads`` (1 in a serial build), ``simd_compiled``,
        ``simd_in_use``, ``cache_l1d``, ``cache_l2``, ``cache_l3`` (bytes, None
        if unknown), ``stream_threshold`` (outputs of more bytes use streaming
        stores), ``numpy``, ``python``, ``machine``.
    """
    from ._functional import get_num_threads

    caches = _kernels.cache_sizes()
    return {
        "version": __version__,
        "openmp": _kernels.openmp_enabled(),
        "openmp_status": openmp_status(),
        "threads": get_num_threads(),
        "simd_compiled": _kernels.simd_compiled(),
        "simd_in_use": _kernels.simd_in_use(),
        "cache_l1d": caches["l1d"],
        "cache_l2": caches["l2"],
        "cache_l3": caches["l3"],
        "stream_threshold": _kernels.stream_threshold(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def format_bytes(n: int | None) -> str:
    """``n`` bytes as ``"32 KiB"``, ``"1.5 MiB"``; ``"unknown"`` for None."""
    if n is None:
        return "unknown"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} B"


def show_config(file: IO[str] | None = None) -> None:
    """Print bnfast's version, OpenMP status, threads, SIMD instruction set and caches.

    Parameters
    ----------
    file : file-like, optional
        Where to print; standard output by default.
    """
    out = file if file is not None else sys.stdout
    for key, value in config().items():
        if key.startswith("cache_") or key == "stream_threshold":
            value = format_bytes(value) + ("" if value is None else f" ({value} bytes)")
        print(f"{key:>16}: {value}", file=out)


def get_include() -> str:
    """Return the directory that holds bnfast's C headers (``bnfast/bnfast.h``).

    The C API is header-only: add this directory to the include path of a C,
    C++ or Cython build (as ``numpy.get_include()`` for NumPy's headers) and
    include ``"bnfast/bnfast.h"``.

    Returns
    -------
    str
        ``bnfast/include`` inside the installed package, or the source tree's
        ``include`` directory for an in-place build.

    Examples
    --------
    >>> import os, bnfast
    >>> os.path.isfile(os.path.join(bnfast.get_include(), "bnfast", "bnfast.h"))
    True
    """
    package = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(package, "include"), os.path.join(package, "..", "..", "include")):
        if os.path.isfile(os.path.join(candidate, "bnfast", "bnfast.h")):
            return os.path.normpath(candidate)
    raise FileNotFoundError(f"bnfast's C headers are not installed beside {package}")
