/* Work decomposition shared by every kernel.
 *
 * An operand is seen as (outer, channels, inner).  Two families cover every
 * layout:
 *   planar        inner > 1, inner stride 1: reduce along contiguous runs;
 *   channels-last inner == 1, channel stride 1: vectorize across channels.
 * The task grid depends on the shape only, and partial results are merged in
 * task order, so every result is bit-identical for any thread count.  Threads
 * only decide who runs a task, never what a task computes. */
#ifndef BNFAST_PARALLEL_H
#define BNFAST_PARALLEL_H

#include <stddef.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Elements per task: large enough to amortize scheduling, small enough that
 * few channels or a batch of one still give every core work. */
#define BN_TASK_ELEMS 16384
/* Channels per channels-last task: keeps the per-channel state in L1/L2. */
#define BN_CHANNEL_TILE 1024
/* Most row chunks of a channels-last grid. */
#define BN_MAX_ROW_TASKS 256
/* Below this many elements a parallel region costs more than it saves. */
#define BN_PARALLEL_MIN_ELEMS 65536
/* Planar ops that read their input twice (training forward, backward) work
 * through groups of whole channels of about this many input bytes when their
 * input exceeds the last-level cache (bn_group_min_bytes, kernels.h): the
 * statistics pass brings a group into the cache and the normalize pass reads
 * it from there, so the data crosses the memory bus once.  Grouping changes
 * the order in which tasks run, never their results. */
#ifndef BN_GROUP_BYTES
#define BN_GROUP_BYTES (2 << 20)
#endif
/* Which outputs are written with streaming stores is decided at run time
 * from the cache sizes: see cache.h. */

typedef struct {
    ptrdiff_t outer, channels, inner;
} bn_geometry;

/* How a call runs -- everything that is not data, chosen by the caller for
 * each call (the library keeps no settings of its own):
 *   nthreads      threads of the call (1: no parallel region);
 *   isa           kernel variant, BN_ISA_*, or -1 for the widest this CPU runs;
 *   stream_bytes  outputs larger than this are written with streaming stores;
 *                 -1: twice the last-level cache (bn_stream_threshold_default);
 *   interrupted   optional: called now and then (at most every ~50 ms) by the
 *                 calling thread (OpenMP thread 0) of a long kernel with `arg`;
 *                 nonzero stops the kernel, which returns BN_ERR_INTERRUPTED
 *                 with the running statistics unchanged (outputs unspecified);
 *   contended     optional output: where not NULL, a call of at least
 *                 BN_CONTENTION_MIN_ELEMS elements whose parallel region takes
 *                 at least BN_CONTENTION_MIN_SECONDS stores here
 *                 whether the OS ran one of its threads for less than half of
 *                 that time -- another process competes for the cores, and
 *                 every barrier waits for the descheduled thread.  A fact the
 *                 caller may act on (bnfast's Python layer runs the next calls
 *                 on one thread for a while); the kernels never do. */
typedef struct {
    int nthreads;
    int isa;
    long long stream_bytes;
    int (*interrupted)(void *arg);
    void *arg;
    int *contended;
} bn_run;

/* Parallel regions shorter than this are not judged for contention: a
 * thread's wake-up after a sleep in the pool can take tens of microseconds.
 * Nor are calls of fewer elements than BN_CONTENTION_MIN_ELEMS (quiet, a few
 * hundred microseconds at most): the two thread-clock reads per thread cost
 * ~1 us, 6-8% of a 20 us call, and such calls have few barriers to wait at. */
#define BN_CONTENTION_MIN_SECONDS 1e-3
#define BN_CONTENTION_MIN_ELEMS (1 << 22)

/* CPU seconds of the calling thread (-1 where the OS has no thread clock). */
static inline double bn_thread_seconds(void)
{
#if defined(CLOCK_THREAD_CPUTIME_ID)
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#endif
    return -1.0;
}

