# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Thin bridge from NumPy arrays to the C kernels in include/bnfast.

Arguments are trusted: bnfast._functional validates them and plans the
(outer, channels, inner) view and element strides of every operand.  Each call
releases the GIL while the kernel runs.
"""

import os
import warnings

cimport numpy as cnp

cnp.import_array()

cdef extern from "bnfast/bnfast.h" nogil:
    ctypedef struct bn_geometry:
        Py_ssize_t outer
        Py_ssize_t channels
        Py_ssize_t inner
    ctypedef struct bn_array:
        void *data
        Py_ssize_t outer_stride
        Py_ssize_t channel_stride
    ctypedef enum bn_dtype:
        BN_FLOAT32
        BN_FLOAT64
    int bn_moments(bn_dtype, const bn_geometry *, bn_array, double *, double *, double *, int)
    int bn_forward_train(bn_dtype, const bn_geometry *, bn_array, bn_array, const void *,
                         const void *, void *, void *, double, double, void *, void *, int)
    int bn_inference(bn_dtype, const bn_geometry *, bn_array, bn_array, const void *,
                     const void *, const void *, const void *, double, int)
    int bn_backward(bn_dtype, const bn_geometry *, bn_array, bn_array, bn_array, const void *,
                    const void *, const void *, int, void *, void *, int)
    int bn_default_threads()
    int bn_openmp_enabled()
    const char *bn_simd_compiled()
    const char *bn_simd_in_use()
    const char *bn_isa_name(int)
    int bn_isa_available(int)
    int bn_select_isa(int)
    int bn_isa()
    int BN_ISA_BASELINE
    int BN_ISA_AVX2

cdef int _num_threads = 0  # 0: follow OpenMP's default (OMP_NUM_THREADS, threadpoolctl)


def set_num_threads(int n):
    """Use ``n`` threads in every kernel; 0 restores OpenMP's default."""
    global _num_threads
    _num_threads = n


def get_num_threads():
    """Threads the next kernel call will use."""
    return _num_threads if _num_threads > 0 else bn_default_threads()


def openmp_enabled():
    """Whether the extension was compiled with OpenMP."""
    return bool(bn_openmp_enabled())


def simd_compiled():
    """Instruction sets the kernels were compiled for, baseline first (e.g. "SSE2, AVX2+FMA")."""
    return bn_simd_compiled().decode()


def simd_in_use():
    """Instruction set of the kernel variant in use (chosen once at import)."""
    return bn_simd_in_use().decode()


_ISA_CODES = {"baseline": BN_ISA_BASELINE, "avx2": BN_ISA_AVX2}


def simd_available():
    """Kernel variants this build and CPU can run, as BNFAST_FORCE_ISA names."""
    return [name for name, code in _ISA_CODES.items() if bn_isa_available(code)]


def select_isa(name):
    """Run the kernels of variant ``name`` ("baseline", "avx2" or "auto" for the
    best this CPU runs); raises ValueError when it is unknown or unavailable."""
    key = str(name).strip().lower()
    if key == "auto":
        bn_select_isa(-1)
        return simd_in_use()
    if key not in _ISA_CODES:
        raise ValueError(f"unknown instruction set {name!r}; use one of auto, {', '.join(_ISA_CODES)}")
    if bn_select_isa(_ISA_CODES[key]) < 0:
        raise ValueError(f"instruction set {name!r} is not available on this CPU or build "
                         f"(available: {', '.join(simd_available())})")
    return simd_in_use()


def _select_isa_from_environment():
    forced = os.environ.get("BNFAST_FORCE_ISA", "").strip()
    if forced:
        try:
            select_isa(forced)
            return
        except ValueError as err:
            warnings.warn(f"BNFAST_FORCE_ISA ignored: {err}", RuntimeWarning, stacklevel=2)
    bn_select_isa(-1)


_select_isa_from_environment()


cdef inline int _threads():
    return _num_threads if _num_threads > 0 else bn_default_threads()


cdef inline bn_dtype _dtype_of(cnp.ndarray a):
    return BN_FLOAT32 if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32 else BN_FLOAT64


