/* Element storage of one instantiation: how kernel_body.h reads and writes
 * the elements of x, g and y.  Included by kernel_body.h once per
 * instantiation, after its vector types; no include guard on purpose.
 *
 * BN_T is the storage type (what the arrays hold), BN_AT the arithmetic type
 * the apply phase computes in (and the type of every per-channel array:
 * weight, bias, running statistics, save_mean/save_invstd, gradients), and
 * BN_STORAGE says how one becomes the other:
 *   BN_STORE_NATIVE  BN_T == BN_AT (float32, float64)
 *   BN_STORE_F16     IEEE binary16 bits in uint16_t, BN_AT float
 *   BN_STORE_BF16    bfloat16 bits (a float's upper half) in uint16_t, BN_AT float
 * On AArch64, NEON's conversions for float16 vectors; elsewhere without
 * F16C, portable integer code.
 * Conversions to BN_AT are exact; conversions to storage round to nearest,
 * ties to even, overflow to infinity, and keep NaN a (quiet) NaN -- the
 * rounding of numpy's and ml_dtypes' casts.  Every path (F16C, bit shifts,
 * the portable scalar code) gives the same bits for the same value, so
 * vector loops and scalar tails agree.
 *
 * Defines, with BN_FN names:
 *   BN_TO_A(v), BN_FROM_A(a)  one element: storage -> arithmetic -> storage
 *   BN_LD(p)     W elements of storage as a VD of doubles (the statistics)
 *   BN_LDW(p)    W arithmetic values (per-element weights) as a VD
 *   BN_LDA(p), BN_STA(p, v)  WA elements of storage <-> a va_ of BN_AT
 *   BN_LDP(p)    WA arithmetic values (coefficients, weights) as a va_
 *   BN_STREAMA(p, v) and BN_CAN_STREAM: non-temporal store of one va_ */

/* (BN_STORE_NATIVE, BN_STORE_F16, BN_STORE_BF16: kernels.h) */

/* F16C's instructions on the x86 variants that have them (the AVX2 and
 * AVX-512 targets include f16c; so may a -march baseline). */
#if BN_STORAGE == BN_STORE_F16 && BN_X86 && (defined(BN_ISA_TARGET) || defined(__F16C__))
#define BN_F16C 1
#else
#define BN_F16C 0
#endif
/* AArch64's NEON converts half precision in every implementation (FCVTL,
 * FCVTN; round to nearest even under the default FPCR). */
#if BN_STORAGE == BN_STORE_F16 && defined(__aarch64__) && defined(__ARM_NEON) && BN_VEC_BYTES == 16
#include <arm_neon.h>
#define BN_NEON_F16 1
#else
#define BN_NEON_F16 0
#endif
/* bfloat16 vectors in AVX2/AVX-512 integer intrinsics (one widening move and
 * a shift in, the rounding below out): GCC lowers the generic vector code's
 * 16 <-> 32-bit lane conversions into several shuffles each. */
#if BN_STORAGE == BN_STORE_BF16 && BN_X86 && BN_VEC_BYTES == 64 && (defined(BN_ISA_TARGET) || defined(__AVX512F__))
#define BN_BF16_X86 64
#elif BN_STORAGE == BN_STORE_BF16 && BN_X86 && BN_VEC_BYTES == 32 && (defined(BN_ISA_TARGET) || defined(__AVX2__))
#define BN_BF16_X86 32
#else
#define BN_BF16_X86 0
#endif

/* ---- one element ---------------------------------------------------------- */

#if BN_STORAGE == BN_STORE_NATIVE
#define BN_TO_A(v) ((BN_AT)(v))
#define BN_FROM_A(a) ((BN_T)(a))
#else

