/* The operations of bnfast's C API: one argument struct per operation, and
 * the set of kernels an instantiation (element type x instruction set)
 * provides.  An operation's signature is its struct: written here, and
 * mirrored once in the Python extension's declarations (_kernels.pyx). */
#ifndef BNFAST_OPS_H
#define BNFAST_OPS_H

#include "parallel.h"

/* The element type of x, y and the gradients.  BN_FLOAT16 (IEEE binary16)
 * and BN_BFLOAT16 (the upper half of a float32) are stored in 16 bits and
 * computed in float; their per-channel arrays (weight, bias, running
 * statistics, save_mean/save_invstd, grad_weight/grad_bias) are float32.
 * Every other type's per-channel arrays have the element type. */
#define BN_DT_F32 0 /* the values also as macros, for the preprocessor (kernels.h) */
#define BN_DT_F64 1
#define BN_DT_F16 2
#define BN_DT_BF16 3
typedef enum {
    BN_FLOAT32 = BN_DT_F32,
    BN_FLOAT64 = BN_DT_F64,
    BN_FLOAT16 = BN_DT_F16,
    BN_BFLOAT16 = BN_DT_BF16
} bn_dtype;
#define BN_DTYPES 4

/* The normalization family on one view.  An operand is `batch` samples of
 * (outer, channels, inner); statistics are kept per key = (sample, group of
 * `group` consecutive channels), reduced over outer x inner x the group's
 * channels; the affine step is indexed by channel, or by inner element.
 *   batch norm       batch 1, group 1            (the zero-initialized struct)
 *   instance norm    batch N, group 1
 *   group norm       batch N, group C / G
 *   layer/RMS norm   one key per row: channels = rows, inner = normalized
 *                    size, affine_inner = 1 (RMS: uncentered = 1)
 *   filter response  as instance norm, uncentered = 1
 * uncentered: normalize by the root mean square instead of the standard
 * deviation (no mean subtracted).  Arrays per key (save_mean, save_invstd)
 * hold batch * channels / group values, sample-major; arrays per channel
 * (weight, bias, running statistics, their gradients) hold `channels`, or
 * `inner` values when affine_inner; running statistics are averaged over
 * the samples' statistics (PyTorch's instance norm), with group 1 only.
 * affine_inner needs a planar view with outer = 1 and batch 1, weight and
 * bias (forward) or weight (backward, training = 1) given, and writes
 * grad_weight and grad_bias per inner element. */
typedef struct {
    ptrdiff_t batch, group; /* 0 means 1 */
    int uncentered, affine_inner;
} bn_keys;

/* A fused activation of the training forward and inference ops (batch norm
 * only): y = act(BN(x) + residual), in one pass over x (and the residual).
 * kind BN_ACT_NONE (the zero-initialized struct) is plain batch norm;
 * leaky_relu(v) = v < 0 ? v * negative_slope : v, elu(v) = v < 0 ? expm1(v)
 * : v (alpha 1), relu(v) = v < 0 ? 0 : v (NaN stays NaN).  residual.data
 * NULL: no residual, else an operand of x's geometry (it may be y element
 * for element). */
typedef enum {
    BN_ACT_NONE = 0,
    BN_ACT_IDENTITY = 1,
    BN_ACT_RELU = 2,
    BN_ACT_LEAKY_RELU = 3,
    BN_ACT_ELU = 4
} bn_activation;

typedef struct {
    bn_activation kind;
    double negative_slope;
    bn_array residual;
} bn_act;

/* Per-channel (or per-key) Welford state of x into count/mean/m2 (float64). */
typedef struct {
    bn_dtype dtype;
    bn_geometry geo;
    bn_array x;
    double *count, *mean, *m2;
    bn_keys keys; /* per key (group 1 only); zero: per channel */
} bn_moments_args;

/* Training forward: batch statistics, running-statistics update (when
 * running_mean is not NULL), y = (x - mean) * invstd * weight + bias.  The
 * per-channel arrays have the per-channel type (see bn_dtype); weight/bias
 * may be NULL. */
typedef struct {
    bn_dtype dtype;
    bn_geometry geo;
    bn_array x, y;
    const void *weight, *bias;
    void *running_mean, *running_var;
    double momentum, eps;
    void *save_mean, *save_invstd;
    bn_keys keys; /* zero: batch norm */
    /* Normalizing statistics other than the batch's (batch norm keys only;
     * zero: the batch's).  The running statistics are updated with the
     * batch's in every case.
     *   prior_mean and prior_var (double, per channel) given: normalize with
     *     mean' = share * mean + prior_mean and, prior_moments = 0,
     *     var' = share * var + prior_var (momentum batch norm), or,
     *     prior_moments = 1, var' = max(share * (var + mean^2) + prior_var
     *     - mean'^2, 0) (second moments: cross-iteration batch norm);
     *     save_mean and save_invstd hold mean' and 1 / sqrt(var' + eps).
     *   r_max >= 1 (batch renormalization, running statistics required):
     *     r = clip(sqrt(var + eps) / sqrt(running_var + eps), 1/r_max, r_max),
     *     d = clip((mean - running_mean) / sqrt(running_var + eps), +-d_max),
     *     y = ((x - mean) * invstd * r + d) * weight + bias.
     * stats_out (double, 4 x channels), when not NULL: the batch mean and
     * biased variance, then mean' and var', or r and d. */
    double share, r_max, d_max;
    const double *prior_mean, *prior_var;
    int prior_moments;
    double *stats_out;
    bn_act act;   /* zero: no activation (batch norm only, keys zero) */
} bn_forward_args;

/* Inference: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias. */
typedef struct {
    bn_dtype dtype;
    bn_geometry geo;
    bn_array x, y;
    const void *running_mean, *running_var, *weight, *bias;
    double eps;
    bn_act act; /* zero: no activation */
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
    bn_keys keys; /* as in the forward call; training = 1 unless batch norm */
    /* Statistics of which the batch is a share (momentum and cross-iteration
     * batch norm; training = 1, batch norm keys): the statistics' terms of
     * grad_in scaled by `share` (0 means 1) and, when ref_mean (double, per
     * channel) is not NULL, the variance's dependence on x centred on it:
     * grad_in = s * (g - share * mean(g) - share * invstd * (x - ref_mean) *
     * mean(g * xhat)), s = weight * invstd, xhat = (x - save_mean) * invstd. */
    double share;
    const double *ref_mean;
    /* in-place activated batch norm (batch norm, training = 1): kind
     * BN_ACT_LEAKY_RELU (negative_slope > 0) or BN_ACT_ELU, no residual; x
     * holds the forward's output y, and the kernel uses grad_out * act'(y)
     * and act^-1(y) for grad_out and x (kernel_body.h, BN_XF_LEAKY); other
     * kinds: none */
    bn_act act;
} bn_backward_args;

/* The kernels of one instantiation; the [dtype][isa] table holds one each. */
typedef struct {
    int (*moments)(const bn_moments_args *, const bn_run *);
    int (*forward_train)(const bn_forward_args *, const bn_run *);
    int (*inference)(const bn_inference_args *, const bn_run *);
    int (*backward)(const bn_backward_args *, const bn_run *);
} bn_kernel_set;

#endif
