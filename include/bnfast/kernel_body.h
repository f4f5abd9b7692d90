/* Batch-norm kernels, written once and instantiated per element type and
 * instruction set by kernels.h: define BN_T (the element type), BN_T_IS_FLOAT,
 * BN_VEC_BYTES (SIMD register width) and BN_SFX (the name suffix), then
 * include this file.  No include guard on purpose.
 *
 * Every value is accumulated in double whatever BN_T is.  Vector loops and
 * their scalar tails evaluate the same expressions, and which elements a
 * vector loop covers depends on the shape and addresses only, so results are
 * bit-identical for any thread count. */

#define BN_CAT_(a, b) a##b
#define BN_CAT(a, b) BN_CAT_(a, b)
#define BN_FN(name) BN_CAT(name, BN_SFX)

/* ---- vectors ------------------------------------------------------------
 * VD: W doubles in one SIMD register; VT: W elements of BN_T.  The statistics
 * loops keep BN_U independent vectors of lanes that share one Welford count,
 * so there is one division per BN_U * W elements and no reassociation. */
#define W (BN_VEC_BYTES / 8)
#define BN_U 4

#if BN_VECTORS
typedef double BN_FN(vd_) __attribute__((vector_size(BN_VEC_BYTES)));
typedef BN_T BN_FN(vt_) __attribute__((vector_size(W * sizeof(BN_T))));
#define VD BN_FN(vd_)
#define VT BN_FN(vt_)

static inline VD BN_FN(ld_)(const BN_T *p)
{
#if BN_X86 && BN_T_IS_FLOAT && BN_VEC_BYTES == 32
    return (VD)_mm256_cvtps_pd(_mm_loadu_ps(p));
#elif BN_X86 && BN_T_IS_FLOAT && BN_VEC_BYTES == 64
    return (VD)_mm512_cvtps_pd(_mm256_loadu_ps(p));
#elif BN_X86 && BN_T_IS_FLOAT
    /* two floats through an unaligned, may-alias 64-bit load (no double* punning) */
    return (VD)_mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(const void *)p)));
#else
    VT v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, VD);
#endif
}

static inline VD BN_FN(ldd_)(const double *p)
{
    VD v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void BN_FN(st_)(BN_T *p, VD v)
{
#if BN_X86 && BN_T_IS_FLOAT && BN_VEC_BYTES == 32
    _mm_storeu_ps(p, _mm256_cvtpd_ps((__m256d)v));
#elif BN_X86 && BN_T_IS_FLOAT && BN_VEC_BYTES == 64
    _mm256_storeu_ps(p, _mm512_cvtpd_ps((__m512d)v));
#elif BN_X86 && BN_T_IS_FLOAT
    _mm_storel_epi64((__m128i *)(void *)p, _mm_castps_si128(_mm_cvtpd_ps((__m128d)v)));
#else
    VT t = __builtin_convertvector(v, VT);
    memcpy(p, &t, sizeof t);
#endif
}

static inline VD BN_FN(splat_)(double s)
{
    VD v;
    for (int l = 0; l < W; l++) v[l] = s;
    return v;
}

#define BN_LD BN_FN(ld_)
#define BN_LDD BN_FN(ldd_)
#define BN_ST BN_FN(st_)
#define BN_SPLAT BN_FN(splat_)

/* Non-temporal store of 2 W elements to an address aligned to BN_VEC_BYTES. */
#if BN_X86
#define BN_CAN_STREAM 1
static inline void BN_FN(stream2_)(BN_T *p, VD a, VD b)
{
#if BN_T_IS_FLOAT && BN_VEC_BYTES == 32
    _mm256_stream_ps(p, _mm256_set_m128(_mm256_cvtpd_ps((__m256d)b), _mm256_cvtpd_ps((__m256d)a)));
#elif BN_T_IS_FLOAT && BN_VEC_BYTES == 64 /* insertf64x4 is AVX512F; insertf32x8 would need DQ */
    _mm512_stream_ps(p, _mm512_castpd_ps(_mm512_insertf64x4(
                            _mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps((__m512d)a))),
                            _mm256_castps_pd(_mm512_cvtpd_ps((__m512d)b)), 1)));
#elif BN_T_IS_FLOAT
    _mm_stream_ps(p, _mm_movelh_ps(_mm_cvtpd_ps((__m128d)a), _mm_cvtpd_ps((__m128d)b)));
#elif BN_VEC_BYTES == 32
    _mm256_stream_pd(p, (__m256d)a);
    _mm256_stream_pd(p + W, (__m256d)b);
#elif BN_VEC_BYTES == 64 /* two whole lines */
    _mm512_stream_pd(p, (__m512d)a);
    _mm512_stream_pd(p + W, (__m512d)b);
#else
    _mm_stream_pd(p, (__m128d)a);
    _mm_stream_pd(p + W, (__m128d)b);
#endif
}
#define BN_STREAM2 BN_FN(stream2_)
#else
#define BN_CAN_STREAM 0
#endif
#else
#define BN_CAN_STREAM 0
#endif

/* Streaming stores write whole 64-byte lines only: elements before p's next
 * line boundary (-1 if p is not element-aligned), and elements per streamed
 * block: one line, or two when one BN_STREAM2 covers more (64-byte vectors of
 * double). */
#define BN_LINE_ELEMS ((ptrdiff_t)(64 / sizeof(BN_T) > 2 * W ? 64 / sizeof(BN_T) : 2 * W))
static inline ptrdiff_t BN_FN(line_peel_)(const BN_T *p)
{
    const size_t a = (size_t)p % 64;
    if (a % sizeof(BN_T)) return -1;
    return a ? (ptrdiff_t)((64 - a) / sizeof(BN_T)) : 0;
}

static inline void BN_FN(stream_fence_)(int stream)
{
#if BN_CAN_STREAM
    if (stream) _mm_sfence();
#else
    (void)stream;
#endif
}

/* ---- statistics: Welford over the runs of one planar task --------------- */

