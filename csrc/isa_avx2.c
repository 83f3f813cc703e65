/* The inner loops instantiated for the avx2 level (see simd.h and dispatch.h). */
#if defined(__x86_64__) || defined(__i386__)
#define VX_LEVEL VX_LEVEL_AVX2
#include "dispatch.h"
#include "simd.h"

#include "attention_simd.h"
#include "matmul_simd.h"
#include "norms_simd.h"

const vx_isa vx_isa_avx2 = {
    .level = VX_ISA_AVX2,
    .gemv = VX_NAME(gemv),
    .gemm_mr = GEMM_MR,
    .gemm_nr = GEMM_NR,
    .pack_weights = VX_NAME(pack_weights),
    .gemm_micro = VX_NAME(gemm_micro),
    .quantize_int8 = VX_NAME(quantize_int8),
    .attn_vw = VW,
    .attention_rows = VX_NAME(attention_rows),
    .attention_keys = VX_NAME(attention_keys),
    .rms_norm = VX_NAME(rms_norm),
    .silu_mul = VX_NAME(silu_mul),
};
#endif
