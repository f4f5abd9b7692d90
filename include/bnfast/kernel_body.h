/* Batch-norm kernels, written once and instantiated per element type and
 * instruction set by kernels.h: define BN_T (the storage type of the
 * elements), BN_AT (the arithmetic type, also that of the per-channel arrays),
 * BN_STORAGE (how one converts to the other, storage.h), BN_T_IS_FLOAT (BN_AT
 * is float), BN_VEC_BYTES (SIMD register width) and BN_SFX (the name
 * suffix), then include this file.  No include guard on purpose.
 *
 * Statistics and gradient sums accumulate in double whatever BN_T is (the
 * training forward's statistics and the backward's gradient sums of float
 * and half data first try float blocks of bounded error: planar_float_sums_,
 * rows_float_sums_); the apply phase (apply_body.h) computes in BN_AT on
 * the centred form.  Vector
 * loops and their scalar tails evaluate the same expressions, and which
 * elements a vector loop covers depends on the shape and addresses only, so
 * results are bit-identical for any thread count. */

#define BN_CAT_(a, b) a##b
#define BN_CAT(a, b) BN_CAT_(a, b)
#define BN_FN(name) BN_CAT(name, BN_SFX)

/* ---- vectors ------------------------------------------------------------
 * VD: W doubles, the statistics' accumulators (read from BN_T by BN_LD).  The
 * statistics loops keep BN_U independent vectors of lanes that share one
 * Welford count, so there is one division per BN_U * W elements and no
 * reassociation.  They use at most 32-byte vectors: with 64-byte ones (on
 * Zen 4, which splits them in two) the double-precision passes measured no
 * faster and channels-last ones slower; the apply phase (VA, below) uses the
 * full width. */
#define BN_STATS_BYTES (BN_VEC_BYTES > 32 ? 32 : BN_VEC_BYTES)
#define W (BN_STATS_BYTES / 8)
#define BN_U 4

#if BN_VECTORS
typedef double BN_FN(vd_) __attribute__((vector_size(BN_STATS_BYTES)));
#define VD BN_FN(vd_)

static BN_ALWAYS_INLINE VD BN_FN(ldd_)(const double *p)
{
    VD v;
    memcpy(&v, p, sizeof v);
    return v;
}

static BN_ALWAYS_INLINE VD BN_FN(splat_)(double s)
{
    VD v;
    for (int l = 0; l < W; l++) v[l] = s;
    return v;
}

#define BN_LDD BN_FN(ldd_)
#define BN_SPLAT BN_FN(splat_)

/* VA: WA values of BN_AT in one register, for the apply phase, which
 * computes in BN_AT (the statistics accumulate in double). */
#define WA ((ptrdiff_t)(BN_VEC_BYTES / sizeof(BN_AT)))
typedef BN_AT BN_FN(va_) __attribute__((vector_size(BN_VEC_BYTES)));

static BN_ALWAYS_INLINE BN_FN(va_) BN_FN(splata_)(BN_AT s)
{
    BN_FN(va_) v;
    for (ptrdiff_t l = 0; l < WA; l++) v[l] = s;
    return v;
}

#define BN_SPLATA BN_FN(splata_)
#endif

/* loads and stores of elements: BN_LD, BN_LDA, BN_STA, BN_STREAMA, BN_TO_A, ... */
#include "storage.h"

/* Streaming stores write whole 64-byte lines only (a whole number of vectors):
 * elements per line, and elements before p's next line boundary (-1 if p is
 * not element-aligned). */
#define BN_LINE_T ((ptrdiff_t)(64 / sizeof(BN_T)))
static BN_ALWAYS_INLINE ptrdiff_t BN_FN(line_peel_)(const BN_T *p)
{
    const size_t a = (size_t)p % 64;
    if (a % sizeof(BN_T)) return -1;
    return a ? (ptrdiff_t)((64 - a) / sizeof(BN_T)) : 0;
}

/* Planar tasks read runs of a few tens of KB, a channel stride apart; the
 * hardware prefetchers stop at page boundaries, so without help a task's
 * loads keep waiting on DRAM.  The loops over planar runs ask for the lines
 * BN_PREFETCH_BYTES ahead of those they read, past a run's end in the run
 * that follows it in the task order (bn_planar_next, parallel.h).  Measured on
 * (64,64,112,112) NCHW training forward, Zen 5: 0.59-0.74 of the time in
 * float16 and 0.80-0.94 in float32, on one or two threads. */
#ifndef BN_PREFETCH_BYTES
#define BN_PREFETCH_BYTES 4096
#endif
static BN_ALWAYS_INLINE void BN_FN(prefetch_)(const BN_T *run, ptrdiff_t i, ptrdiff_t len, ptrdiff_t next,
                                              size_t bytes)
{
#if defined(__GNUC__) || defined(__clang__)
    ptrdiff_t a = i + (ptrdiff_t)(BN_PREFETCH_BYTES / sizeof(BN_T));
    if (a >= len) {
        if (!next) return;
        a += next - len;
    }
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)(run + a) + o);
#else
    (void)run, (void)i, (void)len, (void)next, (void)bytes;
#endif
}

static inline void BN_FN(stream_fence_)(int stream)
{
#if BN_CAN_STREAM
    if (stream) _mm_sfence();
#else
    (void)stream;
#endif
}

/* ---- per-channel coefficients of the apply phase -------------------------
 * Arrays of BN_AT, BN_COEFS of them (kernels.h), channels long, in k->coef: the mean as a
 * pair mh + ml (ml = 0 for double), the affine scale s and shift b, and for
 * the gradient the factors of grad_in = g * a + xhat * k1 + k0 with
 * xhat = (x - mean) * inv.  Kept as xhat-terms (not one coefficient of x)
 * so that no coefficient underflows in BN_AT for data of huge magnitude. */
typedef struct {
    BN_AT mh, ml, s, b, a, inv, k1, k0;
} BN_FN(coef_);

static inline void BN_FN(set_coef_)(const bn_context *k, ptrdiff_t c, double mean, double s,
                                    double b, double a, double inv, double k1, double k0)
{
    const BN_AT mh = (BN_AT)mean;
    const BN_AT v[BN_COEFS] = {mh, (BN_AT)(mean - (double)mh), (BN_AT)s, (BN_AT)b,
                              (BN_AT)a, (BN_AT)inv, (BN_AT)k1, (BN_AT)k0};
    const ptrdiff_t L = k->coef_len, C = k->geo.channels;
    for (int f = 0; f < BN_COEFS; f++) {
        BN_AT *q = (BN_AT *)k->coef + f * L;
        for (ptrdiff_t r = c; r < L; r += C) q[r] = v[f]; /* each copy (see coef_rows) */
    }
}

static BN_ALWAYS_INLINE BN_FN(coef_) BN_FN(coef_at_)(const bn_context *k, ptrdiff_t c)
{
    const BN_AT *q = (const BN_AT *)k->coef;
    const ptrdiff_t L = k->coef_len;
    BN_FN(coef_) K = {q[BN_MH * L + c], q[BN_ML * L + c], q[BN_S * L + c], q[BN_B * L + c],
                      q[BN_A * L + c], q[BN_INV * L + c], q[BN_K1 * L + c], q[BN_K0 * L + c]};
    return K;
}

#if BN_VECTORS
typedef struct {
    BN_FN(va_) mh, ml, s, b, a, inv, k1, k0;
} BN_FN(coefv_);

/* Channel c's coefficients in every lane (planar runs). */
static BN_ALWAYS_INLINE BN_FN(coefv_) BN_FN(coefv_splat_)(const bn_context *k, ptrdiff_t c)
{
    const BN_FN(coef_) K = BN_FN(coef_at_)(k, c);
    BN_FN(coefv_) V = {BN_SPLATA(K.mh), BN_SPLATA(K.ml), BN_SPLATA(K.s),   BN_SPLATA(K.b),
                       BN_SPLATA(K.a),  BN_SPLATA(K.inv), BN_SPLATA(K.k1), BN_SPLATA(K.k0)};
    return V;
}

/* Channels c .. c + WA - 1, one per lane (channels-last rows). */
static BN_ALWAYS_INLINE BN_FN(coefv_) BN_FN(coefv_load_)(const bn_context *k, ptrdiff_t c)
{
    const BN_AT *q = (const BN_AT *)k->coef + c;
    const ptrdiff_t L = k->coef_len;
    BN_FN(coefv_) V = {BN_LDP(q + BN_MH * L), BN_LDP(q + BN_ML * L), BN_LDP(q + BN_S * L),
                       BN_LDP(q + BN_B * L),  BN_LDP(q + BN_A * L),  BN_LDP(q + BN_INV * L),
                       BN_LDP(q + BN_K1 * L), BN_LDP(q + BN_K0 * L)};
    return V;
}

static BN_ALWAYS_INLINE BN_FN(coefv_) BN_FN(coefv_zero_)(void)
{
    const BN_FN(va_) z = BN_SPLATA(0);
    BN_FN(coefv_) V = {z, z, z, z, z, z, z, z};
    return V;
}
#endif

/* ---- in-place activated batch norm: the backward's per-element transform --
 * With bn_act in the backward (leaky_relu or elu, no residual), the x
 * operand holds the forward's output y and the gradient sums and the grad
 * apply read g' = g * act'(y) and x' = act^-1(y) in place of g and x
 * (x' = BN(x); the caller passes bias, 1 / weight and weight^2 * invstd as
 * save_mean, save_invstd and weight, so that xhat = (x' - bias) / weight).
 * The sums take modes BN_XF_LEAKY / BN_XF_ELU of their with_g argument. */
#define BN_XF_LEAKY 4
#define BN_XF_ELU 5

static inline double BN_FN(xf_inv_s_)(double y, const int mode, double inv_slope)
{
    if (mode == BN_XF_LEAKY) return y < 0.0 ? y * inv_slope : y;
    if (mode == BN_XF_ELU) return y < 0.0 ? log1p(y) : y;
    return y;
}

static inline double BN_FN(xf_grad_s_)(double g, double y, const int mode, double slope)
{
    if (mode == BN_XF_LEAKY) return y > 0.0 ? g : g * slope;
    if (mode == BN_XF_ELU) return y > 0.0 ? g : g * (y + 1.0);
    return g;
}

#if BN_VECTORS
typedef long long BN_FN(vdi_) __attribute__((vector_size(BN_STATS_BYTES)));

static BN_ALWAYS_INLINE VD BN_FN(xf_inv_v_)(VD y, const int mode, VD inv_slope)
{
    if (mode == BN_XF_LEAKY) {
        const BN_FN(vdi_) neg = y < BN_SPLAT(0.0);
        return (VD)(((BN_FN(vdi_))(y * inv_slope) & neg) | ((BN_FN(vdi_))y & ~neg));
    }
    if (mode == BN_XF_ELU)
        for (int l = 0; l < W; l++) y[l] = BN_FN(xf_inv_s_)(y[l], mode, 0.0);
    return y;
}

static BN_ALWAYS_INLINE VD BN_FN(xf_grad_v_)(VD g, VD y, const int mode, VD slope)
{
    if (mode != BN_XF_LEAKY && mode != BN_XF_ELU) return g;
    const BN_FN(vdi_) pos = y > BN_SPLAT(0.0);
    const VD other = mode == BN_XF_LEAKY ? g * slope : g * (y + BN_SPLAT(1.0));
    return (VD)(((BN_FN(vdi_))g & pos) | ((BN_FN(vdi_))other & ~pos));
}
#endif

/* The sums' mode for context k's backward. */
static inline int BN_FN(xf_mode_)(const bn_context *k)
{
    return k->act == BN_ACT_LEAKY_RELU ? BN_XF_LEAKY : k->act == BN_ACT_ELU ? BN_XF_ELU : 1;
}

/* ---- statistics and gradient sums over planar tasks ---------------------- */

/* sum(a) and sum(b) over planar task u, in double, with y = x - shift and,
 * for the statistics (with_g = 0), a = y, b = y * y; for the gradient sums
 * (with_g = 1), a = g, b = g * y; for layer norm's (with_g = 2, weight w per
 * inner element) a = g * w, and also the column sums of its grad_bias and
 * grad_weight, col[i] += g and col[D + i] += g * y * inv (D = inner).
 * Lanes are summed in a fixed order, then the scalar tail. */
