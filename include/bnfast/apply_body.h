/* The apply phase of every op, written once: y = f(g, x; coefficients of the
 * channel), element by element, in BN_AT arithmetic (elements of BN_T
 * converted on load and store, storage.h).  kernel_body.h includes it
 * once per operation, after defining
 *   BN_APPLY       the name token of the operation (affine, grad, ...),
 *   BN_APPLY_X     the bn_array field of the context read as x,
 *   BN_APPLY_G     1 if the op reads a second input k->g, else 0,
 *   BN_APPLY_INNER 1 if the op also reads weight and bias per inner element
 *                  (layer norm; planar only), else 0,
 *   BN_APPLY_EXPR(g, x, K, wi, bi)  the per-element expression, with K a
 *                  coefficient set and wi, bi the inner weight and bias
 *                  (scalars or vectors: the same expression serves both).
 * No include guard on purpose.
 *
 * Coefficients are per channel (see BN_FN(coef_) in kernel_body.h): the mean
 * as a pair mh + ml of BN_AT, so that x - mean is formed in the centred form
 * (x - mh) - ml without cancelling when the mean is large; then scale/shift
 * terms rounded once to BN_AT.  Vector loops and scalar tails evaluate the
 * same expression (with the same contraction into FMAs), so which elements a
 * vector covers never changes a result. */

#define BN_AFN(name) BN_FN(BN_CAT(BN_CAT(apply_, BN_APPLY), BN_CAT(_, name)))

/* One element, scalar: the tails of the vector loops. */
static BN_ALWAYS_INLINE BN_T BN_AFN(one_)(const bn_context *k, const BN_T *g, const BN_T *x,
                                          ptrdiff_t i, ptrdiff_t c, const BN_AT *w, const BN_AT *b)
{
    const BN_FN(coef_) K = BN_FN(coef_at_)(k, c);
    (void)g, (void)w, (void)b;
    return BN_FROM_A(BN_APPLY_EXPR(BN_APPLY_G ? BN_TO_A(g[i]) : (BN_AT)0, BN_TO_A(x[i]), K,
                                   BN_APPLY_INNER ? w[i] : (BN_AT)0, BN_APPLY_INNER ? b[i] : (BN_AT)0));
}

/* Elements [0, n) of a span of g/x/y.  per_lane == 0: every element belongs
 * to channel c (a planar run); per_lane == 1: element i belongs to channel
 * c + i (a channels-last row).  Streaming stores write whole lines from y's
 * first line boundary on; the rest uses ordinary stores.  next_x, next_g
 * (planar runs, else NULL): as it goes, the span prefetches as many elements
 * from there into L2, where the next channel group's reduction will read
 * them (BN_AFN(planar_)). */
static BN_ALWAYS_INLINE void BN_AFN(span_)(const bn_context *k, const BN_T *g, const BN_T *x,
                                           BN_T *y, ptrdiff_t n, ptrdiff_t c, const int per_lane,
                                           const BN_AT *w, const BN_AT *b, const BN_T *next_x,
                                           const BN_T *next_g)
{
    (void)g, (void)w, (void)b, (void)next_x, (void)next_g;
    ptrdiff_t i = 0;
#if defined(__GNUC__) || defined(__clang__)
#define BN_AHEAD_(i)                                                                               \
    if (next_x) {                                                                                  \
        __builtin_prefetch(next_x + (i), 0, 2);                                                    \
        if (next_g) __builtin_prefetch(next_g + (i), 0, 2);                                        \
    }
#else
#define BN_AHEAD_(i)
#endif
#if BN_VECTORS
    const BN_FN(coefv_) fixed = per_lane ? BN_FN(coefv_zero_)() : BN_FN(coefv_splat_)(k, c);
#define BN_AVEC(i) \
    BN_APPLY_EXPR(BN_APPLY_G ? BN_LDA(g + (i)) : BN_SPLATA(0), BN_LDA(x + (i)), \
                  per_lane ? BN_FN(coefv_load_)(k, c + (i)) : fixed, \
                  BN_APPLY_INNER ? BN_LDP(w + (i)) : BN_SPLATA(0), \
                  BN_APPLY_INNER ? BN_LDP(b + (i)) : BN_SPLATA(0))
#if BN_CAN_STREAM
    ptrdiff_t peel;
    if (k->stream && (peel = BN_FN(line_peel_)(y)) >= 0 && peel + BN_LINE_T <= n) {
        const ptrdiff_t end = peel + (n - peel) / BN_LINE_T * BN_LINE_T;
        for (; i + WA <= peel; i += WA) BN_STA(y + i, BN_AVEC(i));
        for (; i < peel; i++) y[i] = BN_AFN(one_)(k, g, x, i, c + (per_lane ? i : 0), w, b);
        for (; i < end; i += WA) {
            BN_AHEAD_(i)
            BN_STREAMA(y + i, BN_AVEC(i));
        }
    }
#endif
    for (; i + 2 * WA <= n; i += 2 * WA) {
        BN_AHEAD_(i)
        BN_AHEAD_(i + WA)
        const BN_FN(va_) p = BN_AVEC(i), q = BN_AVEC(i + WA);
        BN_STA(y + i, p); /* y may alias x or g element for element */
        BN_STA(y + i + WA, q);
    }
    for (; i + WA <= n; i += WA) BN_STA(y + i, BN_AVEC(i));
#undef BN_AVEC
#endif
#undef BN_AHEAD_
    for (; i < n; i++) y[i] = BN_AFN(one_)(k, g, x, i, c + (per_lane ? i : 0), w, b);
}

