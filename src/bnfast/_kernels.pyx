# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Thin bridge from NumPy arrays to the C kernels in include/bnfast.

Arguments are trusted: bnfast._functional validates them and plans the
(outer, channels, inner) view and element strides of every operand.  Each call
releases the GIL while the kernel runs.
"""

import operator
import os
import warnings

cimport numpy as cnp
from libc.math cimport isfinite
from libc.string cimport memset
from cpython.exc cimport PyErr_Occurred

cnp.import_array()

# the public C API, declared once in capi.pxd
from bnfast.capi cimport (
    bn_geometry,
    bn_array,
    bn_keys,
    bn_dtype,
    BN_FLOAT32,
    BN_FLOAT64,
    BN_FLOAT16,
    BN_BFLOAT16,
    bn_run,
    BN_OK,
    BN_ERR_NOMEM,
    BN_ERR_INTERRUPTED,
    BN_ERR_ISA,
    bn_moments_args,
    bn_forward_args,
    bn_inference_args,
    bn_backward_args,
    bn_act,
    bn_activation,
    bn_moments,
    bn_forward_train,
    bn_inference,
    bn_backward,
    bn_default_threads,
    bn_openmp_enabled,
    bn_simd_compiled,
    bn_isa_name,
    bn_isa_mask,
    bn_isa_available,
    bn_isa_best,
    BN_ISA_BASELINE,
    BN_ISA_AVX2,
    BN_ISA_AVX512,
)

cdef extern from "bnfast/bnfast.h" nogil:
    ctypedef struct bn_grid:
        Py_ssize_t ntasks
        Py_ssize_t partial_rows
    bn_grid bn_make_grid(const bn_geometry *)
    int BN_PARALLEL_MIN_ELEMS
    ctypedef struct bn_cache_sizes:
        size_t l1d
        size_t l2
        size_t l3
    const bn_cache_sizes *bn_caches()
    size_t bn_stream_threshold_default()

cdef extern from "bnfast/bench.h" nogil:
    void bn_bench_traffic(bn_dtype, void *, const void *, const void *, size_t, const bn_run *)

cdef extern from "Python.h":
    int PyErr_CheckSignals()  # no `except`: a raised KeyboardInterrupt stays pending
    unsigned long PyThread_get_thread_ident() nogil

cdef int _num_threads = 0  # 0: follow OpenMP's default (OMP_NUM_THREADS, threadpoolctl)
# set_num_threads' bound: oversubscription past a few threads per CPU only
# slows a call down, and tens of thousands make libgomp fail or crash
cdef int _max_threads = 4 * (os.cpu_count() or 1)
cdef bint _forked_child = False  # set in a fork() child: it runs serially
cdef unsigned long _main_thread = PyThread_get_thread_ident()  # the thread Python signals reach


def set_num_threads(int n):
    """Use ``n`` threads in every kernel; 0 restores OpenMP's default.  The
    caller (bnfast._functional) checks 0 <= n <= max_threads()."""
    global _num_threads
    _num_threads = n
    if _forked_child and n != 1:
        warnings.warn("bnfast runs serially in a process made by fork(): OpenMP's threads do "
                      "not survive fork (a parallel call would hang); use the 'spawn' or "
                      "'forkserver' multiprocessing start method for parallel workers",
                      RuntimeWarning, stacklevel=2)


def forked_child():
    """Whether this process was made by fork() after bnfast was imported."""
    return bool(_forked_child)


def get_num_threads():
    """Threads the next kernel call will use."""
    return _threads()


def max_threads():
    """The largest thread count set_num_threads accepts."""
    return _max_threads


def _after_fork_in_child():
    """os.register_at_fork hook: GNU OpenMP's thread pool does not survive
    fork() (a parallel region in the child waits for threads that do not
    exist), so the child runs every kernel on its own thread."""
    global _forked_child, _main_thread
    _forked_child = True
    _main_thread = PyThread_get_thread_ident()


os.register_at_fork(after_in_child=_after_fork_in_child)


def openmp_enabled():
    """Whether the extension was compiled with OpenMP."""
    return bool(bn_openmp_enabled())


def simd_compiled():
    """Instruction sets the kernels were compiled for, baseline first (e.g. "SSE2, AVX2+FMA, AVX-512")."""
    return bn_simd_compiled().decode()


# The settings every call passes to the kernels in its bn_run (the C library
# keeps none): the kernel variant and the streaming threshold (-1: default).
cdef int _isa = 0
cdef long long _stream_bytes = -1


def simd_in_use():
    """Instruction set of the kernel variant in use (the best at import, or
    BNFAST_FORCE_ISA's, or select_isa's)."""
    return bn_isa_name(_isa).decode()


_ISA_CODES = {"baseline": BN_ISA_BASELINE, "avx2": BN_ISA_AVX2, "avx512": BN_ISA_AVX512}


def simd_available():
    """Kernel variants this build and CPU can run, as BNFAST_FORCE_ISA names."""
    return [name for name, code in _ISA_CODES.items() if bn_isa_available(code)]


def select_isa(name):
    """Run the kernels of variant ``name`` ("baseline", "avx2", "avx512" or "auto"
    for the best this CPU runs); raises ValueError when it is unknown or unavailable."""
    global _isa
    key = str(name).strip().lower()
    if key == "auto":
        _isa = bn_isa_best()
        return simd_in_use()
    if key not in _ISA_CODES:
        raise ValueError(f"unknown instruction set {name!r}; use one of auto, {', '.join(_ISA_CODES)}")
    if not bn_isa_available(_ISA_CODES[key]):
        raise ValueError(f"instruction set {name!r} is not available on this CPU or build "
                         f"(available: {', '.join(simd_available())})")
    _isa = _ISA_CODES[key]
    return simd_in_use()


def _from_environment(name, apply):
    """Apply the setting in environment variable ``name`` (if set); True if it
    took, a RuntimeWarning if ``apply`` refuses it."""
    text = os.environ.get(name, "").strip()
    if not text:
        return False
    try:
        apply(text)
        return True
    except ValueError as err:
        warnings.warn(f"{name}={text!r} ignored: {err}", RuntimeWarning, stacklevel=3)
        return False


bn_isa_mask()  # detect once, before any kernel runs on another thread
if not _from_environment("BNFAST_FORCE_ISA", select_isa):
    select_isa("auto")


def cache_sizes():
    """Data-cache sizes of this machine, detected once at import.

    Returns
    -------
    dict
        ``{"l1d": int | None, "l2": int | None, "l3": int | None}`` in bytes,
        for one core (the L3 of its core complex); None where the OS and CPU
        report nothing.
    """
    cdef const bn_cache_sizes *c = bn_caches()
    return {"l1d": c.l1d or None, "l2": c.l2 or None, "l3": c.l3 or None}


def stream_threshold():
    """Outputs of more bytes than this are written with streaming stores.

    By default twice the last-level cache (16 MiB when no cache size is
    known); ``BNFAST_STREAM_BYTES`` at import or `set_stream_threshold`
    override it.  Streaming changes speed only, never results.
    """
    return int(_stream_bytes) if _stream_bytes >= 0 else int(bn_stream_threshold_default())


def set_stream_threshold(nbytes=None):
    """Stream outputs larger than ``nbytes`` bytes.

    Parameters
    ----------
    nbytes : int or None
        The new threshold; 0 streams every output the kernels can, None
        restores the default derived from the cache sizes.

    Returns
    -------
    int
        The threshold now in use.
    """
    global _stream_bytes
    if nbytes is None:
        _stream_bytes = -1
        return stream_threshold()
    n = operator.index(nbytes)
    if n < 0:
        raise ValueError(f"nbytes must be >= 0 or None, got {n}")
    _stream_bytes = min(n, 2**63 - 1)
    return stream_threshold()


def _stream_bytes_from_text(text):
    try:
        nbytes = int(text)
    except ValueError:
        raise ValueError("want bytes, an integer >= 0") from None
    set_stream_threshold(nbytes)


bn_caches()  # detect once, before any kernel runs on another thread
if not _from_environment("BNFAST_STREAM_BYTES", _stream_bytes_from_text):
    set_stream_threshold(None)


def _task_grid(Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner):
    """(tasks, partial states per channel, elements below which calls run
    serially) of the kernels' task grid for an (outer, channels, inner) view;
    for tests."""
    cdef bn_geometry geo
    geo.outer, geo.channels, geo.inner = outer, channels, inner
    cdef bn_grid g = bn_make_grid(&geo)
    return g.ntasks, g.partial_rows, BN_PARALLEL_MIN_ELEMS


cdef inline int _threads() noexcept:
    if _forked_child:
        return 1
    cdef int n = _num_threads if _num_threads > 0 else bn_default_threads()
    return n if n <= _max_threads else _max_threads


# Calls of at least this many elements check for Ctrl-C while they run.
cdef Py_ssize_t _INTERRUPTIBLE_ELEMS = 1 << 22


cdef int _signals_pending() noexcept:
    # PyErr_CheckSignals runs Python's handlers; a KeyboardInterrupt they raise
    # stays set in this thread until _check re-raises it after the kernel.
    return PyErr_CheckSignals() != 0


cdef int _interrupted(void *arg) noexcept nogil:
    with gil:
        return _signals_pending()


cdef inline bn_run _run_config(const bn_geometry *geo) noexcept:
    """Thread count and, for long calls on the main thread (the only one
    Python's signal handlers run in), the Ctrl-C check."""
    cdef bn_run run
    run.nthreads = _threads()
    run.isa = _isa
    # resolved here, once per process: the kernels' own units (setup.py)
    # would each detect the cache sizes again on their first call
    run.stream_bytes = _stream_bytes if _stream_bytes >= 0 else <long long>bn_stream_threshold_default()
    run.interrupted = NULL
    run.arg = NULL
    if (geo.outer * geo.channels * geo.inner >= _INTERRUPTIBLE_ELEMS
            and PyThread_get_thread_ident() == _main_thread):
        run.interrupted = _interrupted
    return run


def traffic(cnp.ndarray out, cnp.ndarray a, b=None):
    """``out[...] = a`` or ``out[...] = a + b``: the benchmarks' memory-limit reference.

    The same memory traffic as a normalize (one read, one write) or a
    backward (two reads, one write), run like the kernels: with
    `get_num_threads` threads from the same parallel threshold, and with
    streaming stores above `stream_threshold`.

    Parameters
    ----------
    out, a : ndarray
        C-contiguous float32 or float64 arrays of one dtype and size.
    b : ndarray, optional
        A second input like ``a``.

    Raises
    ------
    ValueError
        When the arrays are not C-contiguous arrays of one float dtype and size.
    """
    arrays = (out, a) if b is None else (out, a, b)
    for arr in arrays:
        if (arr.dtype != out.dtype or arr.dtype.char not in "fd" or arr.size != out.size
                or not arr.flags.c_contiguous):
            raise ValueError("traffic needs C-contiguous float32/float64 arrays of one dtype and size")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    cdef void *po = cnp.PyArray_DATA(out)
    cdef const void *pa = cnp.PyArray_DATA(a)
    cdef const void *pb = NULL if b is None else cnp.PyArray_DATA(<cnp.ndarray>b)
    cdef size_t n = out.size
    cdef bn_dtype dt = _dtype_of(out)
    cdef bn_geometry geo
    geo.outer, geo.channels, geo.inner = n, 1, 1
    cdef bn_run run = _run_config(&geo)
    with nogil:
        bn_bench_traffic(dt, po, pa, pb, n, &run)


cdef inline bn_dtype _dtype_of(cnp.ndarray a):
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_FLOAT32:
        return BN_FLOAT32
    if t == cnp.NPY_FLOAT64:
        return BN_FLOAT64
    if t == cnp.NPY_FLOAT16:
        return BN_FLOAT16
    return BN_BFLOAT16  # the one other dtype bnfast._functional lets through (ml_dtypes.bfloat16)


cdef inline void *_data(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline bn_array _operand(cnp.ndarray a, tuple strides):
    """``strides``: element strides (outer, channel) or (outer, channel, sample)."""
    cdef bn_array op
    op.data = cnp.PyArray_DATA(a)
    op.outer_stride = strides[0]
    op.channel_stride = strides[1]
    op.batch_stride = strides[2] if len(strides) > 2 else 0
    return op


cdef inline bn_keys _keys(tuple keys):
    """``keys``: () for batch norm, or (batch, group, uncentered, affine_inner)."""
    cdef bn_keys q
    memset(&q, 0, sizeof(q))
    if keys:
        q.batch, q.group, q.uncentered, q.affine_inner = keys
    return q


cdef inline bn_act _act(object act):
    """``act``: None (plain batch norm), or (kind, negative_slope, residual or
    None, the residual's kernel strides or None); kind is a BN_ACT_* code."""
    cdef bn_act f
    memset(&f, 0, sizeof(f))
    if act is not None:
        kind, slope, z, zs = act
        f.kind, f.negative_slope = <bn_activation><int>kind, slope
        if z is not None:
            f.residual = _operand(<cnp.ndarray>z, zs)
    return f


cdef inline bn_geometry _geometry(tuple shape):
    cdef bn_geometry geo
    geo.outer, geo.channels, geo.inner = shape
    return geo


cdef inline int _check(int status) except -1:
    if status == BN_ERR_INTERRUPTED:
        if PyErr_Occurred():
            return -1  # the pending KeyboardInterrupt (or a handler's exception)
        raise KeyboardInterrupt
    if status == BN_ERR_ISA:
        raise RuntimeError(f"bnfast: kernel variant {simd_in_use()} cannot run on this CPU")
    if status != BN_OK:
        raise MemoryError("bnfast: could not allocate kernel scratch memory")
    return 0


# One call site per C entry point, shared by the planned API and the fast path.

cdef int _run_forward_train(bn_geometry geo, bn_dtype dt, bn_array x, bn_array y, object weight,
                            object bias, object running_mean, object running_var, double momentum,
                            double eps, cnp.ndarray save_mean, cnp.ndarray save_invstd,
                            bn_keys keys, bn_act act, object statistics=None) except -1:
    cdef bn_forward_args a
    memset(&a, 0, sizeof(a))
    a.keys, a.act = keys, act
    if statistics is not None:  # (share, r_max, d_max, prior_mean, prior_var, prior_moments, stats_out)
        a.share, a.r_max, a.d_max = statistics[0], statistics[1], statistics[2]
        a.prior_mean = <const double *>_data(statistics[3])
        a.prior_var = <const double *>_data(statistics[4])
        a.prior_moments = statistics[5]
        a.stats_out = <double *>_data(statistics[6])
    a.dtype, a.geo, a.x, a.y = dt, geo, x, y
    a.weight, a.bias = _data(weight), _data(bias)
    a.running_mean, a.running_var = _data(running_mean), _data(running_var)
    a.momentum, a.eps = momentum, eps
    a.save_mean, a.save_invstd = cnp.PyArray_DATA(save_mean), cnp.PyArray_DATA(save_invstd)
    cdef bn_run run = _run_config(&geo)
    cdef int status
    with nogil:
        status = bn_forward_train(&a, &run)
    return _check(status)


cdef int _run_inference(bn_geometry geo, bn_dtype dt, bn_array x, bn_array y, object running_mean,
                        object running_var, object weight, object bias, double eps,
                        bn_act act) except -1:
    cdef bn_inference_args a
    memset(&a, 0, sizeof(a))
    a.act = act
    a.dtype, a.geo, a.x, a.y = dt, geo, x, y
    a.running_mean, a.running_var = _data(running_mean), _data(running_var)
    a.weight, a.bias, a.eps = _data(weight), _data(bias), eps
    cdef bn_run run = _run_config(&geo)
    cdef int status
    with nogil:
        status = bn_inference(&a, &run)
    return _check(status)


cdef int _run_backward(bn_geometry geo, bn_dtype dt, bn_array grad_out, bn_array x, bn_array grad_in,
                       object save_mean, object save_invstd, object weight, bint training,
                       cnp.ndarray grad_weight, cnp.ndarray grad_bias, bn_keys keys,
                       bn_act act, double share=1.0, object ref_mean=None) except -1:
    cdef bn_backward_args a
    memset(&a, 0, sizeof(a))
    a.keys, a.act = keys, act
    a.share = share
    a.ref_mean = <const double *>_data(ref_mean)
    a.dtype, a.geo, a.grad_out, a.x, a.grad_in = dt, geo, grad_out, x, grad_in
    a.save_mean, a.save_invstd, a.weight = _data(save_mean), _data(save_invstd), _data(weight)
    a.training = training
    a.grad_weight, a.grad_bias = cnp.PyArray_DATA(grad_weight), cnp.PyArray_DATA(grad_bias)
    cdef bn_run run = _run_config(&geo)
    cdef int status
    with nogil:
        status = bn_backward(&a, &run)
    return _check(status)


def moments(tuple shape, cnp.ndarray x, tuple xs, cnp.ndarray count, cnp.ndarray mean,
            cnp.ndarray m2, tuple keys=()):
    """Per-channel (or per-key) Welford state of ``x`` into float64 ``count``, ``mean``, ``m2``."""
    cdef bn_moments_args a
    memset(&a, 0, sizeof(a))
    a.keys = _keys(keys)
    a.dtype, a.geo, a.x = _dtype_of(x), _geometry(shape), _operand(x, xs)
    a.count = <double *>cnp.PyArray_DATA(count)
    a.mean = <double *>cnp.PyArray_DATA(mean)
    a.m2 = <double *>cnp.PyArray_DATA(m2)
    cdef bn_run run = _run_config(&a.geo)
    cdef int status
    with nogil:
        status = bn_moments(&a, &run)
    _check(status)


def forward_train(tuple shape, cnp.ndarray x, tuple xs, cnp.ndarray y, tuple ys,
                  weight, bias, running_mean, running_var, double momentum, double eps,
                  cnp.ndarray save_mean, cnp.ndarray save_invstd, tuple keys=(), act=None,
                  statistics=None):
    """Training forward: statistics, running update, normalize into ``y`` (then the fused
    activation ``act``, see _act); ``statistics``: (share, r_max, d_max, prior_mean, prior_var,
    prior_moments, stats_out), see bn_forward_args."""
    _run_forward_train(_geometry(shape), _dtype_of(x), _operand(x, xs), _operand(y, ys), weight, bias,
                       running_mean, running_var, momentum, eps, save_mean, save_invstd, _keys(keys),
                       _act(act), statistics)

def inference(tuple shape, cnp.ndarray x, tuple xs, cnp.ndarray y, tuple ys,
              cnp.ndarray running_mean, cnp.ndarray running_var, weight, bias, double eps,
              act=None):
    """Inference: normalize ``x`` into ``y`` with the given statistics (then
    the fused activation ``act``, see _act)."""
    _run_inference(_geometry(shape), _dtype_of(x), _operand(x, xs), _operand(y, ys), running_mean,
                   running_var, weight, bias, eps, _act(act))

def backward(tuple shape, cnp.ndarray grad_out, tuple gs, cnp.ndarray x, tuple xs,
             cnp.ndarray grad_in, tuple gis, cnp.ndarray save_mean, cnp.ndarray save_invstd,
             weight, bint training, cnp.ndarray grad_weight, cnp.ndarray grad_bias,
             tuple keys=(), act=None, double share=1.0, ref_mean=None):
    """Backward into ``grad_in``, ``grad_weight`` and ``grad_bias``; with ``act`` (see _act;
    leaky_relu or elu, no residual) ``x`` is the forward's output and the kernel applies in-place
    ABN's transform; ``share`` and the float64 ``ref_mean`` (C,) for statistics of which the batch
    is a share (bn_backward_args)."""
    _run_backward(_geometry(shape), _dtype_of(x), _operand(grad_out, gs), _operand(x, xs),
                  _operand(grad_in, gis), save_mean, save_invstd, weight, training, grad_weight,
                  grad_bias, _keys(keys), _act(act), share, ref_mean)

# ---- fast path: calls whose arguments are already canonical -------------
#
# The functional API offers every call here first.  These functions only
# recognize the common case -- C-contiguous, aligned, native-byte-order
# float32/float64 arrays of matching dtype and shape, Python floats in range,
# running statistics that overlap nothing, a canonical out= that is the input
# or overlaps no other argument -- and return None
# for anything else, which bnfast._functional then validates (and reports) in
# full.  They never raise for bad input: errors have one home.

cdef int _CANONICAL = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED


cdef inline int _canonical_float(object a):
    """Type number of a canonical float32/float64 ndarray, else -1."""
    if type(a) is not cnp.ndarray:
        return -1
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int t = cnp.PyArray_TYPE(arr)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        return -1
    if (cnp.PyArray_FLAGS(arr) & _CANONICAL) != _CANONICAL or not cnp.PyArray_ISNOTSWAPPED(arr):
        return -1
    return t


cdef inline bint _channel_vector(object v, int t, Py_ssize_t channels, bint writable):
    """Whether ``v`` is a canonical (C,) array of type ``t`` (writable if asked)."""
    if _canonical_float(v) != t:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>v
    if cnp.PyArray_NDIM(arr) != 1 or cnp.PyArray_DIM(arr, 0) != channels:
        return False
    return not writable or (cnp.PyArray_FLAGS(arr) & cnp.NPY_ARRAY_WRITEABLE)


cdef inline bint _optional_vector(object v, int t, Py_ssize_t channels):
    return v is None or _channel_vector(v, t, channels, False)


cdef inline bint _contiguous_geometry(cnp.ndarray x, object axis, bn_geometry *geo):
    """(outer, C, inner) of a C-contiguous ``x`` around ``axis``; False if unusual."""
    cdef int nd = cnp.PyArray_NDIM(x)
    if type(axis) is not int or not -nd <= axis < nd:  # compared as Python ints: no overflow
        return False
    cdef long ax = axis
    if ax < 0:
        ax += nd
    if nd < 2 or ax < 0 or ax >= nd:
        return False
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(x)
    cdef Py_ssize_t i
    geo.outer, geo.channels, geo.inner = 1, dims[ax], 1
    for i in range(ax):
        geo.outer *= dims[i]
    for i in range(ax + 1, nd):
        geo.inner *= dims[i]
    return geo.outer * geo.inner > 0 and geo.channels > 0


cdef inline bn_array _contiguous_operand(cnp.ndarray a, const bn_geometry *geo):
    cdef bn_array op
    op.batch_stride = 0
    op.data = cnp.PyArray_DATA(a)
    op.outer_stride = geo.channels * geo.inner
    op.channel_stride = geo.inner
    return op


cdef inline bint _unit_interval(object v):
    return type(v) is float and 0.0 <= <double>v <= 1.0


cdef inline bint _nonnegative_finite(object v):
    return type(v) is float and 0.0 <= <double>v and isfinite(<double>v)


cdef inline bint _disjoint(cnp.ndarray a, cnp.ndarray b):
    cdef char *pa = <char *>cnp.PyArray_DATA(a)
    cdef char *pb = <char *>cnp.PyArray_DATA(b)
    return pa + cnp.PyArray_NBYTES(a) <= pb or pb + cnp.PyArray_NBYTES(b) <= pa


cdef inline bint _disjoint_from(object a, object b, object c, object d, object e):
    """Whether the canonical array ``a`` overlaps none of the canonical arrays
    (or Nones) ``b``..``e``."""
    for other in (b, c, d, e):
        if other is not None and not _disjoint(<cnp.ndarray>a, <cnp.ndarray>other):
            return False
    return True


cdef object _result(object out, cnp.ndarray x, int t, object other):
    """Where a canonical call writes its full-size result: a new array when
    ``out`` is None, ``out`` itself when it is canonical, writable, of x's
    shape and is ``x``/``other`` or overlaps neither, else None (decline).
    (The caller also declines an ``out`` that overlaps a per-channel argument.)"""
    if out is None:
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), t, 0)
    if _canonical_float(out) != t:
        return None
    cdef cnp.ndarray o = <cnp.ndarray>out
    cdef int nd = cnp.PyArray_NDIM(x)
    if not (cnp.PyArray_FLAGS(o) & cnp.NPY_ARRAY_WRITEABLE) or cnp.PyArray_NDIM(o) != nd:
        return None
    if not cnp.PyArray_CompareLists(cnp.PyArray_DIMS(o), cnp.PyArray_DIMS(x), nd):
        return None
    if out is not x and not _disjoint(o, x):
        return None
    if other is not None and out is not other and not _disjoint(o, <cnp.ndarray>other):
        return None
    return out


