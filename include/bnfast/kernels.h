/* bnfast kernels for float32 and float64, both layout families.
 *
 * Public C API (header-only; usable from C and C++):
 *   bn_moments_f32/_f64       per-channel Welford state
 *   bn_forward_train_f32/_f64 training forward with running-statistics update
 *   bn_inference_f32/_f64     inference with given statistics
 *   bn_backward_f32/_f64      backward, training or frozen statistics
 * Every entry returns BN_OK (0), BN_ERR_NOMEM when scratch memory could not
 * be allocated, or BN_ERR_INTERRUPTED when run->interrupted asked it to stop
 * (see bn_run in parallel.h); on an error no running statistics change.
 * Arguments are trusted: validation belongs to the caller (bnfast's Python
 * layer).  Results are bit-identical for any nthreads. */
#ifndef BNFAST_KERNELS_H
#define BNFAST_KERNELS_H

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "cache.h"
#include "moments.h"
#include "parallel.h"

#ifdef __cplusplus
#define restrict __restrict
#endif

#if (defined(__x86_64__) || defined(_M_X64) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define BN_X86 1
#else
#define BN_X86 0
#endif

/* GNU vector extensions (GCC >= 9, clang) for the hot loops; other compilers
 * get the same arithmetic as plain scalar loops. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9)
#define BN_VECTORS 1
#else
#define BN_VECTORS 0
#endif

/* For helpers with compile-time-constant arguments that must specialize. */
#if defined(__GNUC__) || defined(__clang__)
#define BN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define BN_ALWAYS_INLINE inline
#endif

/* Phases of an op; see bn_exec_ in kernel_body.h. */
enum { BN_OP_MOMENTS, BN_OP_FORWARD, BN_OP_INFERENCE, BN_OP_BACKWARD };

/* Everything a task needs: operands, per-channel coefficients, partials, and
 * the op's own arguments (typed by the kernel body). */
typedef struct {
    bn_geometry geo;
    bn_grid grid;
    int op, stream;
    size_t stream_bytes; /* stream outputs larger than this (bn_stream_threshold) */
    ptrdiff_t group_channels; /* planar: channels per cache group */
    bn_array x, y, g;
    bn_array ax;  /* input of the affine phase */
    double *mean; /* per channel, in double: the mean the statistics are centred on */
    void *coef;   /* per channel, in the element type: the apply phase's coefficients */
    bn_partials part;                       /* partial states, row-major */
    double *scratch;
    double *next_mean, *next_var; /* running statistics, written back on success */
    const bn_run *run;
    int stop;          /* raised when run->interrupted asked to stop */
    unsigned polls;    /* tasks seen by the calling thread since the last poll */
    double last_poll;  /* bn_wtime() of the last call to run->interrupted */
    /* op arguments */
    const void *weight, *bias, *save_mean_in, *save_invstd_in;
    void *running_mean, *running_var, *save_mean, *save_invstd, *grad_weight, *grad_bias;
    double momentum, eps;
    int training;
    double *out_count, *out_mean, *out_m2;
} bn_context;

/* The apply phase's per-channel coefficients (see kernel_body.h), and the
 * doubles per channel that hold them in any element type. */
enum { BN_MH, BN_ML, BN_S, BN_B, BN_A, BN_INV, BN_K1, BN_K0, BN_COEFS };
#define BN_COEF_DOUBLES BN_COEFS

/* Scratch small enough for the stack: tiny calls never touch malloc. */
#define BN_STACK_DOUBLES 1024

static inline bn_context bn_context_new(const bn_geometry *geo, bn_array x, const bn_run *run)
{
    bn_context k;
    memset(&k, 0, sizeof k);
    k.run = run;
    k.last_poll = run->interrupted ? bn_wtime() : 0.0;
    k.geo = *geo;
    k.grid = bn_make_grid(geo);
    k.stream_bytes = bn_stream_threshold();
    k.x = x;
    k.y = x;
    k.g = x;
    k.ax = x;
    return k;
}

static inline size_t bn_context_doubles(const bn_context *k, int partials)
{
    const size_t C = (size_t)k->geo.channels, P = (size_t)k->grid.partial_rows;
    return 3 * C + BN_COEF_DOUBLES * C + (partials ? 2 * P * C + 2 * P : 0);
}

/* Carve the per-channel coefficients and partials out of `buf` (of
 * bn_context_doubles doubles) or, when it is NULL, one malloc. */
