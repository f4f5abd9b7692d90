/* Batch-norm kernels, written once and instantiated per element type by
 * kernels.h: define BN_T (the element type) and BN_SFX (the name suffix),
 * then include this file.  No include guard on purpose. */

#define BN_CAT_(a, b) a##b
#define BN_CAT(a, b) BN_CAT_(a, b)
#define BN_FN(name) BN_CAT(name, BN_SFX)

/* Lanes of the vectorized loops: independent accumulators that share one
 * count, so Welford needs one division per LANES elements and the compiler
 * maps the lane arrays onto SIMD registers without reassociating anything. */
#define BN_LANES 16

/* Welford over a contiguous run of at most BN_BLOCK elements. */
static inline bn_welford BN_FN(bn_welford_block_)(const BN_T *x, ptrdiff_t n)
{
    double mean[BN_LANES] = {0}, m2[BN_LANES] = {0};
    const ptrdiff_t steps = n / BN_LANES;
    for (ptrdiff_t k = 0; k < steps; k++) {
        const double r = 1.0 / (double)(k + 1);
        const BN_T *v = x + k * BN_LANES;
        for (int l = 0; l < BN_LANES; l++) {
            const double xv = (double)v[l];
            const double d = xv - mean[l];
            mean[l] += d * r;
            m2[l] += d * (xv - mean[l]);
        }
    }
    bn_welford acc = {0.0, 0.0, 0.0};
    if (steps > 0) {
        for (int l = 0; l < BN_LANES; l++)
            bn_welford_merge(&acc, (bn_welford){(double)steps, mean[l], m2[l]});
    }
    bn_welford tail = {0.0, 0.0, 0.0};
    for (ptrdiff_t i = steps * BN_LANES; i < n; i++) {
        const double xv = (double)x[i];
        tail.count += 1.0;
        const double d = xv - tail.mean;
        tail.mean += d / tail.count;
        tail.m2 += d * (xv - tail.mean);
    }
    bn_welford_merge(&acc, tail);
    return acc;
}

static inline bn_welford BN_FN(bn_welford_run_)(const BN_T *x, ptrdiff_t n)
{
    bn_welford acc = {0.0, 0.0, 0.0};
    for (ptrdiff_t start = 0; start < n; start += BN_BLOCK)
        bn_welford_merge(&acc, BN_FN(bn_welford_block_)(x + start, bn_min(BN_BLOCK, n - start)));
    return acc;
}

/* ---- statistics ------------------------------------------------------ */

static void BN_FN(bn_planar_stats_task_)(const void *vctx, ptrdiff_t t)
{
    const bn_context *k = (const bn_context *)vctx;
    const bn_planar_task u = bn_planar_task_of(&k->grid, &k->geo, t);
    const BN_T *base = (const BN_T *)k->x.data + u.channel * k->x.channel_stride + u.offset;
    bn_welford acc = {0.0, 0.0, 0.0};
    for (ptrdiff_t n = u.row0; n < u.row1; n++)
        bn_welford_merge(&acc, BN_FN(bn_welford_run_)(base + n * k->x.outer_stride, u.len));
    const ptrdiff_t i = u.prow * k->geo.channels + u.channel;
    k->part.count[i] = acc.count;
    k->part.mean[i] = acc.mean;
    k->part.m2[i] = acc.m2;
}

static void BN_FN(bn_rows_stats_task_)(const void *vctx, ptrdiff_t t)
{
    const bn_context *k = (const bn_context *)vctx;
    const bn_rows_task u = bn_rows_task_of(&k->grid, &k->geo, t);
    const ptrdiff_t at = u.prow * k->geo.channels;
    double *restrict mean = k->part.mean + at;
    double *restrict m2 = k->part.m2 + at;
    for (ptrdiff_t c = u.c0; c < u.c1; c++) {
        mean[c] = 0.0;
        m2[c] = 0.0;
        k->part.count[at + c] = (double)(u.row1 - u.row0);
    }
    for (ptrdiff_t r = u.row0; r < u.row1; r++) {
        const double rk = 1.0 / (double)(r - u.row0 + 1);
        const BN_T *restrict row = (const BN_T *)k->x.data + r * k->x.outer_stride;
        for (ptrdiff_t c = u.c0; c < u.c1; c++) {
            const double xv = (double)row[c];
            const double d = xv - mean[c];
            mean[c] += d * rk;
            m2[c] += d * (xv - mean[c]);
        }
    }
}

