/* bnfast kernels for float32, float64, float16 and bfloat16, both layout
 * families: the kernel context, the instantiations (element type x instruction set) of
 * kernel_body.h, and the [dtype][isa] table of their entry points (ops.h),
 * which bnfast.h dispatches through.  Results are bit-identical for any
 * thread count. */
#ifndef BNFAST_KERNELS_H
#define BNFAST_KERNELS_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "cache.h"
#include "moments.h"
#include "ops.h"
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

/* Outputs larger than this many bytes may be written with streaming stores. */
static inline size_t bn_stream_bytes(const bn_run *run)
{
    return run->stream_bytes < 0 ? bn_stream_threshold_default() : (size_t)run->stream_bytes;
}

/* Planar training forwards and backwards whose reduced operands (x, and g
 * in the backward) exceed this many bytes go in channel groups of
 * BN_GROUP_BYTES (parallel.h): the last-level cache by default (the
 * streaming threshold over BN_STREAM_LLC_FACTOR, so that one override moves
 * both).  Below it the operands stay in that cache between the two passes
 * anyway, and one group saves the barriers of many: 0.59-0.94 of the time
 * for 6-26 MB (Zen 4, 32 MB L3, 2 threads). */
static inline size_t bn_group_min_bytes(const bn_run *run)
{
    return bn_stream_bytes(run) / BN_STREAM_LLC_FACTOR;
}

/* For helpers with compile-time-constant arguments that must specialize. */
#if defined(__GNUC__) || defined(__clang__)
#define BN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define BN_ALWAYS_INLINE inline
#endif

/* How an instantiation stores its elements (BN_STORAGE, storage.h). */
#define BN_STORE_NATIVE 0 /* as the arithmetic type: float32, float64 */
#define BN_STORE_F16 1    /* IEEE binary16 in uint16_t, computed in float */
#define BN_STORE_BF16 2   /* bfloat16 (a float's upper 16 bits) in uint16_t, computed in float */

/* Phases of an op; see bn_exec_ in kernel_body.h. */
enum { BN_OP_MOMENTS, BN_OP_FORWARD, BN_OP_INFERENCE, BN_OP_BACKWARD };

/* Everything a task needs: operands, per-channel coefficients, partials, and
 * the op's own arguments (typed by the kernel body). */
typedef struct {
    bn_geometry geo;
    bn_grid grid;
    int op, stream;
    ptrdiff_t group_channels; /* planar: channels per cache group */
    ptrdiff_t key_block;      /* planar keys of one task each: keys per block (exec_blocks_), else 0 */
    bn_array x, y, g;
    bn_array ax;  /* input of the affine phase */
    /* the keyed view (bn_keys): channels here are keys; statistics pool
     * `group` consecutive keys; weight/bias are indexed by key % affine_period,
     * or by inner element (affine_inner) */
    ptrdiff_t group, affine_period;
    int uncentered, affine_inner;
    double *mean; /* per channel, in double: the mean the statistics are centred on */
    double *kmean, *km2; /* per key: merged state (or gradient sums) before pooling */
    /* affine_inner backward: per unit of col_unit apply tasks, the column sums
     * sum(g) and sum(g * xhat), inner each, merged in unit order */
    double *colpart;
    ptrdiff_t col_unit;
    void *coef;   /* per channel, in the element type: the apply phase's coefficients */
    /* coefficient arrays are coef_len long: coef_rows copies of the C
     * channels' values, so that coef_rows contiguous channels-last rows are
     * one span with a coefficient per element (rows of few channels) */
    ptrdiff_t coef_len, coef_rows;
    bn_partials part;                       /* partial states, row-major */
    double *scratch;
    /* per key, in double: forward, the running statistics' next values;
     * backward, the contributions to grad_weight and grad_bias; written back
     * (averaged or summed per channel) by the entry point on success */
    double *next_mean, *next_var;
    const bn_run *run;
    int *stop;         /* the call's flag, shared by its contexts: raised when
                          run->interrupted asked to stop */
    unsigned polls;    /* tasks seen by the calling thread since the last poll */
    int quiet;         /* run whole by a thread other than the caller: never polls */
    double last_poll;  /* bn_wtime() of the last call to run->interrupted */
    /* op arguments */
    const void *weight, *bias, *save_mean_in, *save_invstd_in;
    void *running_mean, *running_var, *save_mean, *save_invstd, *grad_weight, *grad_bias;
    double momentum, eps;
    int training;
    double *out_count, *out_mean, *out_m2;
    double share;            /* the batch's share of the statistics (backward: 0 means 1) */
    const double *ref_mean;  /* backward: the variance's reference mean, or NULL */
    /* forward: other normalizing statistics (bn_forward_args) */
    double r_max, d_max;
    const double *prior_mean, *prior_var;
    int prior_moments;
    double *stats_out;
    /* fused activation of the forward/inference apply (bn_act): its kind,
     * slope, and whether g is a residual added before it */
    int act, residual;
    double slope;
} bn_context;

