/* voxtral_ref C kernels: the public prototypes (this file is also the cffi cdef, so it holds only
 * declarations; build_kernels.py strips the preprocessor lines).
 *
 * Conventions for every kernel:
 *   - tensors are dense, row-major (C-contiguous), the last index fastest; shapes are given as [a, b, c];
 *   - activations, biases, norm weights and outputs are float32; products and sums are float32, so the
 *     results equal the NumPy twins in voxtral_ref/runtime/kernels.py up to float32 rounding order (a linear
 *     asked for bf16 precision first rounds its input x to bfloat16, as its twin does);
 *   - weights may be float32, bfloat16 (raw uint16 bits, read in place from the mmap'd checkpoint and
 *     widened exactly in registers), or quantised (int8 / q4 panels, vx_qlinear);
 *   - outputs never alias inputs;
 *   - the kernels run on the threads set by vx_set_threads and the ISA level chosen by vx_set_isa.
 */
#ifndef VX_KERNELS_H
#define VX_KERNELS_H

#include <stdint.h>

/* ---- runtime (dispatch.c) ---------------------------------------------------------------------- */
/* Levels by instruction set, not strictly nested: a CPU may have AVX-512 without AVX-VNNI (Skylake-X, Ice
 * Lake) or AVX-VNNI without AVX-512 (Alder Lake); each level needs what the one below it needs, except that
 * avx512 does not need avxvnni; avx512amx adds AVX512-VBMI, AMX-INT8 and the OS's leave to use the tiles to
 * avx512bf16. An aarch64 family (NEON, dotprod, i8mm) would add its own levels here. */
enum { VX_ISA_SCALAR = 0, VX_ISA_AVX2 = 1, VX_ISA_AVXVNNI = 2, VX_ISA_AVX512 = 3, VX_ISA_AVX512_BF16 = 4, VX_ISA_AVX512_AMX = 5 };

int vx_isa_supported(int level);         /* 1 if this CPU (and OS) can run the level */
int vx_isa_best(void);                   /* highest level this CPU (and OS) supports */
int vx_set_isa(int level);               /* use the highest supported level <= level; returns it */
int vx_get_isa(void);
const char *vx_isa_name(int level);      /* "scalar", "avx2", "avxvnni", "avx512", "avx512bf16", "avx512amx" */
const char *vx_isa_detail(int level);    /* one line: what the level uses */
void vx_set_threads(int n);              /* n <= 0: one per core this process may run on */
enum { VX_TIME_WEIGHTS = 0, VX_TIME_ATTENTION = 1 };   /* what vx_kernel_seconds sums */
double vx_kernel_seconds(int kind);     /* seconds spent since load (benchmarks) in the weight-streaming linears
                                          * (VX_TIME_WEIGHTS: vx_linear, vx_qlinear) or in attention (VX_TIME_ATTENTION:
                                          * vx_attention, and a layer's KV stores and attention in vx_layers_forward) */
int vx_get_threads(void);               /* the threads a region of the calling thread takes */
/* The calling thread's regions take at most *cap threads (*cap <= 0: no cap) from now until
 * vx_follow_cap(NULL); another thread may move *cap meanwhile, and each region reads it as it starts.
 * Two threads of one job share the cores this way (ckernels.CoreShare: a file's encoder running ahead of its
 * decoder, each taking the threads the other leaves). cap must stay valid while followed. */
void vx_follow_cap(const int *cap);

/* ---- matmul.c ------------------------------------------------------------------------------------ */
enum { VX_W_F32 = 0, VX_W_BF16 = 1 };
enum { VX_X_F32 = 0, VX_X_BF16 = 1 };

/* y = x @ w.T (+ b)
 *   x      [n, k] float32; xtype VX_X_BF16 rounds it to bfloat16 (nearest even) before the products, the
 *          precision of a bf16 model's matmul inputs. With bf16 weights the products are then exact and
 *          the avx512bf16 level uses the CPU's bf16 dot-product instruction (twice the float32 FMA rate;
 *          it reads subnormal bf16 as 0, a difference below 1e-38 per product).
 *   w      [m, k] of wtype: float32 or bfloat16 (uint16 bits)
 *   b      [m] float32 or NULL
 *   y      [n, m] float32
 * n <= 4 streams w once (decode GEMV, memory-bound); larger n runs a packed, cache-blocked GEMM. */
