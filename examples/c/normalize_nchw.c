/* Batch normalization (training forward) of an NCHW float buffer through the
 * C API alone: reads N C HW and then the N*C*HW input values from stdin,
 * prints the outputs, the batch means and invstd, one per line (%.9g).
 *
 * Build (header-only; the headers are at `python -c "import bnfast; print(bnfast.get_include())"`):
 *   cc -O2 -fopenmp -I"$(python -c 'import bnfast; print(bnfast.get_include())')" \
 *      normalize_nchw.c -o normalize_nchw -lm
 * (without -fopenmp: the serial kernels).  tests/test_c_api.py builds it with
 * cc and c++, with and without OpenMP, and checks it against the Python API. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "bnfast/bnfast.h"

#if BNFAST_VERSION_HEX < 0x000100
#error "needs bnfast 0.1.0 or newer"
#endif

int main(void)
{
    long n, c, hw;
    if (scanf("%ld %ld %ld", &n, &c, &hw) != 3) return 2;
    const long size = n * c * hw;
    float *x = (float *)malloc(sizeof(float) * (size_t)size);
    float *y = (float *)malloc(sizeof(float) * (size_t)size);
    float *mean = (float *)malloc(sizeof(float) * (size_t)c);
    float *invstd = (float *)malloc(sizeof(float) * (size_t)c);
    if (!x || !y || !mean || !invstd) return 3;
    for (long i = 0; i < size; i++)
        if (scanf("%f", &x[i]) != 1) return 2;
    bn_forward_args a;
    memset(&a, 0, sizeof a); /* no weight, bias or running statistics */
    a.dtype = BN_FLOAT32;
    a.geo.outer = n;
    a.geo.channels = c;
    a.geo.inner = hw;
    a.x.data = x;
    a.x.outer_stride = c * hw;
    a.x.channel_stride = hw;
    a.y = a.x;
    a.y.data = y;
    a.momentum = 0.1;
    a.eps = 1e-5;
    a.save_mean = mean;
    a.save_invstd = invstd;
    bn_run run;
    memset(&run, 0, sizeof run);
    run.nthreads = 2;
    run.isa = -1;          /* the widest variant this CPU runs */
    run.stream_bytes = -1; /* the default streaming threshold */
    const int status = bn_forward_train(&a, &run);
    if (status != BN_OK) return 4;
    for (long i = 0; i < size; i++) printf("%.9g\n", y[i]);
    for (long j = 0; j < c; j++) printf("%.9g\n%.9g\n", mean[j], invstd[j]);
    free(x), free(y), free(mean), free(invstd);
    return 0;
}