static void BN_FN(stats_planar_)(const bn_context *k, ptrdiff_t t)
{
    const bn_planar_task u = bn_planar_task_of(&k->grid, &k->geo, t);
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
        for (ptrdiff_t i = 0; i < body; i += BN_U * W) {
            const double rs = bn_reciprocal(++steps);
            const VD r = BN_SPLAT(rs), q = BN_SPLAT(1.0) - r;
            for (int v = 0; v < BN_U; v++) {
                const VD d = BN_LD(x + i + v * W) - mean[v];
                mean[v] += d * r;
                m2[v] += (d * q) * d; /* = d * (x - new mean) */
            }
        }
#endif
        for (ptrdiff_t i = body; i < len; i++) {
            const double xv = (double)x[i];
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
}

/* Channels-last: the task's rows are read in blocks of BN_ROW_BLOCK
 * contiguous rows; within a block, strips of BN_U * W channels keep their
 * Welford lanes in registers (saved to the L1 state between blocks), the
 * remaining channels update the state directly.  Per channel the updates run
 * over the rows in order, whatever the blocking. */
#define BN_ROW_BLOCK 16

static void BN_FN(stats_rows_)(const bn_context *k, ptrdiff_t t)
{
    const bn_rows_task u = bn_rows_task_of(&k->grid, &k->geo, t);
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
                const double xv = (double)x[j];
                const double d = xv - pmean[j];
                pmean[j] += d * rk;
                pm2[j] += d * (xv - pmean[j]);
            }
        }
    }
}

/* ---- y = (x - mean) * scale + shift, per channel, in double ------------ */

/* y[i] for i in [i0, i1) with ordinary stores. */
static inline void BN_FN(affine_span_)(const BN_T *x, BN_T *y, ptrdiff_t i0, ptrdiff_t i1,
                                       double mu, double s, double b)
{
    ptrdiff_t i = i0;
#if BN_VECTORS
    const VD vmu = BN_SPLAT(mu), vs = BN_SPLAT(s), vb = BN_SPLAT(b);
    for (; i + BN_U * W <= i1; i += BN_U * W) {
        VD v[BN_U];
        for (int j = 0; j < BN_U; j++) v[j] = (BN_LD(x + i + j * W) - vmu) * vs + vb;
        for (int j = 0; j < BN_U; j++) BN_ST(y + i + j * W, v[j]);
    }
    for (; i + W <= i1; i += W) BN_ST(y + i, (BN_LD(x + i) - vmu) * vs + vb);
#endif
    for (; i < i1; i++) y[i] = (BN_T)(((double)x[i] - mu) * s + b);
}

static inline void BN_FN(affine_run_)(const BN_T *x, BN_T *y, ptrdiff_t len, double mu, double s,
                                      double b, int stream)
{
#if BN_VECTORS && BN_CAN_STREAM
    ptrdiff_t peel;
    if (stream && (peel = BN_FN(line_peel_)(y)) >= 0 && peel + BN_LINE_ELEMS <= len) {
        const VD vmu = BN_SPLAT(mu), vs = BN_SPLAT(s), vb = BN_SPLAT(b);
        const ptrdiff_t end = peel + (len - peel) / BN_LINE_ELEMS * BN_LINE_ELEMS;
        BN_FN(affine_span_)(x, y, 0, peel, mu, s, b);
        for (ptrdiff_t i = peel; i < end; i += 2 * W) {
            const VD a = (BN_LD(x + i) - vmu) * vs + vb;
            const VD c = (BN_LD(x + i + W) - vmu) * vs + vb;
            BN_STREAM2(y + i, a, c);
        }
        BN_FN(affine_span_)(x, y, end, len, mu, s, b);
        return;
    }
#else
    (void)stream;
#endif
    BN_FN(affine_span_)(x, y, 0, len, mu, s, b);
}

static void BN_FN(affine_planar_)(const bn_context *k, ptrdiff_t t)
{
    const bn_planar_task u = bn_planar_task_of(&k->grid, &k->geo, t);
    const ptrdiff_t c = u.channel;
    for (ptrdiff_t n = u.row0; n < u.row1; n++) {
        const BN_T *x = (const BN_T *)k->ax.data + n * k->ax.outer_stride + c * k->ax.channel_stride
                        + u.offset;
        BN_T *y = (BN_T *)k->y.data + n * k->y.outer_stride + c * k->y.channel_stride + u.offset;
        BN_FN(affine_run_)(x, y, u.len, k->amean[c], k->scale[c], k->shift[c], k->stream);
    }
    BN_FN(stream_fence_)(k->stream);
}

/* Short planar runs (inner < BN_SPAN_INNER) with streaming: the normalize
 * phase walks rows of consecutive channels as one contiguous span, so that
 * streaming stores write whole lines across run boundaries.  Span task t of
 * channels [c0, c1) covers row t / chunks, channels of chunk t % chunks. */
#define BN_SPAN_INNER 2048

static inline ptrdiff_t BN_FN(span_chunk_)(const bn_context *k)
{
    return bn_max(1, BN_TASK_ELEMS / k->geo.inner);
}

static inline int BN_FN(use_spans_)(const bn_context *k)
{
#if BN_VECTORS && BN_CAN_STREAM
    return k->stream && !k->grid.channels_last && k->geo.inner < BN_SPAN_INNER
           && k->geo.inner >= BN_LINE_ELEMS
           && k->ax.channel_stride == k->geo.inner && k->y.channel_stride == k->geo.inner
           && (k->op != BN_OP_BACKWARD || !k->training
               || (k->x.channel_stride == k->geo.inner && k->g.channel_stride == k->geo.inner));
#else
    (void)k;
    return 0;
#endif
}

/* Elements [i0, i1) of a span starting at channel ca, ordinary stores. */
static inline void BN_FN(span_plain_)(const bn_context *k, const BN_T *x, BN_T *y, ptrdiff_t ca,
                                      ptrdiff_t i0, ptrdiff_t i1)
{
    const ptrdiff_t inner = k->geo.inner;
    while (i0 < i1) {
        const ptrdiff_t j = i0 / inner, end = bn_min(i1, (j + 1) * inner);
        const ptrdiff_t c = ca + j;
        BN_FN(affine_span_)(x, y, i0, end, k->amean[c], k->scale[c], k->shift[c]);
        i0 = end;
    }
}