void vx_linear(const float *x, int64_t n, int64_t k, int xtype, const void *w, int wtype, int64_t m, const float *b,
               float *y);

/* ---- qmatmul.c: quantised weights ---------------------------------------------------------------
 * Formats (specified by voxtral_ref/runtime/quant.py): weights [m, k] in panels of 16 rows, uint8
 * [ceil(m / 16), vx_qpanel_bytes(fmt, k)], k a multiple of 32 (and of 256 past 256):
 *   VX_Q_INT8  per block of 32 inputs: 16 float16 scales, then 8 steps x 16 rows x 4 bytes (q + 128)
 *   VX_Q_Q4    per super-block of 256 inputs (or all k if fewer): float16 d[16], dmin[16], 6-bit codes
 *              (192 bytes), then per block of 32 inputs 256 bytes of nibbles (see quant.py)
 * Activations: x [n, k] float32 -> xq [n, k] int8, sx [n, k / block] float32, xsum [n, k / block] int32:
 *   sx = max|x| / 127 per block, xq = rint(x / sx) (0 for an all-zero block), xsum = the block's sum of xq.
 *   The linears use blocks of 32 for int8 weights and of one super-block for q4 weights; the int8 KV caches
 *   (and attention's queries) one block per head row. */
enum { VX_Q_INT8 = 0, VX_Q_Q4 = 1 };

int64_t vx_qpanel_bytes(int fmt, int64_t k);

void vx_quantize_act(const float *x, int64_t n, int64_t k, int64_t block, int8_t *xq, float *sx, int32_t *xsum);

/* w [m, k] float32 or bfloat16 (wtype) -> out [ceil(m / 16), vx_qpanel_bytes] (rows past m are zero),
 * bit for bit what quant.quantize_int8_np / quantize_q4_np give. */
void vx_quantize_weights(const void *w, int wtype, int64_t m, int64_t k, int fmt, uint8_t *out);

/* y [n, m] = x [n, k] @ w.T (+ b [m] or NULL), x quantised as above; the integer sums are exact and y is
 * quant.py's float sum over blocks (int8) or super-blocks (q4), accumulated in float32 in order. A row's
 * result is the same for any n. */
void vx_qlinear(const float *x, int64_t n, int64_t k, const uint8_t *w, int fmt, int64_t m, const float *b, float *y);

/* ---- attention.c --------------------------------------------------------------------------------- */
/* Causal sliding-window attention with grouped-query heads.
 *   q   [tq, hq, d] float32    out [tq, hq, d] float32      (hkv divides hq)
 *   k, v [tk, hkv, d] of kvtype:
 *     VX_KV_F32   float32 (k_scale, v_scale NULL)
 *     VX_KV_INT8  int8 codes with one float32 scale per (key, kv head) row, k_scale / v_scale [tk, hkv]
 *                 (the compact caches of the quantised modes: a row is scale * codes, quantised as the
 *                 activations are, one block per row). The codes are stored in blocks of VX_KV8_BLOCK
 *                 keys, head-major within a block: [ceil(tk / 32), hkv, 32, d] (vx_kv8_row), so a block's
 *                 rows of one head are contiguous and read in place. The queries are quantised the same way, so a
 *                 score is the exact integer (q codes . k codes) * (q scale / sqrt(d)) * the key's scale,
 *                 whatever the call (integer dot products at the avx2 levels and avx512bf16, float32
 *                 sums of the codes elsewhere, exact below 2^24); the values' scales multiply the probabilities.
 *   q_pos [tq], k_pos [tk]: absolute positions; k_pos in any order (ring-buffer caches).
 *   Key j is visible to query i iff q_pos[i] - window < k_pos[j] <= q_pos[i]; query head h uses kv head
 *   h / (hq / hkv); scores scaled by 1/sqrt(d); softmax online in float32. A query that sees no key
 *   gets NaN, as the twin's softmax over nothing does.
 *   Positions are compared relative to each query block, so the q positions of one call must span less
 *   than 2^23 - window (the Python wrapper checks). */
