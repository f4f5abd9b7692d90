"""Build and runtime configuration report."""

from __future__ import annotations

import platform
import sys

import numpy as np

from . import _kernels


def config() -> dict:
    """The build and runtime configuration as a dict.

    Returns
    -------
    dict
        ``version``, ``openmp``, ``threads``, ``simd_compiled``, ``simd_in_use``,
        ``cache_l1d``, ``cache_l2``, ``cache_l3`` (bytes, None if unknown),
        ``stream_threshold`` (outputs of more bytes use streaming stores),
        ``numpy``, ``python``, ``machine``.
    """
    from . import __version__

    caches = _kernels.cache_sizes()
    return {
        "version": __version__,
        "openmp": _kernels.openmp_enabled(),
        "threads": _kernels.get_num_threads(),
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


def show_config(file=None) -> None:
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
