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
    int BN_CONTENTION_MIN_ELEMS
    ctypedef struct bn_cache_sizes:
        size_t l1d
        size_t l2
        size_t l3
    const bn_cache_sizes *bn_caches()
    size_t bn_stream_threshold_default()
    double bn_wtime()

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
    override it.  Half of it is the cache budget of the cache-blocked
    schedule: channels-first training forwards and backwards whose input
    (and gradient) exceed it go through cache-sized groups of channels.
    Neither changes results, only speed.
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


# Contention back-off.  A parallel call reports (bn_run.contended) whether the
# OS ran one of its threads for less than half of the call: another process
# competes for the cores, and each barrier of the call then waits for a
# descheduled thread -- up to 34x the quiet time measured (bench
# --contention).  The calls of the next _solo_seconds then run on one thread
# (those of at least BN_CONTENTION_MIN_ELEMS elements, the ones judged),
# which waits for nobody; the period doubles while the contention lasts, up to
# _SOLO_MAX seconds, and returns to _SOLO_MIN after a parallel call that ran
# clean.  Results are bit-identical for any thread count: only speed changes.
cdef bint _backoff = False  # off by default: see docs/performance.rst
cdef int _contended = -1   # the last report: 1, 0, or -1 (read already / none)
cdef double _SOLO_MIN = 0.01
cdef double _SOLO_MAX = 1.0
cdef double _solo_seconds = 0.01
cdef double _solo_until = -1.0


cdef inline int _call_threads(Py_ssize_t elements) noexcept:
    """Threads of the next call of `elements` elements: _threads(), or 1
    during a back-off for a call the kernels would judge (the smaller ones,
    with few barriers, keep their threads)."""
    global _contended, _solo_seconds, _solo_until
    cdef int n = _threads()
    if n == 1 or not _backoff or elements < BN_CONTENTION_MIN_ELEMS:
        return n
    if _contended >= 0:
        if _contended:
            _solo_until = bn_wtime() + _solo_seconds
            _solo_seconds = min(2.0 * _solo_seconds, _SOLO_MAX)
        else:
            _solo_seconds = _SOLO_MIN
        _contended = -1
    if _solo_until >= 0.0:
        if bn_wtime() < _solo_until:
            return 1
        _solo_until = -1.0
    return n


def set_contention_backoff(bint enabled):
    """Turn the contention back-off on or off (see bnfast.set_contention_backoff)."""
    global _backoff, _contended, _solo_seconds, _solo_until
    _backoff = enabled
    _contended, _solo_seconds, _solo_until = -1, _SOLO_MIN, -1.0


def _backoff_from_text(text):
    if text not in ("0", "1"):
        raise ValueError("want 0 (off) or 1 (on)")
    set_contention_backoff(text == "1")


if not _from_environment("BNFAST_CONTENTION_BACKOFF", _backoff_from_text):
    set_contention_backoff(False)


def _next_call_threads(report=None):
    """For tests: take ``report`` (1 or 0) as a parallel call's contention
    report, then give the thread count the next call would use."""
    global _contended
    if report is not None:
        _contended = 1 if report else 0
    return _call_threads(BN_CONTENTION_MIN_ELEMS)


def contention_backoff():
    """(enabled, seconds of one-thread calls still to run) of the back-off."""
    left = _solo_until - bn_wtime() if _solo_until >= 0.0 else 0.0
    return bool(_backoff), max(0.0, left)


# Calls of at least this many elements check for Ctrl-C while they run.
cdef Py_ssize_t _INTERRUPTIBLE_ELEMS = 1 << 22


cdef int _signals_pending() noexcept:
    # PyErr_CheckSignals runs Python's handlers; a KeyboardInterrupt they raise
    # stays set in this thread until _check re-raises it after the kernel.
    return PyErr_CheckSignals() != 0


cdef int _interrupted(void *arg) noexcept nogil:
    with gil:
        return _signals_pending()


