/* The inner loops instantiated for the avx2 level (see simd.h, dispatch.h and isa_table.h). */
#if defined(__x86_64__) || defined(__i386__)
#define VX_LEVEL VX_LEVEL_AVX2
#define VX_TABLE vx_isa_avx2
#define VX_TABLE_LEVEL VX_ISA_AVX2
#include "isa_table.h"
#endif