static BN_ALWAYS_INLINE uint32_t BN_FN(fbits_)(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static BN_ALWAYS_INLINE float BN_FN(bitsf_)(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if BN_STORAGE == BN_STORE_BF16
static BN_ALWAYS_INLINE float BN_FN(to_a_)(uint16_t h) { return BN_FN(bitsf_)((uint32_t)h << 16); }

static BN_ALWAYS_INLINE uint16_t BN_FN(from_a_)(float f)
{
    const uint32_t u = BN_FN(fbits_)(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                 /* ties to even */
}
#elif BN_F16C
static BN_ALWAYS_INLINE float BN_FN(to_a_)(uint16_t h) { return _cvtsh_ss(h); }
static BN_ALWAYS_INLINE uint16_t BN_FN(from_a_)(float f)
{
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#else
/* Portable binary16: integer arithmetic, no float denormals (a process with
 * denormals-are-zero set, e.g. by a library built with -ffast-math, still
 * converts exactly). */
static BN_ALWAYS_INLINE float BN_FN(to_a_)(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7fffu;
    float m;
    if (em < 0x0400u) /* zero or subnormal: em * 2^-24, exact */
        m = (float)(int32_t)em * 5.9604644775390625e-8f;
    else if (em >= 0x7c00u) /* inf, NaN (made quiet, as F16C does) */
        m = BN_FN(bitsf_)(0x7f800000u | (em & 0x3ffu) << 13 | (em > 0x7c00u ? 0x00400000u : 0u));
    else
        m = BN_FN(bitsf_)((em << 13) + ((uint32_t)(127 - 15) << 23));
    return BN_FN(bitsf_)(BN_FN(fbits_)(m) | sign);
}

static BN_ALWAYS_INLINE uint16_t BN_FN(from_a_)(float f)
{
    const uint32_t u = BN_FN(fbits_)(f), a = u & 0x7fffffffu;
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t r;
    if (a > 0x7f800000u) r = 0x7e00u | ((a >> 13) & 0x3ffu); /* quiet NaN, payload's top bits */
    else if (a >= 0x477ff000u) r = 0x7c00u;                 /* rounds to infinity (or is one) */
    else if (a >= 0x38800000u) {                            /* a normal half */
        const uint32_t b = a - ((uint32_t)(127 - 15) << 23);
        r = (b + 0xfffu + ((b >> 13) & 1u)) >> 13;          /* ties to even; may carry to 2^-14.. */
    } else {
        /* below 2^-14: adding 0.5 rounds to the subnormal grid (2^-24) in
         * the FPU's round-to-nearest-even; 0x400 is 2^-14 itself */
        r = BN_FN(fbits_)(BN_FN(bitsf_)(a) + 0.5f) - 0x3f000000u;
    }
    return (uint16_t)(sign | r);
}
#endif

#define BN_TO_A(v) BN_FN(to_a_)(v)
#define BN_FROM_A(a) BN_FN(from_a_)(a)
#endif

/* ---- vectors ---------------------------------------------------------------- */

#if BN_VECTORS

static BN_ALWAYS_INLINE VD BN_FN(ldw_)(const BN_AT *p)
{
#if BN_X86 && BN_T_IS_FLOAT && BN_STATS_BYTES == 32
    return (VD)_mm256_cvtps_pd(_mm_loadu_ps(p));
#elif BN_X86 && BN_T_IS_FLOAT
    /* two floats through an unaligned, may-alias 64-bit load (no double* punning) */
    return (VD)_mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(const void *)p)));
#else
    typedef BN_AT BN_FN(vw_) __attribute__((vector_size(W * sizeof(BN_AT))));
    BN_FN(vw_) v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, VD);
#endif
}

static BN_ALWAYS_INLINE BN_FN(va_) BN_FN(ldp_)(const BN_AT *p)
{
    BN_FN(va_) v;
    memcpy(&v, p, sizeof v);
    return v;
}