cdef inline bn_run _run_config(const bn_geometry *geo, Py_ssize_t batch=1) noexcept:
    """Thread count and, for long calls on the main thread (the only one
    Python's signal handlers run in), the Ctrl-C check, from the size of the
    whole call: ``batch`` samples of ``geo`` (a keyed call's bn_keys.batch)."""
    cdef Py_ssize_t elements = geo.outer * geo.channels * geo.inner * (batch if batch > 1 else 1)
    cdef bn_run run
    run.nthreads = _call_threads(elements)
    run.contended = &_contended if run.nthreads > 1 and _backoff else NULL
    run.isa = _isa
    # resolved here, once per process: the kernels' own units (setup.py)
    # would each detect the cache sizes again on their first call
    run.stream_bytes = _stream_bytes if _stream_bytes >= 0 else <long long>bn_stream_threshold_default()
    run.interrupted = NULL
    run.arg = NULL
    if elements >= _INTERRUPTIBLE_ELEMS and PyThread_get_thread_ident() == _main_thread:
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
    cdef bn_run run = _run_config(&geo, a.keys.batch)
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
    cdef bn_run run = _run_config(&geo, a.keys.batch)
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
    cdef bn_run run = _run_config(&a.geo, a.keys.batch)
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


cdef inline bint _same_shape(cnp.ndarray a, cnp.ndarray b):
    cdef int nd = cnp.PyArray_NDIM(b)
    return cnp.PyArray_NDIM(a) == nd and cnp.PyArray_CompareLists(cnp.PyArray_DIMS(a), cnp.PyArray_DIMS(b), nd)


cdef object _result(object out, cnp.ndarray x, int t, object other, object a=None, object b=None,
                    object c=None, object d=None):
    """Where a canonical call writes its full-size result: a new array when
    ``out`` is None, ``out`` itself when it is canonical, writable, of x's
    shape, is ``x``/``other`` or overlaps neither, and overlaps none of the
    smaller arguments ``a``..``d`` (canonical arrays or Nones), else None
    (decline)."""
    if out is None:
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), t, 0)
    if _canonical_float(out) != t:
        return None
    cdef cnp.ndarray o = <cnp.ndarray>out
    if not (cnp.PyArray_FLAGS(o) & cnp.NPY_ARRAY_WRITEABLE) or not _same_shape(o, x):
        return None
    if out is not x and not _disjoint(o, x):
        return None
    if other is not None and out is not other and not _disjoint(o, <cnp.ndarray>other):
        return None
    return out if _disjoint_from(out, a, b, c, d) else None


cdef inline bint _running_pair(object running_mean, object running_var, int t, Py_ssize_t channels,
                               object x, object weight, object bias):
    """Whether the running statistics are both None, or canonical writable
    (C,) arrays of type ``t`` that overlap each other and x, weight, bias
    nowhere."""
    if running_mean is None:
        return running_var is None
    return (_channel_vector(running_mean, t, channels, True)
            and _channel_vector(running_var, t, channels, True)
            and _disjoint_from(running_mean, running_var, x, weight, bias)
            and _disjoint_from(running_var, x, weight, bias, None))


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
    if not _running_pair(running_mean, running_var, t, geo.channels, x, weight, bias):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef cnp.npy_intp channels = geo.channels
    result = _result(out, xa, t, None, weight, bias, running_mean, running_var)
    if result is None:
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
    result = _result(out, xa, t, None, running_mean, running_var, weight, bias)
    if result is None:
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
    if not _same_shape(ga, xa):
        return None
    if not (_channel_vector(save_mean, t, geo.channels, False)
            and _channel_vector(save_invstd, t, geo.channels, False)
            and _optional_vector(weight, t, geo.channels)):
        return None
    cdef cnp.npy_intp channels = geo.channels
    result = _result(out, xa, t, grad_out, save_mean, save_invstd, weight)
    if result is None:
        return None
    cdef cnp.ndarray grad_in = <cnp.ndarray>result
    cdef cnp.ndarray grad_weight = cnp.PyArray_EMPTY(1, &channels, t, 0)
    cdef cnp.ndarray grad_bias = cnp.PyArray_EMPTY(1, &channels, t, 0)
    _run_backward(geo, _dtype_of(xa), _contiguous_operand(ga, &geo), _contiguous_operand(xa, &geo),
                  _contiguous_operand(grad_in, &geo), save_mean, save_invstd, weight, training,
                  grad_weight, grad_bias, _keys(()), _act(None))
    return grad_in, grad_weight, grad_bias


# ---- the family's fast path (bnfast._normalization), on the same rules ----
#
# Canonical calls of layer/RMS norm (rows of the trailing dims) and of group
# and instance norm (keys per sample and group of channels), as their
# validating paths would plan them: one row plan (1, rows, D), or one sample
# plan (outer, C, inner) with the samples C * outer * inner apart.

