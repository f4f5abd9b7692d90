/* bnfast public C API: batch normalization kernels for float32 and float64.
 * Include this header; see kernels.h for the entry points. */
#ifndef BNFAST_H
#define BNFAST_H
#include "kernels.h"

/* Dtype-generic entry points used by the Python extension (void* operands). */
typedef enum { BN_FLOAT32 = 0, BN_FLOAT64 = 1 } bn_dtype;

static inline int bn_moments(bn_dtype dt, const bn_geometry *geo, bn_array x, double *count,
                             double *mean, double *m2, const bn_run *run)
{
    return dt == BN_FLOAT32 ? bn_moments_f32(geo, x, count, mean, m2, run)
                            : bn_moments_f64(geo, x, count, mean, m2, run);
}

static inline int bn_forward_train(bn_dtype dt, const bn_geometry *geo, bn_array x, bn_array y,
                                   const void *weight, const void *bias, void *running_mean,
                                   void *running_var, double momentum, double eps,
                                   void *save_mean, void *save_invstd, const bn_run *run)
{
    if (dt == BN_FLOAT32)
        return bn_forward_train_f32(geo, x, y, (const float *)weight, (const float *)bias,
                                    (float *)running_mean, (float *)running_var, momentum, eps,
                                    (float *)save_mean, (float *)save_invstd, run);
    return bn_forward_train_f64(geo, x, y, (const double *)weight, (const double *)bias,
                                (double *)running_mean, (double *)running_var, momentum, eps,
                                (double *)save_mean, (double *)save_invstd, run);
}

static inline int bn_inference(bn_dtype dt, const bn_geometry *geo, bn_array x, bn_array y,
                               const void *running_mean, const void *running_var,
                               const void *weight, const void *bias, double eps, const bn_run *run)
{
    if (dt == BN_FLOAT32)
        return bn_inference_f32(geo, x, y, (const float *)running_mean, (const float *)running_var,
                                (const float *)weight, (const float *)bias, eps, run);
    return bn_inference_f64(geo, x, y, (const double *)running_mean, (const double *)running_var,
                            (const double *)weight, (const double *)bias, eps, run);
}

static inline int bn_backward(bn_dtype dt, const bn_geometry *geo, bn_array grad_out, bn_array x,
                              bn_array grad_in, const void *save_mean, const void *save_invstd,
                              const void *weight, int training, void *grad_weight,
                              void *grad_bias, const bn_run *run)
{
    if (dt == BN_FLOAT32)
        return bn_backward_f32(geo, grad_out, x, grad_in, (const float *)save_mean,
                               (const float *)save_invstd, (const float *)weight, training,
                               (float *)grad_weight, (float *)grad_bias, run);
    return bn_backward_f64(geo, grad_out, x, grad_in, (const double *)save_mean,
                           (const double *)save_invstd, (const double *)weight, training,
                           (double *)grad_weight, (double *)grad_bias, run);
}

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

/* The variant the kernels run now. */
static inline const char *bn_simd_in_use(void) { return bn_isa_name(bn_isa()); }

#endif
