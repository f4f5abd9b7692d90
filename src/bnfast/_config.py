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
        ``numpy``, ``python``, ``machine``.
    """
    from . import __version__

    return {
        "version": __version__,
        "openmp": _kernels.openmp_enabled(),
        "threads": _kernels.get_num_threads(),
        "simd_compiled": _kernels.simd_compiled(),
        "simd_in_use": _kernels.simd_in_use(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def show_config(file=None) -> None:
    """Print bnfast's version, OpenMP status, thread count and SIMD instruction set.

    Parameters
    ----------
    file : file-like, optional
        Where to print; standard output by default.
    """
    out = file if file is not None else sys.stdout
    for key, value in config().items():
        print(f"{key:>14}: {value}", file=out)