cdef inline Py_ssize_t _trailing_dims(cnp.ndarray x, object normalized_shape):
    """How many trailing dims of ``x`` an int or a tuple/list of ints
    ``normalized_shape`` names, when it matches them; else 0."""
    cdef int nd = cnp.PyArray_NDIM(x)
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(x)
    if type(normalized_shape) is int:
        return 1 if nd >= 1 and normalized_shape == dims[nd - 1] else 0
    if type(normalized_shape) is not tuple and type(normalized_shape) is not list:
        return 0
    cdef Py_ssize_t k = len(normalized_shape), i
    if k == 0 or k > nd:
        return 0
    for i in range(k):
        n = normalized_shape[i]
        if type(n) is not int or n != dims[nd - k + i]:
            return 0
    return k


cdef inline bint _rows_view(cnp.ndarray x, object normalized_shape, Py_ssize_t *k, Py_ssize_t *rows,
                            Py_ssize_t *d):
    """Layer norm's view of ``x``: k trailing dims (``normalized_shape``) of
    d values in each of ``rows`` rows; False to decline (no match, one value
    per row or no rows: the validating path)."""
    k[0] = _trailing_dims(x, normalized_shape)
    if k[0] == 0:
        return False
    cdef int nd = cnp.PyArray_NDIM(x), i
    rows[0], d[0] = 1, 1
    for i in range(nd):
        if i < nd - k[0]:
            rows[0] *= cnp.PyArray_DIM(x, i)
        else:
            d[0] *= cnp.PyArray_DIM(x, i)
    return d[0] >= 2 and rows[0] >= 1


cdef inline bint _shaped(object v, int t, int nd, cnp.npy_intp *dims):
    """Whether ``v`` is a canonical array of type ``t`` and shape ``dims[:nd]``."""
    if _canonical_float(v) != t:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>v
    return cnp.PyArray_NDIM(arr) == nd and cnp.PyArray_CompareLists(cnp.PyArray_DIMS(arr), dims, nd)


cdef inline bint _per_row(object v, int t, cnp.ndarray x, Py_ssize_t k):
    """Whether ``v`` is a canonical per-row statistic of x's rows over its
    trailing ``k`` dims: of shape x.shape[:-k] or x.shape[:-k] + (1,) * k."""
    if _canonical_float(v) != t:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>v
    cdef int nd = cnp.PyArray_NDIM(x), i
    if cnp.PyArray_NDIM(arr) == nd - k:
        return cnp.PyArray_CompareLists(cnp.PyArray_DIMS(arr), cnp.PyArray_DIMS(x), nd - k)
    if cnp.PyArray_NDIM(arr) != nd or not cnp.PyArray_CompareLists(cnp.PyArray_DIMS(arr), cnp.PyArray_DIMS(x), nd - k):
        return False
    for i in range(nd - k, nd):
        if cnp.PyArray_DIM(arr, i) != 1:
            return False
    return True


cdef inline bn_array _rows_operand(cnp.ndarray a, Py_ssize_t rows, Py_ssize_t d):
    cdef bn_array op
    op.data = cnp.PyArray_DATA(a)
    op.outer_stride, op.channel_stride, op.batch_stride = 0, d if rows > 1 else 0, 0
    return op


cdef inline double _rms_default_eps(int t):
    return 2.0 ** -23 if t == cnp.NPY_FLOAT32 else 2.0 ** -52  # numpy.finfo(dtype).eps


cdef object _ones(cnp.npy_intp d, int t):
    """A (d,) array of ones of float type ``t``: the weight of a layer
    without one (the kernel reads a weight per element)."""
    cdef cnp.ndarray a = cnp.PyArray_EMPTY(1, &d, t, 0)
    cdef Py_ssize_t i
    if t == cnp.NPY_FLOAT32:
        for i in range(d):
            (<float *>cnp.PyArray_DATA(a))[i] = 1.0
    else:
        for i in range(d):
            (<double *>cnp.PyArray_DATA(a))[i] = 1.0
    return a


cdef object _row_stats(cnp.ndarray x, Py_ssize_t k, int t, bint zeros):
    """A per-row statistic of shape x.shape[:-k] + (1,) * k."""
    cdef int nd = cnp.PyArray_NDIM(x), i
    cdef cnp.npy_intp dims[64]  # NPY_MAXDIMS
    for i in range(nd):
        dims[i] = cnp.PyArray_DIM(x, i) if i < nd - k else 1
    return cnp.PyArray_ZEROS(nd, dims, t, 0) if zeros else cnp.PyArray_EMPTY(nd, dims, t, 0)


