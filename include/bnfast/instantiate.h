/* Instantiate kernel_body.h for float and double with one instruction set:
 * define BN_VEC_BYTES (SIMD register width) and BN_ISA_SFX (a name token such
 * as avx2), then include this file; the kernels get the suffixes
 * f32_<BN_ISA_SFX> and f64_<BN_ISA_SFX>.  No include guard on purpose. */

#define BN_ISA_CAT_(a, b) a##b
#define BN_ISA_CAT(a, b) BN_ISA_CAT_(a, b)

#define BN_T float
#define BN_T_IS_FLOAT 1
#define BN_SFX BN_ISA_CAT(f32_, BN_ISA_SFX)
#include "kernel_body.h"
#undef BN_T
#undef BN_T_IS_FLOAT
#undef BN_SFX

#define BN_T double
#define BN_T_IS_FLOAT 0
#define BN_SFX BN_ISA_CAT(f64_, BN_ISA_SFX)
#include "kernel_body.h"
#undef BN_T
#undef BN_T_IS_FLOAT
#undef BN_SFX

#undef BN_ISA_CAT
#undef BN_ISA_CAT_
