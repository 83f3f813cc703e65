/* The inner loops instantiated for the avx512 and avx512bf16 levels (see simd.h, dispatch.h and isa_table.h). */
#if defined(__x86_64__) || defined(__i386__)
#define VX_LEVEL VX_LEVEL_AVX512
#define VX_TABLE vx_isa_avx512
#define VX_TABLE_LEVEL VX_ISA_AVX512
#define VX_TABLE_QLINEAR vx_qlinear_avx2   /* no VNNI at this level: the 256-bit AVX2 kernel (isa_avx2.c) */
#include "isa_table.h"

/* the same loops plus the bf16 dot-product GEMM (matmul_simd.h), the VNNI quantised linear (qmatmul_simd.h)
 * and attention's VNNI integer scores (attention_simd.h), for CPUs with AVX512-BF16 (all of which have
 * AVX512-VNNI; dispatch.c checks both) */
const vx_isa vx_isa_avx512_bf16 = {.level = VX_ISA_AVX512_BF16, VX_TABLE_ENTRIES, .gemm_bf16dot = &gemm_bf16dot,
                                   .qlinear = qlinear_vnni, .attention_idots = attention_idots_vnni};

/* the avx512bf16 table with the AMX quantised linear (qmatmul_amx.h) for CPUs with AMX-INT8 */
#include "qmatmul_amx.h"
const vx_isa vx_isa_avx512_amx = {.level = VX_ISA_AVX512_AMX, VX_TABLE_ENTRIES, .gemm_bf16dot = &gemm_bf16dot,
                                  .qlinear = qlinear_amx, .attention_idots = attention_idots_vnni};
#endif