static BN_ALWAYS_INLINE void BN_FN(planar_sums_)(const bn_context *k, const bn_planar_task *u,
                                                 double shift, const int with_g, double *sum_a,
                                                 double *sum_b, double *col, double inv)
{
    const BN_AT *w = with_g == 2 ? (const BN_AT *)k->weight + u->offset : NULL;
    double *cg = with_g == 2 ? col + u->offset : NULL, *cgx = with_g == 2 ? cg + k->geo.inner : NULL;
    const ptrdiff_t c = u->channel, len = u->len;
    double ta = 0.0, tb = 0.0, la = 0.0, lb = 0.0;
    const double slope = with_g > 3 ? k->slope : 0.0, inv_slope = with_g > 3 ? 1.0 / k->slope : 0.0;
    (void)inv, (void)slope, (void)inv_slope;
#if BN_VECTORS
    const ptrdiff_t body = len - len % (BN_U * W);
    const VD vs = BN_SPLAT(shift), vinv = BN_SPLAT(inv);
    const VD vslope = BN_SPLAT(slope), vinv_slope = BN_SPLAT(inv_slope);
    VD sa[BN_U], sb[BN_U];
    for (int v = 0; v < BN_U; v++) sa[v] = sb[v] = BN_SPLAT(0.0);
#else
    const ptrdiff_t body = 0;
#endif
    for (ptrdiff_t n = u->row0; n < u->row1; n++) {
        const BN_T *x = (const BN_T *)k->x.data + n * k->x.outer_stride + c * k->x.channel_stride
                        + u->offset;
        const BN_T *g = with_g ? (const BN_T *)k->g.data + n * k->g.outer_stride
                                     + c * k->g.channel_stride + u->offset
                               : x;
#if BN_VECTORS
        const ptrdiff_t nx = bn_planar_next(&k->geo, u, n, &k->x);
        const ptrdiff_t ng = with_g ? bn_planar_next(&k->geo, u, n, &k->g) : 0;
        for (ptrdiff_t i = 0; i < body; i += BN_U * W) {
            BN_FN(prefetch_)(x, i, len, nx, BN_U * W * sizeof(BN_T));
            if (with_g) BN_FN(prefetch_)(g, i, len, ng, BN_U * W * sizeof(BN_T));
            for (int v = 0; v < BN_U; v++) {
                const VD xr = BN_LD(x + i + v * W);
                const VD y = BN_FN(xf_inv_v_)(xr, with_g, vinv_slope) - vs;
                const VD gv = with_g ? BN_FN(xf_grad_v_)(BN_LD(g + i + v * W), xr, with_g, vslope) : y;
                const VD a = with_g == 2 ? gv * BN_LDW(w + i + v * W) : gv;
                sa[v] += a;
                sb[v] += a * y;
                if (with_g == 2) {
                    const VD pg = BN_LDD(cg + i + v * W) + gv, pgx = BN_LDD(cgx + i + v * W) + gv * (y * vinv);
                    memcpy(cg + i + v * W, &pg, sizeof pg);
                    memcpy(cgx + i + v * W, &pgx, sizeof pgx);
                }
            }
        }
#endif
        for (ptrdiff_t i = body; i < len; i++) {
            const double y = BN_FN(xf_inv_s_)((double)BN_TO_A(x[i]), with_g, inv_slope) - shift;
            const double gv = with_g ? BN_FN(xf_grad_s_)((double)BN_TO_A(g[i]), (double)BN_TO_A(x[i]), with_g, slope) : y;
            const double a = with_g == 2 ? gv * (double)w[i] : gv;
            ta += a;
            tb += a * y;
            if (with_g == 2) {
                cg[i] += gv;
                cgx[i] += gv * (y * inv);
            }
        }
    }
#if BN_VECTORS
    for (int v = 0; v < BN_U; v++)
        for (int l = 0; l < W; l++) {
            la += sa[v][l];
            lb += sb[v][l];
        }
#endif
    *sum_a = la + ta;
    *sum_b = lb + tb;
}

#if BN_T_IS_FLOAT
/* Float data: the task's state from sums in double of the values shifted by
 * a pilot (the task's first value), sum(y) and sum(y * y) with y = x - pilot.
 * Each y is exact in double and the sums of one task (at most BN_TASK_ELEMS
 * values) carry ~1e-16 relative error, so M2 = sum(y*y) - sum(y)^2 / n keeps
 * ~1e-14 of relative accuracy even when the pilot is several deviations from
 * the mean; a constant channel gives exactly M2 = 0.  Independent sums have
 * no loop-carried Welford chain: about twice the throughput.  (Float squares
 * cannot overflow a double; double data keeps Welford.) */
static inline void BN_FN(state_of_sums_)(double pilot, double s1, double s2, double count,
                                         double *mean, double *m2)
{
    const double shift = s1 / count, v = s2 - s1 * shift;
    *mean = pilot + shift;
    *m2 = v > 0.0 ? v : v == v ? 0.0 : v; /* rounding never makes it negative; NaN stays */
}

#define BN_FLOAT_SUMS BN_VECTORS

#if BN_FLOAT_SUMS
/* The fast form of those sums: y = x - pilot and y * y accumulate in float
 * lanes (BN_AT, the full vector width) over BN_FLUSH steps of each lane, and
 * those short partial sums are added up in double lanes, then the lanes in a
 * fixed order: a third of the double sums' work.  The blocking depends on
 * positions within the task only, so the bits do not depend on the thread
 * count.  A task keeps its float sums only where float_sums_ok_ bounds their
 * error below the statistics' bar; anywhere else (overflow, underflow, NaN,
 * a pilot far from the mean) it is summed again in double. */
#define BN_FLUSH 8
#define BN_FLOAT_SUMS_MIN_BLOCKS 8

/* Double accumulators of the float lanes: VW, WA / 2 doubles (the full
 * width); acc[0] += the low half of v's lanes, acc[1] += the high half. */
typedef double BN_FN(vw_) __attribute__((vector_size(BN_VEC_BYTES)));
typedef BN_AT BN_FN(vh_) __attribute__((vector_size(BN_VEC_BYTES / 2)));
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector) /* GCC 12, clang */
#define BN_SHUFFLE_ 1
#endif
#endif
#ifndef BN_SHUFFLE_
/* older compilers: through memory (slower, the same values) */
#define BN_HALVES_(v, lo, hi)                                                                      \
    memcpy(&(lo), &(v), sizeof(lo)), memcpy(&(hi), (const char *)&(v) + sizeof(lo), sizeof(hi))
#elif BN_VEC_BYTES == 64
#define BN_HALVES_(v, lo, hi)                                                                      \
    (lo) = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),                                  \
    (hi) = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)
#elif BN_VEC_BYTES == 32
#define BN_HALVES_(v, lo, hi)                                                                      \
    (lo) = __builtin_shufflevector(v, v, 0, 1, 2, 3), (hi) = __builtin_shufflevector(v, v, 4, 5, 6, 7)
#else
#define BN_HALVES_(v, lo, hi)                                                                      \
    (lo) = __builtin_shufflevector(v, v, 0, 1), (hi) = __builtin_shufflevector(v, v, 2, 3)
#endif
/* (a shuffle, not a memcpy of v: taking its address would keep the
 * accumulators in memory) */
static BN_ALWAYS_INLINE void BN_FN(flush_)(BN_FN(vw_) *acc, BN_FN(va_) v)
{
    BN_FN(vh_) lo, hi;
    BN_HALVES_(v, lo, hi);
    acc[0] += __builtin_convertvector(lo, BN_FN(vw_));
    acc[1] += __builtin_convertvector(hi, BN_FN(vw_));
}
#undef BN_HALVES_
#undef BN_SHUFFLE_

/* The lanes of acc[0 .. 2 * BN_U): a fixed tree over the vectors (BN_U is
 * a power of two), then the lanes of the last one in order. */
static BN_ALWAYS_INLINE double BN_FN(lanes_sum_)(BN_FN(vw_) *acc)
{
    for (int half = BN_U; half >= 1; half /= 2)
        for (int j = 0; j < half; j++) acc[j] += acc[j + half];
    double t = 0.0;
    for (ptrdiff_t l = 0; l < WA / 2; l++) t += acc[0][l];
    return t;
}

/* Whether float-block sums s1 = sum(y), s2 = sum(y * y) of count values,
 * y = x - pilot, are as good as the statistics need.  Each y and each partial
 * sum of at most BN_FLUSH terms is rounded in float (u = 2^-24), errors
 * relative to |y|, so the sums are used only where (a) s2 is finite (no float
 * overflow), (b) the mean square is at least 2^-100 (a square that underflows
 * loses at most 2^-150: their total stays below 2^-50 of s2) and (c) the pilot
 * lies within 2 deviations of the mean, d^2 <= 4 var with d = mean - pilot.
 * Then, to first order, M2 = s2 - s1^2 / n is off by at most
 * (BN_FLUSH + 1) u (1 + d^2/var) + 2 BN_FLUSH u |d| sqrt(var + d^2) / var
 * <= 117 u = 7.0e-6 of itself, and the mean by BN_FLUSH u sqrt(var + d^2)
 * <= 1.1e-6 deviations: within the bar of float32 data's statistics (1e-5)
 * even in the worst case; typical errors are orders of magnitude smaller.
 * Constant data (M2 = 0) and NaN fail (b) or (c) and take the double path,
 * which keeps their exact results. */
static inline int BN_FN(float_sums_ok_)(double s1, double s2, double count)
{
    /* (c) as (s1 / n)^2 <= 4 (s2 / n - (s1 / n)^2), without a division */
    return (s2 <= DBL_MAX) & (s2 >= count * 0x1p-100) & (5.0 * (s1 * s1) <= 4.0 * (count * s2));
}

/* The float sums' pilot: the mean, in float, of the vectors at p, p + step,
 * ..., p + (m - 1) step (WA lanes each), the first values of a task's first
 * rows -- near the mean, unlike a single element, which may be an outlier. */
static BN_ALWAYS_INLINE BN_FN(va_) BN_FN(pilot_mean_)(const BN_T *p, ptrdiff_t step, ptrdiff_t m)
{
    BN_FN(va_) t = BN_LDA(p);
    for (ptrdiff_t r = 1; r < m; r++) t += BN_LDA(p + r * step);
    return t / BN_SPLATA((BN_AT)m);
}

/* Whether a statistics or gradient-sums task whose lanes each sum per_lane
 * values takes the float sums: not for moments (its float64 state is the
 * product: it keeps double sums, exact to ~1e-16), nor for lanes of fewer
 * than BN_FLOAT_SUMS_MIN_BLOCKS blocks (the statistics) or
 * BN_GRAD_FLOAT_SUMS_MIN_BLOCKS (the backward's gradient sums), where the
 * task's fixed costs (pilots, flushes, the lanes' reduction) outweigh the
 * gain: measured on planar tasks of 512 values and on channels-last tasks of
 * 21 rows.  The statistics keep 8 blocks: with 2 (0.70-0.89 of the time on
 * planar float32 tasks of 1024-3136 values, Zen 5) small tasks' statistics
 * miss tests/test_half.py's bar of one float32 ulp, by up to 1.6 ulp at 40
 * rows.  The gradient sums' error bound (grad_float_sums_ok_) holds for any
 * number of blocks: from 2 on, (1,64,56,56) NCHW and (256,1024) backward take
 * 0.83 of the time; 1 block measured no faster. */
#define BN_GRAD_FLOAT_SUMS_MIN_BLOCKS 2
static inline int BN_FN(float_sums_wanted_)(const bn_context *k, double per_lane)
{
    const int blocks = k->op == BN_OP_BACKWARD ? BN_GRAD_FLOAT_SUMS_MIN_BLOCKS : BN_FLOAT_SUMS_MIN_BLOCKS;
    return k->op != BN_OP_MOMENTS && per_lane >= blocks * BN_FLUSH;
}

/* v with its first WA - part lanes replaced by fill's (bitwise: an inf or
 * NaN in a replaced lane leaves no trace). */
typedef int32_t BN_FN(vmask_) __attribute__((vector_size(BN_VEC_BYTES)));
static BN_ALWAYS_INLINE BN_FN(va_) BN_FN(last_lanes_)(BN_FN(va_) v, BN_FN(va_) fill, ptrdiff_t part)
{
    BN_FN(vmask_) lane;
    for (ptrdiff_t l = 0; l < WA; l++) lane[l] = (int32_t)l;
    const BN_FN(vmask_) keep = lane >= (int32_t)(WA - part);
    return (BN_FN(va_))(((BN_FN(vmask_))v & keep) | ((BN_FN(vmask_))fill & ~keep));
}

/* The float-block sums of planar task u: with_g = 0, the statistics' sums
 * of y = x - pilot with the pilot chosen here (into *pilot); with_g = 1, the
 * gradient sums a = g, b = g * y with y = x - *pilot, the pilot given (the
 * caller's shift, rounded to BN_AT). */
static BN_ALWAYS_INLINE void BN_FN(planar_float_sums_)(const bn_context *k, const bn_planar_task *u,
                                                       const int with_g, double *pilot, double *sum1,
                                                       double *sum2)
{
    const ptrdiff_t c = u->channel, len = u->len, body = len - len % (BN_U * WA);
    const ptrdiff_t rest = (len - body) / WA, part = (len - body) % WA;
    const BN_T *first = (const BN_T *)k->x.data + u->row0 * k->x.outer_stride + c * k->x.channel_stride
                        + u->offset;
    const BN_T *gfirst = with_g ? (const BN_T *)k->g.data + u->row0 * k->g.outer_stride
                                      + c * k->g.channel_stride + u->offset
                                : first;
    BN_AT p = with_g ? (BN_AT)*pilot : BN_TO_A(first[0]);
    if (!with_g && len >= WA) { /* the mean of the first vector of the task's first BN_U rows */
        const BN_FN(va_) m = BN_FN(pilot_mean_)(first, k->x.outer_stride, bn_min(u->row1 - u->row0, BN_U));
        p = (BN_AT)0;
        for (ptrdiff_t l = 0; l < WA; l++) p += m[l];
        p /= (BN_AT)WA;
    }
    *pilot = (double)p;
    const BN_FN(va_) vp = BN_SPLATA(p);
    BN_FN(va_) sa[BN_U], sb[BN_U];
    BN_FN(vw_) da[2 * BN_U], db[2 * BN_U];
    for (int v = 0; v < BN_U; v++) {
        sa[v] = sb[v] = BN_SPLATA((BN_AT)0);
        da[2 * v] = da[2 * v + 1] = db[2 * v] = db[2 * v + 1] = (BN_FN(vw_)){0};
    }
    int steps = 0;
#define BN_STEP_(v, xv, gv)                                                                        \
    do {                                                                                           \
        const BN_FN(va_) y = (xv) - vp;                                                            \
        const BN_FN(va_) a = with_g ? (gv) : y;                                                    \
        sa[v] += a;                                                                                \
        sb[v] += a * y;                                                                            \
    } while (0)
#define BN_COUNT_STEP_()                                                                           \
    if (++steps == BN_FLUSH) {                                                                     \
        steps = 0;                                                                                 \
        for (int v = 0; v < BN_U; v++) {                                                           \
            BN_FN(flush_)(da + 2 * v, sa[v]);                                                      \
            BN_FN(flush_)(db + 2 * v, sb[v]);                                                      \
            sa[v] = sb[v] = BN_SPLATA((BN_AT)0);                                                   \
        }                                                                                          \
    }
#define BN_G_(ptr) (with_g ? BN_LDA(ptr) : vp)
    for (ptrdiff_t n = u->row0; n < u->row1; n++) {
        const BN_T *x = first + (n - u->row0) * k->x.outer_stride;
        const BN_T *g = gfirst + (n - u->row0) * k->g.outer_stride;
        const ptrdiff_t nx = bn_planar_next(&k->geo, u, n, &k->x);
        const ptrdiff_t ng = with_g ? bn_planar_next(&k->geo, u, n, &k->g) : 0;
        for (ptrdiff_t i = 0; i < body; i += BN_U * WA) {
            BN_FN(prefetch_)(x, i, len, nx, BN_U * WA * sizeof(BN_T));
            if (with_g) BN_FN(prefetch_)(g, i, len, ng, BN_U * WA * sizeof(BN_T));
            for (int v = 0; v < BN_U; v++) BN_STEP_(v, BN_LDA(x + i + v * WA), BN_G_(g + i + v * WA));
            BN_COUNT_STEP_()
        }
        /* the row's tail: whole vectors, then the part, padded with the
         * pilot (y = 0 there) and g = 0, into the first accumulators
         * (constant indices keep them all in registers), one step each; the
         * part through the row's last vector where the row has one */
        for (ptrdiff_t j = 0; j < rest; j++) {
            BN_STEP_(0, BN_LDA(x + body + j * WA), BN_G_(g + body + j * WA));
            BN_COUNT_STEP_()
        }
        if (part && len >= WA) { /* the row's last vector, its first lanes (counted) replaced */
            const BN_FN(va_) zero = BN_SPLATA((BN_AT)0);
            BN_STEP_(0, BN_FN(last_lanes_)(BN_LDA(x + len - WA), vp, part),
                     BN_FN(last_lanes_)(BN_G_(g + len - WA), zero, part));
            BN_COUNT_STEP_()
        } else if (part) {
            BN_AT bx[WA], bg[WA];
            for (ptrdiff_t l = 0; l < WA; l++) {
                bx[l] = l < part ? BN_TO_A(x[body + rest * WA + l]) : p;
                bg[l] = l < part && with_g ? BN_TO_A(g[body + rest * WA + l]) : (BN_AT)0;
            }
            BN_STEP_(0, BN_LDP(bx), BN_LDP(bg));
            BN_COUNT_STEP_()
        }
    }
#undef BN_G_
#undef BN_STEP_
#undef BN_COUNT_STEP_
    for (int v = 0; v < BN_U; v++) {
        BN_FN(flush_)(da + 2 * v, sa[v]);
        BN_FN(flush_)(db + 2 * v, sb[v]);
    }
    *sum1 = BN_FN(lanes_sum_)(da);
    *sum2 = BN_FN(lanes_sum_)(db);
}

