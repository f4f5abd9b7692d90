/* The memory-traffic reference of the benchmarks: out = a, or out = a + b,
 * over n contiguous elements, with the kernels' thread count, parallel
 * threshold and streaming-store threshold -- the same traffic as a
 * normalize (one read, one write) or a backward (two reads, one write) with
 * nothing to compute.  Not part of the public kernel API (bnfast.h). */
#ifndef BNFAST_BENCH_H
#define BNFAST_BENCH_H

#include <stdint.h>
#include "bnfast.h"

#if BN_X86
#define BN_BENCH_STREAM_F32(p, v) _mm_stream_ps((p), (v))
#define BN_BENCH_STREAM_F64(p, v) _mm_stream_pd((p), (v))
#endif

/* One thread's contiguous chunk; streaming stores (SSE2, enough to saturate
 * memory) from the first 16-byte aligned element. */
#define BN_BENCH_CHUNK(T, sfx, LOADU, ADD, STREAM)                                         \
    static inline void bn_bench_chunk_##sfx(T *o, const T *a, const T *b, size_t n,       \
                                            int stream)                                   \
    {                                                                                      \
        size_t i = 0;                                                                      \
        BN_BENCH_STREAM_BODY(T, LOADU, ADD, STREAM)                                        \
        if (b)                                                                             \
            for (; i < n; i++) o[i] = a[i] + b[i];                                         \
        else                                                                               \
            for (; i < n; i++) o[i] = a[i];                                                \
    }

#if BN_X86
#define BN_BENCH_STREAM_BODY(T, LOADU, ADD, STREAM)                                        \
    if (stream) {                                                                          \
        const size_t step = 16 / sizeof(T);                                                \
        for (; i < n && ((uintptr_t)(o + i) & 15); i++) o[i] = b ? a[i] + b[i] : a[i];     \
        if (b)                                                                             \
            for (; i + step <= n; i += step) STREAM(o + i, ADD(LOADU(a + i), LOADU(b + i))); \
        else                                                                               \
            for (; i + step <= n; i += step) STREAM(o + i, LOADU(a + i));                  \
        _mm_sfence();                                                                      \
    }
BN_BENCH_CHUNK(float, f32, _mm_loadu_ps, _mm_add_ps, BN_BENCH_STREAM_F32)
BN_BENCH_CHUNK(double, f64, _mm_loadu_pd, _mm_add_pd, BN_BENCH_STREAM_F64)
#else
#define BN_BENCH_STREAM_BODY(T, LOADU, ADD, STREAM) (void)stream;
BN_BENCH_CHUNK(float, f32, , , )
BN_BENCH_CHUNK(double, f64, , , )
#endif
#undef BN_BENCH_STREAM_BODY
#undef BN_BENCH_CHUNK

static inline void bn_bench_part_(bn_dtype dt, void *out, const void *a, const void *b, size_t n,
                                  size_t per, int t, int stream)
{
    const size_t i0 = (size_t)t * per < n ? (size_t)t * per : n;
    const size_t i1 = i0 + per < n ? i0 + per : n;
    if (dt == BN_FLOAT32)
        bn_bench_chunk_f32((float *)out + i0, (const float *)a + i0, b ? (const float *)b + i0 : NULL,
                           i1 - i0, stream);
    else
        bn_bench_chunk_f64((double *)out + i0, (const double *)a + i0,
                           b ? (const double *)b + i0 : NULL, i1 - i0, stream);
}

/* out = a (+ b when b is not NULL); elements of type dt, all contiguous.  As
 * the kernels: a team only from BN_PARALLEL_MIN_ELEMS elements, streaming
 * stores only above the threshold a kernel call with the same `run` uses. */
static inline void bn_bench_traffic(bn_dtype dt, void *out, const void *a, const void *b,
                                    size_t n, const bn_run *run)
{
    const size_t size = dt == BN_FLOAT32 ? sizeof(float) : sizeof(double);
    const int stream = n * size > bn_stream_bytes(run);
    const int nthreads = run->nthreads;
    const int nt = nthreads > 1 && n >= (size_t)BN_PARALLEL_MIN_ELEMS ? nthreads : 1;
    const size_t per = (n / (size_t)nt + 16) / 16 * 16; /* whole lines per thread */
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int t = 0; t < nt; t++) bn_bench_part_(dt, out, a, b, n, per, t, stream);
        return;
    }
#endif
    bn_bench_part_(dt, out, a, b, n, n, 0, stream);
}

#endif
