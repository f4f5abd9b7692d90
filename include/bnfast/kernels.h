/* bnfast kernels for float32 and float64, both layout families.
 *
 * Public C API (header-only; usable from C and C++):
 *   bn_moments_f32/_f64       per-channel Welford state
 *   bn_forward_train_f32/_f64 training forward with running-statistics update
 *   bn_inference_f32/_f64     inference with given statistics
 *   bn_backward_f32/_f64      backward, training or frozen statistics
 * Every entry returns 0, or -1 when scratch memory could not be allocated.
 * Arguments are trusted: validation belongs to the caller (bnfast's Python
 * layer).  Results are bit-identical for any nthreads. */
#ifndef BNFAST_KERNELS_H
#define BNFAST_KERNELS_H

#include <math.h>
#include <stdlib.h>
#include "moments.h"
#include "parallel.h"

#ifdef __cplusplus
#define restrict __restrict
#endif

/* Everything a task needs: operands, per-channel coefficients, partials. */
typedef struct {
    bn_geometry geo;
    bn_grid grid;
    bn_array x, y, g;
    double *mean, *scale, *shift, *coef_x; /* per channel */
    bn_partials part;                      /* partial_rows x channels */
    double *scratch;
} bn_context;

static inline bn_context bn_context_new(const bn_geometry *geo, bn_array x)
{
    bn_context k;
    k.geo = *geo;
    k.grid = bn_make_grid(geo);
    k.x = x;
    k.y = x;
    k.g = x;
    k.scratch = NULL;
    return k;
}

/* One allocation per call for the per-channel coefficients and partials. */
static inline int bn_context_alloc(bn_context *k, int with_partials)
{
    const size_t C = (size_t)k->geo.channels;
    const size_t partial = with_partials ? (size_t)k->grid.partial_rows * C : 0;
    k->scratch = (double *)malloc(sizeof(double) * (4 * C + 3 * partial + 1));
    if (!k->scratch) return -1;
    k->mean = k->scratch;
    k->scale = k->mean + C;
    k->shift = k->scale + C;
    k->coef_x = k->shift + C;
    k->part.count = k->coef_x + C;
    k->part.mean = k->part.count + partial;
    k->part.m2 = k->part.mean + partial;
    return 0;
}

static inline void bn_context_free(bn_context *k)
{
    free(k->scratch);
    k->scratch = NULL;
}

#define BN_T float
#define BN_SFX f32
#include "kernel_body.h"
#undef BN_T
#undef BN_SFX

#define BN_T double
#define BN_SFX f64
#include "kernel_body.h"
#undef BN_T
#undef BN_SFX

#endif