static void BN_FN(affine_span_task_)(const bn_context *k, ptrdiff_t c0, ptrdiff_t c1, ptrdiff_t t)
{
#if BN_VECTORS && BN_CAN_STREAM
    const ptrdiff_t inner = k->geo.inner, chunk = BN_FN(span_chunk_)(k);
    const ptrdiff_t chunks = bn_ceil_div(c1 - c0, chunk);
    const ptrdiff_t n = t / chunks, ca = c0 + (t % chunks) * chunk, cb = bn_min(c1, ca + chunk);
    const BN_T *x = (const BN_T *)k->ax.data + n * k->ax.outer_stride + ca * inner;
    BN_T *y = (BN_T *)k->y.data + n * k->y.outer_stride + ca * inner;
    const ptrdiff_t len = (cb - ca) * inner;
    const ptrdiff_t peel = BN_FN(line_peel_)(y);
    if (peel < 0 || peel + BN_LINE_ELEMS > len) {
        BN_FN(span_plain_)(k, x, y, ca, 0, len);
        return;
    }
    const ptrdiff_t end = peel + (len - peel) / BN_LINE_ELEMS * BN_LINE_ELEMS;
    BN_FN(span_plain_)(k, x, y, ca, 0, peel);
    ptrdiff_t jf = peel / inner, bound = (jf + 1) * inner; /* channel of element i, its end */
    for (ptrdiff_t i = peel; i < end; i += BN_LINE_ELEMS) {
        while (i >= bound) {
            jf++;
            bound += inner;
        }
        if (i + BN_LINE_ELEMS <= bound) { /* the line lies in one channel */
            const ptrdiff_t c = ca + jf;
            const VD vmu = BN_SPLAT(k->amean[c]), vs = BN_SPLAT(k->scale[c]), vb = BN_SPLAT(k->shift[c]);
            for (ptrdiff_t e = i; e < i + BN_LINE_ELEMS; e += 2 * W)
                BN_STREAM2(y + e, (BN_LD(x + e) - vmu) * vs + vb, (BN_LD(x + e + W) - vmu) * vs + vb);
        } else { /* straddles channels: compute the line in L1, then stream it */
            BN_T line[BN_LINE_ELEMS] __attribute__((aligned(64)));
            for (ptrdiff_t e = 0, c = ca + jf; e < BN_LINE_ELEMS; e++) {
                if (i + e == bound) c++; /* a line spans at most two runs (inner >= BN_LINE_ELEMS) */
                line[e] = (BN_T)(((double)x[i + e] - k->amean[c]) * k->scale[c] + k->shift[c]);
            }
            for (ptrdiff_t e = 0; e < BN_LINE_ELEMS; e += 2 * W)
                BN_STREAM2(y + i + e, BN_LD(line + e), BN_LD(line + e + W));
        }
    }
    BN_FN(span_plain_)(k, x, y, ca, end, len);
    BN_FN(stream_fence_)(1);
#else
    (void)k;
    (void)c0;
    (void)c1;
    (void)t;
#endif
}

/* Channels-last: blocks of BN_ROWS rows share each load of the per-channel
 * coefficients, except when streaming (interleaved rows would break up the
 * write-combining of whole lines); other rows one by one. */
#define BN_ROWS 4

static void BN_FN(affine_rows_)(const bn_context *k, ptrdiff_t t)
{
    const bn_rows_task u = bn_rows_task_of(&k->grid, &k->geo, t);
    const double *mu = k->amean, *s = k->scale, *b = k->shift;
    const ptrdiff_t xs = k->ax.outer_stride, ys = k->y.outer_stride;
    const BN_T *x0 = (const BN_T *)k->ax.data;
    BN_T *y0 = (BN_T *)k->y.data; /* may alias x */
    ptrdiff_t r = u.row0;
#if BN_VECTORS
    if (!k->stream) { /* streaming stores go row by row: whole lines per row */
        for (; r + BN_ROWS <= u.row1; r += BN_ROWS) {
            const BN_T *x = x0 + r * xs;
            BN_T *y = y0 + r * ys;
            ptrdiff_t c = u.c0;
            for (; c + 2 * W <= u.c1; c += 2 * W) {
                const VD m0 = BN_LDD(mu + c), m1 = BN_LDD(mu + c + W);
                const VD s0 = BN_LDD(s + c), s1 = BN_LDD(s + c + W);
                const VD b0 = BN_LDD(b + c), b1 = BN_LDD(b + c + W);
                for (int q = 0; q < BN_ROWS; q++) {
                    const VD p0 = (BN_LD(x + q * xs + c) - m0) * s0 + b0;
                    const VD p1 = (BN_LD(x + q * xs + c + W) - m1) * s1 + b1;
                    BN_ST(y + q * ys + c, p0);
                    BN_ST(y + q * ys + c + W, p1);
                }
            }
            for (; c < u.c1; c++)
                for (int q = 0; q < BN_ROWS; q++)
                    y[q * ys + c] = (BN_T)(((double)x[q * xs + c] - mu[c]) * s[c] + b[c]);
        }
    }
#endif
    for (; r < u.row1; r++) {
        const BN_T *x = x0 + r * xs;
        BN_T *y = y0 + r * ys;
        ptrdiff_t c = u.c0;
#if BN_VECTORS
#if BN_CAN_STREAM
        ptrdiff_t peel;
        if (k->stream && (peel = BN_FN(line_peel_)(y + c)) >= 0 && peel + BN_LINE_ELEMS <= u.c1 - c) {
            const ptrdiff_t e = c + peel;
            for (; c + W <= e; c += W)
                BN_ST(y + c, (BN_LD(x + c) - BN_LDD(mu + c)) * BN_LDD(s + c) + BN_LDD(b + c));
            for (; c < e; c++) y[c] = (BN_T)(((double)x[c] - mu[c]) * s[c] + b[c]);
            for (const ptrdiff_t e2 = c + (u.c1 - c) / BN_LINE_ELEMS * BN_LINE_ELEMS; c < e2; c += 2 * W) {
                const VD a = (BN_LD(x + c) - BN_LDD(mu + c)) * BN_LDD(s + c) + BN_LDD(b + c);
                const VD d = (BN_LD(x + c + W) - BN_LDD(mu + c + W)) * BN_LDD(s + c + W)
                             + BN_LDD(b + c + W);
                BN_STREAM2(y + c, a, d);
            }
        }
#endif
        for (; c + 2 * W <= u.c1; c += 2 * W) {
            const VD a = (BN_LD(x + c) - BN_LDD(mu + c)) * BN_LDD(s + c) + BN_LDD(b + c);
            const VD d = (BN_LD(x + c + W) - BN_LDD(mu + c + W)) * BN_LDD(s + c + W)
                         + BN_LDD(b + c + W);
            BN_ST(y + c, a);
            BN_ST(y + c + W, d);
        }
        for (; c + W <= u.c1; c += W)
            BN_ST(y + c, (BN_LD(x + c) - BN_LDD(mu + c)) * BN_LDD(s + c) + BN_LDD(b + c));
#endif
        for (; c < u.c1; c++) y[c] = (BN_T)(((double)x[c] - mu[c]) * s[c] + b[c]);
    }
    BN_FN(stream_fence_)(k->stream);
}