/* ---- y = (x - mean) * scale + shift, per channel, in double ------------ */

static void BN_FN(bn_planar_affine_task_)(const void *vctx, ptrdiff_t t)
{
    const bn_context *k = (const bn_context *)vctx;
    const bn_planar_task u = bn_planar_task_of(&k->grid, &k->geo, t);
    const double mu = k->mean[u.channel], s = k->scale[u.channel], b = k->shift[u.channel];
    for (ptrdiff_t n = u.row0; n < u.row1; n++) {
        const BN_T *restrict x = (const BN_T *)k->x.data + n * k->x.outer_stride
                                 + u.channel * k->x.channel_stride + u.offset;
        BN_T *restrict y = (BN_T *)k->y.data + n * k->y.outer_stride
                           + u.channel * k->y.channel_stride + u.offset;
        for (ptrdiff_t i = 0; i < u.len; i++)
            y[i] = (BN_T)(((double)x[i] - mu) * s + b);
    }
}

static void BN_FN(bn_rows_affine_task_)(const void *vctx, ptrdiff_t t)
{
    const bn_context *k = (const bn_context *)vctx;
    const bn_rows_task u = bn_rows_task_of(&k->grid, &k->geo, t);
    const double *restrict mu = k->mean, *restrict s = k->scale, *restrict b = k->shift;
    for (ptrdiff_t r = u.row0; r < u.row1; r++) {
        const BN_T *restrict x = (const BN_T *)k->x.data + r * k->x.outer_stride;
        BN_T *restrict y = (BN_T *)k->y.data + r * k->y.outer_stride;
        for (ptrdiff_t c = u.c0; c < u.c1; c++)
            y[c] = (BN_T)(((double)x[c] - mu[c]) * s[c] + b[c]);
    }
}

/* ---- backward: per-channel sum(g) and sum(g * (x - mean)) --------------- */

static void BN_FN(bn_planar_grad_sums_task_)(const void *vctx, ptrdiff_t t)
{
    const bn_context *k = (const bn_context *)vctx;
    const bn_planar_task u = bn_planar_task_of(&k->grid, &k->geo, t);
    const double mu = k->mean[u.channel];
    double sg[BN_LANES] = {0}, sgx[BN_LANES] = {0};
    for (ptrdiff_t n = u.row0; n < u.row1; n++) {
        const BN_T *restrict x = (const BN_T *)k->x.data + n * k->x.outer_stride
                                 + u.channel * k->x.channel_stride + u.offset;
        const BN_T *restrict g = (const BN_T *)k->g.data + n * k->g.outer_stride
                                 + u.channel * k->g.channel_stride + u.offset;
        const ptrdiff_t body = u.len - u.len % BN_LANES;
        for (ptrdiff_t i = 0; i < body; i += BN_LANES) {
            for (int l = 0; l < BN_LANES; l++) {
                const double gv = (double)g[i + l];
                sg[l] += gv;
                sgx[l] += gv * ((double)x[i + l] - mu);
            }
        }
        for (ptrdiff_t i = body; i < u.len; i++) {
            const double gv = (double)g[i];
            sg[i - body] += gv;
            sgx[i - body] += gv * ((double)x[i] - mu);
        }
    }
    double total_g = 0.0, total_gx = 0.0;
    for (int l = 0; l < BN_LANES; l++) {
        total_g += sg[l];
        total_gx += sgx[l];
    }
    const ptrdiff_t i = u.prow * k->geo.channels + u.channel;
    k->part.mean[i] = total_g;
    k->part.m2[i] = total_gx;
}

static void BN_FN(bn_rows_grad_sums_task_)(const void *vctx, ptrdiff_t t)
{
    const bn_context *k = (const bn_context *)vctx;
    const bn_rows_task u = bn_rows_task_of(&k->grid, &k->geo, t);
    const ptrdiff_t at = u.prow * k->geo.channels;
    double *restrict sg = k->part.mean + at;
    double *restrict sgx = k->part.m2 + at;
    const double *restrict mu = k->mean;
    for (ptrdiff_t c = u.c0; c < u.c1; c++) {
        sg[c] = 0.0;
        sgx[c] = 0.0;
    }
    for (ptrdiff_t r = u.row0; r < u.row1; r++) {
        const BN_T *restrict x = (const BN_T *)k->x.data + r * k->x.outer_stride;
        const BN_T *restrict g = (const BN_T *)k->g.data + r * k->g.outer_stride;
        for (ptrdiff_t c = u.c0; c < u.c1; c++) {
            const double gv = (double)g[c];
            sg[c] += gv;
            sgx[c] += gv * ((double)x[c] - mu[c]);
        }
    }
}

