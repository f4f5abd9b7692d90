/* Per-channel Welford state (count, mean, M2) and Chan's merge: the statistics
 * object shared by every kernel, the public `moments` API and dataset-wide
 * merges.  All accumulation is in double whatever the data type, so float32
 * statistics keep full accuracy when the mean is large against the spread. */
#ifndef BNFAST_MOMENTS_H
#define BNFAST_MOMENTS_H

#include <stddef.h>

typedef struct {
    double count; /* exact up to 2^53 values */
    double mean;
    double m2;    /* sum of squared deviations from the mean */
} bn_welford;

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

/* Structure-of-arrays partial states: one row of `channels` states per task. */
typedef struct {
    double *count, *mean, *m2;
} bn_partials;

/* Merge the per-task partials of every channel in task order, so the result
 * depends on the task grid only, never on which thread ran which task. */
static inline void bn_partials_reduce(bn_partials p, ptrdiff_t ntasks, ptrdiff_t channels,
                                      double *count, double *mean, double *m2)
{
    for (ptrdiff_t c = 0; c < channels; c++) {
        bn_welford acc = {0.0, 0.0, 0.0};
        for (ptrdiff_t t = 0; t < ntasks; t++) {
            const ptrdiff_t i = t * channels + c;
            bn_welford_merge(&acc, (bn_welford){p.count[i], p.mean[i], p.m2[i]});
        }
        count[c] = acc.count;
        mean[c] = acc.mean;
        m2[c] = acc.m2;
    }
}

#endif
