# cython: language_level=3, boundscheck=False, wraparound=False
"""Batch normalization from another Cython extension through bnfast's C API.

``from bnfast.capi cimport ...`` gives the structs and nogil entry points of
the header-only C API (``bnfast.get_include()``); this module calls the
training forward on an NCHW float64 array without the GIL.  Build it with
``setup.py`` beside it (``python setup.py build_ext --inplace``);
tests/test_cython_api.py builds it and checks it against bnfast's Python API.
"""

import numpy as np

from libc.string cimport memset
from bnfast.capi cimport BN_FLOAT64, BN_OK, bn_forward_args, bn_forward_train, bn_run


def normalize(double[:, :, ::1] x, int nthreads=1):
    """Return ``(y, mean, invstd)`` of batch normalization over axes 0 and 2 of ``x`` (N, C, HW)."""
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], hw = x.shape[2]
    y = np.empty((n, c, hw))
    mean = np.empty(c)
    invstd = np.empty(c)
    cdef double[:, :, ::1] yv = y
    cdef double[::1] mv = mean, iv = invstd
    cdef bn_forward_args a
    memset(&a, 0, sizeof(a))  # no weight, bias or running statistics: batch norm's keys
    a.dtype = BN_FLOAT64
    a.geo.outer, a.geo.channels, a.geo.inner = n, c, hw
    a.x.data = &x[0, 0, 0]
    a.x.outer_stride, a.x.channel_stride = c * hw, hw
    a.y = a.x
    a.y.data = &yv[0, 0, 0]
    a.momentum, a.eps = 0.1, 1e-5
    a.save_mean, a.save_invstd = &mv[0], &iv[0]
    cdef bn_run run
    memset(&run, 0, sizeof(run))
    run.nthreads, run.isa, run.stream_bytes = nthreads, -1, -1  # -1: the widest SIMD, the default threshold
    cdef int status
    with nogil:
        status = bn_forward_train(&a, &run)
    if status != BN_OK:
        raise RuntimeError(f"bnfast's C API returned status {status}")
    return y, mean, invstd
