/* One ISA level's table of inner loops. Included by isa_scalar.c, isa_avx2.c and isa_avx512.c, each of
 * which first defines VX_LEVEL (simd.h's vector layer), VX_TABLE (the table's name) and VX_TABLE_LEVEL. */
#include "dispatch.h"
#include "simd.h"

#include "attention_simd.h"
#include "matmul_simd.h"
#include "qmatmul_simd.h"
#include "norms_simd.h"

#define VX_TABLE_ENTRIES                                                                        \
    .gemv = VX_NAME(gemv),                                                                      \
    .gemm = {GEMM_MR, GEMM_NR, 1, VX_NAME(pack_panel), VX_NAME(pack_weights), VX_NAME(gemm_micro)}, \
    .attn_vw = VW,                                                                              \
    .attention_rows = VX_NAME(attention_rows),                                                  \
    .attention_keys = VX_NAME(attention_keys),                                                  \
    .quantize_act = VX_NAME(quantize_act),                                                      \
    .quantize_panel = VX_NAME(quantize_panel),                                                  \
    .rms_norm = VX_NAME(rms_norm),                                                              \
    .silu_mul = VX_NAME(silu_mul)

/* the quantised linear is per table: the portable loop (scalar), the 256-bit integer-dot kernels (avx2,
 * avxvnni, avx512: isa_avx2.c) or the 512-bit VNNI one (avx512bf16) */
#ifndef VX_TABLE_IDOTS
#define VX_TABLE_IDOTS NULL   /* attention's scores by float32 FMAs over the widened codes (the same integers) */
#endif
const vx_isa VX_TABLE = {.level = VX_TABLE_LEVEL, VX_TABLE_ENTRIES, .qlinear = VX_TABLE_QLINEAR,
                         .attention_idots = VX_TABLE_IDOTS};
