# cython: language_level=3
"""bnfast's C API for Cython: ``from bnfast.capi cimport ...``.

The declarations of ``bnfast/bnfast.h`` (header-only; put ``bnfast.get_include()``
on the include path): one argument struct per operation (``ops.h``), how a call
runs (``bn_run``), the status codes, and the nogil entry points, as SciPy's
``cython_blas`` exports BLAS.  bnfast's own extension cimports them from here,
so the signatures are written once on the Cython side.

Example (``examples/cython/normalize.pyx``)::

    from bnfast.capi cimport bn_forward_args, bn_run, bn_forward_train, BN_FLOAT64, BN_OK
"""

cdef extern from "bnfast/bnfast.h" nogil:
    const char *BNFAST_VERSION
    int BNFAST_VERSION_MAJOR
    int BNFAST_VERSION_MINOR
    int BNFAST_VERSION_PATCH
    int BNFAST_VERSION_HEX
    ctypedef struct bn_geometry:
        Py_ssize_t outer
        Py_ssize_t channels
        Py_ssize_t inner
    ctypedef struct bn_array:
        void *data
        Py_ssize_t outer_stride
        Py_ssize_t channel_stride
        Py_ssize_t batch_stride
    ctypedef struct bn_keys:
        Py_ssize_t batch
        Py_ssize_t group
        int uncentered
        int affine_inner
    ctypedef enum bn_dtype:
        BN_FLOAT32
        BN_FLOAT64
        BN_FLOAT16
        BN_BFLOAT16
    ctypedef struct bn_run:
        int nthreads
        int isa
        long long stream_bytes
        int (*interrupted)(void *) noexcept nogil
        void *arg
        int *contended
    ctypedef enum bn_activation:
        BN_ACT_NONE
        BN_ACT_IDENTITY
        BN_ACT_RELU
        BN_ACT_LEAKY_RELU
        BN_ACT_ELU
    ctypedef struct bn_act:
        bn_activation kind
        double negative_slope
        bn_array residual
    int BN_OK
    int BN_ERR_NOMEM
    int BN_ERR_INTERRUPTED
    int BN_ERR_ISA
    # the operations' argument structs (ops.h), field for field
    ctypedef struct bn_moments_args:
        bn_dtype dtype
        bn_geometry geo
        bn_array x
        double *count
        double *mean
        double *m2
        bn_keys keys
    ctypedef struct bn_forward_args:
        bn_dtype dtype
        bn_geometry geo
        bn_array x, y
        const void *weight
        const void *bias
        void *running_mean
        void *running_var
        double momentum, eps
        void *save_mean
        void *save_invstd
        bn_keys keys
        double share
        double r_max
        double d_max
        const double *prior_mean
        const double *prior_var
        int prior_moments
        double *stats_out
        bn_act act
    ctypedef struct bn_inference_args:
        bn_dtype dtype
        bn_geometry geo
        bn_array x, y
        const void *running_mean
        const void *running_var
        const void *weight
        const void *bias
        double eps
        bn_act act
    ctypedef struct bn_backward_args:
        bn_dtype dtype
        bn_geometry geo
        bn_array grad_out, x, grad_in
        const void *save_mean
        const void *save_invstd
        const void *weight
        int training
        void *grad_weight
        void *grad_bias
        bn_keys keys
        double share
        const double *ref_mean
        bn_act act
    int bn_moments(const bn_moments_args *, const bn_run *)
    int bn_forward_train(const bn_forward_args *, const bn_run *)
    int bn_inference(const bn_inference_args *, const bn_run *)
    int bn_backward(const bn_backward_args *, const bn_run *)
    int bn_default_threads()
    int bn_openmp_enabled()
    const char *bn_simd_compiled()
    const char *bn_isa_name(int)
    unsigned bn_isa_mask()
    int bn_isa_available(int)
    int bn_isa_best()
    int BN_ISA_BASELINE
    int BN_ISA_AVX2
    int BN_ISA_AVX512
