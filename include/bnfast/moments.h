/* Per-channel Welford state (count, mean, M2) and Chan's merge: the statistics
 * object shared by every kernel, the public `moments` API and dataset-wide
 * merges.  All accumulation is in double whatever the data type, so float32
 * statistics keep full accuracy when the mean is large against the spread:
 * double data by Welford's update, float data (whose squares a double holds
 * exactly enough) by sums of values shifted by a pilot value within each task
 * (kernel_body.h), turned into a state and merged from there on like any. */
#ifndef BNFAST_MOMENTS_H
#define BNFAST_MOMENTS_H

#include <stddef.h>

typedef struct {
    double count; /* exact up to 2^53 values */
    double mean;
    double m2;    /* sum of squared deviations from the mean */
} bn_welford;

/* bn_recip[k] = 1 / (k + 1), folded by the compiler (correctly rounded, like
 * the division it replaces): Welford steps of a task look their weights up. */
#define BN_RECIP_N 1024
#define BN_R1(k) 1.0 / (double)(k)
#define BN_R4(k) BN_R1(k), BN_R1((k) + 1), BN_R1((k) + 2), BN_R1((k) + 3)
#define BN_R16(k) BN_R4(k), BN_R4((k) + 4), BN_R4((k) + 8), BN_R4((k) + 12)
#define BN_R64(k) BN_R16(k), BN_R16((k) + 16), BN_R16((k) + 32), BN_R16((k) + 48)
#define BN_R256(k) BN_R64(k), BN_R64((k) + 64), BN_R64((k) + 128), BN_R64((k) + 192)
static const double bn_recip[BN_RECIP_N] = {BN_R256(1), BN_R256(257), BN_R256(513), BN_R256(769)};
#undef BN_R1
#undef BN_R4
#undef BN_R16
#undef BN_R64
#undef BN_R256

static inline double bn_reciprocal(ptrdiff_t k) /* 1 / k, k >= 1 */
{
    return k <= BN_RECIP_N ? bn_recip[k - 1] : 1.0 / (double)k;
}

/* Chan et al.'s pairwise update: fold b into a.  Exact algebra; rounding
 * depends only on the order of merges, which every caller fixes. */
static inline void bn_welford_merge(bn_welford *a, bn_welford b)
{
    if (b.count == 0.0) return;
    if (a->count == 0.0) { *a = b; return; }
    const double n = a->count + b.count;
    const double delta = b.mean - a->mean;
    const double b_share = b.count / n;
    a->mean += delta * b_share;
    a->m2 += b.m2 + delta * delta * a->count * b_share;
    a->count = n;
}

/* Chan's update when both counts are known in advance: share = nb / (na + nb),
 * weight = na * nb / (na + nb).  No division, so a merge of many partial
 * states of equal, shape-determined counts costs a few flops each. */
static inline void bn_welford_merge_known(double *mean, double *m2, double b_mean, double b_m2,
                                          double share, double weight)
{
    const double delta = b_mean - *mean;
    *mean += delta * share;
    *m2 += b_m2 + delta * delta * weight;
}

/* Structure-of-arrays partial states, row-major: entry p * channels + c is
 * partial p (one per task row) of channel c.  Every channel's partial p has
 * the same count, so the merge weights are shared by all channels. */
typedef struct {
    double *mean, *m2;     /* partial_rows x channels */
    double *share, *weight; /* partial_rows: merge weights of partial p */
} bn_partials;

#endif