/* ---- backward: grad_in = g * scale + (x - mean) * coef_x + shift -------- */

static void BN_FN(bn_planar_grad_apply_task_)(const void *vctx, ptrdiff_t t)
{
    const bn_context *k = (const bn_context *)vctx;
    const bn_planar_task u = bn_planar_task_of(&k->grid, &k->geo, t);
    const double mu = k->mean[u.channel], a = k->scale[u.channel];
    const double bx = k->coef_x[u.channel], c0 = k->shift[u.channel];
    for (ptrdiff_t n = u.row0; n < u.row1; n++) {
        const ptrdiff_t xo = n * k->x.outer_stride + u.channel * k->x.channel_stride + u.offset;
        const ptrdiff_t go = n * k->g.outer_stride + u.channel * k->g.channel_stride + u.offset;
        const ptrdiff_t yo = n * k->y.outer_stride + u.channel * k->y.channel_stride + u.offset;
        const BN_T *x = (const BN_T *)k->x.data + xo;
        const BN_T *g = (const BN_T *)k->g.data + go;
        BN_T *y = (BN_T *)k->y.data + yo; /* may alias g or x element-for-element */
        for (ptrdiff_t i = 0; i < u.len; i++)
            y[i] = (BN_T)((double)g[i] * a + ((double)x[i] - mu) * bx + c0);
    }
}

static void BN_FN(bn_rows_grad_apply_task_)(const void *vctx, ptrdiff_t t)
{
    const bn_context *k = (const bn_context *)vctx;
    const bn_rows_task u = bn_rows_task_of(&k->grid, &k->geo, t);
    const double *mu = k->mean, *a = k->scale, *bx = k->coef_x, *c0 = k->shift;
    for (ptrdiff_t r = u.row0; r < u.row1; r++) {
        const BN_T *x = (const BN_T *)k->x.data + r * k->x.outer_stride;
        const BN_T *g = (const BN_T *)k->g.data + r * k->g.outer_stride;
        BN_T *y = (BN_T *)k->y.data + r * k->y.outer_stride;
        for (ptrdiff_t c = u.c0; c < u.c1; c++)
            y[c] = (BN_T)((double)g[c] * a[c] + ((double)x[c] - mu[c]) * bx[c] + c0[c]);
    }
}

/* ---- the public entry points ------------------------------------------- */

static inline void BN_FN(bn_run_)(bn_context *k, bn_task_fn planar, bn_task_fn rows, int nthreads)
{
    bn_run_tasks(k->grid.channels_last ? rows : planar, k, k->grid.ntasks,
                 k->geo.outer * k->geo.channels * k->geo.inner, nthreads);
}

/* Per-channel Welford state of x into count/mean/m2 (length channels). */
static inline int BN_FN(bn_moments_)(const bn_geometry *geo, bn_array x,
                                     double *count, double *mean, double *m2, int nthreads)
{
    bn_context k = bn_context_new(geo, x);
    if (bn_context_alloc(&k, 1) != 0) return -1;
    BN_FN(bn_run_)(&k, BN_FN(bn_planar_stats_task_), BN_FN(bn_rows_stats_task_), nthreads);
    bn_partials_reduce(k.part, k.grid.partial_rows, geo->channels, count, mean, m2);
    bn_context_free(&k);
    return 0;
}

/* Training forward: batch statistics, running-statistics update, normalize. */
static inline int BN_FN(bn_forward_train_)(const bn_geometry *geo, bn_array x, bn_array y,
                                           const BN_T *weight, const BN_T *bias,
                                           BN_T *running_mean, BN_T *running_var,
                                           double momentum, double eps,
                                           BN_T *save_mean, BN_T *save_invstd, int nthreads)
{
    const ptrdiff_t C = geo->channels;
    bn_context k = bn_context_new(geo, x);
    k.y = y;
    if (bn_context_alloc(&k, 1) != 0) return -1;
    BN_FN(bn_run_)(&k, BN_FN(bn_planar_stats_task_), BN_FN(bn_rows_stats_task_), nthreads);
    double *count = k.coef_x; /* free until the backward pass needs it */
    bn_partials_reduce(k.part, k.grid.partial_rows, C, count, k.mean, k.scale);
    for (ptrdiff_t c = 0; c < C; c++) {
        const double n = count[c];
        const double var = k.scale[c] / n;
        const double invstd = 1.0 / sqrt(var + eps);
        save_mean[c] = (BN_T)k.mean[c];
        save_invstd[c] = (BN_T)invstd;
        if (running_mean) {
            running_mean[c] = (BN_T)((1.0 - momentum) * (double)running_mean[c] + momentum * k.mean[c]);
            running_var[c] = (BN_T)((1.0 - momentum) * (double)running_var[c]
                                    + momentum * (k.scale[c] / (n - 1.0)));
        }
        k.scale[c] = (weight ? (double)weight[c] : 1.0) * invstd;
        k.shift[c] = bias ? (double)bias[c] : 0.0;
    }
    BN_FN(bn_run_)(&k, BN_FN(bn_planar_affine_task_), BN_FN(bn_rows_affine_task_), nthreads);
    bn_context_free(&k);
    return 0;
}