/* Status codes of the entry points. */
#define BN_OK 0
#define BN_ERR_NOMEM (-1)
#define BN_ERR_INTERRUPTED (-2)
#define BN_ERR_ISA (-3) /* run->isa is not compiled in or this CPU lacks it */

/* Seconds on a monotonic clock, for pacing the interruption checks. */
static inline double bn_wtime(void)
{
#ifdef _OPENMP
    return omp_get_wtime();
#else
    return (double)clock() / CLOCKS_PER_SEC;
#endif
}

static inline int bn_thread_num(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* A flag one thread raises and every thread reads while tasks run. */
#if defined(__GNUC__) || defined(__clang__)
#define bn_flag_load(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define bn_flag_raise(p) __atomic_store_n((p), 1, __ATOMIC_RELAXED)
#else
#define bn_flag_load(p) (*(volatile int *)(p))
#define bn_flag_raise(p) (*(volatile int *)(p) = 1)
#endif

/* A strided operand: element strides of the outer and channel axes; the inner
 * stride is 1 (planar) or unused (channels-last).  batch_stride: between the
 * samples of a keyed call (bn_keys, ops.h); unused by batch norm. */
typedef struct {
    void *data;
    ptrdiff_t outer_stride, channel_stride;
    ptrdiff_t batch_stride;
} bn_array;

typedef struct {
    int channels_last;
    ptrdiff_t ntasks;
    ptrdiff_t partial_rows; /* partial states per channel */
    /* planar: task t covers channel t / partial_rows; within it, `group` whole
     * runs, or one `segment` of a long run */
    ptrdiff_t group, segments, segment_len;
    /* channels-last: task t covers `chunk` rows (t / ntiles) of one tile of
     * channels (t % ntiles) */
    ptrdiff_t chunk, tile, ntiles;
} bn_grid;

static inline ptrdiff_t bn_ceil_div(ptrdiff_t a, ptrdiff_t b) { return (a + b - 1) / b; }
static inline ptrdiff_t bn_min(ptrdiff_t a, ptrdiff_t b) { return a < b ? a : b; }
static inline ptrdiff_t bn_max(ptrdiff_t a, ptrdiff_t b) { return a > b ? a : b; }

static inline bn_grid bn_make_grid(const bn_geometry *geo)
{
    bn_grid g = {0};
    const ptrdiff_t C = geo->channels;
    if (geo->inner == 1) {
        g.channels_last = 1;
        g.tile = bn_min(C, BN_CHANNEL_TILE);
        g.ntiles = bn_ceil_div(C, g.tile);
        /* at least BN_TASK_ELEMS per task, and at most BN_MAX_ROW_TASKS row
         * chunks: the partial states of many short chunks would cost more
         * to write and merge than they save */
        g.chunk = bn_max(bn_max(1, BN_TASK_ELEMS / g.tile), bn_ceil_div(geo->outer, BN_MAX_ROW_TASKS));
        g.partial_rows = bn_ceil_div(geo->outer, g.chunk);
        g.ntasks = g.partial_rows * g.ntiles;
    } else {
        if (geo->inner > BN_TASK_ELEMS) {
            g.group = 1;
            g.segment_len = BN_TASK_ELEMS;
            g.segments = bn_ceil_div(geo->inner, BN_TASK_ELEMS);
        } else {
            g.group = bn_max(1, BN_TASK_ELEMS / geo->inner);
            g.segment_len = geo->inner;
            g.segments = 1;
        }
        g.partial_rows = bn_ceil_div(geo->outer, g.group) * g.segments;
        g.ntasks = g.partial_rows * C;
    }
    return g;
}

/* One planar task: runs [row0, row1) of channel c, elements [offset, offset+len)
 * of each run; its partial state is number `prow` of the channel. */
typedef struct {
    ptrdiff_t channel, row0, row1, offset, len, prow;
} bn_planar_task;

static inline bn_planar_task bn_planar_task_of(const bn_grid *g, const bn_geometry *geo, ptrdiff_t t)
{
    bn_planar_task u;
    u.channel = t / g->partial_rows;
    u.prow = t - u.channel * g->partial_rows;
    const ptrdiff_t group = u.prow / g->segments;
    const ptrdiff_t s = u.prow - group * g->segments;
    u.row0 = group * g->group;
    u.row1 = bn_min(geo->outer, u.row0 + g->group);
    u.offset = s * g->segment_len;
    u.len = bn_min(g->segment_len, geo->inner - u.offset);
    return u;
}

/* What a loop over run n of planar task u of operand a reads next, in
 * elements from that run's start, in task order: the run's next segment,
 * the next run (row n + 1, in this task or the channel's next), the next
 * channel's first run, or nothing (0) at the end of the operand. */
static inline ptrdiff_t bn_planar_next(const bn_geometry *geo, const bn_planar_task *u, ptrdiff_t n,
                                       const bn_array *a)
{
    if (u->offset + u->len < geo->inner) return u->len;
    if (n + 1 < geo->outer) return a->outer_stride - u->offset;
    if (u->channel + 1 < geo->channels) return a->channel_stride - n * a->outer_stride - u->offset;
    return 0;
}

/* Apply-phase task t of the planar channel group [c0, c1): row `row`,
 * channels [c0, c1) of it and elements [i0, i1) of each of their runs.  Short
 * runs: several consecutive channels of a row, so that the tasks follow the
 * memory order of a contiguous array; long runs: one segment of one run. */
typedef struct {
    ptrdiff_t row, c0, c1, i0, i1;
} bn_apply_task;

static inline ptrdiff_t bn_apply_chunk_(const bn_geometry *geo)
{
    return geo->inner >= BN_TASK_ELEMS ? 1 : BN_TASK_ELEMS / geo->inner;
}

static inline ptrdiff_t bn_apply_segments_(const bn_geometry *geo)
{
    return geo->inner >= BN_TASK_ELEMS ? bn_ceil_div(geo->inner, BN_TASK_ELEMS) : 1;
}

static inline ptrdiff_t bn_apply_tasks(const bn_geometry *geo, ptrdiff_t c0, ptrdiff_t c1)
{
    return geo->outer * bn_ceil_div(c1 - c0, bn_apply_chunk_(geo)) * bn_apply_segments_(geo);
}

static inline bn_apply_task bn_apply_task_of(const bn_geometry *geo, ptrdiff_t c0, ptrdiff_t c1,
                                             ptrdiff_t t)
{
    const ptrdiff_t chunk = bn_apply_chunk_(geo), segments = bn_apply_segments_(geo);
    const ptrdiff_t per_row = bn_ceil_div(c1 - c0, chunk) * segments;
    bn_apply_task u;
    u.row = t / per_row;
    const ptrdiff_t rest = t - u.row * per_row, j = rest / segments, s = rest - j * segments;
    u.c0 = c0 + j * chunk;
    u.c1 = bn_min(c1, u.c0 + chunk);
    u.i0 = s * BN_TASK_ELEMS;
    u.i1 = segments > 1 ? bn_min(geo->inner, u.i0 + BN_TASK_ELEMS) : geo->inner;
    return u;
}

/* One channels-last task: rows [row0, row1), channels [c0, c1). */
typedef struct {
    ptrdiff_t row0, row1, c0, c1, prow;
} bn_rows_task;

static inline bn_rows_task bn_rows_task_of(const bn_grid *g, const bn_geometry *geo, ptrdiff_t t)
{
    bn_rows_task u;
    u.prow = t / g->ntiles;
    u.row0 = u.prow * g->chunk;
    u.row1 = bn_min(geo->outer, u.row0 + g->chunk);
    u.c0 = (t - u.prow * g->ntiles) * g->tile;
    u.c1 = bn_min(geo->channels, u.c0 + g->tile);
    return u;
}

#endif