/* Whether float-block gradient sums a = sum(g), b = sum(g * y) of count
 * values are as good as the double sums for the backward: both finite (no
 * float overflow of a product), and |b| >= count 2^-100, so that products
 * which underflow in float (each off by at most 2^-150) change b by less
 * than 2^-50 of itself.  Otherwise each sum is off by at most, to first
 * order, (BN_FLUSH + 2) u of the sum of its terms' magnitudes (u = 2^-24):
 * in grad_input = invstd w (g - a / n - xhat invstd b / n), a few roundings
 * of float32 arithmetic on the terms, as in the apply phase itself. */
static inline int BN_FN(grad_float_sums_ok_)(double a, double b, double count)
{
    return (fabs(a) <= DBL_MAX) & (fabs(b) <= DBL_MAX) & (fabs(b) >= count * 0x1p-100);
}
#endif

static void BN_FN(stats_planar_sums_)(const bn_context *k, const bn_planar_task *u)
{
    const BN_T *base = (const BN_T *)k->x.data + u->channel * k->x.channel_stride + u->offset;
    const double count = (double)((u->row1 - u->row0) * u->len);
    double pilot, s1, s2;
#if BN_FLOAT_SUMS
    const int fast = BN_FN(float_sums_wanted_)(k, count / (double)(BN_U * WA));
    if (fast) BN_FN(planar_float_sums_)(k, u, 0, &pilot, &s1, &s2);
    if (!fast || !BN_FN(float_sums_ok_)(s1, s2, count))
#endif
    {
        pilot = (double)BN_TO_A(base[u->row0 * k->x.outer_stride]);
        BN_FN(planar_sums_)(k, u, pilot, 0, &s1, &s2, NULL, 0.0);
    }
    const ptrdiff_t i = u->prow * k->geo.channels + u->channel;
    BN_FN(state_of_sums_)(pilot, s1, s2, count, k->part.mean + i, k->part.m2 + i);
}
#endif

static void BN_FN(stats_planar_)(const bn_context *k, ptrdiff_t t)
{
    const bn_planar_task u = bn_planar_task_of(&k->grid, &k->geo, t);
#if BN_T_IS_FLOAT
    BN_FN(stats_planar_sums_)(k, &u);
#else
    const BN_T *base = (const BN_T *)k->x.data + u.channel * k->x.channel_stride + u.offset;
    const ptrdiff_t len = u.len;
    bn_welford acc = {0.0, 0.0, 0.0}, tail = {0.0, 0.0, 0.0};
#if BN_VECTORS
    const ptrdiff_t body = len - len % (BN_U * W);
    VD mean[BN_U], m2[BN_U];
    for (int v = 0; v < BN_U; v++) mean[v] = m2[v] = BN_SPLAT(0.0);
    ptrdiff_t steps = 0;
#else
    const ptrdiff_t body = 0;
#endif
    for (ptrdiff_t n = u.row0; n < u.row1; n++) {
        const BN_T *x = base + n * k->x.outer_stride;
#if BN_VECTORS
        const ptrdiff_t nx = bn_planar_next(&k->geo, &u, n, &k->x);
        for (ptrdiff_t i = 0; i < body; i += BN_U * W) {
            const double rs = bn_reciprocal(++steps);
            const VD r = BN_SPLAT(rs), q = BN_SPLAT(1.0) - r;
            BN_FN(prefetch_)(x, i, len, nx, BN_U * W * sizeof(BN_T));
            for (int v = 0; v < BN_U; v++) {
                const VD d = BN_LD(x + i + v * W) - mean[v];
                mean[v] += d * r;
                m2[v] += (d * q) * d; /* = d * (x - new mean) */
            }
        }
#endif
        for (ptrdiff_t i = body; i < len; i++) {
            const double xv = (double)BN_TO_A(x[i]);
            tail.count += 1.0;
            const double d = xv - tail.mean;
            tail.mean += d / tail.count;
            tail.m2 += d * (xv - tail.mean);
        }
    }
#if BN_VECTORS
    if (steps > 0) {
        /* lanes of equal count: a fixed tree over the vectors, then the lanes
         * of the last vector in order; no divisions */
        double n = (double)steps;
        for (int half = BN_U / 2; half >= 1; half /= 2, n *= 2.0)
            for (int v = 0; v < half; v++) {
                const VD delta = mean[v + half] - mean[v];
                mean[v] += delta * BN_SPLAT(0.5);
                m2[v] += m2[v + half] + delta * delta * BN_SPLAT(0.5 * n);
            }
        acc = (bn_welford){n, mean[0][0], m2[0][0]};
        for (int l = 1; l < W; l++) {
            bn_welford_merge_known(&acc.mean, &acc.m2, mean[0][l], m2[0][l], 1.0 / (l + 1),
                                   n * l / (l + 1));
            acc.count += n;
        }
    }
#endif
    bn_welford_merge(&acc, tail);
    const ptrdiff_t i = u.prow * k->geo.channels + u.channel;
    k->part.mean[i] = acc.mean;
    k->part.m2[i] = acc.m2;
#endif
}

/* Channels-last: the task's rows are read in blocks of BN_ROW_BLOCK
 * contiguous rows; within a block, strips of BN_U * W channels keep their
 * Welford lanes in registers (saved to the L1 state between blocks), the
 * remaining channels update the state directly.  Per channel the updates run
 * over the rows in order, whatever the blocking. */
#define BN_ROW_BLOCK 16

/* Channels-last: sum(a) and sum(b) per channel of rows task u into
 * sum_a/sum_b (channels of the task), in double, with y = x - shift[c] and,
 * as planar_sums_, a = y, b = y * y (with_g = 0) or a = g, b = g * y
 * (with_g = 1).  Strips of BN_U * W channels keep their sums in registers
 * over blocks of BN_ROW_BLOCK rows; per channel the rows are summed in order. */
static BN_ALWAYS_INLINE void BN_FN(rows_sums_)(const bn_context *k, const bn_rows_task *u,
                                               const double *shift, const int with_g,
                                               double *restrict sum_a, double *restrict sum_b)
{
    const ptrdiff_t nc = u->c1 - u->c0, xs = k->x.outer_stride, gs = k->g.outer_stride;
    const BN_T *x0 = (const BN_T *)k->x.data + u->c0, *g0 = (const BN_T *)k->g.data + u->c0;
    const double slope = with_g > 3 ? k->slope : 0.0, inv_slope = with_g > 3 ? 1.0 / k->slope : 0.0;
    (void)slope, (void)inv_slope;
    for (ptrdiff_t j = 0; j < nc; j++) sum_a[j] = sum_b[j] = 0.0;
#if BN_VECTORS
    const ptrdiff_t vec = nc - nc % (BN_U * W);
    const VD vslope = BN_SPLAT(slope), vinv_slope = BN_SPLAT(inv_slope);
#else
    const ptrdiff_t vec = 0;
#endif
    for (ptrdiff_t rb = u->row0; rb < u->row1; rb += BN_ROW_BLOCK) {
        const ptrdiff_t re = bn_min(u->row1, rb + BN_ROW_BLOCK);
#if BN_VECTORS
        for (ptrdiff_t c = 0; c < vec; c += BN_U * W) {
            VD sa[BN_U], sb[BN_U], vs[BN_U];
            for (int v = 0; v < BN_U; v++) {
                sa[v] = BN_LDD(sum_a + c + v * W);
                sb[v] = BN_LDD(sum_b + c + v * W);
                vs[v] = BN_LDD(shift + c + v * W);
            }
            for (ptrdiff_t r = rb; r < re; r++) {
                const BN_T *x = x0 + r * xs + c, *g = with_g ? g0 + r * gs + c : x;
                for (int v = 0; v < BN_U; v++) {
                    const VD xr = BN_LD(x + v * W);
                    const VD y = BN_FN(xf_inv_v_)(xr, with_g, vinv_slope) - vs[v];
                    const VD a = with_g ? BN_FN(xf_grad_v_)(BN_LD(g + v * W), xr, with_g, vslope) : y;
                    sa[v] += a;
                    sb[v] += a * y;
                }
            }
            for (int v = 0; v < BN_U; v++) {
                memcpy(sum_a + c + v * W, &sa[v], sizeof(VD));
                memcpy(sum_b + c + v * W, &sb[v], sizeof(VD));
            }
        }
#endif
        for (ptrdiff_t r = rb; vec < nc && r < re; r++) {
            const BN_T *x = x0 + r * xs, *g = with_g ? g0 + r * gs : x;
            for (ptrdiff_t j = vec; j < nc; j++) {
                const double y = BN_FN(xf_inv_s_)((double)BN_TO_A(x[j]), with_g, inv_slope) - shift[j];
                const double a = with_g ? BN_FN(xf_grad_s_)((double)BN_TO_A(g[j]), (double)BN_TO_A(x[j]), with_g, slope) : y;
                sum_a[j] += a;
                sum_b[j] += a * y;
            }
        }
    }
}

#if BN_T_IS_FLOAT
#if BN_FLOAT_SUMS
/* Channels-last: planar_float_sums_ per channel of rows task u, into sum_a
 * and sum_b.  The statistics (shift NULL): a channel's pilot (into pilot) is
 * the mean of its first BN_FLUSH rows at most; the gradient sums (a = g,
 * b = g * y): the pilot is shift[c] rounded to BN_AT (into pilot).  Both
 * loops below read the rows in memory order, which the prefetchers follow,
 * and flush the float sums into the double sums every BN_FLUSH rows, so they
 * give the same bits: a task of at most BN_U vectors of channels keeps its
 * sums in registers (rows_float_strip_); a wider one keeps float sums per
 * channel in L1.  (Strips of channels over the task's rows, with every sum in
 * registers, measured 1.4-1.7x slower for 392 rows of 256 channels; the L1
 * sums 1.3x slower for 4096 rows of 64.)  The last channels (less than a
 * vector) are summed in double by rows_sums_ with y = x - shift, or the
 * pilots given.  Returns whether every channel's float sums pass
 * float_sums_ok_ (grad_float_sums_ok_). */
static BN_ALWAYS_INLINE void BN_FN(rows_float_strip_)(const BN_T *first, ptrdiff_t xs, const BN_T *gfirst,
                                                      ptrdiff_t gs, ptrdiff_t rows, const int nv,
                                                      const int with_g, const BN_AT *pilot,
                                                      double *restrict sum_a, double *restrict sum_b)
{
    BN_FN(va_) vp[BN_U], sa[BN_U], sb[BN_U];
    BN_FN(vw_) da[2 * BN_U], db[2 * BN_U];
    for (int v = 0; v < nv; v++) {
        vp[v] = BN_LDP(pilot + v * WA);
        sa[v] = sb[v] = BN_SPLATA((BN_AT)0);
        da[2 * v] = da[2 * v + 1] = db[2 * v] = db[2 * v + 1] = (BN_FN(vw_)){0};
    }
    for (ptrdiff_t r0 = 0; r0 < rows; r0 += BN_FLUSH) {
        for (ptrdiff_t r = r0; r < bn_min(rows, r0 + BN_FLUSH); r++)
            for (int v = 0; v < nv; v++) {
                const BN_FN(va_) y = BN_LDA(first + r * xs + v * WA) - vp[v];
                const BN_FN(va_) a = with_g ? BN_LDA(gfirst + r * gs + v * WA) : y;
                sa[v] += a;
                sb[v] += a * y;
            }
        for (int v = 0; v < nv; v++) {
            BN_FN(flush_)(da + 2 * v, sa[v]);
            BN_FN(flush_)(db + 2 * v, sb[v]);
            sa[v] = sb[v] = BN_SPLATA((BN_AT)0);
        }
    }
    for (int v = 0; v < nv; v++) {
        memcpy(sum_a + v * WA, da + 2 * v, 2 * sizeof da[0]);
        memcpy(sum_b + v * WA, db + 2 * v, 2 * sizeof db[0]);
    }
}