static inline int bn_context_alloc(bn_context *k, int partials, double *buf)
{
    const size_t C = (size_t)k->geo.channels, P = (size_t)k->grid.partial_rows;
    if (!buf) {
        k->scratch = (double *)malloc(sizeof(double) * (bn_context_doubles(k, partials) + 1));
        if (!k->scratch) return -1;
        buf = k->scratch;
    }
    k->mean = buf;
    k->next_mean = k->mean + C;
    k->next_var = k->next_mean + C;
    k->coef = k->next_var + C; /* doubles are aligned for any element type */
    if (partials) {
        k->part.mean = k->next_var + C + BN_COEF_DOUBLES * C;
        k->part.m2 = k->part.mean + P * C;
        k->part.share = k->part.m2 + P * C;
        k->part.weight = k->part.share + P;
        /* the count of partial p, the same for every channel */
        const bn_grid *g = &k->grid;
        double before = 0.0;
        for (size_t p = 0; p < P; p++) {
            double n;
            if (g->channels_last) {
                n = (double)(bn_min(k->geo.outer, (ptrdiff_t)(p + 1) * g->chunk) - (ptrdiff_t)p * g->chunk);
            } else {
                const ptrdiff_t group = (ptrdiff_t)p / g->segments, s = (ptrdiff_t)p % g->segments;
                const ptrdiff_t rows = bn_min(k->geo.outer, (group + 1) * g->group) - group * g->group;
                n = (double)(rows * bn_min(g->segment_len, k->geo.inner - s * g->segment_len));
            }
            k->part.share[p] = n / (before + n);
            k->part.weight[p] = before * n / (before + n);
            before += n;
        }
    }
    return 0;
}

/* Whether the call should stop: the flag, or (on the calling thread, every
 * 16 tasks and at most every 50 ms) a fresh answer of run->interrupted. */
static inline int bn_stopped(bn_context *k)
{
    if (bn_flag_load(&k->stop)) return 1;
    if (!k->run->interrupted || bn_thread_num() != 0 || (++k->polls & 15u)) return 0;
    const double now = bn_wtime();
    if (now - k->last_poll < 0.05) return 0;
    k->last_poll = now;
    if (!k->run->interrupted(k->run->arg)) return 0;
    bn_flag_raise(&k->stop);
    return 1;
}

static inline void bn_context_free(bn_context *k)
{
    free(k->scratch);
    k->scratch = NULL;
}

/* ---- instantiations: element type x instruction set ------------------
 * The portable body (compiled for the build's baseline: SSE2 on x86-64, NEON
 * on aarch64) always exists.  On x86 with GCC or clang further copies are
 * compiled for AVX2+FMA and for AVX-512 and chosen at run time (see
 * bn_select_isa): a portable build still runs the widest vectors the CPU has. */
#define BN_ISA_BASELINE 0
#define BN_ISA_AVX2 1
#define BN_ISA_AVX512 2

#if (defined(__x86_64__) || defined(_M_X64) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__)) && !defined(BN_NO_DISPATCH)
#define BN_HAVE_AVX2_VARIANT 1
#else
#define BN_HAVE_AVX2_VARIANT 0
#endif
/* AVX-512 needs the AVX2 variant's toolchain; BN_NO_AVX512 drops it alone. */
#if BN_HAVE_AVX2_VARIANT && !defined(BN_NO_AVX512)
#define BN_HAVE_AVX512_VARIANT 1
#else
#define BN_HAVE_AVX512_VARIANT 0
#endif

#if defined(__AVX512F__)
#define BN_VEC_BYTES 64 /* a -march build that already has AVX-512 */
#elif defined(__AVX__)
#define BN_VEC_BYTES 32 /* a -march build that already has AVX */
#else
#define BN_VEC_BYTES 16 /* SSE2, NEON */
#endif
#define BN_ISA_SFX base
#include "instantiate.h"
#undef BN_ISA_SFX
#undef BN_VEC_BYTES

#if BN_HAVE_AVX2_VARIANT
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#ifndef BN_AVX2_VEC_BYTES
#define BN_AVX2_VEC_BYTES 32
#endif
#define BN_VEC_BYTES BN_AVX2_VEC_BYTES
#define BN_ISA_SFX avx2
#include "instantiate.h"
#undef BN_ISA_SFX
#undef BN_VEC_BYTES
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

#if BN_HAVE_AVX512_VARIANT
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#endif
#define BN_VEC_BYTES 64
#define BN_ISA_SFX avx512
#include "instantiate.h"
#undef BN_ISA_SFX
#undef BN_VEC_BYTES
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

/* ---- run-time choice of the instruction set ----------------------------- */

static int bn_isa_active = -1; /* -1: not chosen yet */

