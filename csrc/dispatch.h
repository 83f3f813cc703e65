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

typedef struct {
    int level;
    /* GEMV for n <= VX_GEMV_ROWS: outputs y[:, m0:m1] */
    void (*gemv)(const vx_linear_args *a, int64_t m0, int64_t m1);
    /* GEMM: weight packing (rows j0..j0+nc, columns k0..k0+kc, into NR-wide k-major float32 panels) and
     * the micro-kernel c[MR, NR] (row stride ldc) = (or += if accumulate) sum over kc of a[kc, MR] (outer)
     * b[kc, NR] */
    int gemm_mr, gemm_nr;
    void (*pack_weights)(const vx_linear_args *a, int64_t j0, int64_t nc, int64_t k0, int64_t kc, float *bp);
    void (*gemm_micro)(int64_t kc, const float *a, const float *b, float *c, int64_t ldc, int accumulate);
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

extern const vx_isa vx_isa_scalar, vx_isa_avx2, vx_isa_avx512;

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

void *vx_alloc(size_t bytes);   /* 64-byte aligned; aborts on failure (sizes are small and bounded) */

#endif