/* ---- backward: per-channel sum(g) and sum(g * (x - mean)) --------------- */

static void BN_FN(grad_sums_planar_)(const bn_context *k, ptrdiff_t t)
{
    const bn_planar_task u = bn_planar_task_of(&k->grid, &k->geo, t);
    const ptrdiff_t c = u.channel, len = u.len;
    const double mu = k->mean[c];
    double tg = 0.0, tgx = 0.0;
#if BN_VECTORS
    const ptrdiff_t body = len - len % (BN_U * W);
    const VD vmu = BN_SPLAT(mu);
    VD sg[BN_U], sgx[BN_U];
    for (int v = 0; v < BN_U; v++) sg[v] = sgx[v] = BN_SPLAT(0.0);
#else
    const ptrdiff_t body = 0;
#endif
    for (ptrdiff_t n = u.row0; n < u.row1; n++) {
        const BN_T *x = (const BN_T *)k->x.data + n * k->x.outer_stride + c * k->x.channel_stride
                        + u.offset;
        const BN_T *g = (const BN_T *)k->g.data + n * k->g.outer_stride + c * k->g.channel_stride
                        + u.offset;
#if BN_VECTORS
        for (ptrdiff_t i = 0; i < body; i += BN_U * W) {
            for (int v = 0; v < BN_U; v++) {
                const VD gv = BN_LD(g + i + v * W);
                sg[v] += gv;
                sgx[v] += gv * (BN_LD(x + i + v * W) - vmu);
            }
        }
#endif
        for (ptrdiff_t i = body; i < len; i++) {
            const double gv = (double)g[i];
            tg += gv;
            tgx += gv * ((double)x[i] - mu);
        }
    }
    double total_g = 0.0, total_gx = 0.0;
#if BN_VECTORS
    for (int v = 0; v < BN_U; v++)
        for (int l = 0; l < W; l++) {
            total_g += sg[v][l];
            total_gx += sgx[v][l];
        }
#endif
    total_g += tg;
    total_gx += tgx;
    const ptrdiff_t i = u.prow * k->geo.channels + c;
    k->part.mean[i] = total_g;
    k->part.m2[i] = total_gx;
}

static void BN_FN(grad_sums_rows_)(const bn_context *k, ptrdiff_t t)
{
    const bn_rows_task u = bn_rows_task_of(&k->grid, &k->geo, t);
    const ptrdiff_t nc = u.c1 - u.c0, xs = k->x.outer_stride, gs = k->g.outer_stride;
    const double *mu = k->mean + u.c0;
    double *restrict psg = k->part.mean + u.prow * k->geo.channels + u.c0;
    double *restrict psgx = k->part.m2 + u.prow * k->geo.channels + u.c0;
    const BN_T *x0 = (const BN_T *)k->x.data + u.c0, *g0 = (const BN_T *)k->g.data + u.c0;
    for (ptrdiff_t j = 0; j < nc; j++) psg[j] = psgx[j] = 0.0;
#if BN_VECTORS
    const ptrdiff_t vec = nc - nc % (BN_U * W);
#else
    const ptrdiff_t vec = 0;
#endif
    for (ptrdiff_t rb = u.row0; rb < u.row1; rb += BN_ROW_BLOCK) {
        const ptrdiff_t re = bn_min(u.row1, rb + BN_ROW_BLOCK);
#if BN_VECTORS
        for (ptrdiff_t c = 0; c < vec; c += BN_U * W) {
            VD sg[BN_U], sgx[BN_U], vmu[BN_U];
            for (int v = 0; v < BN_U; v++) {
                sg[v] = BN_LDD(psg + c + v * W);
                sgx[v] = BN_LDD(psgx + c + v * W);
                vmu[v] = BN_LDD(mu + c + v * W);
            }
            for (ptrdiff_t r = rb; r < re; r++) {
                const BN_T *x = x0 + r * xs + c, *g = g0 + r * gs + c;
                for (int v = 0; v < BN_U; v++) {
                    const VD gv = BN_LD(g + v * W);
                    sg[v] += gv;
                    sgx[v] += gv * (BN_LD(x + v * W) - vmu[v]);
                }
            }
            for (int v = 0; v < BN_U; v++) {
                memcpy(psg + c + v * W, &sg[v], sizeof(VD));
                memcpy(psgx + c + v * W, &sgx[v], sizeof(VD));
            }
        }
#endif
        if (vec == nc) continue;
        for (ptrdiff_t r = rb; r < re; r++) {
            const BN_T *x = x0 + r * xs, *g = g0 + r * gs;
            for (ptrdiff_t j = vec; j < nc; j++) {
                const double gv = (double)g[j];
                psg[j] += gv;
                psgx[j] += gv * ((double)x[j] - mu[j]);
            }
        }
    }
}

