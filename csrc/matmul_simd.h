/* Inner loops of vx_linear, written once against simd.h and instantiated per ISA level (isa_*.c).
 * The driver (matmul.c) owns argument checks, blocking, packing and threads. */

/* ---- GEMV: n <= 4 activation rows, streaming the weight rows once -----------------------------------
 * Memory-bound for one row: each thread walks its weight rows one at a time, a single sequential stream
 * the hardware prefetcher follows best (several interleaved row streams measured ~25% slower). With 2-4
 * activation rows the loads of x become the limit, so up to four weight rows share each x load.
 * Weights are widened to float32 in registers; x stays float32 (quantised weights have their own kernels,
 * qmatmul_simd.h). U vectors of k per step give NX * R * U independent accumulators (within three quarters
 * of the register file) to hide the FMA latency. */

VX_INLINE vf gemv_load_w(const void *w, int wtype, int64_t i) {
    if (wtype == VX_W_BF16) return vx_load_bf16((const uint16_t *)w + i);
    return vx_load((const float *)w + i);
}

static inline float gemv_load_w1(const void *w, int wtype, int64_t i) {
    if (wtype == VX_W_BF16) return vx_bf16_to_f32(((const uint16_t *)w)[i]);
    return ((const float *)w)[i];
}

#define GEMV_ACC (VW == 8 ? 8 : 16)
/* Software prefetch, 4 KB ahead in each weight row, non-temporal so the streamed weights do not evict x
 * from L1: without it a row of K = 9216 (x = 36 KB) ran at 55% of the read bandwidth, with it at 85%.
 * Into L2 on Intel cores instead (vx_stream_l2, dispatch.h). */
#define GEMV_PREFETCH 4096
/* U = 2 vectors of k per step for every NX and R, so each output sums its products in one order whatever
 * the number of rows: a row of a 2-4 row pass (a stream's drafted tokens, runtime/stream.py) gets the
 * logits it gets alone (Model.rows_exact). R weight rows share each x load where the NX * R * U
 * accumulators fit three quarters of the register file (3 rows: R = 4 on AVX-512, where half the file gave
 * R = 2 and 30 GB/s of hot bf16 weights on one core against 44-47). (U = 4 / 2 / 1 by NX, as before,
 * summed 1 and 4 rows in other orders; on AVX-512 U = 2 streamed as fast at 1-4 rows, bf16 weights from
 * memory at ~50 GB/s, alternated runs.) */
#define GEMV_U 2
#define GEMV_R(nx) ((nx) == 1 ? 1 : GEMV_ACC * 3 / 2 / (GEMV_U * (nx)) >= 4 ? 4 : GEMV_ACC * 3 / 2 / (GEMV_U * (nx)) >= 2 ? 2 : 1)

/* y[0:NX, m:m+R] for compile-time NX, R and wtype (the switch in gemv() makes them constants). */
VX_INLINE void gemv_tile(const vx_linear_args *a, int64_t m, const int NX, const int R, const int wtype) {
    const int U = GEMV_U;
    const int64_t K = a->k;
    const size_t esize = wtype == VX_W_BF16 ? 2 : 4;
    const char *w = (const char *)a->w + (size_t)m * K * esize;
    vf acc[4][4][4];                                       /* [u][r][n] */
    float tail[4][4];
    for (int r = 0; r < R; r++)
        for (int n = 0; n < NX; n++) {
            tail[r][n] = 0.0f;
            for (int u = 0; u < U; u++) acc[u][r][n] = vx_zero();
        }
    int64_t k = 0;
    for (; k + U * VW <= K; k += U * VW)
        for (int u = 0; u < U; u++) {
            vf wv[4];
            for (int r = 0; r < R; r++) {
                if (VW > 1 && u == 0)
                    for (size_t off = 0; off < U * VW * esize; off += 64) {
                        if (vx_stream_l2) __builtin_prefetch(w + ((size_t)r * K + k) * esize + off + GEMV_PREFETCH, 0, 1);
                        else __builtin_prefetch(w + ((size_t)r * K + k) * esize + off + GEMV_PREFETCH, 0, 0);
                    }
                wv[r] = gemv_load_w(w + (size_t)r * K * esize, wtype, k + u * VW);
            }
            for (int n = 0; n < NX; n++) {
                vf xv = vx_load(a->x + n * K + k + u * VW);
                for (int r = 0; r < R; r++) acc[u][r][n] = vx_fma(xv, wv[r], acc[u][r][n]);
            }
        }
    for (; k < K; k++)                                     /* a row not a multiple of U * VW */
        for (int r = 0; r < R; r++) {
            float wk = gemv_load_w1(w + (size_t)r * K * esize, wtype, k);
            for (int n = 0; n < NX; n++) tail[r][n] += a->x[n * K + k] * wk;
        }
    for (int r = 0; r < R; r++)
        for (int n = 0; n < NX; n++) {
            vf t = acc[0][r][n];
            for (int u = 1; u < U; u++) t = vx_add(t, acc[u][r][n]);
            float y = vx_hsum(t) + tail[r][n];
            a->y[n * a->m + m + r] = a->b ? y + a->b[m + r] : y;
        }
}