/* The apply phase's per-channel coefficients (see kernel_body.h), and the
 * doubles per channel that hold them in any element type. */
enum { BN_MH, BN_ML, BN_S, BN_B, BN_A, BN_INV, BN_K1, BN_K0, BN_COEFS };
#define BN_COEF_DOUBLES BN_COEFS
/* Channels-last rows of fewer channels than this are applied in spans of
 * about this many elements (several rows; see coef_rows). */
#define BN_SPAN_ELEMS 256

/* Scratch small enough for the stack: tiny calls never touch malloc. */
#define BN_STACK_DOUBLES 1024

static inline bn_context bn_context_new(const bn_geometry *geo, bn_array x, const bn_run *run, int *stop)
{
    bn_context k;
    memset(&k, 0, sizeof k);
    k.run = run;
    k.stop = stop;
    k.last_poll = run->interrupted ? bn_wtime() : 0.0;
    k.geo = *geo;
    k.grid = bn_make_grid(geo);
    /* repeated coefficients pay off from a few spans of work on; a small
     * call would spend more time writing them than it saves */
    k.coef_rows = k.grid.channels_last && geo->channels < BN_SPAN_ELEMS
                          && geo->outer * geo->channels >= BN_PARALLEL_MIN_ELEMS
                      ? BN_SPAN_ELEMS / geo->channels
                      : 1;
    k.coef_len = k.coef_rows * geo->channels;
    k.group = 1;
    k.affine_period = geo->channels;
    k.x = x;
    k.y = x;
    k.g = x;
    k.ax = x;
    return k;
}