/* Channels-last tasks of fewer channels than a vector (an image's 3), with
 * whole rows packed back to back (nc values apart): the task is one run of
 * rows * nc values, read by vectors in memory order.  Lane l of the p-th
 * vector of each period of P vectors (P * WA a multiple of nc) always holds
 * channel (p * WA + l) % nc, so each lane sums one channel, in float blocks
 * of BN_FLUSH values as rows_float_strip_ does, and the double lanes are
 * added per channel in lane order; the run's last values (less than a
 * period) go to the double sums one by one.  Pilots as rows_float_sums_
 * (fp, in float).  One value per lane per step instead of nc of WA lanes:
 * (8,3,224,224) NHWC had its statistics at 1/14 of memory speed. */
#define BN_PERIOD_MAX 4
static inline ptrdiff_t BN_FN(period_)(ptrdiff_t nc)
{
    ptrdiff_t a = nc, b = WA;
    while (b) {
        const ptrdiff_t r = a % b;
        a = b, b = r;
    }
    return nc / a; /* vectors per period: lcm(nc, WA) / WA */
}

static BN_ALWAYS_INLINE void BN_FN(rows_period_sums_)(const BN_T *first, const BN_T *gfirst, ptrdiff_t n,
                                                      ptrdiff_t nc, ptrdiff_t P, const int with_g,
                                                      const BN_AT *fp, double *restrict sum_a,
                                                      double *restrict sum_b)
{
    const ptrdiff_t L = P * WA, body = n - n % L; /* P: period_(nc) */
    BN_FN(va_) vp[BN_PERIOD_MAX], sa[BN_PERIOD_MAX], sb[BN_PERIOD_MAX];
    BN_FN(vw_) da[2 * BN_PERIOD_MAX], db[2 * BN_PERIOD_MAX];
    for (ptrdiff_t v = 0; v < P; v++) {
        BN_AT lanes[WA];
        for (ptrdiff_t l = 0; l < WA; l++) lanes[l] = fp[(v * WA + l) % nc];
        vp[v] = BN_LDP(lanes);
        sa[v] = sb[v] = BN_SPLATA((BN_AT)0);
        da[2 * v] = da[2 * v + 1] = db[2 * v] = db[2 * v + 1] = (BN_FN(vw_)){0};
    }
    int steps = 0;
    for (ptrdiff_t i = 0; i < body; i += L) {
        for (ptrdiff_t v = 0; v < P; v++) {
            const BN_FN(va_) y = BN_LDA(first + i + v * WA) - vp[v];
            const BN_FN(va_) a = with_g ? BN_LDA(gfirst + i + v * WA) : y;
            sa[v] += a;
            sb[v] += a * y;
        }
        if (++steps == BN_FLUSH || i + L == body) {
            steps = 0;
            for (ptrdiff_t v = 0; v < P; v++) {
                BN_FN(flush_)(da + 2 * v, sa[v]);
                BN_FN(flush_)(db + 2 * v, sb[v]);
                sa[v] = sb[v] = BN_SPLATA((BN_AT)0);
            }
        }
    }
    for (ptrdiff_t j = 0; j < nc; j++) sum_a[j] = sum_b[j] = 0.0;
    for (ptrdiff_t v = 0; v < P; v++)
        for (ptrdiff_t l = 0; l < WA; l++) {
            const ptrdiff_t c = (v * WA + l) % nc, h = l / (WA / 2), m = l % (WA / 2);
            sum_a[c] += da[2 * v + h][m];
            sum_b[c] += db[2 * v + h][m];
        }
    for (ptrdiff_t e = body; e < n; e++) {
        const ptrdiff_t c = e % nc;
        const double y = (double)BN_TO_A(first[e]) - (double)fp[c];
        const double a = with_g ? (double)BN_TO_A(gfirst[e]) : y;
        sum_a[c] += a;
        sum_b[c] += a * y;
    }
}

/* Whether the float sums of channels [0, nc) of a task of `rows` rows pass
 * float_sums_ok_ (statistics) or grad_float_sums_ok_ (with_g). */
static inline int BN_FN(rows_sums_ok_)(const double *sum_a, const double *sum_b, ptrdiff_t nc,
                                       double rows, const int with_g)
{
    int ok = 1;
    for (ptrdiff_t j = 0; j < nc; j++)
        ok &= with_g ? BN_FN(grad_float_sums_ok_)(sum_a[j], sum_b[j], rows)
                     : BN_FN(float_sums_ok_)(sum_a[j], sum_b[j], rows);
    return ok;
}

static BN_ALWAYS_INLINE int BN_FN(rows_float_sums_)(const bn_context *k, const bn_rows_task *u,
                                                    const double *shift, double *pilot,
                                                    double *restrict sum_a, double *restrict sum_b)
{
    const ptrdiff_t nc = u->c1 - u->c0, xs = k->x.outer_stride, rows = u->row1 - u->row0;
    const int with_g = shift != NULL;
    const ptrdiff_t gs = with_g ? k->g.outer_stride : xs, vec = nc - nc % WA;
    const BN_T *first = (const BN_T *)k->x.data + u->row0 * xs + u->c0;
    const BN_T *gfirst = with_g ? (const BN_T *)k->g.data + u->row0 * gs + u->c0 : first;
    BN_AT fp[BN_CHANNEL_TILE], fa[BN_CHANNEL_TILE], fb[BN_CHANNEL_TILE];
    const ptrdiff_t period = nc < WA ? BN_FN(period_)(nc) : 0;
    if (period && period <= BN_PERIOD_MAX && xs == nc && gs == nc
        && BN_FN(float_sums_wanted_)(k, (double)(rows * nc) / (double)(period * WA))) {
        for (ptrdiff_t c = 0; c < nc; c++) {
            if (with_g) {
                fp[c] = (BN_AT)shift[c];
            } else { /* the mean of the channel's first rows, as pilot_mean_ */
                const ptrdiff_t m = bn_min(rows, BN_FLUSH);
                BN_AT t = BN_TO_A(first[c]);
                for (ptrdiff_t r = 1; r < m; r++) t += BN_TO_A(first[r * xs + c]);
                fp[c] = t / (BN_AT)m;
            }
            pilot[c] = (double)fp[c];
        }
        BN_FN(rows_period_sums_)(first, gfirst, rows * nc, nc, period, with_g, fp, sum_a, sum_b);
        return BN_FN(rows_sums_ok_)(sum_a, sum_b, nc, (double)rows, with_g);
    }
    for (ptrdiff_t c = 0; c < vec; c += WA) {
        if (with_g) {
            for (ptrdiff_t l = 0; l < WA; l++) fp[c + l] = (BN_AT)shift[c + l];
        } else {
            const BN_FN(va_) m = BN_FN(pilot_mean_)(first + c, xs, bn_min(rows, BN_FLUSH));
            memcpy(fp + c, &m, sizeof m);
        }
        for (ptrdiff_t l = 0; l < WA; l++) {
            pilot[c + l] = (double)fp[c + l];
            sum_a[c + l] = sum_b[c + l] = 0.0;
        }
    }
    if (vec == BN_U * WA) {
        BN_FN(rows_float_strip_)(first, xs, gfirst, gs, rows, BN_U, with_g, fp, sum_a, sum_b);
    } else if (vec < BN_U * WA) {
        for (ptrdiff_t c = 0; c < vec; c += WA)
            BN_FN(rows_float_strip_)(first + c, xs, gfirst + c, gs, rows, 1, with_g, fp + c, sum_a + c,
                                     sum_b + c);
    } else {
        for (ptrdiff_t c = 0; c < vec; c++) fa[c] = fb[c] = (BN_AT)0;
        for (ptrdiff_t r = 0; r < rows; r++) {
            const BN_T *x = first + r * xs, *g = gfirst + r * gs;
            for (ptrdiff_t c = 0; c < vec; c += WA) {
                const BN_FN(va_) y = BN_LDA(x + c) - BN_LDP(fp + c);
                const BN_FN(va_) av = with_g ? BN_LDA(g + c) : y;
                const BN_FN(va_) na = BN_LDP(fa + c) + av, nb = BN_LDP(fb + c) + av * y;
                memcpy(fa + c, &na, sizeof na);
                memcpy(fb + c, &nb, sizeof nb);
            }
            if ((r + 1) % BN_FLUSH != 0 && r + 1 < rows) continue;
            for (ptrdiff_t c = 0; c < vec; c += WA) { /* flush into the double sums */
                BN_FN(vw_) da[2], db[2];
                memcpy(da, sum_a + c, sizeof da);
                memcpy(db, sum_b + c, sizeof db);
                BN_FN(flush_)(da, BN_LDP(fa + c));
                BN_FN(flush_)(db, BN_LDP(fb + c));
                memcpy(sum_a + c, da, sizeof da);
                memcpy(sum_b + c, db, sizeof db);
                for (ptrdiff_t l = 0; l < WA; l++) fa[c + l] = fb[c + l] = (BN_AT)0;
            }
        }
    }
    if (vec < nc) {
        bn_rows_task rest = *u;
        rest.c0 += vec;
        if (with_g) {
            for (ptrdiff_t j = vec; j < nc; j++) pilot[j] = shift[j];
            BN_FN(rows_sums_)(k, &rest, shift + vec, 1, sum_a + vec, sum_b + vec);
        } else {
            BN_FN(rows_sums_)(k, &rest, pilot + vec, 0, sum_a + vec, sum_b + vec);
        }
    }
    return BN_FN(rows_sums_ok_)(sum_a, sum_b, vec, (double)rows, with_g);
}
#endif

/* Channels-last float data: as stats_planar_sums_, per channel, with each
 * channel's value in the task's first row as the double sums' pilot. */
static void BN_FN(stats_rows_sums_)(const bn_context *k, const bn_rows_task *u)
{
    const ptrdiff_t nc = u->c1 - u->c0;
    double *ps1 = k->part.mean + u->prow * k->geo.channels + u->c0;
    double *ps2 = k->part.m2 + u->prow * k->geo.channels + u->c0;
    const BN_T *first = (const BN_T *)k->x.data + u->row0 * k->x.outer_stride + u->c0;
    double pilot[BN_CHANNEL_TILE];
    for (ptrdiff_t j = 0; j < nc; j++) pilot[j] = (double)BN_TO_A(first[j]);
    const double count = (double)(u->row1 - u->row0);
    int done = 0;
#if BN_FLOAT_SUMS
    if (BN_FN(float_sums_wanted_)(k, count)) { /* a lane per channel, over the rows */
        done = BN_FN(rows_float_sums_)(k, u, NULL, pilot, ps1, ps2);
        for (ptrdiff_t j = 0; !done && j < nc; j++) pilot[j] = (double)BN_TO_A(first[j]);
    }
#endif
    if (!done) BN_FN(rows_sums_)(k, u, pilot, 0, ps1, ps2);
    for (ptrdiff_t j = 0; j < nc; j++)
        BN_FN(state_of_sums_)(pilot[j], ps1[j], ps2[j], count, ps1 + j, ps2 + j);
}
#endif

static void BN_FN(stats_rows_)(const bn_context *k, ptrdiff_t t)
{
    const bn_rows_task u = bn_rows_task_of(&k->grid, &k->geo, t);
#if BN_T_IS_FLOAT
    BN_FN(stats_rows_sums_)(k, &u);
#else
    const ptrdiff_t os = k->x.outer_stride, nc = u.c1 - u.c0;
    double *restrict pmean = k->part.mean + u.prow * k->geo.channels + u.c0;
    double *restrict pm2 = k->part.m2 + u.prow * k->geo.channels + u.c0;
    const BN_T *x0 = (const BN_T *)k->x.data + u.c0;
    for (ptrdiff_t j = 0; j < nc; j++) pmean[j] = pm2[j] = 0.0;
#if BN_VECTORS
    const ptrdiff_t vec = nc - nc % (BN_U * W);
#else
    const ptrdiff_t vec = 0;
#endif
    for (ptrdiff_t rb = u.row0; rb < u.row1; rb += BN_ROW_BLOCK) {
        const ptrdiff_t re = bn_min(u.row1, rb + BN_ROW_BLOCK);
        double rk_[BN_ROW_BLOCK]; /* 1 / (rows so far), shared by every strip */
        for (ptrdiff_t r = rb; r < re; r++) rk_[r - rb] = bn_reciprocal(r - u.row0 + 1);
#if BN_VECTORS
        for (ptrdiff_t c = 0; c < vec; c += BN_U * W) {
            VD mean[BN_U], m2[BN_U];
            for (int v = 0; v < BN_U; v++) {
                mean[v] = BN_LDD(pmean + c + v * W);
                m2[v] = BN_LDD(pm2 + c + v * W);
            }
            for (ptrdiff_t r = rb; r < re; r++) {
                const double rs = rk_[r - rb];
                const VD rk = BN_SPLAT(rs), q = BN_SPLAT(1.0) - rk;
                const BN_T *x = x0 + r * os + c;
                for (int v = 0; v < BN_U; v++) {
                    const VD d = BN_LD(x + v * W) - mean[v];
                    mean[v] += d * rk;
                    m2[v] += (d * q) * d; /* = d * (x - new mean) */
                }
            }
            for (int v = 0; v < BN_U; v++) {
                memcpy(pmean + c + v * W, &mean[v], sizeof(VD));
                memcpy(pm2 + c + v * W, &m2[v], sizeof(VD));
            }
        }
#endif
        if (vec == nc) continue;
        for (ptrdiff_t r = rb; r < re; r++) {
            const double rk = rk_[r - rb];
            const BN_T *x = x0 + r * os;
            for (ptrdiff_t j = vec; j < nc; j++) {
                const double xv = (double)BN_TO_A(x[j]);
                const double d = xv - pmean[j];
                pmean[j] += d * rk;
                pm2[j] += d * (xv - pmean[j]);
            }
        }
    }
#endif
}

/* ---- backward: per-channel sum(g) and sum(g * (x - mean)) --------------- */

