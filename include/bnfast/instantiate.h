/* Instantiate kernel_body.h for float, double, float16 and bfloat16 with one
 * instruction set: define BN_VEC_BYTES (SIMD register width), BN_ISA_SFX (a
 * name token such as avx2) and, for a variant beyond the build's baseline,
 * BN_ISA_TARGET (the compiler's target string, e.g. "avx2,fma,f16c"), then
 * include this file; the kernels get the suffixes f32_<BN_ISA_SFX>,
 * f64_<BN_ISA_SFX>, f16_<BN_ISA_SFX> and bf16_<BN_ISA_SFX>, and each element
 * type's entry points are gathered in the kernel set bn_kernels_<suffix>
 * (with BN_KERNEL_SET_LINKAGE: static, or external in a split build's
 * variant unit, kernels.h).  BN_WANT_DTYPE(d) selects the element types
 * (BN_DT_* of ops.h).  No include guard on purpose. */

#define BN_ISA_CAT_(a, b) a##b
#define BN_ISA_CAT(a, b) BN_ISA_CAT_(a, b)
#define BN_PRAGMA_(...) _Pragma(#__VA_ARGS__)
#define BN_PRAGMA(...) BN_PRAGMA_(__VA_ARGS__)

#ifdef BN_ISA_TARGET
#if defined(__clang__)
BN_PRAGMA(clang attribute push(__attribute__((target(BN_ISA_TARGET))), apply_to = function))
#else
BN_PRAGMA(GCC push_options)
BN_PRAGMA(GCC target(BN_ISA_TARGET))
#endif
#endif

/* The kernel set of the instantiation just made (suffix BN_SFX). */
#define BN_KERNEL_SET_HERE                                                                        \
    BN_KERNEL_SET_LINKAGE const bn_kernel_set BN_ISA_CAT(bn_kernels_, BN_SFX) = {                \
        BN_ISA_CAT(moments_, BN_SFX), BN_ISA_CAT(forward_train_, BN_SFX),                        \
        BN_ISA_CAT(inference_, BN_SFX), BN_ISA_CAT(backward_, BN_SFX)};

#if BN_WANT_DTYPE(BN_DT_F32)
#define BN_T float
#define BN_AT float
#define BN_STORAGE BN_STORE_NATIVE
#define BN_T_IS_FLOAT 1
#define BN_SFX BN_ISA_CAT(f32_, BN_ISA_SFX)
#include "kernel_body.h"
BN_KERNEL_SET_HERE
#undef BN_T
#undef BN_AT
#undef BN_STORAGE
#undef BN_T_IS_FLOAT
#undef BN_SFX
#endif

#if BN_WANT_DTYPE(BN_DT_F64)
#define BN_T double
#define BN_AT double
#define BN_STORAGE BN_STORE_NATIVE
#define BN_T_IS_FLOAT 0
#define BN_SFX BN_ISA_CAT(f64_, BN_ISA_SFX)
#include "kernel_body.h"
BN_KERNEL_SET_HERE
#undef BN_T
#undef BN_AT
#undef BN_STORAGE
#undef BN_T_IS_FLOAT
#undef BN_SFX
#endif

/* Half precision: elements stored in 16 bits, arithmetic and per-channel
 * arrays in float (storage.h converts) */
#define BN_T uint16_t
#define BN_AT float
#define BN_T_IS_FLOAT 1
#if BN_WANT_DTYPE(BN_DT_F16)
#define BN_STORAGE BN_STORE_F16
#define BN_SFX BN_ISA_CAT(f16_, BN_ISA_SFX)
#include "kernel_body.h"
BN_KERNEL_SET_HERE
#undef BN_STORAGE
#undef BN_SFX
#endif
#if BN_WANT_DTYPE(BN_DT_BF16)
#define BN_STORAGE BN_STORE_BF16
#define BN_SFX BN_ISA_CAT(bf16_, BN_ISA_SFX)
#include "kernel_body.h"
BN_KERNEL_SET_HERE
#undef BN_STORAGE
#undef BN_SFX
#endif
#undef BN_T
#undef BN_AT
#undef BN_T_IS_FLOAT
#undef BN_KERNEL_SET_HERE

#ifdef BN_ISA_TARGET
#if defined(__clang__)
BN_PRAGMA(clang attribute pop)
#else
BN_PRAGMA(GCC pop_options)
#endif
#endif

#undef BN_PRAGMA
#undef BN_PRAGMA_
#undef BN_ISA_CAT
#undef BN_ISA_CAT_
