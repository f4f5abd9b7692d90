/* The operations of bnfast's C API: one argument struct per operation, and
 * the set of kernels an instantiation (element type x instruction set)
 * provides.  An operation's signature is its struct: written here, and
 * mirrored once in the Python extension's declarations (_kernels.pyx). */
#ifndef BNFAST_OPS_H
#define BNFAST_OPS_H

#include "parallel.h"

typedef enum { BN_FLOAT32 = 0, BN_FLOAT64 = 1 } bn_dtype;
#define BN_DTYPES 2

/* Per-channel Welford state of x into count/mean/m2 (float64, C each). */
typedef struct {
    bn_dtype dtype;
    bn_geometry geo;
    bn_array x;
    double *count, *mean, *m2;
} bn_moments_args;

/* Training forward: batch statistics, running-statistics update (when
 * running_mean is not NULL), y = (x - mean) * invstd * weight + bias.  The
 * per-channel arrays have the element type; weight/bias may be NULL. */
typedef struct {
    bn_dtype dtype;
    bn_geometry geo;
    bn_array x, y;
    const void *weight, *bias;
    void *running_mean, *running_var;
    double momentum, eps;
    void *save_mean, *save_invstd;
} bn_forward_args;

/* Inference: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias. */
typedef struct {
    bn_dtype dtype;
    bn_geometry geo;
    bn_array x, y;
    const void *running_mean, *running_var, *weight, *bias;
    double eps;
} bn_inference_args;

/* Backward: grad_in (may alias grad_out or x element for element),
 * grad_weight and grad_bias; training = 0 treats the statistics as constants. */
typedef struct {
    bn_dtype dtype;
    bn_geometry geo;
    bn_array grad_out, x, grad_in;
    const void *save_mean, *save_invstd, *weight;
    int training;
    void *grad_weight, *grad_bias;
} bn_backward_args;

/* The kernels of one instantiation; the [dtype][isa] table holds one each. */
typedef struct {
    int (*moments)(const bn_moments_args *, const bn_run *);
    int (*forward_train)(const bn_forward_args *, const bn_run *);
    int (*inference)(const bn_inference_args *, const bn_run *);
    int (*backward)(const bn_backward_args *, const bn_run *);
} bn_kernel_set;

#endif