static void BN_FN(grad_sums_planar_)(const bn_context *k, ptrdiff_t t)
{
    const bn_planar_task u = bn_planar_task_of(&k->grid, &k->geo, t);
    const ptrdiff_t i = u.prow * k->geo.channels + u.channel;
    double *sa = k->part.mean + i, *sb = k->part.m2 + i;
    switch (BN_FN(xf_mode_)(k)) { /* constant modes: one specialized loop each */
    case BN_XF_LEAKY: BN_FN(planar_sums_)(k, &u, k->mean[u.channel], BN_XF_LEAKY, sa, sb, NULL, 0.0); break;
    case BN_XF_ELU: BN_FN(planar_sums_)(k, &u, k->mean[u.channel], BN_XF_ELU, sa, sb, NULL, 0.0); break;
    default:
#if BN_T_IS_FLOAT && BN_FLOAT_SUMS
        if (BN_FN(float_sums_wanted_)(k, (double)((u.row1 - u.row0) * u.len) / (double)(BN_U * WA))) {
            const double mean = k->mean[u.channel];
            double pilot = mean, a, b;
            BN_FN(planar_float_sums_)(k, &u, 1, &pilot, &a, &b);
            if (BN_FN(grad_float_sums_ok_)(a, b, (double)((u.row1 - u.row0) * u.len))) {
                *sa = a;
                *sb = b + (pilot - mean) * a; /* sum(g * (x - mean)) */
                break;
            }
        }
#endif
        BN_FN(planar_sums_)(k, &u, k->mean[u.channel], 1, sa, sb, NULL, 0.0);
    }
}

/* Layer norm's backward: the gradient sums of keys (rows) [r0, r1), whose
 * weighted sums go to the partials and whose column sums (grad_bias and
 * grad_weight per inner element) to partial slot `slot`, in row order; exec
 * merges the slots in order. */
static void BN_FN(grad_sums_inner_)(const bn_context *k, ptrdiff_t r0, ptrdiff_t r1, ptrdiff_t slot)
{
    const ptrdiff_t D = k->geo.inner, P = k->grid.partial_rows;
    double *col = k->colpart + slot * 2 * D;
    for (ptrdiff_t i = 0; i < 2 * D; i++) col[i] = 0.0;
    const BN_AT *invstd = (const BN_AT *)k->save_invstd_in;
    for (ptrdiff_t t = r0 * P; t < r1 * P; t++) {
        const bn_planar_task u = bn_planar_task_of(&k->grid, &k->geo, t);
        const ptrdiff_t i = u.prow * k->geo.channels + u.channel;
        BN_FN(planar_sums_)(k, &u, k->mean[u.channel], 2, k->part.mean + i, k->part.m2 + i, col,
                            (double)invstd[u.channel]);
    }
}

/* Channels-last: rows in memory order (a few streams the prefetchers
 * follow), summing in double into the task's partial sums (kept in L1);
 * tasks of few rows of many channels go by strips (measured 1.8x faster for
 * (256, 1024), while row order is 1.6x faster for 98 rows of 256 channels). */
#define BN_SUM_ROWS 4
static void BN_FN(grad_sums_rows_)(const bn_context *k, ptrdiff_t t)
{
    const bn_rows_task u = bn_rows_task_of(&k->grid, &k->geo, t);
    const ptrdiff_t nc = u.c1 - u.c0, xs = k->x.outer_stride, gs = k->g.outer_stride;
    const double *mu = k->mean + u.c0;
    double *restrict psg = k->part.mean + u.prow * k->geo.channels + u.c0;
    double *restrict psgx = k->part.m2 + u.prow * k->geo.channels + u.c0;
    if (k->act) { /* the transform of in-place activated batch norm: the strip loops */
        if (BN_FN(xf_mode_)(k) == BN_XF_LEAKY) BN_FN(rows_sums_)(k, &u, mu, BN_XF_LEAKY, psg, psgx);
        else BN_FN(rows_sums_)(k, &u, mu, BN_XF_ELU, psg, psgx);
        return;
    }
#if BN_T_IS_FLOAT && BN_FLOAT_SUMS
    if (BN_FN(float_sums_wanted_)(k, (double)(u.row1 - u.row0))) { /* a lane per channel */
        double pilot[BN_CHANNEL_TILE];
        if (BN_FN(rows_float_sums_)(k, &u, mu, pilot, psg, psgx)) {
            for (ptrdiff_t j = 0; j < nc; j++) psgx[j] += (pilot[j] - mu[j]) * psg[j];
            return;
        }
    }
#endif
    if (nc > 64 && u.row1 - u.row0 <= 2 * BN_ROW_BLOCK) {
        BN_FN(rows_sums_)(k, &u, mu, 1, psg, psgx);
        return;
    }
    const BN_T *x0 = (const BN_T *)k->x.data + u.c0, *g0 = (const BN_T *)k->g.data + u.c0;
    for (ptrdiff_t j = 0; j < nc; j++) psg[j] = psgx[j] = 0.0;
    ptrdiff_t r = u.row0;
#if BN_VECTORS
    /* narrow rows: BN_SUM_ROWS rows per pass over the partial sums, fewer of
     * their loads and stores per element (measured 1.2x for 64 channels;
     * for 256 channels, 1.5x slower than row by row: more streams) */
    for (; nc <= 64 && r + BN_SUM_ROWS <= u.row1; r += BN_SUM_ROWS) {
        const BN_T *x = x0 + r * xs, *g = g0 + r * gs;
        ptrdiff_t j = 0;
        for (; j + W <= nc; j += W) {
            const VD m = BN_LDD(mu + j);
            VD sg = BN_LDD(psg + j), sgx = BN_LDD(psgx + j);
            for (int q = 0; q < BN_SUM_ROWS; q++) {
                const VD gv = BN_LD(g + q * gs + j);
                sg += gv;
                sgx += gv * (BN_LD(x + q * xs + j) - m);
            }
            memcpy(psg + j, &sg, sizeof sg);
            memcpy(psgx + j, &sgx, sizeof sgx);
        }
        for (; j < nc; j++)
            for (int q = 0; q < BN_SUM_ROWS; q++) {
                const double gv = (double)BN_TO_A(g[q * gs + j]);
                psg[j] += gv;
                psgx[j] += gv * ((double)BN_TO_A(x[q * xs + j]) - mu[j]);
            }
    }
#endif
    for (; r < u.row1; r++) {
        const BN_T *x = x0 + r * xs, *g = g0 + r * gs;
        for (ptrdiff_t j = 0; j < nc; j++) {
            const double gv = (double)BN_TO_A(g[j]);
            psg[j] += gv;
            psgx[j] += gv * ((double)BN_TO_A(x[j]) - mu[j]);
        }
    }
}

/* ---- apply phase: one template, four operations --------------------------
 * affine: y = (x - mean) * s + b (training forward, inference, and backward
 *         with constant statistics, which reads g as x with mean 0, b = 0);
 * grad:   grad_in = g * a + xhat * k1 + k0 (training backward);
 * and the same two with weight and bias per inner element (layer norm):
 * affine_inner: y = ((x - mean) * s) * w + b,  grad_inner: g * w in place of g. */
#define BN_APPLY affine
#define BN_APPLY_X ax
#define BN_APPLY_G 0
#define BN_APPLY_INNER 0
#define BN_APPLY_EXPR(g, x, K, wi, bi) ((((x) - (K).mh) - (K).ml) * (K).s + (K).b)
#include "apply_body.h"
#undef BN_APPLY
#undef BN_APPLY_EXPR

#define BN_APPLY grad
#undef BN_APPLY_X
#define BN_APPLY_X x
#undef BN_APPLY_G
#define BN_APPLY_G 1
#define BN_GRAD_EXPR(g, x, K) ((g) * (K).a + ((((x) - (K).mh) - (K).ml) * (K).inv * (K).k1 + (K).k0))
#define BN_APPLY_EXPR(g, x, K, wi, bi) BN_GRAD_EXPR(g, x, K)
#include "apply_body.h"
#undef BN_APPLY
#undef BN_APPLY_EXPR

#undef BN_APPLY_INNER
#define BN_APPLY_INNER 1
#define BN_APPLY grad_inner
#define BN_APPLY_EXPR(g, x, K, wi, bi) BN_GRAD_EXPR((g) * (wi), x, K)
#include "apply_body.h"
#undef BN_APPLY
#undef BN_APPLY_EXPR

#undef BN_APPLY_X
#define BN_APPLY_X ax
#undef BN_APPLY_G
#define BN_APPLY_G 0
#define BN_APPLY affine_inner
#define BN_APPLY_EXPR(g, x, K, wi, bi) (((((x) - (K).mh) - (K).ml) * (K).s) * (wi) + (bi))
#include "apply_body.h"
#undef BN_APPLY
#undef BN_APPLY_EXPR
#undef BN_APPLY_INNER
#undef BN_APPLY_X
#undef BN_APPLY_G

/* ---- fused activations: y = act(BN(x) [+ residual]) (bn_act, ops.h) ------
 * The affine expression above, then the activation, in BN_AT; the residual is
 * the template's second input g.  Each activation is a scalar function (the
 * tails) and a vector one of the same arithmetic, chosen by _Generic on the
 * operand's type, so that one expression serves both: relu and leaky_relu by
 * a compare mask (branch-free), elu by expm1 lane by lane (libm; the affine
 * part stays vectorized). */
#define BN_AFFINE_EXPR(x, K) ((((x) - (K).mh) - (K).ml) * (K).s + (K).b)

static inline BN_AT BN_FN(relu_s_)(BN_AT v) { return v < (BN_AT)0 ? (BN_AT)0 : v; }
static inline BN_AT BN_FN(leaky_s_)(BN_AT v, BN_AT s) { return v < (BN_AT)0 ? v * s : v; }
static inline BN_AT BN_FN(elu_s_)(BN_AT v)
{
#if BN_T_IS_FLOAT
    return v < 0.0f ? expm1f(v) : v;
#else
    return v < 0.0 ? expm1(v) : v;
#endif
}

#if BN_VECTORS
#if BN_T_IS_FLOAT
typedef int BN_FN(vi_) __attribute__((vector_size(BN_VEC_BYTES)));
#else
typedef long long BN_FN(vi_) __attribute__((vector_size(BN_VEC_BYTES)));
#endif
static inline BN_FN(va_) BN_FN(relu_v_)(BN_FN(va_) v)
{
    const BN_FN(vi_) neg = v < BN_SPLATA(0);
    return (BN_FN(va_))((BN_FN(vi_))v & ~neg);
}
static inline BN_FN(va_) BN_FN(leaky_v_)(BN_FN(va_) v, BN_FN(va_) s)
{
    const BN_FN(vi_) neg = v < BN_SPLATA(0);
    return (BN_FN(va_))(((BN_FN(vi_))(v * s) & neg) | ((BN_FN(vi_))v & ~neg));
}
static inline BN_FN(va_) BN_FN(elu_v_)(BN_FN(va_) v)
{
    for (ptrdiff_t l = 0; l < WA; l++) v[l] = BN_FN(elu_s_)(v[l]);
    return v;
}
#ifdef __cplusplus /* no _Generic: overloads of one name */
static inline BN_AT BN_FN(relu_o_)(BN_AT v) { return BN_FN(relu_s_)(v); }
static inline BN_FN(va_) BN_FN(relu_o_)(BN_FN(va_) v) { return BN_FN(relu_v_)(v); }
static inline BN_AT BN_FN(leaky_o_)(BN_AT v, BN_AT s) { return BN_FN(leaky_s_)(v, s); }
static inline BN_FN(va_) BN_FN(leaky_o_)(BN_FN(va_) v, BN_FN(va_) s) { return BN_FN(leaky_v_)(v, s); }
static inline BN_AT BN_FN(elu_o_)(BN_AT v) { return BN_FN(elu_s_)(v); }
static inline BN_FN(va_) BN_FN(elu_o_)(BN_FN(va_) v) { return BN_FN(elu_v_)(v); }
#define BN_ACT_FN_(name, v) BN_FN(BN_CAT(name, o_))
#else
#define BN_ACT_FN_(name, v) _Generic((v), BN_AT: BN_FN(BN_CAT(name, s_)), default: BN_FN(BN_CAT(name, v_)))
#endif
#else
#define BN_ACT_FN_(name, v) BN_FN(BN_CAT(name, s_))
#endif
#define BN_RELU(v) BN_ACT_FN_(relu_, v)(v)
/* leaky_relu's slope is coefficient a (unused by the forward ops; see
 * set_act_): hoisted with the others, never reloaded from the context */
#define BN_LEAKY(v, K) BN_ACT_FN_(leaky_, v)(v, (K).a)
#define BN_ELU(v) BN_ACT_FN_(elu_, v)(v)

#define BN_APPLY_X ax
#define BN_APPLY_INNER 0
#define BN_APPLY_G 0
#define BN_APPLY relu
#define BN_APPLY_EXPR(g, x, K, wi, bi) BN_RELU(BN_AFFINE_EXPR(x, K))
#include "apply_body.h"
#undef BN_APPLY
#undef BN_APPLY_EXPR
#define BN_APPLY leaky
#define BN_APPLY_EXPR(g, x, K, wi, bi) BN_LEAKY(BN_AFFINE_EXPR(x, K), K)
#include "apply_body.h"
#undef BN_APPLY
#undef BN_APPLY_EXPR
#define BN_APPLY elu
#define BN_APPLY_EXPR(g, x, K, wi, bi) BN_ELU(BN_AFFINE_EXPR(x, K))
#include "apply_body.h"
#undef BN_APPLY
#undef BN_APPLY_EXPR
#undef BN_APPLY_G
#define BN_APPLY_G 1
#define BN_APPLY add
#define BN_APPLY_EXPR(g, x, K, wi, bi) (BN_AFFINE_EXPR(x, K) + (g))
#include "apply_body.h"
#undef BN_APPLY
#undef BN_APPLY_EXPR
#define BN_APPLY add_relu
#define BN_APPLY_EXPR(g, x, K, wi, bi) BN_RELU(BN_AFFINE_EXPR(x, K) + (g))
#include "apply_body.h"
#undef BN_APPLY
#undef BN_APPLY_EXPR
#define BN_APPLY add_leaky
#define BN_APPLY_EXPR(g, x, K, wi, bi) BN_LEAKY(BN_AFFINE_EXPR(x, K) + (g), K)
#include "apply_body.h"
#undef BN_APPLY
#undef BN_APPLY_EXPR
#define BN_APPLY add_elu
#define BN_APPLY_EXPR(g, x, K, wi, bi) BN_ELU(BN_AFFINE_EXPR(x, K) + (g))
#include "apply_body.h"
#undef BN_APPLY
#undef BN_APPLY_EXPR
#undef BN_APPLY_G
#undef BN_APPLY_INNER
#undef BN_APPLY_X
#undef BN_RELU
#undef BN_LEAKY
#undef BN_ELU
#undef BN_ACT_FN_
#undef BN_AFFINE_EXPR

