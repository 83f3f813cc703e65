/* The inner loops instantiated for the avx2 and avxvnni levels (see simd.h, dispatch.h and isa_table.h):
 * the same loops, and a quantised linear and attention's integer scores with AVX2's or AVX-VNNI's integer
 * dot products (qmatmul_256.h, attention_idots.h). */
#if defined(__x86_64__) || defined(__i386__)
#define VX_LEVEL VX_LEVEL_AVX2
#define VX_TABLE vx_isa_avx2
#define VX_TABLE_LEVEL VX_ISA_AVX2
#define VX_TABLE_QLINEAR vx_qlinear_avx2
#define VX_TABLE_IDOTS attention_idots_avx2
#include "isa_table.h"

#define Q256_VNNI 0
#define Q256_NAME vx_qlinear_avx2
#define Q256_TARGET "avx2,fma,f16c"
#define Q256_FN(f) q256_avx2_##f
#include "qmatmul_256.h"
#undef Q256_VNNI
#undef Q256_NAME
#undef Q256_TARGET
#undef Q256_FN

#define Q256_VNNI 1
#define Q256_NAME vx_qlinear_avxvnni
#define Q256_TARGET "avx2,fma,f16c,avxvnni"
#define Q256_FN(f) q256_vnni_##f
#include "qmatmul_256.h"

const vx_isa vx_isa_avxvnni = {.level = VX_ISA_AVXVNNI, VX_TABLE_ENTRIES, .qlinear = vx_qlinear_avxvnni,
                               .attention_idots = attention_idots_avxvnni};
#endif
