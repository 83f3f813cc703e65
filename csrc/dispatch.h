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
#include <time.h>

#include "kernels.h"

/* pool.c: the kernels' threads, one team shared by every caller (see there why not OpenMP) */
typedef void (*vx_task_fn)(void *ctx, int tid, int nt);
void vx_parallel(int nt, vx_task_fn fn, void *ctx);   /* fn(ctx, tid, nt) for tid 0 .. nt-1 (0 on the caller) */
void vx_team_barrier(int nt);                          /* inside a region of nt threads: wait for all of them */
int vx_cpus(void);                                     /* the cores this process may run on */
int vx_in_region(void);                                /* inside a region: one started here runs on this thread alone */
/* dynamic scheduling inside a region: the next `step` tasks from a counter the region's threads share */
static inline int64_t vx_next_tasks(int64_t *counter, int64_t step) { return __atomic_fetch_add(counter, step, __ATOMIC_RELAXED); }

typedef struct {
    const float *x;         /* [n, k] */
    int64_t n, k, m;
    int xtype;              /* VX_X_F32 or VX_X_BF16 (x rounded to bfloat16 first) */
    const void *w;          /* [m, k] of wtype */
    int wtype;
    const float *b;         /* [m] or NULL */
    float *y;               /* [n, m] */
} vx_linear_args;

/* most keys per super-block of attention_keys (vx_att_sb) */
enum { VX_ATT_SB_MAX = 256 };
enum { VX_ATT_DMAX = 256 };   /* head sizes attention_idots takes (multiples of 64 up to this) */
/* by_keys' key ranges (attention.c) are a power of two between 128 and VX_ATT_SB_MAX keys, so they divide
 * this. A ring cache (stages/attention.py KVCache) whose capacity is a multiple of it, and at least the
 * window + VX_ATT_ALIGN - 1, holds in each aligned range, as far as any one query sees, consecutive
 * positions of one lap: the same keys, in the same order, as any other such ring. */
enum { VX_ATT_ALIGN = 256 };
/* the offset of key j, kv head hk's codes in an int8 cache's blocks (kernels.h VX_KV_INT8) */
static inline int64_t vx_kv8_row(int64_t j, int hk, int hkv, int d) {
    return ((j / VX_KV8_BLOCK * hkv + hk) * VX_KV8_BLOCK + j % VX_KV8_BLOCK) * d;
}

/* Keys per super-block of attention_keys, a power of two (16..256); the online softmax updates once per
 * super-block. A float32 cache's K and V rows of one head are copied into L1: 32 KB at most. An int8
 * cache's super-block, every kv head's K and V, is loaded in one burst first (attention_keys_d): 256 KB
 * (a quarter of L2), the size that read fastest (a full-window decoder call, 8 kv heads of 128: 32 keys
 * 0.85 ms, 64 0.84, 128 0.75, 256 0.75; the encoder's 750-frame step, 32 kv heads of 64: 64 keys 0.248
 * ms, 128 0.249, 256 0.272). A function of the shapes only: every level and call groups keys alike. */
static inline int vx_att_sb(int d, int hkv, int kvtype) {
    const int64_t bytes_per_key = kvtype == VX_KV_INT8 ? 2 * (int64_t)hkv * d : 2 * (int64_t)d * (int64_t)sizeof(float);
    const int64_t limit = kvtype == VX_KV_INT8 ? 256 << 10 : 32 << 10;
    int sb = VX_ATT_SB_MAX;
    while (sb > 16 && sb * bytes_per_key > limit) sb /= 2;
    return sb;
}

/* a task of attention_keys: keys [j0, j1) of kv heads [h0, h1) */
typedef struct {
    int64_t j0, j1;
    int h0, h1;
} vx_key_task;

/* calls of at most this many queries (a decode step and its drafts: generate.MAX_DRAFT + 1) run per query
 * group by keys (attention.c), so each query's result equals the one it gets in a call of its own */
enum { VX_ATT_FEW_QUERIES = 16 };