/* The grad apply of in-place activated batch norm: g' and x' from g and y
 * (see BN_XF_LEAKY), in BN_AT; leaky_relu's slope and its inverse ride in
 * coefficients s and b, which the grad expression does not use. */
static inline BN_AT BN_FN(gleaky_s_)(BN_AT g, BN_AT y, BN_AT s) { return y > (BN_AT)0 ? g : g * s; }
static inline BN_AT BN_FN(ileaky_s_)(BN_AT y, BN_AT r) { return y < (BN_AT)0 ? y * r : y; }
static inline BN_AT BN_FN(gelu_s_)(BN_AT g, BN_AT y) { return y > (BN_AT)0 ? g : g * (y + (BN_AT)1); }
static inline BN_AT BN_FN(ielu_s_)(BN_AT y)
{
#if BN_T_IS_FLOAT
    return y < 0.0f ? log1pf(y) : y;
#else
    return y < 0.0 ? log1p(y) : y;
#endif
}
#if BN_VECTORS
static inline BN_FN(va_) BN_FN(gleaky_v_)(BN_FN(va_) g, BN_FN(va_) y, BN_FN(va_) s)
{
    const BN_FN(vi_) pos = y > BN_SPLATA(0);
    return (BN_FN(va_))(((BN_FN(vi_))g & pos) | ((BN_FN(vi_))(g * s) & ~pos));
}
static inline BN_FN(va_) BN_FN(ileaky_v_)(BN_FN(va_) y, BN_FN(va_) r)
{
    const BN_FN(vi_) neg = y < BN_SPLATA(0);
    return (BN_FN(va_))(((BN_FN(vi_))(y * r) & neg) | ((BN_FN(vi_))y & ~neg));
}
static inline BN_FN(va_) BN_FN(gelu_v_)(BN_FN(va_) g, BN_FN(va_) y)
{
    const BN_FN(vi_) pos = y > BN_SPLATA(0);
    return (BN_FN(va_))(((BN_FN(vi_))g & pos) | ((BN_FN(vi_))(g * (y + BN_SPLATA(1))) & ~pos));
}
static inline BN_FN(va_) BN_FN(ielu_v_)(BN_FN(va_) y)
{
    for (ptrdiff_t l = 0; l < WA; l++) y[l] = BN_FN(ielu_s_)(y[l]);
    return y;
}
#ifdef __cplusplus
static inline BN_AT BN_FN(gleaky_o_)(BN_AT g, BN_AT y, BN_AT s) { return BN_FN(gleaky_s_)(g, y, s); }
static inline BN_FN(va_) BN_FN(gleaky_o_)(BN_FN(va_) g, BN_FN(va_) y, BN_FN(va_) s) { return BN_FN(gleaky_v_)(g, y, s); }
static inline BN_AT BN_FN(ileaky_o_)(BN_AT y, BN_AT r) { return BN_FN(ileaky_s_)(y, r); }
static inline BN_FN(va_) BN_FN(ileaky_o_)(BN_FN(va_) y, BN_FN(va_) r) { return BN_FN(ileaky_v_)(y, r); }
static inline BN_AT BN_FN(gelu_o_)(BN_AT g, BN_AT y) { return BN_FN(gelu_s_)(g, y); }
static inline BN_FN(va_) BN_FN(gelu_o_)(BN_FN(va_) g, BN_FN(va_) y) { return BN_FN(gelu_v_)(g, y); }
static inline BN_AT BN_FN(ielu_o_)(BN_AT y) { return BN_FN(ielu_s_)(y); }
static inline BN_FN(va_) BN_FN(ielu_o_)(BN_FN(va_) y) { return BN_FN(ielu_v_)(y); }
#define BN_XF_FN_(name, v) BN_FN(BN_CAT(name, o_))
#else
#define BN_XF_FN_(name, v) _Generic((v), BN_AT: BN_FN(BN_CAT(name, s_)), default: BN_FN(BN_CAT(name, v_)))
#endif
#else
#define BN_XF_FN_(name, v) BN_FN(BN_CAT(name, s_))
#endif

#define BN_APPLY_X x
#define BN_APPLY_INNER 0
#define BN_APPLY_G 1
#define BN_APPLY grad_leaky
#define BN_APPLY_EXPR(g, x, K, wi, bi) \
    BN_GRAD_EXPR(BN_XF_FN_(gleaky_, x)(g, x, (K).s), BN_XF_FN_(ileaky_, x)(x, (K).b), K)
#include "apply_body.h"
#undef BN_APPLY
#undef BN_APPLY_EXPR
#define BN_APPLY grad_elu
#define BN_APPLY_EXPR(g, x, K, wi, bi) BN_GRAD_EXPR(BN_XF_FN_(gelu_, x)(g, x), BN_XF_FN_(ielu_, x)(x), K)
#include "apply_body.h"
#undef BN_APPLY
#undef BN_APPLY_EXPR
#undef BN_APPLY_G
#undef BN_APPLY_INNER
#undef BN_APPLY_X
#undef BN_XF_FN_

/* The fused op of a context (k->act, k->residual), chosen once per task:
 * the inner loops are the instantiations above.  NONE, and identity without
 * a residual, are the plain affine op. */
#define BN_ACT_SWITCH_(phase, args)                                                        \
    switch (k->act * 2 + (k->residual != 0)) {                                            \
    case BN_ACT_IDENTITY * 2 + 1: BN_FN(BN_CAT(apply_add_, phase)) args; break;          \
    case BN_ACT_RELU * 2: BN_FN(BN_CAT(apply_relu_, phase)) args; break;                 \
    case BN_ACT_RELU * 2 + 1: BN_FN(BN_CAT(apply_add_relu_, phase)) args; break;         \
    case BN_ACT_LEAKY_RELU * 2: BN_FN(BN_CAT(apply_leaky_, phase)) args; break;          \
    case BN_ACT_LEAKY_RELU * 2 + 1: BN_FN(BN_CAT(apply_add_leaky_, phase)) args; break;  \
    case BN_ACT_ELU * 2: BN_FN(BN_CAT(apply_elu_, phase)) args; break;                   \
    case BN_ACT_ELU * 2 + 1: BN_FN(BN_CAT(apply_add_elu_, phase)) args; break;           \
    default: BN_FN(BN_CAT(apply_affine_, phase)) args;                                    \
    }

static void BN_FN(apply_act_planar_)(const bn_context *k, ptrdiff_t c0, ptrdiff_t c1, ptrdiff_t t)
{
    BN_ACT_SWITCH_(planar_, (k, c0, c1, t))
}

static void BN_FN(apply_act_rows_)(const bn_context *k, ptrdiff_t t) { BN_ACT_SWITCH_(rows_, (k, t)) }
#undef BN_ACT_SWITCH_

/* The training backward's apply: plain, or with the transform of in-place
 * activated batch norm (k->act). */
static void BN_FN(apply_grad_act_planar_)(const bn_context *k, ptrdiff_t c0, ptrdiff_t c1, ptrdiff_t t)
{
    if (k->act == BN_ACT_LEAKY_RELU) BN_FN(apply_grad_leaky_planar_)(k, c0, c1, t);
    else if (k->act == BN_ACT_ELU) BN_FN(apply_grad_elu_planar_)(k, c0, c1, t);
    else BN_FN(apply_grad_planar_)(k, c0, c1, t);
}

static void BN_FN(apply_grad_act_rows_)(const bn_context *k, ptrdiff_t t)
{
    if (k->act == BN_ACT_LEAKY_RELU) BN_FN(apply_grad_leaky_rows_)(k, t);
    else if (k->act == BN_ACT_ELU) BN_FN(apply_grad_elu_rows_)(k, t);
    else BN_FN(apply_grad_rows_)(k, t);
}
#undef BN_GRAD_EXPR

/* ---- per-key finishing steps between the phases --------------------------
 * Keys [c0, c1), whole groups: merge the partials of every key in partial
 * order (the weights are shared, so the loop runs across keys), pool each
 * group's keys in key order, then derive the op's outputs and coefficients. */
#define BN_FINISH_BLOCK 64

/* Forward and moments: the pooled state of keys [c0, c1) (one group). */
static void BN_FN(finish_stats_)(bn_context *k, ptrdiff_t c0, ptrdiff_t c1)
{
    const double nk = (double)(k->geo.outer * k->geo.inner);
    double mean = k->kmean[c0], m2 = k->km2[c0];
    for (ptrdiff_t c = c0 + 1; c < c1; c++) { /* Chan's merge of equal counts, in order */
        const double j = (double)(c - c0), delta = k->kmean[c] - mean;
        mean += delta / (j + 1.0);
        m2 += k->km2[c] + delta * delta * (nk * j / (j + 1.0));
    }
    const double n = nk * (double)(c1 - c0);
    if (k->op == BN_OP_MOMENTS) {
        for (ptrdiff_t c = c0; c < c1; c++) {
            k->out_count[c] = nk;
            k->out_mean[c] = k->kmean[c];
            k->out_m2[c] = k->km2[c];
        }
        return;
    }
    /* uncentered: the mean square, m2 / n + mean^2, from the same state */
    const double var = k->uncentered ? m2 / n + mean * mean : m2 / n;
    double center = k->uncentered ? 0.0 : mean;
    double invstd = 1.0 / sqrt(var + k->eps);
    const ptrdiff_t q = c0 / k->group;
    const BN_AT *weight = (const BN_AT *)k->weight, *bias = (const BN_AT *)k->bias;
    const BN_AT *rm = (const BN_AT *)k->running_mean, *rv = (const BN_AT *)k->running_var;
    double r = 1.0, d = 0.0; /* batch renormalization's correction (bn_forward_args) */
    double *so = k->stats_out;
    const ptrdiff_t SC = k->geo.channels;
    if (so) {
        so[q] = mean;
        so[SC + q] = var;
    }
    if (k->prior_mean) {
        const double used = k->share * mean + k->prior_mean[q];
        double uvar = k->prior_moments
                          ? k->share * (var + mean * mean) + k->prior_var[q] - used * used
                          : k->share * var + k->prior_var[q];
        if (!(uvar >= 0.0)) uvar = uvar != uvar ? uvar : 0.0; /* round-off below 0; NaN stays */
        center = used;
        invstd = 1.0 / sqrt(uvar + k->eps);
        if (so) {
            so[2 * SC + q] = used;
            so[3 * SC + q] = uvar;
        }
    } else if (k->r_max >= 1.0 && rm) {
        const double sigma = sqrt((double)rv[q] + k->eps);
        r = sqrt(var + k->eps) / sigma;
        r = r < 1.0 / k->r_max ? 1.0 / k->r_max : (r > k->r_max ? k->r_max : r);
        d = (mean - (double)rm[q]) / sigma;
        d = d < -k->d_max ? -k->d_max : (d > k->d_max ? k->d_max : d);
        if (so) {
            so[2 * SC + q] = r;
            so[3 * SC + q] = d;
        }
    }
    ((BN_AT *)k->save_mean)[q] = (BN_AT)center;
    ((BN_AT *)k->save_invstd)[q] = (BN_AT)invstd;
    for (ptrdiff_t c = c0; c < c1; c++) {
        const ptrdiff_t p = c % k->affine_period;
        if (rm) { /* written back by the entry point once nothing can fail */
            const double mo = k->momentum;
            k->next_mean[c] = (1.0 - mo) * (double)rm[p] + mo * mean;
            k->next_var[c] = (1.0 - mo) * (double)rv[p] + mo * (m2 / (n - 1.0));
        }
        if (k->affine_inner) BN_FN(set_coef_)(k, c, center, invstd, 0.0, 0.0, 0.0, 0.0, 0.0);
        else {
            const double w = weight ? (double)weight[p] : 1.0;
            /* r = 1, d = 0 (no renormalization): batch norm's coefficients, bit for bit */
            BN_FN(set_coef_)(k, c, center, w * invstd * r, (bias ? (double)bias[p] : 0.0) + w * d,
                             k->slope, 0.0, 0.0, 0.0);
        }
    }
}

/* Backward: keys [c0, c1) (one group) from their sums of g and g * (x - mean). */
static void BN_FN(finish_grads_)(bn_context *k, ptrdiff_t c0, ptrdiff_t c1)
{
    const BN_AT *weight = (const BN_AT *)k->weight;
    const double invstd = (double)((const BN_AT *)k->save_invstd_in)[c0 / k->group];
    const double n = (double)(k->geo.outer * k->geo.inner * (c1 - c0));
    double sum_g = 0.0, sum_gx = 0.0; /* of weight * g over the group, in key order */
    for (ptrdiff_t c = c0; c < c1; c++) {
        const double w = weight && !k->affine_inner ? (double)weight[c % k->affine_period] : 1.0;
        sum_g += w * k->kmean[c];
        sum_gx += w * k->km2[c];
        k->next_mean[c] = k->km2[c] * invstd; /* grad_weight's share */
        k->next_var[c] = k->kmean[c];         /* grad_bias's share */
    }
    for (ptrdiff_t c = c0; c < c1; c++) {
        const double w = weight && !k->affine_inner ? (double)weight[c % k->affine_period] : 1.0;
        const double s = w * invstd;
        if (k->training) { /* s * (g - mean(g) - xhat * mean(g * xhat)), means over the group */
            const double share = k->share != 0.0 ? k->share : 1.0;
            const double k1 = -share * invstd * sum_gx * invstd / n;
            double k0 = k->uncentered ? 0.0 : -share * invstd * sum_g / n;
            if (k->ref_mean) k0 += (k->mean[c] - k->ref_mean[c]) * invstd * k1; /* (x - ref) */
            BN_FN(set_coef_)(k, c, k->mean[c], k->slope, k->act ? 1.0 / k->slope : 0.0, s, invstd, k1, k0);
        } else
            /* constants: grad_in = g * weight * invstd through the affine
             * phase on g with mean 0 (x is not read: an inf in x must
             * not turn into 0 * inf) */
            BN_FN(set_coef_)(k, c, 0.0, s, 0.0, 0.0, 0.0, 0.0, 0.0);
    }
}