def try_rows_forward(x, normalized_shape, weight, bias, eps, bint rms, out=None):
    """``(y, mean, invstd)`` of layer norm (``rms``: RMS norm, bias None) for
    canonical arguments, else None; ``eps`` None (RMS norm) is the dtype's."""
    cdef int t = _canonical_float(x)
    if t < 0:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef Py_ssize_t k, rows, d
    if not _rows_view(xa, normalized_shape, &k, &rows, &d):
        return None
    cdef cnp.npy_intp *inner_dims = cnp.PyArray_DIMS(xa) + (cnp.PyArray_NDIM(xa) - k)
    cdef double e
    if rms and eps is None:
        e = _rms_default_eps(t)
    elif _nonnegative_finite(eps):
        e = eps
    else:
        return None
    if not ((weight is None or _shaped(weight, t, k, inner_dims))
            and (bias is None or (not rms and _shaped(bias, t, k, inner_dims)))):
        return None
    result = _result(out, xa, t, None, weight, bias)
    if result is None:
        return None
    cdef cnp.ndarray y = <cnp.ndarray>result
    w = weight if weight is not None else _ones(d, t)
    cdef cnp.npy_intp dd = d
    b = bias if bias is not None else cnp.PyArray_ZEROS(1, &dd, t, 0)
    mean, invstd = _row_stats(xa, k, t, True), _row_stats(xa, k, t, False)
    cdef bn_geometry geo
    geo.outer, geo.channels, geo.inner = 1, rows, d
    _run_forward_train(geo, _dtype_of(xa), _rows_operand(xa, rows, d), _rows_operand(y, rows, d),
                       w, b, None, None, 0.0, e, mean, invstd, _keys((1, 1, rms, 1)), _act(None))
    return y, mean, invstd


def try_rows_backward(grad_out, x, normalized_shape, mean, invstd, weight, bint rms, out=None):
    """``(grad_input, grad_weight, grad_bias)`` of layer norm (``rms``: RMS
    norm, mean None) for canonical arguments, else None."""
    cdef int t = _canonical_float(x)
    if t < 0 or _canonical_float(grad_out) != t:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x, ga = <cnp.ndarray>grad_out
    cdef Py_ssize_t k, rows, d
    if not _same_shape(ga, xa) or not _rows_view(xa, normalized_shape, &k, &rows, &d):
        return None
    cdef cnp.npy_intp *inner_dims = cnp.PyArray_DIMS(xa) + (cnp.PyArray_NDIM(xa) - k)
    if not (_per_row(invstd, t, xa, k) and ((rms and mean is None) or (not rms and _per_row(mean, t, xa, k)))
            and (weight is None or _shaped(weight, t, k, inner_dims))):
        return None
    result = _result(out, xa, t, grad_out, mean, invstd, weight)
    if result is None:
        return None
    cdef cnp.ndarray grad_in = <cnp.ndarray>result
    w = weight if weight is not None else _ones(d, t)
    grad_weight = cnp.PyArray_ZEROS(k, inner_dims, t, 0)
    grad_bias = cnp.PyArray_ZEROS(k, inner_dims, t, 0)
    cdef bn_geometry geo
    geo.outer, geo.channels, geo.inner = 1, rows, d
    _run_backward(geo, _dtype_of(xa), _rows_operand(ga, rows, d), _rows_operand(xa, rows, d),
                  _rows_operand(grad_in, rows, d), mean, invstd, w, True, grad_weight, grad_bias,
                  _keys((1, 1, rms, 1)), _act(None))
    return grad_in, grad_weight, grad_bias


cdef inline bint _sample_geometry(cnp.ndarray x, object axis, bn_geometry *geo):
    """The sample plan of a C-contiguous ``x``: (outer, C, inner) of one
    sample around the channel axis (not 0); False if unusual."""
    if not _contiguous_geometry(x, axis, geo):
        return False
    cdef int nd = cnp.PyArray_NDIM(x)
    cdef long ax = axis if axis >= 0 else axis + nd
    if ax == 0:
        return False
    geo.outer //= cnp.PyArray_DIM(x, 0)
    return True


cdef inline bn_array _sample_operand(cnp.ndarray a, const bn_geometry *geo):
    """A C-contiguous operand as the validating path's sample plan sees it:
    planar where inner > 1, else channels-last rows; strides of dims of one
    element are 0 (or 1 for one channel), as that path merges them."""
    cdef bn_array op
    op.data = cnp.PyArray_DATA(a)
    op.batch_stride = geo.outer * geo.channels * geo.inner
    if geo.inner > 1:
        op.outer_stride = geo.channels * geo.inner if geo.outer > 1 else 0
        op.channel_stride = geo.inner if geo.channels > 1 else 1
    else:
        op.outer_stride = geo.channels if geo.outer > 1 else 0
        op.channel_stride = 1
    return op