def try_forward_train(x, weight, bias, running_mean, running_var, momentum, eps, axis, out=None):
    """``(y, save_mean, save_invstd)`` for canonical arguments, else None."""
    cdef int t = _canonical_float(x)
    cdef bn_geometry geo
    if t < 0 or not _contiguous_geometry(<cnp.ndarray>x, axis, &geo):
        return None
    if geo.outer * geo.inner < 2 or not _unit_interval(momentum) or not _nonnegative_finite(eps):
        return None
    if not (_optional_vector(weight, t, geo.channels) and _optional_vector(bias, t, geo.channels)):
        return None
    if running_mean is None:
        if running_var is not None:
            return None
    elif not (_channel_vector(running_mean, t, geo.channels, True)
              and _channel_vector(running_var, t, geo.channels, True)
              and _disjoint_from(running_mean, running_var, x, weight, bias)
              and _disjoint_from(running_var, x, weight, bias, None)):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef cnp.npy_intp channels = geo.channels
    result = _result(out, xa, t, None)  # out is a canonical array from here on, or None
    if result is None or (out is not None
                          and not _disjoint_from(out, weight, bias, running_mean, running_var)):
        return None
    cdef cnp.ndarray y = <cnp.ndarray>result
    cdef cnp.ndarray save_mean = cnp.PyArray_EMPTY(1, &channels, t, 0)
    cdef cnp.ndarray save_invstd = cnp.PyArray_EMPTY(1, &channels, t, 0)
    _run_forward_train(geo, _dtype_of(xa), _contiguous_operand(xa, &geo), _contiguous_operand(y, &geo),
                       weight, bias, running_mean, running_var, momentum, eps, save_mean, save_invstd,
                       _keys(()), _act(None))
    return y, save_mean, save_invstd