/* ---- backward: grad_in = g * scale + (x - mean) * coef_x + shift -------- */

static inline void BN_FN(grad_apply_span_)(const BN_T *g, const BN_T *x, BN_T *y, ptrdiff_t i0,
                                           ptrdiff_t i1, double mu, double a, double bx, double c0)
{
    ptrdiff_t i = i0; /* y may alias g or x element for element */
#if BN_VECTORS
    const VD vmu = BN_SPLAT(mu), va = BN_SPLAT(a), vbx = BN_SPLAT(bx), vc = BN_SPLAT(c0);
    for (; i + 2 * W <= i1; i += 2 * W) {
        const VD p = BN_LD(g + i) * va + ((BN_LD(x + i) - vmu) * vbx + vc);
        const VD q = BN_LD(g + i + W) * va + ((BN_LD(x + i + W) - vmu) * vbx + vc);
        BN_ST(y + i, p);
        BN_ST(y + i + W, q);
    }
#endif
    for (; i < i1; i++) y[i] = (BN_T)((double)g[i] * a + (((double)x[i] - mu) * bx + c0));
}

static inline void BN_FN(grad_apply_run_)(const BN_T *g, const BN_T *x, BN_T *y, ptrdiff_t len,
                                          double mu, double a, double bx, double c0, int stream)
{
#if BN_VECTORS && BN_CAN_STREAM
    ptrdiff_t peel;
    if (stream && (peel = BN_FN(line_peel_)(y)) >= 0 && peel + BN_LINE_ELEMS <= len) {
        const VD vmu = BN_SPLAT(mu), va = BN_SPLAT(a), vbx = BN_SPLAT(bx), vc = BN_SPLAT(c0);
        const ptrdiff_t end = peel + (len - peel) / BN_LINE_ELEMS * BN_LINE_ELEMS;
        BN_FN(grad_apply_span_)(g, x, y, 0, peel, mu, a, bx, c0);
        for (ptrdiff_t i = peel; i < end; i += 2 * W) {
            const VD p = BN_LD(g + i) * va + ((BN_LD(x + i) - vmu) * vbx + vc);
            const VD q = BN_LD(g + i + W) * va + ((BN_LD(x + i + W) - vmu) * vbx + vc);
            BN_STREAM2(y + i, p, q);
        }
        BN_FN(grad_apply_span_)(g, x, y, end, len, mu, a, bx, c0);
        return;
    }
#else
    (void)stream;
#endif
    BN_FN(grad_apply_span_)(g, x, y, 0, len, mu, a, bx, c0);
}

static void BN_FN(grad_apply_planar_)(const bn_context *k, ptrdiff_t t)
{
    const bn_planar_task u = bn_planar_task_of(&k->grid, &k->geo, t);
    const ptrdiff_t c = u.channel;
    for (ptrdiff_t n = u.row0; n < u.row1; n++) {
        const BN_T *x = (const BN_T *)k->x.data + n * k->x.outer_stride + c * k->x.channel_stride
                        + u.offset;
        const BN_T *g = (const BN_T *)k->g.data + n * k->g.outer_stride + c * k->g.channel_stride
                        + u.offset;
        BN_T *y = (BN_T *)k->y.data + n * k->y.outer_stride + c * k->y.channel_stride + u.offset;
        BN_FN(grad_apply_run_)(g, x, y, u.len, k->mean[c], k->scale[c], k->coef_x[c], k->shift[c],
                               k->stream);
    }
    BN_FN(stream_fence_)(k->stream);
}

static void BN_FN(grad_apply_rows_)(const bn_context *k, ptrdiff_t t)
{
    const bn_rows_task u = bn_rows_task_of(&k->grid, &k->geo, t);
    const double *mu = k->mean, *a = k->scale, *bx = k->coef_x, *c0 = k->shift;
    const ptrdiff_t xs = k->x.outer_stride, gs = k->g.outer_stride, ys = k->y.outer_stride;
    const BN_T *x0 = (const BN_T *)k->x.data, *g0 = (const BN_T *)k->g.data;
    BN_T *y0 = (BN_T *)k->y.data; /* may alias g or x */
#define BN_GRAD_S(g, x, c) (BN_T)((double)(g) * a[c] + (((double)(x) - mu[c]) * bx[c] + c0[c]))
    ptrdiff_t r = u.row0;
#if BN_VECTORS
    if (!k->stream) { /* streaming stores go row by row: whole lines per row */
        for (; r + BN_ROWS <= u.row1; r += BN_ROWS) {
            const BN_T *x = x0 + r * xs, *g = g0 + r * gs;
            BN_T *y = y0 + r * ys;
            ptrdiff_t c = u.c0;
            for (; c + 2 * W <= u.c1; c += 2 * W) {
                const VD m0 = BN_LDD(mu + c), m1 = BN_LDD(mu + c + W);
                const VD a0 = BN_LDD(a + c), a1 = BN_LDD(a + c + W);
                const VD x0c = BN_LDD(bx + c), x1c = BN_LDD(bx + c + W);
                const VD k0 = BN_LDD(c0 + c), k1 = BN_LDD(c0 + c + W);
                for (int q = 0; q < BN_ROWS; q++) {
                    const VD p0 = BN_LD(g + q * gs + c) * a0 + ((BN_LD(x + q * xs + c) - m0) * x0c + k0);
                    const VD p1 = BN_LD(g + q * gs + c + W) * a1
                                  + ((BN_LD(x + q * xs + c + W) - m1) * x1c + k1);
                    BN_ST(y + q * ys + c, p0);
                    BN_ST(y + q * ys + c + W, p1);
                }
            }
            for (; c < u.c1; c++)
                for (int q = 0; q < BN_ROWS; q++)
                    y[q * ys + c] = BN_GRAD_S(g[q * gs + c], x[q * xs + c], c);
        }
    }
#endif
    for (; r < u.row1; r++) {
        const BN_T *x = x0 + r * xs, *g = g0 + r * gs;
        BN_T *y = y0 + r * ys;
        ptrdiff_t c = u.c0;
#if BN_VECTORS
#define BN_GRAD_VEC(c)                                                                          \
    (BN_LD(g + (c)) * BN_LDD(a + (c))                                                         \
     + ((BN_LD(x + (c)) - BN_LDD(mu + (c))) * BN_LDD(bx + (c)) + BN_LDD(c0 + (c))))
#if BN_CAN_STREAM
        ptrdiff_t peel;
        if (k->stream && (peel = BN_FN(line_peel_)(y + c)) >= 0 && peel + BN_LINE_ELEMS <= u.c1 - c) {
            const ptrdiff_t e = c + peel;
            for (; c + W <= e; c += W) BN_ST(y + c, BN_GRAD_VEC(c));
            for (; c < e; c++) y[c] = BN_GRAD_S(g[c], x[c], c);
            for (const ptrdiff_t e2 = c + (u.c1 - c) / BN_LINE_ELEMS * BN_LINE_ELEMS; c < e2; c += 2 * W) {
                const VD p = BN_GRAD_VEC(c), q = BN_GRAD_VEC(c + W);
                BN_STREAM2(y + c, p, q);
            }
        }
#endif
        for (; c + 2 * W <= u.c1; c += 2 * W) {
            const VD p = BN_GRAD_VEC(c), q = BN_GRAD_VEC(c + W);
            BN_ST(y + c, p);
            BN_ST(y + c + W, q);
        }
        for (; c + W <= u.c1; c += W) BN_ST(y + c, BN_GRAD_VEC(c));
#undef BN_GRAD_VEC
#endif
        for (; c < u.c1; c++) y[c] = BN_GRAD_S(g[c], x[c], c);
    }
#undef BN_GRAD_S
    BN_FN(stream_fence_)(k->stream);
}