#if BN_HAVE_AVX512_VARIANT
#include <cpuid.h>
/* Whether the OS saves the AVX-512 state (opmask, ZMM0-15 upper halves,
 * ZMM16-31) on context switches: XCR0 bits 1, 2, 5, 6, 7.  Current libgcc and
 * compiler-rt check this in __builtin_cpu_supports too, libgcc before 7.4 did
 * not (GCC PR 85100), and a wrong answer means SIGILL, so check here as well.
 * (macOS enables the ZMM state lazily and may report it clear: AVX2 there.) */
static inline int bn_os_saves_zmm(void)
{
    unsigned a, b, c, d, lo, hi;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0; /* OSXSAVE */
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return (lo & 0xe6) == 0xe6;
}
#endif

/* Whether this CPU (and OS) can run the given variant of this build. */
static inline int bn_isa_available(int isa)
{
    if (isa == BN_ISA_BASELINE) return 1;
#if BN_HAVE_AVX2_VARIANT
    if (isa == BN_ISA_AVX2) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
#endif
#if BN_HAVE_AVX512_VARIANT
    if (isa == BN_ISA_AVX512) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
               && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
               && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
               && bn_os_saves_zmm();
    }
#endif
    return 0;
}

/* The widest variant this CPU runs. */
static inline int bn_isa_best(void)
{
    if (bn_isa_available(BN_ISA_AVX512)) return BN_ISA_AVX512;
    return bn_isa_available(BN_ISA_AVX2) ? BN_ISA_AVX2 : BN_ISA_BASELINE;
}

/* Use variant `isa` (-1: the best available); returns the variant in use, or
 * -1 (nothing changed) when this CPU or build cannot run it. */
static inline int bn_select_isa(int isa)
{
    if (isa < 0) isa = bn_isa_best();
    if (!bn_isa_available(isa)) return -1;
    bn_isa_active = isa;
    return isa;
}

static inline int bn_isa(void)
{
    if (bn_isa_active < 0) bn_isa_active = bn_isa_best();
    return bn_isa_active;
}

#if BN_HAVE_AVX512_VARIANT
#define BN_DISPATCH(name, sfx, args)                                  \
    (bn_isa() == BN_ISA_AVX512 ? name##sfx##_avx512 args              \
     : bn_isa() == BN_ISA_AVX2 ? name##sfx##_avx2 args : name##sfx##_base args)
#elif BN_HAVE_AVX2_VARIANT
#define BN_DISPATCH(name, sfx, args) \
    (bn_isa() == BN_ISA_AVX2 ? name##sfx##_avx2 args : name##sfx##_base args)
#else
#define BN_DISPATCH(name, sfx, args) (name##sfx##_base args)
#endif

#define BN_DEFINE_ENTRIES(T, sfx)                                                              \
    static inline int bn_moments_##sfx(const bn_geometry *geo, bn_array x, double *count,     \
                                       double *mean, double *m2, const bn_run *run)           \
    {                                                                                          \
        return BN_DISPATCH(bn_moments_, sfx, (geo, x, count, mean, m2, run));                  \
    }                                                                                          \
    static inline int bn_forward_train_##sfx(const bn_geometry *geo, bn_array x, bn_array y,  \
                                             const T *weight, const T *bias, T *running_mean, \
                                             T *running_var, double momentum, double eps,     \
                                             T *save_mean, T *save_invstd, const bn_run *run) \
    {                                                                                          \
        return BN_DISPATCH(bn_forward_train_, sfx,                                             \
                           (geo, x, y, weight, bias, running_mean, running_var, momentum, eps, \
                            save_mean, save_invstd, run));                                     \
    }                                                                                          \
    static inline int bn_inference_##sfx(const bn_geometry *geo, bn_array x, bn_array y,      \
                                         const T *running_mean, const T *running_var,         \
                                         const T *weight, const T *bias, double eps,          \
                                         const bn_run *run)                                   \
    {                                                                                          \
        return BN_DISPATCH(bn_inference_, sfx,                                                 \
                           (geo, x, y, running_mean, running_var, weight, bias, eps, run));    \
    }                                                                                          \
    static inline int bn_backward_##sfx(const bn_geometry *geo, bn_array grad_out, bn_array x, \
                                        bn_array grad_in, const T *save_mean,                  \
                                        const T *save_invstd, const T *weight, int training,   \
                                        T *grad_weight, T *grad_bias, const bn_run *run)       \
    {                                                                                          \
        return BN_DISPATCH(bn_backward_, sfx,                                                  \
                           (geo, grad_out, x, grad_in, save_mean, save_invstd, weight,         \
                            training, grad_weight, grad_bias, run));                           \
    }

BN_DEFINE_ENTRIES(float, f32)
BN_DEFINE_ENTRIES(double, f64)
#undef BN_DEFINE_ENTRIES

#endif
