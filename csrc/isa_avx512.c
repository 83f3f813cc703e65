/* The inner loops instantiated for the avx512 level (see simd.h, dispatch.h and isa_table.h). */
#if defined(__x86_64__) || defined(__i386__)
#define VX_LEVEL VX_LEVEL_AVX512
#define VX_TABLE vx_isa_avx512
#define VX_TABLE_LEVEL VX_ISA_AVX512
#include "isa_table.h"
#endif