static inline size_t bn_context_doubles(const bn_context *k, int partials)
{
    const size_t C = (size_t)k->geo.channels, P = (size_t)k->grid.partial_rows;
    return 5 * C + BN_COEF_DOUBLES * (size_t)k->coef_len + (partials ? 2 * P * C + 2 * P : 0);
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
    k->kmean = k->next_var + C;
    k->km2 = k->kmean + C;
    k->coef = k->km2 + C; /* doubles are aligned for any element type */
    if (partials) {
        k->part.mean = k->km2 + C + BN_COEF_DOUBLES * (size_t)k->coef_len;
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
    if (bn_flag_load(k->stop)) return 1;
    if (!k->run->interrupted || k->quiet || bn_thread_num() != 0 || (++k->polls & 15u)) return 0;
    const double now = bn_wtime();
    if (now - k->last_poll < 0.05) return 0;
    k->last_poll = now;
    if (!k->run->interrupted(k->run->arg)) return 0;
    bn_flag_raise(k->stop);
    return 1;
}

static inline void bn_context_free(bn_context *k)
{
    free(k->scratch);
    free(k->colpart);
    k->scratch = NULL;
    k->colpart = NULL;
}

/* A keyed call (bn_keys) runs as one grid over every sample's channels when
 * each operand's samples follow each other channel-wise (batch stride =
 * channels x channel stride, e.g. NCHW instance norm), else sample by
 * sample; both give the same results. */
static inline int bn_keys_flat(const bn_array *a, ptrdiff_t channels)
{
    return a->batch_stride == channels * a->channel_stride;
}

static inline ptrdiff_t bn_keys_batch(const bn_keys *q) { return q->batch > 1 ? q->batch : 1; }
static inline ptrdiff_t bn_keys_group(const bn_keys *q) { return q->group > 1 ? q->group : 1; }

/* ---- instantiations: element type x instruction set ------------------
 * The portable body (compiled for the build's baseline: SSE2 on x86-64, NEON
 * on aarch64) always exists.  On x86 with GCC or clang further copies are
 * compiled for AVX2+FMA(+F16C) and for AVX-512 and chosen at run time (see
 * run->isa, bn_isa_best): a portable build still runs the widest vectors the CPU has. */
#define BN_ISA_BASELINE 0
#define BN_ISA_AVX2 1
#define BN_ISA_AVX512 2
#define BN_ISAS 3

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

/* The instantiations a translation unit makes.  By default all of them: the
 * header alone is the library.  A build may instead compile each one in a
 * unit of its own, side by side (the Python extension does: setup.py): every
 * unit then defines BN_SPLIT_VARIANTS; a variant unit also defines
 * BN_VARIANT_ISA (a BN_ISA_*) and BN_VARIANT_DTYPE (a BN_DT_* of ops.h) and makes that
 * one instantiation, its kernel set bn_kernels_<type>_<isa> external; the
 * other units make none and take the sets from the variant units. */
#if defined(__GNUC__) || defined(__clang__)
#define BN_HIDDEN __attribute__((visibility("hidden"))) /* not exported from a shared library */
#else
#define BN_HIDDEN
#endif
#if !defined(BN_SPLIT_VARIANTS)
#define BN_WANT_ISA(isa) 1
#define BN_WANT_DTYPE(d) 1
#define BN_KERNEL_SET_LINKAGE static
#elif defined(BN_VARIANT_ISA)
#define BN_WANT_ISA(isa) ((isa) == BN_VARIANT_ISA)
#define BN_WANT_DTYPE(d) ((d) == BN_VARIANT_DTYPE)
#define BN_KERNEL_SET_LINKAGE BN_HIDDEN
#else
#define BN_WANT_ISA(isa) 0
#define BN_WANT_DTYPE(d) 0
#endif

#if BN_WANT_ISA(BN_ISA_BASELINE)
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
#endif

#if BN_HAVE_AVX2_VARIANT && BN_WANT_ISA(BN_ISA_AVX2)
#ifndef BN_AVX2_VEC_BYTES
#define BN_AVX2_VEC_BYTES 32
#endif
#define BN_VEC_BYTES BN_AVX2_VEC_BYTES
#define BN_ISA_SFX avx2
#define BN_ISA_TARGET "avx2,fma,f16c"
#include "instantiate.h"
#undef BN_ISA_TARGET
#undef BN_ISA_SFX
#undef BN_VEC_BYTES
#endif

#if BN_HAVE_AVX512_VARIANT && BN_WANT_ISA(BN_ISA_AVX512)
#define BN_VEC_BYTES 64
#define BN_ISA_SFX avx512
#define BN_ISA_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"
#include "instantiate.h"
#undef BN_ISA_TARGET
#undef BN_ISA_SFX
#undef BN_VEC_BYTES
#endif

/* ---- which variants this CPU runs -------------------------------------- */

#if BN_HAVE_AVX2_VARIANT
#include <cpuid.h>
/* F16C (CPUID.1:ECX bit 29): the AVX2 and AVX-512 variants convert half
 * precision with it (every AVX2 CPU has it; checked all the same). */
static inline int bn_cpu_has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c >> 29 & 1u);
}
#endif