enum { VX_KV_F32 = 0, VX_KV_INT8 = 1 };
enum { VX_KV8_BLOCK = 32 };   /* kernels.KV8_BLOCK */
void vx_attention(const float *q, const void *k, const void *v, const float *k_scale, const float *v_scale, int kvtype,
                  float *out, int64_t tq, int64_t tk, int hq, int hkv, int d, const int64_t *q_pos,
                  const int64_t *k_pos, int64_t window);
/* The active level's integer score kernel, the one vx_attention uses over an int8 cache (exposed for its
 * test against the exact integer products): s [nrows, nk] int32 = q [nrows, d] int8 . k [nk, d] int8, codes
 * in -127..127, nk a multiple of 16, d a multiple of 64 up to 256. Returns 0 (s untouched) where the level
 * has none and vx_attention sums the codes in float32. */
int vx_attention_idots(const int8_t *q, int nrows, const int8_t *k, int nk, int d, int32_t *s);

/* ---- layer.c: one transformer layer in one call -------------------------------------------------- */
/* A weight matrix [m, k]: float32 or bfloat16 rows (vx_linear), or int8 / q4 panels (vx_qlinear). */
enum { VX_MAT_F32 = 0, VX_MAT_BF16 = 1, VX_MAT_INT8 = 2, VX_MAT_Q4 = 3 };
typedef struct {
    const void *data;
    int kind;
    int64_t m, k;
} vx_mat;

/* One layer's shapes and tensors (voxtral_ref/stages/encoder.py, decoder.py): pre-RMSNorm attention with
 * RoPE (split-half output; `interleaved`: Mistral's q/k row layout) and a sliding window, then a
 * pre-RMSNorm SwiGLU MLP. Biases NULL where the checkpoint has none. */
typedef struct {
    int dim, n_heads, n_kv_heads, head_dim, interleaved;
    int64_t window;
    float eps;
    const float *attention_norm, *ffn_norm;    /* [dim] */
    vx_mat wq, wk, wv, wo, w1, w3, w2;
    const float *bq, *bv, *bo, *b2;
} vx_layer;

/* A layer's KV ring (voxtral_ref/stages/attention.py KVCache): k, v [capacity, n_kv_heads, head_dim] of
 * kvtype (int8: in vx_attention's blocks), their scales [capacity, n_kv_heads] (VX_KV_INT8), pos [capacity] (-1: unwritten), `filled` live
 * slots (updated here). capacity 0: no ring, the chunk attends to itself (a whole sequence at once). */
typedef struct {
    void *k, *v;
    float *k_scale, *v_scale;
    int64_t *pos;
    int64_t capacity, filled;
    int kvtype;
} vx_kv_ring;

/* h [t, dim] <- layers L[0], L[1], ... L[n_layers - 1] applied to h in turn (in place): the rows of nseq
 * sequences stacked (seq_rows [nseq] rows each, in order), every weight once over all of them, attention
 * per sequence against its own ring (layer i's: rings [i * nseq .. i * nseq + nseq - 1]); rows at absolute
 * positions pos [t]; cos, sin [t, head_dim / 2] their RoPE angles; ada [n_layers, t, dim] the decoder's
 * AdaRMSNorm scale of each layer and row, or NULL; xtype the float weights' input precision (VX_X_F32 /
 * VX_X_BF16). A sequence's keys and values go into its ring (slot = pos % capacity) before it attends, as
 * KVCache.update does. */
void vx_layers_forward(const vx_layer *const *L, int n_layers, float *h, int64_t t, const int64_t *pos, const float *cos,
                       const float *sin, const float *ada, int xtype, int nseq, const int64_t *seq_rows,
                       vx_kv_ring *const *rings);

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