/* Training backward, short planar runs with streaming: as affine_span_task_. */
static inline void BN_FN(grad_span_plain_)(const bn_context *k, const BN_T *g, const BN_T *x,
                                           BN_T *y, ptrdiff_t ca, ptrdiff_t i0, ptrdiff_t i1)
{
    const ptrdiff_t inner = k->geo.inner;
    while (i0 < i1) {
        const ptrdiff_t j = i0 / inner, end = bn_min(i1, (j + 1) * inner);
        const ptrdiff_t c = ca + j;
        BN_FN(grad_apply_span_)(g, x, y, i0, end, k->mean[c], k->scale[c], k->coef_x[c], k->shift[c]);
        i0 = end;
    }
}

static void BN_FN(grad_span_task_)(const bn_context *k, ptrdiff_t c0, ptrdiff_t c1, ptrdiff_t t)
{
#if BN_VECTORS && BN_CAN_STREAM
    const ptrdiff_t inner = k->geo.inner, chunk = BN_FN(span_chunk_)(k);
    const ptrdiff_t chunks = bn_ceil_div(c1 - c0, chunk);
    const ptrdiff_t n = t / chunks, ca = c0 + (t % chunks) * chunk, cb = bn_min(c1, ca + chunk);
    const BN_T *x = (const BN_T *)k->x.data + n * k->x.outer_stride + ca * inner;
    const BN_T *g = (const BN_T *)k->g.data + n * k->g.outer_stride + ca * inner;
    BN_T *y = (BN_T *)k->y.data + n * k->y.outer_stride + ca * inner;
    const ptrdiff_t len = (cb - ca) * inner;
    const ptrdiff_t peel = BN_FN(line_peel_)(y);
    if (peel < 0 || peel + BN_LINE_ELEMS > len) {
        BN_FN(grad_span_plain_)(k, g, x, y, ca, 0, len);
        return;
    }
    const ptrdiff_t end = peel + (len - peel) / BN_LINE_ELEMS * BN_LINE_ELEMS;
    BN_FN(grad_span_plain_)(k, g, x, y, ca, 0, peel);
    ptrdiff_t jf = peel / inner, bound = (jf + 1) * inner;
    for (ptrdiff_t i = peel; i < end; i += BN_LINE_ELEMS) {
        while (i >= bound) {
            jf++;
            bound += inner;
        }
        if (i + BN_LINE_ELEMS <= bound) {
            const ptrdiff_t c = ca + jf;
            const VD vmu = BN_SPLAT(k->mean[c]), va = BN_SPLAT(k->scale[c]);
            const VD vbx = BN_SPLAT(k->coef_x[c]), vc = BN_SPLAT(k->shift[c]);
            for (ptrdiff_t e = i; e < i + BN_LINE_ELEMS; e += 2 * W)
                BN_STREAM2(y + e, BN_LD(g + e) * va + ((BN_LD(x + e) - vmu) * vbx + vc),
                           BN_LD(g + e + W) * va + ((BN_LD(x + e + W) - vmu) * vbx + vc));
        } else {
            BN_T line[BN_LINE_ELEMS] __attribute__((aligned(64)));
            for (ptrdiff_t e = 0, c = ca + jf; e < BN_LINE_ELEMS; e++) {
                if (i + e == bound) c++;
                line[e] = (BN_T)((double)g[i + e] * k->scale[c]
                                 + (((double)x[i + e] - k->mean[c]) * k->coef_x[c] + k->shift[c]));
            }
            for (ptrdiff_t e = 0; e < BN_LINE_ELEMS; e += 2 * W)
                BN_STREAM2(y + i + e, BN_LD(line + e), BN_LD(line + e + W));
        }
    }
    BN_FN(grad_span_plain_)(k, g, x, y, ca, end, len);
    BN_FN(stream_fence_)(1);
#else
    (void)k;
    (void)c0;
    (void)c1;
    (void)t;
#endif
}