cdef inline void *_data(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline bn_array _operand(cnp.ndarray a, tuple strides):
    cdef bn_array op
    op.data = cnp.PyArray_DATA(a)
    op.outer_stride = strides[0]
    op.channel_stride = strides[1]
    return op


cdef inline bn_geometry _geometry(tuple shape):
    cdef bn_geometry geo
    geo.outer, geo.channels, geo.inner = shape
    return geo


cdef inline int _check(int status) except -1:
    if status != 0:
        raise MemoryError("bnfast: could not allocate kernel scratch memory")
    return 0


def moments(tuple shape, cnp.ndarray x, tuple xs, cnp.ndarray count, cnp.ndarray mean,
            cnp.ndarray m2):
    """Per-channel Welford state of ``x`` into float64 ``count``, ``mean``, ``m2``."""
    cdef bn_geometry geo = _geometry(shape)
    cdef bn_array xa = _operand(x, xs)
    cdef bn_dtype dt = _dtype_of(x)
    cdef double *pc = <double *>cnp.PyArray_DATA(count)
    cdef double *pm = <double *>cnp.PyArray_DATA(mean)
    cdef double *pm2 = <double *>cnp.PyArray_DATA(m2)
    cdef int nt = _threads(), status
    with nogil:
        status = bn_moments(dt, &geo, xa, pc, pm, pm2, nt)
    _check(status)


def forward_train(tuple shape, cnp.ndarray x, tuple xs, cnp.ndarray y, tuple ys,
                  weight, bias, running_mean, running_var, double momentum, double eps,
                  cnp.ndarray save_mean, cnp.ndarray save_invstd):
    """Training forward: statistics, running update, normalize into ``y``."""
    cdef bn_geometry geo = _geometry(shape)
    cdef bn_array xa = _operand(x, xs), ya = _operand(y, ys)
    cdef bn_dtype dt = _dtype_of(x)
    cdef void *pw = _data(weight)
    cdef void *pb = _data(bias)
    cdef void *prm = _data(running_mean)
    cdef void *prv = _data(running_var)
    cdef void *psm = cnp.PyArray_DATA(save_mean)
    cdef void *psi = cnp.PyArray_DATA(save_invstd)
    cdef int nt = _threads(), status
    with nogil:
        status = bn_forward_train(dt, &geo, xa, ya, pw, pb, prm, prv, momentum, eps, psm, psi, nt)
    _check(status)


def inference(tuple shape, cnp.ndarray x, tuple xs, cnp.ndarray y, tuple ys,
              cnp.ndarray running_mean, cnp.ndarray running_var, weight, bias, double eps):
    """Inference: normalize ``x`` into ``y`` with the given statistics."""
    cdef bn_geometry geo = _geometry(shape)
    cdef bn_array xa = _operand(x, xs), ya = _operand(y, ys)
    cdef bn_dtype dt = _dtype_of(x)
    cdef void *prm = cnp.PyArray_DATA(running_mean)
    cdef void *prv = cnp.PyArray_DATA(running_var)
    cdef void *pw = _data(weight)
    cdef void *pb = _data(bias)
    cdef int nt = _threads(), status
    with nogil:
        status = bn_inference(dt, &geo, xa, ya, prm, prv, pw, pb, eps, nt)
    _check(status)


def backward(tuple shape, cnp.ndarray grad_out, tuple gs, cnp.ndarray x, tuple xs,
             cnp.ndarray grad_in, tuple gis, cnp.ndarray save_mean, cnp.ndarray save_invstd,
             weight, bint training, cnp.ndarray grad_weight, cnp.ndarray grad_bias):
    """Backward into ``grad_in``, ``grad_weight`` and ``grad_bias``."""
    cdef bn_geometry geo = _geometry(shape)
    cdef bn_array ga = _operand(grad_out, gs), xa = _operand(x, xs), gia = _operand(grad_in, gis)
    cdef bn_dtype dt = _dtype_of(x)
    cdef void *psm = cnp.PyArray_DATA(save_mean)
    cdef void *psi = cnp.PyArray_DATA(save_invstd)
    cdef void *pw = _data(weight)
    cdef void *pgw = cnp.PyArray_DATA(grad_weight)
    cdef void *pgb = cnp.PyArray_DATA(grad_bias)
    cdef int nt = _threads(), status
    with nogil:
        status = bn_backward(dt, &geo, ga, xa, gia, psm, psi, pw, training, pgw, pgb, nt)
    _check(status)
