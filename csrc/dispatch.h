/* Internal: the table of ISA-specific inner loops and the helpers the drivers share.
 *
 * Each family has a driver (matmul.c, attention.c, norms.c: argument handling, blocking, threads;
 * compiled once, baseline flags) and ISA-generic inner loops (*_simd.h, written against simd.h) that
 * isa_scalar.c, isa_avx2.c and isa_avx512.c instantiate once per level into a `vx_isa` table.
 * dispatch.c picks the table at run time. */
#ifndef VX_DISPATCH_H
#define VX_DISPATCH_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

typedef struct {
    const float *x;         /* [n, k] */
    int64_t n, k, m;
    int xtype;              /* VX_X_F32 or VX_X_BF16 (x rounded to bfloat16 first) */
    const void *w;          /* [m, k] of wtype */
    int wtype;
    const float *scales;    /* [m, k / group] for int8 */
    int64_t group;
    const float *b;         /* [m] or NULL */
    float *y;               /* [n, m] */
} vx_linear_args;

typedef struct {
    const float *q, *k, *v; /* [tq, hq, d], [tk, hkv, d], [tk, hkv, d] */
    float *out;             /* [tq, hq, d] */
    int64_t tq, tk, window;
    int hq, hkv, d;
    const int64_t *q_pos, *k_pos;
    int k_sorted;           /* k_pos ascending: each query block's keys are one contiguous run */
    float scale;
} vx_attention_args;

/* A GEMM micro-kernel and its weight packing. Both operands are packed k-major into 32-bit elements that
 * hold `kstep` consecutive k values: one float32 (kstep 1) or a pair of bf16 (kstep 2, the lower k in the
 * low half, the layout of the bf16 dot-product instruction).
 *   pack_panel: MR activation rows -> an activation panel ap[step][MR]
 *   pack_weights: weight rows j0..j0+nc, columns k0..k0+kc -> NR-wide panels bp[panel][step][NR]
 *   micro: c[MR, NR] (row stride ldc) = (or += if accumulate) sum over `steps` of a[step, MR] (outer)
 *          b[step, NR] */
typedef struct {
    int mr, nr, kstep;
    /* an activation panel: `rows` (<= MR) rows of x (row stride ldx), kc values each (rounded to bf16 first
     * if xtype says so), into dst[step][MR]; rows past `rows` are 0 */
    void (*pack_panel)(const float *x, int64_t ldx, int rows, int64_t kc, int xtype, uint32_t *dst);
    void (*pack_weights)(const vx_linear_args *a, int64_t j0, int64_t nc, int64_t k0, int64_t kc, void *bp);
    void (*micro)(int64_t steps, const void *a, const void *b, float *c, int64_t ldc, int accumulate);
} vx_gemm_kernel;

typedef struct {
    int level;
    /* GEMV for n <= VX_GEMV_ROWS: outputs y[:, m0:m1] */
    void (*gemv)(const vx_linear_args *a, int64_t m0, int64_t m1);
    /* GEMM on float32 (weights widened when packed); gemm_bf16dot, where not NULL, multiplies bf16 x by
     * bf16 weights directly (used for VX_X_BF16 with bf16 weights) */
    vx_gemm_kernel gemm;
    const vx_gemm_kernel *gemm_bf16dot;
    /* vx_quantize_int8 for rows [m0, m1) */
    void (*quantize_int8)(const void *w, int wtype, int64_t m0, int64_t m1, int64_t k, int64_t group, int8_t *q,
                          float *scales);
    /* attention (attention_simd.h). More than attn_vw rows per kv head: rows [row0, row0 + 2 * attn_vw)
     * of kv head hk, scratch of 4 * attn_vw * d + d floats. At most attn_vw rows (all tq * hq / hkv of
     * them): keys [j0, j1) of every kv head into a partial state (m [hkv][nrows], l [hkv][nrows],
     * o [hkv][nrows][d]), scratch of (2 * attn_vw + 1) * d floats. */
    int attn_vw;
    void (*attention_rows)(const vx_attention_args *a, int hk, int64_t row0, float *scratch);
    void (*attention_keys)(const vx_attention_args *a, int64_t j0, int64_t j1, int nrows, float *state, float *scratch);
    void (*rms_norm)(const float *x, const float *w, float eps, float *y, int64_t rows, int64_t d);
    void (*silu_mul)(const float *a, const float *b, float *y, int64_t n);
} vx_isa;

#define VX_GEMV_ROWS 4

extern const vx_isa vx_isa_scalar, vx_isa_avx2, vx_isa_avx512, vx_isa_avx512_bf16;

const vx_isa *vx_active(void);

/* Threads worth using for `work` (roughly: elements touched); small calls stay on the calling thread
 * because waking the team costs more than they do. */
int vx_threads_for(double work);

/* [lo, hi) of 0..n for thread t of nt, boundaries on multiples of `align`. */
static inline void vx_split(int64_t n, int64_t align, int t, int nt, int64_t *lo, int64_t *hi) {
    int64_t blocks = (n + align - 1) / align;
    *lo = blocks * t / nt * align;
    *hi = blocks * (t + 1) / nt * align;
    if (*hi > n) *hi = n;
    if (*lo > n) *lo = n;
}

/* [j_lo, j_hi): the keys a query in [qmin, qmax] can see, by binary search when k_pos is sorted, else
 * all of them (masking sorts out the rest). */
static inline void vx_key_range(const vx_attention_args *a, int64_t qmin, int64_t qmax, int64_t *j_lo, int64_t *j_hi) {
    *j_lo = 0, *j_hi = a->tk;
    if (!a->k_sorted) return;
    int64_t lo = 0, hi = a->tk;
    while (lo < hi) {  /* first key with k_pos > qmin - window */
        int64_t mid = (lo + hi) / 2;
        if (a->k_pos[mid] > qmin - a->window) hi = mid; else lo = mid + 1;
    }
    *j_lo = lo;
    hi = a->tk;
    while (lo < hi) {  /* first key with k_pos > qmax */
        int64_t mid = (lo + hi) / 2;
        if (a->k_pos[mid] > qmax) hi = mid; else lo = mid + 1;
    }
    *j_hi = lo;
}

/* float32 -> bfloat16 bits, rounding to nearest even as ml_dtypes does; NaN stays a (quiet) NaN */
static inline uint16_t vx_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float vx_round_bf16(float f) {
    uint32_t u = (uint32_t)vx_f32_to_bf16(f) << 16;
    memcpy(&f, &u, sizeof f);
    return f;
}

void *vx_alloc(size_t bytes);   /* 64-byte aligned; aborts on failure (sizes are small and bounded) */

#endif