/* ---- per-channel finishing steps between the phases ---------------------
 * Channels [c0, c1): merge the partials of every channel in partial order
 * (the weights are shared, so the loop runs across channels), then derive
 * the op's outputs and coefficients. */
#define BN_FINISH_BLOCK 64

static void BN_FN(finish_block_)(bn_context *k, ptrdiff_t c0, ptrdiff_t c1)
{
    const ptrdiff_t P = k->grid.partial_rows, C = k->geo.channels, nc = c1 - c0;
    double a_[BN_FINISH_BLOCK], b_[BN_FINISH_BLOCK];
    double *restrict a = a_, *restrict b = b_;
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
    const double n = (double)(k->geo.outer * k->geo.inner);
    for (ptrdiff_t j = 0; j < nc; j++) {
        const ptrdiff_t c = c0 + j;
        if (k->op == BN_OP_MOMENTS) {
            k->out_count[c] = n;
            k->out_mean[c] = a[j];
            k->out_m2[c] = b[j];
        } else if (k->op == BN_OP_FORWARD) {
            const BN_T *weight = (const BN_T *)k->weight, *bias = (const BN_T *)k->bias;
            BN_T *rm = (BN_T *)k->running_mean, *rv = (BN_T *)k->running_var;
            const double mean = a[j], m2 = b[j];
            const double invstd = 1.0 / sqrt(m2 / n + k->eps);
            ((BN_T *)k->save_mean)[c] = (BN_T)mean;
            ((BN_T *)k->save_invstd)[c] = (BN_T)invstd;
            if (rm) { /* written back by the entry point once nothing can fail */
                const double m = k->momentum;
                k->next_mean[c] = (1.0 - m) * (double)rm[c] + m * mean;
                k->next_var[c] = (1.0 - m) * (double)rv[c] + m * (m2 / (n - 1.0));
            }
            k->mean[c] = mean;
            k->scale[c] = (weight ? (double)weight[c] : 1.0) * invstd;
            k->shift[c] = bias ? (double)bias[c] : 0.0;
        } else {
            const double sum_g = a[j], sum_gx = b[j];
            const BN_T *weight = (const BN_T *)k->weight;
            const double invstd = (double)((const BN_T *)k->save_invstd_in)[c];
            const double s = (weight ? (double)weight[c] : 1.0) * invstd;
            ((BN_T *)k->grad_bias)[c] = (BN_T)sum_g;
            ((BN_T *)k->grad_weight)[c] = (BN_T)(sum_gx * invstd);
            k->scale[c] = s;
            if (k->training) {
                k->coef_x[c] = -s * invstd * invstd * sum_gx / n;
                k->shift[c] = -s * sum_g / n;
            } else {
                /* constants: grad_in = g * weight * invstd through the affine
                 * phase on g with mean 0 (x is not read: an inf in x must
                 * not turn into 0 * inf) */
                k->coef_x[c] = 0.0;
                k->shift[c] = 0.0;
            }
        }
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

static void BN_FN(phase_c_)(const bn_context *k, ptrdiff_t t)
{
    if (k->op == BN_OP_BACKWARD && k->training) {
        if (k->grid.channels_last) BN_FN(grad_apply_rows_)(k, t);
        else BN_FN(grad_apply_planar_)(k, t);
    } else {
        if (k->grid.channels_last) BN_FN(affine_rows_)(k, t);
        else BN_FN(affine_planar_)(k, t);
    }
}

/* The op's phases, run by every thread of a team (or by one, outside any
 * parallel region, where the worksharing loops below run serially):
 *   A  statistics / gradient sums of a group of channels (partials per task),
 *   B  per-channel finish: ordered merge of the partials, coefficients,
 *   C  normalize / gradient apply of the same group.
 * The static schedules give a thread the same tasks in A and C, so C reads
 * what A brought into that core's cache.  C of one group touches only its own
 * channels, so the next group's A may start without waiting. */
static void BN_FN(exec_body_)(bn_context *k)
{
    const ptrdiff_t C = k->geo.channels;
    const int reduce = k->op != BN_OP_INFERENCE, apply = k->op != BN_OP_MOMENTS;
    const ptrdiff_t per = k->grid.channels_last ? 0 : k->grid.partial_rows;
    const ptrdiff_t gch = k->grid.channels_last ? C : k->group_channels;
    const int spans = BN_FN(use_spans_)(k);
    for (ptrdiff_t c0 = 0; c0 < C; c0 += gch) {
        const ptrdiff_t c1 = bn_min(C, c0 + gch);
        const ptrdiff_t t0 = per * c0, t1 = per ? per * c1 : k->grid.ntasks;
        if (reduce) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (ptrdiff_t t = t0; t < t1; t++)
                if (!bn_stopped(k)) BN_FN(phase_a_)(k, t);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (ptrdiff_t b = c0; b < c1; b += BN_FINISH_BLOCK)
                if (!bn_flag_load(&k->stop)) BN_FN(finish_block_)(k, b, bn_min(c1, b + BN_FINISH_BLOCK));
        }
        if (apply && spans) {
            const ptrdiff_t nspan = k->geo.outer * bn_ceil_div(c1 - c0, BN_FN(span_chunk_)(k));
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
            for (ptrdiff_t t = 0; t < nspan; t++) {
                if (bn_stopped(k)) continue;
                if (k->op == BN_OP_BACKWARD && k->training) BN_FN(grad_span_task_)(k, c0, c1, t);
                else BN_FN(affine_span_task_)(k, c0, c1, t);
            }
        } else if (apply) {
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
            for (ptrdiff_t t = t0; t < t1; t++)
                if (!bn_stopped(k)) BN_FN(phase_c_)(k, t);
        }
    }
}

/* Runs the op; returns BN_OK or BN_ERR_INTERRUPTED. */
static int BN_FN(exec_)(bn_context *k)
{
    const int nthreads = k->run->nthreads;
    const ptrdiff_t elements = k->geo.outer * k->geo.channels * k->geo.inner;
    const size_t bytes = (size_t)elements * sizeof(BN_T);
    k->stream = bytes > k->stream_bytes;
    k->group_channels = k->geo.channels;
    if (!k->grid.channels_last && (k->op == BN_OP_FORWARD || k->op == BN_OP_BACKWARD)) {
        const size_t per_channel = (size_t)(k->geo.outer * k->geo.inner) * sizeof(BN_T)
                                   * (k->op == BN_OP_BACKWARD ? 2 : 1);
        k->group_channels = bn_max(1, (ptrdiff_t)(BN_GROUP_BYTES / per_channel));
    }
#ifdef _OPENMP
    if (nthreads > 1 && k->grid.ntasks > 1 && elements >= BN_PARALLEL_MIN_ELEMS) {
        const int nt = k->grid.ntasks < nthreads ? (int)k->grid.ntasks : nthreads;
#pragma omp parallel num_threads(nt)
        BN_FN(exec_body_)(k);
    } else
#else
    (void)nthreads;
#endif
    BN_FN(exec_body_)(k);
    return k->stop ? BN_ERR_INTERRUPTED : BN_OK;
}

/* Scratch: the stack for small calls, else one malloc. */
#define BN_SCRATCH(k, arrays)                                                        \
    double stack_[BN_STACK_DOUBLES];                                                 \
    if (bn_context_alloc(&(k), (arrays),                                             \
                         bn_context_doubles(&(k), (arrays)) <= BN_STACK_DOUBLES ? stack_ \
                                                                                 : NULL) \
        != 0)                                                                        \
        return BN_ERR_NOMEM;

/* ---- the public entry points ------------------------------------------- */

/* Per-channel Welford state of x into count/mean/m2 (length channels). */
static inline int BN_FN(bn_moments_)(const bn_geometry *geo, bn_array x, double *count,
                                     double *mean, double *m2, const bn_run *run)
{
    bn_context k = bn_context_new(geo, x, run);
    BN_SCRATCH(k, 1)
    k.op = BN_OP_MOMENTS;
    k.out_count = count;
    k.out_mean = mean;
    k.out_m2 = m2;
    const int status = BN_FN(exec_)(&k);
    bn_context_free(&k);
    return status;
}

/* Training forward: batch statistics, running-statistics update, normalize. */
static inline int BN_FN(bn_forward_train_)(const bn_geometry *geo, bn_array x, bn_array y,
                                           const BN_T *weight, const BN_T *bias,
                                           BN_T *running_mean, BN_T *running_var,
                                           double momentum, double eps, BN_T *save_mean,
                                           BN_T *save_invstd, const bn_run *run)
{
    bn_context k = bn_context_new(geo, x, run);
    BN_SCRATCH(k, 1)
    k.op = BN_OP_FORWARD;
    k.y = y;
    k.weight = weight;
    k.bias = bias;
    k.running_mean = running_mean;
    k.running_var = running_var;
    k.momentum = momentum;
    k.eps = eps;
    k.save_mean = save_mean;
    k.save_invstd = save_invstd;
    const int status = BN_FN(exec_)(&k);
    if (status == BN_OK && running_mean)
        for (ptrdiff_t c = 0; c < geo->channels; c++) {
            running_mean[c] = (BN_T)k.next_mean[c];
            running_var[c] = (BN_T)k.next_var[c];
        }
    bn_context_free(&k);
    return status;
}

/* Inference: normalize with the running statistics. */
static inline int BN_FN(bn_inference_)(const bn_geometry *geo, bn_array x, bn_array y,
                                       const BN_T *running_mean, const BN_T *running_var,
                                       const BN_T *weight, const BN_T *bias, double eps,
                                       const bn_run *run)
{
    bn_context k = bn_context_new(geo, x, run);
    BN_SCRATCH(k, 0)
    k.op = BN_OP_INFERENCE;
    k.y = y;
    for (ptrdiff_t c = 0; c < geo->channels; c++) {
        k.mean[c] = (double)running_mean[c];
        k.scale[c] = (weight ? (double)weight[c] : 1.0) / sqrt((double)running_var[c] + eps);
        k.shift[c] = bias ? (double)bias[c] : 0.0;
    }
    const int status = BN_FN(exec_)(&k);
    bn_context_free(&k);
    return status;
}

/* Backward.  training: the full gradient through the batch statistics;
 * otherwise the statistics are constants.  grad_in may alias grad_out or x. */
static inline int BN_FN(bn_backward_)(const bn_geometry *geo, bn_array grad_out, bn_array x,
                                      bn_array grad_in, const BN_T *save_mean,
                                      const BN_T *save_invstd, const BN_T *weight, int training,
                                      BN_T *grad_weight, BN_T *grad_bias, const bn_run *run)
{
    bn_context k = bn_context_new(geo, x, run);
    BN_SCRATCH(k, 1)
    k.op = BN_OP_BACKWARD;
    k.g = grad_out;
    k.y = grad_in;
    k.weight = weight;
    k.save_mean_in = save_mean;
    k.save_invstd_in = save_invstd;
    k.training = training;
    k.grad_weight = grad_weight;
    k.grad_bias = grad_bias;
    for (ptrdiff_t c = 0; c < geo->channels; c++) k.mean[c] = (double)save_mean[c];
    if (!training) {
        k.ax = grad_out;     /* the affine phase reads g ... */
        k.amean = k.coef_x;  /* ... with mean 0 (finish_block_ zeroes coef_x) */
    }
    const int status = BN_FN(exec_)(&k);
    bn_context_free(&k);
    return status;
}

#undef BN_SCRATCH
#undef BN_SPAN_INNER
#undef BN_ROW_BLOCK
#undef BN_LINE_ELEMS
#undef BN_ROWS
#undef BN_FINISH_BLOCK
#undef BN_LD
#undef BN_LDD
#undef BN_ST
#undef BN_SPLAT
#undef BN_STREAM2
#undef BN_CAN_STREAM
#undef VD
#undef VT
#undef W
#undef BN_U
#undef BN_FN
#undef BN_CAT
#undef BN_CAT_
