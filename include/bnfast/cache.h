/* Cache sizes of the machine, detected at run time, and the streaming-store
 * threshold derived from them.
 *
 * Outputs larger than the threshold are written with non-temporal stores
 * where the CPU has them (see kernel_body.h): an output several times the
 * last-level cache would not stay there anyway, and streaming saves the
 * read-for-ownership of every output line.  Below that, ordinary stores keep
 * the result in cache for the next layer, which matters more.
 *
 * Sources, best first, each filling only what is still unknown: Linux sysfs
 * (what the OS reports for cpu0, on any architecture), CPUID's deterministic
 * cache parameters (x86 with GCC or clang), sysconf (glibc), sysctl (macOS).
 * glibc's sysconf can report the L3 of the whole package (here 320 MB for
 * CCDs of 32 MB), hence sysfs first. */
#ifndef BNFAST_CACHE_H
#define BNFAST_CACHE_H

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif
#if defined(__APPLE__)
#include <sys/sysctl.h>
#include <sys/types.h>
#endif
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define BN_CACHE_CPUID 1
#else
#define BN_CACHE_CPUID 0
#endif

/* Outputs above BN_STREAM_LLC_FACTOR times the last-level cache stream. */
#ifndef BN_STREAM_LLC_FACTOR
#define BN_STREAM_LLC_FACTOR 2
#endif
/* The threshold when no cache size could be detected: as for a 8 MB LLC. */
#ifndef BN_STREAM_FALLBACK_BYTES
#define BN_STREAM_FALLBACK_BYTES ((size_t)16 << 20)
#endif

typedef struct {
    size_t l1d, l2, l3; /* bytes; 0: unknown (or, for l3, absent) */
} bn_cache_sizes;

#if defined(__linux__)
/* "32K", "1024K", "32M" or a plain number of bytes; 0 when unreadable. */
static inline size_t bn_cache_read_size_(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    unsigned long long v = 0;
    char unit = 0;
    const int n = fscanf(f, "%llu%c", &v, &unit);
    fclose(f);
    if (n < 1) return 0;
    if (n == 2 && (unit == 'K' || unit == 'k')) v <<= 10;
    else if (n == 2 && unit == 'M') v <<= 20;
    else if (n == 2 && unit == 'G') v <<= 30;
    return (size_t)v;
}

static inline void bn_cache_from_sysfs_(bn_cache_sizes *c)
{
    for (int i = 0; i < 16; i++) {
        char path[96], type[32] = {0};
        int level = 0;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/level", i);
        FILE *f = fopen(path, "r");
        if (!f) break; /* the indices are consecutive */
        const int ok = fscanf(f, "%d", &level) == 1;
        fclose(f);
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/type", i);
        if (!ok || !(f = fopen(path, "r"))) continue;
        const int typed = fscanf(f, "%31s", type) == 1;
        fclose(f);
        if (!typed || type[0] == 'I') continue; /* instruction cache */
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
        const size_t size = bn_cache_read_size_(path);
        size_t *slot = level == 1 ? &c->l1d : level == 2 ? &c->l2 : level == 3 ? &c->l3 : NULL;
        if (slot && !*slot) *slot = size;
    }
}
#endif

#if BN_CACHE_CPUID
/* CPUID leaf 4 (Intel) or 0x8000001D (AMD, with topology extensions): one
 * subleaf per cache, size = ways * partitions * line size * sets. */
static inline void bn_cache_from_cpuid_(bn_cache_sizes *c)
{
    unsigned a, b, cx, d, leaf = 0;
    if (__get_cpuid(0x80000001u, &a, &b, &cx, &d) && (cx & (1u << 22))
        && __get_cpuid_max(0x80000000u, NULL) >= 0x8000001Du)
        leaf = 0x8000001Du;
    else if (__get_cpuid_max(0, NULL) >= 4)
        leaf = 4;
    if (!leaf) return;
    for (unsigned i = 0; i < 16; i++) {
        __cpuid_count(leaf, i, a, b, cx, d);
        const unsigned type = a & 31, level = (a >> 5) & 7;
        if (type == 0) break; /* no more caches */
        if (type == 2) continue; /* instruction cache */
        const size_t size = (size_t)((b >> 22) + 1) * (((b >> 12) & 1023) + 1) * ((b & 4095) + 1)
                            * ((size_t)cx + 1);
        size_t *slot = level == 1 ? &c->l1d : level == 2 ? &c->l2 : level == 3 ? &c->l3 : NULL;
        if (slot && !*slot) *slot = size;
    }
}
#endif

static inline void bn_cache_detect_(bn_cache_sizes *c)
{
    c->l1d = c->l2 = c->l3 = 0;
#if defined(__linux__)
    bn_cache_from_sysfs_(c);
#endif
#if BN_CACHE_CPUID
    if (!c->l1d || !c->l2 || !c->l3) bn_cache_from_cpuid_(c);
#endif
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
    {
        const long v1 = sysconf(_SC_LEVEL1_DCACHE_SIZE), v2 = sysconf(_SC_LEVEL2_CACHE_SIZE),
                   v3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
        if (!c->l1d && v1 > 0) c->l1d = (size_t)v1;
        if (!c->l2 && v2 > 0) c->l2 = (size_t)v2;
        if (!c->l3 && v3 > 0) c->l3 = (size_t)v3;
    }
#endif
#if defined(__APPLE__)
    {
        const char *names[3] = {"hw.l1dcachesize", "hw.l2cachesize", "hw.l3cachesize"};
        size_t *slots[3] = {&c->l1d, &c->l2, &c->l3};
        for (int i = 0; i < 3; i++) {
            long long v = 0;
            size_t len = sizeof v;
            if (!*slots[i] && sysctlbyname(names[i], &v, &len, NULL, 0) == 0 && v > 0)
                *slots[i] = (size_t)v;
        }
    }
#endif
}

/* The detected sizes, found on the first call.  Call it once before running
 * kernels from several threads (the Python extension does, at import). */
static inline const bn_cache_sizes *bn_caches(void)
{
    static bn_cache_sizes sizes;
    static int detected = 0;
    if (!detected) {
        bn_cache_detect_(&sizes);
        detected = 1;
    }
    return &sizes;
}

/* Streaming threshold from the cache sizes: a multiple of the last-level
 * cache (the L2 where no L3 is reported). */
static inline size_t bn_stream_threshold_default(void)
{
    const bn_cache_sizes *c = bn_caches();
    const size_t llc = c->l3 ? c->l3 : c->l2;
    return llc ? BN_STREAM_LLC_FACTOR * llc : BN_STREAM_FALLBACK_BYTES;
}

#endif