/* Planar task t of the channel group [c0, c1): per run, the channel's
 * constant coefficients over contiguous elements.  A training forward or
 * backward reduces the next group of channels, as many as this one, right
 * after (exec_body_): beyond the cache, the task prefetches the same rows and
 * elements of the channel c1 - c0 on from each of its own, so that the
 * memory bus reads that group while this one's output is written. */
static void BN_AFN(planar_)(const bn_context *k, ptrdiff_t c0, ptrdiff_t c1, ptrdiff_t t)
{
    const bn_apply_task u = bn_apply_task_of(&k->geo, c0, c1, t);
    const bn_array xa = k->BN_APPLY_X;
    /* cache groups (prepare_ forms them only beyond the last-level cache):
     * the next group comes from DRAM (0.88-0.96 of the time for 26-100 MB
     * that do not stream, Zen 4).  exec_blocks_'s key blocks, which are not
     * groups, measured slower with the prefetch (layer norm (4096,768) and
     * group norm (32,256,28,28) 1.04-1.10x the time). */
    const int grouped = k->group_channels < k->geo.channels;
    for (ptrdiff_t c = u.c0; c < u.c1; c++) {
        const ptrdiff_t cn = c + (c1 - c0); /* its channel in the next group */
        const int ahead = grouped && cn < k->geo.channels;
        const BN_T *x = (const BN_T *)xa.data + u.row * xa.outer_stride + c * xa.channel_stride + u.i0;
        const BN_T *g = BN_APPLY_G ? (const BN_T *)k->g.data + u.row * k->g.outer_stride
                                         + c * k->g.channel_stride + u.i0
                                   : NULL;
        BN_T *y = (BN_T *)k->y.data + u.row * k->y.outer_stride + c * k->y.channel_stride + u.i0;
        BN_AFN(span_)(k, g, x, y, u.i1 - u.i0, c, 0,
                      BN_APPLY_INNER ? (const BN_AT *)k->weight + u.i0 : NULL,
                      BN_APPLY_INNER && k->bias ? (const BN_AT *)k->bias + u.i0 : NULL,
                      ahead ? (const BN_T *)k->x.data + u.row * k->x.outer_stride + cn * k->x.channel_stride + u.i0
                            : NULL,
                      ahead && k->op == BN_OP_BACKWARD ? (const BN_T *)k->g.data + u.row * k->g.outer_stride
                                                             + cn * k->g.channel_stride + u.i0
                                                       : NULL);
    }
    BN_FN(stream_fence_)(k->stream);
}

#if !BN_APPLY_INNER

/* Channels-last task t: each row of the task is one span over its channels.
 * For the affine op, rows of few channels that follow each other in memory
 * go coef_rows at a time (the coefficients repeat that often): 1.0-4.9x
 * faster for 3 to 64 channels on AVX-512.  Ops with a second input (the
 * gradient, a residual) do so only for rows shorter than two vectors, whose
 * row-by-row loop is all tails: 2.3x faster for 3 channels and 1.3x for 16,
 * but 1.4x slower for 64 (AVX-512, float32 backward; not understood yet). */
static void BN_AFN(rows_)(const bn_context *k, ptrdiff_t t)
{
    const bn_rows_task u = bn_rows_task_of(&k->grid, &k->geo, t);
    const bn_array xa = k->BN_APPLY_X;
    const ptrdiff_t C = k->geo.channels, R = k->coef_rows;
    ptrdiff_t r = u.row0;
    if (R > 1 && xa.outer_stride == C && k->y.outer_stride == C
        && (!BN_APPLY_G || (k->g.outer_stride == C && C < 2 * WA))) {
        for (; r < u.row1; r += R) {
            const ptrdiff_t rows = bn_min(R, u.row1 - r);
            BN_AFN(span_)(k, BN_APPLY_G ? (const BN_T *)k->g.data + r * C : NULL,
                          (const BN_T *)xa.data + r * C, (BN_T *)k->y.data + r * C, rows * C, 0, 1, NULL,
                          NULL, NULL, NULL);
        }
    }
    for (; r < u.row1; r++) {
        const BN_T *x = (const BN_T *)xa.data + r * xa.outer_stride + u.c0;
        const BN_T *g = BN_APPLY_G ? (const BN_T *)k->g.data + r * k->g.outer_stride + u.c0 : NULL;
        BN_T *y = (BN_T *)k->y.data + r * k->y.outer_stride + u.c0;
        BN_AFN(span_)(k, g, x, y, u.c1 - u.c0, u.c0, 1, NULL, NULL, NULL, NULL);
    }
}
#endif

#undef BN_AFN