/* Inference: normalize with the running statistics. */
static inline int BN_FN(bn_inference_)(const bn_geometry *geo, bn_array x, bn_array y,
                                       const BN_T *running_mean, const BN_T *running_var,
                                       const BN_T *weight, const BN_T *bias, double eps,
                                       int nthreads)
{
    bn_context k = bn_context_new(geo, x);
    k.y = y;
    if (bn_context_alloc(&k, 0) != 0) return -1;
    for (ptrdiff_t c = 0; c < geo->channels; c++) {
        k.mean[c] = (double)running_mean[c];
        k.scale[c] = (weight ? (double)weight[c] : 1.0) / sqrt((double)running_var[c] + eps);
        k.shift[c] = bias ? (double)bias[c] : 0.0;
    }
    BN_FN(bn_run_)(&k, BN_FN(bn_planar_affine_task_), BN_FN(bn_rows_affine_task_), nthreads);
    bn_context_free(&k);
    return 0;
}

/* Backward.  training: the full gradient through the batch statistics;
 * otherwise the statistics are constants.  grad_in may alias grad_out or x. */
static inline int BN_FN(bn_backward_)(const bn_geometry *geo, bn_array grad_out, bn_array x,
                                      bn_array grad_in, const BN_T *save_mean,
                                      const BN_T *save_invstd, const BN_T *weight, int training,
                                      BN_T *grad_weight, BN_T *grad_bias, int nthreads)
{
    const ptrdiff_t C = geo->channels;
    bn_context k = bn_context_new(geo, x);
    k.g = grad_out;
    k.y = grad_in;
    if (bn_context_alloc(&k, 1) != 0) return -1;
    for (ptrdiff_t c = 0; c < C; c++) k.mean[c] = (double)save_mean[c];
    BN_FN(bn_run_)(&k, BN_FN(bn_planar_grad_sums_task_), BN_FN(bn_rows_grad_sums_task_), nthreads);
    /* plain ordered sums of the partials: reuse the spare rows of scratch */
    const double n = (double)(geo->outer * geo->inner);
    for (ptrdiff_t c = 0; c < C; c++) {
        double sum_g = 0.0, sum_gx = 0.0;
        for (ptrdiff_t p = 0; p < k.grid.partial_rows; p++) {
            sum_g += k.part.mean[p * C + c];
            sum_gx += k.part.m2[p * C + c];
        }
        const double invstd = (double)save_invstd[c];
        const double a = (weight ? (double)weight[c] : 1.0) * invstd;
        grad_bias[c] = (BN_T)sum_g;
        grad_weight[c] = (BN_T)(sum_gx * invstd);
        k.scale[c] = a;
        k.coef_x[c] = -a * invstd * invstd * sum_gx / n;
        k.shift[c] = training ? -a * sum_g / n : 0.0;
    }
    if (training) {
        BN_FN(bn_run_)(&k, BN_FN(bn_planar_grad_apply_task_), BN_FN(bn_rows_grad_apply_task_),
                       nthreads);
    } else {
        /* constants: grad_in = g * weight * invstd, x not read (an inf in x
         * must not turn into 0 * inf) */
        for (ptrdiff_t c = 0; c < C; c++) k.mean[c] = 0.0;
        k.x = grad_out;
        BN_FN(bn_run_)(&k, BN_FN(bn_planar_affine_task_), BN_FN(bn_rows_affine_task_), nthreads);
    }
    bn_context_free(&k);
    return 0;
}

#undef BN_FN
#undef BN_CAT
#undef BN_CAT_
#undef BN_LANES