/* rows of scratch the attention rows kernel widens an int8 cache's keys and values into (2 per key of a block) */
enum { VX_ATT_CONV = 16 };

typedef struct {
    const float *q;         /* [tq, hq, d] */
    const void *k, *v;      /* [tk, hkv, d] of kvtype: float32, or int8 codes in blocks (vx_kv8_row) */
    const float *ks, *vs;   /* VX_KV_INT8: the rows' scales [tk, hkv]; else NULL */
    int kvtype;
    float *out;             /* [tq, hq, d] */
    int64_t tq, tk, window;
    int hq, hkv, d;
    const int64_t *q_pos, *k_pos;
    int k_sorted;           /* k_pos ascending: each query block's keys are one contiguous run */
    float scale;            /* 1 / sqrt(d) */
    /* VX_KV_INT8: the queries quantised as the keys are (one block per head row), so a score's dot product
     * is an exact integer: codes qc [tq, hq, d], and per row qk = its scale / sqrt(d), qsum its codes' sum */
    const int8_t *qc;
    const float *qk;
    const int32_t *qsum;
    /* VX_KV_INT8: read each super-block's K and V once in a burst before computing on them (1: the cache is
     * read from memory), or not (0: several query groups sweep a cache small enough to stay cached; see
     * VX_ATT_SHARED_BYTES) */
    int kv_touch;
    /* the level's vx_isa.attention_idots (NULL: scores by float32 FMAs, exact on these integers too) */
    void (*idots)(const int8_t *const *kb, int sb, int d, const int8_t *const *q, const int32_t *qsum, int nrows, int32_t *s);
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

enum { VX_QPANEL = 16, VX_QBLOCK = 32, VX_QSUPER = 256, VX_Q4_HEAD = 256, VX_Q4_CANDIDATES = 10 };  /* quant.py */

/* rows of zeros after the last row of a linear's q4 activation codes: the AMX kernel's A tile reads 16 rows */
enum { VX_QPAD_ROWS = 16 };

/* How far ahead the quantised kernels prefetch their panels: 4 q4 super-blocks, 9216 bytes. Counted in
 * blocks instead, int8's 4 x 544 bytes arrived too late once a block's arithmetic served 4-8 rows (1 thread,
 * DRAM: an 8-row pass 855 -> 513 us, 4 rows 576 -> 439; q4 unchanged). */
#define VX_QPREFETCH (4 * (VX_Q4_HEAD + 8 * VX_QPANEL * VX_QBLOCK / 2))

/* Share `part` of `parts` of the `bytes` of panel data at p, prefetched VX_QPREFETCH bytes ahead (the
 * hardware prefetcher alone let the AVX-512 q4 kernel's unpacking and the DRAM reads take turns: 33 -> 65
 * GB/s at n = 1 with a 75-80 GB/s probe, bench/bench_kernels.py). The q4 kernels spread a super-block's 36
 * lines over its 8 blocks (the AMX kernel; the VNNI and 256-bit ones use vx_q4_prefetch): asked for at its
 * start, the burst held the core (11 % of a hot n = 1 AVX-512 pass sampled on the instruction after the
 * prefetch). `to_l2`: into L2 only (PREFETCHT2), not L1 as
 * non-temporal (PREFETCHNTA), for q4 and for int8 passes of 4+ rows. Measured from DRAM (24 matrices
 * 9216 x 3072, both builds alternated in one process, medians of 12-40 rounds; the eighteenth session's
 * Zen 5, copy probe 30-50 GB/s):
 *   spread, avx512bf16, 2 threads:  n = 1 / 4 / 8  19.6 / 12.8 / 10.1 -> 27.1 / 18.5 / 15.4 GB/s
 *   spread, avx2 level, same host:  n = 1 / 4 / 8  18.7 / 11.4 / 7.2 -> 21.3 / 14.3 / 8.4 (Zen 3 not measured)
 *   q4 into L2, 2 threads:          n = 1 / 4 / 8 / 16  33.2 / 22.5 / 17.1 / 8.9 -> 39.1 / 28.3 / 19.1 / 9.4;
 *                 1 thread:         n = 1 / 4  14.9 / 9.8 -> 18.6 / 14.9; in cache no change;
 *                 avx2 level:       n = 1 / 4 / 8  19.0 / 14.3 / 8.5 -> 22.3 / 16.8 / 9.0
 *   int8 into L2: n = 1 30.4 -> 28.8 (2 threads), 23.4 -> 18.3 (1 thread), n = 8 19.5 -> 27.3: so int8
 *   goes into L2 only where a pass serves 4 or more rows: n = 1 / 4 / 8 / 16 29.1 / 23.6 / 17.6 / 12.3 ->
 *   29.7 / 25.9 / 25.7 / 16.1 (2 threads), n = 4 / 8 12.4 / 9.0 -> 17.1 / 15.4 (1 thread), avx2 n = 4 +11 %.
 * int8's blocks are 9 lines: spread over a block's 8 dot steps, no difference.
 * On Intel cores (the twentieth session's Xeon with AMX, copy probe 30 GB/s) the non-temporal hint starves
 * the stream, so there every weight stream goes into L2 (vx_stream_l2): int8 n = 1 / 2 10.7 / 11.2 ->
 * 27.7-29.5 / 26.4-29.1 GB/s, the bf16 GEMV (matmul_simd.h) n = 1 / 2 11.3-11.9 / 14.5 -> 28.4-31.1 /
 * 24.1-24.8 (24 matrices 9216 x 3072, 2 threads, both builds alternated). The likely cause, not checked
 * (that guest has no cycle counters): an NTA line holds one of the core's few L1 fill buffers for its whole
 * trip from DRAM, where L2 prefetches queue deeper. */
extern int vx_stream_l2;   /* 1 on Intel: set with the ISA level (dispatch.c) */

static inline void vx_qprefetch(const uint8_t *p, int64_t bytes, int64_t part, int64_t parts, int to_l2) {
    const int64_t lines = (bytes + 63) / 64;
    for (int64_t l = lines * part / parts; l < lines * (part + 1) / parts; l++) {
        if (to_l2 || vx_stream_l2) __builtin_prefetch(p + VX_QPREFETCH + 64 * l, 0, 1);
        else __builtin_prefetch(p + VX_QPREFETCH + 64 * l, 0, 0);
    }
}

/* The VNNI and 256-bit q4 kernels' prefetches, into L2 like the spread: one line per 64 weight bytes they
 * read (the v-th 64 bytes of block bb's nibbles at u), and the super-block header's 4 lines at h, one a block
 * (line bb % 4, so blocks 4-7 ask again for lines already on their way): the spread's lines without its two
 * divisions and loop per block. Measured on the
 * twenty-first session's Xeon (24 q4 matrices 9216 x 3072 from memory, 2 threads, both builds alternated in
 * processes, probe 29-31 GB/s), n = 1 / 4 / 8 in GB/s:
 *   avx512bf16  23.6-24.4 / 20.0-20.4 / 15.8-17.0 -> 25.1-25.6 / 22.3-22.6 / 17.3-18.1
 *   avx2        18.0-18.6 / 13.4-13.8 / 8.4-8.7   -> 21.2-21.9 / 14.7-15.5 / 8.5-9.3
 *   avxvnni     17.3-17.9 / 13.4-13.9 / 8.5-8.8   -> 19.0-21.0 / 15.6-16.2 / 9.4-9.7
 * and in L1 on one thread (a C probe of the AVX-512 kernel) 27.5 -> 25.7 cycles a block at n = 1, 22
 * without any prefetch. The AMX kernel keeps the spread: these 4-5 prefetches in a row per block, ahead of
 * its B tiles' building, made its 12 / 16 / 32-row passes 12.1 / 11.1 / 8.2 -> 9.3 / 8.5 / 6.6 GB/s.
 * The header's lines were first asked for only in blocks 0-3 (bb < 4): GCC 12 then peeled those 4 blocks
 * out of the loop and, in the peeled copies, stored each 64 bytes of nibbles to the stack and loaded them
 * back for the two unpacking steps. Without the condition the loop stays whole: the twenty-third session's
 * Zen 4 (AMD EPYC, family 25 model 17), one thread, 256 x 3072 in L2, n = 1: 5.7-6.5 -> 4.7-4.8 cycles per 64
 * bytes (three alternated runs, a C probe); n >= 2 unchanged. */
static inline void vx_q4_prefetch(const uint8_t *h, const uint8_t *u, int64_t bb, int v) {
    __builtin_prefetch(u + VX_QPREFETCH + 64 * v, 0, 1);
    if (v == 0) __builtin_prefetch(h + VX_QPREFETCH + 64 * (bb & (VX_Q4_HEAD / 64 - 1)), 0, 1);
}

static inline int64_t vx_q4_blocks_per_super(int64_t k) { return (k < VX_QSUPER ? k : VX_QSUPER) / VX_QBLOCK; }

/* x quantised for a linear (quant.py): int8 matrices take xq, sx, xoff (blocks of 32); q4 matrices take xq4
 * and sx4 (blocks of one super-block, nb * 32 inputs) and xpair, the sums of xq4 over its blocks b and b + 4
 * of each super-block as one int32 of two int16 halves (b low, b + 4 high; 0 past nb), the operand of an
 * int16 pair dot product with the two blocks' 6-bit offset codes. */
typedef struct {
    const int8_t *xq;       /* [n, k] */
    const float *sx;        /* [n, k / 32] */
    const int32_t *xoff;    /* [n, k / 32]: -128 xsum, the term the weights' unsigned bytes (w + 128) add */
    const int8_t *xq4;      /* [n, k] */
    const float *sx4;       /* [n, k / (nb * 32)] */
    const int32_t *xpair;   /* [n, k / (nb * 32), 4] */
    int64_t n, k, m;
    const uint8_t *w;       /* panels */
    int fmt;
    int64_t panel_bytes;
    const float *b;         /* [m] or NULL */
    float *y;               /* [n, m] */
} vx_qlinear_args;

typedef struct {
    int level;
    /* GEMV for n <= VX_GEMV_ROWS: outputs y[:, m0:m1] */
    void (*gemv)(const vx_linear_args *a, int64_t m0, int64_t m1);
    /* GEMM on float32 (weights widened when packed); gemm_bf16dot, where not NULL, multiplies bf16 x by
     * bf16 weights directly (used for VX_X_BF16 with bf16 weights) */
    vx_gemm_kernel gemm;
    const vx_gemm_kernel *gemm_bf16dot;
    /* attention (attention_simd.h). More than attn_vw rows per kv head: rows [row0, row0 + 2 * attn_vw)
     * of kv head hk, scratch of 4 * attn_vw * d + d floats. At most attn_vw rows (all tq * hq / hkv of
     * them): keys [j0, j1) of every kv head into a partial state (m [hkv][nrows], l [hkv][nrows],
     * o [hkv][nrows][d]), scratch as by_keys (attention.c) allocates it. */
    int attn_vw;
    void (*attention_rows)(const vx_attention_args *a, int hk, int64_t row0, float *scratch);
    /* keys [j0, j1) of kv heads [h0, h1) (their slices of the state); with an int8 cache read from memory
     * (kv_touch), the first super-block's K and V loaded in a burst if `burst`, each next super-block's
     * (after the last, the first of the thread's next task, `next`: none if empty) prefetched a line or two
     * at a time through the arithmetic */
    void (*attention_keys)(const vx_attention_args *a, vx_key_task task, int nrows, float *state, float *scratch,
                           int burst, vx_key_task next);
    /* NULL, or the integer dot products of an int8 cache's keys with int8 queries (VNNI): kb[j] key j's d
     * codes (d a multiple of 64, sb of 16), q[r] row r's d codes and qsum[r] their sum -> s [nrows][sb] */
    void (*attention_idots)(const int8_t *const *kb, int sb, int d, const int8_t *const *q, const int32_t *qsum, int nrows,
                            int32_t *s);
    /* quantised linears (qmatmul_simd.h): panels [p0, p1) for all n rows; one panel of weights, one
     * activation format; and the quantisers */
    void (*qlinear)(const vx_qlinear_args *a, int64_t p0, int64_t p1);
    void (*quantize_act)(const float *x, int64_t n, int64_t k, int64_t block, int8_t *xq, float *sx, int32_t *xsum);
    void (*quantize_panel)(const void *w, int wtype, int64_t row0, int64_t rows, int64_t k, int fmt, uint8_t *out);
    void (*rms_norm)(const float *x, const float *w, float eps, float *y, int64_t rows, int64_t d);
    void (*silu_mul)(const float *a, const float *b, float *y, int64_t n);
} vx_isa;

#define VX_GEMV_ROWS 4

extern const vx_isa vx_isa_scalar, vx_isa_avx2, vx_isa_avxvnni, vx_isa_avx512, vx_isa_avx512_bf16, vx_isa_avx512_amx;

/* vx_qlinear for up to VX_QLINEARS_MAX matrices of one input (a layer's q/k/v, or w1/w3): the input
 * quantised once and one team of threads over all their panels; each y_i as vx_qlinear gives it */
enum { VX_QLINEARS_MAX = 3 };
void vx_qlinear_many(const float *x, int64_t n, int64_t k, int count, const uint8_t *const *w, const int *fmt,
                     const int64_t *m, const float *const *b, float *const *y);

/* the 256-bit quantised linears (qmatmul_256.h), shared by the avx2, avxvnni and avx512 tables */
void vx_qlinear_avx2(const vx_qlinear_args *a, int64_t p0, int64_t p1);
void vx_qlinear_avxvnni(const vx_qlinear_args *a, int64_t p0, int64_t p1);

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

/* float32 -> float16 bits, rounding to nearest even as NumPy's astype(float16) does (subnormals, overflow to
 * inf; NaN stays NaN); and back, exactly */
static inline uint16_t vx_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;                            /* NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00u;                           /* rounds past 65504: inf */
    if (a < 0x38800000u) {                                                 /* below 2^-14: subnormal or 0 */
        if (a < 0x33000000u) return sign;                                  /* below half the smallest: 0 */
        const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
        const int shift = 126 - (int)(a >> 23);                            /* value = h * 2^-24: 14..24 */
        const uint32_t h = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        return sign | (uint16_t)(h + (rem > half || (rem == half && (h & 1))));
    }
    const uint32_t h = ((a - 0x38000000u) >> 13), rem = a & 0x1fffu;
    return sign | (uint16_t)(h + (rem > 0x1000u || (rem == 0x1000u && (h & 1))));
}