#if BN_STORAGE == BN_STORE_NATIVE
#define BN_LD BN_FN(ldw_)
static BN_ALWAYS_INLINE BN_FN(va_) BN_FN(lda_)(const BN_T *p) { return BN_FN(ldp_)(p); }
static BN_ALWAYS_INLINE void BN_FN(sta_)(BN_T *p, BN_FN(va_) v) { memcpy(p, &v, sizeof v); }
#else

/* Half storage in GNU vector arithmetic (the portable path, and bfloat16
 * everywhere): n uint16 lanes <-> n float lanes, for n = W (statistics) and
 * n = WA (apply), the same rounding as the scalar conversions above. */
#if BN_STORAGE == BN_STORE_BF16
#define BN_HALF_CVT(tag)                                                                            \
    static BN_ALWAYS_INLINE BN_FN(tag##f_) BN_FN(tag##cvt_in_)(BN_FN(tag##u_) u)                               \
    {                                                                                                \
        u <<= 16;                                                                                    \
        BN_FN(tag##f_) f;                                                                            \
        memcpy(&f, &u, sizeof f);                                                                    \
        return f;                                                                                    \
    }                                                                                                \
    static BN_ALWAYS_INLINE BN_FN(tag##u_) BN_FN(tag##cvt_out_)(BN_FN(tag##f_) v, BN_FN(tag##u_) u)            \
    {                                                                                                \
        const BN_FN(tag##u_) nan = (BN_FN(tag##u_))((u & 0x7fffffffu) > 0x7f800000u);                \
        const BN_FN(tag##u_) r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;                             \
        (void)v;                                                                                     \
        return (r & ~nan) | (((u >> 16) | 0x40u) & nan);                                             \
    }
#else
#define BN_HALF_CVT(tag)                                                                            \
    static BN_ALWAYS_INLINE BN_FN(tag##f_) BN_FN(tag##cvt_in_)(BN_FN(tag##u_) h)                               \
    {                                                                                                \
        const BN_FN(tag##u_) sign = (h & 0x8000u) << 16, em = h & 0x7fffu;                           \
        const BN_FN(tag##u_) sub = (BN_FN(tag##u_))(em < 0x0400u);                                   \
        const BN_FN(tag##u_) spec = (BN_FN(tag##u_))(em >= 0x7c00u);                                 \
        const BN_FN(tag##u_) quiet = (BN_FN(tag##u_))(em > 0x7c00u) & 0x00400000u;                   \
        const BN_FN(tag##f_) fs = __builtin_convertvector((BN_FN(tag##i_))em, BN_FN(tag##f_))        \
                                  * 5.9604644775390625e-8f;                                          \
        BN_FN(tag##u_) us;                                                                           \
        memcpy(&us, &fs, sizeof us);                                                                 \
        const BN_FN(tag##u_) normal = (em << 13) + ((uint32_t)(127 - 15) << 23);                     \
        const BN_FN(tag##u_) special = 0x7f800000u | (em & 0x3ffu) << 13 | quiet;                    \
        const BN_FN(tag##u_) m = (us & sub) | (special & spec & ~sub) | (normal & ~(sub | spec));    \
        const BN_FN(tag##u_) bits = m | sign;                                                        \
        BN_FN(tag##f_) f;                                                                            \
        memcpy(&f, &bits, sizeof f);                                                                 \
        return f;                                                                                    \
    }                                                                                                \
    static BN_ALWAYS_INLINE BN_FN(tag##u_) BN_FN(tag##cvt_out_)(BN_FN(tag##f_) v, BN_FN(tag##u_) u)            \
    {                                                                                                \
        (void)v;                                                                                     \
        const BN_FN(tag##u_) a = u & 0x7fffffffu, sign = (u >> 16) & 0x8000u;                        \
        const BN_FN(tag##u_) nan = (BN_FN(tag##u_))(a > 0x7f800000u);                                \
        const BN_FN(tag##u_) inf = (BN_FN(tag##u_))(a >= 0x477ff000u) & ~nan;                        \
        const BN_FN(tag##u_) norm = (BN_FN(tag##u_))(a >= 0x38800000u) & ~(nan | inf);               \
        const BN_FN(tag##u_) sub = ~(nan | inf | norm);                                              \
        const BN_FN(tag##u_) b = a - ((uint32_t)(127 - 15) << 23);                                   \
        const BN_FN(tag##u_) rn = (b + 0xfffu + ((b >> 13) & 1u)) >> 13;                             \
        BN_FN(tag##f_) fa;                                                                           \
        memcpy(&fa, &a, sizeof fa);                                                                  \
        fa += 0.5f;                                                                                  \
        BN_FN(tag##u_) rs;                                                                           \
        memcpy(&rs, &fa, sizeof rs);                                                                 \
        rs -= 0x3f000000u;                                                                           \
        const BN_FN(tag##u_) rq = 0x7e00u | ((a >> 13) & 0x3ffu);                                    \
        return sign | (rq & nan) | (0x7c00u & inf) | (rn & norm) | (rs & sub);                       \
    }
#endif

#define BN_HALF_DEFINE(tag, n)                                                                     \
    typedef uint32_t BN_FN(tag##u_) __attribute__((vector_size(4 * (n))));                           \
    typedef int32_t BN_FN(tag##i_) __attribute__((vector_size(4 * (n))));                            \
    typedef float BN_FN(tag##f_) __attribute__((vector_size(4 * (n))));                              \
    BN_HALF_CVT(tag)                                                                               \
    BN_HALF_LANES_(tag, n)
#define BN_HALF_LANES_(tag, n)                                                                     \
    typedef uint16_t BN_FN(tag##h_) __attribute__((vector_size(2 * (n))));                           \
    static BN_ALWAYS_INLINE BN_FN(tag##f_) BN_FN(tag##load_)(const uint16_t *p)                                \
    {                                                                                                \
        BN_FN(tag##h_) h;                                                                            \
        memcpy(&h, p, sizeof h);                                                                     \
        return BN_FN(tag##cvt_in_)(__builtin_convertvector(h, BN_FN(tag##u_)));                      \
    }                                                                                                \
    static BN_ALWAYS_INLINE void BN_FN(tag##store_)(uint16_t *p, BN_FN(tag##f_) v)                             \
    {                                                                                                \
        BN_FN(tag##u_) u;                                                                            \
        memcpy(&u, &v, sizeof u);                                                                    \
        const BN_FN(tag##h_) h = __builtin_convertvector(BN_FN(tag##cvt_out_)(v, u), BN_FN(tag##h_)); \
        memcpy(p, &h, sizeof h);                                                                     \
    }

BN_HALF_DEFINE(hs, W)  /* statistics: W lanes */
BN_HALF_DEFINE(ha, WA) /* apply: WA lanes */
#undef BN_HALF_DEFINE
#undef BN_HALF_LANES_
#undef BN_HALF_CVT

static BN_ALWAYS_INLINE VD BN_FN(ld_)(const BN_T *p)
{
#if BN_F16C && BN_STATS_BYTES == 32
    return (VD)_mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(const void *)p)));
#elif BN_X86 && BN_STORAGE == BN_STORE_BF16 && BN_STATS_BYTES == 32
    const __m128i h = _mm_loadl_epi64((const __m128i *)(const void *)p);
    return (VD)_mm256_cvtps_pd(_mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h)));
#else
    return __builtin_convertvector(BN_FN(hsload_)(p), VD);
#endif
}
#define BN_LD BN_FN(ld_)

static BN_ALWAYS_INLINE BN_FN(va_) BN_FN(lda_)(const BN_T *p)
{
#if BN_F16C && BN_VEC_BYTES == 64
    return (BN_FN(va_))_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)p));
#elif BN_F16C && BN_VEC_BYTES == 32
    return (BN_FN(va_))_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));
#elif BN_F16C
    return (BN_FN(va_))_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(const void *)p));
#elif BN_NEON_F16
    return (BN_FN(va_))vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
#elif BN_BF16_X86 == 64
    const __m256i h = _mm256_loadu_si256((const __m256i *)(const void *)p);
    return (BN_FN(va_))_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#elif BN_BF16_X86 == 32
    const __m128i h = _mm_loadu_si128((const __m128i *)(const void *)p);
    return (BN_FN(va_))_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
    return (BN_FN(va_))BN_FN(haload_)(p);
#endif
}

static BN_ALWAYS_INLINE void BN_FN(sta_)(BN_T *p, BN_FN(va_) v)
{
#if BN_F16C && BN_VEC_BYTES == 64
    _mm256_storeu_si256((__m256i *)(void *)p,
                        _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif BN_F16C && BN_VEC_BYTES == 32
    _mm_storeu_si128((__m128i *)(void *)p,
                     _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif BN_F16C
    _mm_storel_epi64((__m128i *)(void *)p,
                     _mm_cvtps_ph((__m128)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif BN_NEON_F16
    vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32((float32x4_t)v)));
#elif BN_BF16_X86 == 64
    /* the rounding of from_a_: ties to even in the upper half, NaN quieted */
    const __m512i u = _mm512_castps_si512((__m512)v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
    r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask((__m512)v, (__m512)v, _CMP_UNORD_Q), u,
                             _mm512_set1_epi32(0x00400000));
    _mm256_storeu_si256((__m256i *)(void *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
#elif BN_BF16_X86 == 32
    const __m256i u = _mm256_castps_si256((__m256)v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps((__m256)v, (__m256)v, _CMP_UNORD_Q));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
    r = _mm256_srli_epi32(r, 16);
    _mm_storeu_si128((__m128i *)(void *)p,
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
#else
    BN_FN(hastore_)(p, (BN_FN(haf_))v);
#endif
}
#endif

#define BN_LDW BN_FN(ldw_)
#define BN_LDP BN_FN(ldp_)
#define BN_LDA BN_FN(lda_)
#define BN_STA BN_FN(sta_)

/* Non-temporal store of one vector to an address aligned to its size. */
#if BN_X86 && (BN_STORAGE == BN_STORE_NATIVE || BN_VEC_BYTES >= 32)
#define BN_CAN_STREAM 1
static BN_ALWAYS_INLINE void BN_FN(streama_)(BN_T *p, BN_FN(va_) v)
{
#if BN_STORAGE != BN_STORE_NATIVE && BN_VEC_BYTES == 64
    /* 16 halves: convert, then stream 32 bytes */
    uint16_t h[16];
    BN_FN(sta_)(h, v);
    __m256i q;
    memcpy(&q, h, sizeof q);
    _mm256_stream_si256((__m256i *)(void *)p, q);
#elif BN_STORAGE != BN_STORE_NATIVE
    uint16_t h[8];
    BN_FN(sta_)(h, v);
    __m128i q;
    memcpy(&q, h, sizeof q);
    _mm_stream_si128((__m128i *)(void *)p, q);
#elif BN_T_IS_FLOAT && BN_VEC_BYTES == 64
    _mm512_stream_ps(p, (__m512)v);
#elif BN_T_IS_FLOAT && BN_VEC_BYTES == 32
    _mm256_stream_ps(p, (__m256)v);
#elif BN_T_IS_FLOAT
    _mm_stream_ps(p, (__m128)v);
#elif BN_VEC_BYTES == 64
    _mm512_stream_pd(p, (__m512d)v);
#elif BN_VEC_BYTES == 32
    _mm256_stream_pd(p, (__m256d)v);
#else
    _mm_stream_pd(p, (__m128d)v);
#endif
}
#define BN_STREAMA BN_FN(streama_)
#else
#define BN_CAN_STREAM 0
#endif

#else /* !BN_VECTORS */
#define BN_CAN_STREAM 0
#endif

