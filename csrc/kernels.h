/* voxtral_ref C kernels: the public prototypes (this file is also the cffi cdef, so it holds only
 * declarations; build_kernels.py strips the preprocessor lines).
 *
 * Conventions for every kernel:
 *   - tensors are dense, row-major (C-contiguous), the last index fastest; shapes are given as [a, b, c];
 *   - activations, biases, norm weights and outputs are float32; products and sums are float32, so the
 *     results equal the NumPy twins in voxtral_ref/runtime/kernels.py up to float32 rounding order (a linear
 *     asked for bf16 precision first rounds its input x to bfloat16, as its twin does);
 *   - weights may be float32, bfloat16 (raw uint16 bits, read in place from the mmap'd checkpoint and
 *     widened exactly in registers) or int8 with float32 group scales;
 *   - outputs never alias inputs;
 *   - the kernels run on the threads set by vx_set_threads and the ISA level chosen by vx_set_isa.
 */
#ifndef VX_KERNELS_H
#define VX_KERNELS_H

#include <stdint.h>

/* ---- runtime (dispatch.c) ---------------------------------------------------------------------- */
enum { VX_ISA_SCALAR = 0, VX_ISA_AVX2 = 1, VX_ISA_AVX512 = 2, VX_ISA_AVX512_BF16 = 3 };

int vx_isa_best(void);                   /* highest level this CPU (and OS) supports */
int vx_set_isa(int level);               /* use min(level, best); returns the level now in use */
int vx_get_isa(void);
const char *vx_isa_name(int level);      /* "scalar", "avx2", "avx512", "avx512bf16" */
const char *vx_isa_detail(int level);    /* one line: what the level uses */
void vx_set_threads(int n);              /* n <= 0: the OpenMP default (one per core) */
int vx_get_threads(void);                /* 1 when built without OpenMP */

/* ---- matmul.c ------------------------------------------------------------------------------------ */
enum { VX_W_F32 = 0, VX_W_BF16 = 1, VX_W_I8 = 2 };
enum { VX_X_F32 = 0, VX_X_BF16 = 1 };

/* y = x @ w.T (+ b)
 *   x      [n, k] float32; xtype VX_X_BF16 rounds it to bfloat16 (nearest even) before the products, the
 *          precision of a bf16 model's matmul inputs. With bf16 weights the products are then exact and
 *          the avx512bf16 level uses the CPU's bf16 dot-product instruction (twice the float32 FMA rate;
 *          it reads subnormal bf16 as 0, a difference below 1e-38 per product).
 *   w      [m, k] of wtype: float32, bfloat16 (uint16 bits) or int8
 *   scales [m, k / group] float32 when wtype is VX_W_I8 (the weight is w[i, j] * scales[i, j / group];
 *          group divides k), else NULL
 *   b      [m] float32 or NULL
 *   y      [n, m] float32
 * n <= 4 streams w once (decode GEMV, memory-bound); larger n runs a packed, cache-blocked GEMM. */
void vx_linear(const float *x, int64_t n, int64_t k, int xtype, const void *w, int wtype, const float *scales,
               int64_t group, int64_t m, const float *b, float *y);

/* Symmetric per-group int8: for each row i and group j of `group` consecutive columns,
 *   scales[i, j] = max|w[i, group j]| / 127,  q = clip(rint(w / scales[i, j]), -127, 127)  (0 where the
 *   group is all zero). w [m, k] float32 or bfloat16 (wtype); q [m, k] int8; scales [m, k / group]. */
void vx_quantize_int8(const void *w, int wtype, int64_t m, int64_t k, int64_t group, int8_t *q, float *scales);

/* ---- attention.c --------------------------------------------------------------------------------- */
/* Causal sliding-window attention with grouped-query heads.
 *   q   [tq, hq, d]    k, v [tk, hkv, d]    out [tq, hq, d]      (hkv divides hq)
 *   q_pos [tq], k_pos [tk]: absolute positions; k_pos in any order (ring-buffer caches).
 *   Key j is visible to query i iff q_pos[i] - window < k_pos[j] <= q_pos[i]; query head h uses kv head
 *   h / (hq / hkv); scores scaled by 1/sqrt(d); softmax online in float32. A query that sees no key
 *   gets NaN, as the twin's softmax over nothing does.
 *   Positions are compared relative to each query block, so the q positions of one call must span less
 *   than 2^23 - window (the Python wrapper checks). */
void vx_attention(const float *q, const float *k, const float *v, float *out, int64_t tq, int64_t tk,
                  int hq, int hkv, int d, const int64_t *q_pos, const int64_t *k_pos, int64_t window);

/* ---- norms.c ------------------------------------------------------------------------------------- */
/* y[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)) for each of `rows` rows; x, y [rows, d], w [d]. */
void vx_rms_norm(const float *x, const float *w, float eps, float *y, int64_t rows, int64_t d);

/* y = a / (1 + exp(-a)) * b elementwise (SwiGLU); a, b, y [n]. */
void vx_silu_mul(const float *a, const float *b, float *y, int64_t n);

/* Rotary embedding into the split-half layout (HF's). For each row r, head j and i < d/2, with
 *   (p, q) = (x[r, j, 2i], x[r, j, 2i + 1]) if interleaved (Mistral's checkpoint layout),
 *            (x[r, j, i], x[r, j, i + d/2]) otherwise:
 *   y[r, j, i] = p cos[r, i] - q sin[r, i],   y[r, j, i + d/2] = q cos[r, i] + p sin[r, i].
 * x, y [t, h, d] (d even); cos, sin [t, d/2]. */
void vx_rope(const float *x, const float *cos, const float *sin, float *y, int64_t t, int h, int d, int interleaved);

#endif