VX_INLINE void gemv_rows(const vx_linear_args *a, int64_t m0, int64_t m1, const int NX, const int wtype) {
    const int R = GEMV_R(NX);
    int64_t m = m0;
    for (; m + R <= m1; m += R) gemv_tile(a, m, NX, R, wtype);
    for (; m < m1; m++) gemv_tile(a, m, NX, 1, wtype);
}

#define GEMV_CASE(nx, wt) \
    case (nx) * 2 + (wt): gemv_rows(a, m0, m1, nx, wt); break;

VX_FN static void VX_NAME(gemv)(const vx_linear_args *a, int64_t m0, int64_t m1) {
    switch (a->n * 2 + a->wtype) {
        GEMV_CASE(1, VX_W_F32) GEMV_CASE(1, VX_W_BF16)
        GEMV_CASE(2, VX_W_F32) GEMV_CASE(2, VX_W_BF16)
        GEMV_CASE(3, VX_W_F32) GEMV_CASE(3, VX_W_BF16)
        GEMV_CASE(4, VX_W_F32) GEMV_CASE(4, VX_W_BF16)
    }
}
#undef GEMV_CASE

/* ---- GEMM micro-kernel -------------------------------------------------------------------------------
 * c[MR, NR] (row stride ldc) = or += sum_k a[k, 0:MR] (x) b[k, 0:NR]: a is a packed panel of MR
 * activation rows, b a packed panel of NR weight rows already widened to float32, both k-major. One
 * broadcast of a and NV vector loads of b feed MR * NV independent FMAs per k. */
#if VW == 16
#define GEMM_MR 12
#define GEMM_NV 2
#elif VW == 8
#define GEMM_MR 6
#define GEMM_NV 2
#else
#define GEMM_MR 4
#define GEMM_NV 4
#endif
#define GEMM_NR (GEMM_NV * VW)
_Static_assert(VW == 1 || GEMM_MR <= VW, "pack_panel transposes MR rows within VW-row blocks");

/* dst[kk][i] = x[i][kk] for i < rows, else 0: blocks of VW columns of all MR rows transposed in registers
 * (MR <= VW at every level). Rounding to bf16 precision (VX_X_BF16 where the CPU has no bf16 dot
 * product, or the weights are not bf16) takes the scalar loop. */
VX_FN static void VX_NAME(pack_panel)(const float *x, int64_t ldx, int rows, int64_t kc, int xtype, uint32_t *dst) {
    float *d = (float *)dst;
    int64_t kk = 0;
    if (VW > 1 && xtype != VX_X_BF16)
        for (; kk + VW <= kc; kk += VW) {
            vf r[VW];
            float t[VW];
            VX_UNROLL
            for (int i = 0; i < VW; i++) r[i] = i < rows ? vx_load(x + i * ldx + kk) : vx_zero();
            vx_transpose(r);
            VX_UNROLL
            for (int j = 0; j < VW; j++) {
                vx_store(t, r[j]);
                memcpy(d + (kk + j) * GEMM_MR, t, sizeof(float) * GEMM_MR);
            }
        }
    for (; kk < kc; kk++)
        for (int i = 0; i < GEMM_MR; i++) {
            const float v = i < rows ? x[i * ldx + kk] : 0.0f;
            d[kk * GEMM_MR + i] = xtype == VX_X_BF16 ? vx_round_bf16(v) : v;
        }
}

/* Packing: bp[p][kk][j] = w[j0 + p * NR + j, k0 + kk] widened to float32, rows
 * past m zero. Blocks of VW rows x VW columns are loaded row-wise and transposed in registers, which
 * keeps packing a small fraction of the GEMM even for a few dozen activation rows. */