cdef inline Py_ssize_t _group_size(object num_groups, bint instance, Py_ssize_t channels):
    """Channels per group: 1 for instance norm, else C / num_groups for an
    int that divides C; 0 to decline."""
    if instance:
        return 1
    if type(num_groups) is not int or not 1 <= num_groups <= channels:
        return 0
    cdef Py_ssize_t g = num_groups
    return channels // g if channels % g == 0 else 0


def try_keyed_forward(x, num_groups, weight, bias, running_mean, running_var, momentum, eps, axis,
                      bint instance, out=None):
    """``(y, mean, invstd)`` of group norm, or of instance norm (``instance``,
    num_groups ignored; optional running statistics), for canonical
    arguments, else None; the statistics of shape (N, groups)."""
    cdef int t = _canonical_float(x)
    cdef bn_geometry geo
    if t < 0 or not _sample_geometry(<cnp.ndarray>x, axis, &geo):
        return None
    cdef Py_ssize_t group = _group_size(num_groups, instance, geo.channels)
    if group == 0 or not _unit_interval(momentum) or not _nonnegative_finite(eps):
        return None
    if instance and geo.outer * geo.inner < 2:  # one value per instance: the validating path
        return None
    if not (_optional_vector(weight, t, geo.channels) and _optional_vector(bias, t, geo.channels)):
        return None
    if (running_mean is not None and not instance) or not _running_pair(
            running_mean, running_var, t, geo.channels, x, weight, bias):  # running statistics: instance norm only
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    result = _result(out, xa, t, None, weight, bias, running_mean, running_var)
    if result is None:
        return None
    cdef cnp.ndarray y = <cnp.ndarray>result
    cdef cnp.npy_intp n = cnp.PyArray_DIM(xa, 0)
    cdef cnp.npy_intp stat_dims[2]
    stat_dims[0], stat_dims[1] = n, geo.channels // group
    mean = cnp.PyArray_ZEROS(2, stat_dims, t, 0)
    invstd = cnp.PyArray_EMPTY(2, stat_dims, t, 0)
    _run_forward_train(geo, _dtype_of(xa), _sample_operand(xa, &geo), _sample_operand(y, &geo),
                       weight, bias, running_mean, running_var, momentum, eps, mean, invstd,
                       _keys((n, group, 0, 0)), _act(None))
    return y, mean, invstd


def try_keyed_backward(grad_out, x, num_groups, mean, invstd, weight, axis, bint instance, out=None):
    """``(grad_input, grad_weight, grad_bias)`` of group norm, or of instance
    norm (``instance``, num_groups ignored), for canonical arguments, else None."""
    cdef int t = _canonical_float(x)
    cdef bn_geometry geo
    if t < 0 or _canonical_float(grad_out) != t or not _sample_geometry(<cnp.ndarray>x, axis, &geo):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x, ga = <cnp.ndarray>grad_out
    if not _same_shape(ga, xa):
        return None
    cdef Py_ssize_t group = _group_size(num_groups, instance, geo.channels)
    if group == 0:
        return None
    cdef cnp.npy_intp stat_dims[2]
    stat_dims[0], stat_dims[1] = cnp.PyArray_DIM(xa, 0), geo.channels // group
    if not (_shaped(mean, t, 2, stat_dims) and _shaped(invstd, t, 2, stat_dims)
            and _optional_vector(weight, t, geo.channels)):
        return None
    result = _result(out, xa, t, grad_out, mean, invstd, weight)
    if result is None:
        return None
    cdef cnp.ndarray grad_in = <cnp.ndarray>result
    cdef cnp.npy_intp channels = geo.channels
    grad_weight = cnp.PyArray_ZEROS(1, &channels, t, 0)
    grad_bias = cnp.PyArray_ZEROS(1, &channels, t, 0)
    _run_backward(geo, _dtype_of(xa), _sample_operand(ga, &geo), _sample_operand(xa, &geo),
                  _sample_operand(grad_in, &geo), mean, invstd, weight, True, grad_weight, grad_bias,
                  _keys((stat_dims[0], group, 0, 0)), _act(None))
    return grad_in, grad_weight, grad_bias
