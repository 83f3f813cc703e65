/* The inner loops instantiated for the scalar level (see simd.h, dispatch.h and isa_table.h). */
#define VX_LEVEL VX_LEVEL_SCALAR
#define VX_TABLE vx_isa_scalar
#define VX_TABLE_LEVEL VX_ISA_SCALAR
#define VX_TABLE_QLINEAR qlinear_scalar
#include "isa_table.h"