VX_FN static void VX_NAME(pack_weights)(const vx_linear_args *a, int64_t j0, int64_t nc, int64_t k0, int64_t kc, void *bpv) {
    float *bp = bpv;
    const int64_t K = a->k;
    const int wtype = a->wtype;
    const size_t esize = wtype == VX_W_BF16 ? 2 : 4;
    const int64_t vec_end = kc / VW * VW;
    for (int64_t p = 0; p < nc; p += GEMM_NR, bp += kc * GEMM_NR)
        for (int jb = 0; jb < GEMM_NR; jb += VW) {
            const char *rows[VW];
            for (int i = 0; i < VW; i++) {
                int64_t row = j0 + p + jb + i;
                rows[i] = row < a->m ? (const char *)a->w + (size_t)row * K * esize : NULL;
            }
            int64_t kk = 0;
            for (; kk < vec_end; kk += VW) {
                vf r[VW];
                for (int i = 0; i < VW; i++) {
                    if (rows[i] && p + GEMM_NR + jb + i + j0 < a->m)  /* the next panel's rows */
                        __builtin_prefetch(rows[i] + ((size_t)GEMM_NR * K + k0 + kk) * esize);
                    r[i] = rows[i] ? gemv_load_w(rows[i], wtype, k0 + kk) : vx_zero();
                }
                vx_transpose(r);
                for (int i = 0; i < VW; i++) vx_store(bp + (kk + i) * GEMM_NR + jb, r[i]);
            }
            for (; kk < kc; kk++)
                for (int i = 0; i < VW; i++) {
                    bp[kk * GEMM_NR + jb + i] = rows[i] ? gemv_load_w1(rows[i], wtype, k0 + kk) : 0.0f;
                }
        }
}