#if BN_HAVE_AVX512_VARIANT
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

/* Bit i set: this CPU and OS run variant i of this build.  Detected on the
 * first call (CPUID is slow under a hypervisor) and fixed for the process;
 * call it once before kernels run on several threads (the extension does at
 * import).  This is a fact about the machine, not a setting: the variant a
 * call runs is run->isa. */
static inline unsigned bn_isa_mask(void)
{
    static unsigned mask = 0; /* 0: not detected yet; bit 0 is always set */
    if (!mask) {
        unsigned m = 1u << BN_ISA_BASELINE;
#if BN_HAVE_AVX2_VARIANT
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && bn_cpu_has_f16c())
            m |= 1u << BN_ISA_AVX2;
#endif
#if BN_HAVE_AVX512_VARIANT
        if ((m >> BN_ISA_AVX2 & 1u) && __builtin_cpu_supports("avx512f")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("avx512vl") && bn_os_saves_zmm())
            m |= 1u << BN_ISA_AVX512;
#endif
        mask = m;
    }
    return mask;
}

/* Whether this CPU (and OS) can run the given variant of this build. */
static inline int bn_isa_available(int isa)
{
    return isa >= 0 && isa < BN_ISAS && (bn_isa_mask() >> isa & 1u);
}

/* The widest variant this CPU runs. */
static inline int bn_isa_best(void)
{
    const unsigned m = bn_isa_mask();
    return m >> BN_ISA_AVX512 & 1u ? BN_ISA_AVX512 : m >> BN_ISA_AVX2 & 1u ? BN_ISA_AVX2 : BN_ISA_BASELINE;
}

/* ---- the [dtype][isa] table --------------------------------------------- */

#if !defined(BN_VARIANT_ISA)
#if defined(BN_SPLIT_VARIANTS) /* the sets are made in the variant units */
#define BN_DECLARE_SETS_(isa)                                                                     \
    extern BN_HIDDEN const bn_kernel_set bn_kernels_f32_##isa, bn_kernels_f64_##isa,            \
        bn_kernels_f16_##isa, bn_kernels_bf16_##isa;
BN_DECLARE_SETS_(base)
#if BN_HAVE_AVX2_VARIANT
BN_DECLARE_SETS_(avx2)
#endif
#if BN_HAVE_AVX512_VARIANT
BN_DECLARE_SETS_(avx512)
#endif
#undef BN_DECLARE_SETS_
#endif

#if BN_HAVE_AVX2_VARIANT
#define BN_SET_AVX2_(t) &bn_kernels_##t##_avx2
#else
#define BN_SET_AVX2_(t) &bn_kernels_##t##_base /* never chosen: not available */
#endif
#if BN_HAVE_AVX512_VARIANT
#define BN_SET_AVX512_(t) &bn_kernels_##t##_avx512
#else
#define BN_SET_AVX512_(t) &bn_kernels_##t##_base
#endif
#define BN_SETS_(t) {&bn_kernels_##t##_base, BN_SET_AVX2_(t), BN_SET_AVX512_(t)}

static const bn_kernel_set *const bn_kernel_table[BN_DTYPES][BN_ISAS] = {
    BN_SETS_(f32), BN_SETS_(f64), BN_SETS_(f16), BN_SETS_(bf16)};

#undef BN_SETS_
#undef BN_SET_AVX2_
#undef BN_SET_AVX512_

/* The kernels a call runs: its dtype's, in variant run->isa (-1: the widest
 * available); NULL when that variant cannot run here. */
static inline const bn_kernel_set *bn_kernels_for(bn_dtype dtype, const bn_run *run)
{
    const int isa = run->isa < 0 ? bn_isa_best() : run->isa;
    return bn_isa_available(isa) ? bn_kernel_table[dtype][isa] : NULL;
}
#endif

#endif