def try_inference(x, running_mean, running_var, weight, bias, eps, axis, out=None):
    """``y`` for canonical arguments, else None."""
    cdef int t = _canonical_float(x)
    cdef bn_geometry geo
    if t < 0 or not _contiguous_geometry(<cnp.ndarray>x, axis, &geo) or not _nonnegative_finite(eps):
        return None
    if not (_channel_vector(running_mean, t, geo.channels, False)
            and _channel_vector(running_var, t, geo.channels, False)
            and _optional_vector(weight, t, geo.channels) and _optional_vector(bias, t, geo.channels)):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    result = _result(out, xa, t, None)
    if result is None or (out is not None
                          and not _disjoint_from(out, running_mean, running_var, weight, bias)):
        return None
    cdef cnp.ndarray y = <cnp.ndarray>result
    _run_inference(geo, _dtype_of(xa), _contiguous_operand(xa, &geo), _contiguous_operand(y, &geo),
                   running_mean, running_var, weight, bias, eps, _act(None))
    return y


def try_backward(grad_out, x, save_mean, save_invstd, weight, training, axis, out=None):
    """``(grad_input, grad_weight, grad_bias)`` for canonical arguments, else None."""
    cdef int t = _canonical_float(x)
    cdef bn_geometry geo
    if t < 0 or _canonical_float(grad_out) != t or type(training) is not bool:
        return None
    if not _contiguous_geometry(<cnp.ndarray>x, axis, &geo):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x, ga = <cnp.ndarray>grad_out
    cdef int nd = cnp.PyArray_NDIM(xa)
    if cnp.PyArray_NDIM(ga) != nd or not cnp.PyArray_CompareLists(cnp.PyArray_DIMS(ga), cnp.PyArray_DIMS(xa), nd):
        return None
    if not (_channel_vector(save_mean, t, geo.channels, False)
            and _channel_vector(save_invstd, t, geo.channels, False)
            and _optional_vector(weight, t, geo.channels)):
        return None
    cdef cnp.npy_intp channels = geo.channels
    result = _result(out, xa, t, grad_out)
    if result is None or (out is not None
                          and not _disjoint_from(out, save_mean, save_invstd, weight, None)):
        return None
    cdef cnp.ndarray grad_in = <cnp.ndarray>result
    cdef cnp.ndarray grad_weight = cnp.PyArray_EMPTY(1, &channels, t, 0)
    cdef cnp.ndarray grad_bias = cnp.PyArray_EMPTY(1, &channels, t, 0)
    _run_backward(geo, _dtype_of(xa), _contiguous_operand(ga, &geo), _contiguous_operand(xa, &geo),
                  _contiguous_operand(grad_in, &geo), save_mean, save_invstd, weight, training,
                  grad_weight, grad_bias, _keys(()), _act(None))
    return grad_in, grad_weight, grad_bias