static void BN_FN(finish_block_)(bn_context *k, ptrdiff_t c0, ptrdiff_t c1)
{
    const ptrdiff_t P = k->grid.partial_rows, C = k->geo.channels, nc = c1 - c0;
    double *restrict a = k->kmean + c0, *restrict b = k->km2 + c0;
    const double *pm = k->part.mean + c0, *pv = k->part.m2 + c0;
    for (ptrdiff_t j = 0; j < nc; j++) {
        a[j] = pm[j];
        b[j] = pv[j];
    }
    if (k->op == BN_OP_BACKWARD) { /* plain sums, in partial order */
        for (ptrdiff_t p = 1; p < P; p++)
            for (ptrdiff_t j = 0; j < nc; j++) {
                a[j] += pm[p * C + j];
                b[j] += pv[p * C + j];
            }
    } else { /* Chan's merge with the shared weights */
        for (ptrdiff_t p = 1; p < P; p++) {
            const double share = k->part.share[p], weight = k->part.weight[p];
            for (ptrdiff_t j = 0; j < nc; j++) {
                const double delta = pm[p * C + j] - a[j];
                a[j] += delta * share;
                b[j] += pv[p * C + j] + delta * delta * weight;
            }
        }
        /* an inf in the data makes the mean non-finite; its variance is NaN
         * (inf - inf), whichever form of the update met it first */
        for (ptrdiff_t j = 0; j < nc; j++) b[j] += a[j] - a[j];
    }
    for (ptrdiff_t c = c0; c < c1; c += k->group) {
        if (k->op == BN_OP_BACKWARD) BN_FN(finish_grads_)(k, c, c + k->group);
        else BN_FN(finish_stats_)(k, c, c + k->group);
    }
}

static void BN_FN(phase_a_)(const bn_context *k, ptrdiff_t t)
{
    if (k->op == BN_OP_BACKWARD) {
        if (k->grid.channels_last) BN_FN(grad_sums_rows_)(k, t);
        else BN_FN(grad_sums_planar_)(k, t);
    } else {
        if (k->grid.channels_last) BN_FN(stats_rows_)(k, t);
        else BN_FN(stats_planar_)(k, t);
    }
}

/* Layer norm's grad_bias and grad_weight: the column-sum slots merged in
 * slot order (after a barrier: every slot is complete). */
static void BN_FN(merge_columns_)(const bn_context *k, ptrdiff_t slots)
{
    const ptrdiff_t D = k->geo.inner;
#ifdef _OPENMP
#pragma omp barrier
#pragma omp for schedule(static)
#endif
    for (ptrdiff_t i0 = 0; i0 < D; i0 += 256)
        for (ptrdiff_t i = i0; i < bn_min(D, i0 + 256); i++) {
            double sg = 0.0, sgx = 0.0;
            for (ptrdiff_t q = 0; q < slots; q++) {
                sg += k->colpart[q * 2 * D + i];
                sgx += k->colpart[q * 2 * D + D + i];
            }
            ((BN_AT *)k->grad_bias)[i] = (BN_AT)sg;
            ((BN_AT *)k->grad_weight)[i] = (BN_AT)sgx;
        }
}

/* The apply phase of planar task t of the key range [c0, c1). */
static void BN_FN(apply_planar_)(const bn_context *k, ptrdiff_t c0, ptrdiff_t c1, ptrdiff_t t, int grad)
{
    if (k->affine_inner) {
        if (grad) BN_FN(apply_grad_inner_planar_)(k, c0, c1, t);
        else BN_FN(apply_affine_inner_planar_)(k, c0, c1, t);
    } else {
        if (grad) BN_FN(apply_grad_act_planar_)(k, c0, c1, t);
        else if (k->act) BN_FN(apply_act_planar_)(k, c0, c1, t);
        else BN_FN(apply_affine_planar_)(k, c0, c1, t);
    }
}

/* Planar calls whose keys each take one task (partial_rows == 1: layer norm
 * rows, instance and group norm planes, small batch norm) go block by block
 * of whole groups of keys: statistics, finish and apply of a block back to
 * back on one thread while the block is in its cache, no barrier.  The same
 * tasks and coefficients as exec_body_: the same bits. */
static void BN_FN(exec_blocks_)(bn_context *k)
{
    const ptrdiff_t C = k->geo.channels, kb = k->key_block, nblocks = bn_ceil_div(C, kb);
    const int apply = k->op != BN_OP_MOMENTS, grad = k->op == BN_OP_BACKWARD && k->training;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (ptrdiff_t q = 0; q < nblocks; q++) {
        if (bn_stopped(k)) continue;
        const ptrdiff_t b0 = q * kb, b1 = bn_min(C, b0 + kb);
        if (k->colpart) BN_FN(grad_sums_inner_)(k, b0, b1, q);
        else
            for (ptrdiff_t c = b0; c < b1; c++) BN_FN(phase_a_)(k, c);
        BN_FN(finish_block_)(k, b0, b1);
        if (!apply) continue;
        const ptrdiff_t ntasks = bn_apply_tasks(&k->geo, b0, b1);
        for (ptrdiff_t t = 0; t < ntasks; t++) BN_FN(apply_planar_)(k, b0, b1, t, grad);
    }
    if (k->colpart) BN_FN(merge_columns_)(k, nblocks);
}

/* The op's phases, run by every thread of a team (or by one, outside any
 * parallel region, where the worksharing loops below run serially):
 *   A  statistics / gradient sums of a group of channels (partials per task),
 *   B  per-channel finish: ordered merge of the partials, coefficients,
 *   C  normalize / gradient apply of the same group (apply_body.h): planar
 *      tasks in memory order (rows of runs of consecutive channels),
 *      channels-last tasks as in A.
 * C of one group touches only its own channels, so the next group's A may
 * start without waiting; A and C of a group run while it is in the cache. */
static void BN_FN(exec_body_)(bn_context *k)
{
    if (k->key_block) {
        BN_FN(exec_blocks_)(k);
        return;
    }
    const ptrdiff_t C = k->geo.channels;
    const int reduce = k->op != BN_OP_INFERENCE, apply = k->op != BN_OP_MOMENTS;
    const ptrdiff_t per = k->grid.channels_last ? 0 : k->grid.partial_rows;
    const ptrdiff_t gch = k->grid.channels_last ? C : k->group_channels;
    const ptrdiff_t fblock = k->group * bn_max(1, BN_FINISH_BLOCK / k->group); /* whole groups */
    const int grad = k->op == BN_OP_BACKWARD && k->training;
    ptrdiff_t unit_base = 0; /* layer norm backward: column-sum slots of the groups so far */
    for (ptrdiff_t c0 = 0; c0 < C; c0 += gch) {
        const ptrdiff_t c1 = bn_min(C, c0 + gch);
        const ptrdiff_t t0 = per * c0, t1 = per ? per * c1 : k->grid.ntasks;
        if (reduce && k->colpart) { /* layer norm backward: units of whole rows */
            const ptrdiff_t units = bn_ceil_div(c1 - c0, k->col_unit);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (ptrdiff_t q = 0; q < units; q++)
                if (!bn_stopped(k))
                    BN_FN(grad_sums_inner_)(k, c0 + q * k->col_unit, bn_min(c1, c0 + (q + 1) * k->col_unit),
                                            unit_base + q);
            unit_base += units;
        } else if (reduce) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (ptrdiff_t t = t0; t < t1; t++)
                if (!bn_stopped(k)) BN_FN(phase_a_)(k, t);
        }
        if (reduce) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (ptrdiff_t b = c0; b < c1; b += fblock)
                if (!bn_flag_load(k->stop)) BN_FN(finish_block_)(k, b, bn_min(c1, b + fblock));
        }
        if (!apply) continue;
        const ptrdiff_t ntasks = k->grid.channels_last ? k->grid.ntasks
                                                       : bn_apply_tasks(&k->geo, c0, c1);
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
        for (ptrdiff_t t = 0; t < ntasks; t++) {
            if (bn_stopped(k)) continue;
            if (k->grid.channels_last) {
                if (grad) BN_FN(apply_grad_act_rows_)(k, t);
                else if (k->act) BN_FN(apply_act_rows_)(k, t);
                else BN_FN(apply_affine_rows_)(k, t);
            } else {
                BN_FN(apply_planar_)(k, c0, c1, t, grad);
            }
        }
    }
    if (k->colpart) BN_FN(merge_columns_)(k, unit_base);
}

/* Keys per block of exec_blocks_: whole groups, about this many elements. */
#define BN_BLOCK_ELEMS 65536
/* Units of layer norm's column sums: whole rows, about BN_COL_UNIT_ELEMS
 * elements each; the number of units of the call. */
#define BN_COL_UNIT_ELEMS 65536
static ptrdiff_t BN_FN(col_units_)(bn_context *k)
{
    const ptrdiff_t C = k->geo.channels, gch = k->group_channels;
    if (k->key_block) return bn_ceil_div(C, k->key_block);
    k->col_unit = bn_max(1, BN_COL_UNIT_ELEMS / k->geo.inner);
    ptrdiff_t units = 0;
    for (ptrdiff_t c0 = 0; c0 < C; c0 += gch) units += bn_ceil_div(bn_min(C, c0 + gch) - c0, k->col_unit);
    return units;
}

/* The plan of one context before it runs: streaming (from the whole call's
 * output size), cache groups, key blocks, layer norm's column slots. */
static int BN_FN(prepare_)(bn_context *k, size_t call_bytes)
{
    /* channels-last rows of float32/float64 stream too, except in the
     * backward: (64,64,112,112) NHWC inference 0.79 of the time, training
     * forward 0.86-0.89, rows of 5 and 17 channels 0.81-0.95 (AVX-512 and
     * AVX2, Zen 5, 2 threads).  The backward (row by row, a second input)
     * gained 0.95 in float32 but lost 1.2-1.4x in float16 and bfloat16, and
     * half-precision inference measured 0.81-0.84 in one run, 1.12 in
     * another: those keep ordinary stores. */
    k->stream = call_bytes > bn_stream_bytes(k->run)
                && !(k->grid.channels_last && (k->op == BN_OP_BACKWARD || sizeof(BN_T) < 4));
    if (!k->grid.channels_last && k->grid.partial_rows == 1 && k->op != BN_OP_INFERENCE) {
        const ptrdiff_t per_group = k->geo.outer * k->geo.inner * k->group;
        k->key_block = k->group * bn_max(1, BN_BLOCK_ELEMS / per_group);
    }
    /* cache groups: exec_body_'s, so not with key blocks (exec_blocks_) */
    k->group_channels = k->geo.channels;
    if (!k->grid.channels_last && !k->key_block && (k->op == BN_OP_FORWARD || k->op == BN_OP_BACKWARD)) {
        const size_t per_channel = (size_t)(k->geo.outer * k->geo.inner) * sizeof(BN_T)
                                   * (k->op == BN_OP_BACKWARD ? 2 : 1);
        if (per_channel * (size_t)k->geo.channels > bn_group_min_bytes(k->run)) {
            k->group_channels = bn_max(1, (ptrdiff_t)(BN_GROUP_BYTES / per_channel));
            k->group_channels = bn_ceil_div(k->group_channels, k->group) * k->group; /* whole groups */
        }
    }
    if (k->op == BN_OP_BACKWARD && k->affine_inner) {
        k->colpart = (double *)malloc(sizeof(double) * 2 * (size_t)k->geo.inner * (size_t)BN_FN(col_units_)(k));
        if (!k->colpart) return BN_ERR_NOMEM;
    }
    return BN_OK;
}

/* Runs contexts ks[0, n) on the calling thread alone, inside a team: a
 * nested region of one thread, to which exec_body_'s worksharing loops bind. */
#ifdef _OPENMP
static void BN_FN(exec_solo_)(bn_context *ks, ptrdiff_t n)
{
#pragma omp parallel num_threads(1)
    for (ptrdiff_t i = 0; i < n; i++) BN_FN(exec_body_)(&ks[i]);
}
#endif

/* Runs the contexts ks[0, n) -- one per sample of a keyed call, or the one
 * of the call -- in one parallel region.  With at least as many contexts as
 * threads, each of a size one thread's cache holds through its two passes
 * (BN_GROUP_BYTES of reduced operands), each thread runs whole contexts of
 * its own (a share of n / threads each, in order), with no barrier between
 * their phases: a sample of channels-last group norm (32,256,28,28) is 13
 * tasks, so the team's barriers cost more than its tasks save (0.80-0.99 of
 * the forward's time, 0.88-1.04 of the backward's, in noisy runs; Zen 4,
 * 2 threads).  The rest run by the whole team in order: a context's last
 * phase ends without a barrier, and the next context touches other data.
 * Either way a context runs the same tasks in the same merge order: the
 * same bits.  The contexts share the call's stop flag, so an interrupt
 * seen in one skips the tasks of all.
 * Returns BN_OK, BN_ERR_NOMEM or BN_ERR_INTERRUPTED. */
