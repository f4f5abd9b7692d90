/* bnfast public C API: batch normalization kernels for float32, float64,
 * float16 and bfloat16.
 * Include this header (header-only, C and C++).  The operations and their
 * argument structs are in ops.h, how a call runs (threads, instruction set,
 * streaming, interruption) in bn_run (parallel.h). */
#ifndef BNFAST_H
#define BNFAST_H

/* The version of this API, the package's (src/bnfast/_version.py; a test
 * keeps them equal).  BNFAST_VERSION_HEX compares: 0xMMmmpp. */
#define BNFAST_VERSION_MAJOR 0
#define BNFAST_VERSION_MINOR 1
#define BNFAST_VERSION_PATCH 0
#define BNFAST_VERSION "0.1.0"
#define BNFAST_VERSION_HEX ((BNFAST_VERSION_MAJOR << 16) | (BNFAST_VERSION_MINOR << 8) | BNFAST_VERSION_PATCH)

#include "kernels.h"

/* The entry points: one per operation, taking its argument struct (ops.h)
 * and how to run (bn_run, parallel.h).  Each returns BN_OK (0),
 * BN_ERR_NOMEM (scratch memory could not be allocated), BN_ERR_INTERRUPTED
 * (run->interrupted asked it to stop) or BN_ERR_ISA (run->isa cannot run
 * here); on an error no running statistics change.  Arguments are trusted:
 * validation belongs to the caller (bnfast's Python layer). */
#define BN_ENTRY(op, args_type)                                                \
    static inline int bn_##op(const args_type *a, const bn_run *run)         \
    {                                                                        \
        const bn_kernel_set *kernels = bn_kernels_for(a->dtype, run);       \
        return kernels ? kernels->op(a, run) : BN_ERR_ISA;                   \
    }
BN_ENTRY(moments, bn_moments_args)
BN_ENTRY(forward_train, bn_forward_args)
BN_ENTRY(inference, bn_inference_args)
BN_ENTRY(backward, bn_backward_args)
#undef BN_ENTRY

/* Threads OpenMP would use by default (1 in a serial build). */
static inline int bn_default_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static inline int bn_openmp_enabled(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The instruction set of the portable (baseline) kernels. */
#if defined(__AVX512F__)
#define BN_SIMD_BASELINE_NAME "AVX-512"
#elif defined(__AVX2__) && defined(__FMA__)
#define BN_SIMD_BASELINE_NAME "AVX2+FMA"
#elif defined(__AVX__)
#define BN_SIMD_BASELINE_NAME "AVX"
#elif defined(__SSE2__) || defined(_M_X64)
#define BN_SIMD_BASELINE_NAME "SSE2"
#elif defined(__ARM_NEON) || defined(__aarch64__)
#define BN_SIMD_BASELINE_NAME "NEON"
#else
#define BN_SIMD_BASELINE_NAME "scalar"
#endif

/* Name of kernel variant `isa` (BN_ISA_*). */
static inline const char *bn_isa_name(int isa)
{
    return isa == BN_ISA_AVX512 ? "AVX-512" : isa == BN_ISA_AVX2 ? "AVX2+FMA" : BN_SIMD_BASELINE_NAME;
}

/* Every variant compiled in, baseline first: e.g. "SSE2, AVX2+FMA, AVX-512". */
static inline const char *bn_simd_compiled(void)
{
#if BN_HAVE_AVX512_VARIANT
    return BN_SIMD_BASELINE_NAME ", AVX2+FMA, AVX-512";
#elif BN_HAVE_AVX2_VARIANT
    return BN_SIMD_BASELINE_NAME ", AVX2+FMA";
#else
    return BN_SIMD_BASELINE_NAME;
#endif
}

#endif