static inline float vx_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, mant = h & 0x3ffu;
    uint32_t u;
    if (e == 0x1f) u = sign | 0x7f800000u | mant << 13;
    else if (e) u = sign | (e + 112) << 23 | mant << 13;
    else {
        float f = (float)mant * 5.9604644775390625e-8f;                    /* mant * 2^-24, exact */
        memcpy(&u, &f, sizeof u);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float vx_round_bf16(float f) {
    uint32_t u = (uint32_t)vx_f32_to_bf16(f) << 16;
    memcpy(&f, &u, sizeof f);
    return f;
}

void *vx_alloc(size_t bytes);   /* 64-byte aligned; aborts on failure (sizes are small and bounded) */

/* monotonic nanoseconds; the time spent inside the weight-streaming linears and inside attention is summed
 * per kind (vx_count_ns, vx_kernel_seconds) */
static inline int64_t vx_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}
void vx_count_ns(int kind, int64_t ns);
/* vx_attention without adding its time to VX_TIME_ATTENTION (layer.c counts a layer's attention once,
 * whichever threads ran its sequences) */
void vx_attention_uncounted(const float *q, const void *k, const void *v, const float *k_scale, const float *v_scale,
                            int kvtype, float *out, int64_t tq, int64_t tk, int hq, int hkv, int d, const int64_t *q_pos,
                            const int64_t *k_pos, int64_t window);

#endif