VX_FN static void VX_NAME(gemm_micro)(int64_t kc, const void *av_, const void *bv_, float *c, int64_t ldc, int accumulate) {
    const float *a = av_, *b = bv_;
    vf acc[GEMM_MR][GEMM_NV];
    for (int i = 0; i < GEMM_MR; i++)
        for (int j = 0; j < GEMM_NV; j++) acc[i][j] = vx_zero();
    for (int64_t k = 0; k < kc; k++, a += GEMM_MR, b += GEMM_NR) {
        vf bv[GEMM_NV];
        for (int j = 0; j < GEMM_NV; j++) bv[j] = vx_load(b + j * VW);
        for (int i = 0; i < GEMM_MR; i++) {
            vf av = vx_set1(a[i]);
            for (int j = 0; j < GEMM_NV; j++) acc[i][j] = vx_fma(av, bv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < GEMM_MR; i++)
        for (int j = 0; j < GEMM_NV; j++) {
            float *ci = c + i * ldc + j * VW;
            vx_store(ci, accumulate ? vx_add(vx_load(ci), acc[i][j]) : acc[i][j]);
        }
}

/* ---- GEMM on bf16 dot products (AVX512-BF16), for bf16-rounded x times bf16 weights ------------------
 * VDPBF16PS multiplies pairs of bf16 (exactly: 8-bit by 8-bit significands fit a float32) and adds both
 * products to a float32 accumulator, 32 multiply-adds per instruction where an FMA does 16. The packed
 * elements are 32-bit pairs of consecutive k (kstep 2): a weight row's k-pairs are simply its bf16 values
 * read as uint32, so packing is a 16 x 16 transpose of 32-bit elements, no conversion at all. */
#if VX_LEVEL == VX_LEVEL_AVX512
#define VX_BF16DOT_FN __attribute__((target("avx512f,avx512bw,avx512bf16,avx2,fma")))
#define BF16DOT_MR 12
#define BF16DOT_NR 32

/* dst[s][i] = the bf16 pair (x[i][2s], x[i][2s + 1]) for i < rows (0 past kc or rows): 32 values of each
 * row per conversion, then a 16 x 16 transpose of the pairs. VCVTNE2PS2BF16 rounds to nearest even like
 * vx_f32_to_bf16 and reads a subnormal as 0, as the dot product would read a subnormal bf16 anyway. */
VX_BF16DOT_FN static void pack_panel_bf16dot(const float *x, int64_t ldx, int rows, int64_t kc, int xtype,
                                             uint32_t *dst) {
    (void)xtype;   /* always bf16: the dot product multiplies bf16 */
    int64_t s = 0;
    for (; 2 * s + 32 <= kc; s += 16) {
        vf r[16];
        VX_UNROLL
        for (int i = 0; i < 16; i++)
            r[i] = i < rows ? (vf)_mm512_cvtne2ps_pbh(vx_load(x + i * ldx + 2 * s + 16), vx_load(x + i * ldx + 2 * s))
                            : vx_zero();
        vx_transpose(r);
        VX_UNROLL
        for (int j = 0; j < 16; j++) _mm512_mask_storeu_ps(dst + (s + j) * BF16DOT_MR, (1 << BF16DOT_MR) - 1, r[j]);
    }
    for (; 2 * s < kc; s++)
        for (int i = 0; i < BF16DOT_MR; i++) {
            const float *xi = x + i * ldx;
            uint32_t lo = i < rows ? vx_f32_to_bf16(xi[2 * s]) : 0, hi = i < rows && 2 * s + 1 < kc ? vx_f32_to_bf16(xi[2 * s + 1]) : 0;
            dst[s * BF16DOT_MR + i] = lo | hi << 16;
        }
}

/* bp[p][s][j] = bf16 pair (w[j0 + p * NR + j, k0 + 2s], w[.., k0 + 2s + 1]); rows past m and the odd
 * k past kc are 0 */
VX_BF16DOT_FN static void pack_weights_bf16dot(const vx_linear_args *a, int64_t j0, int64_t nc, int64_t k0, int64_t kc,
                                               void *bpv) {
    uint32_t *bp = bpv;
    const int64_t steps = (kc + 1) / 2, vec_end = kc / 32 * 16;   /* steps of whole 32-value loads */
    for (int64_t p = 0; p < nc; p += BF16DOT_NR, bp += steps * BF16DOT_NR)
        for (int jb = 0; jb < BF16DOT_NR; jb += 16) {
            const uint16_t *rows[16];
            for (int i = 0; i < 16; i++) {
                int64_t row = j0 + p + jb + i;
                rows[i] = row < a->m ? (const uint16_t *)a->w + (size_t)row * a->k + k0 : NULL;
            }
            int64_t s = 0;
            for (; s < vec_end; s += 16) {
                vf r[16];
                VX_UNROLL
                for (int i = 0; i < 16; i++) {
                    if (rows[i] && j0 + p + BF16DOT_NR + jb + i < a->m)   /* the next panel's rows */
                        __builtin_prefetch(rows[i] + (size_t)BF16DOT_NR * a->k + 2 * s);
                    r[i] = rows[i] ? _mm512_castsi512_ps(_mm512_loadu_si512(rows[i] + 2 * s)) : vx_zero();
                }
                vx_transpose(r);
                VX_UNROLL
                for (int i = 0; i < 16; i++) vx_store((float *)bp + (s + i) * BF16DOT_NR + jb, r[i]);
            }
            for (; s < steps; s++)
                for (int i = 0; i < 16; i++) {
                    uint32_t lo = rows[i] ? rows[i][2 * s] : 0, hi = rows[i] && 2 * s + 1 < kc ? rows[i][2 * s + 1] : 0;
                    bp[s * BF16DOT_NR + jb + i] = lo | hi << 16;
                }
        }
}

VX_BF16DOT_FN static void gemm_micro_bf16dot(int64_t steps, const void *av_, const void *bv_, float *c, int64_t ldc,
                                             int accumulate) {
    const uint32_t *a = av_, *b = bv_;
    __m512 acc[BF16DOT_MR][2];
    VX_UNROLL
    for (int i = 0; i < BF16DOT_MR; i++) acc[i][0] = acc[i][1] = vx_zero();
    for (int64_t s = 0; s < steps; s++, a += BF16DOT_MR, b += BF16DOT_NR) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 16);
        VX_UNROLL
        for (int i = 0; i < BF16DOT_MR; i++) {
            const __m512bh ai = (__m512bh)_mm512_set1_epi32((int)a[i]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
        }
    }
    VX_UNROLL
    for (int i = 0; i < BF16DOT_MR; i++)
        for (int j = 0; j < 2; j++) {
            float *ci = c + i * ldc + j * 16;
            vx_store(ci, accumulate ? vx_add(vx_load(ci), acc[i][j]) : acc[i][j]);
        }
}

static const vx_gemm_kernel gemm_bf16dot = {BF16DOT_MR, BF16DOT_NR, 2, pack_panel_bf16dot, pack_weights_bf16dot,
                                            gemm_micro_bf16dot};
#endif