static int BN_FN(exec_all_)(bn_context *ks, ptrdiff_t n)
{
    ptrdiff_t elements = 0, tasks = 0;
    for (ptrdiff_t i = 0; i < n; i++) {
        elements += ks[i].geo.outer * ks[i].geo.channels * ks[i].geo.inner;
        tasks = bn_max(tasks, ks[i].grid.ntasks);
    }
    for (ptrdiff_t i = 0; i < n; i++)
        if (BN_FN(prepare_)(&ks[i], (size_t)elements * sizeof(BN_T)) != BN_OK) return BN_ERR_NOMEM;
    const int nthreads = ks[0].run->nthreads;
#ifdef _OPENMP
    const size_t context_bytes = (size_t)(elements / n) * sizeof(BN_T) * (ks[0].op == BN_OP_BACKWARD ? 2 : 1);
    const int solo = n >= nthreads && context_bytes <= BN_GROUP_BYTES;
    if (nthreads > 1 && (tasks > 1 || solo) && elements >= BN_PARALLEL_MIN_ELEMS) {
        const int nt = solo || tasks >= nthreads ? nthreads : (int)tasks;
        const ptrdiff_t share = solo ? n / nt : 0; /* contexts per thread run alone */
        /* run->contended: the least CPU time of a thread against the region's
         * wall time (a wait in a barrier spins, so it counts as CPU time) */
        int *const contended = elements >= BN_CONTENTION_MIN_ELEMS ? ks[0].run->contended : NULL;
        const double start = contended ? bn_wtime() : 0.0;
        double least = HUGE_VAL;
#pragma omp parallel num_threads(nt)
        {
            const double cpu0 = contended ? bn_thread_seconds() : -1.0;
            const int me = bn_thread_num();
            if (share) {
                bn_context *mine = ks + me * share;
                for (ptrdiff_t i = 0; i < share; i++) mine[i].quiet = me != 0; /* the caller's thread polls */
                BN_FN(exec_solo_)(mine, share);
            }
            for (ptrdiff_t i = nt * share; i < n; i++) BN_FN(exec_body_)(&ks[i]);
            if (cpu0 >= 0.0) {
#pragma omp barrier
                const double used = bn_thread_seconds() - cpu0;
#pragma omp critical(bn_contention)
                if (used < least) least = used;
            }
        }
        if (contended && least < HUGE_VAL) {
            const double wall = bn_wtime() - start;
            if (wall >= BN_CONTENTION_MIN_SECONDS) *contended = least < 0.5 * wall;
        }
    } else
#else
    (void)nthreads;
#endif
    for (ptrdiff_t i = 0; i < n; i++) BN_FN(exec_body_)(&ks[i]);
    return *ks[0].stop ? BN_ERR_INTERRUPTED : BN_OK;
}

/* ---- the entry points of this instantiation (ops.h, the table in kernels.h)
 * A keyed call (bn_keys) of B samples runs as one context over B x C keys
 * when its operands allow (bn_keys_flat), else as one context per sample;
 * per-key outputs of the contexts are then reduced per channel, in key
 * order, so both plans give the same bits. */

/* The samples' operands: base + b * batch_stride, or the whole when flat. */
static inline bn_array BN_FN(sample_)(bn_array a, ptrdiff_t b)
{
    a.data = (BN_T *)a.data + b * a.batch_stride;
    return a;
}

/* The keyed view's settings of a context (C: channels per sample). */
static void BN_FN(set_keys_)(bn_context *k, const bn_keys *keys, ptrdiff_t C)
{
    k->group = bn_keys_group(keys);
    k->affine_period = C;
    k->uncentered = keys->uncentered;
    k->affine_inner = keys->affine_inner;
}

/* Sets up the context of sample b of an op's call (its arguments `args`). */
typedef void (*BN_FN(init_fn_))(bn_context *k, ptrdiff_t b, const void *args);
/* Writes an op's per-channel results, given the per-key doubles of every
 * context (next_mean, next_var) summed per channel in key order. */
typedef void (*BN_FN(write_back_fn_))(const double *a, const double *b, const void *args);

/* Builds the call's contexts -- one over every key when `flat`, else one per
 * sample of `batch` -- runs them, and on success hands write_back (if not
 * NULL) the sums per channel (C = sample_geo->channels) of their per-key
 * outputs, folded in key order into the first context's arrays (no scratch
 * of its own: a call with one sample and one context adds nothing). */
static int BN_FN(run_keyed_)(const bn_geometry *sample_geo, bn_array x, ptrdiff_t batch, int flat,
                             const bn_run *run, int partials, BN_FN(init_fn_) init, const void *args,
                             BN_FN(write_back_fn_) write_back)
{
    bn_geometry geo = *sample_geo;
    if (flat) geo.channels *= batch;
    const ptrdiff_t n = flat ? 1 : batch, C = sample_geo->channels;
    bn_context one, *ks = &one;
    int stop = 0; /* raised in one context, it stops them all */
    double stack_[BN_STACK_DOUBLES]; /* small calls (one context) never touch malloc */
    if (n > 1 && !(ks = (bn_context *)malloc(sizeof(bn_context) * (size_t)n))) return BN_ERR_NOMEM;
    int status = BN_OK;
    ptrdiff_t made = 0;
    for (; made < n; made++) {
        bn_context *k = &ks[made];
        *k = bn_context_new(&geo, BN_FN(sample_)(x, made), run, &stop);
        const int small = n == 1 && bn_context_doubles(k, partials) <= BN_STACK_DOUBLES;
        if (bn_context_alloc(k, partials, small ? stack_ : NULL) != 0) {
            status = BN_ERR_NOMEM;
            break;
        }
        init(k, made, args);
    }
    if (status == BN_OK) status = BN_FN(exec_all_)(ks, n);
    if (status == BN_OK && write_back) {
        double *sa = ks[0].next_mean, *sb = ks[0].next_var; /* key j adds to channel j % C */
        for (ptrdiff_t i = 0; i < n; i++)
            for (ptrdiff_t j = i ? 0 : C; j < geo.channels; j++) {
                sa[j % C] += ks[i].next_mean[j];
                sb[j % C] += ks[i].next_var[j];
            }
        write_back(sa, sb, args);
    }
    for (ptrdiff_t i = 0; i < made; i++) bn_context_free(&ks[i]);
    if (ks != &one) free(ks);
    return status;
}

static void BN_FN(init_moments_)(bn_context *k, ptrdiff_t b, const void *args)
{
    const bn_moments_args *a = (const bn_moments_args *)args;
    const ptrdiff_t C = a->geo.channels;
    k->op = BN_OP_MOMENTS;
    k->out_count = a->count + b * C;
    k->out_mean = a->mean + b * C;
    k->out_m2 = a->m2 + b * C;
}

static int BN_FN(moments_)(const bn_moments_args *a, const bn_run *run)
{
    const ptrdiff_t B = bn_keys_batch(&a->keys);
    const int flat = B == 1 || bn_keys_flat(&a->x, a->geo.channels);
    return BN_FN(run_keyed_)(&a->geo, a->x, B, flat, run, 1, BN_FN(init_moments_), a, NULL);
}

/* The fused activation of a forward/inference context (bn_act); before the
 * coefficients are set: leaky_relu's slope goes into coefficient a. */
static void BN_FN(set_act_)(bn_context *k, const bn_act *act, ptrdiff_t b)
{
    k->act = (int)act->kind;
    k->slope = act->negative_slope;
    k->residual = act->residual.data != NULL;
    if (k->residual) k->g = BN_FN(sample_)(act->residual, b);
}

static void BN_FN(init_forward_)(bn_context *k, ptrdiff_t b, const void *args)
{
    const bn_forward_args *a = (const bn_forward_args *)args;
    const ptrdiff_t C = a->geo.channels, G = bn_keys_group(&a->keys);
    k->op = BN_OP_FORWARD;
    k->y = BN_FN(sample_)(a->y, b);
    BN_FN(set_keys_)(k, &a->keys, C);
    k->weight = a->weight;
    k->bias = a->bias;
    k->running_mean = a->running_mean;
    k->running_var = a->running_var;
    k->momentum = a->momentum;
    k->eps = a->eps;
    k->save_mean = (BN_AT *)a->save_mean + b * C / G;
    k->save_invstd = (BN_AT *)a->save_invstd + b * C / G;
    k->share = a->share;
    k->r_max = a->r_max;
    k->d_max = a->d_max;
    k->prior_mean = a->prior_mean;
    k->prior_var = a->prior_var;
    k->prior_moments = a->prior_moments;
    k->stats_out = a->stats_out;
    BN_FN(set_act_)(k, &a->act, b);
}

/* The running statistics: the mean of the samples' updates (one sample: itself). */
static void BN_FN(write_running_)(const double *a, const double *b, const void *args)
{
    const bn_forward_args *f = (const bn_forward_args *)args;
    const double B = (double)bn_keys_batch(&f->keys);
    BN_AT *rm = (BN_AT *)f->running_mean, *rv = (BN_AT *)f->running_var;
    for (ptrdiff_t c = 0; c < f->geo.channels; c++) {
        rm[c] = (BN_AT)(a[c] / B);
        rv[c] = (BN_AT)(b[c] / B);
    }
}

static int BN_FN(forward_train_)(const bn_forward_args *a, const bn_run *run)
{
    const ptrdiff_t B = bn_keys_batch(&a->keys), C = a->geo.channels;
    const int flat = B == 1 || (bn_keys_flat(&a->x, C) && bn_keys_flat(&a->y, C));
    return BN_FN(run_keyed_)(&a->geo, a->x, B, flat, run, 1, BN_FN(init_forward_), a,
                             a->running_mean ? BN_FN(write_running_) : NULL);
}

static void BN_FN(init_inference_)(bn_context *k, ptrdiff_t b, const void *args)
{
    const bn_inference_args *a = (const bn_inference_args *)args;
    const BN_AT *rm = (const BN_AT *)a->running_mean, *rv = (const BN_AT *)a->running_var;
    const BN_AT *weight = (const BN_AT *)a->weight, *bias = (const BN_AT *)a->bias;
    (void)b;
    k->op = BN_OP_INFERENCE;
    k->y = a->y;
    BN_FN(set_act_)(k, &a->act, 0);
    for (ptrdiff_t c = 0; c < a->geo.channels; c++)
        BN_FN(set_coef_)(k, c, (double)rm[c],
                         (weight ? (double)weight[c] : 1.0) / sqrt((double)rv[c] + a->eps),
                         bias ? (double)bias[c] : 0.0, k->slope, 0.0, 0.0, 0.0);
}

static int BN_FN(inference_)(const bn_inference_args *a, const bn_run *run)
{
    return BN_FN(run_keyed_)(&a->geo, a->x, 1, 1, run, 0, BN_FN(init_inference_), a, NULL);
}

static void BN_FN(init_backward_)(bn_context *k, ptrdiff_t b, const void *args)
{
    const bn_backward_args *a = (const bn_backward_args *)args;
    const ptrdiff_t C = a->geo.channels, G = bn_keys_group(&a->keys);
    k->op = BN_OP_BACKWARD;
    k->g = BN_FN(sample_)(a->grad_out, b);
    k->y = BN_FN(sample_)(a->grad_in, b);
    BN_FN(set_keys_)(k, &a->keys, C);
    k->weight = a->weight;
    k->save_invstd_in = (const BN_AT *)a->save_invstd + b * C / G;
    k->training = a->training;
    k->grad_weight = a->grad_weight;
    k->grad_bias = a->grad_bias;
    k->share = a->share;
    k->ref_mean = a->ref_mean;
    /* in-place activated batch norm (training, batch norm only): x holds y */
    k->act = a->training && (a->act.kind == BN_ACT_LEAKY_RELU || a->act.kind == BN_ACT_ELU) ? (int)a->act.kind : 0;
    k->slope = k->act ? a->act.negative_slope : 0.0;
    const BN_AT *save_mean = (const BN_AT *)a->save_mean + b * C / G;
    for (ptrdiff_t c = 0; c < k->geo.channels; c++)
        k->mean[c] = k->uncentered ? 0.0 : (double)save_mean[c / G];
    if (!a->training) k->ax = k->g; /* the affine phase reads g (with mean 0) */
}

/* grad_weight and grad_bias per channel: the sums of the keys' shares. */
static void BN_FN(write_grads_)(const double *a, const double *b, const void *args)
{
    const bn_backward_args *g = (const bn_backward_args *)args;
    for (ptrdiff_t c = 0; c < g->geo.channels; c++) {
        ((BN_AT *)g->grad_weight)[c] = (BN_AT)a[c];
        ((BN_AT *)g->grad_bias)[c] = (BN_AT)b[c];
    }
}

static int BN_FN(backward_)(const bn_backward_args *a, const bn_run *run)
{
    const ptrdiff_t B = bn_keys_batch(&a->keys), C = a->geo.channels;
    const int flat = B == 1 || (bn_keys_flat(&a->x, C) && bn_keys_flat(&a->grad_out, C)
                                && bn_keys_flat(&a->grad_in, C));
    /* affine_inner: the column sums write grad_weight and grad_bias */
    return BN_FN(run_keyed_)(&a->geo, a->x, B, flat, run, 1, BN_FN(init_backward_), a,
                             a->keys.affine_inner ? NULL : BN_FN(write_grads_));
}

#undef BN_ROW_BLOCK
#undef BN_FLOAT_SUMS
#undef BN_FLOAT_SUMS_MIN_BLOCKS
#undef BN_GRAD_FLOAT_SUMS_MIN_BLOCKS
#undef BN_FLUSH
#undef BN_SUM_ROWS
#undef BN_LINE_T
#undef BN_FINISH_BLOCK
#undef BN_LD
#undef BN_LDW
#undef BN_LDP
#undef BN_LDD
#undef BN_SPLAT
#undef BN_LDA
#undef BN_STA
#undef BN_SPLATA
#undef BN_STREAMA
#undef BN_CAN_STREAM
#undef BN_TO_A
#undef BN_FROM_A
#undef BN_F16C
#undef BN_NEON_F16
#undef BN_BF16_X86
#undef WA
#undef VD
#undef W
#undef BN_U
#undef BN_STATS_BYTES
#undef BN_FN
#undef BN_CAT
#undef BN_CAT_
